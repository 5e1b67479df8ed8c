"""Engine counters and where they are published.

Everything that moves gets a counter: records read, batches accepted,
duplicates (within a micro-batch and across), invalid records by error
kind, late window partials, and the source's per-shard lag.  A
:class:`MetricsPublisher` receives them once per micro-batch;
:class:`LogPublisher` writes one structlog line, and a CloudWatch
publisher can take its place behind the same protocol.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from py4j.protocol import Py4JError
from pyspark.sql.streaming import StreamingQuery

from cloud.engine.kinesis import lag_from_progress

log = structlog.get_logger(__name__)


@dataclass
class EngineCounters:
    """Running totals since the engine started (plain integers)."""

    micro_batches: int = 0
    records: int = 0
    batches_accepted: int = 0
    duplicates_in_batch: int = 0
    duplicates_across: int = 0
    flows: int = 0
    invalid: collections.Counter[str] = field(default_factory=collections.Counter)
    late_partials: int = 0
    windows_closed: int = 0
    skipped_columns: int = 0
    future_flows: int = 0


class MetricsPublisher(Protocol):
    """Receives the counters after each micro-batch, and lag per progress."""

    def publish_batch(self, micro_batch: int, values: Mapping[str, Any]) -> None: ...

    def publish_lag(self, millis_behind_latest: Mapping[str, int]) -> None: ...


class LogPublisher:
    """One structlog event per micro-batch (``engine_batch``) and per lag
    report (``engine_lag``, at debug unless a shard is behind)."""

    def __init__(self) -> None:
        self.last_lag: dict[str, int] = {}

    def publish_batch(self, micro_batch: int, values: Mapping[str, Any]) -> None:
        log.info("engine_batch", micro_batch=micro_batch, **values)

    def publish_lag(self, millis_behind_latest: Mapping[str, int]) -> None:
        self.last_lag = dict(millis_behind_latest)
        worst = max(millis_behind_latest.values(), default=0)
        emit = log.info if worst > 0 else log.debug
        emit("engine_lag", max_millis_behind_latest=worst, shards=len(self.last_lag))


class FanoutPublisher:
    """Hands every figure to each of ``publishers`` (log line, CloudWatch)."""

    def __init__(self, publishers: list[MetricsPublisher]) -> None:
        self.publishers = list(publishers)

    def publish_batch(self, micro_batch: int, values: Mapping[str, Any]) -> None:
        for p in self.publishers:
            p.publish_batch(micro_batch, values)

    def publish_lag(self, millis_behind_latest: Mapping[str, int]) -> None:
        for p in self.publishers:
            p.publish_lag(millis_behind_latest)


class LagPoller:
    """Publishes the source's MillisBehindLatest from the query's last
    progress: one py4j call and its JSON, after every micro-batch (the
    progress then is the previous micro-batch's, one trigger late) and
    once when the engine stops.

    Not a ``StreamingQueryListener``: Spark builds a Python progress
    object for a listener with dozens of py4j calls, measured at about
    0.1 CPU-s per micro-batch, a fifth of a small micro-batch's cost.
    """

    def __init__(self, publisher: MetricsPublisher) -> None:
        self.publisher = publisher

    def poll(self, query: StreamingQuery) -> None:
        """Publish the lag of ``query``'s last progress, if it has one."""
        try:
            # The Java query's progress as JSON: pyspark's lastProgress
            # would build the same Python object a listener gets.
            progress = query._jsq.lastProgress()
            raw = None if progress is None else progress.json()
        except Py4JError as exc:
            log.debug("engine_lag_unavailable", error=str(exc))
            return
        if not raw:
            return
        lag = lag_from_progress(json.loads(raw))
        if lag:
            self.publisher.publish_lag(lag)
