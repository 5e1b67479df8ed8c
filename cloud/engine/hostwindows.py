"""Per-host feature rows over sliding windows, with the shared features code.

Feature windows are ``feature_window_s`` long and start every
``feature_slide_s`` (aligned to the epoch); a flow row belongs to every
window holding its ``time_start``, as in training and on the relay
(:func:`edge_agent.features.host_window_features`, whose tumbling windows
are the special case slide = window).  Windows must match the model's
``window_s`` (300 s for the shipped models) for the scores to mean
anything.

Where the work runs: on the driver, which decodes the records (cheap
next to the features) into ``PAYLOAD_DTYPE`` rows and keeps, per tenant, *bucket*
(``gcd(window, slide)`` long) and micro-batch, the rows compacted on what
the features read (source, destination, destination port, protocol, TCP
flags, rate: bytes, packets and flow counts summed, which changes no
feature), and computes a window's rows once the tenant's watermark passes
its end.  Measured (``sampleflow bench engine``, docs/engine.md) the
driver's whole per-micro-batch work runs at 2-3 x 10^5 flow rows per
CPU-second, so this holds for modest volumes; the limit is that one core
and the driver's disk for the open windows' rows.  Beyond it, features
belong on the executors: group the flows by (tenant, host) with Spark
state (``transformWithStateInPandas``), which this engine does not do.

Features must see all of a window's rows at once (distinct counts and
entropies do not add up), hence the rows are kept until the window closes;
rows arriving for a window already closed are late, counted and left out
of it.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from cloud.engine.store import HostWindowSet
from edge_agent.features import InternalNetworks, host_window_features

#: The ``kind`` of feature buckets in the engine store.
KIND = "features"

#: The compacted row kept per feature bucket.
BUCKET_DTYPE = np.dtype(
    [
        ("src_addr", "V16"),
        ("dst_addr", "V16"),
        ("sampling_rate", "<u4"),
        ("dst_port", "<u2"),
        ("tcp_flags", "<u2"),
        ("protocol", "u1"),
        ("flow_count", "<u8"),
        ("bytes", "<u8"),
        ("packets", "<u8"),
    ]
)
_KEY_FIELDS = (
    "src_addr",
    "dst_addr",
    "sampling_rate",
    "dst_port",
    "tcp_flags",
    "protocol",
)
_KEY_DTYPE = np.dtype([(name, BUCKET_DTYPE[name]) for name in _KEY_FIELDS])
_SUM_FIELDS = ("flow_count", "bytes", "packets")


def compact(records: np.ndarray) -> np.ndarray:
    """Merge rows equal in every column the features read.

    ``records`` has at least the :data:`BUCKET_DTYPE` columns; bytes,
    packets and flow counts are summed exactly (uint64).  The features of
    the output equal those of the input (same window).
    """
    n = len(records)
    key = np.empty(n, dtype=_KEY_DTYPE)
    for name in _KEY_FIELDS:
        key[name] = records[name]
    raw = key.view(np.dtype((np.void, _KEY_DTYPE.itemsize)))
    order = np.argsort(raw, kind="stable")
    ks = raw[order]
    change = np.ones(n, dtype=bool)
    change[1:] = ks[1:] != ks[:-1]
    starts = np.flatnonzero(change)
    out = np.empty(starts.size, dtype=BUCKET_DTYPE)
    first = order[starts]
    for name in _KEY_FIELDS:
        out[name] = records[name][first]
    for name in _SUM_FIELDS:
        values = records[name].astype(np.uint64)[order]
        out[name] = np.add.reduceat(values, starts) if n else values
    return out


def window_features(
    tenant_id: str,
    window_start_ms: int,
    window_s: int,
    rows: np.ndarray,
    networks: InternalNetworks,
) -> HostWindowSet:
    """Feature rows of one window from its buckets' rows (``BUCKET_DTYPE``)."""
    end = window_start_ms + window_s * 1000
    if rows.size == 0:
        return HostWindowSet(
            tenant_id, window_start_ms, end, np.zeros(0, "V16"), np.zeros((0, 15))
        )
    columns: Mapping[str, np.ndarray] = {
        # All rows are in this one window: put them at its start, offset to
        # 0 so that the tumbling windows of the shared code line up with it.
        "time_start": np.zeros(rows.size, dtype=np.int64),
        "src_addr": rows["src_addr"],
        "dst_addr": rows["dst_addr"],
        "dst_port": rows["dst_port"],
        "protocol": rows["protocol"],
        "tcp_flags": rows["tcp_flags"],
        "bytes": rows["bytes"],
        "packets": rows["packets"],
        "sampling_rate": rows["sampling_rate"],
        "flow_count": rows["flow_count"],
    }
    hw = host_window_features(columns, networks, window_s)
    return HostWindowSet(tenant_id, window_start_ms, end, hw.host, hw.values)


def windows_to_close(
    bucket_starts: Sequence[int],
    closed: set[int],
    watermark_ms: int,
    window_ms: int,
    slide_ms: int,
) -> list[int]:
    """Starts of the windows holding any of ``bucket_starts`` whose end is
    at or behind the watermark and that are not in ``closed``, ascending."""
    out: set[int] = set()
    for b in bucket_starts:
        last = (b // slide_ms) * slide_ms
        s = last
        while s + window_ms > b:
            if s + window_ms <= watermark_ms and s not in closed:
                out.add(s)
            s -= slide_ms
    return sorted(out)


class BucketSpan:
    """Bucket blobs ``(bucket start, blob)`` in store order (start, then
    micro-batch) joined into one ``BUCKET_DTYPE`` array, so that the rows
    of the buckets starting in any ``[start, end)`` are one slice (a view:
    no copy)."""

    def __init__(self, items: Sequence[tuple[int, bytes]]) -> None:
        self._starts = [start for start, _ in items]
        self._all = bucket_rows([blob for _, blob in items])
        sizes = [len(blob) // BUCKET_DTYPE.itemsize for _, blob in items]
        self._offsets = [0, *itertools.accumulate(sizes)]

    def rows(self, start_ms: int, end_ms: int) -> np.ndarray:
        """Rows of the buckets starting in ``[start_ms, end_ms)``."""
        lo = bisect.bisect_left(self._starts, start_ms)
        hi = bisect.bisect_left(self._starts, end_ms)
        return self._all[self._offsets[lo] : self._offsets[hi]]


def bucket_rows(blobs: Sequence[bytes]) -> np.ndarray:
    """Concatenate bucket blobs into one ``BUCKET_DTYPE`` array."""
    if not blobs:
        return np.zeros(0, dtype=BUCKET_DTYPE)
    return np.concatenate([np.frombuffer(b, dtype=BUCKET_DTYPE) for b in blobs])
