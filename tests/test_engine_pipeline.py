"""The engine end to end: Kinesis → features → model service → stores.

Real servers only: MiniStack (Kinesis, DynamoDB, CloudWatch), SecantusDB
(the MongoDB-wire detection store) and the model service as a process.
The flows are CTU-13 scenario 6 (slices 22-23, the bot 147.32.84.165
active) thinned 1:100 by cloud.training, aggregated into 10 s relay
batches and encoded by the relay's own encoder.

Expected values come from the test itself: estimates by plain numpy
sums, sorting and the Chao1 formula written out here; host-window
features by the shared feature library run on the raw records with its
own tumbling windows at each slide offset (not the engine's buckets and
compaction), scored by the numpy reference forward pass of
tests/model_service_server.py (the model's weights, not LiteRT).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pymongo
import pytest

from cloud.engine.config import EngineConfig, tenant_networks
from cloud.engine.job import Engine, start_engine
from cloud.engine.spark import build_spark_session
from cloud.engine.store import SqliteStore
from cloud.store.detections import open_client
from cloud.store.state import TenantStateStore
from cloud.training.ctu13 import sampled_records
from edge_agent.aggregate.schema import AGG_DTYPE
from edge_agent.features import host_window_features
from edge_agent.flows.schema import address_bytes, address_text
from edge_agent.wire import HeaderFields, encode_batches
from tests.model_service_server import (
    CLOUD_MODEL,
    MODELS,
    ServiceProcess,
    model_version,
    reference_scores,
)
from tests.mongo_server import MongoServer
from tests.servers import MiniStack, free_port, kinesis_client

pytestmark = pytest.mark.integration

TENANT = "local"  # the demo tenant: 147.32.0.0/16 is internal by default
RELAY = "relay-1"
EXPORTER = "192.0.2.1"
RELAY_WINDOW_MS = 10_000
WINDOW_MS, SLIDE_MS = 60_000, 10_000  # estimate windows (engine defaults)
FEATURE_WINDOW_MS, FEATURE_SLIDE_MS = 300_000, 60_000
LATENESS_MS = 120_000
INTERNAL = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "147.32.0.0/16")
MANIFEST = json.loads((MODELS / f"{CLOUD_MODEL}.manifest.json").read_text())


# -- data ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records() -> np.ndarray:
    """CTU-13 slices 22-23 at 1:100 (seed 6) as relay rows."""
    flows, _ = sampled_records(100, 6, slices=[22, 23])
    rows = np.zeros(len(flows), dtype=AGG_DTYPE)
    for name in AGG_DTYPE.names or ():
        if not name.startswith("_") and name in (flows.dtype.names or ()):
            rows[name] = flows[name]
    rows["flow_count"] = 1
    rows["exporter"] = np.frombuffer(address_bytes(EXPORTER), dtype="V16")[0]
    return rows[np.argsort(rows["time_end"], kind="stable")]


def _batches(rows: np.ndarray, tenant: str = TENANT) -> list[tuple[int, bytes]]:
    """(created_ms, data) of 10 s relay batches in time order."""
    seqs = itertools.count()
    window = rows["time_end"] // RELAY_WINDOW_MS * RELAY_WINDOW_MS
    out = []
    for w in np.unique(window).tolist():
        created = w + RELAY_WINDOW_MS + 500
        (batch,) = encode_batches(
            rows[window == w],
            HeaderFields(tenant, RELAY, w, w + RELAY_WINDOW_MS),
            seqs.__next__,
            tenant,
            now_ms=created,
        )
        out.append((created, batch.data))
    return out


def _put(client: Any, stream: str, datas: list[bytes]) -> None:
    for lo in range(0, len(datas), 200):
        chunk = datas[lo : lo + 200]
        answer = client.put_records(
            StreamName=stream,
            Records=[{"Data": d, "PartitionKey": "k"} for d in chunk],
        )
        assert answer["FailedRecordCount"] == 0


def _new_stream(ministack: MiniStack) -> str:
    client = kinesis_client(ministack.endpoint_url)
    name = f"pipe-{uuid.uuid4().hex[:10]}"
    client.create_stream(StreamName=name, ShardCount=1)
    deadline = time.monotonic() + 30
    while (
        client.describe_stream(StreamName=name)["StreamDescription"]["StreamStatus"]
        != "ACTIVE"
    ):
        assert time.monotonic() < deadline, "stream did not become ACTIVE"
        time.sleep(0.05)
    return name


# -- expectations, computed here ---------------------------------------------------


def _chao1(values: np.ndarray, weights: np.ndarray) -> tuple[float, int]:
    """Chao1 by its formula: S_obs + f1²/(2 f2), or f1(f1-1)/2 if f2 = 0."""
    distinct, inverse = np.unique(values, return_inverse=True)
    abundance = np.bincount(inverse, weights=weights)
    f1 = int(np.sum(abundance == 1))
    f2 = int(np.sum(abundance == 2))
    extra = f1 * f1 / (2 * f2) if f2 else f1 * (f1 - 1) / 2
    return len(distinct) + extra, len(distinct)


def expected_estimate(rows: np.ndarray, start: int) -> dict[str, Any]:
    """One estimate window's figures from the raw rows (time_end inside)."""
    r = rows[(rows["time_end"] >= start) & (rows["time_end"] < start + WINDOW_MS)]
    rate = r["sampling_rate"].astype(np.float64)
    flags = r["tcp_flags"].astype(np.int64)
    syn = (r["protocol"] == 6) & (flags & 0x02 != 0) & (flags & 0x10 == 0)
    hosts = _chao1(
        np.concatenate([r["src_addr"], r["dst_addr"]]),
        np.ones(2 * len(r)),
    )
    ported = (r["protocol"] == 6) | (r["protocol"] == 17)
    ports = _chao1(r["dst_port"][ported], np.ones(int(ported.sum())))
    talkers, inverse = np.unique(r["src_addr"], return_inverse=True)
    sent = np.bincount(inverse, weights=r["bytes"] * rate)
    top = sorted(
        ((-b, bytes(t)) for t, b in zip(talkers, sent, strict=True)),
    )[:10]
    return {
        "packets": float(np.sum(r["packets"] * rate)),
        "bytes": float(np.sum(r["bytes"] * rate)),
        "flows": len(r),
        "flow_starts": float(np.sum(syn * rate)),
        "distinct_hosts": hosts[0],
        "distinct_hosts_observed": hosts[1],
        "distinct_ports": ports[0],
        "distinct_ports_observed": ports[1],
        "top_talkers": [(address_text(t), -b) for b, t in top],
    }


def expected_host_windows(
    rows: np.ndarray, watermark: int, internal: tuple[str, ...] = INTERNAL
) -> dict[tuple[str, int], np.ndarray]:
    """Raw features of every (host, window) whose window ends by the
    watermark: the feature library's tumbling windows at each offset."""
    out: dict[tuple[str, int], np.ndarray] = {}
    for offset in range(0, FEATURE_WINDOW_MS, FEATURE_SLIDE_MS):
        shifted = {n: rows[n] for n in rows.dtype.names or () if not n.startswith("_")}
        shifted["time_start"] = rows["time_start"] - offset
        hw = host_window_features(shifted, internal, FEATURE_WINDOW_MS // 1000)
        for host, start, values in zip(
            hw.host, hw.window_start_ms, hw.values, strict=True
        ):
            s = int(start) + offset
            if s + FEATURE_WINDOW_MS <= watermark:
                out[(address_text(bytes(host)), s)] = values
    return out


def expected_detections(
    host_windows: dict[tuple[str, int], np.ndarray],
) -> tuple[set[tuple[str, int]], set[tuple[str, int]], dict[tuple[str, int], float]]:
    """(alerting keys, keys too close to the threshold to call, scores)."""
    keys = sorted(host_windows)
    ref = reference_scores(MANIFEST, np.stack([host_windows[k] for k in keys]))
    alert = MANIFEST["thresholds"]["alert"]
    scores = dict(zip(keys, ref["scores"].tolist(), strict=True))
    alerting = {k for k, a in zip(keys, ref["alert"], strict=True) if a}
    close = {k for k, s in scores.items() if abs(s - alert) < 1e-4}
    return alerting, close, scores


# -- servers and engine ------------------------------------------------------------


@pytest.fixture(scope="module")
def spark(ministack: MiniStack) -> Any:
    """One local Spark session for the module (started after MiniStack
    put dummy credentials in the environment the workers inherit)."""
    session = build_spark_session(master="local[2]", shuffle_partitions=2)
    session.sparkContext.setLogLevel("ERROR")
    return session


@pytest.fixture(scope="module")
def model_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The model service with the shipped models, as a process."""
    service = ServiceProcess(
        tmp_path_factory.mktemp("model-service"), ["--models-dir", str(MODELS)]
    )
    service.start()
    try:
        yield service
    finally:
        service.stop()


@dataclass
class Servers:
    """The module's servers and Spark session."""

    spark: Any
    ministack: MiniStack
    mongo: MongoServer
    service: ServiceProcess


@pytest.fixture(scope="module")
def servers(
    spark: Any,
    ministack: MiniStack,
    mongo_server: MongoServer,
    model_service: ServiceProcess,
) -> Servers:
    """Everything a test here talks to."""
    return Servers(spark, ministack, mongo_server, model_service)


def _config(
    tmp: Path,
    stream: str,
    servers: Servers,
    service_url: str,
    database: str,
    **changes: Any,
) -> EngineConfig:
    values: dict[str, Any] = {
        "stream_name": stream,
        "checkpoint_dir": str(tmp / "checkpoint"),
        "endpoint_url": servers.ministack.endpoint_url,
        "region": "us-east-1",
        "master": None,
        "max_records_per_batch": 40,
        "model_service_url": service_url,
        "mongo_uri": servers.mongo.uri,
        "mongo_database": database,
        "score_retry_s": 0.0,
        # Every alerting window (hysteresis has its own test).
        "alert_k": 1,
        "alert_n": 1,
        "tenant_networks": tenant_networks(
            {TENANT: INTERNAL, "acme": ("147.32.84.0/24",)}
        ),
    }
    values.update(changes)
    return EngineConfig(**values)


def _run(spark: Any, config: EngineConfig) -> Engine:
    """Run with Trigger.AvailableNow until the stream is read."""
    engine = start_engine(config, spark=spark, available_now=True)
    engine.query.awaitTermination(timeout=600)
    assert not engine.query.isActive
    assert engine.query.exception() is None
    engine.close()
    return engine


def _detections(mongo: MongoServer, database: str, tenant: str) -> list[dict[str, Any]]:
    client = open_client(mongo.uri)
    try:
        return list(client[database]["detections"].find({"tenant_id": tenant}))
    finally:
        client.close()


def _check_detections(
    docs: list[dict[str, Any]],
    host_windows: dict[tuple[str, int], np.ndarray],
) -> None:
    """Every expected alerting window stored once, nothing else, with
    its features, score and the model's version."""
    alerting, close, scores = expected_detections(host_windows)
    keys = [(d["host"], d["window_start_ms"]) for d in docs]
    assert len(keys) == len(set(keys)), "a detection was stored twice"
    assert set(keys) - close == alerting - close
    assert "147.32.84.165" in {h for h, _ in keys}  # the bot
    version = model_version(MANIFEST)
    for d in docs:
        key = (d["host"], d["window_start_ms"])
        assert d["window_end_ms"] == d["window_start_ms"] + FEATURE_WINDOW_MS
        assert d["model_version"] == version
        assert d["alert"] is True
        assert d["score"] == pytest.approx(scores[key], abs=1e-4)
        want = dict(zip(MANIFEST["features"], host_windows[key], strict=True))
        for name, value in want.items():
            assert d["features"][name] == pytest.approx(value, rel=1e-9, abs=1e-9)
        assert len(d["top_losses"]) == 3
        zs = [t["z"] for t in d["top_losses"]]
        assert zs == sorted(zs, reverse=True)


def _watermark(rows: np.ndarray) -> int:
    return int(rows["time_end"].max()) - LATENESS_MS


# -- tests ---------------------------------------------------------------------------


def test_engine_end_to_end(
    servers: Servers, records: np.ndarray, tmp_path: Path
) -> None:
    """Relay batches on Kinesis (some delivered twice) give: final
    estimates equal to numpy sums (packets, bytes, flow starts, Chao1
    hosts and ports, top talkers); each alerting host window once in the
    detection store with the reference score and features; tenant state
    in DynamoDB; micro-batch metrics in CloudWatch."""
    stream = _new_stream(servers.ministack)
    batches = _batches(records)
    datas = [d for _, d in batches]
    _put(
        kinesis_client(servers.ministack.endpoint_url), stream, [*datas, *datas[10:15]]
    )
    database = f"e2e_{uuid.uuid4().hex[:8]}"
    namespace = f"Test/{uuid.uuid4().hex[:8]}"
    config = _config(
        tmp_path,
        stream,
        servers,
        servers.service.url,
        database,
        state_table=f"state-{uuid.uuid4().hex[:8]}",
        metrics_namespace=namespace,
    )
    engine = _run(servers.spark, config)
    c = engine.processor.counters
    reports = engine.processor.reports
    assert c.micro_batches >= 3
    assert c.batches_accepted == len(datas)
    assert c.duplicates_across + c.duplicates_in_batch == 5
    assert c.flows == len(records)
    assert sum(r.late_network_rows + r.late_feature_rows for r in reports) == 0
    assert sum(r.scoring_unavailable for r in reports) == 0

    # Estimates: every window behind the watermark is final and right.
    watermark = _watermark(records)
    client: pymongo.MongoClient[dict[str, Any]] = open_client(servers.mongo.uri)
    stored = {
        d["window_start_ms"]: d
        for d in client[database]["network_estimates"].find({"tenant_id": TENANT})
    }
    client.close()
    starts = records["time_end"] // SLIDE_MS * SLIDE_MS
    all_windows = {int(s) - k * SLIDE_MS for s in np.unique(starts) for k in range(6)}
    final = sorted(s for s in all_windows if s + WINDOW_MS <= watermark)
    assert len(final) > 50
    assert {s for s, d in stored.items() if d["final"]} == set(final)
    for s in final:
        want, got = expected_estimate(records, s), stored[s]
        for name in (
            "packets",
            "bytes",
            "flow_starts",
            "distinct_hosts",
            "distinct_ports",
        ):
            assert got[name] == pytest.approx(want[name], rel=1e-9), (s, name)
        for name in ("flows", "distinct_hosts_observed", "distinct_ports_observed"):
            assert got[name] == want[name], (s, name)
        talkers = [(t["host"], t["bytes"]) for t in got["top_talkers"]]
        assert [h for h, _ in talkers] == [h for h, _ in want["top_talkers"]]
        assert [b for _, b in talkers] == pytest.approx(
            [b for _, b in want["top_talkers"]]
        )
    assert any(stored[s]["flow_starts"] > 0 for s in final)

    # Detections: the expected alerting windows, once each.
    host_windows = expected_host_windows(records, watermark)
    _check_detections(_detections(servers.mongo, database, TENANT), host_windows)
    scored = sum(r.scored for r in reports)
    assert scored == len(host_windows)

    # Tenant state.
    state = TenantStateStore(
        _dynamodb(servers.ministack), config.state_table or ""
    ).tenant_state(TENANT)
    assert state.relays_last_seen_ms == {RELAY: max(t for t, _ in batches)}
    assert state.exporters_last_seen_ms == {EXPORTER: int(records["time_end"].max())}
    assert state.records_total == len(records)
    assert state.effective_sampling_rate == pytest.approx(100.0)
    assert state.model_version == model_version(MANIFEST)

    # CloudWatch: one InputRows datum per micro-batch, summing to the records.
    cloudwatch = _aws(servers.ministack, "cloudwatch")
    listed = {
        m["MetricName"] for m in cloudwatch.list_metrics(Namespace=namespace)["Metrics"]
    }
    assert {"MicroBatchDuration", "InputRows", "MillisBehindLatest"} <= listed
    points = cloudwatch.get_metric_statistics(
        Namespace=namespace,
        MetricName="InputRows",
        Dimensions=[
            {"Name": "Engine", "Value": stream},
            {"Name": "Query", "Value": config.query_name},
        ],
        StartTime=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
        EndTime=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5),
        Period=3600,
        Statistics=["Sum", "SampleCount"],
    )["Datapoints"]
    assert sum(p["Sum"] for p in points) == len(datas) + 5
    assert sum(p["SampleCount"] for p in points) == c.micro_batches


def _aws(ministack: MiniStack, service: str) -> Any:
    import boto3  # noqa: PLC0415

    return boto3.session.Session(region_name="us-east-1").client(
        service, endpoint_url=ministack.endpoint_url
    )


def _dynamodb(ministack: MiniStack) -> Any:
    return _aws(ministack, "dynamodb")


def test_restart_from_checkpoint_misses_and_doubles_nothing(
    servers: Servers, records: np.ndarray, tmp_path: Path
) -> None:
    """A query stopped mid-stream, its last micro-batch uncommitted (a
    crash after its writes), then started again from its checkpoint
    stores every expected detection exactly once."""
    stream = _new_stream(servers.ministack)
    _put(
        kinesis_client(servers.ministack.endpoint_url),
        stream,
        [d for _, d in _batches(records)],
    )
    database = f"restart_{uuid.uuid4().hex[:8]}"
    config = _config(
        tmp_path,
        stream,
        servers,
        servers.service.url,
        database,
        max_records_per_batch=25,
        trigger_interval_s=0.5,
    )
    engine = start_engine(config, spark=servers.spark)
    deadline = time.monotonic() + 300
    # Stop mid-stream once detections have been written and a micro-batch
    # committed (windows that began before the data close early, so the
    # very first micro-batch may already write some).
    commits = Path(config.checkpoint_dir) / "commits"
    while not (
        any(r.detections for r in engine.processor.reports)
        and len(engine.processor.reports) >= 2
        and commits.is_dir()
        and any(p.name.isdigit() for p in commits.iterdir())
    ):
        assert engine.query.exception() is None
        assert time.monotonic() < deadline, "no detections within 300 s"
        time.sleep(0.2)
    engine.close()
    first = engine.processor.reports
    checkpoint = Path(config.checkpoint_dir)
    committed = max(
        int(p.name) for p in (checkpoint / "commits").iterdir() if p.name.isdigit()
    )
    logged = max(
        int(p.name) for p in (checkpoint / "offsets").iterdir() if p.name.isdigit()
    )
    if logged == committed:
        # Stopped between micro-batches: make the last one a crash after
        # its writes and before its commit.
        (checkpoint / "commits" / str(committed)).unlink()
        (checkpoint / "commits" / f".{committed}.crc").unlink(missing_ok=True)
    # Else the stop cut a micro-batch short: it is the one replayed.

    again = _run(servers.spark, config)
    assert again.processor.reports[0].micro_batch == logged
    assert len(again.processor.reports) >= 2, "the first run read everything"
    accepted = {r.micro_batch: r.batches_accepted for r in first}
    accepted.update(
        {r.micro_batch: r.batches_accepted for r in again.processor.reports}
    )
    assert sum(accepted.values()) == len(_batches(records))
    host_windows = expected_host_windows(records, _watermark(records))
    _check_detections(_detections(servers.mongo, database, TENANT), host_windows)


def test_model_service_down_leaves_windows_unscored_until_it_returns(
    servers: Servers, records: np.ndarray, tmp_path: Path
) -> None:
    """With the model service down the engine goes on and keeps every
    closed host window pending in its store; once the service answers,
    the next micro-batch scores them and stores the detections."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stream = _new_stream(servers.ministack)
    kinesis = kinesis_client(servers.ministack.endpoint_url)
    _put(kinesis, stream, [d for _, d in _batches(records)])
    database = f"outage_{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, stream, servers, url, database)
    down = _run(servers.spark, config)
    host_windows = expected_host_windows(records, _watermark(records))
    assert down.processor.counters.flows == len(records)
    assert sum(r.scored for r in down.processor.reports) == 0
    assert down.processor.reports[-1].unscored == len(host_windows)
    assert any(r.scoring_unavailable for r in down.processor.reports)
    store = SqliteStore(config.resolved_state_path)
    assert store.count_host_windows() == len(host_windows)
    store.close()
    assert _detections(servers.mongo, database, TENANT) == []

    service = ServiceProcess(tmp_path / "service", ["--models-dir", str(MODELS)])
    service.start(port=port)
    try:
        # Any record makes a micro-batch; this one is another tenant's.
        ping = records[:1].copy()
        _put(kinesis, stream, [_batches(ping, tenant="ping")[0][1]])
        back = _run(servers.spark, config)
    finally:
        service.stop()
    assert sum(r.scored for r in back.processor.reports) == len(host_windows)
    assert back.processor.reports[-1].unscored == 0
    _check_detections(_detections(servers.mongo, database, TENANT), host_windows)


def test_engine_command_wires_the_real_outputs(
    servers: Servers, records: np.ndarray, tmp_path: Path
) -> None:
    """`sampleflow engine run` with the output flags reads the stream,
    stores the expected detections and estimates in the Mongo store and
    tenant state in DynamoDB, and logs one engine_batch line per
    micro-batch on stderr without Spark's INFO chatter."""
    stream = _new_stream(servers.ministack)
    _put(
        kinesis_client(servers.ministack.endpoint_url),
        stream,
        [d for _, d in _batches(records)],
    )
    database = f"cli_{uuid.uuid4().hex[:8]}"
    table = f"state-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "engine",
            "run",
            "--stream",
            stream,
            "--checkpoint",
            str(tmp_path / "checkpoint"),
            "--endpoint-url",
            servers.ministack.endpoint_url,
            "--region",
            "us-east-1",
            "--available-now",
            "--master",
            "local[1]",
            "--max-records-per-batch",
            "50",
            "--model-service-url",
            servers.service.url,
            "--mongo-uri",
            servers.mongo.uri,
            "--mongo-database",
            database,
            "--state-table",
            table,
            "--metrics-namespace",
            "none",
            "--tenant-networks",
            f"{TENANT}={','.join(INTERNAL)}",
            "--alert-k",
            "1",
            "--alert-n",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    batches = [line for line in result.stderr.splitlines() if "engine_batch" in line]
    assert len(batches) >= 3
    assert not [line for line in result.stderr.splitlines() if " INFO " in line]
    assert result.stdout == ""
    host_windows = expected_host_windows(records, _watermark(records))
    _check_detections(_detections(servers.mongo, database, TENANT), host_windows)
    client = open_client(servers.mongo.uri)
    try:
        finals = client[database]["network_estimates"].count_documents({"final": True})
    finally:
        client.close()
    assert finals > 50
    state = TenantStateStore(_dynamodb(servers.ministack), table).tenant_state(TENANT)
    assert state.records_total == len(records)


def test_store_down_keeps_results_until_it_returns(
    servers: Servers, records: np.ndarray, tmp_path: Path
) -> None:
    """With the detection store unreachable a running engine goes on:
    host windows stay pending and estimates wait; once the store answers,
    a later micro-batch writes every expected detection and final
    estimate."""
    store = MongoServer(tmp_path / "mongo")
    store.port = free_port()  # nothing listens there yet
    stream = _new_stream(servers.ministack)
    kinesis = kinesis_client(servers.ministack.endpoint_url)
    _put(kinesis, stream, [d for _, d in _batches(records)])
    database = f"storedown_{uuid.uuid4().hex[:8]}"
    config = _config(
        tmp_path,
        stream,
        servers,
        servers.service.url,
        database,
        mongo_uri=store.uri,
        mongo_timeout_s=1.0,
        trigger_interval_s=0.5,
    )
    host_windows = expected_host_windows(records, _watermark(records))
    engine = start_engine(config, spark=servers.spark)
    try:
        p = engine.processor
        deadline = time.monotonic() + 300
        while p.counters.flows < len(records):
            assert engine.query.exception() is None
            assert time.monotonic() < deadline, "records not read within 300 s"
            time.sleep(0.2)
        p.idle.wait(60)
        last = p.reports[-1]
        assert last.unscored == len(host_windows)
        assert last.estimates_deferred > 0
        assert sum(r.scored for r in p.reports) == 0

        store.workdir.mkdir(parents=True, exist_ok=True)
        store._spawn()
        store._wait_ready()
        seen = len(p.reports)
        # Any record makes a micro-batch; this one is another tenant's.
        _put(kinesis, stream, [_batches(records[:1].copy(), tenant="ping")[0][1]])
        while not (
            len(p.reports) > seen
            and p.reports[-1].unscored == 0
            and p.reports[-1].estimates_deferred == 0
        ):
            assert engine.query.exception() is None
            assert time.monotonic() < deadline, "results not written within 300 s"
            time.sleep(0.2)
    finally:
        engine.close()
    try:
        _check_detections(_detections(store, database, TENANT), host_windows)
        client = open_client(store.uri)
        try:
            finals = client[database]["network_estimates"].count_documents(
                {"tenant_id": TENANT, "final": True}
            )
        finally:
            client.close()
        starts = records["time_end"] // SLIDE_MS * SLIDE_MS
        windows = {int(s) - k * SLIDE_MS for s in np.unique(starts) for k in range(6)}
        assert finals == sum(1 for s in windows if s + WINDOW_MS <= _watermark(records))
    finally:
        store.stop()
