"""The model service's settings, with defaults, and building its registry."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.model_service.registry import (
    DirectorySource,
    ModelRegistry,
    ModelSource,
    S3Source,
)

#: The model shipped in models/, used for tenants without their own.
DEFAULT_MODEL = "cloud-ctu13s6-r100-w300"
#: The project's models folder, in a development checkout.
PROJECT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
DEFAULT_MAX_ROWS = 100_000
DEFAULT_POLL_INTERVAL_S = 10.0


class ConfigError(ValueError):
    """Raised for a bad setting; the message names it and what is allowed."""


@dataclass(frozen=True)
class ServiceConfig:
    """Where models come from and how tenants map to them.

    Exactly one of ``models_dir`` and ``s3_uri`` (``s3://bucket/prefix``);
    ``s3_endpoint_url`` for a local S3 server.  ``default_model``: shared
    model name for tenants without their own, ``None`` for none.
    ``tenant_models``: tenant -> shared model name.  ``poll_interval_s``:
    seconds between checks for new model versions.  ``max_rows``: rows
    accepted in one request.
    """

    models_dir: Path | None = None
    s3_uri: str | None = None
    s3_endpoint_url: str | None = None
    default_model: str | None = DEFAULT_MODEL
    tenant_models: Mapping[str, str] = field(default_factory=dict)
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    max_rows: int = DEFAULT_MAX_ROWS

    def __post_init__(self) -> None:
        if (self.models_dir is None) == (self.s3_uri is None):
            raise ConfigError(
                "set exactly one of models_dir and s3_uri, got "
                f"models_dir={self.models_dir!r} s3_uri={self.s3_uri!r}"
            )
        if self.models_dir is not None and not Path(self.models_dir).is_dir():
            raise ConfigError(f"models_dir {self.models_dir} is not a folder")
        if not self.poll_interval_s > 0:
            raise ConfigError(
                f"poll_interval_s must be > 0 seconds, got {self.poll_interval_s}"
            )
        if self.max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1, got {self.max_rows}")

    def source(self, s3_client: Any = None) -> ModelSource:
        """The model source these settings name (S3: boto3's credential chain)."""
        if self.models_dir is not None:
            return DirectorySource(self.models_dir)
        assert self.s3_uri is not None
        if s3_client is None:
            import boto3  # noqa: PLC0415 - only for S3 sources

            s3_client = boto3.client("s3", endpoint_url=self.s3_endpoint_url)
        try:
            return S3Source.from_uri(self.s3_uri, s3_client)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def registry(self, s3_client: Any = None) -> ModelRegistry:
        """A registry over :meth:`source` with these settings."""
        return ModelRegistry(
            self.source(s3_client),
            default_model=self.default_model,
            tenant_models=self.tenant_models,
            poll_interval_s=self.poll_interval_s,
        )


def parse_tenant_models(pairs: list[str]) -> dict[str, str]:
    """``["acme=cloud-x", ...]`` to a mapping; raises :class:`ConfigError`."""
    out: dict[str, str] = {}
    for pair in pairs:
        tenant, sep, model = pair.partition("=")
        if not sep or not tenant or not model:
            raise ConfigError(f"tenant model must be TENANT=MODEL_NAME, got {pair!r}")
        out[tenant] = model
    return out
