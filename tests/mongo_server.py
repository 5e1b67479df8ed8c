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

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest

from tests.servers import ServerProcess


@dataclass
class MongoServer(ServerProcess):
    """One SecantusDB subprocess on a loopback port."""

    label: ClassVar[str] = "secantus"
    poll_interval_s: ClassVar[float] = 0.1

    @property
    def uri(self) -> str:
        # directConnection: talk to this one server, no topology discovery.
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> None:
        """Start the server on a free port and wait until it answers ``ping``."""
        self.launch()

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "secantus",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--storage-path",
            str(self.workdir / f"data-{self.port}"),
            "--standalone",
            "--log-level",
            "WARNING",
        ]

    def ready(self) -> bool:
        import pymongo  # noqa: PLC0415 - cloud extra; only tests that use it

        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500
        )
        try:
            client.admin.command("ping")
            return True
        except pymongo.errors.PyMongoError:
            return False  # not listening yet
        finally:
            client.close()


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    """A SecantusDB server for the whole session (``.uri`` for pymongo)."""
    server = MongoServer(tmp_path_factory.mktemp("secantus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
