"""Configuration of the relay's model-update agent.

Read from a JSON or TOML file (by suffix) whose keys are the fields of
:class:`ModelSyncConfig`; paths may be relative to the file.  Example::

    {
      "thing_name": "relay-acme-01",
      "endpoint": "abc123-ats.iot.eu-west-1.amazonaws.com",
      "port": 8883,
      "cert_path": "certs/relay.pem.crt",
      "key_path": "certs/relay.private.key",
      "ca_path": "certs/AmazonRootCA1.pem",
      "models_dir": "/var/lib/sampleflow/models",
      "public_keys": ["keys/model-signing.pub.pem"],
      "canary_rows_path": "/var/lib/sampleflow/recent-rows.npz"
    }

Credentials for ``s3`` download sources come from boto3's normal chain,
never from this file.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_THING_RE = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
_PATH_KEYS = ("cert_path", "key_path", "ca_path", "models_dir", "canary_rows_path")


class ModelSyncConfigError(ValueError):
    """An invalid setting; names the key, the bad value and the rule."""

    def __init__(self, key: str, value: object, rule: str) -> None:
        super().__init__(f"modelsync.{key}={value!r}: {rule}")
        self.key = key
        self.value = value
        self.rule = rule


@dataclass(frozen=True)
class ModelSyncConfig:
    """Where the broker is, who this relay is, and the update limits.

    Times are seconds, sizes bytes.
    """

    thing_name: str
    endpoint: str
    cert_path: Path
    key_path: Path
    ca_path: Path
    models_dir: Path
    public_keys: tuple[Path, ...]
    port: int = 8883
    #: CIDRs of this network's hosts (for the standalone agent's filter)
    internal_networks: tuple[str, ...] = (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
    )
    #: the feature rows the canary runs on (written by the relay's filter)
    canary_rows_path: Path | None = None
    canary_min_rows: int = 20
    canary_max_alert_share: float = 0.2
    max_model_bytes: int = 16 * 1024 * 1024
    download_timeout_s: float = 60.0
    download_chunk_bytes: int = 64 * 1024
    #: broker reconnects back off from min to max, doubling
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60
    keep_alive_s: int = 60
    #: how long to wait for the broker's answer to one jobs request
    request_timeout_s: float = 10.0
    #: the job queue is also checked this often (besides every notify-next
    #: and reconnect), in case a notification was lost
    poll_interval_s: float = 300.0
    #: a job whose install was interrupted this often is reported FAILED
    max_attempts: int = 3
    s3_region: str | None = None
    s3_endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if not _THING_RE.match(self.thing_name):
            raise ModelSyncConfigError(
                "thing_name", self.thing_name, "must match [a-zA-Z0-9:_-]{1,128}"
            )
        if not self.endpoint:
            raise ModelSyncConfigError("endpoint", self.endpoint, "must not be empty")
        if not 0 < self.port < 65536:
            raise ModelSyncConfigError("port", self.port, "must be 1..65535")
        if not self.public_keys:
            raise ModelSyncConfigError(
                "public_keys", self.public_keys, "needs at least one key file"
            )
        for key in ("max_model_bytes", "download_chunk_bytes", "max_attempts"):
            if getattr(self, key) < 1:
                raise ModelSyncConfigError(key, getattr(self, key), "must be >= 1")
        if not 1 <= self.reconnect_min_s <= self.reconnect_max_s:
            raise ModelSyncConfigError(
                "reconnect_min_s",
                self.reconnect_min_s,
                f"must be >= 1 and <= reconnect_max_s ({self.reconnect_max_s})",
            )
        if self.keep_alive_s < 5:
            raise ModelSyncConfigError(
                "keep_alive_s", self.keep_alive_s, "must be >= 5"
            )
        for key in ("request_timeout_s", "download_timeout_s", "poll_interval_s"):
            if not getattr(self, key) > 0:
                raise ModelSyncConfigError(key, getattr(self, key), "must be > 0")
        if self.canary_min_rows < 1:
            raise ModelSyncConfigError(
                "canary_min_rows", self.canary_min_rows, "must be >= 1"
            )
        if not 0.0 < self.canary_max_alert_share <= 1.0:
            raise ModelSyncConfigError(
                "canary_max_alert_share",
                self.canary_max_alert_share,
                "must be in (0, 1]",
            )

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], base_dir: Path | None = None
    ) -> ModelSyncConfig:
        """Build from a parsed file; relative paths resolve against ``base_dir``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelSyncConfigError(
                unknown[0],
                data[unknown[0]],
                f"unknown key; valid keys: {sorted(names)}",
            )
        base = base_dir or Path.cwd()

        def resolve(value: Any) -> Path:
            path = Path(str(value)).expanduser()
            return path if path.is_absolute() else base / path

        kwargs: dict[str, Any] = dict(data)
        for key in _PATH_KEYS:
            if kwargs.get(key) is not None:
                kwargs[key] = resolve(kwargs[key])
        keys = kwargs.get("public_keys", ())
        if isinstance(keys, str):
            keys = [keys]
        kwargs["public_keys"] = tuple(resolve(k) for k in keys)
        if "internal_networks" in kwargs:
            kwargs["internal_networks"] = tuple(kwargs["internal_networks"])
        for f in dataclasses.fields(cls):
            missing = (
                f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            )
            if missing and kwargs.get(f.name) is None:
                raise ModelSyncConfigError(f.name, None, "is required")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ModelSyncConfigError("(file)", sorted(data), str(exc)) from exc

    @classmethod
    def load(cls, path: Path) -> ModelSyncConfig:
        """Read a ``.json`` or ``.toml`` file."""
        path = Path(path)
        raw = path.read_bytes()
        data = (
            tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
        )
        if not isinstance(data, dict):
            raise ModelSyncConfigError("(file)", str(path), "must hold an object")
        return cls.from_mapping(data, base_dir=path.parent)
