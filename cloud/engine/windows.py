"""Sliding event-time windows over flow rows, in numpy.

A window of ``size_ms`` starts every ``slide_ms``, aligned to the UNIX
epoch (as Spark's ``window()``): window ``[start, start + size_ms)`` with
``start`` a multiple of ``slide_ms``.  A row belongs to every window that
holds its time, so ``ceil(size/slide)`` windows at most.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def assign_windows(
    time_ms: np.ndarray, size_ms: int, slide_ms: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(row, start)``: one pair per (row, window holding it).

    ``row`` indexes ``time_ms``; ``start`` is the window start (ms).
    """
    if slide_ms < 1 or size_ms < slide_ms:
        raise ValueError(
            f"need 1 <= slide_ms <= size_ms, got slide {slide_ms}, size {size_ms}"
        )
    t = np.asarray(time_ms, dtype=np.int64)
    last = (t // slide_ms) * slide_ms  # floor also for times before 1970
    rows: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    for j in range(-(-size_ms // slide_ms)):
        start = last - j * slide_ms
        inside = t < start + size_ms
        rows.append(np.flatnonzero(inside))
        starts.append(start[inside])
    return np.concatenate(rows), np.concatenate(starts)


def sum_by_window(
    time_ms: np.ndarray,
    values: Mapping[str, np.ndarray],
    size_ms: int,
    slide_ms: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Sum ``values`` per window of the rows' times.

    Returns ``(starts, max_time, sums)``: the distinct window starts in
    ascending order, the latest row time in each, and each value summed
    per window (float64).
    """
    row, start = assign_windows(time_ms, size_ms, slide_ms)
    starts, group = np.unique(start, return_inverse=True)
    n = len(starts)
    t = np.asarray(time_ms, dtype=np.int64)[row]
    max_time = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(max_time, group, t)
    sums = {
        name: np.bincount(
            group, weights=np.asarray(v, dtype=np.float64)[row], minlength=n
        )
        for name, v in values.items()
    }
    return starts, max_time, sums
