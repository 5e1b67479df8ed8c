"""The engine's settings, checked once at start-up."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from cloud.engine.defaults import (
    DEFAULT_TENANT_NETWORKS,
    DETECTION_MODES,
    PRIVATE_NETWORKS,
    ConfigError,
    tenant_networks,
)
from cloud.engine.kinesis.source import STARTING_POSITIONS
from edge_agent.features import InternalNetworks

__all__ = [
    "DEFAULT_TENANT_NETWORKS",
    "DETECTION_MODES",
    "PRIVATE_NETWORKS",
    "ConfigError",
    "EngineConfig",
    "tenant_networks",
]


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine (one stream, one checkpoint).

    Times are seconds.  A flow row counts in every window (``window_s``
    long, starting every ``slide_s``) that holds its ``time_end``; a window
    is final once the latest ``time_end`` seen for its tenant is
    ``lateness_s`` past the window's end.  ``state_path`` (the driver-local
    SQLite file of :mod:`cloud.engine.store`) defaults to a file in the
    checkpoint folder, which then must be a local path.

    Host windows (``feature_window_s`` long every ``feature_slide_s``, by
    flow ``time_start``; match the model's ``window_s``) are computed for
    the hosts of each tenant's internal networks (``tenant_networks``,
    else ``internal_networks``) and scored through ``model_service_url``;
    without it no features are computed.  ``mongo_uri`` (detections and
    estimates), ``state_table`` (DynamoDB tenant state) and
    ``metrics_namespace`` (CloudWatch) are off when None; DynamoDB and
    CloudWatch use ``aws_endpoint_url``, else ``endpoint_url``.
    ``detections``: ``alerts`` stores alerting windows, ``all`` every
    scored window.  ``score_retry_s``: wait after the model service or
    the detection store failed before trying again; ``mongo_timeout_s``
    bounds each store call (server selection, connect, operation).
    ``status_port`` (None: off; 0: any free port) serves ``/metrics`` and
    ``/healthz`` on ``status_address`` (:mod:`cloud.engine.health`).
    Alert hysteresis: a host window at or above the alert threshold is a
    detection only when ``alert_k`` of the host's last ``alert_n`` feature
    windows (it included, ``feature_slide_s`` apart) were; 1 and 1: every
    alerting window.  Flow rows whose start or end is more than
    ``max_future_s`` past their batch's Kinesis arrival time (a clock
    running ahead) are left out and counted (``future_flows``): they would
    carry the tenant's watermark into the future.
    """

    stream_name: str
    checkpoint_dir: str
    endpoint_url: str | None = None
    region: str | None = None
    starting_position: str = "TRIM_HORIZON"
    max_records_per_batch: int = 10_000
    max_bytes_per_batch: int = 64 * 1024 * 1024
    trigger_interval_s: float = 2.0
    window_s: int = 60
    slide_s: int = 10
    lateness_s: int = 120
    confidence: float = 0.95
    dedup_horizon_s: int = 7 * 24 * 3600
    state_path: str | None = None
    estimates_path: str | None = None
    master: str | None = "local[*]"
    shuffle_partitions: int = 4
    query_name: str = "sampleflow-engine"
    feature_window_s: int = 300
    feature_slide_s: int = 60
    internal_networks: tuple[str, ...] = PRIVATE_NETWORKS
    tenant_networks: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_TENANT_NETWORKS
    model_service_url: str | None = None
    mongo_uri: str | None = None
    mongo_database: str = "sampleflow"
    mongo_timeout_s: float = 5.0
    state_table: str | None = None
    metrics_namespace: str | None = None
    aws_endpoint_url: str | None = None
    top_talkers: int = 10
    detections: str = "alerts"
    score_retry_s: float = 10.0
    status_address: str = "127.0.0.1"
    status_port: int | None = None
    alert_k: int = 2
    alert_n: int = 3
    max_future_s: int = 300

    def networks_for(self, tenant_id: str) -> InternalNetworks:
        """The tenant's internal networks, parsed (cached)."""
        return _parse_networks(
            dict(self.tenant_networks).get(tenant_id, self.internal_networks)
        )

    def __post_init__(self) -> None:
        if not self.stream_name:
            raise ConfigError("stream_name is required")
        if not self.checkpoint_dir:
            raise ConfigError("checkpoint_dir is required")
        if self.starting_position not in STARTING_POSITIONS:
            raise ConfigError(
                f"starting_position must be one of {STARTING_POSITIONS}, "
                f"got {self.starting_position!r}"
            )
        for name in (
            "max_records_per_batch",
            "max_bytes_per_batch",
            "window_s",
            "slide_s",
            "feature_window_s",
            "feature_slide_s",
            "top_talkers",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.slide_s > self.window_s:
            raise ConfigError(
                f"slide_s ({self.slide_s}) must not exceed window_s ({self.window_s})"
            )
        if self.feature_slide_s > self.feature_window_s:
            raise ConfigError(
                f"feature_slide_s ({self.feature_slide_s}) must not exceed "
                f"feature_window_s ({self.feature_window_s})"
            )
        for tenant, cidrs in (("*", self.internal_networks), *self.tenant_networks):
            try:
                _parse_networks(tuple(cidrs))
            except ValueError as exc:
                raise ConfigError(
                    f"internal networks of tenant {tenant!r}: {exc}"
                ) from None
        if self.detections not in DETECTION_MODES:
            raise ConfigError(
                f"detections must be one of {DETECTION_MODES}, got {self.detections!r}"
            )
        if self.mongo_timeout_s <= 0:
            raise ConfigError(
                f"mongo_timeout_s must be > 0, got {self.mongo_timeout_s}"
            )
        if self.score_retry_s < 0:
            raise ConfigError(f"score_retry_s must be >= 0, got {self.score_retry_s}")
        if self.model_service_url is not None and not self.model_service_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                "model_service_url must start with http:// or https://, got "
                f"{self.model_service_url!r}"
            )
        if self.status_port is not None and not 0 <= self.status_port <= 65535:
            raise ConfigError(
                f"status_port must be in 0..65535 (0: any free port), got "
                f"{self.status_port}"
            )
        if not 1 <= self.alert_k <= self.alert_n:
            raise ConfigError(
                f"need 1 <= alert_k <= alert_n, got alert_k {self.alert_k}, "
                f"alert_n {self.alert_n}"
            )
        if self.trigger_interval_s <= 0:
            raise ConfigError(
                f"trigger_interval_s must be > 0, got {self.trigger_interval_s}"
            )
        if self.lateness_s < 0:
            raise ConfigError(f"lateness_s must be >= 0, got {self.lateness_s}")
        if self.max_future_s < 0:
            raise ConfigError(f"max_future_s must be >= 0, got {self.max_future_s}")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.state_path is None and "://" in self.checkpoint_dir:
            raise ConfigError(
                "state_path is required when checkpoint_dir is not a local path "
                f"({self.checkpoint_dir!r})"
            )

    @property
    def resolved_state_path(self) -> Path:
        """Where the SQLite state lives."""
        if self.state_path is not None:
            return Path(self.state_path)
        return Path(self.checkpoint_dir) / "engine-state.sqlite"

    def source_options(self) -> dict[str, str]:
        """Options of the Kinesis source (``format("kinesis")``)."""
        options = {
            "streamName": self.stream_name,
            "startingPosition": self.starting_position,
            "maxRecordsPerBatch": str(self.max_records_per_batch),
            "maxBytesPerBatch": str(self.max_bytes_per_batch),
        }
        if self.endpoint_url:
            options["endpointUrl"] = self.endpoint_url
        if self.region:
            options["region"] = self.region
        return options


@functools.lru_cache(maxsize=256)
def _parse_networks(cidrs: tuple[str, ...]) -> InternalNetworks:
    return InternalNetworks.parse(cidrs)
