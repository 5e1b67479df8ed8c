"""Kinesis Data Streams calls the source makes, on botocore.

Only the polling API (ListShards, GetShardIterator, GetRecords) is used, so
any server speaking it works (AWS, MiniStack, kinesalite) given its
endpoint URL.  Credentials come from botocore's usual chain (environment,
profile, instance role), boto3's too; nothing here handles them.  botocore
alone, not boto3: the source runner and executors import this module at
every start, and boto3 brings s3transfer (~0.1 CPU-s) for nothing here.

AWS allows 5 GetRecords calls and 2 MB per second per shard, shared by all
polling consumers of the stream; a throttled call is retried by botocore
(standard retry mode) and, if it still fails, the shard is skipped for this
round and counted, never treated as "no data".
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import botocore.config
import botocore.exceptions
import botocore.session
import structlog

from cloud.engine.kinesis.offsets import (
    AT_TIMESTAMP,
    ShardPosition,
    sequence_key,
)
from cloud.engine.kinesis.shards import ShardInfo

log = structlog.get_logger(__name__)

#: Kinesis refuses a GetRecords Limit above this.
MAX_GET_RECORDS_LIMIT = 10_000

_THROTTLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "ThrottlingException",
        "KMSThrottlingException",
    }
)


class KinesisRecord(NamedTuple):
    """One record as the source emits it (the DataFrame's columns)."""

    shard_id: str
    sequence_number: str
    #: ApproximateArrivalTimestamp, ms since the UNIX epoch (UTC).
    arrival_ms: int
    partition_key: str
    data: bytes


class IteratorExpiredError(Exception):
    """A shard iterator is older than Kinesis's 5 minutes; get a new one."""


@dataclass(frozen=True)
class ClientSettings:
    """How to reach the stream (picklable, shipped to executors)."""

    stream_name: str
    endpoint_url: str | None = None
    region: str | None = None
    #: botocore attempts per call, including the first (standard mode).
    max_attempts: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0


def make_client(settings: ClientSettings) -> Any:
    """Return a botocore Kinesis client for ``settings``."""
    config = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
    )
    return botocore.session.get_session().create_client(
        "kinesis",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        config=config,
    )


def list_shards(client: Any, stream_name: str) -> list[ShardInfo]:
    """Every shard ListShards returns (open and closed), following pages."""
    shards: list[ShardInfo] = []
    response = client.list_shards(StreamName=stream_name)
    while True:
        shards.extend(ShardInfo.from_api(s) for s in response.get("Shards", []))
        token = response.get("NextToken")
        if not token:
            return shards
        # With NextToken, ListShards refuses StreamName.
        response = client.list_shards(NextToken=token)


def shard_iterator(
    client: Any, stream_name: str, shard_id: str, position: ShardPosition
) -> str:
    """Return an iterator that yields the records after ``position``."""
    args: dict[str, Any] = {"StreamName": stream_name, "ShardId": shard_id}
    if position.after is not None:
        args["ShardIteratorType"] = "AFTER_SEQUENCE_NUMBER"
        args["StartingSequenceNumber"] = position.after
    elif position.start == AT_TIMESTAMP:
        assert position.ts_ms is not None
        args["ShardIteratorType"] = AT_TIMESTAMP
        args["Timestamp"] = dt.datetime.fromtimestamp(
            position.ts_ms / 1000.0, tz=dt.UTC
        )
    else:
        args["ShardIteratorType"] = "TRIM_HORIZON"
    return str(client.get_shard_iterator(**args)["ShardIterator"])


@dataclass
class FetchResult:
    """What one GetRecords call gave."""

    records: list[KinesisRecord]
    #: None once the shard is closed and every record of it was returned.
    next_iterator: str | None
    millis_behind_latest: int | None
    throttled: bool = False


def _arrival_ms(value: Any) -> int:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return round(value.timestamp() * 1000)
    return round(float(value) * 1000)


def get_records(client: Any, shard_id: str, iterator: str, limit: int) -> FetchResult:
    """One GetRecords call of at most ``limit`` records.

    A call still throttled after botocore's retries gives an empty result
    with ``throttled`` set and the same iterator, so the caller retries it
    later.  Raises :class:`IteratorExpiredError` for an expired iterator.
    """
    limit = max(1, min(limit, MAX_GET_RECORDS_LIMIT))
    try:
        response = client.get_records(ShardIterator=iterator, Limit=limit)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "ExpiredIteratorException":
            raise IteratorExpiredError(shard_id) from exc
        if code in _THROTTLE_CODES:
            return FetchResult([], iterator, None, throttled=True)
        raise
    records = [
        KinesisRecord(
            shard_id=shard_id,
            sequence_number=str(r["SequenceNumber"]),
            arrival_ms=_arrival_ms(r["ApproximateArrivalTimestamp"]),
            partition_key=str(r["PartitionKey"]),
            data=bytes(r["Data"]),
        )
        for r in response.get("Records", [])
    ]
    behind = response.get("MillisBehindLatest")
    return FetchResult(
        records=records,
        next_iterator=response.get("NextShardIterator"),
        millis_behind_latest=int(behind) if behind is not None else None,
    )


class ReplayShortError(Exception):
    """The records of a planned range are no longer all in the shard."""


def read_range(
    client: Any,
    stream_name: str,
    shard_id: str,
    start: ShardPosition,
    end_sequence_number: str,
    *,
    max_idle_polls: int = 50,
    idle_sleep_s: float = 0.2,
) -> Iterator[KinesisRecord]:
    """Yield the records of one shard after ``start`` up to and including
    ``end_sequence_number`` (a range planned earlier; reading it again gives
    the same records while they are within the stream's retention).

    AWS may answer empty pages before the data (sparse shards), so empty
    pages are polled up to ``max_idle_polls`` times while the shard is
    behind.  Raises :class:`ReplayShortError` if the shard ends, or stays
    caught up, before ``end_sequence_number``: the records are gone
    (trimmed past retention), which the caller must report.
    """
    end_key = sequence_key(end_sequence_number)
    position = start
    iterator: str | None = shard_iterator(client, stream_name, shard_id, position)
    idle = 0
    while iterator is not None:
        try:
            page = get_records(client, shard_id, iterator, MAX_GET_RECORDS_LIMIT)
        except IteratorExpiredError:
            iterator = shard_iterator(client, stream_name, shard_id, position)
            continue
        for record in page.records:
            key = sequence_key(record.sequence_number)
            if key > end_key:
                return
            yield record
            if key == end_key:
                return
            position = position.advanced_to(record.sequence_number, drained=False)
        if page.records:
            idle = 0
        else:
            idle += 1
            if idle > max_idle_polls:
                break
            time.sleep(idle_sleep_s)
        iterator = page.next_iterator
    raise ReplayShortError(
        f"shard {shard_id} of {stream_name} ended before sequence number "
        f"{end_sequence_number} (last read {position.after}); "
        "records past the retention period are lost"
    )
