"""A fault-injecting HTTP proxy between boto3 and a local Kinesis server.

boto3 is pointed at the proxy (``endpoint_url``); the proxy forwards to
the real server (MiniStack) and, for the n-th PutRecords request, applies
the n-th action of a script:

* :class:`Pass` forwards the request and relays the answer.
* :class:`FailRecords` marks some records failed (per-record ``ErrorCode``
  and ``FailedRecordCount`` in a rewritten JSON answer) and does NOT
  forward those records, so a record the server holds was really
  accepted: a test tells loss from duplication.
* :class:`Throttle` answers HTTP 400 ``ProvisionedThroughputExceededException``
  and :class:`ServerError` HTTP 500 ``InternalFailureException``, neither
  forwarded.
* :class:`DropBeforeForward` closes the connection without forwarding;
  :class:`DropAfterForward` forwards (the server stores the records) and
  then closes the connection without an answer: the one case where the
  client cannot know and a resend makes a legitimate duplicate.

:meth:`FaultProxy.go_down` closes the listening socket and every open
connection (an uplink outage: connections are refused) until
:meth:`FaultProxy.come_up` listens on the same port again.

Kinesis speaks JSON 1.1 (``application/x-amz-json-1.1`` with an
``X-Amz-Target`` header).  botocore 1.44 sends JSON for Kinesis (its
service model lists only the ``json`` protocol); a CBOR request would be
answered 415 so a test fails loudly rather than pass blind.  The proxy
rewrites bodies, so the SigV4 signature no longer matches them; MiniStack
does not check signatures.  Every PutRecords exchange is logged in
:attr:`FaultProxy.exchanges`.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import http.client
import json
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

PTEE = "ProvisionedThroughputExceededException"
INTERNAL_FAILURE = "InternalFailure"
_JSON_TYPE = "application/x-amz-json-1.1"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass(frozen=True)
class Pass:
    """Forward unchanged."""


@dataclass(frozen=True)
class FailRecords:
    """Fail records by a cyclic pattern: record i gets ``pattern[i % len]``.

    ``None`` in the pattern forwards the record; an error code fails it.
    """

    pattern: tuple[str | None, ...]


@dataclass(frozen=True)
class Throttle:
    """Answer 400 ProvisionedThroughputExceededException, forward nothing."""


@dataclass(frozen=True)
class ServerError:
    """Answer HTTP 500 InternalFailureException, forward nothing."""


@dataclass(frozen=True)
class DropBeforeForward:
    """Close the connection without an answer, forward nothing."""


@dataclass(frozen=True)
class DropAfterForward:
    """Forward, then close the connection without relaying the answer."""


Action = (
    Pass | FailRecords | Throttle | ServerError | DropBeforeForward | DropAfterForward
)
#: Actions after which the client sees the HTTP attempt fail.
ATTEMPT_FAULTS = (Throttle, ServerError, DropBeforeForward, DropAfterForward)


@dataclass
class Exchange:
    """One PutRecords request and what became of each of its records."""

    index: int
    action: Action
    #: (partition key, data) of every record in the request, in order
    records: list[tuple[str, bytes]]
    #: per record: the upstream server answered it with a sequence number
    stored: list[bool] = field(default_factory=list)
    #: per record: the error code the proxy answered instead (None: none)
    failed: list[str | None] = field(default_factory=list)
    request_bytes: int = 0


class FaultProxy:
    """The proxy server; use as a context manager or start()/stop()."""

    def __init__(
        self,
        upstream_url: str,
        script: Sequence[Action] | Callable[[int], Action] = (),
    ) -> None:
        parts = urlsplit(upstream_url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url}")
        self.upstream = (parts.hostname, parts.port)
        self._script = script
        self._lock = threading.Lock()
        self._count = 0
        self.exchanges: list[Exchange] = []
        self.content_types: collections.Counter[str] = collections.Counter()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- life cycle ------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen on a free loopback port (the same port after come_up)."""
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def go_down(self) -> None:
        """Refuse connections until :meth:`come_up` (an uplink outage)."""
        self.stop()

    def come_up(self) -> None:
        """Listen again on the same port."""
        self.start()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- accounting ------------------------------------------------------------

    def stored_counts(self) -> collections.Counter[bytes]:
        """How many times the server accepted each record data, per the log."""
        counts: collections.Counter[bytes] = collections.Counter()
        with self._lock:
            for ex in self.exchanges:
                for (_key, data), stored in zip(ex.records, ex.stored, strict=True):
                    if stored:
                        counts[data] += 1
        return counts

    def count(self, kind: type) -> int:
        """Number of PutRecords exchanges whose action was of ``kind``."""
        with self._lock:
            return sum(isinstance(ex.action, kind) for ex in self.exchanges)

    def failed_records(self) -> collections.Counter[str]:
        """Records the proxy failed, by the error code it answered."""
        counts: collections.Counter[str] = collections.Counter()
        with self._lock:
            for ex in self.exchanges:
                counts.update(code for code in ex.failed if code is not None)
        return counts

    # -- request handling ------------------------------------------------------

    def _next_action(self) -> tuple[int, Action]:
        with self._lock:
            n = self._count
            self._count += 1
        script = self._script
        if callable(script):
            return n, script(n)
        return n, script[n] if n < len(script) else Pass()

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            out = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            out["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=out)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, dict(resp.getheaders()), data
        finally:
            conn.close()

    def _put_records(
        self, handler: _Handler, headers: dict[str, str], body: bytes
    ) -> None:
        n, action = self._next_action()
        request = json.loads(body)
        records = [
            (str(r["PartitionKey"]), base64.b64decode(r["Data"]))
            for r in request["Records"]
        ]
        ex = Exchange(
            n,
            action,
            records,
            stored=[False] * len(records),
            failed=[None] * len(records),
            request_bytes=len(body),
        )
        with self._lock:
            self.exchanges.append(ex)
        if isinstance(action, Throttle):
            handler.reply_error(
                400,
                PTEE,
                "Rate exceeded for shard shardId-000000000000 in stream under "
                "account 000000000000.",
            )
            return
        if isinstance(action, ServerError):
            handler.reply_error(500, "InternalFailureException", "Internal error")
            return
        if isinstance(action, DropBeforeForward):
            handler.drop()
            return
        if isinstance(action, FailRecords):
            pattern = action.pattern
            ex.failed = [pattern[i % len(pattern)] for i in range(len(records))]
        keep = [i for i, code in enumerate(ex.failed) if code is None]
        upstream_results: list[dict[str, Any]] = []
        status, resp_body = 200, b""
        resp_headers: dict[str, str] = {}
        if keep:
            forward = dict(request)
            forward["Records"] = [request["Records"][i] for i in keep]
            status, resp_headers, resp_body = self._forward(
                "POST", handler.path, headers, json.dumps(forward).encode()
            )
            if status != 200:
                # The server refused: relay that, nothing stored.
                handler.reply(status, resp_headers, resp_body)
                return
            upstream_results = json.loads(resp_body)["Records"]
            for i, result in zip(keep, upstream_results, strict=True):
                ex.stored[i] = "SequenceNumber" in result and "ErrorCode" not in result
        if isinstance(action, DropAfterForward):
            handler.drop()
            return
        if isinstance(action, Pass):
            handler.reply(status, resp_headers, resp_body)
            return
        # FailRecords: merge the proxy's failures with the server's results.
        results: list[dict[str, Any]] = []
        upstream_iter = iter(upstream_results)
        for code in ex.failed:
            if code is None:
                results.append(next(upstream_iter))
            else:
                message = (
                    "Internal Service Failure"
                    if code == INTERNAL_FAILURE
                    else "Rate exceeded for shard shardId-000000000000"
                )
                results.append({"ErrorCode": code, "ErrorMessage": message})
        answer = {
            "FailedRecordCount": sum("ErrorCode" in r for r in results),
            "Records": results,
        }
        handler.reply(200, {"Content-Type": _JSON_TYPE}, json.dumps(answer).encode())


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._connections.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the exchanges log is the record

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        headers = {k: v for k, v in self.headers.items()}
        content_type = self.headers.get("Content-Type", "")
        target = self.headers.get("X-Amz-Target", "")
        with self.owner._lock:
            self.owner.content_types[content_type] += 1
        if target.endswith(".PutRecords"):
            if content_type != _JSON_TYPE:
                self.reply_error(
                    415,
                    "UnsupportedMediaType",
                    f"proxy speaks JSON, got {content_type}",
                )
                return
            self.owner._put_records(self, headers, body)
            return
        status, resp_headers, resp_body = self.owner._forward(
            "POST", self.path, headers, body
        )
        self.reply(status, resp_headers, resp_body)

    def do_GET(self) -> None:
        status, resp_headers, resp_body = self.owner._forward(
            "GET", self.path, dict(self.headers.items()), b""
        )
        self.reply(status, resp_headers, resp_body)

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            if key.lower() not in _HOP_BY_HOP and key.lower() not in ("date", "server"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply_error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"__type": code, "message": message}).encode()
        self.reply(status, {"Content-Type": _JSON_TYPE}, body)

    def drop(self) -> None:
        """Close the connection with no answer at all."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
