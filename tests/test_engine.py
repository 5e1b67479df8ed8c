"""The cloud engine: estimator math, the store, and the streaming job.

The estimator tests compare with sums worked out by hand in each test (and
with a binomial simulation); the job tests put real relay batches
(encoded by the relay's own encoder) on a MiniStack stream, run the query,
and compare the estimates with the same hand formulas applied to the
rows that were sent.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from cloud.engine.config import ConfigError, EngineConfig
from cloud.engine.estimates import (
    byte_interval,
    packet_interval,
    row_statistics,
    sum_statistics,
    z_for,
)
from cloud.engine.job import MicroBatchProcessor, start_engine
from cloud.engine.metrics import LogPublisher
from cloud.engine.sinks import MemorySink, WindowEstimate
from cloud.engine.spark import build_spark_session, local_worker_python
from cloud.engine.store import BatchClaim, SqliteStore, WindowPartial
from cloud.engine.transform import flows_partition
from cloud.engine.windows import assign_windows, sum_by_window
from edge_agent.aggregate.schema import AGG_DTYPE
from edge_agent.wire import HeaderFields, encode_batches
from tests.servers import MiniStack, kinesis_client

#: The two-sided 95% normal quantile, from a published table.
Z95 = 1.959963984540054

# -- estimator math -------------------------------------------------------------


def _stats(packets: list[int], bytes_: list[int], rates: list[int]) -> Any:
    rows = row_statistics(np.array(packets), np.array(bytes_), np.array(rates))
    return sum_statistics(rows, np.zeros(len(packets), dtype=np.int64), 1)


def test_local_worker_python_drops_sparks_zipped_pyspark_only() -> None:
    """The local-mode worker interpreter leaves Spark's pyspark.zip and py4j
    zip off PYTHONPATH, keeps every other entry in order, and imports the
    installed pyspark."""
    import pyspark  # noqa: PLC0415

    script = local_worker_python()
    assert script != sys.executable  # this venv's pip-installed pyspark
    lib = Path(pyspark.__file__).resolve().parent / "python" / "lib"
    path = f"/a b:{lib}/pyspark.zip:/c*:{lib}/py4j-0.10.9.9-src.zip:/d"
    out = subprocess.run(
        [
            script,
            "-c",
            "import os, pyspark; print(os.environ['PYTHONPATH']); "
            "print(pyspark.__file__)",
        ],
        env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    assert out[0] == "/a b:/c*:/d"
    assert Path(out[1]).resolve() == Path(pyspark.__file__).resolve()


def test_z_matches_the_normal_table() -> None:
    """z for 95% and 99% confidence are the tabulated quantiles."""
    assert z_for(0.95) == pytest.approx(Z95, rel=1e-12)
    assert z_for(0.99) == pytest.approx(2.5758293035489, rel=1e-12)
    with pytest.raises(ValueError, match="confidence"):
        z_for(1.0)


def test_packets_scale_by_rate_with_binomial_variance() -> None:
    """10 sampled packets at 1 in 100: 1000 packets, Var = 10·100·99."""
    pk = packet_interval(_stats([10], [15_000], [100]), Z95)
    half = Z95 * math.sqrt(10 * 100 * 99)  # 1.96 × 314.64
    assert pk.estimate[0] == 1000.0
    assert pk.low[0] == pytest.approx(1000.0 - half)
    assert pk.high[0] == pytest.approx(1000.0 + half)
    assert half == pytest.approx(616.69, abs=0.01)


def test_bytes_use_the_mean_packet_size_per_row() -> None:
    """15000 sampled bytes in 10 packets at 1 in 100: 1.5 MB, Var =
    (15000²/10)·100·99 (every packet taken as 1500 bytes)."""
    by = byte_interval(_stats([10], [15_000], [100]), Z95)
    var = (15_000**2 / 10) * 100 * 99  # 2.2275e11
    assert by.estimate[0] == 1_500_000.0
    assert by.high[0] == pytest.approx(1_500_000.0 + Z95 * math.sqrt(var))
    assert math.sqrt(var) == pytest.approx(471_963.98, abs=0.01)


def test_rows_with_different_rates_add_up() -> None:
    """Rows at 1:10, 1:1000 and unsampled add estimates and variances."""
    stats = _stats([4, 2, 7], [400, 3000, 700], [10, 1000, 1])
    assert stats["est_packets"][0] == 4 * 10 + 2 * 1000 + 7
    assert stats["var_packets"][0] == 4 * 10 * 9 + 2 * 1000 * 999 + 0
    assert stats["est_bytes"][0] == 400 * 10 + 3000 * 1000 + 700
    expected_var_bytes = (400**2 / 4) * 10 * 9 + (3000**2 / 2) * 1000 * 999
    assert stats["var_bytes"][0] == pytest.approx(expected_var_bytes)
    assert stats["sampled_packets"][0] == 13


def test_unsampled_rows_are_exact() -> None:
    """At 1 in 1 the interval is the count itself."""
    pk = packet_interval(_stats([123], [4567], [1]), Z95)
    assert (pk.estimate[0], pk.low[0], pk.high[0]) == (123.0, 123.0, 123.0)


def test_unknown_rate_rows_are_left_out_and_counted() -> None:
    """Rate 0 rows do not enter the estimate; they are counted aside."""
    stats = _stats([5, 3], [500, 300], [0, 10])
    assert stats["est_packets"][0] == 30.0
    assert stats["sampled_packets"][0] == 3.0
    assert stats["unknown_rate_rows"][0] == 1.0
    assert stats["unknown_rate_packets"][0] == 5.0
    assert stats["unknown_rate_bytes"][0] == 500.0


def test_low_end_never_below_the_sampled_count() -> None:
    """One packet at 1 in 1000: 1000 ± 1959, but at least 1 packet exists."""
    pk = packet_interval(_stats([1], [60], [1000]), Z95)
    assert pk.estimate[0] == 1000.0
    assert pk.low[0] == 1.0
    assert pk.high[0] == pytest.approx(1000 + Z95 * math.sqrt(1000 * 999))


def test_groups_sum_separately() -> None:
    """sum_statistics keeps groups apart."""
    rows = row_statistics(
        np.array([1, 2, 3]), np.array([10, 20, 30]), np.array([2, 2, 2])
    )
    sums = sum_statistics(rows, np.array([0, 1, 0]), 2)
    assert list(sums["est_packets"]) == [8.0, 4.0]


def test_packet_intervals_cover_the_truth_as_often_as_claimed() -> None:
    """Binomially sampling 5000 packets at 1 in 100, 2000 times: about 95%
    of the 95% intervals hold 5000 (normal approximation: 93-97%)."""
    rng = np.random.default_rng(20260101)
    true_total, rate, trials = 5000, 100, 2000
    sampled = rng.binomial(true_total, 1.0 / rate, size=trials)
    rows = row_statistics(sampled, sampled * 100, np.full(trials, rate))
    pk = packet_interval(rows, Z95)
    covered = np.mean((pk.low <= true_total) & (true_total <= pk.high))
    assert 0.93 <= covered <= 0.97


def test_row_statistics_refuses_mismatched_shapes() -> None:
    """Arrays of different lengths are an error naming the shapes."""
    with pytest.raises(ValueError, match="shape"):
        row_statistics(np.zeros(2), np.zeros(3), np.zeros(2))


# -- windows and decoding ------------------------------------------------------


def test_rows_fall_in_every_window_holding_their_time() -> None:
    """60 s windows every 30 s: [start, start + 60 s) with start a multiple
    of 30 s, worked out by hand for edge times and a time before 1970."""
    times = np.array([45_000, 30_000, 59_999, 60_000, -1])
    row, start = assign_windows(times, 60_000, 30_000)
    got = sorted(zip(row.tolist(), start.tolist(), strict=True))
    assert got == [
        (0, 0),
        (0, 30_000),
        (1, 0),
        (1, 30_000),
        (2, 0),
        (2, 30_000),
        (3, 30_000),
        (3, 60_000),
        (4, -60_000),
        (4, -30_000),
    ]
    tumbling_row, tumbling = assign_windows(times, 60_000, 60_000)
    assert sorted(zip(tumbling_row.tolist(), tumbling.tolist(), strict=True)) == [
        (0, 0),
        (1, 0),
        (2, 0),
        (3, 60_000),
        (4, -60_000),
    ]


def test_window_sums_and_latest_time() -> None:
    """Values add per window; each window keeps its latest row time."""
    starts, latest, sums = sum_by_window(
        np.array([1_000, 2_000, 61_000]),
        {"x": np.array([1.0, 2.0, 4.0])},
        60_000,
        60_000,
    )
    assert starts.tolist() == [0, 60_000]
    assert latest.tolist() == [2_000, 61_000]
    assert sums["x"].tolist() == [3.0, 4.0]


def test_flows_of_accepted_records_only() -> None:
    """flows_partition yields the flows of accepted records with the values
    that were encoded, and skips the others."""
    base = 1_699_999_200_000
    kept = _rows([3, 4], [300, 400], [10, 10], [base, base + 1])
    other = _rows([9], [900], [10], [base])
    seqs = itertools.count()
    source = pa.RecordBatch.from_pydict(
        {
            "shard_id": ["shardId-0", "shardId-0"],
            "sequence_number": ["1", "2"],
            "data": [_encode("t", kept, seqs), _encode("t", other, seqs)],
        }
    )
    out = list(flows_partition(iter([source]), frozenset({("shardId-0", "1")})))
    table = pa.Table.from_batches(out)
    assert table.column("packets").to_pylist() == [3, 4]
    assert table.column("src_port").to_pylist() == [1000, 1001]
    assert table.column("tenant_id").to_pylist() == ["t", "t"]
    assert table.column("src_addr").to_pylist() == [bytes(16), bytes(16)]


# -- config and store ---------------------------------------------------------


def test_config_errors_name_the_setting(tmp_path: Path) -> None:
    """Bad settings are refused with the setting's name."""
    with pytest.raises(ConfigError, match="slide_s"):
        EngineConfig("s", str(tmp_path), window_s=10, slide_s=20)
    with pytest.raises(ConfigError, match="starting_position"):
        EngineConfig("s", str(tmp_path), starting_position="EARLIEST")
    with pytest.raises(ConfigError, match="state_path"):
        EngineConfig("s", "s3://bucket/checkpoint")


def _claim(batch_id: str, seq: str) -> BatchClaim:
    return BatchClaim(batch_id, "t", "r", 0, "shardId-0", seq)


def test_ledger_gives_a_batch_to_its_first_micro_batch(tmp_path: Path) -> None:
    """A batch id belongs to the first micro-batch that claims it; a replay
    of that micro-batch gets it again, a later one does not."""
    store = SqliteStore(tmp_path / "state.sqlite")
    assert store.claim_batches(0, [_claim("a", "1"), _claim("b", "2")]) == {"a", "b"}
    assert store.claim_batches(1, [_claim("b", "9"), _claim("c", "10")]) == {"c"}
    assert store.claim_batches(0, [_claim("a", "1"), _claim("b", "2")]) == {"a", "b"}
    store.close()
    reopened = SqliteStore(tmp_path / "state.sqlite")
    assert reopened.claim_batches(2, [_claim("a", "1")]) == set()


def _partial(start: int, packets: float, max_time: int) -> WindowPartial:
    stats = dict.fromkeys(
        (
            "rows",
            "sampled_packets",
            "sampled_bytes",
            "est_packets",
            "var_packets",
            "est_bytes",
            "var_bytes",
            "unknown_rate_rows",
            "unknown_rate_packets",
            "unknown_rate_bytes",
        ),
        0.0,
    )
    stats["est_packets"] = packets
    return WindowPartial("t", start, start + 60_000, max_time, 1, stats)


def test_window_partials_are_idempotent_and_close_behind_the_watermark(
    tmp_path: Path,
) -> None:
    """Rewriting a micro-batch's partial does not double it; once closed,
    a window refuses partials from later micro-batches."""
    store = SqliteStore(tmp_path / "state.sqlite")
    assert store.add_partials(0, [_partial(0, 10.0, 5_000)]) == []
    assert store.add_partials(0, [_partial(0, 10.0, 5_000)]) == []
    assert store.add_partials(1, [_partial(0, 5.0, 6_000)]) == []
    (totals,) = store.window_totals([("t", 0)])
    assert totals.stats["est_packets"] == 15.0 and not totals.closed
    assert store.advance_watermarks(10_000, {"t": 65_000}) == []
    assert store.advance_watermarks(10_000, {"t": 70_000}) == [("t", 0)]
    late = _partial(0, 99.0, 7_000)
    assert store.add_partials(2, [late]) == [late]
    # A replay of micro-batch 1 may rewrite what it already stored.
    assert store.add_partials(1, [_partial(0, 5.0, 6_000)]) == []
    (totals,) = store.window_totals([("t", 0)])
    assert totals.stats["est_packets"] == 15.0 and totals.closed


# -- the streaming job ------------------------------------------------------------


@pytest.fixture(scope="module")
def spark(ministack: MiniStack) -> Any:
    """A local Spark session started after MiniStack set dummy credentials
    (Spark's Python workers inherit the JVM's environment)."""
    session = build_spark_session(master="local[2]", shuffle_partitions=2)
    session.sparkContext.setLogLevel("ERROR")
    return session


def _rows(
    packets: list[int], bytes_: list[int], rates: list[int], time_end_ms: list[int]
) -> np.ndarray:
    rows = np.zeros(len(packets), dtype=AGG_DTYPE)
    rows["packets"] = packets
    rows["bytes"] = bytes_
    rows["sampling_rate"] = rates
    rows["time_start"] = np.array(time_end_ms) - 500
    rows["time_end"] = time_end_ms
    rows["flow_count"] = 1
    rows["src_port"] = np.arange(len(packets)) + 1000
    return rows


def _encode(tenant: str, rows: np.ndarray, seqs: Any) -> bytes:
    (batch,) = encode_batches(
        rows, HeaderFields(tenant, f"relay-{tenant}", 0, 60_000), seqs.__next__, tenant
    )
    return batch.data


def _put(client: Any, stream: str, datas: list[bytes]) -> list[tuple[str, str]]:
    answer = client.put_records(
        StreamName=stream,
        Records=[{"Data": d, "PartitionKey": f"k{i}"} for i, d in enumerate(datas)],
    )
    assert answer["FailedRecordCount"] == 0
    return [(r["ShardId"], r["SequenceNumber"]) for r in answer["Records"]]


def _new_stream(client: Any) -> str:
    name = f"engine-{uuid.uuid4().hex[:10]}"
    client.create_stream(StreamName=name, ShardCount=2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = client.describe_stream(StreamName=name)["StreamDescription"]
        if status["StreamStatus"] == "ACTIVE":
            return name
        time.sleep(0.05)
    raise RuntimeError(f"stream {name} did not become ACTIVE")


def _run(
    spark: Any, config: EngineConfig, sink: MemorySink, consumers: Any = ()
) -> Any:
    """Run the engine with Trigger.AvailableNow until it has read the stream."""
    engine = start_engine(
        config,
        spark=spark,
        sink=sink,
        publisher=LogPublisher(),
        flow_consumers=consumers,
        available_now=True,
    )
    engine.query.awaitTermination(timeout=300)
    assert not engine.query.isActive
    assert engine.query.exception() is None
    engine.close()
    return engine


def _expected(rows: list[np.ndarray]) -> dict[str, float]:
    """The hand formulas of the estimator, applied to plain Python ints."""
    est_p = var_p = est_b = var_b = 0.0
    for part in rows:
        for n, b, rate in zip(
            part["packets"].tolist(),
            part["bytes"].tolist(),
            part["sampling_rate"].tolist(),
            strict=True,
        ):
            est_p += n * rate
            var_p += n * rate * (rate - 1)
            est_b += b * rate
            var_b += (b * b / n) * rate * (rate - 1)
    return {
        "packets": est_p,
        "packets_high": est_p + Z95 * math.sqrt(var_p),
        "bytes": est_b,
        "bytes_high": est_b + Z95 * math.sqrt(var_b),
    }


def _check(estimate: WindowEstimate, rows: list[np.ndarray]) -> None:
    want = _expected(rows)
    assert estimate.packets == pytest.approx(want["packets"])
    assert estimate.packets_high == pytest.approx(want["packets_high"])
    assert estimate.bytes == pytest.approx(want["bytes"])
    assert estimate.bytes_high == pytest.approx(want["bytes_high"])


@pytest.mark.integration
def test_engine_estimates_dedups_and_sets_invalid_records_aside(
    spark: Any, ministack: MiniStack, tmp_path: Path
) -> None:
    """Per tenant and window the engine scales sampled counts by the rate
    with the documented interval; a batch delivered twice (in one
    micro-batch and again later) counts once; undecodable records are set
    aside with their shard and sequence number; a replayed micro-batch
    does not count twice."""
    client = kinesis_client(ministack.endpoint_url)
    stream = _new_stream(client)
    seqs = itertools.count()
    base = 1_699_999_200_000  # a minute boundary (ms)
    a1 = _rows([10, 3], [15_000, 180], [100, 1000], [base + 1_000, base + 59_000])
    a2 = _rows([7], [700], [10], [base + 61_000])  # next minute
    b1 = _rows([2, 5, 1], [3000, 500, 64], [1, 50, 512], [base + 5_000] * 3)
    a1_data = _encode("tenant-a", a1, seqs)
    datas = [a1_data, _encode("tenant-a", a2, seqs), _encode("tenant-b", b1, seqs)]
    corrupt = b"SFB\x01" + b"\x00" * 40  # right preamble, not a zstd frame
    future = b"SFB\x09" + b"\x00" * 10  # a major version this reader lacks
    placed = _put(client, stream, [*datas, a1_data, corrupt, future, b"hello"])
    config = EngineConfig(
        stream_name=stream,
        checkpoint_dir=str(tmp_path / "checkpoint"),
        endpoint_url=ministack.endpoint_url,
        region="us-east-1",
        window_s=60,
        slide_s=60,
        lateness_s=0,
        master=None,
    )
    sink = MemorySink()
    seen_flows: list[tuple[str, int, int]] = []

    def consume(flows: Any, micro_batch: int) -> None:
        for row in flows.select("tenant_id", "src_port", "packets").collect():
            seen_flows.append((row.tenant_id, row.src_port, row.packets))

    engine = _run(spark, config, sink, [consume])
    c = engine.processor.counters
    # The flow consumer saw each accepted flow once (a1 not twice).
    assert sorted(seen_flows) == [
        ("tenant-a", 1000, 7),
        ("tenant-a", 1000, 10),
        ("tenant-a", 1001, 3),
        ("tenant-b", 1000, 2),
        ("tenant-b", 1001, 5),
        ("tenant-b", 1002, 1),
    ]
    assert c.micro_batches == 1
    assert c.records == 7
    assert c.batches_accepted == 3
    assert (c.duplicates_in_batch, c.duplicates_across) == (1, 0)
    assert c.flows == 6
    assert dict(c.invalid) == {
        "CorruptBatchError": 2,  # the bad frame and b"hello" (bad magic)
        "UnknownVersionError": 1,
    }
    store = SqliteStore(config.resolved_state_path)
    aside = {
        (r.shard_id, r.sequence_number): r.error_kind for r in store.invalid_records()
    }
    store.close()
    assert aside == {
        placed[4]: "CorruptBatchError",
        placed[5]: "UnknownVersionError",
        placed[6]: "CorruptBatchError",
    }
    minute = base // 60_000 * 60_000
    _check(sink.latest[("tenant-a", minute)], [a1])
    _check(sink.latest[("tenant-a", minute + 60_000)], [a2])
    _check(sink.latest[("tenant-b", minute)], [b1])
    assert set(sink.latest) == {
        ("tenant-a", minute),
        ("tenant-a", minute + 60_000),
        ("tenant-b", minute),
    }
    # tenant-a's flows reached second 61, past its first minute (lateness
    # 0): that window is final; its second minute and tenant-b's are open.
    assert sink.latest[("tenant-a", minute)].final
    assert not sink.latest[("tenant-a", minute + 60_000)].final
    assert not sink.latest[("tenant-b", minute)].final
    assert sink.latest[("tenant-a", minute)].flows == 2

    # Crash before the commit: micro-batch 0 runs again after the restart
    # (its records re-read from Kinesis) and must not count twice.
    commits = Path(config.checkpoint_dir) / "commits"
    (commits / "0").unlink()
    (commits / ".0.crc").unlink(missing_ok=True)
    replay_sink = MemorySink()
    replay = _run(spark, config, replay_sink)
    assert replay.processor.counters.batches_accepted == 3
    assert set(replay_sink.latest) == set(sink.latest)
    for key, estimate in sink.latest.items():
        assert replay_sink.latest[key].packets == estimate.packets
        assert replay_sink.latest[key].bytes == estimate.bytes

    # The relay retries a1 once more later: a duplicate across micro-batches.
    _put(client, stream, [a1_data])
    retry_sink = MemorySink()
    retry = _run(spark, config, retry_sink)
    assert retry.processor.counters.duplicates_across == 1
    assert retry.processor.counters.batches_accepted == 0
    assert retry_sink.latest == {}


@pytest.mark.integration
def test_sliding_windows_count_a_row_in_each_window_holding_it(
    spark: Any, ministack: MiniStack, tmp_path: Path
) -> None:
    """With 60 s windows every 30 s, a row at second 45 of a minute is in
    the windows starting at 0 s and 30 s, and only those."""
    client = kinesis_client(ministack.endpoint_url)
    stream = _new_stream(client)
    base = 1_699_999_200_000
    rows = _rows([4], [4000], [100], [base + 45_000])
    _put(client, stream, [_encode("tenant-s", rows, itertools.count())])
    config = EngineConfig(
        stream_name=stream,
        checkpoint_dir=str(tmp_path / "checkpoint"),
        endpoint_url=ministack.endpoint_url,
        region="us-east-1",
        window_s=60,
        slide_s=30,
        master=None,
    )
    sink = MemorySink()
    _run(spark, config, sink)
    minute = base // 60_000 * 60_000
    assert sorted(start - minute for _, start in sink.latest) == [0, 30_000]
    for estimate in sink.latest.values():
        _check(estimate, [rows])


def test_engine_command_is_registered() -> None:
    """`sampleflow engine run --help` lists the engine's settings."""
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "engine", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--stream", "--checkpoint", "--trigger-interval", "--window"):
        assert flag in out


def test_engine_command_refuses_bad_settings(tmp_path: Path) -> None:
    """A bad setting exits 2 with the setting named in the log."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "engine",
            "run",
            "--stream",
            "s",
            "--checkpoint",
            str(tmp_path),
            "--window",
            "10",
            "--slide",
            "20",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "slide_s" in result.stdout + result.stderr


def _records(datas: list[bytes], arrival_ms: list[int], first_seq: int) -> pa.Table:
    """Kinesis records as the source gives them (arrival in µs, UTC)."""
    return pa.table(
        {
            "shard_id": ["shardId-0"] * len(datas),
            "sequence_number": [str(first_seq + i) for i in range(len(datas))],
            "data": datas,
            "approximate_arrival_timestamp": pa.array(
                [a * 1000 for a in arrival_ms], pa.timestamp("us", tz="UTC")
            ),
        }
    )


def test_flows_far_past_their_arrival_are_left_out_and_counted(
    tmp_path: Path,
) -> None:
    """A batch whose flows are stamped in 2096 (an exporter clock running
    ahead) does not move the tenant's watermark: its rows are counted as
    future_flows and left out, and the next minute's flows are not late."""
    base = 1_699_999_200_000
    config = EngineConfig(
        stream_name="s", checkpoint_dir=str(tmp_path / "cp"), lateness_s=120
    )
    store = SqliteStore(config.resolved_state_path)
    processor = MicroBatchProcessor(config, store, MemorySink(), LogPublisher())
    seqs = itertools.count()
    good = _rows([3, 4], [300, 400], [10, 10], [base + 1_000, base + 2_000])
    future = _rows([7, 8, 9], [700, 800, 900], [10, 10, 10], [3_999_999_879_900] * 3)
    first = processor.process_records(
        _records(
            [_encode("t", good, seqs), _encode("t", future, seqs)],
            [base + 30_000, base + 30_000],
            1,
        ),
        0,
    )
    assert first.future_flows == 3
    assert first.flows == 2
    # latest time_end 2,000 ms past base, minus 120 s of lateness
    assert store.watermark("t") == base + 2_000 - 120_000
    later = _rows([5], [500], [10], [base + 70_000])
    second = processor.process_records(
        _records([_encode("t", later, seqs)], [base + 90_000], 3), 1
    )
    assert second.future_flows == 0
    assert second.flows == 1
    assert second.late_partials == 0
    assert store.watermark("t") == base + 70_000 - 120_000
    assert processor.counters.future_flows == 3


def test_max_future_is_validated() -> None:
    """A negative max_future_s is refused with its name."""
    with pytest.raises(ConfigError, match="max_future_s"):
        EngineConfig(stream_name="s", checkpoint_dir="/tmp/x", max_future_s=-1)
