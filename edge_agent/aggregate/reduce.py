"""Vectorised reduction of aggregated rows that share a key.

:func:`reduce_rows` is associative: reducing already-reduced rows together
with new ones gives the same result as reducing all inputs at once, which
is what lets a window be compacted incrementally.
"""

from __future__ import annotations

import numpy as np

from edge_agent.aggregate.schema import AGG_DTYPE, KEY_SIZE, take_rows

_WORDS = KEY_SIZE // 8
#: Words of the key that hold exporter, src_addr and dst_addr (output order).
_ADDRESS_WORDS = 6
_MIX = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(29)


def _key_words(rows: np.ndarray) -> np.ndarray:
    """The key prefix of each row as an ``(n, KEY_SIZE // 8)`` uint64 view."""
    n = rows.shape[0]
    raw = rows.view(np.uint8).reshape(n, AGG_DTYPE.itemsize)
    return raw[:, :KEY_SIZE].view("<u8")


def _hash_words(words: np.ndarray) -> np.ndarray:
    """A 64-bit mix of each row's key words (not cryptographic)."""
    h = np.zeros(words.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            h ^= words[:, j]
            h *= _MIX
            h ^= h >> _SHIFT
    return h


def group_by_words(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group rows of an ``(n, k)`` uint64 key matrix by equal keys.

    Returns ``(order, starts)``: a permutation that makes rows with equal
    keys adjacent, and the positions in that order where each group starts.

    Sorting one 64-bit hash of the key is several times faster than a
    lexicographic sort of all key words.  Two different keys with the same
    hash (the boundary check below sees it) could interleave, so then the
    exact lexicographic sort is used instead.
    """
    h = _hash_words(words)
    order = np.argsort(h, kind="stable")
    sorted_words = words[order]
    key_change = np.any(sorted_words[1:] != sorted_words[:-1], axis=1)
    sorted_h = h[order]
    if np.any(key_change & (sorted_h[1:] == sorted_h[:-1])):
        order = np.lexsort(words.T[::-1])
        sorted_words = words[order]
        key_change = np.any(sorted_words[1:] != sorted_words[:-1], axis=1)
    starts = np.concatenate(([0], np.flatnonzero(key_change) + 1))
    return order, starts


def _group(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (ordered, starts): the rows with equal keys made adjacent, and
    the index in ``ordered`` where each key's group starts.

    As :func:`group_by_words`, but the sorted key words are read through a
    view of the sorted rows rather than copied: a reduction's peak memory
    is what bounds the aggregator's.
    """
    words = _key_words(rows)
    h = _hash_words(words)
    order = np.argsort(h, kind="stable")
    ordered = take_rows(rows, order)
    sorted_words = _key_words(ordered)
    key_change = np.any(sorted_words[1:] != sorted_words[:-1], axis=1)
    sorted_h = h[order]
    if np.any(key_change & (sorted_h[1:] == sorted_h[:-1])):
        order = np.lexsort(words.T[::-1])
        ordered = take_rows(rows, order)
        sorted_words = _key_words(ordered)
        key_change = np.any(sorted_words[1:] != sorted_words[:-1], axis=1)
    starts = np.concatenate(([0], np.flatnonzero(key_change) + 1))
    return ordered, starts


def order_by_addresses(rows: np.ndarray) -> np.ndarray:
    """AGG_DTYPE rows ordered by exporter, then source, then destination
    address (equal addresses side by side compress well; runs of one
    exporter are what the relay splits batches by)."""
    if rows.shape[0] <= 1:
        return rows.copy()
    address_words = _key_words(np.ascontiguousarray(rows))[:, :_ADDRESS_WORDS]
    return take_rows(rows, np.lexsort(address_words.T[::-1]))


def reduce_rows(rows: np.ndarray) -> np.ndarray:
    """Merge AGG_DTYPE rows with equal keys into one row per key.

    Sums ``bytes``, ``packets`` and ``flow_count``, ORs ``tcp_flags``,
    takes the min ``time_start`` and max ``time_end``.  The result is
    ordered by exporter, then source, then destination address (so equal
    addresses sit together, which the wire format compresses well); the
    order among rows with the same three addresses is unspecified.

    Sums wrap around past 2**64 bytes (or 2**32 records) per key, which no
    real window reaches.
    """
    if rows.dtype != AGG_DTYPE:
        raise TypeError(f"expected AGG_DTYPE rows, got {rows.dtype}")
    if rows.shape[0] <= 1:
        return rows.copy()
    ordered, starts = _group(np.ascontiguousarray(rows))
    out = take_rows(ordered, starts)  # key columns from the first row of a group
    out["bytes"] = np.add.reduceat(ordered["bytes"], starts)
    out["packets"] = np.add.reduceat(ordered["packets"], starts)
    out["flow_count"] = np.add.reduceat(ordered["flow_count"], starts)
    out["tcp_flags"] = np.bitwise_or.reduceat(ordered["tcp_flags"], starts)
    out["time_start"] = np.minimum.reduceat(ordered["time_start"], starts)
    out["time_end"] = np.maximum.reduceat(ordered["time_end"], starts)
    return order_by_addresses(out)
