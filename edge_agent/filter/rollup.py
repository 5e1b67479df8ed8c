"""Rolling up records of unflagged hosts, with totals conserved exactly.

A TCP/UDP record whose source port is ephemeral (> 1023) while its
destination port is well known (<= 1023) loses its source port (set to 0):
the many client connections of a host to one service then collapse into
one record per (window, every other column).  Records are merged only when
all their other columns are equal, TCP flags and the time window included,
so the features of the rolled-up records (weighted by ``flow_count``) are
those of the input.  Bytes and packets are summed in uint64 (exact); the
merged record spans the earliest start to the latest end.
"""

from __future__ import annotations

import numpy as np

from edge_agent.features.spec import PROTO_TCP, PROTO_UDP
from edge_agent.flows.schema import FLOW_DTYPE

#: Columns that are summed, or spanned, instead of being part of the key.
_VALUE_COLUMNS = ("time_start", "time_end", "bytes", "packets")


def rollup(
    records: np.ndarray, window_s: int, flow_count: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rolled_records, flow_count)`` (see module doc).

    ``flow_count`` of the input (default 1 each) is summed into the output:
    how many sampled records each output record stands for.
    """
    if records.dtype != FLOW_DTYPE:
        raise TypeError(f"rollup needs FLOW_DTYPE records, got {records.dtype}")
    counts = (
        np.ones(records.size, dtype=np.int64)
        if flow_count is None
        else np.asarray(flow_count, dtype=np.int64)
    )
    if records.size == 0:
        return records.copy(), counts.copy()
    work = records.copy()
    proto = work["protocol"]
    ephemeral = (
        ((proto == PROTO_TCP) | (proto == PROTO_UDP))
        & (work["src_port"] > 1023)
        & (work["dst_port"] <= 1023)
    )
    work["src_port"][ephemeral] = 0
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
