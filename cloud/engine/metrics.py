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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pyspark.sql.streaming import StreamingQueryListener

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


class LagListener(StreamingQueryListener):
    """Forwards the source's MillisBehindLatest from progress events."""

    def __init__(self, publisher: MetricsPublisher, query_name: str) -> None:
        self.publisher = publisher
        self.query_name = query_name

    def onQueryStarted(self, event: Any) -> None:  # noqa: N802 - Spark's name
        pass

    def onQueryProgress(self, event: Any) -> None:  # noqa: N802
        progress = event.progress
        if progress.name != self.query_name:
            return
        lag = lag_from_progress(
            {"sources": [{"latestOffset": s.latestOffset} for s in progress.sources]}
        )
        if lag:
            self.publisher.publish_lag(lag)

    def onQueryIdle(self, event: Any) -> None:  # noqa: N802
        pass

    def onQueryTerminated(self, event: Any) -> None:  # noqa: N802
        pass
