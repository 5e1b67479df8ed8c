"""What the filter has seen of the open model windows, for scoring.

The relay hands the filter one aggregation window at a time (10 s by
default) while the model scores host windows of ``window_s`` (300 s for the
shipped model).  Scored on 10 s alone, a host window looks far quieter than
those the model learnt from.  :class:`ScoringHistory` keeps what the
features need of every record seen in the current and the previous model
window, so that each batch is scored on its host windows *so far*.

Only the columns the features read are kept (the model window start, both
addresses, destination port, protocol, TCP flags, sampling rate, and the
sums of bytes, packets and flow count), reduced by all of them but the
sums: that loses nothing the features use (their sums and distinct counts
come out the same) while client source ports, interfaces and exporters no
longer split rows.  Records with no internal end are not kept (they give
no host window).

Memory is bounded by ``max_rows`` (:data:`HISTORY_DTYPE` is 80 bytes a
row): past it, the history restarts from the current batch and the restart
is counted; host windows are then scored on less than they hold, as they
would be without a history.

Known shortcoming: early in a model window the history holds only its
first seconds, so the first batches of each window are still scored on a
partial window.
"""

from __future__ import annotations

import numpy as np

from edge_agent.aggregate import group_by_words
from edge_agent.features import InternalNetworks, address_halves

#: One history row.  ``time_start`` is the model window's start (ms since
#: the epoch): the features window by it, and it merges rows.
HISTORY_DTYPE = np.dtype(
    [
        # -- key (48 bytes) --
        ("time_start", "<i8"),
        ("src_addr", "V16"),
        ("dst_addr", "V16"),
        ("sampling_rate", "<u4"),
        ("dst_port", "<u2"),
        ("tcp_flags", "<u2"),
        # -- values --
        ("protocol", "u1"),
        ("_pad", "V7"),
        ("bytes", "<u8"),
        ("packets", "<u8"),
        ("flow_count", "<u8"),
    ]
)
_KEY_WORDS = 6  # 48 bytes; protocol is the first value byte, keyed apart

#: Default bound on history rows (16 MB).
DEFAULT_MAX_ROWS = 200_000


class ScoringHistory:
    """The feature columns of the current and previous model window.

    :meth:`add` takes a batch (FLOW_DTYPE records or AGG_DTYPE rows, with
    ``flow_count`` per record) and returns the history including it, as
    :data:`HISTORY_DTYPE` rows for ``host_window_features``.  Not
    thread-safe: the filter's one processing thread owns it.
    """

    def __init__(
        self,
        networks: InternalNetworks,
        window_s: int,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        if window_s < 1:
            raise ValueError(f"window_s must be >= 1, got {window_s}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.networks = networks
        self.window_s = window_s
        self.max_rows = max_rows
        #: times the bound made the history restart from one batch
        self.restarts = 0
        self._reduced = np.zeros(0, dtype=HISTORY_DTYPE)
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._newest_window = np.iinfo(np.int64).min

    @property
    def rows(self) -> int:
        """Rows held (reduced plus not yet reduced)."""
        return int(self._reduced.shape[0]) + self._pending_rows

    def add(self, records: np.ndarray, flow_count: np.ndarray) -> np.ndarray:
        """Add a batch; return every held row, this batch's included."""
        new = self._convert(records, flow_count)
        window_ms = self.window_s * 1000
        if new.size:
            newest = int(new["time_start"].max())
            if newest > self._newest_window:
                self._newest_window = newest
                self._evict(newest - window_ms)
        self._pending.append(new)
        self._pending_rows += int(new.shape[0])
        if self._pending_rows > max(int(self._reduced.shape[0]), 4096):
            self._compact()
        if self.rows > self.max_rows:
            self._compact()
            if self.rows > self.max_rows:
                self.restarts += 1
                self._reduced = _reduce(new)
                self._pending = []
                self._pending_rows = 0
        return np.concatenate([self._reduced, *self._pending])

    def _convert(self, records: np.ndarray, flow_count: np.ndarray) -> np.ndarray:
        src_hi, src_lo = address_halves(records["src_addr"])
        dst_hi, dst_lo = address_halves(records["dst_addr"])
        keep = self.networks.contains(src_hi, src_lo) | self.networks.contains(
            dst_hi, dst_lo
        )
        index = np.flatnonzero(keep)
        out = np.zeros(index.size, dtype=HISTORY_DTYPE)
        window_ms = self.window_s * 1000
        out["time_start"] = records["time_start"][index] // window_ms * window_ms
        for name in (
            "src_addr",
            "dst_addr",
            "sampling_rate",
            "dst_port",
            "tcp_flags",
            "protocol",
            "bytes",
            "packets",
        ):
            out[name] = records[name][index]
        out["flow_count"] = np.asarray(flow_count)[index]
        return out

    def _evict(self, oldest_kept_ms: int) -> None:
        """Drop rows of model windows before ``oldest_kept_ms``."""
        self._compact()
        old = self._reduced["time_start"] < oldest_kept_ms
        if old.any():
            self._reduced = self._reduced[~old]

    def _compact(self) -> None:
        if self._pending:
            self._reduced = _reduce(np.concatenate([self._reduced, *self._pending]))
            self._pending = []
            self._pending_rows = 0


def _reduce(rows: np.ndarray) -> np.ndarray:
    """Merge rows equal in every key column and protocol; sum the values."""
    n = rows.shape[0]
    if n <= 1:
        return rows.copy()
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(n, HISTORY_DTYPE.itemsize)
    words = np.empty((n, _KEY_WORDS + 1), dtype=np.uint64)
    words[:, :_KEY_WORDS] = raw[:, : 8 * _KEY_WORDS].view("<u8")
    words[:, _KEY_WORDS] = rows["protocol"]
    order, starts = group_by_words(words)
    ordered = rows[order]
    out = ordered[starts].copy()
    for name in ("bytes", "packets", "flow_count"):
        out[name] = np.add.reduceat(ordered[name], starts)
    return out
