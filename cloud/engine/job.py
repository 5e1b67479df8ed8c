"""The engine's streaming query: Kinesis → decode → dedup → estimates.

One query reads the stream (:mod:`cloud.engine.kinesis`) and hands every
micro-batch to :class:`MicroBatchProcessor` (``foreachBatch``), which:

1. decodes the records on the executors and sums their flows' estimator
   statistics per event-time window, record by record
   (:func:`cloud.engine.transform.summarize_partition`, ``mapInArrow``);
   one Spark job, no shuffle: only batch headers, window sums and
   invalid-record rows reach the driver;
2. sets invalid records aside with shard and sequence number, and counts
   them by error kind (the stream goes on);
3. drops duplicate relay batches: within the micro-batch the record with
   the lowest (shard, sequence number) wins, across micro-batches the
   store's ledger decides (:mod:`cloud.engine.store`);
4. adds up the window sums of the accepted records per tenant and window,
   stores them keyed by micro-batch, closes windows behind the tenant's
   watermark, and writes the updated estimates to the sink;
5. hands the accepted records' flow rows to the flow consumers, if any
   (the seam for scoring and detections).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming import StreamingQuery

from cloud.engine.config import EngineConfig
from cloud.engine.estimates import STAT_FIELDS, z_for
from cloud.engine.kinesis import SOURCE_NAME
from cloud.engine.metrics import (
    EngineCounters,
    LagListener,
    LogPublisher,
    MetricsPublisher,
)
from cloud.engine.sinks import EstimateSink, JsonLinesSink, MemorySink, estimate_windows
from cloud.engine.spark import build_spark_session
from cloud.engine.store import (
    BatchClaim,
    EngineStore,
    InvalidRecord,
    SqliteStore,
    WindowPartial,
)
from cloud.engine.transform import (
    FLOW_SCHEMA,
    KIND_BATCH,
    KIND_INVALID,
    KIND_WINDOW,
    SUMMARY_SCHEMA,
    flows_partition,
    summarize_partition,
)

log = structlog.get_logger(__name__)

#: Called with the accepted flow rows of each micro-batch and its id.
FlowConsumer = Callable[[DataFrame, int], None]


@dataclass
class BatchReport:
    """What one micro-batch did (also the ``engine_batch`` log fields)."""

    micro_batch: int
    records: int = 0
    batches_accepted: int = 0
    duplicates_in_batch: int = 0
    duplicates_across: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    flows: int = 0
    windows_updated: int = 0
    windows_closed: int = 0
    late_partials: int = 0
    decode_ms: float = 0.0  # the Spark job: read, decode, window sums
    store_ms: float = 0.0  # dedup, partials, watermarks, sink (driver)
    consumers_ms: float = 0.0
    total_ms: float = 0.0


class MicroBatchProcessor:
    """The ``foreachBatch`` function; see the module docstring.

    Spark calls it on the driver, one micro-batch at a time, with the
    micro-batch id that a replay after a restart repeats.
    """

    def __init__(
        self,
        config: EngineConfig,
        store: EngineStore,
        sink: EstimateSink,
        publisher: MetricsPublisher,
        flow_consumers: Sequence[FlowConsumer] = (),
    ) -> None:
        self.config = config
        self.store = store
        self.sink = sink
        self.publisher = publisher
        self.flow_consumers = tuple(flow_consumers)
        self.counters = EngineCounters()
        self.reports: list[BatchReport] = []
        self._z = z_for(config.confidence)

    def __call__(self, df: DataFrame, micro_batch: int) -> None:
        self.process(df, micro_batch)

    def accepted_flows(
        self, df: DataFrame, accepted: frozenset[tuple[str, str]]
    ) -> DataFrame:
        """Flow rows (:data:`FLOW_SCHEMA`) of the source rows ``df`` whose
        (shard, sequence number) is in ``accepted``."""
        return df.mapInArrow(partial(flows_partition, accepted=accepted), FLOW_SCHEMA)

    def process(self, df: DataFrame, micro_batch: int) -> BatchReport:
        """Process one micro-batch; returns (and keeps) its report."""
        started = time.perf_counter()
        report = BatchReport(micro_batch)
        if self.flow_consumers:
            # Read the source once for the summary and the flows.
            df = df.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            summarize = partial(
                summarize_partition,
                size_ms=self.config.window_s * 1000,
                slide_ms=self.config.slide_s * 1000,
            )
            rows = df.mapInArrow(summarize, SUMMARY_SCHEMA).collect()
            report.decode_ms = (time.perf_counter() - started) * 1000
            t_store = time.perf_counter()
            invalid = [
                InvalidRecord(r.shard_id, r.sequence_number, r.error_kind, r.error)
                for r in rows
                if r.kind == KIND_INVALID
            ]
            report.records = len(invalid) + sum(1 for r in rows if r.kind == KIND_BATCH)
            claims, record_counts = self._first_claims(rows, report)
            if invalid:
                self.store.set_aside(micro_batch, invalid)
            owned = self.store.claim_batches(micro_batch, claims) if claims else set()
            accepted = frozenset(
                (c.shard_id, c.sequence_number) for c in claims if c.batch_id in owned
            )
            report.batches_accepted = len(accepted)
            report.duplicates_across = len(claims) - len(accepted)
            report.flows = sum(record_counts[key] for key in accepted)
            partials = self._partials(rows, accepted)
            refused = self.store.add_partials(micro_batch, partials)
            report.late_partials = len(refused)
            latest: dict[str, int] = {}
            for p in partials:
                latest[p.tenant_id] = max(
                    latest.get(p.tenant_id, p.max_time_ms), p.max_time_ms
                )
            closed = self.store.advance_watermarks(
                self.config.lateness_s * 1000, latest
            )
            refused_keys = {(p.tenant_id, p.window_start_ms) for p in refused}
            touched = {
                (p.tenant_id, p.window_start_ms) for p in partials
            } - refused_keys
            totals = self.store.window_totals(touched | set(closed))
            self.sink.write(estimate_windows(totals, self.config.confidence, self._z))
            report.windows_updated = len(touched)
            report.windows_closed = len(closed)
            report.store_ms = (time.perf_counter() - t_store) * 1000
            if self.flow_consumers and accepted:
                t_flows = time.perf_counter()
                flows = self.accepted_flows(df, accepted)
                for consume in self.flow_consumers:
                    consume(flows, micro_batch)
                report.consumers_ms = (time.perf_counter() - t_flows) * 1000
        finally:
            if self.flow_consumers:
                df.unpersist()
        report.total_ms = (time.perf_counter() - started) * 1000
        self._count(report, invalid)
        return report

    def _first_claims(
        self, rows: list[Any], report: BatchReport
    ) -> tuple[list[BatchClaim], dict[tuple[str, str], int]]:
        """One claim per relay batch id: the lowest (shard, sequence) record;
        and the flow count of every valid record."""
        batches = sorted(
            (r for r in rows if r.kind == KIND_BATCH),
            key=lambda r: (r.shard_id, int(r.sequence_number)),
        )
        claims: dict[str, BatchClaim] = {}
        counts: dict[tuple[str, str], int] = {}
        for r in batches:
            counts[(r.shard_id, r.sequence_number)] = int(r.record_count)
            self.counters.skipped_columns += int(r.skipped_columns or 0)
            if r.batch_id in claims:
                report.duplicates_in_batch += 1
                continue
            claims[r.batch_id] = BatchClaim(
                batch_id=r.batch_id,
                tenant_id=r.tenant_id,
                relay_id=r.relay_id,
                relay_seq=int(r.relay_seq),
                shard_id=r.shard_id,
                sequence_number=r.sequence_number,
            )
        return list(claims.values()), counts

    def _partials(
        self, rows: list[Any], accepted: frozenset[tuple[str, str]]
    ) -> list[WindowPartial]:
        """Sum the window rows of the accepted records per (tenant, window)."""
        sums: dict[tuple[str, int], dict[str, float]] = {}
        ends: dict[tuple[str, int], int] = {}
        for r in rows:
            if r.kind != KIND_WINDOW or (r.shard_id, r.sequence_number) not in accepted:
                continue
            key = (r.tenant_id, int(r.w_start_ms))
            ends[key] = int(r.w_end_ms)
            acc = sums.setdefault(key, {"max_time_ms": float("-inf"), "flows": 0.0})
            acc["max_time_ms"] = max(acc["max_time_ms"], float(r.w_max_time_ms))
            acc["flows"] += float(r.w_flows)
            for name in STAT_FIELDS:
                acc[name] = acc.get(name, 0.0) + float(r[f"st_{name}"])
        return [
            WindowPartial(
                tenant_id=tenant,
                window_start_ms=start,
                window_end_ms=ends[(tenant, start)],
                max_time_ms=int(acc["max_time_ms"]),
                flows=int(acc["flows"]),
                stats={name: acc[name] for name in STAT_FIELDS},
            )
            for (tenant, start), acc in sorted(sums.items())
        ]

    def _count(self, report: BatchReport, invalid: list[InvalidRecord]) -> None:
        c = self.counters
        c.micro_batches += 1
        c.records += report.records
        c.batches_accepted += report.batches_accepted
        c.duplicates_in_batch += report.duplicates_in_batch
        c.duplicates_across += report.duplicates_across
        c.flows += report.flows
        c.late_partials += report.late_partials
        c.windows_closed += report.windows_closed
        for r in invalid:
            c.invalid[r.error_kind] += 1
            report.invalid[r.error_kind] = report.invalid.get(r.error_kind, 0) + 1
        if invalid:
            first = invalid[0]
            log.warning(
                "engine_invalid_records",
                count=len(invalid),
                kinds=report.invalid,
                shard=first.shard_id,
                sequence_number=first.sequence_number,
                error=first.error,
            )
        self.reports.append(report)
        values = {k: v for k, v in vars(report).items() if k != "micro_batch"}
        self.publisher.publish_batch(report.micro_batch, values)


@dataclass
class Engine:
    """A started engine: the query and the parts behind it."""

    query: StreamingQuery
    processor: MicroBatchProcessor
    store: SqliteStore
    listener: LagListener
    spark: SparkSession

    def close(self) -> None:
        """Stop the query if it runs, detach the listener, close the store."""
        if self.query.isActive:
            self.query.stop()
        self.spark.streams.removeListener(self.listener)
        self.store.close()


def start_engine(
    config: EngineConfig,
    *,
    spark: SparkSession | None = None,
    sink: EstimateSink | None = None,
    publisher: MetricsPublisher | None = None,
    flow_consumers: Sequence[FlowConsumer] = (),
    available_now: bool = False,
) -> Engine:
    """Start the streaming query (``available_now``: read what the stream
    holds now, then stop; else a micro-batch every trigger interval)."""
    if spark is None:
        spark = build_spark_session(
            master=config.master, shuffle_partitions=config.shuffle_partitions
        )
    store = SqliteStore(config.resolved_state_path)
    if sink is None:
        sink = (
            JsonLinesSink(config.estimates_path)
            if config.estimates_path
            else MemorySink()
        )
    publisher = publisher or LogPublisher()
    processor = MicroBatchProcessor(config, store, sink, publisher, flow_consumers)
    pruned = store.prune(int((time.time() - config.dedup_horizon_s) * 1000))
    listener = LagListener(publisher, config.query_name)
    spark.streams.addListener(listener)
    reader = spark.readStream.format(SOURCE_NAME)
    for key, value in config.source_options().items():
        reader = reader.option(key, value)
    writer = (
        reader.load()
        .writeStream.queryName(config.query_name)
        .foreachBatch(processor)
        .option("checkpointLocation", config.checkpoint_dir)
    )
    if available_now:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=f"{config.trigger_interval_s} seconds")
    query = writer.start()
    log.info(
        "engine_start",
        stream=config.stream_name,
        checkpoint=config.checkpoint_dir,
        state=str(config.resolved_state_path),
        ledger_pruned=pruned,
        available_now=available_now,
    )
    return Engine(query, processor, store, listener, spark)
