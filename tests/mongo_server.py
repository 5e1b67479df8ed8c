"""A real MongoDB-wire server for the store tests: SecantusDB in a subprocess.

No ``mongod`` package exists here.  SecantusDB (PyPI ``secantusdb``, dev
extra; GPL, so it only ever runs as a separate process and is never
imported) speaks the MongoDB wire protocol over TCP on top of WiredTiger,
so pymongo talks to it exactly as it talks to DocumentDB.  It is started as
``python -m secantus --host 127.0.0.1 --port P --storage-path DIR
--standalone`` and is up once a ``ping`` answers.  It runs in its own
process group, terminated at teardown (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import ServerStartError, free_port

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0


@dataclass
class MongoServer:
    """One SecantusDB subprocess on a loopback port."""

    workdir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        # directConnection: talk to this one server, no topology discovery.
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    @property
    def log_path(self) -> Path:
        return self.workdir / "secantus.log"

    def start(self) -> None:
        """Start the server and wait until it answers ``ping``.

        A port taken between choosing and binding is retried with another.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_error: ServerStartError | None = None
        for _ in range(3):
            self.port = free_port()
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
        data = self.workdir / f"data-{self.port}"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "secantus",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--storage-path",
                    str(data),
                    "--standalone",
                    "--log-level",
                    "WARNING",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        import pymongo  # noqa: PLC0415 - cloud extra; only tests that use it

        assert self.process is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"secantus exited with {self.process.returncode}:\n"
                    f"{self.log_tail()}"
                )
            client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
                self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500
            )
            try:
                client.admin.command("ping")
                return
            except pymongo.errors.PyMongoError:
                time.sleep(0.1)  # not listening yet
            finally:
                client.close()
        raise ServerStartError(
            f"secantus not answering within {_START_TIMEOUT_S}s:\n{self.log_tail()}"
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    """A SecantusDB server for the whole session (``.uri`` for pymongo)."""
    server = MongoServer(tmp_path_factory.mktemp("secantus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
