"""Settings of the local stack and the demo: ports, state folder, names.

Every setting has a default and can be given, from lowest to highest
precedence, in a TOML file (``--config FILE``, table ``[local]``), in the
environment as ``SAMPLEFLOW_LOCAL_<KEY>`` (``SAMPLEFLOW_LOCAL_STATE_DIR``)
or as a command-line flag (``--state-dir``).  A bad value stops the
command with :class:`SettingsError`, whose message names the key, the
value, where it came from and what is allowed; unknown keys are errors too.

Everything listens on 127.0.0.1 only; that is not a setting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "SAMPLEFLOW_LOCAL_"
SECTION = "local"
HOST = "127.0.0.1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class SettingsError(ValueError):
    """A setting is invalid; the message names key, value, source and rule."""

    def __init__(self, key: str, value: object, rule: str, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"{key}={value!r}{where}: {rule}")
        self.key = key
        self.value = value
        self.rule = rule
        self.source = source


@dataclass(frozen=True)
class LocalSettings:
    """The settings; ports are TCP on 127.0.0.1 unless said otherwise."""

    #: pids, logs and data of every part (relative: to the current folder)
    state_dir: Path = Path(".sampleflow")
    #: MiniStack's gateway: Kinesis, DynamoDB, S3, IoT, CloudWatch
    ministack_port: int = 4566
    #: MiniStack's IoT MQTT (mutual TLS) listener; 0 leaves it off, because
    #: MiniStack binds it on every interface, not on loopback only
    mqtt_port: int = 0
    #: the MongoDB-compatible store (SecantusDB)
    store_port: int = 27017
    #: the model service (POST /v1/score, /readyz, /metrics)
    model_service_port: int = 8480
    #: the relay's UDP collector (IPFIX, NetFlow and sFlow alike)
    relay_port: int = 4739
    #: the relay's /metrics and /healthz
    relay_metrics_port: int = 9464
    #: the engine's /metrics and /healthz; 0 picks a free port at each
    #: ``up`` (kept in stack.json), so a second stack or an engine of one's
    #: own on the engine's default 9466 does not collide
    engine_status_port: int = 0
    #: how long (event time, s) the engine keeps a window open for rows that
    #: arrive late; 0: the engine's default (120 s), or, for a stack the demo
    #: starts, scaled to its --speedup (see cloud.local.demo.replay_lateness_s)
    engine_lateness_s: int = 0
    region: str = "us-east-1"
    stream_name: str = "sampleflow-flows"
    bucket: str = "sampleflow-models"
    tenant_id: str = "local"
    relay_id: str = "local-relay"
    #: seconds every part gets to become healthy (the Spark engine is the
    #: slowest: 20-60 s on two busy cores)
    start_timeout_s: float = 180.0
    #: seconds a part gets after SIGTERM before SIGKILL
    stop_timeout_s: float = 20.0
    #: seconds between two engine micro-batches
    engine_trigger_s: float = 1.0
    #: Spark master of the engine (local[N]: N worker threads)
    engine_master: str = "local[2]"
    #: the tenant's internal networks (comma-separated CIDRs): the hosts
    #: the engine scores.  The private ranges plus CTU's 147.32.0.0/16,
    #: the network the demo replays.
    internal_networks: str = (
        "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7,147.32.0.0/16"
    )
    #: relay aggregation window and lateness, seconds.  Short, because the
    #: demo replays faster than real time: a 10 s window at a 60x replay
    #: would merge ten minutes of capture into one row's time range.
    relay_window_s: float = 1.0
    relay_lateness_s: float = 1.0

    def __post_init__(self) -> None:
        ports = {
            "ministack_port": self.ministack_port,
            "store_port": self.store_port,
            "model_service_port": self.model_service_port,
            "relay_port": self.relay_port,
            "relay_metrics_port": self.relay_metrics_port,
        }
        for key, port in ports.items():
            if not 1 <= port <= 65535:
                raise SettingsError(key, port, "must be a port, 1 to 65535")
        if not 0 <= self.mqtt_port <= 65535:
            raise SettingsError("mqtt_port", self.mqtt_port, "must be 0 (off) to 65535")
        if self.engine_lateness_s < 0:
            raise SettingsError(
                "engine_lateness_s", self.engine_lateness_s, "must be >= 0"
            )
        if not 0 <= self.engine_status_port <= 65535:
            raise SettingsError(
                "engine_status_port",
                self.engine_status_port,
                "must be 0 (a free port at each up) to 65535",
            )
        tcp = {k: v for k, v in ports.items() if k != "relay_port"}
        if self.mqtt_port:
            tcp["mqtt_port"] = self.mqtt_port
        if self.engine_status_port:
            tcp["engine_status_port"] = self.engine_status_port
        seen: dict[int, str] = {}
        for key, port in tcp.items():
            if port in seen:
                raise SettingsError(
                    key, port, f"is also {seen[port]}: every TCP port must differ"
                )
            seen[port] = key
        for key in ("stream_name", "bucket", "tenant_id", "relay_id"):
            value = getattr(self, key)
            if not _NAME_RE.match(value):
                raise SettingsError(
                    key, value, "1 to 63 of A-Z a-z 0-9 . _ -, starting alphanumeric"
                )
        if self.bucket != self.bucket.lower() or "_" in self.bucket:
            raise SettingsError(
                "bucket", self.bucket, "S3 bucket names are lowercase, no '_'"
            )
        for key in (
            "start_timeout_s",
            "stop_timeout_s",
            "engine_trigger_s",
            "relay_window_s",
        ):
            if getattr(self, key) <= 0:
                raise SettingsError(key, getattr(self, key), "must be > 0")
        if self.relay_lateness_s < 0:
            raise SettingsError(
                "relay_lateness_s", self.relay_lateness_s, "must be >= 0"
            )
        for cidr in self.networks:
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise SettingsError(
                    "internal_networks", cidr, "must be CIDRs, comma-separated"
                ) from None
        if not self.networks:
            raise SettingsError(
                "internal_networks", self.internal_networks, "list one CIDR or more"
            )
        if not re.match(r"^local\[(\d+|\*)\]$", self.engine_master):
            raise SettingsError(
                "engine_master", self.engine_master, "must be local[N] or local[*]"
            )

    @property
    def networks(self) -> tuple[str, ...]:
        """``internal_networks`` as a tuple of CIDRs."""
        return tuple(c.strip() for c in self.internal_networks.split(",") if c.strip())

    @property
    def ministack_url(self) -> str:
        """MiniStack's endpoint URL."""
        return f"http://{HOST}:{self.ministack_port}"

    @property
    def store_uri(self) -> str:
        """The store's MongoDB URI."""
        return f"mongodb://{HOST}:{self.store_port}/?directConnection=true"

    @property
    def model_service_url(self) -> str:
        """The model service's base URL."""
        return f"http://{HOST}:{self.model_service_port}"

    @property
    def engine_status_url(self) -> str:
        """The engine's status base URL (``/healthz``, ``/metrics``); port 0
        until ``up`` picked one."""
        return f"http://{HOST}:{self.engine_status_port}"

    @property
    def relay_metrics_url(self) -> str:
        """The relay's Prometheus endpoint."""
        return f"http://{HOST}:{self.relay_metrics_port}/metrics"

    def resolved(self) -> LocalSettings:
        """The same settings with an absolute state folder."""
        return dataclasses.replace(self, state_dir=self.state_dir.resolve())


def setting_names() -> tuple[str, ...]:
    """Every setting key, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(LocalSettings))


def flag_name(key: str) -> str:
    """The command-line flag of a setting (``--state-dir``)."""
    return "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    """The environment variable of a setting."""
    return ENV_PREFIX + key.upper()


def how_to_set(key: str) -> str:
    """One line telling where a setting can be changed."""
    return f"{flag_name(key)}, {env_name(key)} or {key} in [{SECTION}] of --config"


def load_settings(
    path: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LocalSettings:
    """Build the settings from defaults, ``path``, the environment and
    ``flags`` (setting key -> value, None meaning "not given")."""
    environ = os.environ if environ is None else environ
    kinds = get_type_hints(LocalSettings)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise SettingsError("config", str(path), f"cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError("config", str(path), f"not TOML: {exc}") from None
        unknown = set(data) - {SECTION}
        if unknown:
            raise SettingsError(
                "config", str(path), f"unknown table(s) {sorted(unknown)}; use [local]"
            )
        for key, raw in data.get(SECTION, {}).items():
            if key not in kinds:
                raise SettingsError(
                    key, raw, f"unknown key; [local] has {', '.join(kinds)}", str(path)
                )
            values[key] = _convert(key, raw, kinds[key], False, f"file {path}")
            sources[key] = f"file {path}"
    for key in kinds:
        name = env_name(key)
        if name in environ:
            values[key] = _convert(key, environ[name], kinds[key], True, f"env {name}")
            sources[key] = f"env {name}"
    for key, raw in (flags or {}).items():
        if raw is None:
            continue
        if key not in kinds:
            raise SettingsError(key, raw, "not a setting")
        values[key] = _convert(key, raw, kinds[key], False, f"flag {flag_name(key)}")
        sources[key] = f"flag {flag_name(key)}"
    try:
        return LocalSettings(**values)
    except SettingsError as exc:
        raise SettingsError(
            exc.key, exc.value, exc.rule, sources.get(exc.key, "default")
        ) from None


_RULES = {Path: "a path", int: "an integer", float: "a number", str: "a string"}


def _convert(key: str, raw: Any, kind: Any, from_text: bool, source: str) -> Any:
    """Turn a TOML value, flag value or environment string into ``kind``."""
    rule = _RULES.get(kind)
    if rule is None:
        raise SettingsError(key, raw, f"unsupported type {kind}", source)
    try:
        if isinstance(raw, bool):
            raise ValueError(rule)
        if kind is Path and isinstance(raw, str | Path) and str(raw):
            return Path(raw)
        if kind is str and isinstance(raw, str):
            return raw.strip() if from_text else raw
        if isinstance(raw, str) and from_text:
            return kind(raw.strip())
        if kind is int and isinstance(raw, int):
            return raw
        if kind is float and isinstance(raw, int | float):
            return float(raw)
    except ValueError:
        pass
    raise SettingsError(key, raw, f"must be {rule}", source)
