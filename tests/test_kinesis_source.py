"""The Kinesis streaming source: offsets, shard lineage, and real queries.

Integration tests run Spark in local mode against MiniStack (a real server
speaking the Kinesis API over HTTP) and, for resharding, kinesalite (whose
split and merge keep the parent shard readable, as AWS does; MiniStack
drops the parent's records).  Expected records come from the servers'
PutRecords answers, never from the source.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from cloud.engine.kinesis import SCHEMA, lag_from_progress
from cloud.engine.kinesis.offsets import (
    AT_TIMESTAMP,
    OffsetError,
    ShardPosition,
    StreamOffset,
    sequence_key,
)
from cloud.engine.kinesis.shards import (
    ShardInfo,
    forget_expired_shards,
    readable_shards,
    track_new_shards,
)
from cloud.engine.kinesis.source import OptionError, SourceOptions
from cloud.engine.spark import build_spark_session
from tests.servers import MiniStack, free_port, kinesis_client

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KINESALITE = (
    PROJECT_ROOT / ".cache" / "kinesalite" / "node_modules" / ".bin" / "kinesalite"
)

# -- pure logic -------------------------------------------------------------


def test_sequence_numbers_compare_as_integers() -> None:
    """A shorter sequence number is smaller even where string order says not."""
    assert sequence_key("9") < sequence_key("10")
    big = "49680798784058382053440237035864286564019350254284439570"
    assert sequence_key(big) == 49680798784058382053440237035864286564019350254284439570
    with pytest.raises(OffsetError):
        sequence_key("12a")


def test_offset_json_is_canonical_and_round_trips() -> None:
    """Shards are sorted in the JSON, so equal offsets give equal text."""
    a = StreamOffset(
        {
            "shardId-000000000001": ShardPosition(after="42"),
            "shardId-000000000000": ShardPosition(start=AT_TIMESTAMP, ts_ms=1000),
        }
    )
    b = StreamOffset(
        {
            "shardId-000000000000": ShardPosition(start=AT_TIMESTAMP, ts_ms=1000),
            "shardId-000000000001": ShardPosition(after="42"),
        }
    )
    assert a.dumps() == b.dumps()
    assert json.loads(a.dumps()) == {
        "v": 1,
        "shards": {
            "shardId-000000000000": {
                "start": "AT_TIMESTAMP",
                "ts_ms": 1000,
                "drained": False,
            },
            "shardId-000000000001": {"after": "42", "drained": False},
        },
    }
    assert StreamOffset.from_json(json.loads(a.dumps())) == a


def test_offset_from_another_version_is_refused() -> None:
    """A checkpoint written by a different offset layout is an error."""
    with pytest.raises(OffsetError, match="version"):
        StreamOffset.from_json({"v": 99, "shards": {}})


def _lineage(*infos: ShardInfo) -> dict[str, ShardInfo]:
    return {i.shard_id: i for i in infos}


def test_children_wait_for_every_parent() -> None:
    """Split children wait for their parent; a merge child waits for both."""
    lineage = _lineage(
        ShardInfo("s0", (), "100"),
        ShardInfo("s1", ()),
        ShardInfo("s2", ("s0",)),
        ShardInfo("s3", ("s0",)),
        ShardInfo("s4", ("s2", "s3")),
    )
    offset = StreamOffset({k: ShardPosition() for k in lineage})
    assert readable_shards(offset, lineage) == ["s0", "s1"]
    offset = offset.with_shard("s0", ShardPosition(after="100", drained=True))
    assert readable_shards(offset, lineage) == ["s1", "s2", "s3"]
    offset = offset.with_shard("s2", ShardPosition(after="7", drained=True))
    assert readable_shards(offset, lineage) == ["s1", "s3"]
    offset = offset.with_shard("s3", ShardPosition(after="8", drained=True))
    assert readable_shards(offset, lineage) == ["s1", "s4"]


def test_a_parent_past_retention_does_not_block_its_child() -> None:
    """A child whose parent is no longer tracked is readable."""
    lineage = _lineage(ShardInfo("s2", ("s0",)))
    offset = StreamOffset({"s2": ShardPosition()})
    assert readable_shards(offset, lineage) == ["s2"]


def test_shards_found_later_start_at_trim_horizon() -> None:
    """The starting position applies at query start; later children start at
    their beginning so nothing written to them is skipped."""
    late = ShardPosition(start=AT_TIMESTAMP, ts_ms=5)
    first = track_new_shards(StreamOffset(), [ShardInfo("s0")], late)
    assert first.shards["s0"] == late
    later = track_new_shards(first, [ShardInfo("s0"), ShardInfo("s1", ("s0",))], late)
    assert later.shards["s1"] == ShardPosition()


def test_expired_undrained_shard_is_reported_lost() -> None:
    """A shard that leaves the listing undrained is reported, and marked
    drained so its children go on; a drained one is forgotten."""
    offset = StreamOffset(
        {
            "s0": ShardPosition(after="5", drained=True),
            "s1": ShardPosition(after="6"),
            "s2": ShardPosition(),
        }
    )
    new, lost = forget_expired_shards(offset, [ShardInfo("s2")])
    assert lost == ["s1"]
    assert set(new.shards) == {"s1", "s2"}
    assert new.shards["s1"].drained


def test_options_name_the_bad_key() -> None:
    """Option errors say which option and what is allowed."""
    with pytest.raises(OptionError, match="streamName"):
        SourceOptions.parse({})
    with pytest.raises(OptionError, match="startingPosition"):
        SourceOptions.parse({"streamName": "s", "startingPosition": "EARLIEST"})
    with pytest.raises(OptionError, match="maxRecordsPerBatch"):
        SourceOptions.parse({"streamName": "s", "maxRecordsPerBatch": "0"})


# -- servers ------------------------------------------------------------------


def _wait_for_kinesis(endpoint: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    client = kinesis_client(endpoint)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {log.read_text()[-2000:]}")
        try:
            client.list_streams()
            return
        except botocore.exceptions.EndpointConnectionError:
            time.sleep(0.2)
    raise RuntimeError(f"{endpoint} did not answer: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def kinesalite(
    ministack: MiniStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A kinesalite server on a loopback port (installed by
    scripts/install-kinesalite.sh); skipped when node or it is missing.
    It takes MiniStack's fixture only for the dummy credentials it sets."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: kinesalite resharding tests need it")
    if not KINESALITE.exists():
        pytest.skip(
            f"kinesalite is not installed at {KINESALITE}; "
            "run scripts/install-kinesalite.sh"
        )
    port = free_port()
    log = tmp_path_factory.mktemp("kinesalite") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(KINESALITE),
                "--port",
                str(port),
                "--createStreamMs",
                "50",
                "--deleteStreamMs",
                "50",
                "--updateStreamMs",
                "50",
            ],
            stdout=out,
            stderr=out,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_for_kinesis(endpoint, proc, log)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def spark(ministack: MiniStack) -> Any:
    """A local Spark session (2 cores, UI off) with the source registered.

    It starts after the MiniStack fixture has put dummy credentials in the
    environment: Spark's Python workers inherit the JVM's environment.
    """
    session = build_spark_session(master="local[2]", shuffle_partitions=2)
    session.sparkContext.setLogLevel("ERROR")
    return session


# -- helpers ------------------------------------------------------------------


def _wait_active(client: Any, stream: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        described = client.describe_stream(StreamName=stream)
        if described["StreamDescription"]["StreamStatus"] == "ACTIVE":
            return
        time.sleep(0.05)
    raise RuntimeError(f"stream {stream} did not become ACTIVE")


def _new_stream(client: Any, shards: int) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    client.create_stream(StreamName=name, ShardCount=shards)
    _wait_active(client, name)
    return name


def _put(
    client: Any, stream: str, count: int, tag: str
) -> dict[str, tuple[str, bytes]]:
    """Put ``count`` records with distinct binary payloads; returns
    sequence number -> (shard, data) as the server acknowledged them."""
    sent: dict[str, tuple[str, bytes]] = {}
    for lo in range(0, count, 500):
        # Payloads hold NUL and high bytes, so a text round trip would show.
        payloads = [
            f"{tag}:{i}:".encode() + bytes([0, 255, i % 256]) * (1 + i % 5)
            for i in range(lo, min(lo + 500, count))
        ]
        batch = [
            {"Data": data, "PartitionKey": f"key-{lo + j}"}
            for j, data in enumerate(payloads)
        ]
        answer = client.put_records(StreamName=stream, Records=batch)
        assert answer["FailedRecordCount"] == 0
        for data, result in zip(payloads, answer["Records"], strict=True):
            sent[result["SequenceNumber"]] = (result["ShardId"], data)
    return sent


class Collector:
    """A foreachBatch sink that keeps every row with its batch id."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, str, str, bytes, str]] = []
        self.batch_sizes: dict[int, int] = {}

    def __call__(self, df: Any, batch_id: int) -> None:
        rows = df.collect()
        self.batch_sizes[batch_id] = len(rows)
        for row in rows:
            self.rows.append(
                (
                    batch_id,
                    row.shard_id,
                    row.sequence_number,
                    bytes(row.data),
                    row.partition_key,
                )
            )

    def by_sequence(self) -> dict[str, tuple[str, bytes]]:
        out: dict[str, tuple[str, bytes]] = {}
        for _, shard, seq, data, _ in self.rows:
            assert seq not in out, f"record {seq} read twice"
            out[seq] = (shard, data)
        return out


def _run_available_now(
    spark: Any,
    endpoint: str,
    stream: str,
    checkpoint: Path,
    sink: Collector,
    **options: str,
) -> Any:
    reader = (
        spark.readStream.format("kinesis")
        .option("streamName", stream)
        .option("endpointUrl", endpoint)
        .option("region", "us-east-1")
    )
    for key, value in options.items():
        reader = reader.option(key, value)
    query = (
        reader.load()
        .writeStream.foreachBatch(sink)
        .option("checkpointLocation", str(checkpoint))
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination(timeout=300)
    assert not query.isActive, "availableNow query did not finish"
    assert query.exception() is None
    return query


# -- MiniStack ----------------------------------------------------------------


@pytest.mark.integration
def test_every_record_read_exactly_once_with_its_bytes(
    spark: Any, ministack: MiniStack, tmp_path: Path
) -> None:
    """All records of a 2-shard stream arrive once each, byte for byte, in
    batches no larger than maxRecordsPerBatch; a restart from the same
    checkpoint reads exactly the records put since."""
    client = kinesis_client(ministack.endpoint_url)
    stream = _new_stream(client, 2)
    sent = _put(client, stream, 230, "a")
    assert len({shard for shard, _ in sent.values()}) == 2
    sink = Collector()
    checkpoint = tmp_path / "checkpoint"
    query = _run_available_now(
        spark,
        ministack.endpoint_url,
        stream,
        checkpoint,
        sink,
        startingPosition="TRIM_HORIZON",
        maxRecordsPerBatch="50",
    )
    assert sink.by_sequence() == sent
    assert max(sink.batch_sizes.values()) <= 50
    # 230 records at <= 50 a batch take at least 5 batches.
    assert len([n for n in sink.batch_sizes.values() if n]) >= 5
    progress = query.lastProgress
    assert set(lag_from_progress(progress)) == {s for s, _ in sent.values()}

    more = _put(client, stream, 37, "b")
    second = Collector()
    _run_available_now(
        spark,
        ministack.endpoint_url,
        stream,
        checkpoint,
        second,
        startingPosition="TRIM_HORIZON",
        maxRecordsPerBatch="50",
    )
    assert second.by_sequence() == more
    assert min(second.batch_sizes) > max(sink.batch_sizes)


@pytest.mark.integration
def test_batches_stay_under_the_byte_bound(
    spark: Any, ministack: MiniStack, tmp_path: Path
) -> None:
    """With maxBytesPerBatch at 35 kB, 10 kB records come at most 3 a
    batch, and a 50 kB record (over the bound alone) still comes through."""
    client = kinesis_client(ministack.endpoint_url)
    stream = _new_stream(client, 1)
    records = [bytes([i]) * 10_000 for i in range(12)] + [b"\xff" * 50_000]
    answer = client.put_records(
        StreamName=stream,
        Records=[{"Data": d, "PartitionKey": "k"} for d in records],
    )
    sent = {
        r["SequenceNumber"]: (r["ShardId"], d)
        for r, d in zip(answer["Records"], records, strict=True)
    }
    sink = Collector()
    _run_available_now(
        spark,
        ministack.endpoint_url,
        stream,
        tmp_path / "checkpoint",
        sink,
        startingPosition="TRIM_HORIZON",
        maxBytesPerBatch="35000",
    )
    assert sink.by_sequence() == sent
    sizes: dict[int, int] = {}
    for batch, _, _, data, _ in sink.rows:
        sizes[batch] = sizes.get(batch, 0) + len(data)
    assert all(size <= 35_000 or size == 50_000 for size in sizes.values())
    assert sorted(n for n in sink.batch_sizes.values() if n) == [1, 3, 3, 3, 3]


@pytest.mark.integration
def test_batch_in_flight_is_replayed_from_kinesis_exactly(
    spark: Any, ministack: MiniStack, tmp_path: Path
) -> None:
    """A batch whose offsets were logged but not committed is read again
    after a restart, from Kinesis, with exactly the same records; nothing
    before it is read again."""
    client = kinesis_client(ministack.endpoint_url)
    stream = _new_stream(client, 2)
    sent = _put(client, stream, 60, "c")
    checkpoint = tmp_path / "checkpoint"
    first = Collector()
    _run_available_now(
        spark,
        ministack.endpoint_url,
        stream,
        checkpoint,
        first,
        startingPosition="TRIM_HORIZON",
        maxRecordsPerBatch="20",
    )
    assert first.by_sequence() == sent
    last = max(first.batch_sizes)
    # Make the last batch look in flight: offsets logged, commit missing.
    (checkpoint / "commits" / str(last)).unlink()
    (checkpoint / "commits" / f".{last}.crc").unlink(missing_ok=True)
    replay = Collector()
    _run_available_now(
        spark,
        ministack.endpoint_url,
        stream,
        checkpoint,
        replay,
        startingPosition="TRIM_HORIZON",
        maxRecordsPerBatch="20",
    )
    expected = sorted(r[1:4] for r in first.rows if r[0] == last)
    assert expected, "the last batch held records"
    assert sorted(r[1:4] for r in replay.rows) == expected
    assert set(replay.batch_sizes) == {last}


@pytest.mark.integration
def test_latest_skips_records_put_before_the_query_started(
    spark: Any, ministack: MiniStack, tmp_path: Path
) -> None:
    """startingPosition LATEST reads nothing already in the stream, and the
    next run from the checkpoint reads exactly what was put in between."""
    client = kinesis_client(ministack.endpoint_url)
    stream = _new_stream(client, 2)
    _put(client, stream, 25, "old")
    time.sleep(0.05)  # arrival times are in ms; keep "before" strictly before
    checkpoint = tmp_path / "checkpoint"
    first = Collector()
    _run_available_now(
        spark,
        ministack.endpoint_url,
        stream,
        checkpoint,
        first,
        startingPosition="LATEST",
    )
    assert first.rows == []
    time.sleep(0.05)
    new = _put(client, stream, 11, "new")
    second = Collector()
    _run_available_now(
        spark,
        ministack.endpoint_url,
        stream,
        checkpoint,
        second,
        startingPosition="LATEST",
    )
    assert second.by_sequence() == new


@pytest.mark.integration
def test_continuous_trigger_picks_up_records_as_they_come(
    spark: Any, ministack: MiniStack, tmp_path: Path
) -> None:
    """With a processing-time trigger the query reads records put while it
    runs, each once, and reports per-shard lag in its progress."""
    client = kinesis_client(ministack.endpoint_url)
    stream = _new_stream(client, 2)
    sink = Collector()
    query = (
        spark.readStream.format("kinesis")
        .option("streamName", stream)
        .option("endpointUrl", ministack.endpoint_url)
        .option("region", "us-east-1")
        .option("startingPosition", "TRIM_HORIZON")
        .load()
        .writeStream.foreachBatch(sink)
        .option("checkpointLocation", str(tmp_path / "checkpoint"))
        .trigger(processingTime="1 second")
        .start()
    )
    try:
        sent: dict[str, tuple[str, bytes]] = {}
        for round_ in range(3):
            sent.update(_put(client, stream, 15, f"live{round_}"))
            deadline = time.monotonic() + 120
            while len(sink.rows) < len(sent) and time.monotonic() < deadline:
                assert query.exception() is None
                time.sleep(0.2)
        assert sink.by_sequence() == sent
        lags = [lag_from_progress(p) for p in query.recentProgress]
        assert any(set(lag) == {s for s, _ in sent.values()} for lag in lags)
    finally:
        query.stop()


@pytest.mark.integration
def test_stream_outage_is_counted_not_fatal(
    spark: Any, ministack: MiniStack, tmp_path: Path
) -> None:
    """When the stream goes away under a running query, the source reports
    read errors in its progress and the query keeps running."""
    client = kinesis_client(ministack.endpoint_url)
    stream = _new_stream(client, 1)
    sink = Collector()
    query = (
        spark.readStream.format("kinesis")
        .option("streamName", stream)
        .option("endpointUrl", ministack.endpoint_url)
        .option("region", "us-east-1")
        .option("startingPosition", "TRIM_HORIZON")
        .load()
        .writeStream.foreachBatch(sink)
        .option("checkpointLocation", str(tmp_path / "checkpoint"))
        .trigger(processingTime="500 milliseconds")
        .start()
    )
    try:
        sent = _put(client, stream, 5, "before")
        deadline = time.monotonic() + 120
        while len(sink.rows) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sink.by_sequence() == sent
        client.delete_stream(StreamName=stream)

        def read_errors() -> int:
            for progress in reversed(query.recentProgress):
                for source in progress["sources"]:
                    report = source.get("latestOffset")
                    if isinstance(report, str):
                        try:
                            report = json.loads(report)
                        except ValueError:
                            continue
                    if isinstance(report, dict) and "read_errors" in report:
                        return int(report["read_errors"])
            return 0

        deadline = time.monotonic() + 120
        while read_errors() == 0 and time.monotonic() < deadline:
            assert query.exception() is None
            time.sleep(0.2)
        assert read_errors() > 0
        assert query.isActive
    finally:
        query.stop()


def test_output_schema_is_the_documented_one() -> None:
    """The five documented columns, in order, with their types."""
    assert [(f.name, f.dataType.simpleString()) for f in SCHEMA.fields] == [
        ("shard_id", "string"),
        ("sequence_number", "string"),
        ("approximate_arrival_timestamp", "timestamp"),
        ("partition_key", "string"),
        ("data", "binary"),
    ]


# -- kinesalite: resharding -----------------------------------------------------


def _reshard_wait(client: Any, stream: str) -> None:
    _wait_active(client, stream)


def _wait_until_arrived(client: Any, stream: str) -> None:
    """Wait until every record's ApproximateArrivalTimestamp is past.

    kinesalite dates a shard made by a split or merge one second after the
    reshard (``shardCreateTime: now + 1000``) and gives records put into it
    before then that time as their arrival.  An availableNow query started
    sooner stops before them (it reads what arrived before it started), so
    the children's records were left unread whenever the test ran fast.
    """
    latest = 0.0
    for shard in client.list_shards(StreamName=stream)["Shards"]:
        iterator = client.get_shard_iterator(
            StreamName=stream,
            ShardId=shard["ShardId"],
            ShardIteratorType="TRIM_HORIZON",
        )["ShardIterator"]
        while iterator:
            page = client.get_records(ShardIterator=iterator)
            for record in page["Records"]:
                latest = max(latest, record["ApproximateArrivalTimestamp"].timestamp())
            if not page["Records"]:
                break
            iterator = page.get("NextShardIterator")
    time.sleep(max(0.0, latest - time.time() + 0.05))


@pytest.mark.integration
@pytest.mark.slow
def test_split_and_merge_read_children_after_parents(
    spark: Any, kinesalite: str, tmp_path: Path
) -> None:
    """Across a split and then a merge every record is read once, and no
    child shard's record is in a batch before its parents' last records."""
    client = kinesis_client(kinesalite)
    stream = _new_stream(client, 1)
    parent_records = _put(client, stream, 40, "parent")
    (shard,) = client.list_shards(StreamName=stream)["Shards"]
    top = int(shard["HashKeyRange"]["EndingHashKey"])
    client.split_shard(
        StreamName=stream,
        ShardToSplit=shard["ShardId"],
        NewStartingHashKey=str(top // 2 + 1),
    )
    _reshard_wait(client, stream)
    child_records = _put(client, stream, 40, "child")
    children = sorted({s for s, _ in child_records.values()})
    assert len(children) == 2 and shard["ShardId"] not in children
    client.merge_shards(
        StreamName=stream, ShardToMerge=children[0], AdjacentShardToMerge=children[1]
    )
    _reshard_wait(client, stream)
    merged_records = _put(client, stream, 30, "merged")
    (grandchild,) = {s for s, _ in merged_records.values()}
    _wait_until_arrived(client, stream)

    sink = Collector()
    _run_available_now(
        spark,
        kinesalite,
        stream,
        tmp_path / "checkpoint",
        sink,
        startingPosition="TRIM_HORIZON",
        maxRecordsPerBatch="15",
    )
    assert sink.by_sequence() == {**parent_records, **child_records, **merged_records}
    batch_of = {seq: batch for batch, _, seq, _, _ in sink.rows}
    last_parent = max(batch_of[s] for s in parent_records)
    first_child = min(batch_of[s] for s in child_records)
    last_child = max(batch_of[s] for s in child_records)
    first_merged = min(batch_of[s] for s in merged_records)
    assert last_parent < first_child
    assert last_child < first_merged
    assert grandchild not in children
