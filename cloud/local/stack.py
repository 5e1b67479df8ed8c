"""The local stack: every server of the pipeline as a supervised child process.

:class:`LocalStack` starts, on 127.0.0.1 only:

``ministack``
    MiniStack (``python -m ministack``), the AWS APIs: Kinesis, DynamoDB,
    S3, IoT (with its MQTT listener if ``mqtt_port`` is set) and CloudWatch.
    Its state is not persisted: every ``up`` starts with a fresh stream.
``store``
    the MongoDB-compatible store, SecantusDB (``python -m secantus``), the
    stand-in for Amazon DocumentDB.  Its data folder is kept across runs.
``model-service``
    the model service (``sampleflow model-service run``) with the shipped
    models.
``engine``
    the Spark engine (``python -m cloud.engine run``), reading the stream
    and writing window estimates.  Its checkpoint is reset at each ``up``
    because the stream is new.  Its ``/metrics`` and ``/healthz`` listen on
    ``engine_status_port``: unless set, a free port picked at each ``up``
    (not the engine's default 9466, which a second stack or an engine of
    one's own would hold), recorded in ``stack.json`` and shown by
    ``status``.
``relay``
    the edge relay (``python -m edge_agent.cli relay run``) with a
    generated ``relay.toml``: UDP collector on ``relay_port``, batches to
    the stream, metrics on ``relay_metrics_port``.

and creates what they need: on MiniStack the stream (one shard, so a
relay's batches stay in order), the model bucket, the DynamoDB
tenant-state table and the relay's IoT thing in a thing group named after
the tenant; in the store its indexes.  A part whose package is not
installed is skipped (and shown so by ``status``), except MiniStack, the
engine and the relay, without which nothing flows.

Every part runs in its own session and process group with its output in
``<state_dir>/logs/<part>.log``; pids, process start times and ports are
kept in ``<state_dir>/stack.json`` so that ``down`` and ``status`` work
from another process.  A part counts as started once its health check
passes (MiniStack's ``/_ministack/health`` lists the services, the store
answers ``ping``, the model service's ``/readyz`` answers 200, the engine's
``/healthz`` answers 200 on ``engine_status_port``, the relay's ``/healthz``
answers 200) within ``start_timeout_s``; otherwise ``up`` stops what it started and
raises :class:`StackError` naming the part and its log.  Stopping goes
in reverse order (the relay first, so it drains to a live stream):
SIGTERM to the part's main process, after ``stop_timeout_s`` SIGTERM then
SIGKILL to its whole process group, and a check that no process of the
group is left.  A pid from ``stack.json`` is
only signalled while its start time still matches (pids get reused).

Linux only: process identity and group membership are read from /proc.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import structlog

from cloud.local.settings import HOST, LocalSettings, how_to_set

log = structlog.get_logger(__name__)

STATE_FILE = "stack.json"
#: ``down`` renames the state file to this while it stops the parts, so a
#: supervising ``up`` knows the exits it sees are wanted.
STOPPING_FILE = "stack.stopping.json"
#: Dummy credentials for the local AWS server only (MiniStack accepts any).
LOCAL_AWS_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "AWS_EC2_METADATA_DISABLED": "true",
}
#: Services MiniStack must report available before the stack goes on.
MINISTACK_SERVICES = ("kinesis", "dynamodb", "s3", "iot", "monitoring")
#: How far past their Kinesis arrival the stack's engine accepts flow times
#: (``--max-future``): 30 days of accelerated replays.
REPLAY_MAX_FUTURE_S = 30 * 24 * 3600
PART_ORDER = ("ministack", "store", "model-service", "engine", "relay")
_POLL_S = 0.2

Progress = Callable[[str], None]


class StackError(RuntimeError):
    """Raised when the stack cannot start or a part fails.

    ``part`` names the part ("ports" for a port conflict), ``log_path`` is
    its log file, if it has one.
    """

    def __init__(self, part: str, message: str, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.part = part
        self.log_path = log_path


class PortInUseError(StackError):
    """A port the stack needs is taken; names the port and its setting."""


@dataclass(frozen=True)
class PortUse:
    """A port a part listens on."""

    setting: str
    port: int
    proto: str = "tcp"  # tcp or udp

    def __str__(self) -> str:
        return f"{self.port}" if self.proto == "tcp" else f"udp {self.port}"


@dataclass
class Part:
    """One child process: how to start it and how to tell it is healthy.

    ``health`` returns None when healthy, else a short reason.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    ports: tuple[PortUse, ...]
    health: Callable[[], str | None]
    #: why the part cannot run in this install (None: it can)
    unavailable: str | None = None


@dataclass
class PartStatus:
    """What ``status`` says about one part."""

    name: str
    pid: int | None
    ports: tuple[PortUse, ...]
    running: bool
    healthy: bool
    detail: str


@dataclass
class _Running:
    """A started part (kept in stack.json)."""

    name: str
    pid: int
    start_ticks: int
    ports: list[dict[str, Any]]
    log: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "ports": self.ports,
            "log": self.log,
        }


class LocalStack:
    """Start, watch and stop the local servers; see the module docstring.

    The constructor only computes paths; nothing starts before :meth:`up`.
    """

    def __init__(self, settings: LocalSettings) -> None:
        self.settings = settings.resolved()
        self.state_dir = self.settings.state_dir
        self.logs_dir = self.state_dir / "logs"
        self.state_path = self.state_dir / STATE_FILE
        self.stopping_path = self.state_dir / STOPPING_FILE
        self.relay_config_path = self.state_dir / "relay" / "relay.toml"
        self.engine_dir = self.state_dir / "engine"
        self.checkpoint_dir = self.engine_dir / "checkpoint"
        self.estimates_path = self.engine_dir / "estimates.jsonl"
        self._running: dict[str, _Running] = {}
        self._stop: threading.Event | None = None

    @classmethod
    def attach(cls, settings: LocalSettings) -> LocalStack:
        """The stack recorded in ``settings.state_dir``, with the settings it
        was started with (so ``status`` and ``down`` need no port flags);
        ``settings`` themselves when nothing is recorded."""
        path = settings.state_dir.resolve() / STATE_FILE
        try:
            recorded = json.loads(path.read_text()).get("settings", {})
        except (OSError, ValueError):
            return cls(settings)
        kinds = {f.name: f.type for f in dataclasses.fields(LocalSettings)}
        values: dict[str, Any] = {}
        for key, value in recorded.items():
            if key in kinds and key != "state_dir":
                values[key] = value
        try:
            return cls(dataclasses.replace(settings, **values))
        except (TypeError, ValueError):
            return cls(settings)

    # -- the parts ----------------------------------------------------------

    def parts(self) -> list[Part]:
        """The parts in start order (unavailable ones included)."""
        s = self.settings
        py = sys.executable
        ministack_dir = self.state_dir / "ministack"
        ministack_env = {
            "GATEWAY_PORT": str(s.ministack_port),
            "BIND_HOST": HOST,
            "LOG_LEVEL": "WARNING",
            "TMPDIR": str(ministack_dir),
            "PERSIST_STATE": "0",
            "STATE_DIR": str(ministack_dir / "state"),
            "S3_DATA_DIR": str(ministack_dir / "s3"),
        }
        ministack_ports = [PortUse("ministack_port", s.ministack_port)]
        if s.mqtt_port:
            ministack_env["IOT_MTLS_PORT"] = str(s.mqtt_port)
            ministack_ports.append(PortUse("mqtt_port", s.mqtt_port))
        else:
            ministack_env["IOT_MTLS_ENABLED"] = "0"
        store_dir = self.state_dir / "store"
        parts = [
            Part(
                "ministack",
                [py, "-m", "ministack"],
                ministack_env,
                ministack_dir,
                tuple(ministack_ports),
                self._ministack_health,
                None
                if _has_module("ministack")
                else "ministack is not installed: pip install 'sampleflow[local]'",
            ),
            Part(
                "store",
                [
                    py,
                    "-m",
                    "secantus",
                    "--host",
                    HOST,
                    "--port",
                    str(s.store_port),
                    "--storage-path",
                    str(store_dir / "data"),
                    "--standalone",
                    "--log-level",
                    "WARNING",
                ],
                {},
                store_dir,
                (PortUse("store_port", s.store_port),),
                self._store_health,
                None
                if _has_module("secantus") and _has_module("pymongo")
                else "SecantusDB or pymongo is not installed (local, cloud extras)",
            ),
            Part(
                "model-service",
                [
                    py,
                    "-m",
                    "edge_agent.cli",
                    "model-service",
                    "run",
                    "--host",
                    HOST,
                    "--port",
                    str(s.model_service_port),
                ],
                {},
                self.state_dir / "model-service",
                (PortUse("model_service_port", s.model_service_port),),
                self._model_service_health,
                None
                if _has_module("cloud.model_service") and _has_module("fastapi")
                else "the model service is not installed (cloud extra)",
            ),
            Part(
                "engine",
                [
                    py,
                    "-m",
                    "cloud.engine",
                    "run",
                    "--stream",
                    s.stream_name,
                    "--checkpoint",
                    str(self.checkpoint_dir),
                    "--endpoint-url",
                    s.ministack_url,
                    "--region",
                    s.region,
                    "--estimates-out",
                    str(self.estimates_path),
                    "--trigger-interval",
                    str(s.engine_trigger_s),
                    "--master",
                    s.engine_master,
                    "--shuffle-partitions",
                    "2",
                    "--status-address",
                    HOST,
                    "--status-port",
                    str(s.engine_status_port),
                    *self._engine_output_flags(),
                ],
                {"AWS_DEFAULT_REGION": s.region},
                self.engine_dir,
                # Port 0: not picked yet (up picks it before anything starts).
                (PortUse("engine_status_port", s.engine_status_port),)
                if s.engine_status_port
                else (),
                self._engine_health,
                None
                if _has_module("pyspark")
                else "pyspark is not installed (cloud extra)",
            ),
            Part(
                "relay",
                [
                    py,
                    "-m",
                    "edge_agent.cli",
                    "relay",
                    "run",
                    "--config",
                    str(self.relay_config_path),
                ],
                {},
                self.relay_config_path.parent,
                (
                    PortUse("relay_port", s.relay_port, "udp"),
                    PortUse("relay_metrics_port", s.relay_metrics_port),
                ),
                self._relay_health,
            ),
        ]
        return parts

    def _engine_output_flags(self) -> list[str]:
        """The engine's flags for the stack's other parts, those of them its
        command line has (older engines wrote estimates to a file only)."""
        s = self.settings
        known = engine_options()
        store_ok = _has_module("secantus") and _has_module("pymongo")
        service_ok = _has_module("cloud.model_service") and _has_module("fastapi")
        wanted = [
            ("--model-service-url", s.model_service_url if service_ok else "none"),
            ("--mongo-uri", s.store_uri if store_ok else "none"),
            ("--aws-endpoint-url", s.ministack_url),
            ("--tenant-networks", f"{s.tenant_id}={','.join(s.networks)}"),
            # The demo replays captures faster than real time with their
            # times moved to now, so its flows run ahead of the clock by up
            # to the slice's length (more over repeated replays).
            ("--max-future", str(REPLAY_MAX_FUTURE_S)),
        ]
        if s.engine_lateness_s:
            wanted.append(("--lateness", str(s.engine_lateness_s)))
        out: list[str] = []
        for flag, value in wanted:
            if flag in known:
                out += [flag, value]
        return out

    @property
    def engine_scores(self) -> bool:
        """Whether the engine scores host windows itself (through the
        model service) and writes detections to the store."""
        known = engine_options()
        return "--model-service-url" in known and "--mongo-uri" in known

    def available_parts(self) -> list[Part]:
        """The parts this install can run."""
        return [p for p in self.parts() if p.unavailable is None]

    # -- up -----------------------------------------------------------------

    def up(
        self,
        progress: Progress = lambda _: None,
        stop: threading.Event | None = None,
    ) -> None:
        """Start every available part, create the AWS resources, wait until
        all are healthy.  Raises :class:`PortInUseError` or
        :class:`StackError` (also when ``stop`` is set meanwhile: Ctrl-C);
        on failure nothing started is left running."""
        self._stop = stop
        running = self.running_parts()
        if running:
            names = ", ".join(f"{r.name} (pid {r.pid})" for r in running)
            raise StackError(
                "stack",
                f"the local stack in {self.state_dir} is already running: {names}; "
                "stop it with `sampleflow local down`",
            )
        if not self.settings.engine_status_port:
            self.settings = dataclasses.replace(
                self.settings,
                engine_status_port=pick_free_port(self._configured_ports()),
            )
        parts = {p.name: p for p in self.available_parts()}
        for part in self.parts():
            if part.unavailable:
                progress(f"{part.name}: skipped ({part.unavailable})")
        required = ("ministack", "engine", "relay")
        missing = [name for name in required if name not in parts]
        if missing:
            reasons = {p.name: p.unavailable for p in self.parts()}
            raise StackError(
                missing[0], f"{missing[0]} cannot run here: {reasons[missing[0]]}"
            )
        check_ports([u for p in parts.values() for u in p.ports])
        self._prepare_dirs()
        self._running = {}
        try:
            # The engine is the slowest to come up (a JVM, then Spark): it
            # starts as soon as its stream exists, the rest meanwhile.
            self._start(parts["ministack"], progress)
            for name in ("store", "model-service"):
                if name in parts:
                    self._start(parts[name], progress)
            self._wait_healthy([parts["ministack"]], progress)
            self.create_resources(progress)
            self._start(parts["engine"], progress)
            self._start(parts["relay"], progress)
            self._wait_healthy(
                [p for name, p in parts.items() if name != "ministack"], progress
            )
            if "store" in parts:
                self.prepare_store(progress)
        except BaseException:
            progress("stopping what was started")
            self.down(progress)
            raise
        progress(f"local stack up; state in {self.state_dir}")

    def _prepare_dirs(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        # A fresh MiniStack means a fresh stream: an old checkpoint would
        # point at shards that no longer exist.
        shutil.rmtree(self.engine_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir / "ministack", ignore_errors=True)
        for sub in ("engine", "ministack", "store", "model-service", "relay"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self.relay_config_path.write_text(self.relay_config())

    def relay_config(self) -> str:
        """The relay's TOML settings for the local stack."""
        s = self.settings
        spool = self.state_dir / "relay" / "spool"
        return "\n".join(
            [
                "# Written by `sampleflow local up`; rewritten at every start.",
                "[relay]",
                f'tenant_id = "{s.tenant_id}"',
                f'relay_id = "{s.relay_id}"',
                f"state_dir = {_toml_str(str(self.state_dir / 'relay'))}",
                'log_format = "json"',
                "[collector]",
                f'listen_addresses = ["{HOST}"]',
                f"ports = [{s.relay_port}]",
                "[aggregate]",
                f"window_s = {s.relay_window_s!r}",
                f"lateness_s = {s.relay_lateness_s!r}",
                "[spool]",
                f"dir = {_toml_str(str(spool))}",
                "[kinesis]",
                f'stream_name = "{s.stream_name}"',
                f'region = "{s.region}"',
                f'endpoint_url = "{s.ministack_url}"',
                'partition_key = "relay"',
                "[metrics]",
                f'listen_address = "{HOST}"',
                f"port = {s.relay_metrics_port}",
                "",
            ]
        )

    def child_env(self, extra: dict[str, str]) -> dict[str, str]:
        """The environment of a child: this one without AWS profiles or
        sampleflow settings (the stack's own files decide), plus the local
        AWS credentials and ``extra``."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SAMPLEFLOW_", "AWS_"))
        }
        env.update(LOCAL_AWS_ENV)
        env["AWS_DEFAULT_REGION"] = self.settings.region
        env["AWS_CONFIG_FILE"] = str(self.state_dir / "no-aws-config")
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(self.state_dir / "no-aws-credentials")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def _start(self, part: Part, progress: Progress) -> None:
        log_path = self.logs_dir / f"{part.name}.log"
        if log_path.exists():
            log_path.replace(log_path.with_suffix(".log.1"))
        part.cwd.mkdir(parents=True, exist_ok=True)
        where = ", ".join(f"{HOST}:{u}" for u in part.ports) or "no port"
        progress(f"starting {part.name} ({where}); log {log_path}")
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                part.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=part.cwd,
                env=self.child_env(part.env),
                start_new_session=True,
            )
        self._running[part.name] = _Running(
            part.name,
            process.pid,
            _start_ticks(process.pid) or 0,
            [dataclasses.asdict(u) for u in part.ports],
            str(log_path),
            process,
        )
        self._write_state()

    def _wait_healthy(self, parts: list[Part], progress: Progress) -> None:
        started = time.monotonic()
        deadline = started + self.settings.start_timeout_s
        waiting = {p.name: p for p in parts}
        reasons: dict[str, str] = {}
        while waiting:
            for name, part in list(waiting.items()):
                running = self._running[name]
                assert running.process is not None
                code = running.process.poll()
                if code is not None:
                    raise StackError(
                        name,
                        f"{name} exited with code {code} while starting; see "
                        f"{running.log}\n{log_tail(Path(running.log))}",
                        Path(running.log),
                    )
                reason = _safe_health(part)
                if reason is None:
                    progress(f"{name} healthy ({time.monotonic() - started:.1f} s)")
                    del waiting[name]
                else:
                    reasons[name] = reason
            if not waiting:
                return
            if self._stop is not None and self._stop.is_set():
                raise StackError("stack", "interrupted while starting")
            if time.monotonic() > deadline:
                name = next(iter(waiting))
                running = self._running[name]
                raise StackError(
                    name,
                    f"{name} not healthy within {self.settings.start_timeout_s:g} s "
                    f"({reasons.get(name, 'no answer')}); see {running.log} "
                    f"(start_timeout_s: {how_to_set('start_timeout_s')})\n"
                    f"{log_tail(Path(running.log))}",
                    Path(running.log),
                )
            time.sleep(_POLL_S)

    # -- AWS resources --------------------------------------------------------

    def aws_client(self, service: str) -> Any:
        """A boto3 client for MiniStack with the local credentials."""
        s = self.settings
        return boto3.session.Session(
            aws_access_key_id=LOCAL_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=LOCAL_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=s.region,
        ).client(
            service,
            endpoint_url=s.ministack_url,
            config=botocore.config.Config(
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def create_resources(self, progress: Progress = lambda _: None) -> None:
        """Create the stream, the bucket and the relay's IoT thing."""
        s = self.settings
        kinesis = self.aws_client("kinesis")
        with contextlib.suppress(kinesis.exceptions.ResourceInUseException):
            kinesis.create_stream(StreamName=s.stream_name, ShardCount=1)
        deadline = time.monotonic() + 30
        while True:
            summary = kinesis.describe_stream_summary(StreamName=s.stream_name)
            status = summary["StreamDescriptionSummary"]["StreamStatus"]
            if status == "ACTIVE":
                break
            if time.monotonic() > deadline:
                raise StackError("ministack", f"stream {s.stream_name} stays {status}")
            time.sleep(_POLL_S)
        progress(f"kinesis stream {s.stream_name} (1 shard)")
        s3 = self.aws_client("s3")
        with contextlib.suppress(
            s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists
        ):
            if s.region == "us-east-1":
                s3.create_bucket(Bucket=s.bucket)
            else:
                s3.create_bucket(
                    Bucket=s.bucket,
                    CreateBucketConfiguration={"LocationConstraint": s.region},
                )
        progress(f"s3 bucket {s.bucket}")
        iot = self.aws_client("iot")
        with contextlib.suppress(iot.exceptions.ResourceAlreadyExistsException):
            iot.create_thing_group(thingGroupName=s.tenant_id)
        with contextlib.suppress(iot.exceptions.ResourceAlreadyExistsException):
            iot.create_thing(thingName=s.relay_id)
        iot.add_thing_to_thing_group(thingGroupName=s.tenant_id, thingName=s.relay_id)
        progress(f"iot thing {s.relay_id} in thing group {s.tenant_id}")
        from cloud.store.state import TenantStateStore  # noqa: PLC0415

        state = TenantStateStore(self.aws_client("dynamodb"))
        state.create_table()
        progress(f"dynamodb table {state.table_name}")

    def prepare_store(self, progress: Progress = lambda _: None) -> None:
        """Create the store's indexes (idempotent)."""
        from cloud.store.detections import (  # noqa: PLC0415
            DetectionStore,
            open_client,
        )

        client = open_client(self.settings.store_uri)
        try:
            DetectionStore(client).ensure_indexes()
        finally:
            client.close()
        progress("store indexes (sampleflow.detections, sampleflow.network_estimates)")

    # -- health checks --------------------------------------------------------

    def _ministack_health(self) -> str | None:
        url = f"{self.settings.ministack_url}/_ministack/health"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError) as exc:
            return f"no answer from {url} ({_short(exc)})"
        services = body.get("services", {})
        down = [s for s in MINISTACK_SERVICES if services.get(s) != "available"]
        if down:
            return f"services not available: {', '.join(down)}"
        if self.settings.mqtt_port and body.get("iot_mtls") != "listening":
            return f"IoT MQTT listener {body.get('iot_mtls')}"
        return None

    def _store_health(self) -> str | None:
        import pymongo  # noqa: PLC0415 - cloud extra, only when the store runs

        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            self.settings.store_uri,
            serverSelectionTimeoutMS=1000,
            connectTimeoutMS=1000,
        )
        try:
            client.admin.command("ping")
        except pymongo.errors.PyMongoError as exc:
            return f"no ping answer ({_short(exc)})"
        finally:
            client.close()
        return None

    def _model_service_health(self) -> str | None:
        url = f"{self.settings.model_service_url}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                return None if resp.status == 200 else f"/readyz answered {resp.status}"
        except urllib.error.HTTPError as exc:
            return f"/readyz answered {exc.code} (models not loaded)"
        except OSError as exc:
            return f"no answer from {url} ({_short(exc)})"

    def _configured_ports(self) -> frozenset[int]:
        """The ports the stack's parts are set to use (0: none)."""
        s = self.settings
        return frozenset(
            p
            for p in (
                s.ministack_port,
                s.mqtt_port,
                s.store_port,
                s.model_service_port,
                s.relay_port,
                s.relay_metrics_port,
            )
            if p
        )

    def _engine_health(self) -> str | None:
        """The engine's own ``/healthz``: 200 is healthy (an idle engine
        too); a 503 says why (the query stopped, or its trigger is stuck)."""
        if not self.settings.engine_status_port:
            return "no engine_status_port recorded (stack.json predates it)"
        url = f"{self.settings.engine_status_url}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                code = resp.status
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read())
            except (OSError, ValueError):
                body = {}
            finally:
                exc.close()
            if not isinstance(body, dict):
                body = {}
            return f"/healthz answered {exc.code}: {body.get('error', 'no reason')}"
        except OSError as exc:
            return f"no answer from {url} ({_short(exc)})"
        return None if code == 200 else f"/healthz answered {code}"

    def _relay_health(self) -> str | None:
        url = f"http://{HOST}:{self.settings.relay_metrics_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                if resp.status == 200:
                    return None
                return f"/healthz answered {resp.status}"
        except urllib.error.HTTPError as exc:
            return f"/healthz answered {exc.code}"
        except OSError as exc:
            return f"no answer from {url} ({_short(exc)})"

    # -- state, status, down --------------------------------------------------

    def _write_state(self) -> None:
        state = {
            "state_dir": str(self.state_dir),
            "settings": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in dataclasses.asdict(self.settings).items()
            },
            "parts": [r.to_json() for r in self._running.values()],
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    def _read_state(self) -> list[_Running]:
        path = self.state_path if self.state_path.exists() else self.stopping_path
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise StackError("stack", f"unreadable {path}: {exc}") from exc
        out = []
        for entry in state.get("parts", []):
            name = entry["name"]
            known = self._running.get(name)
            out.append(
                _Running(
                    name,
                    int(entry["pid"]),
                    int(entry["start_ticks"]),
                    list(entry.get("ports", [])),
                    str(entry.get("log", "")),
                    known.process if known is not None else None,
                )
            )
        return out

    def running_parts(self) -> list[_Running]:
        """Parts of ``stack.json`` whose process still runs."""
        return [r for r in self._read_state() if _alive(r.pid, r.start_ticks)]

    def status(self) -> list[PartStatus]:
        """Each part: pid, ports, running, healthy (health checks run now)."""
        recorded = {r.name: r for r in self._read_state()}
        out = []
        for part in self.parts():
            entry = recorded.get(part.name)
            if part.unavailable is not None:
                out.append(
                    PartStatus(
                        part.name, None, part.ports, False, False, part.unavailable
                    )
                )
                continue
            if entry is None or not _alive(entry.pid, entry.start_ticks):
                out.append(
                    PartStatus(
                        part.name,
                        entry.pid if entry else None,
                        part.ports,
                        False,
                        False,
                        "not running",
                    )
                )
                continue
            reason = _safe_health(part)
            out.append(
                PartStatus(
                    part.name,
                    entry.pid,
                    part.ports,
                    True,
                    reason is None,
                    "healthy" if reason is None else f"unhealthy: {reason}",
                )
            )
        return out

    def down(self, progress: Progress = lambda _: None) -> list[str]:
        """Stop every recorded part, the relay first; returns their names.

        Safe to call when nothing runs.  Raises :class:`StackError` when a
        process of a part's group outlived SIGKILL.
        """
        entries = self._read_state()
        with contextlib.suppress(FileNotFoundError):
            self.state_path.replace(self.stopping_path)
        rank = {name: i for i, name in enumerate(PART_ORDER)}
        entries.sort(key=lambda r: -rank.get(r.name, len(PART_ORDER)))
        stopped = []
        survivors = []
        timeout = self.settings.stop_timeout_s
        for entry in entries:
            if not _alive(entry.pid, entry.start_ticks):
                _reap(entry)
                continue
            progress(f"stopping {entry.name} (pid {entry.pid})")
            left = stop_process_group(entry.pid, timeout, entry.process)
            if left:
                survivors.append(f"{entry.name}: pids {left}")
            stopped.append(entry.name)
        self._running = {}
        with contextlib.suppress(FileNotFoundError):
            self.stopping_path.unlink()
        if survivors:
            raise StackError(
                "stack", "processes survived SIGKILL: " + "; ".join(survivors)
            )
        return stopped

    def supervise(self, stop: threading.Event, interval_s: float = 1.0) -> bool:
        """Watch the parts until ``stop`` is set (returns True) or
        ``sampleflow local down`` ran elsewhere (its state file is gone:
        returns False); raise :class:`StackError` when a part exits on its
        own (the caller then stops the rest)."""
        while not stop.wait(interval_s):
            if not self.state_path.exists():
                for entry in self._running.values():
                    _reap(entry)
                return False
            for entry in self._running.values():
                exited = (
                    entry.process.poll() is not None
                    if entry.process is not None
                    else not _alive(entry.pid, entry.start_ticks)
                )
                if exited and not self.state_path.exists():
                    break  # `down` is stopping the parts
                if exited:
                    code = entry.process.returncode if entry.process else None
                    raise StackError(
                        entry.name,
                        f"{entry.name} exited (code {code}); see {entry.log}\n"
                        f"{log_tail(Path(entry.log))}",
                        Path(entry.log),
                    )
        return True


# -- the engine's command line -------------------------------------------------


def engine_options() -> frozenset[str]:
    """The option strings of ``sampleflow engine run`` in this install."""
    try:
        from cloud.engine.commands import register  # noqa: PLC0415
    except ImportError:
        return frozenset()
    parser = argparse.ArgumentParser(add_help=False)
    commands = parser.add_subparsers()
    register(commands)
    engine = commands.choices["engine"]
    run = next(
        a for a in engine._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["run"]
    return frozenset(opt for action in run._actions for opt in action.option_strings)


# -- ports --------------------------------------------------------------------


def pick_free_port(avoid: frozenset[int] = frozenset()) -> int:
    """A TCP port on 127.0.0.1 that is free now and not in ``avoid`` (the
    stack's other ports, not all bound yet), below the kernel's ephemeral
    range when one there is free.

    Why below: the port stays unbound until the engine's driver binds it,
    after its JVM started (20-60 s); an ephemeral port could meanwhile be
    taken as the local end of an outgoing connection or by another
    program's bind to port 0.
    """
    low = _ephemeral_low()
    candidates = random.sample(range(10_000, low), min(64, max(0, low - 10_000)))
    for port in [*(p for p in candidates if p not in avoid), 0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            bound: int = sock.getsockname()[1]
            return bound
    raise StackError("ports", f"no free TCP port on {HOST}")


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (32768 if unknown)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def check_ports(uses: Iterable[PortUse]) -> None:
    """Raise :class:`PortInUseError` for the first port that cannot be bound
    on 127.0.0.1, naming the port and the setting that moves it."""
    for use in uses:
        kind = socket.SOCK_STREAM if use.proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as sock:
            if use.proto == "tcp":
                # As servers do: a port in TIME_WAIT is not "in use".
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, use.port))
            except OSError as exc:
                what = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise PortInUseError(
                    "ports",
                    f"port {use.proto.upper()} {HOST}:{use.port} ({use.setting}) is "
                    f"{what}; choose another with {how_to_set(use.setting)}",
                ) from None


# -- processes ----------------------------------------------------------------


def _has_module(name: str) -> bool:
    import importlib.util  # noqa: PLC0415

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (None: no process)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _alive(pid: int, start_ticks: int) -> bool:
    """Whether ``pid`` is the same, not yet dead, process."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return int(fields[19]) == start_ticks


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def _wait_gone(pid: int, ticks: int, timeout_s: float, proc: Any) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(_POLL_S)
                return True
        elif not _alive(pid, ticks):
            return True
        else:
            time.sleep(_POLL_S)
    return not _alive(pid, ticks)


def stop_process_group(
    pid: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None
) -> list[int]:
    """Stop a part started with ``start_new_session`` (pgid = pid).

    SIGTERM to the main process (it shuts down its own children), after
    ``timeout_s`` SIGTERM to the group, 2 s later SIGKILL to the group.
    Returns the pids still alive after that (normally none).
    """
    ticks = _start_ticks(pid) or 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, ticks, timeout_s, process):
        log.warning("part_stop_timeout", pid=pid, timeout_s=timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        _wait_gone(pid, ticks, 2.0, process)
    deadline = time.monotonic() + 2.0
    members = group_members(pid)
    while members and time.monotonic() < deadline:
        # Children of the main process may take a moment to see it gone.
        time.sleep(_POLL_S)
        members = group_members(pid)
    if members:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while members and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            members = group_members(pid)
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(1.0)
    return members


def _reap(entry: _Running) -> None:
    if entry.process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            entry.process.wait(0.1)


def _safe_health(part: Part) -> str | None:
    try:
        return part.health()
    except Exception as exc:  # a health check must never take the stack down
        return f"health check failed: {_short(exc)}"


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log, indented, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "    (no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (empty log)"


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
