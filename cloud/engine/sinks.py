"""Where window estimates go: a protocol and the local implementations.

An estimate is (re)written every micro-batch that touches its window, and
once more, ``final``, when the window closes; sinks upsert by
(tenant, window start), so a replayed micro-batch rewrites the same values.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog

from cloud.engine.estimates import byte_interval, packet_interval
from cloud.engine.network import NetworkStats
from cloud.engine.store import WindowTotals

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WindowEstimate:
    """Full-network totals of one tenant's window (counts, not rates).

    ``*_low``/``*_high`` bound the confidence interval at ``confidence``;
    ``sampled_*`` are the counters as exported; ``unknown_rate_*`` are rows
    whose sampling rate is unknown, left out of the estimate.
    ``flow_starts`` (estimated TCP connection attempts), and on final
    estimates ``distinct_hosts``/``distinct_ports`` (Chao1) with their
    observed counts and ``top_talkers`` (``[{host, bytes}]``, scaled bytes
    sent, largest first) are defined in :mod:`cloud.engine.network`;
    they are None on estimates that are not final.
    """

    tenant_id: str
    window_start_ms: int
    window_end_ms: int
    final: bool
    confidence: float
    packets: float
    packets_low: float
    packets_high: float
    bytes: float
    bytes_low: float
    bytes_high: float
    sampled_packets: float
    sampled_bytes: float
    flows: int
    rows: int
    unknown_rate_rows: int
    unknown_rate_packets: float
    unknown_rate_bytes: float
    flow_starts: float = 0.0
    distinct_hosts: float | None = None
    distinct_hosts_observed: int | None = None
    distinct_ports: float | None = None
    distinct_ports_observed: int | None = None
    top_talkers: list[dict[str, Any]] | None = None


def estimate_windows(
    totals: Sequence[WindowTotals],
    confidence: float,
    z: float,
    flow_starts: Mapping[tuple[str, int], float] | None = None,
    network: Mapping[tuple[str, int], NetworkStats] | None = None,
) -> list[WindowEstimate]:
    """Turn summed statistics into estimates (vectorised over windows).

    ``flow_starts`` and ``network`` (final windows) are keyed by
    (tenant, window start)."""
    flow_starts = flow_starts or {}
    network = network or {}
    if not totals:
        return []
    stats = {
        name: np.array([t.stats[name] for t in totals]) for name in totals[0].stats
    }
    pk = packet_interval(stats, z)
    by = byte_interval(stats, z)
    return [
        WindowEstimate(
            tenant_id=t.tenant_id,
            window_start_ms=t.window_start_ms,
            window_end_ms=t.window_end_ms,
            final=t.closed,
            confidence=confidence,
            packets=float(pk.estimate[i]),
            packets_low=float(pk.low[i]),
            packets_high=float(pk.high[i]),
            bytes=float(by.estimate[i]),
            bytes_low=float(by.low[i]),
            bytes_high=float(by.high[i]),
            sampled_packets=t.stats["sampled_packets"],
            sampled_bytes=t.stats["sampled_bytes"],
            flows=t.flows,
            rows=int(t.stats["rows"]),
            unknown_rate_rows=int(t.stats["unknown_rate_rows"]),
            unknown_rate_packets=t.stats["unknown_rate_packets"],
            unknown_rate_bytes=t.stats["unknown_rate_bytes"],
            flow_starts=flow_starts.get((t.tenant_id, t.window_start_ms), 0.0),
            **_network_fields(network.get((t.tenant_id, t.window_start_ms))),
        )
        for i, t in enumerate(totals)
    ]


def _network_fields(stats: NetworkStats | None) -> dict[str, Any]:
    if stats is None:
        return {}
    # Shallow: asdict's deep copy of the talker dicts cost more than the
    # estimate itself; the talkers are built fresh for each window anyway.
    return {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}


class EstimateSink(Protocol):
    """Receives estimates after each micro-batch (upsert semantics)."""

    def write(self, estimates: Sequence[WindowEstimate]) -> None: ...


class MemorySink:
    """Keeps the latest estimate per (tenant, window start)."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, int], WindowEstimate] = {}
        self.writes = 0

    def write(self, estimates: Sequence[WindowEstimate]) -> None:
        self.writes += 1
        for e in estimates:
            self.latest[(e.tenant_id, e.window_start_ms)] = e


class JsonLinesSink:
    """Appends one JSON object per estimate to a file (a log to replay:
    the last line for a (tenant, window start) is its current value)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, estimates: Sequence[WindowEstimate]) -> None:
        if not estimates:
            return
        with self.path.open("a", encoding="utf-8") as out:
            for e in estimates:
                out.write(json.dumps(asdict(e), separators=(",", ":")) + "\n")


class FanoutSink:
    """Writes every estimate to each of ``sinks`` in order."""

    def __init__(self, sinks: Sequence[EstimateSink]) -> None:
        self.sinks = tuple(sinks)

    @property
    def deferred(self) -> int:
        """Estimates the sinks keep for a later write (see DeferringSink)."""
        return sum(int(getattr(s, "deferred", 0)) for s in self.sinks)

    def write(self, estimates: Sequence[WindowEstimate]) -> None:
        for sink in self.sinks:
            sink.write(estimates)


class DeferringSink:
    """Keeps estimates a sink could not take and offers them again.

    ``sink`` raises one of ``retryable`` when its store is down (for the
    detection store: ``StoreUnavailableError``, ``StoreWriteError``); the
    estimates are then kept, the latest per (tenant, window start), at
    most ``max_pending`` of them (beyond, the oldest windows are dropped
    and counted), and written before the next ones.  The engine goes on
    either way; after a failure no write is tried for ``retry_after_s``
    (each try may wait for the store's timeout).  Known shortcoming: what
    is kept is in memory, so a
    restart during an outage loses the non-final estimates (final ones
    too, if the window closed during the outage).
    """

    def __init__(
        self,
        sink: EstimateSink,
        retryable: tuple[type[Exception], ...],
        max_pending: int = 100_000,
        retry_after_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.retryable = retryable
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._retry_at = 0.0
        self.pending: dict[tuple[str, int], WindowEstimate] = {}
        self.deferred = 0
        self.dropped = 0
        self.failures = 0

    def write(self, estimates: Sequence[WindowEstimate]) -> None:
        for e in estimates:
            self.pending.pop((e.tenant_id, e.window_start_ms), None)
            self.pending[(e.tenant_id, e.window_start_ms)] = e
        while len(self.pending) > self.max_pending:
            self.pending.pop(next(iter(self.pending)))
            self.dropped += 1
        if not self.pending:
            return
        batch = list(self.pending.values())
        if self.clock() < self._retry_at:
            self.deferred = len(batch)
            return
        try:
            self.sink.write(batch)
        except self.retryable as exc:
            self.failures += 1
            self.deferred = len(batch)
            self._retry_at = self.clock() + self.retry_after_s
            log.warning(
                "estimates_deferred",
                pending=len(self.pending),
                dropped=self.dropped,
                error=str(exc),
            )
            return
        self.pending.clear()
        self.deferred = 0
