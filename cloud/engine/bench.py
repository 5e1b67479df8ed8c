"""``sampleflow bench engine``: how fast the engine goes, measured here.

Four measurements on synthetic relay batches (internal hosts in
10.0.0.0/16 talking to external ones, 1:100 sampling, 10 s relay windows,
spread over 30 minutes of event time):

1. **In-process** (no Spark): decoding the wire format
   (:func:`cloud.engine.transform.decode_records`) and the driver's whole
   micro-batch work (:meth:`MicroBatchProcessor.process_records`: decode,
   dedup, estimates, network statistics, feature buckets and windows,
   scoring) in micro-batches of about 200,000 rows, with the model
   in-process and over HTTP to a model service process.  Reported per
   CPU-second of this process (the model service's own CPU apart).
2. **Spark, local mode**: the same batches on a local Kinesis (MiniStack),
   the engine run with Trigger.AvailableNow in micro-batches of about
   200,000 rows, after a first full run that warms the JVM: flow rows per
   second of micro-batch time, and per CPU-second of all the engine's
   processes (driver, JVM, Python workers and source runner, model
   service), over the whole query and over its micro-batches after the
   first (the running engine, without the query's start).
3. **Micro-batch overhead**: micro-batches of one one-row record (time,
   and CPU of all the engine's processes per micro-batch).
4. **Latency**: a feeder puts a batch every second with flows ending now;
   2 s trigger, 2 s windows and no lateness; the time from the put of the
   batch that closes a window to the window's detection in the store
   (``detected_at``), median and p95.  Every scored window is stored
   (``detections=all``), so the figure does not depend on alerts.

Servers are started as child processes on loopback ports and stopped at
the end.  Numbers move with the machine's load; CPU figures are steadier.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cloud.engine.config import EngineConfig, tenant_networks
from cloud.engine.job import MicroBatchProcessor, build_outputs, tune_gc
from cloud.engine.sinks import MemorySink
from cloud.engine.store import SqliteStore
from cloud.engine.transform import decode_records
from cloud.scoring_client import ScoreResult
from edge_agent.aggregate.schema import AGG_DTYPE
from edge_agent.flows.schema import ipv4_to_mapped
from edge_agent.wire import HeaderFields, encode_batches

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = PROJECT_ROOT / "models"
DEFAULT_MODEL = "cloud-ctu13s6-r100-w300"
TENANT = "bench"
_READY_TIMEOUT_S = 90.0


class BenchError(RuntimeError):
    """A server did not come up, or the engine failed during a run."""


@dataclass
class Rate:
    """Rows through one stage, with the time and CPU it took."""

    name: str
    rows: int
    wall_s: float
    cpu_s: float
    note: str = ""

    @property
    def per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def per_cpu_s(self) -> float:
        return self.rows / self.cpu_s if self.cpu_s > 0 else float("nan")


@dataclass
class BenchReport:
    """Everything :func:`run_benchmark` measured."""

    rows: int
    records: int
    rates: list[Rate] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)
    trigger_ms: list[float] = field(default_factory=list)
    overhead_cpu_s: list[float] = field(default_factory=list)  # per micro-batch
    latency_s: list[float] = field(default_factory=list)


# -- data ---------------------------------------------------------------------


def synthetic_rows(n: int, seed: int = 7, span_s: int = 1800) -> np.ndarray:
    """``n`` relay rows (AGG_DTYPE), 1:100, sorted by ``time_end``."""
    rng = np.random.default_rng(seed)
    rows = np.zeros(n, dtype=AGG_DTYPE)
    internal = (10 << 24) + rng.integers(0, 2000, size=n)
    external = (100 << 24) + rng.integers(0, 20_000, size=n)
    outbound = rng.random(n) < 0.6
    src = np.where(outbound, internal, external).astype(">u4")
    dst = np.where(outbound, external, internal).astype(">u4")
    rows["src_addr"] = ipv4_to_mapped(src)
    rows["dst_addr"] = ipv4_to_mapped(dst)
    rows["exporter"] = ipv4_to_mapped(
        ((192 << 24) + (2 << 8) + rng.integers(1, 5, size=n)).astype(">u4")
    )
    rows["protocol"] = np.where(rng.random(n) < 0.8, 6, 17)
    ports = np.array([80, 443, 53, 25, 22, 123, 8080, 3389, 445, 6667])
    rows["dst_port"] = np.where(
        rng.random(n) < 0.8,
        ports[rng.integers(0, ports.size, n)],
        rng.integers(1024, 65535, n),
    )
    rows["src_port"] = rng.integers(1024, 65535, size=n)
    rows["tcp_flags"] = np.where(
        rows["protocol"] == 6, rng.choice([0x02, 0x12, 0x18, 0x11, 0x04], n), 0
    )
    rows["packets"] = rng.integers(1, 6, size=n)
    rows["bytes"] = rows["packets"] * rng.integers(40, 1500, size=n)
    rows["sampling_rate"] = 100
    rows["flow_count"] = 1
    base = 1_699_999_200_000
    rows["time_start"] = base + np.sort(rng.integers(0, span_s * 1000, size=n))
    rows["time_end"] = rows["time_start"] + rng.integers(0, 30_000, size=n)
    return rows[np.argsort(rows["time_end"], kind="stable")]


def relay_batches(rows: np.ndarray, window_ms: int = 10_000) -> list[bytes]:
    """10 s relay batches (one per window), in time order."""
    seqs = itertools.count()
    window = rows["time_end"] // window_ms * window_ms
    out: list[bytes] = []
    for w in np.unique(window).tolist():
        part = rows[window == w]
        for batch in encode_batches(
            part, HeaderFields(TENANT, "relay-b", w, w + window_ms), seqs.__next__, "b"
        ):
            out.append(batch.data)
    return out


# -- helpers --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _proc_cpu_s(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    # utime, stime and those of children already reaped (Spark's Python
    # workers and source runner come and go under the JVM).
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(root: int, exclude: set[int]) -> float:
    """CPU seconds of ``root`` and its descendants, less ``exclude``'s trees."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(stat[1])
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        if pid in exclude:
            continue
        total += _proc_cpu_s(pid)
        stack.extend(c for c, p in parents.items() if p == pid)
    return total


@dataclass
class _Server:
    """A child server process in its own process group."""

    name: str
    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(15)


def _start(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    url: str,
    ready: Callable[[], bool],
    workdir: Path,
) -> _Server:
    log_file = (workdir / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        cwd=workdir,
        start_new_session=True,
    )
    server = _Server(name, proc, url)
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}; see {workdir}")
        with contextlib.suppress(Exception):
            if ready():
                return server
        time.sleep(0.2)
    server.stop()
    raise BenchError(f"{name} not ready within {_READY_TIMEOUT_S}s; see {workdir}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1.0) as resp:
        return bool(resp.status == 200)


def start_model_service(workdir: Path) -> _Server:
    """The model service with the shipped models on a free port."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable,
        "-m",
        "edge_agent.cli",
        "model-service",
        "run",
        "--port",
        str(port),
        "--models-dir",
        str(MODELS_DIR),
    ]
    return _start(
        "model-service",
        argv,
        env={},
        url=url,
        ready=lambda: _http_ok(url + "/readyz"),
        workdir=workdir,
    )


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def start_ministack(workdir: Path) -> _Server:
    """MiniStack (Kinesis, DynamoDB, CloudWatch) on a free loopback port."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **AWS_ENV,
        "GATEWAY_PORT": str(port),
        "BIND_HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "TMPDIR": str(workdir),
        "PERSIST_STATE": "0",
        "STATE_DIR": str(workdir / "ministack-state"),
        "S3_DATA_DIR": str(workdir / "ministack-s3"),
    }
    argv = [sys.executable, "-m", "ministack"]
    return _start(
        "ministack",
        argv,
        env=env,
        url=url,
        ready=lambda: _http_ok(url + "/_ministack/health"),
        workdir=workdir,
    )


def start_store(workdir: Path) -> _Server:
    """SecantusDB (the MongoDB-wire store) on a free loopback port."""
    import pymongo  # noqa: PLC0415

    port = _free_port()
    uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    argv = [
        sys.executable,
        "-m",
        "secantus",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--storage-path",
        str(workdir / "secantus"),
        "--standalone",
        "--log-level",
        "WARNING",
    ]

    def ready() -> bool:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=500
        )
        try:
            client.admin.command("ping")
            return True
        finally:
            client.close()

    return _start("store", argv, env={}, url=uri, ready=ready, workdir=workdir)


class InProcessScorer:
    """The model service's scoring code called directly (no HTTP)."""

    def __init__(self) -> None:
        from cloud.model_service.registry import (  # noqa: PLC0415
            DirectorySource,
            ModelRegistry,
        )

        self.registry = ModelRegistry(DirectorySource(MODELS_DIR), DEFAULT_MODEL)
        self.registry.refresh()

    def score(
        self,
        tenant: str,
        rows: np.ndarray,
        hosts: Sequence[str] | None = None,
        window_starts_ms: np.ndarray | None = None,
    ) -> ScoreResult:
        from cloud.model_service.scoring import class_names, score_rows  # noqa: PLC0415

        model = self.registry.resolve(tenant)
        s = score_rows(model, np.asarray(rows, dtype=np.float64))
        th = model.thresholds
        return ScoreResult(
            scores=s.scores,
            alert=s.alert,
            classes=class_names(s.classes),
            losses=s.z,
            loss_names=(*model.scaler.names, "total"),
            model_versions=[model.version] * len(s.scores),
            thresholds={model.version: {"alert": th.alert, "clear": th.clear}},
        )


# -- 1. in-process --------------------------------------------------------------


def _source_rows(datas: list[bytes]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "shard_id": ["shardId-000000000000"] * len(datas),
            "sequence_number": [str(i + 1) for i in range(len(datas))],
            "data": datas,
        }
    )


def in_process(
    rows: np.ndarray, datas: list[bytes], workdir: Path, service_url: str | None
) -> list[Rate]:
    """Decode alone, then the driver's whole work (decode included) per
    micro-batch of about 200,000 flow rows."""
    out: list[Rate] = []
    config = EngineConfig(
        stream_name="bench",
        checkpoint_dir=str(workdir / f"inproc-{uuid.uuid4().hex[:6]}"),
        tenant_networks=tenant_networks({TENANT: ("10.0.0.0/8",)}),
        model_service_url=service_url or "http://127.0.0.1:9",
        score_retry_s=0.0,
    )
    source = _source_rows(datas)
    t0, c0 = time.perf_counter(), time.process_time()
    decode_records(source)
    out.append(
        Rate(
            "decode (wire format)",
            len(rows),
            time.perf_counter() - t0,
            time.process_time() - c0,
        )
    )
    store = SqliteStore(config.resolved_state_path)
    outputs = build_outputs(config, store, MemorySink(), _QuietPublisher())
    scorer = outputs.scorer
    assert scorer is not None
    if service_url is None:
        scorer.client = InProcessScorer()
    processor = MicroBatchProcessor(
        config, store, outputs.sink, outputs.publisher, scorer=scorer
    )
    per_mb = max(1, round(len(datas) * 200_000 / max(len(rows), 1)))
    tune_gc()  # as start_engine does
    t0, c0 = time.perf_counter(), time.process_time()
    srv0 = _server_cpu(service_url)
    for i, lo in enumerate(range(0, len(datas), per_mb)):
        processor.process_records(source.slice(lo, per_mb), i)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    srv = _server_cpu(service_url) - srv0
    scored = processor.scorer.counters.scored if processor.scorer else 0
    mode = "model in-process" if service_url is None else "model over HTTP"
    note = f"{scored} host windows scored"
    if service_url is not None:
        note += f"; model service CPU {srv:.2f} s"
    out.append(Rate(f"driver, {mode}", len(rows), wall, cpu, note))
    for close in outputs.closers:
        close()
    store.close()
    return out


_SERVICE_PIDS: dict[str, int] = {}


def _server_cpu(url: str | None) -> float:
    return _proc_cpu_s(_SERVICE_PIDS[url]) if url in _SERVICE_PIDS else 0.0


class _QuietPublisher:
    def publish_batch(self, micro_batch: int, values: Any) -> None:
        pass

    def publish_lag(self, millis_behind_latest: Any) -> None:
        pass


class _CpuSampler(_QuietPublisher):
    """A publisher noting the CPU of the engine's processes (driver, JVM,
    Python workers, model service) at the end of every micro-batch."""

    def __init__(self, root: int, exclude: set[int]) -> None:
        self.root = root
        self.exclude = exclude
        self.samples: list[tuple[int, float]] = []

    def cpu(self) -> float:
        return _tree_cpu_s(self.root, self.exclude)

    def publish_batch(self, micro_batch: int, values: Any) -> None:
        self.samples.append((micro_batch, self.cpu()))


# -- 2-4. Spark -------------------------------------------------------------------


def _kinesis(endpoint: str) -> Any:
    import boto3  # noqa: PLC0415

    return boto3.session.Session(
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    ).client("kinesis", endpoint_url=endpoint)


def _stream(client: Any, shards: int = 1) -> str:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    client.create_stream(StreamName=name, ShardCount=shards)
    deadline = time.monotonic() + 30
    while (
        client.describe_stream(StreamName=name)["StreamDescription"]["StreamStatus"]
        != "ACTIVE"
    ):
        if time.monotonic() > deadline:
            raise BenchError("stream did not become ACTIVE")
        time.sleep(0.05)
    return name


def _put(client: Any, stream: str, datas: list[bytes]) -> None:
    """PutRecords in calls under its 500-record and 5 MB limits."""
    chunk: list[dict[str, Any]] = []
    size = 0
    for i, d in enumerate(datas):
        if chunk and (len(chunk) == 500 or size + len(d) > 4_000_000):
            client.put_records(StreamName=stream, Records=chunk)
            chunk, size = [], 0
        chunk.append({"Data": d, "PartitionKey": f"b{i % 2}"})
        size += len(d) + 2
    if chunk:
        client.put_records(StreamName=stream, Records=chunk)


@contextlib.contextmanager
def _aws_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class _Servers:
    ministack: _Server
    store: _Server
    service: _Server


def spark_runs(
    rows: np.ndarray,
    datas: list[bytes],
    workdir: Path,
    servers: _Servers,
    *,
    latency_batches: int,
    report: BenchReport,
) -> None:
    """Measurements 2, 3 and 4 (see the module doc)."""
    ministack, store, service = servers.ministack, servers.store, servers.service
    from cloud.engine.job import start_engine  # noqa: PLC0415
    from cloud.engine.spark import build_spark_session  # noqa: PLC0415

    spark = build_spark_session(master="local[2]", shuffle_partitions=2)
    spark.sparkContext.setLogLevel("ERROR")
    kinesis = _kinesis(ministack.url)
    common: dict[str, Any] = {
        "endpoint_url": ministack.url,
        "region": "us-east-1",
        "master": None,
        "model_service_url": service.url,
        "tenant_networks": tenant_networks({TENANT: ("10.0.0.0/8",)}),
        "score_retry_s": 0.0,
    }
    # The servers standing in for AWS are not the engine; the model
    # service is (its CPU is counted).
    exclude = {ministack.process.pid, store.process.pid}

    # 2. Throughput.  A first full run warms the JVM (its JIT compiles the
    # Arrow and pickle paths for some seconds) and the Python workers.
    warm = _stream(kinesis, shards=2)
    _put(kinesis, warm, datas)
    # About 200,000 flow rows a micro-batch (2 s at the target rate); the
    # source gave each of the two shards about half of the record limit
    # and read one shard per round, hence twice the records.
    per_batch = max(2, round(2 * len(datas) * 200_000 / max(len(rows), 1)))
    _run_available_now(
        start_engine,
        spark,
        EngineConfig(
            warm, str(workdir / "warm"), max_records_per_batch=per_batch, **common
        ),
    )
    stream = _stream(kinesis, shards=2)
    _put(kinesis, stream, datas)
    config = EngineConfig(
        stream, str(workdir / "throughput"), max_records_per_batch=per_batch, **common
    )
    sampler = _CpuSampler(os.getpid(), exclude)
    cpu0 = sampler.cpu()
    engine = _run_available_now(start_engine, spark, config, publisher=sampler)
    cpu = sampler.cpu() - cpu0
    busy = sum(r.total_ms for r in engine.processor.reports) / 1000
    flows = engine.processor.counters.flows
    n_mb = len(engine.processor.reports)
    note = f"{n_mb} micro-batches of <= {per_batch} records, 2 shards"
    report.rates.append(
        Rate(
            "Spark local[2], HTTP: whole query",
            flows,
            busy,
            cpu,
            note + "; query start and stop included",
        )
    )
    if len(sampler.samples) >= 2:
        (_, c_first), (_, c_last) = sampler.samples[0], sampler.samples[-1]
        later = engine.processor.reports[1:]
        report.rates.append(
            Rate(
                "Spark local[2], HTTP: running",
                sum(r.flows for r in later),
                sum(r.total_ms for r in later) / 1000,
                c_last - c_first,
                f"micro-batches 2-{n_mb}: from the end of the first to the end "
                "of the last",
            )
        )

    # 3. Micro-batch overhead: one one-row record per micro-batch.
    tiny = _stream(kinesis)
    _put(kinesis, tiny, relay_batches(rows[:10], window_ms=1)[:10])
    config = EngineConfig(
        tiny, str(workdir / "tiny"), max_records_per_batch=1, **common
    )
    sampler = _CpuSampler(os.getpid(), exclude)
    engine = _run_available_now(start_engine, spark, config, publisher=sampler)
    report.overhead_ms = [r.total_ms for r in engine.processor.reports]
    report.overhead_cpu_s = [
        b - a
        for (_, a), (_, b) in zip(sampler.samples, sampler.samples[1:], strict=False)
    ]
    report.trigger_ms = [
        float(_field(p, "durationMs")["triggerExecution"])
        for p in engine.query.recentProgress
        if _field(p, "numInputRows")
    ]

    # 4. Latency from put to detection, 2 s trigger.
    live = _stream(kinesis)
    database = f"bench_{uuid.uuid4().hex[:6]}"
    config = EngineConfig(
        live,
        str(workdir / "live"),
        trigger_interval_s=2.0,
        window_s=2,
        slide_s=2,
        feature_window_s=2,
        feature_slide_s=2,
        lateness_s=0,
        starting_position="TRIM_HORIZON",
        mongo_uri=store.url,
        mongo_database=database,
        detections="all",
        **common,
    )
    engine = start_engine(config, spark=spark)
    puts: list[tuple[float, int]] = []  # (wall time of put, max time_end)
    try:
        template = rows[:50].copy()
        seqs = itertools.count()
        for _ in range(latency_batches + 3):
            now_ms = int(time.time() * 1000)
            part = template.copy()
            part["time_start"] = now_ms - 200
            part["time_end"] = now_ms
            (batch,) = encode_batches(
                part,
                HeaderFields(TENANT, "relay-l", now_ms - 1000, now_ms + 1),
                seqs.__next__,
                "l",
            )
            kinesis.put_record(StreamName=live, Data=batch.data, PartitionKey="l")
            puts.append((time.time(), now_ms))
            time.sleep(1.0)
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and engine.processor.reports
            and not engine.processor.idle.is_set()
        ):
            time.sleep(0.1)
        time.sleep(4.0)  # the last trigger
    finally:
        engine.close()
    report.latency_s = _latencies(store.url, database, puts, 2000)
    spark.stop()


def _latencies(
    uri: str, database: str, puts: list[tuple[float, int]], window_ms: int
) -> list[float]:
    from cloud.store.detections import open_client  # noqa: PLC0415

    client = open_client(uri)
    try:
        first: dict[int, float] = {}
        for d in client[database]["detections"].find(
            {}, {"window_start_ms": 1, "detected_at": 1}
        ):
            t = d["detected_at"].timestamp()
            w = int(d["window_start_ms"])
            first[w] = min(t, first.get(w, t))
    finally:
        client.close()
    out = []
    for w, detected in sorted(first.items()):
        closing = [t for t, end in puts if end >= w + window_ms]
        if closing:
            out.append(detected - closing[0])
    return out


def _field(progress: Any, name: str) -> Any:
    """A progress field (dicts before Spark 4, objects since)."""
    if isinstance(progress, dict):
        return progress[name]
    return getattr(progress, name)


def _run_available_now(
    start_engine: Any, spark: Any, config: EngineConfig, publisher: Any = None
) -> Any:
    engine = start_engine(config, spark=spark, available_now=True, publisher=publisher)
    engine.query.awaitTermination(timeout=1800)
    error = engine.query.exception()
    engine.close()
    if error is not None:
        raise BenchError(f"engine failed: {error}")
    return engine


# -- entry ------------------------------------------------------------------------


def run_benchmark(
    rows: int = 200_000,
    latency_batches: int = 20,
    spark: bool = True,
    workdir: Path | None = None,
) -> BenchReport:
    """Run the measurements (see the module doc) and return their figures."""
    scratch = Path(tempfile.mkdtemp(prefix="sampleflow-bench-engine-", dir=workdir))
    data = synthetic_rows(rows)
    datas = relay_batches(data)
    report = BenchReport(rows=rows, records=len(datas))
    servers: list[_Server] = []
    try:
        report.rates += in_process(data, datas, scratch, None)
        service = start_model_service(scratch)
        servers.append(service)
        _SERVICE_PIDS[service.url] = service.process.pid
        report.rates += in_process(data, datas, scratch, service.url)[1:]
        if spark:
            with _aws_env():
                ministack = start_ministack(scratch)
                servers.append(ministack)
                store = start_store(scratch)
                servers.append(store)
                spark_runs(
                    data,
                    datas,
                    scratch,
                    _Servers(ministack, store, service),
                    latency_batches=latency_batches,
                    report=report,
                )
    finally:
        for s in reversed(servers):
            s.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def print_report(report: BenchReport) -> None:
    """The figures as a small table."""
    print(
        f"engine bench: {report.rows:,} flow rows in {report.records:,} "
        "relay batches (1:100)"
    )
    print(f"{'stage':<34} {'rows/s':>12} {'rows/CPU-s':>12}  note")
    for r in report.rates:
        print(f"{r.name:<34} {r.per_s:>12,.0f} {r.per_cpu_s:>12,.0f}  {r.note}")
    if report.overhead_ms:
        print(
            f"micro-batch overhead (1 one-row record): foreachBatch median "
            f"{_pct(report.overhead_ms, 50):.0f} ms, trigger median "
            f"{_pct(report.trigger_ms, 50):.0f} ms, CPU median "
            f"{_pct(report.overhead_cpu_s, 50):.2f} s a micro-batch (all processes)"
        )
    if report.latency_s:
        print(
            f"put -> detection in store, 2 s trigger ({len(report.latency_s)} "
            f"windows): median {_pct(report.latency_s, 50):.2f} s, "
            f"p95 {_pct(report.latency_s, 95):.2f} s"
        )
