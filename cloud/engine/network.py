"""Whole-network statistics beyond packet and byte totals, per tenant window.

For every estimate window (the engine's ``window_s``/``slide_s``, rows put
in windows by ``time_end`` like the packet and byte estimates):

* ``flow_starts``: TCP records with SYN and without ACK, each counting its
  ``flow_count`` times the 1-in-N rate: the estimated connection attempts.
  Rows of unknown rate (0) are left out, as they are of the totals.
  The SYN-without-ACK bias of docs/models.md applies: established flows
  whose later packets were sampled into the same record do not count.
* ``distinct_hosts``: distinct addresses (source or destination), and
  ``distinct_ports``: distinct TCP/UDP destination ports, each with the
  Chao1 correction for values no sampled record showed
  (:func:`edge_agent.features.estimators.chao1`: ``S_obs + f1²/(2 f2)``,
  with f1, f2 the values seen in exactly one and two sampled records).
* ``top_talkers``: the ``k`` source addresses with the most scaled bytes
  sent (bytes × rate), largest first.

State is kept per *bucket* (``gcd(window, slide)`` long, so a window is a
union of buckets) and micro-batch: :func:`bucket_tables` reduces one
micro-batch's rows to small tables (one entry per distinct address, port
and talker), :func:`merge_tables` adds the buckets of one window up when
it closes (:func:`merge_windows` those of several windows closing together,
sorting each table once).  Distinct counts and talkers are therefore given on final
estimates only; ``flow_starts`` is additive and given on every update.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from edge_agent.features import spec
from edge_agent.features.estimators import chao1
from edge_agent.flows.schema import address_text

#: The ``kind`` of network buckets in the engine store.
KIND = "network"


@dataclass(frozen=True)
class NetworkStats:
    """The closing statistics of one tenant window (see the module doc)."""

    distinct_hosts: float
    distinct_hosts_observed: int
    distinct_ports: float
    distinct_ports_observed: int
    top_talkers: list[dict[str, Any]]


def bucket_size_ms(window_s: int, slide_s: int) -> int:
    """Bucket length: the largest span that tiles every window, ms."""
    return math.gcd(window_s, slide_s) * 1000


def flow_starts(records: np.ndarray) -> np.ndarray:
    """Per row: estimated TCP connection attempts (SYN without ACK) the
    row stands for, ``flow_count × rate``; 0 for unknown rates."""
    flags = records["tcp_flags"].astype(np.int64)
    syn = (
        (records["protocol"] == spec.PROTO_TCP)
        & ((flags & spec.TCP_SYN) != 0)
        & ((flags & spec.TCP_ACK) == 0)
    )
    rate = records["sampling_rate"].astype(np.float64)
    return syn * records["flow_count"].astype(np.float64) * rate


def _key_order(keys: np.ndarray) -> np.ndarray:
    """A stable order of ``keys`` ascending (``V16`` addresses by their
    bytes, on one native word when the high words agree)."""
    if keys.size == 0:
        return np.zeros(0, dtype=np.intp)
    if keys.dtype.itemsize == 16 and keys.dtype.kind == "V":
        halves = np.ascontiguousarray(keys).view(">u8").reshape(-1, 2)
        high, low = halves[:, 0], halves[:, 1]
        if bool((high == high[0]).all()):
            return np.argsort(low.astype(np.uint64), kind="stable")
        return np.lexsort((low, high))
    return np.argsort(keys, kind="stable")


def _sum_by_key(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``keys`` (any fixed-width dtype) and their summed weights,
    keys ascending."""
    if keys.size == 0:
        return keys[:0], weights[:0]
    if keys.dtype.itemsize == 16 and keys.dtype.kind == "V":
        # Two big-endian words sort like the bytes, far faster than void;
        # IPv4-mapped addresses share the high word, so one word is enough.
        halves = np.ascontiguousarray(keys).view(">u8").reshape(-1, 2)
        high, low = halves[:, 0], halves[:, 1]
        # Stable sort: timsort merges the runs of already sorted bucket
        # tables (merge_tables) several times faster than a quicksort.
        if bool((high == high[0]).all()):
            # Sorting a native copy is a third faster than the big-endian view.
            ordered = low.astype(np.uint64)
            order = np.argsort(ordered, kind="stable")
            ordered = ordered[order]
        else:
            order = np.lexsort((low, high))
            ordered = halves[order]
    else:
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
    change = np.ones(order.size, dtype=bool)
    if ordered.ndim == 2:
        change[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    else:
        change[1:] = ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(change)
    return keys[order[starts]], np.add.reduceat(weights[order], starts)


def bucket_tables(records: np.ndarray) -> tuple[float, bytes]:
    """One bucket's rows (``PAYLOAD_DTYPE``) → (flow starts, table blob)."""
    known = records["sampling_rate"] > 0
    count = records["flow_count"].astype(np.int64)
    addrs, addr_n = _sum_by_key(
        np.concatenate([records["src_addr"], records["dst_addr"]]),
        np.concatenate([count, count]),
    )
    proto = records["protocol"]
    ported = (proto == spec.PROTO_TCP) | (proto == spec.PROTO_UDP)
    ports, port_n = _sum_by_key(records["dst_port"][ported], count[ported])
    scaled = records["bytes"].astype(np.float64) * records["sampling_rate"]
    talkers, talker_b = _sum_by_key(records["src_addr"][known], scaled[known])
    blob = msgpack.packb(
        {
            "a": addrs.tobytes(),
            "an": addr_n.astype("<i8").tobytes(),
            "p": ports.astype("<u2").tobytes(),
            "pn": port_n.astype("<i8").tobytes(),
            "t": talkers.tobytes(),
            "tb": talker_b.astype("<f8").tobytes(),
        }
    )
    return float(flow_starts(records).sum()), blob


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``values``, largest first, ties in index
    order: what a stable descending sort gives, without sorting all of
    them (a window has tens of thousands of talkers and keeps ten)."""
    n = int(values.size)
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.intp)
    if k >= n:
        return np.argsort(-values, kind="stable")
    kth = np.partition(values, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(values > kth)
    ties = np.flatnonzero(values == kth)[: k - above.size]
    chosen = np.concatenate([above, ties])  # ascending within each part
    chosen.sort(kind="stable")
    return chosen[np.argsort(-values[chosen], kind="stable")]


class _SpanTable:
    """One table (keys and weights) of a run of buckets, its keys given ids
    in ascending key order by one sort over all of them."""

    def __init__(
        self, parts: list[dict[str, bytes]], key: str, kdt: str, wkey: str, wdt: str
    ) -> None:
        keys = [np.frombuffer(p[key], dtype=kdt) for p in parts]
        self.offsets = [0, *itertools.accumulate(k.size for k in keys)]
        self.weights = (
            np.concatenate([np.frombuffer(p[wkey], dtype=wdt) for p in parts])
            if parts
            else np.zeros(0, dtype=wdt)
        )
        joined = np.concatenate(keys) if keys else np.zeros(0, dtype=kdt)
        order = _key_order(joined)
        ordered = joined[order]
        change = np.ones(order.size, dtype=bool)
        if kdt == "V16":
            pairs = ordered.view(">u8").reshape(-1, 2)
            change[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
        else:
            change[1:] = ordered[1:] != ordered[:-1]
        self.keys = ordered[change]  # distinct, ascending
        self.ids = np.empty(order.size, dtype=np.int64)
        self.ids[order] = np.cumsum(change) - 1

    def window(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Distinct keys of buckets ``lo``..``hi - 1`` (ids, ascending) and
        their summed weights."""
        a, b = self.offsets[lo], self.offsets[hi]
        ids = self.ids[a:b]
        n = int(self.keys.size)
        seen = np.flatnonzero(np.bincount(ids, minlength=n))
        sums = np.bincount(ids, weights=self.weights[a:b], minlength=n)[seen]
        return seen, sums


def merge_windows(
    items: list[tuple[int, bytes]], starts: list[int], window_ms: int, top_k: int
) -> dict[int, NetworkStats]:
    """:func:`merge_tables` of each window ``[start, start + window_ms)``
    over ``items``, the (bucket start, blob) of every bucket those windows
    hold in store order (start, then micro-batch): each table is sorted
    once for all the windows, not once per window.

    Equal to :func:`merge_tables` window by window: counts are integers
    and scaled bytes are integer-valued (bytes x rate), so their float64
    sums do not depend on the order of adding (below 2^53).
    """
    parts = [msgpack.unpackb(b) for _, b in items]
    bucket_starts = [b for b, _ in items]
    addrs = _SpanTable(parts, "a", "V16", "an", "<i8")
    ports = _SpanTable(parts, "p", "<u2", "pn", "<i8")
    talkers = _SpanTable(parts, "t", "V16", "tb", "<f8")
    out: dict[int, NetworkStats] = {}
    for start in starts:
        lo = bisect.bisect_left(bucket_starts, start)
        hi = bisect.bisect_left(bucket_starts, start + window_ms)
        _, addr_n = addrs.window(lo, hi)
        _, port_n = ports.window(lo, hi)
        talker_ids, talker_b = talkers.window(lo, hi)
        out[start] = _close(
            np.rint(addr_n).astype(np.int64),
            np.rint(port_n).astype(np.int64),
            talkers.keys[talker_ids],
            talker_b,
            top_k,
        )
    return out


def _close(
    addr_n: np.ndarray,
    port_n: np.ndarray,
    talkers: np.ndarray,
    talker_b: np.ndarray,
    top_k: int,
) -> NetworkStats:
    """A window's statistics from its distinct addresses' and ports' record
    counts and its talkers (ascending) with their scaled bytes."""
    one = np.zeros(1, dtype=np.int64)
    hosts = (
        chao1(np.zeros(addr_n.size, dtype=np.int64), addr_n, 1) if addr_n.size else one
    )
    port_est = (
        chao1(np.zeros(port_n.size, dtype=np.int64), port_n, 1) if port_n.size else one
    )
    top = top_indices(talker_b, top_k)
    return NetworkStats(
        distinct_hosts=float(hosts[0]),
        distinct_hosts_observed=int(addr_n.size),
        distinct_ports=float(port_est[0]),
        distinct_ports_observed=int(port_n.size),
        top_talkers=[
            {"host": address_text(bytes(talkers[i])), "bytes": float(talker_b[i])}
            for i in top.tolist()
        ],
    )


def merge_tables(blobs: list[bytes], top_k: int) -> NetworkStats:
    """Add up the bucket tables of one window and close its statistics."""
    parts = [msgpack.unpackb(b) for b in blobs]

    def column(key: str, dtype: str) -> np.ndarray:
        arrays = [np.frombuffer(p[key], dtype=dtype) for p in parts]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)

    _, addr_n = _sum_by_key(column("a", "V16"), column("an", "<i8"))
    _, port_n = _sum_by_key(column("p", "<u2"), column("pn", "<i8"))
    talkers, talker_b = _sum_by_key(column("t", "V16"), column("tb", "<f8"))
    return _close(addr_n, port_n, talkers, talker_b, top_k)
