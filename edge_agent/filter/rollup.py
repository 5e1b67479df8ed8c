"""Rolling up records of unflagged hosts, with totals conserved exactly.

A TCP/UDP record whose source port is ephemeral (> 1023) while its
destination port is well known (<= 1023) loses its source port (set to 0):
the many client connections of a host to one service then collapse into
one record per (window, every other column).  Records are merged only when
all their other columns are equal, TCP flags and the time window included,
so the features of the rolled-up records (weighted by ``flow_count``) are
those of the input.  Bytes and packets are summed in uint64 (exact); the
merged record spans the earliest start to the latest end.

Both record shapes roll up: :data:`~edge_agent.flows.schema.FLOW_DTYPE`
records (one sampled record each, unless ``flow_count`` says otherwise)
and the relay's aggregated :data:`~edge_agent.aggregate.AGG_DTYPE` rows,
whose own ``flow_count`` column is summed and written back.
"""

from __future__ import annotations

import numpy as np

from edge_agent.aggregate import AGG_DTYPE, group_by_words, order_by_addresses
from edge_agent.aggregate.schema import KEY_SIZE, take_rows
from edge_agent.features.spec import PROTO_TCP, PROTO_UDP
from edge_agent.flows.schema import FLOW_DTYPE

#: Columns that are summed, or spanned, instead of being part of the key.
_VALUE_COLUMNS = ("time_start", "time_end", "bytes", "packets")


def rollup(
    records: np.ndarray, window_s: int, flow_count: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rolled_records, flow_count)`` (see module doc).

    ``flow_count`` of the input (default: the ``flow_count`` column of
    AGG_DTYPE rows, else 1 each) is summed into the output: how many
    sampled records each output record stands for.  FLOW_DTYPE output is
    ordered by ``time_start``; AGG_DTYPE output by exporter, source and
    destination address (as the aggregator emits rows), its ``flow_count``
    column holding the same sums as the returned array.
    """
    if records.dtype == AGG_DTYPE:
        return _rollup_rows(records, window_s, flow_count)
    if records.dtype != FLOW_DTYPE:
        raise TypeError(
            f"rollup needs FLOW_DTYPE or AGG_DTYPE records, got {records.dtype}"
        )
    counts = (
        np.ones(records.size, dtype=np.int64)
        if flow_count is None
        else np.asarray(flow_count, dtype=np.int64)
    )
    if records.size == 0:
        return records.copy(), counts.copy()
    work = records.copy()
    _drop_ephemeral_ports(work)
    key = work.copy()
    for name in _VALUE_COLUMNS:
        key[name] = 0
    key["_pad"] = 0
    # The window start goes into the key through time_end's slot: records
    # of different windows never merge.
    key["time_end"] = records["time_start"] // (int(window_s) * 1000)
    raw = np.ascontiguousarray(key).view(f"V{FLOW_DTYPE.itemsize}")
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = work[first].copy()
    n = first.size
    for name in ("bytes", "packets"):
        total = np.zeros(n, dtype=np.uint64)
        np.add.at(total, inverse, work[name].astype(np.uint64))
        out[name] = total
    start = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(start, inverse, work["time_start"])
    end = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(end, inverse, work["time_end"])
    out["time_start"] = start
    out["time_end"] = end
    merged = np.zeros(n, dtype=np.int64)
    np.add.at(merged, inverse, counts)
    order = np.argsort(out["time_start"], kind="stable")
    return out[order], merged[order]


def _drop_ephemeral_ports(work: np.ndarray) -> None:
    proto = work["protocol"]
    ephemeral = (
        ((proto == PROTO_TCP) | (proto == PROTO_UDP))
        & (work["src_port"] > 1023)
        & (work["dst_port"] <= 1023)
    )
    work["src_port"][ephemeral] = 0


def _rollup_rows(
    rows: np.ndarray, window_s: int, flow_count: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The AGG_DTYPE path: grouped by a hash of the key words, as the
    aggregator's reducer does (a sort of 120-byte void keys is far slower).

    The key is the aggregation key (whose padding is zero in every row the
    aggregator makes) plus one word holding the window and the TCP flags.
    """
    work = np.ascontiguousarray(rows).copy()
    if flow_count is not None:
        work["flow_count"] = np.asarray(flow_count, dtype=np.int64)
    if work.size == 0:
        return work, work["flow_count"].astype(np.int64)
    _drop_ephemeral_ports(work)
    n = work.shape[0]
    prefix = work.view(np.uint8).reshape(n, AGG_DTYPE.itemsize)[:, :KEY_SIZE]
    words = np.empty((n, KEY_SIZE // 8 + 1), dtype=np.uint64)
    words[:, :-1] = prefix.view("<u8")
    window = work["time_start"] // (int(window_s) * 1000)
    # 47 bits of window index (ms since the epoch / window: plenty) above
    # the 16 flag bits.
    words[:, -1] = (window.astype(np.uint64) << np.uint64(16)) | work[
        "tcp_flags"
    ].astype(np.uint64)
    order, starts = group_by_words(words)
    ordered = take_rows(work, order)
    out = take_rows(ordered, starts)
    out["bytes"] = np.add.reduceat(ordered["bytes"], starts)
    out["packets"] = np.add.reduceat(ordered["packets"], starts)
    merged = np.add.reduceat(ordered["flow_count"].astype(np.int64), starts)
    out["flow_count"] = merged
    out["time_start"] = np.minimum.reduceat(ordered["time_start"], starts)
    out["time_end"] = np.maximum.reduceat(ordered["time_end"], starts)
    out = order_by_addresses(out)
    return out, out["flow_count"].astype(np.int64)
