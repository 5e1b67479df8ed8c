"""What the engine made of a replay: estimates, detections, progress.

Network estimates are per tenant and event-time window.  The engine's
windows slide (60 s every 10 s by default); those starting at a multiple
of their own length tile time, so summing them counts every flow once
(:func:`totals_from_windows`).  Each window's variance is recovered from
its interval's upper end (``high = estimate + z·sd``; the lower end may be
raised to the sampled count), and variances add over windows: flows in
different windows are sampled independently.

Estimates are read from the store's ``network_estimates`` collection (the
engine writes there when it has a store), else from the engine's JSON
lines file; :func:`estimates_from_rows` applies the engine's estimator to
rows read off the stream, for when the engine has not counted a replay.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: Longest engine window looked for around a replay's time range (ms).
MAX_WINDOW_MS = 3_600_000


def _interval(
    estimate: float, variance: float, floor: float, z: float
) -> dict[str, float]:
    half = z * math.sqrt(max(variance, 0.0))
    return {
        "estimate": estimate,
        "low": max(estimate - half, floor),
        "high": estimate + half,
    }


def _z(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def tumbling(
    windows: Iterable[Mapping[str, Any]], lo_ms: int, hi_ms: int
) -> list[Mapping[str, Any]]:
    """The non-overlapping windows (start a multiple of the length) that
    hold a time in ``[lo_ms, hi_ms]``."""
    out = []
    for w in windows:
        start, end = int(w["window_start_ms"]), int(w["window_end_ms"])
        if start % (end - start) == 0 and end > lo_ms and start <= hi_ms:
            out.append(w)
    return out


def totals_from_windows(
    windows: list[Mapping[str, Any]], source: str
) -> dict[str, Any] | None:
    """Packets and bytes with their interval, summed over ``windows``
    (tumbling windows, see :func:`tumbling`); None when there are none."""
    if not windows:
        return None
    confidence = float(windows[0]["confidence"])
    z = _z(confidence)
    out: dict[str, Any] = {
        "source": source,
        "windows": len(windows),
        "final_windows": sum(1 for w in windows if w.get("final")),
        "flows": int(sum(int(w["flows"]) for w in windows)),
        "confidence": confidence,
        "unknown_rate_rows": int(sum(int(w["unknown_rate_rows"]) for w in windows)),
    }
    for what in ("packets", "bytes"):
        estimate = sum(float(w[what]) for w in windows)
        variance = sum(
            ((float(w[f"{what}_high"]) - float(w[what])) / z) ** 2 for w in windows
        )
        floor = sum(float(w[f"sampled_{what}"]) for w in windows)
        out[what] = _interval(estimate, variance, floor, z)
    return out


def read_estimates_file(path: Path, tenant: str) -> list[dict[str, Any]]:
    """The latest estimate of each of ``tenant``'s windows in the engine's
    JSON lines file (a line per write; later lines win).  Unreadable lines
    are skipped: the file may be mid-write."""
    latest: dict[int, dict[str, Any]] = {}
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("tenant_id") == tenant:
                    latest[int(entry["window_start_ms"])] = entry
    except OSError:
        return []
    return list(latest.values())


def read_store_estimates(
    store: Any, tenant: str, lo_ms: int, hi_ms: int
) -> list[dict[str, Any]]:
    """``tenant``'s estimates in the store's ``network_estimates`` that may
    overlap ``[lo_ms, hi_ms]`` (a :class:`cloud.store.detections.
    DetectionStore`); raises its ``StoreUnavailableError``."""
    import pymongo.errors  # noqa: PLC0415 - cloud extra

    from cloud.store.detections import StoreUnavailableError  # noqa: PLC0415

    query = {
        "tenant_id": tenant,
        "window_start_ms": {"$gte": lo_ms - MAX_WINDOW_MS, "$lte": hi_ms},
    }
    try:
        return list(store.estimates.find(query, {"top_talkers": 0}))
    except pymongo.errors.PyMongoError as exc:
        raise StoreUnavailableError(f"cannot read estimates: {exc}") from exc


def read_detections(
    store: Any, tenant: str, lo_ms: int, hi_ms: int
) -> list[dict[str, Any]]:
    """``tenant``'s detections whose window overlaps ``[lo_ms, hi_ms]``."""
    docs: list[dict[str, Any]] = store.find_detections(
        tenant, lo_ms - MAX_WINDOW_MS, hi_ms + 1
    )
    return [d for d in docs if int(d["window_end_ms"]) > lo_ms]


def estimates_from_rows(
    packets: np.ndarray,
    bytes_: np.ndarray,
    rate: np.ndarray,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The engine's estimator (:mod:`cloud.engine.estimates`) applied to
    rows read off the stream."""
    from cloud.engine.estimates import row_statistics  # noqa: PLC0415

    stats = row_statistics(packets, bytes_, rate)
    total = {k: float(v.sum()) for k, v in stats.items()}
    z = _z(confidence)
    return {
        "source": "relay batches read off the stream, scaled by their rate",
        "confidence": confidence,
        "unknown_rate_rows": int(total["unknown_rate_rows"]),
        "packets": _interval(
            total["est_packets"], total["var_packets"], total["sampled_packets"], z
        ),
        "bytes": _interval(
            total["est_bytes"], total["var_bytes"], total["sampled_bytes"], z
        ),
    }


def micro_batches(checkpoint: Path) -> tuple[int, int]:
    """(committed, started) micro-batches of a Spark checkpoint: Spark
    writes ``offsets/N`` when batch N starts and ``commits/N`` when it is
    done, so equal counts mean no batch is running.  Counted from the
    highest N, since Spark deletes the oldest files (it keeps 100)."""

    def count(folder: Path) -> int:
        try:
            ids = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
        except OSError:
            return 0
        return max(ids) + 1 if ids else 0

    return count(checkpoint / "commits"), count(checkpoint / "offsets")


def detections_by_host(docs: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Alerting windows grouped by host, earliest first: the first window's
    bounds, the number of windows, the best score and its threat class."""
    hosts: dict[str, dict[str, Any]] = {}
    for d in sorted(docs, key=lambda d: (int(d["window_end_ms"]), d["host"])):
        if not d.get("alert", True):
            continue
        h = hosts.get(d["host"])
        if h is None:
            h = hosts[d["host"]] = {
                "host": d["host"],
                "first_window_start_ms": int(d["window_start_ms"]),
                "first_window_end_ms": int(d["window_end_ms"]),
                "windows": 0,
                "max_score": float(d["score"]),
                "threat_class": d.get("threat_class", "none"),
            }
        h["windows"] += 1
        if float(d["score"]) > h["max_score"]:
            h["max_score"] = float(d["score"])
            h["threat_class"] = d.get("threat_class", "none")
    return sorted(hosts.values(), key=lambda h: h["first_window_end_ms"])
