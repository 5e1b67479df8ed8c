"""Relay settings: typed, frozen, with a default for every key.

Each setting comes from, in order of precedence:

1. the environment, ``SAMPLEFLOW_<SECTION>_<KEY>`` (``SAMPLEFLOW_KINESIS_
   STREAM_NAME``); lists are comma-separated (``2055,4739``), tables are
   ``key=value`` pairs (``192.0.2.1=100,192.0.2.2=1000``), an empty string
   sets an optional value to none;
2. the TOML file given with ``--config`` (section tables, ``[kinesis]``);
3. the default below.

A bad setting stops start-up with :class:`ConfigError`, whose message
names the key, the value, where it came from and what is allowed.
Unknown sections and keys are errors too (a typo must not silently fall
back to a default).  AWS credentials are never settings: the shipper uses
boto3's credential chain (environment, shared config with
``kinesis.profile``, container or instance role), and a key that looks
like a credential is refused with that advice.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import types
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from edge_agent.collect.udp import CollectorConfig
from edge_agent.filter.model import default_model_manifest
from edge_agent.flows.decoder import DecoderConfig
from edge_agent.modelsync.config import ModelSyncConfig, ModelSyncConfigError
from edge_agent.relay.partition import PARTITION_SCHEMES
from edge_agent.ship.config import ShipperConfig, ShipperConfigError
from edge_agent.spool import FULL_POLICIES
from edge_agent.spool import fileformat as spool_fileformat
from edge_agent.wire.batch import READ_MAJORS
from edge_agent.wire.limits import KINESIS_MAX_RECORD_BYTES

ENV_PREFIX = "SAMPLEFLOW_"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID_RULE = "1 to 64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
_CREDENTIAL_RE = re.compile(r"(secret|access_key|session_token|password)", re.I)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")


class ConfigError(ValueError):
    """A setting is invalid; the message names key, value, source and rule."""

    def __init__(self, key: str, value: object, rule: str, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"{key}={value!r}{where}: {rule}")
        self.key = key
        self.value = value
        self.rule = rule
        self.source = source


def _default_relay_id() -> str:
    """The host name, cut to a valid relay id (``relay`` if nothing is left)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])
    name = name.lstrip("._-")[:64]
    return name or "relay"


def _check_id(key: str, value: str) -> None:
    if not _ID_RE.match(value):
        raise ConfigError(key, value, _ID_RULE)


def _check_range(key: str, value: float, low: float, high: float | None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"{low} to {high}" if high is not None else f">= {low}"
        raise ConfigError(key, value, f"must be {bound}")


def _check_unique(key: str, values: list[Any]) -> None:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ConfigError(
                key, value, "is listed twice; each may appear once (it binds a socket)"
            )
        seen.add(value)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, value, f"must be one of {', '.join(choices)}")


def _check_address(key: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(key, value, "must be an IPv4 or IPv6 address") from None


@dataclass(frozen=True)
class RelaySettings:
    """``[relay]``: who this relay is and where it keeps its state."""

    SECTION: ClassVar[str] = "relay"
    #: the customer the relay ships for (part of every batch header and
    #: partition key); no default: ``relay run`` refuses to start without
    #: it, so no relay ships a customer's flows under a made-up tenant
    tenant_id: str | None = None
    #: stable across restarts (sequence numbers and partition keys use it);
    #: defaults to the host name
    relay_id: str = field(default_factory=_default_relay_id)
    #: the spool lives here unless spool.dir is set
    state_dir: Path = Path("/var/lib/sampleflow")
    log_level: str = "info"
    #: json (one object per line, for log shippers) or console (people)
    log_format: str = "json"
    #: batch wire format version written (docs/wire-format.md); 1 for as
    #: long as some reader of the stream knows only version 1
    wire_format: int = 2

    def __post_init__(self) -> None:
        if self.tenant_id is not None:
            _check_id("relay.tenant_id", self.tenant_id)
        _check_id("relay.relay_id", self.relay_id)
        _check_choice("relay.log_level", self.log_level, LOG_LEVELS)
        _check_choice("relay.log_format", self.log_format, LOG_FORMATS)
        if self.wire_format not in READ_MAJORS:
            raise ConfigError(
                "relay.wire_format",
                self.wire_format,
                f"must be one of {', '.join(map(str, READ_MAJORS))}",
            )


@dataclass(frozen=True)
class CollectorSettings:
    """``[collector]``: the UDP sockets flow exports arrive on."""

    SECTION: ClassVar[str] = "collector"
    listen_addresses: tuple[str, ...] = ("0.0.0.0",)
    #: NetFlow 2055, IPFIX 4739, sFlow 6343 by convention; any port takes
    #: any protocol (the decoder tells them apart)
    ports: tuple[int, ...] = (2055, 4739, 6343)
    #: SO_RCVBUF asked for per socket, bytes (the kernel may grant less:
    #: raise net.core.rmem_max)
    rcvbuf_bytes: int = 32 * 1024 * 1024
    #: datagrams waiting for the decoder, at most (then dropped, counted)
    max_queued_datagrams: int = 65536

    def __post_init__(self) -> None:
        if not self.listen_addresses:
            raise ConfigError(
                "collector.listen_addresses", self.listen_addresses, "list one or more"
            )
        for address in self.listen_addresses:
            _check_address("collector.listen_addresses", address)
        if not self.ports:
            raise ConfigError("collector.ports", self.ports, "list one or more")
        for port in self.ports:
            _check_range("collector.ports", port, 0, 65535)
        # Each (address, port) is one socket: a repeated one cannot bind.
        # Port 0 asks for a free port each time, so it may repeat.
        _check_unique("collector.ports", [p for p in self.ports if p != 0])
        _check_unique("collector.listen_addresses", list(self.listen_addresses))
        _check_range("collector.rcvbuf_bytes", self.rcvbuf_bytes, 1, None)
        _check_range(
            "collector.max_queued_datagrams", self.max_queued_datagrams, 1, None
        )

    def collector_config(self) -> CollectorConfig:
        """The UDP collector's own configuration."""
        return CollectorConfig(
            bind_addresses=self.listen_addresses,
            ports=self.ports,
            receive_buffer=self.rcvbuf_bytes,
            max_queued_datagrams=self.max_queued_datagrams,
        )


@dataclass(frozen=True)
class DecoderSettings:
    """``[decoder]``: sampling rates the exports do not announce."""

    SECTION: ClassVar[str] = "decoder"
    #: 1-in-N rate for records whose exporter announced none (0: unknown)
    default_sampling_rate: int = 0
    #: exporter address -> 1-in-N rate, winning over anything announced
    sampling_overrides: Mapping[str, int] = field(default_factory=dict)
    #: exporters tracked with their own counters and templates
    max_exporters: int = 4096

    def __post_init__(self) -> None:
        _check_range(
            "decoder.default_sampling_rate", self.default_sampling_rate, 0, None
        )
        for address, rate in self.sampling_overrides.items():
            _check_address("decoder.sampling_overrides", address)
            _check_range(f"decoder.sampling_overrides.{address}", rate, 1, None)
        _check_range("decoder.max_exporters", self.max_exporters, 1, None)
        object.__setattr__(
            self,
            "sampling_overrides",
            types.MappingProxyType(dict(self.sampling_overrides)),
        )

    def decoder_config(self) -> DecoderConfig:
        """The flow decoder's own configuration."""
        return DecoderConfig(
            default_sampling_rate=self.default_sampling_rate,
            sampling_overrides=dict(self.sampling_overrides),
            max_exporters=self.max_exporters,
        )


@dataclass(frozen=True)
class AggregateSettings:
    """``[aggregate]``: pre-aggregation windows (see edge_agent.aggregate)."""

    SECTION: ClassVar[str] = "aggregate"
    window_s: float = 10.0
    #: how long a window stays open after its end for late records
    lateness_s: float = 30.0
    #: distinct keys held over all open windows before an early flush; the
    #: aggregator holds at most twice as many rows of 120 bytes
    max_keys: int = 100_000

    def __post_init__(self) -> None:
        _check_range("aggregate.window_s", self.window_s, 0.001, 3600)
        _check_range("aggregate.lateness_s", self.lateness_s, 0, 3600)
        _check_range("aggregate.max_keys", self.max_keys, 1, 100_000_000)


#: Private address ranges, counted as internal unless
#: ``filter.private_networks`` is false: RFC 1918 and IPv6 unique local
#: addresses (RFC 4193).
PRIVATE_NETWORKS: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)


def _check_cidr(key: str, value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ConfigError(
            key, value, f"must be a CIDR with no host bits set ({exc})"
        ) from None


@dataclass(frozen=True)
class FilterSettings:
    """``[filter]``: the TFLite scoring filter between aggregation and encode.

    Hosts whose window scores at or above the alert threshold keep full
    detail and are shipped first; the rest is rolled up (see
    edge_agent.filter).  Without a usable model the rows pass through
    unfiltered and the reason is counted.
    """

    SECTION: ClassVar[str] = "filter"
    enabled: bool = True
    #: the model's manifest (its .tflite next to it); default: the shipped
    #: relay model (edge_agent.filter.default_model_manifest)
    model: Path | None = None
    #: CIDRs of this network's hosts (the features score internal hosts),
    #: on top of the private ranges unless private_networks is false
    internal_networks: tuple[str, ...] = ()
    #: count 10/8, 172.16/12, 192.168/16 and fc00::/7 as internal too
    private_networks: bool = True
    #: a detector score in [0, 1] replacing the model's alert threshold
    threshold: float | None = None
    #: bound on the scoring history of the open model windows (80 bytes a
    #: row; 0: score each aggregation window on its own)
    history_rows: int = 200_000
    #: recent feature rows for the model-update canary (edge_agent.modelsync
    #: ``canary_rows_path``), rewritten every minute; default:
    #: <relay.state_dir>/canary-rows.npz
    canary_rows_path: Path | None = None

    def __post_init__(self) -> None:
        for cidr in self.internal_networks:
            _check_cidr("filter.internal_networks", cidr)
        if self.enabled and not self.networks:
            raise ConfigError(
                "filter.internal_networks",
                self.internal_networks,
                "list one or more CIDRs when private_networks is false "
                "(the filter scores internal hosts)",
            )
        if self.threshold is not None:
            _check_range("filter.threshold", self.threshold, 0.0, 1.0)
        _check_range("filter.history_rows", self.history_rows, 0, 100_000_000)

    @property
    def networks(self) -> tuple[str, ...]:
        """The internal networks in effect."""
        private = PRIVATE_NETWORKS if self.private_networks else ()
        return (*private, *(n for n in self.internal_networks if n not in private))


#: Smallest ``spool.max_bytes``: the largest batch the encoder emits (data
#: plus partition key up to the Kinesis record limit) in its spool file (the
#: file's fixed overhead plus the batch id, a 36-character UUID).  Below it
#: a full-size batch is dropped as spool_full even from an empty spool.
MIN_SPOOL_BYTES = (
    KINESIS_MAX_RECORD_BYTES
    + spool_fileformat.OVERHEAD_BYTES
    + len(str(uuid.UUID(int=0)))
)


@dataclass(frozen=True)
class SpoolSettings:
    """``[spool]``: the on-disk queue between encoder and shipper."""

    SECTION: ClassVar[str] = "spool"
    #: default: <relay.state_dir>/spool
    dir: Path | None = None
    max_bytes: int = 1024 * 1024 * 1024
    #: drop_oldest keeps the newest data when Kinesis is out of reach for
    #: long; reject_new keeps the oldest and drops new windows (counted)
    full_policy: str = "drop_oldest"

    def __post_init__(self) -> None:
        if self.max_bytes < MIN_SPOOL_BYTES:
            raise ConfigError(
                "spool.max_bytes",
                self.max_bytes,
                f"must be >= {MIN_SPOOL_BYTES}: the spool must hold the largest "
                f"batch the encoder writes (a {KINESIS_MAX_RECORD_BYTES}-byte "
                f"Kinesis record in a spool file of "
                f"{MIN_SPOOL_BYTES - KINESIS_MAX_RECORD_BYTES} bytes more)",
            )
        _check_choice("spool.full_policy", self.full_policy, FULL_POLICIES)


@dataclass(frozen=True)
class KinesisSettings:
    """``[kinesis]``: where batches go.  Credentials: boto3's chain."""

    SECTION: ClassVar[str] = "kinesis"
    stream_name: str | None = "sampleflow-flows"
    stream_arn: str | None = None
    #: none: boto3's chain (AWS_REGION, AWS_DEFAULT_REGION, config file)
    region: str | None = None
    #: a local server (MiniStack) or a VPC endpoint; none: AWS's own
    endpoint_url: str | None = None
    #: AWS partition guard (aws, aws-us-gov, ...): a region outside it is an
    #: error, so a GovCloud relay cannot ship to a commercial region
    partition: str | None = None
    use_fips_endpoint: bool = False
    #: a named profile of the shared AWS config files (credentials stay there)
    profile: str | None = None
    #: how batches map to shards: exporter, relay or random
    partition_key: str = "exporter"
    max_concurrent_calls: int = 1

    def __post_init__(self) -> None:
        _check_choice("kinesis.partition_key", self.partition_key, PARTITION_SCHEMES)
        try:
            self.shipper_config()
        except ShipperConfigError as exc:
            raise ConfigError(
                f"kinesis.{exc.key}", getattr(self, exc.key, None), _rule_of(exc)
            ) from None

    def shipper_config(self) -> ShipperConfig:
        """The shipper's own configuration (raises ShipperConfigError)."""
        return ShipperConfig(
            stream_name=self.stream_name,
            stream_arn=self.stream_arn,
            region=self.region,
            endpoint_url=self.endpoint_url,
            partition=self.partition,
            use_fips_endpoint=self.use_fips_endpoint,
            profile=self.profile,
            max_concurrent_calls=self.max_concurrent_calls,
        )


def _rule_of(exc: ShipperConfigError) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: the Prometheus endpoint (/metrics) and /healthz."""

    SECTION: ClassVar[str] = "metrics"
    enabled: bool = True
    #: loopback by default: expose it on purpose, not by accident
    listen_address: str = "127.0.0.1"
    #: 0 picks a free port (tests)
    port: int = 9464

    def __post_init__(self) -> None:
        _check_address("metrics.listen_address", self.listen_address)
        _check_range("metrics.port", self.port, 0, 65535)


#: ``[modelsync]``: the in-process model-update agent.  Its keys are the
#: fields of :class:`~edge_agent.modelsync.config.ModelSyncConfig` (one
#: definition, one validation) plus ``enabled``, except those the relay
#: fills in: ``internal_networks`` (the filter's).  Defaults taken from
#: the relay: ``thing_name`` = relay.relay_id, ``models_dir`` =
#: <relay.state_dir>/models, ``canary_rows_path`` = the filter's.  The
#: agent runs when the section (or a SAMPLEFLOW_MODELSYNC_* variable) is
#: given, unless ``enabled = false``.
MODELSYNC_SECTION = "modelsync"
_MODELSYNC_FROM_RELAY = ("internal_networks",)

SECTIONS: tuple[type, ...] = (
    RelaySettings,
    CollectorSettings,
    DecoderSettings,
    AggregateSettings,
    FilterSettings,
    SpoolSettings,
    KinesisSettings,
    MetricsSettings,
)


@dataclass(frozen=True)
class Settings:
    """All relay settings, plus where each value came from.

    ``sources`` maps ``section.key`` to ``default``, ``file PATH`` or
    ``env NAME``.
    """

    relay: RelaySettings
    collector: CollectorSettings
    decoder: DecoderSettings
    aggregate: AggregateSettings
    filter: FilterSettings
    spool: SpoolSettings
    kinesis: KinesisSettings
    metrics: MetricsSettings
    #: the model-update agent's settings (None: no ``[modelsync]``, or
    #: ``enabled = false``)
    modelsync: ModelSyncConfig | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def require_tenant(self) -> str:
        """``relay.tenant_id``; raises :class:`ConfigError` if it is not set."""
        tenant = self.relay.tenant_id
        if tenant is None:
            raise ConfigError(
                "relay.tenant_id",
                None,
                "must be set to run a relay: the tenant its batches belong to "
                "([relay] tenant_id in the file, or SAMPLEFLOW_RELAY_TENANT_ID); "
                + _ID_RULE,
            )
        return tenant

    @property
    def canary_rows_path(self) -> Path:
        """Where the filter's recent feature rows are written."""
        if self.filter.canary_rows_path is not None:
            return self.filter.canary_rows_path
        return self.relay.state_dir / "canary-rows.npz"

    @property
    def filter_model(self) -> Path | None:
        """The filter model's manifest in effect (None: none found)."""
        if self.filter.model is not None:
            return self.filter.model
        return default_model_manifest()

    @property
    def spool_dir(self) -> Path:
        """The spool directory in effect."""
        return (
            self.spool.dir
            if self.spool.dir is not None
            else (self.relay.state_dir / "spool")
        )


# -- loading -----------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional_inner(kind: Any) -> Any | None:
    """``X`` for ``X | None``, else None."""
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(get_args(kind)) == 2:
            return args[0]
    return None


def _convert(key: str, raw: Any, kind: Any, from_env: bool) -> Any:
    """Turn a TOML value (or an environment string) into ``kind``."""
    inner = _optional_inner(kind)
    if inner is not None:
        if raw is None or (from_env and raw == ""):
            return None
        return _convert(key, raw, inner, from_env)
    origin = get_origin(kind)
    if origin is tuple:
        item = get_args(kind)[0]
        if from_env:
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list):
            raise ConfigError(key, raw, f"must be a list of {item.__name__}")
        return tuple(_convert(key, x, item, from_env) for x in raw)
    if origin is Mapping or kind is dict:
        if from_env:
            pairs = [p.strip() for p in raw.split(",") if p.strip()]
            table = {}
            for pair in pairs:
                name, sep, value = pair.partition("=")
                if not sep:
                    raise ConfigError(
                        key, raw, "must be key=value pairs, comma-separated"
                    )
                table[name.strip()] = value.strip()
            raw = table
        if not isinstance(raw, dict):
            raise ConfigError(key, raw, "must be a table of address = rate")
        value_kind = get_args(kind)[1] if get_args(kind) else int
        return {
            str(k): _convert(f"{key}.{k}", v, value_kind, from_env)
            for k, v in raw.items()
        }
    if kind is bool:
        if from_env:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ConfigError(key, raw, "must be true or false")
        if not isinstance(raw, bool):
            raise ConfigError(key, raw, "must be true or false")
        return raw
    if kind is int:
        if from_env:
            try:
                return int(raw.strip().replace("_", ""), 0)
            except ValueError:
                raise ConfigError(key, raw, "must be an integer") from None
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise ConfigError(key, raw, "must be an integer")
        return raw
    if kind is float:
        if from_env:
            try:
                return float(raw)
            except ValueError:
                raise ConfigError(key, raw, "must be a number") from None
        if not isinstance(raw, int | float) or isinstance(raw, bool):
            raise ConfigError(key, raw, "must be a number")
        return float(raw)
    if kind is str:
        if not isinstance(raw, str):
            raise ConfigError(key, raw, "must be a string")
        return raw
    if kind is Path:
        if not isinstance(raw, str) or not raw:
            raise ConfigError(key, raw, "must be a path")
        return Path(raw)
    raise TypeError(f"setting {key} has an unsupported type {kind!r}")


def _refuse_credentials(key: str, value: object, source: str) -> None:
    if _CREDENTIAL_RE.search(key.rsplit(".", 1)[-1]):
        raise ConfigError(
            key,
            "***",
            "credentials are not settings: use boto3's credential chain "
            "(AWS_* environment, shared config with kinesis.profile, or an "
            "instance/container role)",
            source,
        )


def load_settings(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read settings from the TOML file ``path`` (optional) and ``environ``.

    Raises :class:`ConfigError` for an unreadable file, unknown sections or
    keys, and any invalid value.
    """
    environ = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    file_label = ""
    if path is not None:
        file_label = f"file {path}"
        try:
            with open(path, "rb") as fh:
                file_values = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(
                "--config", str(path), f"cannot read: {exc.strerror}"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", str(path), f"not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            # TOML files are UTF-8 (tomllib decodes before it parses).
            raise ConfigError(
                "--config",
                str(path),
                f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                f"{exc.start}): TOML files are UTF-8",
            ) from None

    by_name = {cls.SECTION: cls for cls in SECTIONS}  # type: ignore[attr-defined]
    known = (*by_name, MODELSYNC_SECTION)
    for section, table in file_values.items():
        if not isinstance(table, dict):
            raise ConfigError(
                section,
                table,
                "a key outside any section: settings go under one of "
                + ", ".join(f"[{name}]" for name in known),
                file_label,
            )
        if section not in known:
            raise ConfigError(
                section,
                f"[{section}]",
                f"unknown section; sections: {', '.join(known)}",
                file_label,
            )
    env_values: dict[str, dict[str, tuple[str, str]]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section in known and key:
            env_values.setdefault(section, {})[key] = (value, f"env {name}")

    sources: dict[str, str] = {}
    built: dict[str, Any] = {}
    for section, cls in by_name.items():
        kinds = _field_types(cls)
        table = file_values.get(section, {})
        from_env = env_values.get(section, {})
        for key in (*table, *from_env):
            if key not in kinds:
                source = from_env[key][1] if key in from_env else file_label
                _refuse_credentials(f"{section}.{key}", None, source)
                raise ConfigError(
                    f"{section}.{key}",
                    from_env[key][0] if key in from_env else table[key],
                    f"unknown key; [{section}] has {', '.join(kinds)}",
                    source,
                )
        values: dict[str, Any] = {}
        for key, kind in kinds.items():
            full = f"{section}.{key}"
            if key in from_env:
                raw, source = from_env[key]
                values[key] = _with_source(
                    full, source, _convert, full, raw, kind, True
                )
            elif key in table:
                source = file_label
                values[key] = _with_source(
                    full, source, _convert, full, table[key], kind, False
                )
            else:
                source = "default"
            sources[full] = source
        try:
            built[section] = cls(**values)
        except ConfigError as exc:
            raise ConfigError(
                exc.key, exc.value, exc.rule, _source_of(exc.key, sources)
            ) from None
    settings = Settings(**built, sources=types.MappingProxyType(sources))
    modelsync = _load_modelsync(
        settings,
        file_values.get(MODELSYNC_SECTION, {}),
        env_values.get(MODELSYNC_SECTION, {}),
        file_label,
        sources,
    )
    return dataclasses.replace(
        settings, modelsync=modelsync, sources=types.MappingProxyType(sources)
    )


def _load_modelsync(
    settings: Settings,
    table: Mapping[str, Any],
    from_env: Mapping[str, tuple[str, str]],
    file_label: str,
    sources: dict[str, str],
) -> ModelSyncConfig | None:
    """``[modelsync]`` as a :class:`ModelSyncConfig` (see MODELSYNC_SECTION);
    its values are typed like every other section's, then validated by
    ModelSyncConfig itself."""
    section = MODELSYNC_SECTION
    kinds: dict[str, Any] = {"enabled": bool}
    kinds.update(
        (k, v)
        for k, v in _field_types(ModelSyncConfig).items()
        if k not in _MODELSYNC_FROM_RELAY
    )
    for key in (*table, *from_env):
        if key not in kinds:
            source = from_env[key][1] if key in from_env else file_label
            _refuse_credentials(f"{section}.{key}", None, source)
            rule = f"unknown key; [{section}] has {', '.join(kinds)}"
            if key in _MODELSYNC_FROM_RELAY:
                rule = "set by the relay: [filter] internal_networks applies"
            raise ConfigError(
                f"{section}.{key}",
                from_env[key][0] if key in from_env else table[key],
                rule,
                source,
            )
    values: dict[str, Any] = {}
    for key, kind in kinds.items():
        full = f"{section}.{key}"
        if key in from_env:
            raw, source = from_env[key]
            values[key] = _with_source(full, source, _convert, full, raw, kind, True)
        elif key in table:
            source = file_label
            values[key] = _with_source(
                full, source, _convert, full, table[key], kind, False
            )
        else:
            source = "default"
        sources[full] = source
    if "enabled" not in values and (table or from_env):
        sources[f"{section}.enabled"] = f"default ([{section}] is configured)"
    if not values.pop("enabled", bool(table) or bool(from_env)):
        return None
    if not settings.filter.enabled:
        raise ConfigError(
            f"{section}.enabled",
            True,
            "needs filter.enabled = true (updates swap the filter's model); "
            "set modelsync.enabled = false or enable the filter",
            sources[f"{section}.enabled"],
        )
    derived = {
        "thing_name": (settings.relay.relay_id, "default (relay.relay_id)"),
        "models_dir": (
            settings.relay.state_dir / "models",
            "default (<relay.state_dir>/models)",
        ),
        "canary_rows_path": (
            settings.canary_rows_path,
            "default (filter.canary_rows_path)",
        ),
    }
    for key, (value, source) in derived.items():
        if values.get(key) is None:
            values[key] = value
            sources[f"{section}.{key}"] = source
    values["internal_networks"] = settings.filter.networks
    sources[f"{section}.internal_networks"] = "filter.internal_networks"
    try:
        return ModelSyncConfig.from_mapping(values)
    except ModelSyncConfigError as exc:
        full = f"{section}.{exc.key}"
        raise ConfigError(
            full, exc.value, exc.rule, _source_of(full, sources)
        ) from None


def _source_of(key: str, sources: Mapping[str, str]) -> str:
    """The source of ``key`` or of the longest setting it is inside of."""
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return ""


def _with_source(key: str, source: str, func: Any, *args: Any) -> Any:
    try:
        return func(*args)
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.value, exc.rule, source) from None


def render_settings(settings: Settings) -> str:
    """The effective settings as TOML, each value with its source."""
    lines: list[str] = []
    for cls in SECTIONS:
        section = cls.SECTION  # type: ignore[attr-defined]
        values = getattr(settings, section)
        lines.append(f"[{section}]")
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if section == "spool" and f.name == "dir" and value is None:
                value = settings.spool_dir
            if section == "filter" and f.name == "model" and value is None:
                value = settings.filter_model
            if section == "filter" and f.name == "canary_rows_path" and value is None:
                value = settings.canary_rows_path
            source = settings.sources.get(f"{section}.{f.name}", "default")
            if value is None:
                lines.append(f"# {f.name} is not set  # {source}")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}  # {source}")
        lines.append("")
    lines.append(f"[{MODELSYNC_SECTION}]")
    modelsync = settings.modelsync
    enabled_source = settings.sources.get(f"{MODELSYNC_SECTION}.enabled", "default")
    if modelsync is None:
        lines.append(
            f"enabled = false  # {enabled_source}: no model updates "
            "(configure [modelsync] to take them through AWS IoT Jobs)"
        )
    else:
        lines.append(f"enabled = true  # {enabled_source}")
        for f in dataclasses.fields(modelsync):
            value = getattr(modelsync, f.name)
            source = settings.sources.get(f"{MODELSYNC_SECTION}.{f.name}", "default")
            if f.name in _MODELSYNC_FROM_RELAY:
                # Shown, but commented out: not a key of this section.
                lines.append(f"# {f.name} = {_toml_value(value)}  # {source}")
            elif value is None:
                lines.append(f"# {f.name} is not set  # {source}")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}  # {source}")
    lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(
            f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items()
        )
        return "{ " + inner + " }" if inner else "{}"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
