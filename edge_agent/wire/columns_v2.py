"""How the columns of a version 2 batch are stored.

Version 2 keeps version 1's column ids and canonical dtypes
(:data:`~edge_agent.wire.columns.COLUMNS`) and changes how values travel.
Every column is handled as unsigned integers of its width: integers as
their two's-complement bit pattern, ``score`` as its IEEE 754 bits, and
addresses that are all IPv4-mapped as their 32-bit number (network order
read as an integer).  A column entry is ``[id, *spec]``; a spec is one of
(all integers little-endian, offsets as byte planes as in version 1)::

    RAW    [0, data]                        the values, canonical bytes
    CONST  [1, data]                        one value, canonical bytes
    FOR    [2, data, width, base]           base + offset
    DIFF   [3, data, width, first]          first, then running sums
    DELTA  [4, ref, inner]                  column ref's value + inner's
    DICT   [5, count, table, data, width]   table[index]
    IPV4   [6, inner]                       ::ffff: + inner's 32-bit value

Arithmetic is modulo 2**bits of the column, so ``base`` and ``first`` may
be given signed or unsigned.  ``width`` is 1 to 8 bytes, never more than
the column's size.  ``DIFF``'s data holds n - 1 offsets (value i is value
i - 1 plus offset i - 1).  ``DELTA`` (top level only) adds the same row's
value of column ``ref`` (an integer column of the same dtype that is not
itself DELTA) to ``inner``, a spec of the differences.  ``DICT``'s
``table`` is a spec of ``count`` values (RAW, CONST, FOR or DIFF) and its
data ``width``-byte indexes into it.  ``IPV4``'s ``inner`` is a spec over
the addresses' 32-bit numbers (its RAW is 4 bytes a row, network order).
Columns whose values are all zero have no entry: the header's ``z``
bitmask names them.

The encoder works on rows sorted by source and destination address
(:func:`sort_rows`), so the source address column is non-decreasing and
travels as ``DIFF``; ports, durations and scores, which repeat a lot, are
also tried as ``DICT``; docs/wire-format.md says what each choice saves.
Decoding validates every spec against the record count before allocating,
so a hostile entry raises :class:`CorruptBatchError` or
:class:`TruncatedColumnsError` instead of allocating what it claims.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

from edge_agent.flows.schema import V4_MAPPED_PREFIX
from edge_agent.wire.columns import COLUMN_IDS, COLUMNS
from edge_agent.wire.errors import CorruptBatchError, TruncatedColumnsError


class Spec(enum.IntEnum):
    """How a version 2 column's values are stored; see the module docstring."""

    RAW = 0
    CONST = 1
    FOR = 2
    DIFF = 3
    DELTA = 4
    DICT = 5
    IPV4 = 6


#: time_end travels as the flow's duration (as in version 1): mostly 0 or a
#: few distinct values, which DICT then codes in a byte.
DELTA_REFERENCES_V2: dict[str, str] = {"time_end": "time_start"}

#: Columns the encoder also tries as DICT.  Measured on the CTU-13 replay
#: and the shared captures: ports, durations and scores (one per host
#: window, so few distinct) gain from it (the scores 7% of the CTU-13
#: batches); bytes, packets, flags and protocol did not, and np.unique is
#: not free (a sort per column and batch).
DICT_CANDIDATES: frozenset[str] = frozenset(
    {"src_port", "dst_port", "time_end", "score"}
)

_V4_PREFIX = np.frombuffer(V4_MAPPED_PREFIX, dtype=np.uint8)
_U4 = np.dtype("<u4")


def _width(span: int) -> int:
    """Bytes needed for offsets up to ``span`` (1 to 8)."""
    return max(1, (span.bit_length() + 7) // 8)


def _planes(offsets: np.ndarray, width: int) -> bytes:
    """Unsigned ``offsets`` as ``width`` byte planes (low bytes first)."""
    n = offsets.shape[0]
    wide = offsets.astype("<u8", copy=False).view(np.uint8).reshape(n, 8)
    return np.ascontiguousarray(wide[:, :width].T).tobytes()


def _unplanes(data: bytes, width: int, count: int, what: str) -> np.ndarray:
    """Inverse of :func:`_planes`: ``count`` uint64 offsets."""
    if not isinstance(data, bytes) or len(data) != count * width:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise TruncatedColumnsError(
            f"{what}: {got} bytes of data, expected {count * width}"
        )
    wide = np.zeros((count, 8), dtype=np.uint8)
    wide[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(width, count).T
    return wide.view("<u8").reshape(count)


def integer_view(name: str, values: np.ndarray) -> np.ndarray:
    """The unsigned integers column ``name`` travels as (a view, no copy)."""
    dtype = COLUMNS[COLUMN_IDS[name]][1]
    return np.ascontiguousarray(values, dtype=dtype).view(f"<u{dtype.itemsize}")


def sort_rows(src_addr: np.ndarray, dst_addr: np.ndarray) -> np.ndarray:
    """The row order the encoder ships (a permutation): by source address,
    then destination address (both in network byte order), stable
    otherwise.

    One argsort of a 64-bit key when both columns are all IPv4 (the usual
    case), a lexsort of four 64-bit words otherwise.
    """
    src = np.ascontiguousarray(src_addr).view(np.uint8)
    dst = np.ascontiguousarray(dst_addr).view(np.uint8)
    n = src.shape[0] // 16
    src = src.reshape(n, 16)
    dst = dst.reshape(n, 16)
    if bool(np.all(src[:, :12] == _V4_PREFIX)) and bool(
        np.all(dst[:, :12] == _V4_PREFIX)
    ):
        key = np.empty((n, 8), dtype=np.uint8)
        key[:, :4] = src[:, 12:]
        key[:, 4:] = dst[:, 12:]
        return np.argsort(key.view(">u8").reshape(n), kind="stable")
    words = [
        np.ascontiguousarray(part).view(">u8").reshape(n)
        for part in (dst[:, 8:], dst[:, :8], src[:, 8:], src[:, :8])
    ]
    return np.lexsort(words)


# --- encoding -------------------------------------------------------------


def _for_spec(u: np.ndarray, signed: bool, lo: int, hi: int) -> list[Any]:
    """FOR of unsigned ``u`` (``lo``/``hi`` its unsigned extremes): base =
    the minimum in the column's sign."""
    size = u.dtype.itemsize
    if signed:
        values = u.view(f"<i{size}")
        base = int(values.min())
        span = int(values.max()) - base
    else:
        base, span = lo, hi - lo
    offsets = u - u.dtype.type(base % (1 << (8 * size)))
    width = _width(span)
    return [Spec.FOR, _planes(offsets, width), width, base]


def _diff_spec(u: np.ndarray) -> list[Any] | None:
    """DIFF of unsigned ``u`` when it is non-decreasing, else None."""
    if u.shape[0] > 1 and (u[0] > u[-1] or bool(np.any(u[1:] < u[:-1]))):
        return None
    steps = np.diff(u)
    width = _width(int(steps.max()) if steps.size else 0)
    return [Spec.DIFF, _planes(steps, width), width, int(u[0])]


def _diff_spec_signed(u: np.ndarray) -> list[Any] | None:
    """DIFF of ``u`` when it is non-decreasing as signed integers."""
    s = u.view(f"<i{u.dtype.itemsize}")
    if u.shape[0] > 1 and bool(np.any(s[1:] < s[:-1])):
        return None
    steps = np.diff(u)  # modulo 2**bits: the signed steps, all >= 0
    width = _width(int(steps.max()) if steps.size else 0)
    return [Spec.DIFF, _planes(steps, width), width, int(s[0])]


def _dict_spec(u: np.ndarray, signed: bool = False) -> list[Any] | None:
    """DICT of unsigned ``u`` (table DIFF-coded, in the column's sign order
    so that small negative values stay close) if at most half the values
    are distinct, else None."""
    n = u.shape[0]
    if signed:
        s = u.view(f"<i{u.dtype.itemsize}")
        table_s = np.unique(s)
        if table_s.shape[0] * 2 > n:
            return None
        index = np.searchsorted(table_s, s)
        table = table_s.view(u.dtype)
    elif u.dtype.itemsize <= 2 and n >= 1024:
        # A presence table over the whole range: no sort.
        seen = np.zeros(1 << (8 * u.dtype.itemsize), dtype=bool)
        seen[u] = True
        table = np.flatnonzero(seen).astype(u.dtype)
        if table.shape[0] * 2 > n:
            return None
        rank = np.cumsum(seen, dtype=np.int64) - 1
        index = rank[u]
    else:
        table = np.unique(u)
        if table.shape[0] * 2 > n:
            return None
        index = np.searchsorted(table, u)
    inner = _diff_spec_signed(table) if signed else _diff_spec(table)
    assert inner is not None  # np.unique sorts
    width = _width(table.shape[0] - 1)
    return [Spec.DICT, int(table.shape[0]), inner, _planes(index, width), width]


def _spec_size(spec: list[Any]) -> int:
    """Bytes of a spec's data (what the choice between specs compares)."""
    size = 0
    for item in spec:
        if isinstance(item, bytes):
            size += len(item)
        elif isinstance(item, list):
            size += _spec_size(item)
    return size


def _integer_spec(
    u: np.ndarray, signed: bool, try_dict: bool, hi: int | None = None
) -> list[Any]:
    """The smallest of CONST, FOR, DIFF (and DICT if asked) for ``u``
    (``hi``: its maximum, if known)."""
    hi = int(u.max()) if hi is None else hi
    lo = int(u.min())
    if lo == hi:
        return [Spec.CONST, u[:1].tobytes()]
    best = _for_spec(u, signed, lo, hi)
    for candidate in (_diff_spec(u), _dict_spec(u, signed) if try_dict else None):
        if candidate is not None and _spec_size(candidate) < _spec_size(best):
            best = candidate
    return best


def _address_spec(values: np.ndarray) -> list[Any]:
    n = values.shape[0]
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(n, 16)
    if bool(np.all(raw == raw[0])):
        return [Spec.CONST, raw[0].tobytes()]
    if bool(np.all(raw[:, :12] == _V4_PREFIX)):
        octets = np.ascontiguousarray(raw[:, 12:])
        numbers = octets.view(">u4").reshape(n).astype(_U4)
        # Sorted (the source column) as DIFF; otherwise the octets as they
        # are, where zstd finds a repeated address as one 4-byte match.
        inner = _diff_spec(numbers)
        return [Spec.IPV4, inner or [Spec.RAW, octets.tobytes()]]
    # Runs of equal addresses (the sorted source column: its distinct
    # values) as a DICT of the runs' values; a sort-free O(n) pass.
    starts = np.flatnonzero(np.any(raw[1:] != raw[:-1], axis=1)) + 1
    runs = starts.shape[0] + 1
    if runs * 2 <= n:
        index = np.zeros(n, dtype=np.uint64)
        index[starts] = 1
        np.cumsum(index, out=index)
        width = _width(runs - 1)
        table = raw[np.concatenate(([0], starts))]
        return [Spec.DICT, runs, [Spec.RAW, table.tobytes()], _planes(index, width),
                width]  # fmt: skip
    return [Spec.RAW, raw.tobytes()]


def encode_columns_v2(columns: dict[str, np.ndarray]) -> tuple[list[list[Any]], int]:
    """(column entries, zero bitmask) of one batch's columns.

    Every column holds the same number (>= 1) of values in its canonical
    dtype; the caller has sorted the rows (:func:`sort_rows`).
    """
    entries: list[list[Any]] = []
    zero_mask = 0
    for name, values in columns.items():
        cid = COLUMN_IDS[name]
        dtype = COLUMNS[cid][1]
        if dtype.kind == "V":
            if not np.ascontiguousarray(values).view(np.uint8).any():
                zero_mask |= 1 << cid
            else:
                entries.append([cid, *_address_spec(values)])
            continue
        u = integer_view(name, values)
        hi = int(u.max())
        if hi == 0:
            zero_mask |= 1 << cid
            continue
        signed = dtype.kind == "i"
        try_dict = name in DICT_CANDIDATES
        ref_name = DELTA_REFERENCES_V2.get(name)
        if ref_name is not None and ref_name in columns:
            inner = _integer_spec(u - integer_view(ref_name, columns[ref_name]),
                                  signed, try_dict)  # fmt: skip
            # The plain values (times) are mostly distinct: no DICT for them.
            plain = _integer_spec(u, signed, False, hi)
            if _spec_size(inner) <= _spec_size(plain):
                entries.append([cid, Spec.DELTA, COLUMN_IDS[ref_name], inner])
            else:
                entries.append([cid, *plain])
            continue
        entries.append([cid, *_integer_spec(u, signed, try_dict, hi)])
    return entries, zero_mask


# --- decoding -------------------------------------------------------------


def _check_int(value: Any, what: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high)``, or CorruptBatchError."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise CorruptBatchError(
            f"{what} must be an integer in [{low}, {high}), got {value!r:.30}"
        )
    return value


def _spec_args(spec: Any, what: str) -> tuple[int, list[Any]]:
    if not isinstance(spec, list) or not spec:
        raise CorruptBatchError(
            f"{what}: a spec is a non-empty array, got {spec!r:.60}"
        )
    code = spec[0]
    if not isinstance(code, int) or isinstance(code, bool) or code not in set(Spec):
        raise CorruptBatchError(
            f"{what}: unknown encoding {code!r:.20}; version 2 has "
            + ", ".join(f"{e.value} ({e.name})" for e in Spec)
        )
    arity = {Spec.RAW: 2, Spec.CONST: 2, Spec.FOR: 4, Spec.DIFF: 4,
             Spec.DELTA: 3, Spec.DICT: 5, Spec.IPV4: 2}[Spec(code)]  # fmt: skip
    if len(spec) != arity:
        raise CorruptBatchError(
            f"{what}: {Spec(code).name} takes {arity} items, got {len(spec)}"
        )
    return code, spec


def _decode_integers(
    spec: Any, count: int, size: int, what: str, allowed: frozenset[Spec]
) -> np.ndarray:
    """``count`` values of a ``size``-byte integer spec, as ``<u{size}``."""
    code, spec = _spec_args(spec, what)
    if code not in allowed:
        raise CorruptBatchError(f"{what}: {Spec(code).name} is not allowed here")
    dtype = np.dtype(f"<u{size}")
    bits = 8 * size
    if code in (Spec.RAW, Spec.CONST):
        data = spec[1]
        expect = size * (count if code == Spec.RAW else 1)
        if not isinstance(data, bytes) or len(data) != expect:
            got = len(data) if isinstance(data, bytes) else type(data).__name__
            raise TruncatedColumnsError(
                f"{what}: {got} bytes of data, expected {expect}"
            )
        values = np.frombuffer(data, dtype=dtype)
        return values.copy() if code == Spec.RAW else np.repeat(values, count)
    if code in (Spec.FOR, Spec.DIFF):
        width = _check_int(spec[2], f"{what}: width", 1, size + 1)
        start = _check_int(spec[3], f"{what}: base", -(1 << (bits - 1)), 1 << bits)
        start_u = np.uint64(start % (1 << bits))
        if code == Spec.FOR:
            offsets = _unplanes(spec[1], width, count, what)
            return (offsets + start_u).astype(dtype)
        if count == 0:
            raise CorruptBatchError(f"{what}: DIFF of no values")
        offsets = _unplanes(spec[1], width, count - 1, what)
        out = np.empty(count, dtype=np.uint64)
        out[0] = start_u
        np.cumsum(offsets, out=out[1:])  # wraps modulo 2**64
        out[1:] += start_u
        return out.astype(dtype)
    if code == Spec.DICT:
        table_count = _check_int(spec[1], f"{what}: DICT count", 1, count + 1)
        table = _decode_integers(
            spec[2], table_count, size, f"{what} (DICT table)", _TABLE_SPECS
        )
        width = _check_int(spec[4], f"{what}: DICT width", 1, 9)
        index = _unplanes(spec[3], width, count, f"{what} (DICT index)")
        if count and int(index.max()) >= table_count:
            raise CorruptBatchError(
                f"{what}: DICT index {int(index.max())} beyond its "
                f"{table_count}-value table"
            )
        return table[index]
    raise CorruptBatchError(f"{what}: {Spec(code).name} is not allowed here")


_TABLE_SPECS = frozenset({Spec.RAW, Spec.CONST, Spec.FOR, Spec.DIFF})
_INTEGER_SPECS = _TABLE_SPECS | {Spec.DICT}
_ADDRESS_SPECS = frozenset({Spec.RAW, Spec.CONST, Spec.IPV4, Spec.DICT})
_ADDRESS_TABLE_SPECS = frozenset({Spec.RAW, Spec.CONST})


def _decode_addresses(
    spec: Any, count: int, what: str, allowed: frozenset[Spec] = _ADDRESS_SPECS
) -> np.ndarray:
    code, spec = _spec_args(spec, what)
    if code not in allowed:
        raise CorruptBatchError(
            f"{what}: {Spec(code).name} is not allowed for addresses here"
        )
    if code == Spec.IPV4:
        inner_code, inner = _spec_args(spec[1], what)
        if inner_code == Spec.RAW:
            data = inner[1]
            if not isinstance(data, bytes) or len(data) != 4 * count:
                got = len(data) if isinstance(data, bytes) else type(data).__name__
                raise TruncatedColumnsError(
                    f"{what}: {got} bytes of data, expected {4 * count}"
                )
            octets = np.frombuffer(data, dtype=np.uint8).reshape(count, 4)
        else:
            numbers = _decode_integers(inner, count, 4, what, _INTEGER_SPECS)
            octets = numbers.astype(">u4").view(np.uint8).reshape(count, 4)
        out = np.empty((count, 16), dtype=np.uint8)
        out[:, :12] = _V4_PREFIX
        out[:, 12:] = octets
        return out.view("V16").reshape(count)
    if code == Spec.DICT:
        table_count = _check_int(spec[1], f"{what}: DICT count", 1, count + 1)
        table = _decode_addresses(
            spec[2], table_count, f"{what} (DICT table)", _ADDRESS_TABLE_SPECS
        )
        width = _check_int(spec[4], f"{what}: DICT width", 1, 9)
        index = _unplanes(spec[3], width, count, f"{what} (DICT index)")
        if count and int(index.max()) >= table_count:
            raise CorruptBatchError(
                f"{what}: DICT index {int(index.max())} beyond its "
                f"{table_count}-value table"
            )
        return table[index]
    if code in (Spec.RAW, Spec.CONST):
        data = spec[1]
        expect = 16 * (count if code == Spec.RAW else 1)
        if not isinstance(data, bytes) or len(data) != expect:
            got = len(data) if isinstance(data, bytes) else type(data).__name__
            raise TruncatedColumnsError(
                f"{what}: {got} bytes of data, expected {expect}"
            )
        values = np.frombuffer(data, dtype="V16")
        return values.copy() if code == Spec.RAW else np.repeat(values, count)
    raise AssertionError(f"unreachable: {code}")


def decode_columns_v2(
    entries: list[Any], count: int, zero_mask: int
) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Decode a version 2 batch's entries and zero bitmask: (columns by
    name in canonical dtypes, skipped unknown ids).

    Raises :class:`CorruptBatchError` (or :class:`TruncatedColumnsError`)
    for a malformed entry, a repeated column, a column both listed and
    marked zero, or a bad DELTA reference.
    """
    columns: dict[str, np.ndarray] = {}
    skipped: list[int] = []
    deltas: list[tuple[str, np.dtype[Any], list[Any]]] = []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) < 2:
            raise CorruptBatchError(f"column entry is not [id, spec...]: {entry!r:.80}")
        cid = entry[0]
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise CorruptBatchError(f"column id must be an integer, got {cid!r:.40}")
        known = COLUMNS.get(cid)
        if known is None:
            skipped.append(cid)
            continue
        name, dtype = known
        if name in columns or any(d[0] == name for d in deltas):
            raise CorruptBatchError(f"column {name} appears twice")
        if 0 <= cid < zero_mask.bit_length() and zero_mask >> cid & 1:
            raise CorruptBatchError(f"column {name} is both given and marked zero")
        spec = entry[1:]
        if dtype.kind == "V":
            columns[name] = _decode_addresses(spec, count, f"column {name}")
        elif spec and spec[0] == Spec.DELTA:
            deltas.append((name, dtype, spec))
        else:
            values = _decode_integers(
                spec, count, dtype.itemsize, f"column {name}", _INTEGER_SPECS
            )
            columns[name] = values.view(dtype)
    for cid, (name, dtype) in COLUMNS.items():
        if zero_mask >> cid & 1:
            columns[name] = np.zeros(count, dtype=dtype)
    for name, dtype, spec in deltas:
        what = f"column {name}"
        _spec_args(spec, what)
        ref = COLUMNS.get(spec[1]) if isinstance(spec[1], int) else None
        if (
            ref is None
            or ref[1] != dtype
            or ref[1].kind == "V"
            or ref[0] not in columns
        ):
            raise CorruptBatchError(
                f"{what}: DELTA reference {spec[1]!r:.20} is not a decoded "
                f"non-DELTA column of dtype {dtype}"
            )
        inner = _decode_integers(spec[2], count, dtype.itemsize, what, _INTEGER_SPECS)
        unsigned = f"<u{dtype.itemsize}"
        columns[name] = (columns[ref[0]].view(unsigned) + inner).view(dtype)
    return columns, tuple(skipped)
