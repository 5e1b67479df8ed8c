"""The engine's scoring client against the real model service process.

Faults come from a small HTTP proxy on a loopback port between the client
and the service: per request it forwards, answers a status itself, or
closes the connection without an answer; it logs every request it saw.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the model service needs the cloud extra")

from cloud.scoring_client import (
    ScoringClient,
    ScoringClientConfig,
    ScoringRejectedError,
    ServiceUnavailableError,
)
from tests.model_service_server import (
    CLOUD_MODEL,
    MODELS,
    ServiceProcess,
    copy_model,
    model_version,
    reference_scores,
    sample_rows,
)
from tests.servers import free_port

pytestmark = pytest.mark.integration

SHIPPED = json.loads((MODELS / f"{CLOUD_MODEL}.manifest.json").read_text())


class FaultProxy:
    """Forwards POSTs to ``target`` port, applying ``script`` in order
    (``"pass"``, an int status to answer, or ``"drop"``); then passes."""

    def __init__(self, target_port: int, script: list[str | int]) -> None:
        self.target_port = target_port
        self.script = list(script)
        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy._lock:
                    action = proxy.script.pop(0) if proxy.script else "pass"
                    proxy.seen.append(json.loads(body))
                if action == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if isinstance(action, int):
                    self._reply(
                        action, b'{"error":"injected","message":"by the proxy"}'
                    )
                    return
                conn = http.client.HTTPConnection(
                    "127.0.0.1", proxy.target_port, timeout=30
                )
                try:
                    conn.request(
                        "POST", self.path, body, {"Content-Type": "application/json"}
                    )
                    resp = conn.getresponse()
                    self._reply(resp.status, resp.read())
                finally:
                    conn.close()

            def _reply(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("models")
    copy_model(CLOUD_MODEL, root)
    proc = ServiceProcess(
        tmp_path_factory.mktemp("svc"),
        ["--models-dir", str(root), "--max-rows", "5000"],
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def proxy_factory(service: ServiceProcess) -> Iterator[Any]:
    made: list[FaultProxy] = []

    def make(script: list[str | int]) -> FaultProxy:
        p = FaultProxy(service.port, script)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def _config(url: str, **kw: Any) -> ScoringClientConfig:
    return ScoringClientConfig(url=url, backoff_factor_s=0.01, backoff_max_s=0.05, **kw)


def test_rows_are_chunked_and_reassembled_in_order(proxy_factory: Any) -> None:
    """12,345 rows go as three requests of at most 5,000 and come back in input
    order, equal to the independent numpy scores."""
    proxy = proxy_factory([])
    rows = sample_rows(12_345, seed=11)
    hosts = [f"h{i}" for i in range(len(rows))]
    with ScoringClient(_config(proxy.url, chunk_rows=5000)) as client:
        result = client.score(
            "acme", rows, hosts=hosts, window_starts_ms=np.arange(len(rows))
        )
    assert [len(r["rows"]) for r in proxy.seen] == [5000, 5000, 2345]
    assert proxy.seen[2]["hosts"][0] == "h10000"
    assert proxy.seen[2]["window_starts_ms"][-1] == 12_344
    want = reference_scores(SHIPPED, rows)
    np.testing.assert_allclose(result.scores, want["scores"], atol=1e-5)
    assert result.alert.tolist() == want["alert"].tolist()
    assert result.classes == want["classes"]
    assert result.losses.shape == (12_345, 16)
    # Default: losses of alerting rows only, NaN elsewhere.
    alert = want["alert"]
    assert np.isnan(result.losses[~alert]).all()
    np.testing.assert_allclose(result.losses[alert], want["z"][alert], atol=1e-3)
    assert result.loss_names[-1] == "total"
    assert set(result.model_versions) == {model_version(SHIPPED)}
    assert (
        result.thresholds[model_version(SHIPPED)]["alert"]
        == SHIPPED["thresholds"]["alert"]
    )
    assert client.counters.requests == 3
    assert client.counters.rows == 12_345


def test_transient_failures_are_retried(proxy_factory: Any) -> None:
    """Two 503s and a dropped connection are retried; the fourth try succeeds."""
    proxy = proxy_factory([503, "drop", 502])
    rows = sample_rows(10, seed=12)
    client = ScoringClient(_config(proxy.url, retries=3))
    result = client.score("acme", rows)
    assert len(proxy.seen) == 4
    assert len(result) == 10
    assert client.counters.retries == 3


def test_persistent_503_raises_service_unavailable(proxy_factory: Any) -> None:
    """When every try answers 503 the client gives up after its retries with
    ServiceUnavailableError carrying the status."""
    proxy = proxy_factory([503] * 10)
    client = ScoringClient(_config(proxy.url, retries=2))
    with pytest.raises(ServiceUnavailableError) as info:
        client.score("acme", sample_rows(3))
    assert info.value.status == 503
    assert len(proxy.seen) == 3
    assert client.counters.failures["status_503"] == 1


def test_server_error_is_unavailable_without_retry(proxy_factory: Any) -> None:
    """A 500 (a broken model) is not retried: ServiceUnavailableError at once."""
    proxy = proxy_factory([500])
    client = ScoringClient(_config(proxy.url, retries=3))
    with pytest.raises(ServiceUnavailableError) as info:
        client.score("acme", sample_rows(3))
    assert (info.value.status, info.value.rule) == (500, "injected")
    assert len(proxy.seen) == 1


def test_refused_rows_raise_scoring_rejected_without_retry(proxy_factory: Any) -> None:
    """Rows the service refuses (NaN) raise ScoringRejectedError naming the
    rule, after exactly one request."""
    proxy = proxy_factory([])
    rows = sample_rows(4)
    rows[1, 3] = np.nan
    client = ScoringClient(_config(proxy.url))
    with pytest.raises(ScoringRejectedError) as info:
        client.score("acme", rows)
    assert (info.value.status, info.value.rule) == (422, "non_finite")
    assert "row 1 feature bytes_in is nan" in str(info.value)
    assert len(proxy.seen) == 1


def test_nothing_listening_raises_service_unavailable() -> None:
    """A refused connection, retried, ends in ServiceUnavailableError with no
    status."""
    client = ScoringClient(_config(f"http://127.0.0.1:{free_port()}", retries=2))
    with pytest.raises(ServiceUnavailableError) as info:
        client.score("acme", sample_rows(2))
    assert info.value.status is None
    assert client.counters.failures["unreachable"] == 1


def test_service_restart_is_survived(tmp_path: Path) -> None:
    """Requests fail as unavailable while the service is down and succeed once
    it is back, with the same client."""
    root = tmp_path / "models"
    copy_model(CLOUD_MODEL, root)
    proc = ServiceProcess(tmp_path / "svc", ["--models-dir", str(root)])
    proc.start()
    client = ScoringClient(_config(proc.url, retries=1))
    try:
        assert len(client.score("acme", sample_rows(5))) == 5
        port = proc.port
        proc.stop()
        with pytest.raises(ServiceUnavailableError):
            client.score("acme", sample_rows(5))
        proc.start(port=port)
        assert len(client.score("acme", sample_rows(5))) == 5
    finally:
        proc.stop()


def test_config_is_validated() -> None:
    """Bad settings are refused with the setting and the rule."""
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        ScoringClientConfig(url="http://x", chunk_rows=0)
    with pytest.raises(ValueError, match="url must start with http"):
        ScoringClientConfig(url="x:80")
