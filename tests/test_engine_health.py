"""The engine's status endpoint: /metrics, /healthz and ``engine status``.

Over real sockets: the status server on a free loopback port, read with
urllib and Prometheus' own text parser; expected figures are sums of the
reports fed in, worked out by hand in each test.  The last test runs the
engine itself (MiniStack) with the server on and reads it mid-run.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud.engine.health import (
    StatusPublisher,
    engine_health,
    stale_after_s,
    status_registry,
)
from edge_agent.aggregate.schema import AGG_DTYPE
from edge_agent.cli import main
from edge_agent.relay.metrics import MetricsServer
from edge_agent.wire import HeaderFields, encode_batches
from tests.servers import MiniStack, kinesis_client


class _Query:
    """Stands in for the streaming query's state (a plain flag)."""

    def __init__(self) -> None:
        self.running = True
        self.error: str | None = None

    def __call__(self) -> tuple[bool, str | None]:
        return self.running, self.error


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


@pytest.fixture
def served() -> Iterator[tuple[StatusPublisher, _Query, str]]:
    """A status server on a free port, with a clock the test moves."""
    now = [1_800_000_000.0]
    status = StatusPublisher(clock=lambda: now[0])
    query = _Query()
    server = MetricsServer(
        status_registry(status, query),
        lambda: engine_health(status, query),
        address="127.0.0.1",
        port=0,
    )
    server.start()
    try:
        yield status, query, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def _report(**values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "records": 0,
        "flows": 0,
        "invalid": {},
        "unscored": 0,
        "total_ms": 0.0,
    }
    return {**base, **values}


def test_metrics_sum_reports_and_keep_the_last(
    served: tuple[StatusPublisher, _Query, str],
) -> None:
    """Counters add up every micro-batch's report, gauges show the last
    one, and the source's lag is per shard."""
    status, _, url = served
    status.publish_batch(
        4,
        _report(
            records=7,
            flows=120,
            batches_accepted=5,
            invalid={"CorruptBatchError": 2},
            unscored=30,
            total_ms=1500.0,
        ),
    )
    status.publish_batch(
        5,
        _report(
            records=3,
            flows=80,
            batches_accepted=3,
            invalid={"CorruptBatchError": 1, "UnknownVersionError": 1},
            unscored=12,
            total_ms=250.0,
        ),
    )
    status.publish_lag({"shardId-000000000000": 4000, "shardId-000000000001": 0})
    code, body = _get(url + "/metrics")
    assert code == 200
    m = _samples(body.decode())
    p = "sampleflow_engine_"
    assert m[(p + "up", ())] == 1.0
    assert m[(p + "micro_batches_total", ())] == 2.0
    assert m[(p + "records_total", ())] == 10.0  # 7 + 3
    assert m[(p + "flows_total", ())] == 200.0  # 120 + 80
    assert m[(p + "batches_accepted_total", ())] == 8.0
    assert m[(p + "invalid_records_total", (("kind", "CorruptBatchError"),))] == 3.0
    assert m[(p + "invalid_records_total", (("kind", "UnknownVersionError"),))] == 1.0
    assert m[(p + "last_micro_batch", ())] == 5.0
    assert m[(p + "last_micro_batch_records", ())] == 3.0
    assert m[(p + "last_micro_batch_duration_seconds", ())] == 0.25
    assert m[(p + "last_micro_batch_timestamp_seconds", ())] == 1_800_000_000.0
    assert m[(p + "unscored_host_windows", ())] == 12.0
    lag = (p + "millis_behind_latest", (("shard", "shardId-000000000000"),))
    assert m[lag] == 4000.0


def test_healthz_is_ok_while_the_query_runs_and_503_after(
    served: tuple[StatusPublisher, _Query, str],
) -> None:
    """/healthz answers 200 with the last micro-batch's figures and its age
    while the query runs, and 503 with the query's error once it stopped."""
    status, query, url = served
    code, body = _get(url + "/healthz")
    assert code == 200
    assert json.loads(body)["last_micro_batch"] is None  # nothing yet: still ok
    status.publish_batch(
        9, _report(records=4, flows=50, invalid={"CorruptBatchError": 1}, unscored=6)
    )
    status.clock = lambda: 1_800_000_000.0 + 12.5
    code, body = _get(url + "/healthz")
    health = json.loads(body)
    assert code == 200
    assert health["status"] == "ok"
    assert health["last_micro_batch"] == 9
    assert health["last_batch_age_s"] == 12.5
    assert (health["last_records"], health["last_flows"]) == (4, 50)
    assert health["unscored_host_windows"] == 6
    assert health["invalid_records"] == 1
    query.running, query.error = False, "StreamingQueryException: boom"
    code, body = _get(url + "/healthz")
    health = json.loads(body)
    assert code == 503
    assert health["status"] == "unhealthy"
    assert health["error"] == "StreamingQueryException: boom"
    code, body = _get(url + "/metrics")
    assert _samples(body.decode())[("sampleflow_engine_up", ())] == 0.0


def test_healthz_is_503_when_the_trigger_is_stuck_not_when_idle() -> None:
    """A running query whose trigger is not busy is idle, not stuck: 200
    with ``idle_s`` however long no micro-batch ran.  A trigger seen busy
    for more than the threshold (10 triggers, at least 60 s) with no
    micro-batch finishing answers 503 with the reason; a micro-batch
    finishing, or the trigger going quiet, makes it healthy again; a failed
    query keeps its own error."""
    assert stale_after_s(2.0) == 60.0  # 10 x 2 s is under the 60 s floor
    assert stale_after_s(10.0) == 100.0
    now = [1_800_000_000.0]
    busy = [False]
    status = StatusPublisher(clock=lambda: now[0])
    query = _Query()
    server = MetricsServer(
        status_registry(status, query),
        lambda: engine_health(status, query, stale_after_s(2.0), lambda: busy[0]),
        address="127.0.0.1",
        port=0,
    )
    server.start()
    url = f"http://127.0.0.1:{server.port}/healthz"
    try:
        now[0] += 600.0  # ten minutes without records: idle
        code, body = _get(url)
        health = json.loads(body)
        assert (code, health["idle_s"], health["trigger_busy_s"]) == (200, 600.0, None)
        busy[0] = True
        assert _get(url)[0] == 200  # seen busy from now on
        now[0] += 60.0
        code, body = _get(url)
        assert (code, json.loads(body)["trigger_busy_s"]) == (200, 60.0)
        now[0] += 1.0
        code, body = _get(url)
        health = json.loads(body)
        assert (code, health["status"]) == (503, "unhealthy")
        assert health["query_running"] is True
        assert "busy for 61 s with no micro-batch finished" in health["error"]
        status.publish_batch(3, _report(records=2, flows=10))  # it came back
        code, body = _get(url)
        assert (code, json.loads(body)["trigger_busy_s"]) == (200, 0.0)
        now[0] += 61.5
        assert _get(url)[0] == 503  # busy again past the threshold
        busy[0] = False
        code, body = _get(url)
        assert (code, json.loads(body)["idle_s"]) == (200, 61.5)
        busy[0] = True
        now[0] += 100.0
        assert _get(url)[0] == 200  # a new busy stretch starts at this probe
        query.running, query.error = False, "StreamingQueryException: boom"
        code, body = _get(url)
        assert (code, json.loads(body)["error"]) == (503, query.error)
    finally:
        server.stop()


def test_status_command_prints_health_and_exits_by_it(
    served: tuple[StatusPublisher, _Query, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``sampleflow engine status`` prints /healthz one field a line and
    exits 0 while the query runs, 1 when it does not or nothing answers."""
    status, query, url = served
    status.publish_batch(2, _report(records=11, flows=99))
    assert main(["engine", "status", "--url", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    fields = dict(line.split(None, 1) for line in lines)
    assert fields["status"] == "ok"
    assert fields["last_micro_batch"] == "2"
    assert fields["last_records"] == "11"
    query.running = False
    assert main(["engine", "status", "--url", url]) == 1
    assert "unhealthy" in capsys.readouterr().out
    assert main(["engine", "status", "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_status_port_must_be_a_port_or_none() -> None:
    """The run command refuses a status port outside 0..65535."""
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "engine",
                "run",
                "--stream",
                "s",
                "--checkpoint",
                "c",
                "--status-port",
                "70000",
            ]
        )
    assert exc.value.code == 2


@pytest.mark.integration
def test_running_engine_serves_its_status(ministack: MiniStack, tmp_path: Path) -> None:
    """A running engine with a status port answers /healthz and /metrics
    with the records it read: two valid batches and one invalid record;
    with nothing more to read it reads as idle (200), not stuck."""
    from cloud.engine.config import EngineConfig  # noqa: PLC0415
    from cloud.engine.job import start_engine  # noqa: PLC0415
    from cloud.engine.metrics import LogPublisher  # noqa: PLC0415
    from cloud.engine.sinks import MemorySink  # noqa: PLC0415
    from cloud.engine.spark import build_spark_session  # noqa: PLC0415

    client = kinesis_client(ministack.endpoint_url)
    stream = f"health-{uuid.uuid4().hex[:10]}"
    client.create_stream(StreamName=stream, ShardCount=1)
    deadline = time.monotonic() + 30
    while (
        client.describe_stream(StreamName=stream)["StreamDescription"]["StreamStatus"]
        != "ACTIVE"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    seqs = itertools.count()
    datas = []
    for packets in ([3, 4], [5]):
        rows = np.zeros(len(packets), dtype=AGG_DTYPE)
        rows["packets"] = packets
        rows["bytes"] = np.array(packets) * 100
        rows["sampling_rate"] = 10
        rows["flow_count"] = 1
        rows["time_start"] = 1_699_999_200_000
        rows["time_end"] = 1_699_999_200_500
        (batch,) = encode_batches(
            rows, HeaderFields("t", "relay-t", 0, 60_000), seqs.__next__, "t"
        )
        datas.append(batch.data)
    client.put_records(
        StreamName=stream,
        Records=[
            {"Data": d, "PartitionKey": "k"} for d in [*datas, b"SFB\x09" + bytes(8)]
        ],
    )
    spark = build_spark_session(master="local[1]", shuffle_partitions=1)
    spark.sparkContext.setLogLevel("ERROR")
    config = EngineConfig(
        stream_name=stream,
        checkpoint_dir=str(tmp_path / "checkpoint"),
        endpoint_url=ministack.endpoint_url,
        region="us-east-1",
        master=None,
        trigger_interval_s=1.0,
        status_port=0,
    )
    engine = start_engine(
        config, spark=spark, sink=MemorySink(), publisher=LogPublisher()
    )
    try:
        assert engine.status_server is not None
        url = f"http://127.0.0.1:{engine.status_server.port}"
        deadline = time.monotonic() + 120
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            code, body = _get(url + "/healthz")
            health = json.loads(body)
            if health["micro_batches"]:
                break
            time.sleep(0.5)
        assert code == 200
        assert health["query_running"] is True
        assert health["last_records"] == 3
        assert health["last_flows"] == 3  # 2 + 1 rows
        assert health["invalid_records"] == 1
        m = _samples(_get(url + "/metrics")[1].decode())
        assert m[("sampleflow_engine_records_total", ())] == 3.0
        kind = (("kind", "UnknownVersionError"),)
        assert m[("sampleflow_engine_invalid_records_total", kind)] == 1.0
        # Nothing more arrives: Spark's trigger goes quiet between looks
        # for data, and /healthz says idle (still 200), not stuck.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, body = _get(url + "/healthz")
            health = json.loads(body)
            if health["idle_s"] is not None:
                break
            time.sleep(0.2)
        assert (code, health["trigger_busy_s"]) == (200, None)
        assert health["idle_s"] >= 0
    finally:
        engine.close()
    assert engine.status_server is not None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/healthz", timeout=2)
