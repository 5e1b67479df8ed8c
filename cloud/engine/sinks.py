"""Where window estimates go: a protocol and the local implementations.

An estimate is (re)written every micro-batch that touches its window, and
once more, ``final``, when the window closes; sinks upsert by
(tenant, window start), so a replayed micro-batch rewrites the same values.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cloud.engine.estimates import byte_interval, packet_interval
from cloud.engine.store import WindowTotals


@dataclass(frozen=True)
class WindowEstimate:
    """Full-network totals of one tenant's window (counts, not rates).

    ``*_low``/``*_high`` bound the confidence interval at ``confidence``;
    ``sampled_*`` are the counters as exported; ``unknown_rate_*`` are rows
    whose sampling rate is unknown, left out of the estimate.
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


def estimate_windows(
    totals: Sequence[WindowTotals], confidence: float, z: float
) -> list[WindowEstimate]:
    """Turn summed statistics into estimates (vectorised over windows)."""
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
        )
        for i, t in enumerate(totals)
    ]


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
