"""Windowed pre-aggregation: sum flow records per key per time window.

Which window a record belongs to
--------------------------------
A record counts in the window holding its ``time_end`` (the time the
exporter last saw the flow), because that is when its bytes were counted.
It falls back to the time the datagram was received when

* ``time_end`` is unknown (presence bit clear, or 0) -- ``untimed``;
* its window had already closed when it arrived -- ``late``: the exporter
  held it longer than ``lateness_ms`` (long inactive timeouts, slow
  clocks);
* it ends more than one window after it was received -- ``future``: the
  exporter clock runs ahead.

so a wrong exporter clock can neither open windows without bound nor lose
records.  Each fallback is counted in :class:`AggregateStats`.

When a window closes
--------------------
The watermark is the clock value passed to :meth:`Aggregator.advance`
(wall clock in the relay, capture time when replaying a pcap).  Window
``[start, end)`` closes once the watermark reaches ``end + lateness_ms``;
at most ``lateness_ms / window_ms + 2`` windows are open at a time.

Memory bound
------------
``max_keys`` bounds the distinct keys held over all open windows.  Input
rows are buffered per window and reduced in bulk once they outnumber the
window's reduced rows and :data:`COMPACT_ROWS` (so each row is reduced a
few times at most, and a window of few keys never holds many rows), and
in every window once more than ``2 * max_keys`` rows are held; if the
reduced windows still hold more than ``max_keys`` keys,
the oldest windows are flushed early (``early_flushes``) until they hold
at most ``max_keys``.  So the aggregator holds at most ``2 * max_keys``
rows (120 bytes each) plus the chunk being added.  An early-flushed window
stays open; later records for it go into a new partial window with the
same bounds, and the cloud sums the partial windows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from edge_agent.aggregate.reduce import reduce_rows
from edge_agent.aggregate.schema import (
    concat_rows,
    empty_rows,
    take_rows,
    to_aggregate_rows,
)
from edge_agent.flows.schema import Field

#: Rows buffered in a window before it is reduced, at least (see the module
#: doc).  A reduction needs about 300 bytes a row while it runs, and runs in
#: the relay's event loop: 32k rows keep it near 10 MB and a few ms.
COMPACT_ROWS = 32_768


class FlushReason(enum.Enum):
    """Why a window was emitted."""

    CLOSED = "closed"  # the watermark passed its end plus the lateness
    MAX_KEYS = "max_keys"  # early: the key bound was reached
    SHUTDOWN = "shutdown"  # flush() at stop


@dataclass(frozen=True)
class AggregatedWindow:
    """The aggregated rows of one window (or a part of one, if flushed early).

    ``records`` are :data:`AGG_DTYPE` rows ordered by exporter, source and
    destination address; ``start_ms``/``end_ms`` are the window bounds
    (ms since the epoch, ``end`` exclusive).  Record times may lie outside
    the bounds: a flow's start can be long before its end, and a late or
    future record keeps its own times.
    """

    start_ms: int
    end_ms: int
    records: np.ndarray
    reason: FlushReason

    @property
    def input_records(self) -> int:
        """How many flow records were merged into this window."""
        return int(self.records["flow_count"].sum(dtype=np.uint64))


@dataclass
class AggregateStats:
    """Counters of an :class:`Aggregator` (read by the relay's metrics)."""

    records_in: int = 0
    records_out: int = 0
    windows_closed: int = 0
    early_flushes: int = 0
    untimed_records: int = 0  # no time_end: windowed by receive time
    late_records: int = 0  # window closed already: windowed by receive time
    future_records: int = 0  # exporter clock ahead: windowed by receive time
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class _OpenWindow:
    reduced: np.ndarray
    pending: list[np.ndarray]
    pending_rows: int = 0

    @property
    def rows(self) -> int:
        return int(self.reduced.shape[0]) + self.pending_rows

    def compact(self) -> None:
        if self.pending:
            self.reduced = reduce_rows(concat_rows([self.reduced, *self.pending]))
            self.pending = []
            self.pending_rows = 0


class Aggregator:
    """Sum flow records per key per window; see the module docstring.

    Inert until fed: :meth:`add` takes decoded records, :meth:`advance`
    moves the watermark and returns the windows it closes, :meth:`flush`
    returns everything still open.  Not thread-safe; one task owns it.
    """

    def __init__(
        self,
        window_ms: int = 10_000,
        max_keys: int = 100_000,
        lateness_ms: int = 30_000,
    ) -> None:
        if window_ms < 1:
            raise ValueError(f"window_ms must be >= 1, got {window_ms}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        if lateness_ms < 0:
            raise ValueError(f"lateness_ms must be >= 0, got {lateness_ms}")
        self.window_ms = window_ms
        self.max_keys = max_keys
        self.lateness_ms = lateness_ms
        self.stats = AggregateStats()
        self._open: dict[int, _OpenWindow] = {}
        #: windows with an index below this one are closed
        self._first_open: int | None = None

    @property
    def held_rows(self) -> int:
        """Rows held over all open windows (reduced plus not yet reduced)."""
        return sum(w.rows for w in self._open.values())

    @property
    def open_windows(self) -> int:
        """How many windows are open."""
        return len(self._open)

    def add(
        self, records: np.ndarray, received_ms: int | np.ndarray
    ) -> list[AggregatedWindow]:
        """Add FLOW_DTYPE records; return any windows flushed early.

        ``received_ms`` is the receive time (ms since the epoch) of the
        records' datagrams: one value for all, or one per record.
        """
        n = int(records.shape[0])
        if n == 0:
            return []
        received = np.broadcast_to(np.asarray(received_ms, dtype=np.int64), (n,))
        index = self._window_index(records, received)
        rows = to_aggregate_rows(records)
        self.stats.records_in += n
        first, last = int(index.min()), int(index.max())
        if first == last:  # the usual case: one window
            self._append(first, rows)
        else:
            windows = np.unique(index)
            # At most lateness/window + 2 distinct windows: a mask each.
            for w in windows.tolist():
                self._append(w, take_rows(rows, np.flatnonzero(index == w)))
        return self._enforce_bound()

    def advance(self, now_ms: int) -> list[AggregatedWindow]:
        """Move the watermark to ``now_ms``; return the windows it closes.

        The watermark never moves back: an older ``now_ms`` closes nothing.
        """
        first_open = (now_ms - self.lateness_ms) // self.window_ms
        if self._first_open is not None and first_open <= self._first_open:
            return []
        self._first_open = first_open
        closing = sorted(w for w in self._open if w < first_open)
        return [self._emit(w, FlushReason.CLOSED) for w in closing]

    def flush(self) -> list[AggregatedWindow]:
        """Close every open window (at shutdown), oldest first."""
        return [self._emit(w, FlushReason.SHUTDOWN) for w in sorted(self._open)]

    # -- internals --

    def _window_index(self, records: np.ndarray, received: np.ndarray) -> np.ndarray:
        """Window index of each record; counts the fallbacks (disjoint:
        untimed, else future, else late)."""
        w_ms = self.window_ms
        end = records["time_end"]
        has_end = ((records["present"] & np.uint32(Field.TIME_END)) != 0) & (end > 0)
        by_end = end // w_ms
        future = has_end & (end > received + w_ms)
        timed = has_end & ~future
        late = timed & ((by_end + 1) * w_ms + self.lateness_ms <= received)
        index = np.where(timed & ~late, by_end, received // w_ms)
        if self._first_open is not None:
            # Received before the watermark passed (replay, slow pipeline):
            # the oldest open window takes it rather than a closed one.
            closed = index < self._first_open
            late |= closed & timed
            index = np.where(closed, self._first_open, index)
        self.stats.untimed_records += int(np.count_nonzero(~has_end))
        self.stats.future_records += int(np.count_nonzero(future))
        self.stats.late_records += int(np.count_nonzero(late))
        return index

    def _append(self, w: int, rows: np.ndarray) -> None:
        window = self._open.get(w)
        if window is None:
            window = self._open[w] = _OpenWindow(reduced=empty_rows(0), pending=[])
        window.pending.append(rows)
        window.pending_rows += int(rows.shape[0])
        if window.pending_rows > max(int(window.reduced.shape[0]), COMPACT_ROWS):
            window.compact()

    def _enforce_bound(self) -> list[AggregatedWindow]:
        if self.held_rows <= 2 * self.max_keys:
            return []
        for window in self._open.values():
            window.compact()
        flushed = []
        for w in sorted(self._open):
            if self.held_rows <= self.max_keys:
                break
            flushed.append(self._emit(w, FlushReason.MAX_KEYS))
        return flushed

    def _emit(self, w: int, reason: FlushReason) -> AggregatedWindow:
        window = self._open.pop(w)
        window.compact()
        rows = window.reduced
        self.stats.records_out += int(rows.shape[0])
        self.stats.by_reason[reason.value] = (
            self.stats.by_reason.get(reason.value, 0) + 1
        )
        if reason is FlushReason.MAX_KEYS:
            self.stats.early_flushes += 1
        else:
            self.stats.windows_closed += 1
        start = w * self.window_ms
        return AggregatedWindow(start, start + self.window_ms, rows, reason)
