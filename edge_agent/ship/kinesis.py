"""The Kinesis shipper: spooled batches to Kinesis Data Streams by PutRecords.

One spooled batch is one Kinesis record: its payload is the record's data
and its exporter's partition key the record's key.  A batch leaves the
spool only when Kinesis acknowledged its record (a result entry with a
sequence number and no error code); everything else stays in the spool
and is sent again, so delivery is at least once.  Duplicates arise when a
call succeeded at the server but its answer was lost (a dropped
connection, a read timeout): the record is then sent again by botocore's
transport retry or by the next round.  Consumers de-duplicate by batch id.

Retries come in two layers.  botocore's "standard" mode retries a whole
call on connection errors, HTTP 5xx and call-level throttling, with its
own jittered backoff and retry quota.  A call that succeeds with
``FailedRecordCount > 0`` is not retried by botocore: the shipper leaves
exactly the failed records (``ErrorCode`` set:
``ProvisionedThroughputExceededException`` or ``InternalFailure``) in the
spool, backs off (full jitter, see :class:`~edge_agent.ship.backoff.Backoff`)
and sends them in the next round, the oldest first.

Ordering: Kinesis keeps records in arrival order per shard, and a
partition key always maps to one shard.  With ``strict_key_order`` (the
default) a call carries at most one batch per key and a key's next batch
waits until the previous one is acknowledged, so the *first* arrival of a
key's batches follows seq order; only duplicates of already delivered
batches can appear later in the shard.  The cost is one batch per key per
round trip, which with a typical 20 to 100 ms round trip stays above the
1 MiB/s a shard accepts for batches over about 50 KiB.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import botocore.exceptions
import structlog

from edge_agent.ship.backoff import Backoff
from edge_agent.ship.config import ShipperConfig, make_kinesis_client
from edge_agent.ship.plan import plan_call
from edge_agent.spool import PendingBatch, Spool, SpooledBatch

log = structlog.get_logger(__name__)

#: Error codes that mean "slow down" (per record or per call).
THROTTLING_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "LimitExceededException",
        "KMSThrottlingException",
    }
)
#: The spool is scanned this many calls' worth of batches ahead to fill a
#: call with other keys while strict order holds a key back.
_SCAN_CALLS = 4


@dataclass(frozen=True)
class ShipperStats:
    """A snapshot of the shipper's counters (since construction) and gauges."""

    #: PutRecords calls made; each may be several HTTP attempts
    calls: int
    #: calls that still failed after botocore's retries
    calls_failed: int
    http_attempts: int
    #: HTTP attempts botocore retried (attempts beyond the first per call)
    transport_retries: int
    #: failed HTTP attempts, by error code or exception class name
    attempt_errors: dict[str, int]
    batches_shipped: int
    #: equal to batches_shipped: one record per batch
    records_shipped: int
    #: payload bytes acknowledged
    bytes_shipped: int
    #: records sent again because their record or their call failed
    records_retried: int
    #: records refused with a throttling code plus HTTP attempts refused
    #: with one (botocore retries those)
    throttled: int
    #: per-record failures by ErrorCode
    record_errors: dict[str, int]
    #: whole-call failures (after botocore's retries) by error code
    call_errors: dict[str, int]
    #: batches whose record exceeds max_record_bytes, moved to rejected/
    rejected_too_large: int
    in_flight_batches: int
    in_flight_bytes: int
    #: seconds since a call last acknowledged a record; None before the first
    seconds_since_success: float | None


@dataclass(frozen=True)
class _Round:
    attempted: int = 0
    acked: int = 0
    failed: int = 0
    set_aside: int = 0


class _Counters:
    def __init__(self) -> None:
        self.calls = 0
        self.calls_failed = 0
        self.http_attempts = 0
        self.attempt_errors: collections.Counter[str] = collections.Counter()
        self.batches_shipped = 0
        self.bytes_shipped = 0
        self.records_retried = 0
        self.throttled = 0
        self.record_errors: collections.Counter[str] = collections.Counter()
        self.call_errors: collections.Counter[str] = collections.Counter()
        self.rejected_too_large = 0


class KinesisShipper:
    """Ships a :class:`~edge_agent.spool.Spool` to one Kinesis stream.

    The constructor is inert: the boto3 client is made on first use with
    ``client_factory(config)``.  :meth:`run` is the asyncio task (up to
    ``max_concurrent_calls`` rounds at once, each in a worker thread);
    :meth:`ship_once` is one synchronous round.  Call :meth:`notify` after
    appending to the spool to skip the idle poll.  In-flight payload bytes
    are bounded by ``max_in_flight_bytes``.
    """

    def __init__(
        self,
        spool: Spool,
        config: ShipperConfig,
        client_factory: Callable[[ShipperConfig], Any] = make_kinesis_client,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self.config = config
        self._client_factory = client_factory
        self._rng = rng or random.Random()
        self._clock = clock
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._state = threading.Lock()
        self._in_flight: dict[str, PendingBatch] = {}
        self._in_flight_keys: collections.Counter[str] = collections.Counter()
        self._in_flight_bytes = 0
        self._c = _Counters()
        self._last_success: float | None = None
        self._failing_since: float | None = None
        self._failing_calls = 0
        self._last_summary: ShipperStats | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._done: asyncio.Event | None = None

    # -- asyncio life cycle --------------------------------------------------

    async def run(self) -> None:
        """Ship until :meth:`stop`; re-raises the first unexpected error."""
        if self._loop is not None:
            raise RuntimeError("KinesisShipper.run() is already running or ran")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        stopping = self._stopping
        tasks: list[asyncio.Task[None]] = []
        try:
            await asyncio.to_thread(self._get_client)
            log.info(
                "shipper_started",
                stream=self.config.stream_label,
                endpoint=self._client.meta.endpoint_url,
                region=self._client.meta.region_name,
            )
            tasks = [
                asyncio.create_task(self._worker())
                for _ in range(self.config.max_concurrent_calls)
            ]
            tasks.append(asyncio.create_task(self._summary_loop()))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    raise exc
        finally:
            # Also on cancellation: let calls in progress finish and their
            # acks land rather than abandoning worker threads.
            stopping.set()
            self._wake.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.log_summary(force=True)
            self._close_client()
            self._done.set()

    async def stop(self) -> None:
        """Stop :meth:`run` and wait for it; calls in progress are finished.

        That wait is at most about ``read_timeout_s * transport_max_attempts``.
        """
        if self._stopping is None or self._done is None:
            self._close_client()
            return
        self._stopping.set()
        if self._wake is not None:
            self._wake.set()
        await self._done.wait()

    def close(self) -> None:
        """Close the boto3 client (for users of :meth:`ship_once`; run closes it)."""
        self._close_client()

    def notify(self) -> None:
        """Wake an idle :meth:`run` now; safe from any thread."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        # A closed loop raises RuntimeError: then there is nothing to wake.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wake.set)

    async def _worker(self) -> None:
        assert self._stopping is not None and self._wake is not None
        backoff = Backoff(
            self.config.backoff_base_s, self.config.backoff_max_s, self._rng
        )
        while not self._stopping.is_set():
            self._wake.clear()
            result = await asyncio.to_thread(self._ship_round)
            if result.failed:
                await self._sleep(backoff.next_delay(), wakeable=False)
                continue
            if result.acked:
                backoff.reset()
                self._wake.set()  # budget freed: let idle siblings plan
            elif not result.set_aside:
                await self._sleep(self.config.idle_poll_s, wakeable=True)

    async def _summary_loop(self) -> None:
        assert self._stopping is not None
        while True:
            await self._sleep(self.config.summary_interval_s, wakeable=False)
            if self._stopping.is_set():
                return  # woken by the stop: run() logs the last summary
            self.log_summary()

    async def _sleep(self, seconds: float, *, wakeable: bool) -> None:
        assert self._stopping is not None and self._wake is not None
        waits = [asyncio.create_task(self._stopping.wait())]
        if wakeable:
            waits.append(asyncio.create_task(self._wake.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds)
        finally:
            for task in waits:
                task.cancel()

    # -- one round -------------------------------------------------------------

    def ship_once(self) -> int:
        """Run one round (plan, one PutRecords call, acks); returns batches acked."""
        return self._ship_round().acked

    def _ship_round(self) -> _Round:
        cfg = self.config
        client = self._get_client()
        with self._state:
            pending = self.spool.peek(
                limit=_SCAN_CALLS * cfg.max_records_per_call, exclude=self._in_flight
            )
            plan = plan_call(
                pending,
                blocked_keys=self._in_flight_keys,
                strict_key_order=cfg.strict_key_order,
                max_records=cfg.max_records_per_call,
                max_call_bytes=cfg.max_bytes_per_call,
                max_record_bytes=cfg.max_record_bytes,
                budget_bytes=cfg.max_in_flight_bytes - self._in_flight_bytes,
            )
            for info in plan.batches:
                self._in_flight[info.batch_id] = info
                self._in_flight_keys[info.partition_key] += 1
                self._in_flight_bytes += info.payload_len
        set_aside = self._set_aside_too_large(plan.too_large)
        try:
            batches = [b for b in (self.spool.load(info) for info in plan.batches) if b]
            if not batches:
                return _Round(set_aside=set_aside)
            return self._put(client, batches)
        finally:
            with self._state:
                for info in plan.batches:
                    del self._in_flight[info.batch_id]
                    self._in_flight_keys[info.partition_key] -= 1
                    if not self._in_flight_keys[info.partition_key]:
                        del self._in_flight_keys[info.partition_key]
                    self._in_flight_bytes -= info.payload_len

    def _set_aside_too_large(self, batches: list[PendingBatch]) -> int:
        for info in batches:
            if self.spool.set_aside(info.batch_id, "record_too_large"):
                with self._state:
                    self._c.rejected_too_large += 1
                log.error(
                    "batch_too_large",
                    batch_id=info.batch_id,
                    payload_bytes=info.payload_len,
                    max_record_bytes=self.config.max_record_bytes,
                )
        return len(batches)

    def _put(self, client: Any, batches: list[SpooledBatch]) -> _Round:
        records = [
            {"Data": b.payload, "PartitionKey": b.partition_key} for b in batches
        ]
        with self._state:
            self._c.calls += 1
        try:
            response = client.put_records(
                Records=records, **self.config.stream_params()
            )
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code") or "Unknown")
            return self._call_failed(code, batches, exc)
        except botocore.exceptions.BotoCoreError as exc:
            return self._call_failed(type(exc).__name__, batches, exc)
        results = response.get("Records")
        if not isinstance(results, list) or len(results) != len(batches):
            return self._call_failed(
                "BadResponse",
                batches,
                ValueError(f"{len(batches)} records sent, results: {results!r:.200}"),
            )
        acked: list[tuple[SpooledBatch, dict[str, Any]]] = []
        errors: collections.Counter[str] = collections.Counter()
        for batch, result in zip(batches, results, strict=True):
            code = result.get("ErrorCode")
            if code is None and result.get("SequenceNumber"):
                acked.append((batch, result))
            else:
                errors[str(code or "MissingResult")] += 1
        failed = sum(errors.values())
        if response.get("FailedRecordCount", 0) != failed:
            # The per-record results decide; the total is only cross-checked.
            log.warning(
                "ship_failed_count_mismatch",
                failed_record_count=response.get("FailedRecordCount"),
                failed_results=failed,
            )
        self.spool.ack(batch.batch_id for batch, _ in acked)
        now = self._clock()
        with self._state:
            self._c.batches_shipped += len(acked)
            self._c.bytes_shipped += sum(len(b.payload) for b, _ in acked)
            self._c.records_retried += failed
            self._c.record_errors.update(errors)
            self._c.throttled += sum(
                n for c, n in errors.items() if c in THROTTLING_CODES
            )
            if acked:
                self._last_success = now
        if acked:
            self._recovered(now)
        for batch, result in acked:
            log.debug(
                "batch_shipped",
                batch_id=batch.batch_id,
                seq=batch.seq,
                partition_key=batch.partition_key,
                bytes=len(batch.payload),
                shard_id=result.get("ShardId"),
                sequence_number=result.get("SequenceNumber"),
            )
        return _Round(attempted=len(batches), acked=len(acked), failed=failed)

    def _call_failed(
        self, code: str, batches: list[SpooledBatch], exc: BaseException
    ) -> _Round:
        now = self._clock()
        with self._state:
            self._c.calls_failed += 1
            self._c.call_errors[code] += 1
            self._c.records_retried += len(batches)
            first = self._failing_since is None
            if first:
                self._failing_since = now
            self._failing_calls += 1
        if first:
            # Once per outage: the counters carry the rest.
            log.warning(
                "ship_failing",
                stream=self.config.stream_label,
                code=code,
                detail=str(exc)[:300],
                batches=len(batches),
            )
        return _Round(attempted=len(batches), failed=len(batches))

    def _recovered(self, now: float) -> None:
        with self._state:
            since, calls = self._failing_since, self._failing_calls
            self._failing_since, self._failing_calls = None, 0
        if since is not None:
            log.info(
                "ship_recovered", failed_calls=calls, seconds=round(now - since, 3)
            )

    # -- the client --------------------------------------------------------------

    def _get_client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                client = self._client_factory(self.config)
                events = getattr(getattr(client, "meta", None), "events", None)
                if events is not None:
                    events.register(
                        "response-received.kinesis.PutRecords", self._on_attempt
                    )
                self._client = client
            return self._client

    def _close_client(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        close = getattr(client, "close", None)
        if close is not None:
            close()

    def _on_attempt(
        self,
        *,
        exception: BaseException | None = None,
        response_dict: dict[str, Any] | None = None,
        parsed_response: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        """botocore hook, once per HTTP attempt (retries included)."""
        code: str | None = None
        if exception is not None:
            code = type(exception).__name__
        elif response_dict is not None and response_dict.get("status_code", 200) >= 300:
            error = (parsed_response or {}).get("Error", {})
            code = str(error.get("Code") or f"HTTP{response_dict['status_code']}")
        with self._state:
            self._c.http_attempts += 1
            if code is not None:
                self._c.attempt_errors[code] += 1
                if code in THROTTLING_CODES:
                    self._c.throttled += 1

    # -- stats -------------------------------------------------------------------

    @property
    def stats(self) -> ShipperStats:
        """A consistent snapshot of counters and gauges."""
        with self._state:
            c = self._c
            return ShipperStats(
                calls=c.calls,
                calls_failed=c.calls_failed,
                http_attempts=c.http_attempts,
                transport_retries=max(0, c.http_attempts - c.calls),
                attempt_errors=dict(c.attempt_errors),
                batches_shipped=c.batches_shipped,
                records_shipped=c.batches_shipped,
                bytes_shipped=c.bytes_shipped,
                records_retried=c.records_retried,
                throttled=c.throttled,
                record_errors=dict(c.record_errors),
                call_errors=dict(c.call_errors),
                rejected_too_large=c.rejected_too_large,
                in_flight_batches=len(self._in_flight),
                in_flight_bytes=self._in_flight_bytes,
                seconds_since_success=(
                    None
                    if self._last_success is None
                    else self._clock() - self._last_success
                ),
            )

    def log_summary(self, *, force: bool = False) -> None:
        """Log one INFO ``ship_summary`` line with what changed since the last.

        Quiet when nothing moved and the spool is empty, unless ``force``.
        """
        now = self.stats
        before = self._last_summary
        self._last_summary = now

        def delta(name: str) -> int:
            value: int = getattr(now, name)
            return value - (getattr(before, name) if before else 0)

        spool = self.spool.stats
        moved = delta("calls") or delta("rejected_too_large")
        if not force and not moved and spool.count == 0:
            return
        log.info(
            "ship_summary",
            stream=self.config.stream_label,
            batches=delta("batches_shipped"),
            bytes=delta("bytes_shipped"),
            calls=delta("calls"),
            calls_failed=delta("calls_failed"),
            retried=delta("records_retried"),
            throttled=delta("throttled"),
            transport_retries=delta("transport_retries"),
            spool_count=spool.count,
            spool_bytes=spool.bytes,
            oldest_age_s=(
                None if spool.oldest_age_s is None else round(spool.oldest_age_s, 1)
            ),
        )
