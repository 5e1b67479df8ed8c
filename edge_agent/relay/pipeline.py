"""The relay's data path, wired in one place.

    UDP collector --batches of datagrams--> FlowDecoder.decode_many
        --> Aggregator (windows) --closed windows--> encode queue
        --> RelayFilter (score, express rows, roll up the rest)
        --> encode_batches (per window and exporter: express rows first)
        --> Spool.append --> KinesisShipper (asyncio task reading the spool)

The filter (:attr:`RelayPipeline.filter`, settings ``[filter]``) scores
each closed window's host windows with the TFLite model.  Rows of hosts at
or above the alert threshold keep their detail and are encoded, spooled
and handed to the shipper before anything else of the window; the other
rows are rolled up (client source ports dropped, totals exact).  Batches
carry the model version in their header and each row's host-window score
in the ``score`` column.  No model, a model that fails or gives NaN: the
rows pass through unfiltered, without scores, counted by reason.  The
model is swapped at run time with ``pipeline.filter.swap_model(manifest)``
(thread-safe; what edge_agent.modelsync's FilterInstaller calls).

Threads and tasks: the collector, the decoder, the aggregator and the
watermark tick run in the event loop; filtering, encoding and the spool's
fsyncs run in one worker thread (``asyncio.to_thread``) so they never
stall receiving; the shipper runs its calls in its own worker threads; the
metrics server has its own thread and only reads.

Bounds: the collector bounds datagrams waiting for decode (dropped past
it, counted); the aggregator bounds its keys (early flush, counted); the
encode queue holds at most :data:`ENCODE_QUEUE_WINDOWS` closed windows and
blocks the decoder when full, which backs up into the collector's bound;
the spool bounds its bytes (its full policy, counted).

Stopping (:meth:`RelayPipeline.stop`): the collector closes its sockets
and hands over what it received, the aggregator flushes every open
window, the encoder spools them, the shipper gets ``drain_s`` seconds to
send what it can, and everything left stays in the spool for the next
start.  Nothing accepted is dropped by a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog
from prometheus_client import CollectorRegistry

from edge_agent.aggregate import AggregatedWindow, Aggregator
from edge_agent.collect.datagram import Datagram
from edge_agent.collect.udp import UdpCollector
from edge_agent.filter import RelayFilter
from edge_agent.flows.decoder import FlowDecoder
from edge_agent.relay.config import Settings
from edge_agent.relay.encode import WindowEncoder, split_by_exporter
from edge_agent.relay.metrics import (
    EncodeStats,
    LogSampler,
    MetricsServer,
    RelayCollector,
)
from edge_agent.ship import KinesisShipper, make_kinesis_client
from edge_agent.spool import (
    Spool,
    SpooledBatch,
    SpoolError,
    SpoolFullError,
    SpoolWriteError,
)
from edge_agent.wire import EncodedBatch

log = structlog.get_logger(__name__)

__all__ = ["ENCODE_QUEUE_WINDOWS", "RelayPipeline", "split_by_exporter"]

#: Closed windows waiting for the encoder.  A window is one aggregation
#: period of every exporter, so 16 is minutes of backlog at the default
#: 10 s; a guess, sized so a slow disk stalls decoding before memory grows.
ENCODE_QUEUE_WINDOWS = 16
#: Seconds between two summary lines in the log.
SUMMARY_INTERVAL_S = 60.0
#: Seconds between two writes of the canary rows (and at stop).
CANARY_INTERVAL_S = 60.0
#: Feature rows kept for the canary (the model-update canary reads 5,000).
CANARY_ROWS = 5_000


class RelayPipeline:
    """Collector to Kinesis; see the module docstring.

    The constructor only builds the components (nothing is bound or
    opened); :meth:`start` opens the spool, starts the shipper, the
    encoder, the watermark tick, the collector and the metrics endpoint;
    :meth:`stop` drains and closes in the reverse order.  ``clock``
    returns seconds since the epoch (the aggregator's watermark).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        client_factory: Callable[[Any], Any] = make_kinesis_client,
        tick_s: float = 1.0,
        drain_s: float = 5.0,
    ) -> None:
        self.settings = settings
        #: raises ConfigError naming relay.tenant_id when it is not set
        self.tenant_id = settings.require_tenant()
        self._clock = clock
        self._client_factory = client_factory
        self.tick_s = tick_s
        self.drain_s = drain_s
        agg = settings.aggregate
        self.decoder = FlowDecoder(settings.decoder.decoder_config())
        self.aggregator = Aggregator(
            window_ms=max(1, round(agg.window_s * 1000)),
            max_keys=agg.max_keys,
            lateness_ms=round(agg.lateness_s * 1000),
        )
        self.collector = UdpCollector(
            settings.collector.collector_config(), self._on_datagrams
        )
        f = settings.filter
        #: the scoring filter (None when disabled); its model is loaded by
        #: start() and swapped with ``filter.swap_model(manifest_path)``
        self.filter: RelayFilter | None = (
            RelayFilter(
                f.networks, alert_threshold=f.threshold, history_rows=f.history_rows
            )
            if f.enabled
            else None
        )
        self.window_encoder = WindowEncoder(
            self.tenant_id,
            settings.relay.relay_id,
            settings.kinesis.partition_key,
            self.filter,
            format_major=settings.relay.wire_format,
        )
        self.encode_stats = EncodeStats()
        self.spool: Spool | None = None
        self.shipper: KinesisShipper | None = None
        self.registry = CollectorRegistry()
        self.registry.register(RelayCollector(self))
        metrics = settings.metrics
        self.metrics: MetricsServer | None = (
            MetricsServer(
                self.registry, self.health, metrics.listen_address, metrics.port
            )
            if metrics.enabled
            else None
        )
        self._queue: asyncio.Queue[AggregatedWindow | None] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started_at: float | None = None
        self._sampler = LogSampler()
        self._last_summary = 0.0
        self._canary_written = time.monotonic()

    # -- life cycle ---------------------------------------------------------

    @property
    def uptime_s(self) -> float:
        """Seconds since :meth:`start` (0 before)."""
        if self._started_at is None:
            return 0.0
        return max(0.0, time.monotonic() - self._started_at)

    @property
    def encode_queue_size(self) -> int:
        """Closed windows waiting for the encoder."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Open, bind and start everything; on failure undo and re-raise.

        Raises the components' own errors: ``SpoolLockedError`` (another
        relay uses the spool), ``CollectorError`` (a port cannot be bound),
        ``OSError`` (the metrics port).
        """
        s = self.settings
        log.info(
            "relay_starting",
            tenant_id=self.tenant_id,
            relay_id=s.relay.relay_id,
            spool=str(s.spool_dir),
            stream=s.kinesis.stream_name or s.kinesis.stream_arn,
        )
        self._started_at = time.monotonic()
        self._queue = asyncio.Queue(ENCODE_QUEUE_WINDOWS)
        try:
            await self._load_model()
            try:
                self.spool = await asyncio.to_thread(
                    Spool, s.spool_dir, s.spool.max_bytes, s.spool.full_policy
                )
            except (FileExistsError, NotADirectoryError) as exc:
                # mkdir's own message names neither the setting nor why.
                what = (
                    f"{exc.filename} is a file"
                    if isinstance(exc, FileExistsError)
                    else f"a folder on the path {exc.filename} is a file"
                )
                raise OSError(
                    f"spool.dir={str(s.spool_dir)!r}: {what}, not a directory"
                ) from exc
            self.shipper = KinesisShipper(
                self.spool, s.kinesis.shipper_config(), self._client_factory
            )
            self._tasks["shipper"] = asyncio.create_task(self.shipper.run())
            self._tasks["encoder"] = asyncio.create_task(self._encode_loop())
            self._tasks["tick"] = asyncio.create_task(self._tick_loop())
            await self.collector.start()
            if self.metrics is not None:
                try:
                    self.metrics.start()
                except OSError as exc:
                    in_use = exc.errno == errno.EADDRINUSE
                    raise OSError(
                        f"metrics.port={s.metrics.port} on "
                        f"{s.metrics.listen_address} "
                        + (
                            "is in use"
                            if in_use
                            else f"cannot be bound: {exc.strerror}"
                        )
                        + " (set metrics.port, or metrics.enabled = false)"
                    ) from exc
        except BaseException:
            await self._close(drain=False)
            raise
        log.info(
            "relay_started",
            listen=[f"{h}:{p}" for h, p in self.collector.listening],
            metrics=(
                f"{s.metrics.listen_address}:{self.metrics.port}"
                if self.metrics is not None
                else None
            ),
            window_s=s.aggregate.window_s,
        )

    async def _load_model(self) -> None:
        """Load the filter's model; without one the filter passes through."""
        if self.filter is None or self.filter.model is not None:
            return
        path = self.settings.filter_model
        if path is None:
            log.warning(
                "filter_model_missing",
                knob="filter.model",
                detail="no shipped relay model found; rows pass through unfiltered",
            )
            self.filter.counters.model_load_failures["missing"] += 1
            return
        if not await asyncio.to_thread(self.filter.swap_model, path):
            log.warning("filter_model_unusable", model=str(path), knob="filter.model")

    async def stop(self) -> None:
        """Drain and stop; everything accepted ends up shipped or spooled."""
        log.info("relay_stopping")
        await self._close(drain=True)
        e = self.encode_stats
        log.info(
            "relay_stopped",
            records=self.aggregator.stats.records_in,
            rows=self.aggregator.stats.records_out,
            batches=e.batches,
            spooled=e.spooled,
            dropped=sum(e.dropped.values()),
            datagrams_dropped=sum(self.collector.stats.totals().dropped.values()),
            shipped=self.shipper.stats.batches_shipped if self.shipper else 0,
        )

    async def _close(self, drain: bool) -> None:
        # The tick first: nothing may be queued behind the final sentinel.
        await _cancel(self._tasks.pop("tick", None))
        await self.collector.stop()  # hands over what it received
        encoder = self._tasks.get("encoder")
        if drain and self._queue is not None and encoder is not None:
            for window in [*self.aggregator.flush(), None]:
                if encoder.done():  # cannot happen: the loop catches errors
                    break
                await self._queue.put(window)
            await encoder
            await asyncio.to_thread(self.write_canary_rows)
        await _cancel(self._tasks.pop("encoder", None))
        if drain and self.spool is not None and self.shipper is not None:
            await self._drain()
        shipper_task = self._tasks.pop("shipper", None)
        if self.shipper is not None:
            await self.shipper.stop()
        if shipper_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await shipper_task
        if self.metrics is not None:
            self.metrics.stop()
        if self.spool is not None:
            self.spool.close()

    async def _drain(self) -> None:
        """Let the shipper send what is spooled, for at most ``drain_s``."""
        assert self.spool is not None and self.shipper is not None
        deadline = time.monotonic() + self.drain_s
        self.shipper.notify()
        while self.spool.stats.count and time.monotonic() < deadline:
            if self._tasks["shipper"].done():
                return
            await asyncio.sleep(0.05)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, details) for /healthz: unhealthy once a task died."""
        dead = [name for name, task in self._tasks.items() if task.done()]
        details: dict[str, Any] = {
            "uptime_s": round(self.uptime_s, 1),
            "listening": [f"{h}:{p}" for h, p in self.collector.listening],
            "open_windows": self.aggregator.open_windows,
            "dead_tasks": dead,
        }
        if self.spool is not None:
            stats = self.spool.stats
            details["spool_batches"] = stats.count
            details["spool_oldest_age_s"] = stats.oldest_age_s
        if self.shipper is not None:
            details["seconds_since_ship"] = self.shipper.stats.seconds_since_success
        healthy = self._started_at is not None and bool(self.collector.listening)
        return healthy and not dead, details

    # -- the data path ------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def _on_datagrams(self, batch: list[Datagram]) -> None:
        """Collector consumer: decode, aggregate, queue closed windows."""
        records = self.decoder.decode_many(batch)
        # One receive time per batch: the collector hands batches over
        # within batch_interval (50 ms), far below a window.
        received = max(d.received_ms for d in batch)
        windows = self.aggregator.add(records, received)
        windows += self.aggregator.advance(self._now_ms())
        await self._enqueue(windows)

    async def _enqueue(self, windows: list[AggregatedWindow]) -> None:
        assert self._queue is not None
        for window in windows:
            # Blocks when the encoder is behind: back-pressure onto the
            # collector, whose own bound then drops (and counts).
            await self._queue.put(window)

    async def _tick_loop(self) -> None:
        """Move the watermark with the clock, so quiet windows close too."""
        while True:
            await asyncio.sleep(self.tick_s)
            await self._enqueue(self.aggregator.advance(self._now_ms()))
            now = time.monotonic()
            if now - self._last_summary >= SUMMARY_INTERVAL_S:
                self._last_summary = now
                self._log_summary()

    async def _encode_loop(self) -> None:
        assert self._queue is not None
        while True:
            window = await self._queue.get()
            if window is None:
                return
            try:
                await asyncio.to_thread(self.encode_window, window)
            except Exception as exc:  # a bug: count it, keep the relay up
                rows = int(window.records.shape[0])
                self._drop("encoder_bug", 1, rows, exc)
                log.exception("encoder_bug", rows=rows)
            if self.shipper is not None:
                self.shipper.notify()

    def encode_window(self, window: AggregatedWindow) -> None:
        """Filter one window, encode it (one batch or more per exporter) and
        spool it: the express rows first, the shipper woken for them before
        the rest is encoded (:class:`~edge_agent.relay.encode.WindowEncoder`).

        Failures are counted by reason in :attr:`encode_stats` and logged
        through a sampler; they never raise.
        """
        assert self.spool is not None
        e = self.encode_stats
        express_spooled = woken = False
        try:
            for group in self.window_encoder.encode(window, self.spool.next_seq):
                if express_spooled and not group.express and not woken:
                    woken = True
                    if self.shipper is not None:
                        self.shipper.notify()  # thread-safe
                if group.error is not None:
                    self._drop("encode_error", 1, group.rows, group.error)
                    continue
                e.rows += group.rows
                if group.express:
                    e.express_rows += group.rows
                    express_spooled = True
                for batch in group.batches:
                    self._spool(batch)
        finally:
            # Counted once its batches are spooled (or it failed), as the
            # windows_encoded_total metric says: a reader that sees every
            # window encoded and the spool empty has seen them shipped.
            e.windows += 1
        log.debug(
            "window_spooled",
            start_ms=window.start_ms,
            rows=int(window.records.shape[0]),
            reason=window.reason.value,
        )
        if time.monotonic() - self._canary_written >= CANARY_INTERVAL_S:
            self.write_canary_rows()

    def write_canary_rows(self) -> bool:
        """Write the filter's recent feature rows for the model-update
        canary (``.npz`` with ``values``, ``spec_version``, ``window_s``, as
        edge_agent.modelsync reads them), atomically; False if there are
        none yet.  Runs in the encode thread, which owns the filter's
        state; a failure is logged, never raised."""
        self._canary_written = time.monotonic()
        rows = self.filter.recent_windows() if self.filter is not None else None
        if rows is None or len(rows) == 0:
            return False
        path = self.settings.canary_rows_path
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as fh:
                np.savez(
                    fh,
                    values=rows.values[-CANARY_ROWS:],
                    spec_version=np.int64(rows.spec_version),
                    window_s=np.int64(rows.window_s),
                )
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("canary_rows_unwritable", path=str(path), error=str(exc))
            return False
        return True

    def _spool(self, batch: EncodedBatch) -> None:
        assert self.spool is not None
        e = self.encode_stats
        e.batches += 1
        e.batch_bytes += batch.record_bytes
        spooled = SpooledBatch(
            str(batch.header.batch_id),
            batch.partition_key,
            batch.data,
            batch.header.seq,
        )
        try:
            self.spool.append(spooled)
        except SpoolFullError as exc:
            self._drop("spool_full", 1, batch.header.record_count, exc)
            return
        except SpoolWriteError as exc:
            self._drop("spool_write_error", 1, batch.header.record_count, exc)
            return
        except SpoolError as exc:  # order or duplicate: a bug here
            self._drop("spool_error", 1, batch.header.record_count, exc)
            return
        e.spooled += 1
        e.spooled_rows += batch.header.record_count
        # The crash tests read accepted batch ids from this line.
        log.debug(
            "batch_spooled",
            batch_id=spooled.batch_id,
            seq=spooled.seq,
            rows=batch.header.record_count,
        )

    def _drop(self, reason: str, batches: int, rows: int, exc: Exception) -> None:
        self.encode_stats.dropped[reason] += batches
        self.encode_stats.dropped_rows[reason] += rows
        suppressed = self._sampler.allow(reason)
        if suppressed is not None:
            log.error(
                "batch_dropped",
                reason=reason,
                rows=rows,
                error=str(exc),
                suppressed=suppressed,
            )

    def _log_summary(self) -> None:
        a = self.aggregator.stats
        e = self.encode_stats
        log.info(
            "relay_summary",
            datagrams=sum(
                c.datagrams for c in list(self.collector.stats.ports.values())
            ),
            records=a.records_in,
            rows=a.records_out,
            batches=e.batches,
            spooled=e.spooled,
            dropped=sum(e.dropped.values()),
            spool_batches=self.spool.stats.count if self.spool else 0,
        )


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
