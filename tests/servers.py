"""Real local servers for integration tests, started as subprocesses.

MiniStack (the ``ministack`` package of the dev extra) is a local AWS
emulator speaking the real wire protocols.  It is started as
``python -m ministack`` with ``GATEWAY_PORT`` set to a free loopback port
and ``BIND_HOST=127.0.0.1`` (its default binds every interface), and is
considered up once ``GET /_ministack/health`` answers 200 listing the
services a test needs.  Its pid file goes to ``TMPDIR`` and its state
folders (``STATE_DIR``, ``S3_DATA_DIR``) to the session's temporary
folder, so nothing is left in /tmp.  It runs in its own process group,
which teardown terminates (SIGTERM, then SIGKILL) so no process outlives
the session.

The Kinesis helpers read records back the way a consumer would:
ListShards, then GetShardIterator TRIM_HORIZON and GetRecords per shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import boto3
import botocore.config
import pytest

#: Dummy credentials for local servers (MiniStack maps a non-12-digit key
#: to its default account 000000000000).
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerStartError(RuntimeError):
    """Raised when a local server did not come up; carries its log tail."""


@dataclass
class ServerProcess:
    """A test server run as a subprocess on a loopback port.

    Subclasses give the command line (:meth:`command`), extra environment
    (:meth:`environment`) and a readiness probe (:meth:`ready`, true once
    the server answers).  The process runs in its own session and process
    group, so :meth:`stop` (SIGTERM, then SIGKILL) ends everything it
    started; its output goes to :attr:`log_path`, whose tail every start
    failure carries.
    """

    workdir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    #: Name in error messages and of the log file.
    label: ClassVar[str] = "server"
    start_timeout_s: ClassVar[float] = _START_TIMEOUT_S
    poll_interval_s: ClassVar[float] = 0.05

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.label}.log"

    def command(self) -> list[str]:
        """The argv that starts the server on :attr:`port`."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Variables added to this process's environment for the server."""
        return {}

    def ready(self) -> bool:
        """True once the server answers; False while it does not yet."""
        raise NotImplementedError

    def launch(self, port: int | None = None) -> None:
        """Start on ``port`` (one try) or on a free port (three tries: a
        port taken between choosing and binding is retried with another),
        and wait until :meth:`ready`."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_error: ServerStartError | None = None
        for _ in range(1 if port else 3):
            self.port = port or free_port()
            try:
                self._spawn()
                self._wait_ready()
                return
            except ServerStartError as exc:
                last_error = exc
                self.stop()
        assert last_error is not None
        raise last_error

    def _spawn(self) -> None:
        env = dict(os.environ)
        env.update(self.environment())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"{self.label} exited with {self.process.returncode}:\n"
                    f"{self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(self.poll_interval_s)
        raise ServerStartError(
            f"{self.label} not ready within {self.start_timeout_s}s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate the server's process group and reap it."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(_STOP_TIMEOUT_S)
        # Anything the server left in its group goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class MiniStack(ServerProcess):
    """One MiniStack subprocess on a loopback port."""

    label: ClassVar[str] = "ministack"
    services: tuple[str, ...] = ("kinesis",)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, services: tuple[str, ...] = ("kinesis",)) -> None:
        """Start the server and wait until it reports ``services`` available.

        All of MiniStack's services run (others may share the session
        fixture); ``services`` only lists those that must be up.
        """
        self.services = services
        self.launch()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "ministack"]

    def environment(self) -> dict[str, str]:
        return {
            **DUMMY_AWS_ENV,
            "GATEWAY_PORT": str(self.port),
            "BIND_HOST": "127.0.0.1",
            "LOG_LEVEL": "WARNING",
            "TMPDIR": str(self.workdir),
            "PERSIST_STATE": "0",
            "STATE_DIR": str(self.workdir / "state"),
            "S3_DATA_DIR": str(self.workdir / "s3"),
        }

    def ready(self) -> bool:
        url = f"{self.endpoint_url}/_ministack/health"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError):
            return False  # not listening yet
        available = body.get("services", {})
        return all(available.get(s) == "available" for s in self.services)


def kinesis_client(endpoint_url: str, region: str = "us-east-1") -> Any:
    """A Kinesis client for a local server, with the dummy credentials."""
    return boto3.session.Session(
        aws_access_key_id=DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=region,
    ).client(
        "kinesis",
        endpoint_url=endpoint_url,
        config=botocore.config.Config(retries={"mode": "standard"}),
    )


def create_stream(
    client: Any, name: str, shard_count: int = 1, timeout_s: float = 30.0
) -> str:
    """Create a provisioned stream, wait until ACTIVE, return its ARN."""
    client.create_stream(StreamName=name, ShardCount=shard_count)
    deadline = time.monotonic() + timeout_s
    while True:
        summary = client.describe_stream_summary(StreamName=name)[
            "StreamDescriptionSummary"
        ]
        if summary["StreamStatus"] == "ACTIVE":
            return str(summary["StreamARN"])
        if time.monotonic() > deadline:
            raise TimeoutError(f"stream {name} still {summary['StreamStatus']}")
        time.sleep(0.1)


def list_shard_ids(client: Any, stream_name: str) -> list[str]:
    """Every shard id of the stream (ListShards, all pages)."""
    ids: list[str] = []
    kwargs: dict[str, Any] = {"StreamName": stream_name}
    while True:
        page = client.list_shards(**kwargs)
        ids.extend(s["ShardId"] for s in page["Shards"])
        token = page.get("NextToken")
        if not token:
            return ids
        kwargs = {"NextToken": token}


def read_all_records(client: Any, stream_name: str) -> list[dict[str, Any]]:
    """Every record in the stream, shard by shard in sequence order.

    Each record dict is GetRecords' (``Data`` as bytes, ``PartitionKey``,
    ``SequenceNumber``) plus ``ShardId``.  A shard is read until GetRecords
    returns nothing and reports it is not behind; that is the end of what
    a local server holds (real Kinesis may return empty pages earlier).
    """
    out: list[dict[str, Any]] = []
    for shard_id in list_shard_ids(client, stream_name):
        iterator = client.get_shard_iterator(
            StreamName=stream_name,
            ShardId=shard_id,
            ShardIteratorType="TRIM_HORIZON",
        )["ShardIterator"]
        while iterator:
            page = client.get_records(ShardIterator=iterator, Limit=10000)
            for record in page["Records"]:
                record["ShardId"] = shard_id
                out.append(record)
            if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                break
            iterator = page.get("NextShardIterator")
    return out


@pytest.fixture(scope="session")
def ministack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniStack]:
    """A MiniStack server for the whole session; dummy AWS credentials in env.

    The environment gets :data:`DUMMY_AWS_ENV` and no AWS profile or shared
    files, so code under test finds the local credentials through boto3's
    normal chain.
    """
    server = MiniStack(tmp_path_factory.mktemp("ministack"))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in DUMMY_AWS_ENV.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(server.workdir / "no-aws-config"))
        mp.setenv(
            "AWS_SHARED_CREDENTIALS_FILE", str(server.workdir / "no-aws-credentials")
        )
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def kinesis_stream(ministack: MiniStack, request: pytest.FixtureRequest) -> str:
    """A fresh one-shard stream on the session's MiniStack; returns its name."""
    name = f"t-{request.node.name[:80]}-{time.monotonic_ns() % 10**9}"
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in name)[:128]
    client = kinesis_client(ministack.endpoint_url)
    try:
        create_stream(client, name)
    finally:
        client.close()
    return name
