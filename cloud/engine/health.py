"""The engine's status on the driver: Prometheus ``/metrics`` and ``/healthz``.

:class:`StatusPublisher` is one more :class:`~cloud.engine.metrics.
MetricsPublisher`: it keeps the last micro-batch's report, running totals
and the source's lag.  :class:`EngineCollector` turns them into metric
families (prefix ``sampleflow_engine_``) and :func:`engine_health` into
the ``/healthz`` answer; the HTTP server is the relay's
(:class:`edge_agent.relay.metrics.MetricsServer`, one implementation).

Healthy means the streaming query is running and is not stuck: stuck is
a trigger (Spark's ``isTriggerActive``: reading offsets, running a
micro-batch) seen busy for longer than ``stale_after_s``
(:func:`stale_after_s`: ten trigger intervals, at least 60 s) with no
micro-batch finishing meanwhile.  An idle stream (no records, so no
micro-batches; the trigger only looks for data and goes quiet) stays
healthy and says ``idle_s``.  The trigger is looked at when ``/healthz``
is asked, so a stretch busy from before the first probe is counted from
that probe.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "sampleflow_engine_"

#: Report fields summed into ``<PREFIX><name>_total`` counters.
_TOTALS: dict[str, str] = {
    "records": "Kinesis records (relay batches) read",
    "batches_accepted": "relay batches accepted (not duplicates, valid)",
    "duplicates_in_batch": "duplicate relay batches within a micro-batch",
    "duplicates_across": "duplicate relay batches across micro-batches",
    "flows": "flow rows of accepted batches",
    "future_flows": "flow rows left out: times too far past their Kinesis arrival",
    "windows_closed": "estimate windows closed (final)",
    "late_partials": "window sums refused: their window had closed",
    "late_feature_rows": "flow rows left out of closed feature windows",
    "host_windows": "host feature rows of closed feature windows",
    "scored": "host windows scored",
    "detections": "detections written (or counted without a store)",
    "scoring_rejected": "host windows the model service refused",
    "scoring_unavailable": "micro-batches that found scoring or its store down",
    "state_trouble": "tenant state updates refused or failed",
}


#: Gauges of the last micro-batch: name -> (report field, scale, help).
_LAST: dict[str, tuple[str, float, str]] = {
    "last_micro_batch_duration_seconds": (
        "total_ms",
        0.001,
        "running time of the last micro-batch, s",
    ),
    "last_micro_batch_records": (
        "records",
        1.0,
        "Kinesis records (input rows) of the last micro-batch",
    ),
    "last_micro_batch_flows": (
        "flows",
        1.0,
        "accepted flow rows of the last micro-batch",
    ),
    "unscored_host_windows": (
        "unscored",
        1.0,
        "host windows pending scoring after the last micro-batch",
    ),
    "estimates_deferred": (
        "estimates_deferred",
        1.0,
        "estimates kept in memory while the store is down",
    ),
}

#: Staleness threshold: this many trigger intervals, and at least the floor.
STALE_TRIGGERS = 10
STALE_FLOOR_S = 60.0


def stale_after_s(trigger_interval_s: float) -> float:
    """Seconds without a finished micro-batch after which a running
    query is reported unhealthy: 10 trigger intervals, at least 60 s."""
    return max(STALE_FLOOR_S, STALE_TRIGGERS * trigger_interval_s)


@dataclass
class StatusSnapshot:
    """A consistent copy of what :class:`StatusPublisher` holds."""

    micro_batches: int
    totals: dict[str, float]
    invalid: dict[str, int]
    last: dict[str, Any]  # the last micro-batch's report fields
    last_micro_batch: int | None
    last_batch_at: float | None  # time.time() when it finished
    lag_ms: dict[str, int]  # MillisBehindLatest per shard
    started_at: float  # time.time() when the publisher was made


@dataclass
class StatusPublisher:
    """Keeps what the status endpoint shows (thread-safe: micro-batches,
    the lag poll and HTTP requests run on different threads).
    ``clock`` is time.time (seconds), replaceable in tests."""

    clock: Callable[[], float] = time.time
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _micro_batches: int = 0
    _totals: dict[str, float] = field(default_factory=dict)
    _invalid: collections.Counter[str] = field(default_factory=collections.Counter)
    _last: dict[str, Any] = field(default_factory=dict)
    _last_micro_batch: int | None = None
    _last_batch_at: float | None = None
    _lag_ms: dict[str, int] = field(default_factory=dict)
    _started_at: float = field(init=False, default=0.0)
    _busy_since: float | None = None

    def __post_init__(self) -> None:
        self._started_at = self.clock()

    def publish_batch(self, micro_batch: int, values: Mapping[str, Any]) -> None:
        with self._lock:
            self._micro_batches += 1
            for name in _TOTALS:
                added = float(values.get(name, 0) or 0)
                self._totals[name] = self._totals.get(name, 0.0) + added
            for kind, count in dict(values.get("invalid") or {}).items():
                self._invalid[str(kind)] += int(count)
            self._last = dict(values)
            self._last_micro_batch = micro_batch
            self._last_batch_at = self.clock()

    def note_trigger(self, active: bool) -> float | None:
        """Record whether Spark's trigger is busy now; return since when it
        has been seen busy without a break (None while it is not)."""
        with self._lock:
            if not active:
                self._busy_since = None
            elif self._busy_since is None:
                self._busy_since = self.clock()
            return self._busy_since

    def publish_lag(self, millis_behind_latest: Mapping[str, int]) -> None:
        with self._lock:
            self._lag_ms = {str(k): int(v) for k, v in millis_behind_latest.items()}

    def snapshot(self) -> StatusSnapshot:
        """The figures as of now."""
        with self._lock:
            return StatusSnapshot(
                micro_batches=self._micro_batches,
                totals=dict(self._totals),
                invalid=dict(self._invalid),
                last=dict(self._last),
                last_micro_batch=self._last_micro_batch,
                last_batch_at=self._last_batch_at,
                lag_ms=dict(self._lag_ms),
                started_at=self._started_at,
            )


#: Answers (running, error text or None) about the streaming query.
QueryState = Callable[[], tuple[bool, str | None]]


def _gauge(name: str, doc: str, value: float | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


class EngineCollector(Collector):
    """The engine's metric families, read at every scrape."""

    def __init__(self, status: StatusPublisher, query_state: QueryState) -> None:
        self.status = status
        self.query_state = query_state

    def collect(self) -> Iterator[Metric]:
        s = self.status.snapshot()
        running, _ = self.query_state()
        yield _gauge("up", "1 while the streaming query runs", float(running))
        yield CounterMetricFamily(
            PREFIX + "micro_batches",
            "micro-batches processed since the engine started",
            value=s.micro_batches,
        )
        for name, doc in _TOTALS.items():
            yield CounterMetricFamily(
                PREFIX + name,
                doc + " since the engine started",
                value=s.totals.get(name, 0),
            )
        invalid = CounterMetricFamily(
            PREFIX + "invalid_records",
            "Kinesis records set aside as invalid, by error kind",
            labels=["kind"],
        )
        for kind, count in sorted(s.invalid.items()):
            invalid.add_metric([kind], count)
        yield invalid
        if s.last_micro_batch is not None and s.last_batch_at is not None:
            yield _gauge(
                "last_micro_batch", "id of the last micro-batch", s.last_micro_batch
            )
            yield _gauge(
                "last_micro_batch_timestamp_seconds",
                "when the last micro-batch finished, s since the epoch",
                s.last_batch_at,
            )
            for name, (key, scale, doc) in _LAST.items():
                yield _gauge(name, doc, float(s.last.get(key, 0) or 0) * scale)
        lag = GaugeMetricFamily(
            PREFIX + "millis_behind_latest",
            "how far the source's last read is behind the shard's tip, ms",
            labels=["shard"],
        )
        for shard, ms in sorted(s.lag_ms.items()):
            lag.add_metric([shard], ms)
        yield lag


def engine_health(
    status: StatusPublisher,
    query_state: QueryState,
    stale_after_s: float | None = None,
    trigger_active: Callable[[], bool] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """``/healthz``: healthy while the query runs and, with
    ``stale_after_s`` (seconds) and ``trigger_active`` (whether Spark's
    trigger is busy now), is not stuck: busy for longer than
    ``stale_after_s`` with no micro-batch finishing meanwhile (see the
    module doc); the details an operator looks at first.  Unhealthy
    answers carry ``error``: the query's, or why it looks stuck."""
    s = status.snapshot()
    running, error = query_state()
    now = status.clock()
    last = s.started_at if s.last_batch_at is None else s.last_batch_at
    busy_since = None
    if running and trigger_active is not None:
        busy_since = status.note_trigger(trigger_active())
    stuck_for = None if busy_since is None else now - max(busy_since, last)
    stale = (
        stale_after_s is not None
        and stuck_for is not None
        and stuck_for > stale_after_s
    )
    if stale and error is None:
        error = (
            f"the trigger has been busy for {stuck_for:.0f} s with no micro-batch "
            f"finished (unhealthy after {stale_after_s:.0f} s): the query looks "
            "stuck (a source read or a micro-batch that does not return)"
        )
    details: dict[str, Any] = {
        "query_running": running,
        "trigger_busy_s": None if stuck_for is None else round(max(0.0, stuck_for), 3),
        "idle_s": (
            round(now - last, 3)
            if running and trigger_active is not None and busy_since is None
            else None
        ),
        "micro_batches": s.micro_batches,
        "last_micro_batch": s.last_micro_batch,
        "last_batch_age_s": (
            None if s.last_batch_at is None else round(now - s.last_batch_at, 3)
        ),
        "last_duration_s": (
            None
            if s.last_micro_batch is None
            else round(float(s.last.get("total_ms", 0.0)) / 1000, 3)
        ),
        "last_records": s.last.get("records"),
        "last_flows": s.last.get("flows"),
        "max_millis_behind_latest": max(s.lag_ms.values(), default=None),
        "unscored_host_windows": s.last.get("unscored"),
        "invalid_records": sum(s.invalid.values()),
        "scoring_unavailable": bool(s.last.get("scoring_unavailable", 0)),
    }
    if error is not None:
        details["error"] = error
    return running and not stale, details


def status_registry(
    status: StatusPublisher, query_state: QueryState
) -> CollectorRegistry:
    """A registry holding only the engine's families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(status, query_state))
    return registry
