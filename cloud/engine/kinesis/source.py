"""Kinesis Data Streams as a Spark Structured Streaming source.

No Kinesis connector jar ships with Spark, so this is a Python data source
(``pyspark.sql.datasource``, Spark >= 4.2 for admission control)::

    spark.dataSource.register(KinesisDataSource)
    df = (spark.readStream.format("kinesis")
          .option("streamName", "flows")
          .option("endpointUrl", "http://127.0.0.1:4566")   # omit on AWS
          .option("region", "eu-west-1")
          .option("startingPosition", "TRIM_HORIZON")
          .option("maxRecordsPerBatch", "10000")
          .load())

Columns: ``shard_id``, ``sequence_number`` (decimal string), ``approximate_
arrival_timestamp`` (timestamp), ``partition_key``, ``data`` (binary).

How a micro-batch is read
-------------------------
Spark asks the source for the batch's end offset (``latestOffset``) before
any task runs and logs it, so the end must be exact.  Kinesis can only tell
where a shard ends by reading it, so the driver-side reader reads ahead:
``latestOffset`` polls each readable shard (GetRecords, at most
``maxGetRecordsCallsPerShard`` calls, at most the batch's share of
``maxRecordsPerBatch`` records and ``maxBytesPerBatch`` bytes), keeps the
records, and returns the last sequence number per shard.  ``partitions``
then makes one partition per shard that carries those records, so
executors do not read them again.
A batch replayed after a restart (its offsets logged, its commit not) finds
no read-ahead records; its partitions carry only the range, and executors
read exactly that range from Kinesis.  Nothing is lost or read twice beyond
that batch in flight, as long as the records are within the retention.

Known shortcoming: every record passes through the driver, so one driver's
network and the per-shard read limit (2 MB/s) bound the throughput, and a
micro-batch's records travel inside its tasks (``maxBytesPerBatch`` bounds
both the read-ahead and those task payloads).

Lag: ``reportLatestOffset`` returns MillisBehindLatest per shard from the
last read-ahead; Spark puts it in each progress event's
``sources[i].latestOffset`` (see :func:`lag_from_progress`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import botocore.exceptions
import pyarrow as pa
import structlog
from pyspark.sql.datasource import (
    DataSource,
    DataSourceStreamReader,
    InputPartition,
)
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.streaming.datasource import (
    ReadAllAvailable,
    ReadLimit,
    ReadMaxRows,
    SupportsTriggerAvailableNow,
)
from pyspark.sql.types import (
    BinaryType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from cloud.engine.kinesis.client import (
    ClientSettings,
    IteratorExpiredError,
    KinesisRecord,
    ReplayShortError,
    get_records,
    list_shards,
    make_client,
    read_range,
    shard_iterator,
)
from cloud.engine.kinesis.offsets import (
    AT_TIMESTAMP,
    TRIM_HORIZON,
    ShardPosition,
    StreamOffset,
)
from cloud.engine.kinesis.shards import (
    ShardInfo,
    forget_expired_shards,
    readable_shards,
    track_new_shards,
)

log = structlog.get_logger(__name__)

SOURCE_NAME = "kinesis"

SCHEMA = StructType(
    [
        StructField("shard_id", StringType(), False),
        StructField("sequence_number", StringType(), False),
        StructField("approximate_arrival_timestamp", TimestampType(), False),
        StructField("partition_key", StringType(), False),
        StructField("data", BinaryType(), False),
    ]
)
"""The source's fixed output schema."""

LATEST = "LATEST"
STARTING_POSITIONS = (TRIM_HORIZON, LATEST)

#: Errors of a call that botocore already retried: counted, never fatal.
_AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)

#: Rows per Arrow batch a partition yields.
_ARROW_BATCH_ROWS = 4096


class OptionError(ValueError):
    """An option of the Kinesis source is missing or invalid."""


def _positive_int(options: Mapping[str, str], key: str, default: int) -> int:
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise OptionError(f"option {key} must be a positive integer, got {raw!r}")
    return value


@dataclass(frozen=True)
class SourceOptions:
    """The source's options, parsed and checked.

    * ``streamName`` (required), ``endpointUrl`` (omit for AWS), ``region``
    * ``startingPosition``: TRIM_HORIZON (oldest retained record) or LATEST
      (records arriving after the query first starts); only used when the
      checkpoint has no offsets yet.  Default LATEST.
    * ``maxRecordsPerBatch``: records per micro-batch over all shards
      (default 10000); Trigger.AvailableNow honours it too.
    * ``maxBytesPerBatch``: record data per micro-batch over all shards
      (default 64 MiB; one record always fits): bounds the driver's
      read-ahead and the task payloads that carry it.
    * ``maxGetRecordsCallsPerShard``: GetRecords calls per shard per
      micro-batch (default 5, AWS's per-second shard limit).
    """

    client: ClientSettings
    starting_position: str = LATEST
    max_records_per_batch: int = 10_000
    max_bytes_per_batch: int = 64 * 1024 * 1024
    max_get_records_calls: int = 5

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> SourceOptions:
        """Parse Spark's (case-insensitive) option map."""
        stream = options.get("streamName")
        if not stream:
            raise OptionError("option streamName is required")
        position = str(options.get("startingPosition", LATEST)).upper()
        if position not in STARTING_POSITIONS:
            raise OptionError(
                f"option startingPosition must be one of {STARTING_POSITIONS}, "
                f"got {options.get('startingPosition')!r}"
            )
        return cls(
            client=ClientSettings(
                stream_name=str(stream),
                endpoint_url=options.get("endpointUrl") or None,
                region=options.get("region") or None,
            ),
            starting_position=position,
            max_records_per_batch=_positive_int(options, "maxRecordsPerBatch", 10_000),
            max_bytes_per_batch=_positive_int(
                options, "maxBytesPerBatch", 64 * 1024 * 1024
            ),
            max_get_records_calls=_positive_int(
                options, "maxGetRecordsCallsPerShard", 5
            ),
        )


class KinesisShardPartition(InputPartition):
    """One shard's records of one micro-batch: ``(start, end_sequence]``.

    ``records`` holds the driver's read-ahead when it has it; None means the
    executor reads the range from Kinesis (a replayed batch).
    """

    def __init__(
        self,
        shard_id: str,
        start: ShardPosition,
        end_sequence_number: str,
        records: list[KinesisRecord] | None,
    ) -> None:
        super().__init__(shard_id)
        self.shard_id = shard_id
        self.start = start
        self.end_sequence_number = end_sequence_number
        self.records = records

    def __repr__(self) -> str:
        held = "none" if self.records is None else str(len(self.records))
        return (
            f"KinesisShardPartition({self.shard_id}, after={self.start.after}, "
            f"end={self.end_sequence_number}, records={held})"
        )


@dataclass
class _ShardBuffer:
    """Read-ahead of one shard: the records after ``base``, in order."""

    base: ShardPosition
    records: list[KinesisRecord] = field(default_factory=list)
    #: continues after the last buffered record; None: get a new one.
    iterator: str | None = None
    #: the shard is closed and every record of it is buffered.
    exhausted: bool = False

    def data_bytes(self) -> int:
        return sum(len(r.data) for r in self.records)

    def position_after_buffer(self) -> ShardPosition:
        if self.records:
            return self.base.advanced_to(
                self.records[-1].sequence_number, drained=False
            )
        return self.base

    def rebase(self, position: ShardPosition) -> bool:
        """Drop records up to ``position``; False if it is not in here."""
        if _same_place(self.base, position):
            return True
        if position.after is None:
            return False
        for index, record in enumerate(self.records):
            if record.sequence_number == position.after:
                del self.records[: index + 1]
                self.base = position
                return True
        return False

    def slice(
        self, start: ShardPosition, end_sequence_number: str
    ) -> list[KinesisRecord] | None:
        """The buffered records of ``(start, end]``, or None if not all here."""
        if _same_place(self.base, start):
            first = 0
        else:
            if start.after is None:
                return None
            seqs = [r.sequence_number for r in self.records]
            if start.after not in seqs:
                return None
            first = seqs.index(start.after) + 1
        for index in range(first, len(self.records)):
            if self.records[index].sequence_number == end_sequence_number:
                return self.records[first : index + 1]
        return None


def _same_place(a: ShardPosition, b: ShardPosition) -> bool:
    return (a.after, a.start, a.ts_ms) == (b.after, b.start, b.ts_ms)


def _arrow_schema(schema: StructType) -> pa.Schema:
    # The exact schema Spark checks returned batches against.
    return to_arrow_schema(schema, timezone="UTC")


def records_to_batch(
    records: Sequence[KinesisRecord], schema: pa.Schema
) -> pa.RecordBatch:
    """Build one Arrow batch of the source's schema from ``records``."""
    arrival = pa.array([r.arrival_ms for r in records], pa.int64()).cast(
        pa.timestamp("ms", tz="UTC")
    )
    columns = [
        pa.array([r.shard_id for r in records], pa.string()),
        pa.array([r.sequence_number for r in records], pa.string()),
        arrival.cast(schema.field("approximate_arrival_timestamp").type),
        pa.array([r.partition_key for r in records], pa.string()),
        pa.array([r.data for r in records], pa.binary()),
    ]
    columns = [c.cast(f.type) for c, f in zip(columns, schema, strict=True)]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


class KinesisStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """The stream reader; see the module docstring for the protocol.

    Spark runs the offset calls (``initialOffset``, ``latestOffset``,
    ``partitions``, ``commit``) in one long-lived Python process on the
    driver, and pickles the reader to executors for ``read``; the botocore
    client and the read-ahead are rebuilt where needed, never pickled.
    """

    def __init__(self, options: SourceOptions, schema: StructType) -> None:
        self.options = options
        self.schema = schema
        self._client: Any = None
        self._buffers: dict[str, _ShardBuffer] = {}
        self._lineage: dict[str, ShardInfo] = {}
        self._lag_ms: dict[str, int] = {}
        self._target_ms: int | None = None
        #: GetRecords calls still throttled after botocore's retries.
        self.throttled_calls = 0
        #: shards that left the listing before they were drained.
        self.lost_shards = 0
        #: ListShards/GetRecords calls that failed after botocore's retries.
        self.read_errors = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options, "schema": self.schema}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"], state["schema"])  # type: ignore[misc]

    # -- driver side -------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.options.client)
        return self._client

    def _list(self) -> list[ShardInfo]:
        listing = list_shards(self.client, self.options.client.stream_name)
        self._lineage = {info.shard_id: info for info in listing}
        return listing

    def initialOffset(self) -> dict:  # noqa: N802 - Spark's name
        """Every listed shard at the starting position (LATEST is pinned to
        now, as AT_TIMESTAMP, so a restart does not move it)."""
        if self.options.starting_position == LATEST:
            first = ShardPosition(start=AT_TIMESTAMP, ts_ms=int(time.time() * 1000))
        else:
            first = ShardPosition(start=TRIM_HORIZON)
        offset = track_new_shards(StreamOffset(), self._list(), first)
        log.info(
            "kinesis_source_start",
            stream=self.options.client.stream_name,
            shards=len(offset.shards),
            position=self.options.starting_position,
        )
        return offset.to_json()

    def getDefaultReadLimit(self) -> ReadLimit:  # noqa: N802 - Spark's name
        return ReadMaxRows(self.options.max_records_per_batch)

    def prepareForTriggerAvailableNow(self) -> None:  # noqa: N802 - Spark's name
        """Stop at records that arrive after now (ApproximateArrivalTimestamp)."""
        self._target_ms = int(time.time() * 1000)

    def latestOffset(self, start: dict, limit: ReadLimit) -> dict:  # noqa: N802
        """Read ahead from ``start`` and return the end of the next batch."""
        offset = StreamOffset.from_json(start)
        try:
            listing = self._list()
        except _AWS_ERRORS as exc:
            # An outage must not end the query: no new data this round.
            self.read_errors += 1
            log.warning(
                "kinesis_list_failed",
                stream=self.options.client.stream_name,
                error=str(exc),
            )
            return start
        offset, lost = forget_expired_shards(offset, listing)
        for shard_id in lost:
            self.lost_shards += 1
            log.warning(
                "kinesis_shard_expired_unread",
                stream=self.options.client.stream_name,
                shard=shard_id,
                after=offset.shards[shard_id].after,
            )
        # Shards discovered now are read from the next batch on, so that
        # every shard a batch reads is tracked by that batch's start offset.
        known_before = set(offset.shards)
        offset = track_new_shards(offset, listing, ShardPosition())
        readable = [
            s for s in readable_shards(offset, self._lineage) if s in known_before
        ]
        if isinstance(limit, ReadMaxRows):
            ways = max(1, len(readable))
            share: int | None = max(1, limit.max_rows // ways)
            byte_share: int | None = max(1, self.options.max_bytes_per_batch // ways)
            max_calls: int | None = self.options.max_get_records_calls
        else:
            if not isinstance(limit, ReadAllAvailable):
                log.warning("kinesis_read_limit_unsupported", limit=repr(limit))
            share, byte_share, max_calls = None, None, None
        end = offset
        for shard_id in readable:
            position = offset.shards[shard_id]
            buffer = self._buffer_for(shard_id, position)
            self._fill(shard_id, buffer, share, byte_share, max_calls)
            taken = self._take(buffer, share, byte_share)
            if taken:
                drained = buffer.exhausted and taken == len(buffer.records)
                end = end.with_shard(
                    shard_id,
                    position.advanced_to(
                        buffer.records[taken - 1].sequence_number, drained=drained
                    ),
                )
            elif buffer.exhausted and not buffer.records:
                end = end.with_shard(
                    shard_id,
                    ShardPosition(
                        after=position.after,
                        start=position.start,
                        ts_ms=position.ts_ms,
                        drained=True,
                    ),
                )
                log.info(
                    "kinesis_shard_drained",
                    stream=self.options.client.stream_name,
                    shard=shard_id,
                )
        return end.to_json()

    def _buffer_for(self, shard_id: str, position: ShardPosition) -> _ShardBuffer:
        buffer = self._buffers.get(shard_id)
        if buffer is None or not buffer.rebase(position):
            buffer = _ShardBuffer(base=position)
            self._buffers[shard_id] = buffer
        return buffer

    def _fill(
        self,
        shard_id: str,
        buffer: _ShardBuffer,
        want: int | None,
        want_bytes: int | None,
        max_calls: int | None,
    ) -> None:
        """Poll the shard until ``want`` records or ``want_bytes`` of data
        are buffered, the shard is caught up or closed, or ``max_calls``
        GetRecords calls were made."""
        stream = self.options.client.stream_name
        calls = 0
        idle_calls = 0
        while not buffer.exhausted:
            if want is not None and len(buffer.records) >= want:
                return
            if want_bytes is not None and buffer.data_bytes() >= want_bytes:
                return
            if max_calls is not None and calls >= max_calls:
                return
            if (
                self._target_ms is not None
                and buffer.records
                and buffer.records[-1].arrival_ms > self._target_ms
            ):
                return
            room = 10_000 if want is None else want - len(buffer.records)
            calls += 1
            try:
                if buffer.iterator is None:
                    buffer.iterator = shard_iterator(
                        self.client, stream, shard_id, buffer.position_after_buffer()
                    )
                page = get_records(self.client, shard_id, buffer.iterator, room)
            except IteratorExpiredError:
                buffer.iterator = None
                continue
            except _AWS_ERRORS as exc:
                # Keep what is buffered; this shard waits for the next round.
                self.read_errors += 1
                log.warning(
                    "kinesis_read_failed", stream=stream, shard=shard_id, error=str(exc)
                )
                return
            if page.throttled:
                self.throttled_calls += 1
                log.warning("kinesis_throttled", stream=stream, shard=shard_id)
                return
            buffer.records.extend(page.records)
            buffer.iterator = page.next_iterator
            if page.millis_behind_latest is not None:
                self._lag_ms[shard_id] = page.millis_behind_latest
            if page.next_iterator is None:
                buffer.exhausted = True
                return
            if not page.records:
                idle_calls += 1
                if idle_calls > 100:
                    return
                # An empty page with the shard behind means a sparse stretch
                # of the shard: keep polling (bounded when uncapped too).  A
                # closed shard is read until its iterator ends, even when the
                # page says it is caught up: its children become readable
                # only then, and an availableNow query that saw a round
                # without progress would end with them unread.
                info = self._lineage.get(shard_id)
                closed = info is not None and info.ending_sequence_number is not None
                if not page.millis_behind_latest and not closed:
                    return

    def _take(
        self, buffer: _ShardBuffer, share: int | None, byte_share: int | None
    ) -> int:
        """How many buffered records go into the batch (at least one fits the
        byte share, so a record larger than it still goes through)."""
        count = (
            len(buffer.records) if share is None else min(share, len(buffer.records))
        )
        size = 0
        for index in range(count):
            record = buffer.records[index]
            if self._target_ms is not None and record.arrival_ms > self._target_ms:
                return index
            size += len(record.data)
            if byte_share is not None and index > 0 and size > byte_share:
                return index
        return count

    def partitions(self, start: dict, end: dict) -> Sequence[InputPartition]:
        """One partition per shard with records between the offsets."""
        first = StreamOffset.from_json(start)
        last = StreamOffset.from_json(end)
        parts: list[InputPartition] = []
        for shard_id in sorted(last.shards):
            to = last.shards[shard_id]
            since = first.shards.get(shard_id)
            if to.after is None or since is None or since.after == to.after:
                continue
            buffer = self._buffers.get(shard_id)
            records = buffer.slice(since, to.after) if buffer is not None else None
            parts.append(KinesisShardPartition(shard_id, since, to.after, records))
        return parts

    def commit(self, end: dict) -> None:
        """Forget the read-ahead up to ``end`` (Spark processed it)."""
        offset = StreamOffset.from_json(end)
        for shard_id, buffer in list(self._buffers.items()):
            position = offset.shards.get(shard_id)
            if position is None or position.drained:
                del self._buffers[shard_id]
            elif (
                buffer.records and buffer.records[-1].sequence_number == position.after
            ):
                # All of it was processed; the iterator goes on from here.
                buffer.records.clear()
                buffer.base = position
            elif not buffer.rebase(position):
                # The buffer does not lead up to this offset (a replayed
                # batch); drop it rather than guess.
                del self._buffers[shard_id]

    def reportLatestOffset(self) -> dict | None:  # noqa: N802 - Spark's name
        """Lag and health of the read-ahead, for progress events (not an
        offset Spark resumes from)."""
        return {
            "millis_behind_latest": dict(sorted(self._lag_ms.items())),
            "throttled_calls": self.throttled_calls,
            "lost_shards": self.lost_shards,
            "read_errors": self.read_errors,
        }

    def stop(self) -> None:
        self._buffers.clear()
        self._client = None

    # -- executor side -----------------------------------------------------

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        """Yield one shard's records of a batch as Arrow batches."""
        assert isinstance(partition, KinesisShardPartition)
        schema = _arrow_schema(self.schema)
        records: Iterator[KinesisRecord]
        if partition.records is not None:
            records = iter(partition.records)
        else:
            records = read_range(
                make_client(self.options.client),
                self.options.client.stream_name,
                partition.shard_id,
                partition.start,
                partition.end_sequence_number,
            )
            log.info(
                "kinesis_range_reread",
                shard=partition.shard_id,
                after=partition.start.after,
                end=partition.end_sequence_number,
            )
        chunk: list[KinesisRecord] = []
        try:
            for record in records:
                chunk.append(record)
                if len(chunk) >= _ARROW_BATCH_ROWS:
                    yield records_to_batch(chunk, schema)
                    chunk = []
        except ReplayShortError as exc:
            # Re-reading cannot bring trimmed records back; stopping the
            # query would not either, so the loss is logged loudly.
            log.error("kinesis_replay_short", shard=partition.shard_id, error=str(exc))
        if chunk:
            yield records_to_batch(chunk, schema)


class KinesisDataSource(DataSource):
    """``format("kinesis")``: see the module docstring."""

    @classmethod
    def name(cls) -> str:
        return SOURCE_NAME

    def schema(self) -> StructType:
        return SCHEMA

    def streamReader(self, schema: StructType) -> DataSourceStreamReader:  # noqa: N802
        if schema != SCHEMA:
            raise OptionError(
                f"the kinesis source has a fixed schema {SCHEMA.simpleString()}, "
                f"got {schema.simpleString()}"
            )
        return KinesisStreamReader(SourceOptions.parse(self.options), schema)


def lag_from_progress(progress: Mapping[str, Any]) -> dict[str, int]:
    """MillisBehindLatest per shard from a StreamingQueryProgress dict.

    Reads the first source whose ``latestOffset`` carries the lag this
    source reports; empty if none does (no batch read yet).
    """
    for source in progress.get("sources", []):
        raw = source.get("latestOffset")
        if not raw:
            continue
        if isinstance(raw, str):
            try:
                data = json.loads(raw)
            except ValueError:
                continue  # Spark reports something else when it has no offset
        else:
            data = raw
        if isinstance(data, dict) and "millis_behind_latest" in data:
            return {str(k): int(v) for k, v in data["millis_behind_latest"].items()}
    return {}
