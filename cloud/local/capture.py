"""The slice of CTU-13 scenario 6 the demo replays, and its time shift.

The slice is the set of Argus flows that *start* within ``[start, start +
minutes)`` of the capture, each kept whole (a long flow's later pieces are
replayed after the slice's end); its true totals are their unsampled
``TotPkts`` and ``TotBytes``.  The data comes from the project's copy in
``data/`` through :mod:`cloud.training.ctu13` (non-IP lines are skipped
there, with a counter).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

#: Feature windows of the shipped models are 300 s; a time shift in whole
#: units keeps their boundaries where they were in the capture.
SHIFT_UNIT_MS = 300_000
#: Gap left after the previous replay's last flow, so no window is shared.
SHIFT_GAP_MS = 600_000


@dataclasses.dataclass(frozen=True)
class Slice:
    """The replayed part of the capture (capture times, UTC ms)."""

    start_ms: int  # lower bound on flow start
    end_ms: int  # exclusive upper bound on flow start
    flows: Any  # cloud.training.ctu13.ArgusFlows
    capture_start_ms: int  # first flow start of the whole capture
    truth_packets: int
    truth_bytes: int
    bot_first_ms: int | None  # first botnet-labelled flow start in the slice

    def __len__(self) -> int:
        return len(self.flows)


def load_slice(
    start_min: float, minutes: float | None, directory: Path | None = None
) -> Slice:
    """The flows starting in ``[start, start + minutes)`` minutes of the
    capture (``minutes`` None: to the end) and their true totals.

    Raises ``FileNotFoundError`` (``ctu13.DatasetNotFoundError``) when no
    copy of the data is found.
    """
    from cloud.training import ctu13  # noqa: PLC0415 - loads the data

    count = len(ctu13.slice_files(ctu13.dataset_dir(directory)))
    loaded = [ctu13.load_flows(directory, [0])]
    capture_start = int(loaded[0].start_ms.min())
    lo = capture_start + round(start_min * 60_000)
    hi = None if minutes is None else lo + round(minutes * 60_000)
    # A slice file holds about five minutes of flow starts, in time order:
    # read files until one starts at or after the end of the slice.
    for index in range(1, count):
        part = ctu13.load_flows(directory, [index])
        if hi is not None and int(part.start_ms.min()) >= hi:
            break
        loaded.append(part)
    flows = _concat(loaded)
    keep = flows.start_ms >= lo
    if hi is not None:
        keep &= flows.start_ms < hi
    picked = _subset(flows, keep)
    bot = picked.label == ctu13.LABEL_BOTNET
    return Slice(
        start_ms=lo,
        end_ms=hi if hi is not None else int(flows.start_ms.max()) + 1,
        flows=picked,
        capture_start_ms=capture_start,
        truth_packets=int(picked.tot_pkts.sum(dtype=np.uint64)),
        truth_bytes=int(picked.tot_bytes.sum(dtype=np.uint64)),
        bot_first_ms=int(picked.start_ms[bot].min()) if bot.any() else None,
    )


def _arrays(flows: Any) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(flows)
        if isinstance(getattr(flows, f.name), np.ndarray)
    ]


def _concat(parts: list[Any]) -> Any:
    """One ArgusFlows from several (skip counters added up)."""
    if len(parts) == 1:
        return parts[0]
    arrays = {
        name: np.concatenate([getattr(p, name) for p in parts])
        for name in _arrays(parts[0])
    }
    skipped = parts[0].skipped.copy()
    for p in parts[1:]:
        skipped.update(p.skipped)
    return dataclasses.replace(parts[0], skipped=skipped, **arrays)


def _subset(flows: Any, keep: np.ndarray) -> Any:
    """The ArgusFlows rows where ``keep`` is true."""
    arrays = {name: getattr(flows, name)[keep] for name in _arrays(flows)}
    return dataclasses.replace(flows, **arrays)


def choose_shift_ms(first_ms: int, now_ms: int, previous_end_ms: int | None) -> int:
    """How far to move capture times so the replay happens "now".

    A multiple of :data:`SHIFT_UNIT_MS` that puts ``first_ms`` at most one
    unit before ``now_ms``, or, if an earlier replay's flows (ending at
    ``previous_end_ms``, shifted) would be closer than
    :data:`SHIFT_GAP_MS`, just after them: the engine closes windows by
    event time per tenant, so a replay must never go back in time.
    """
    shift = (now_ms - first_ms) // SHIFT_UNIT_MS * SHIFT_UNIT_MS
    if previous_end_ms is not None:
        floor = previous_end_ms + SHIFT_GAP_MS - first_ms
        if shift < floor:
            shift = -(-floor // SHIFT_UNIT_MS) * SHIFT_UNIT_MS
    return int(shift)
