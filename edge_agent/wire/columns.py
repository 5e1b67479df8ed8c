"""The columns of a version 1 batch and how each one is stored.

Every column has a small integer id fixed by the format (the table
:data:`COLUMNS`), a canonical numpy dtype and one of five encodings.  A
column travels as the msgpack array ``[id, encoding, data]``, for ``FOR``
``[id, encoding, data, width, base]`` and for ``DELTA`` ``[id, encoding,
data, width, base, reference id]``:

``RAW`` (0)
    ``data`` is the column's little-endian bytes in its canonical dtype.
``CONST`` (1)
    every value is the same; ``data`` holds one value, canonical dtype.
``FOR`` (2)
    integers as offsets from ``base`` (frame of reference), each offset an
    unsigned little-endian integer ``width`` bytes wide (1, 2, 4 or 8),
    stored as byte planes: all first bytes, then all second bytes, ...
    (planes of mostly-zero high bytes compress well).
``IPV4`` (3)
    addresses that are all IPv4-mapped, as their last 4 bytes.
``DELTA`` (4)
    like ``FOR``, but each value is the same row's value of the reference
    column plus ``base`` plus the offset (all modulo 2**64); the reference
    must be an integer column of the same dtype that is not itself
    ``DELTA``.  The relay stores ``time_end`` this way, as a duration from
    ``time_start``: most flows last no time or a few seconds, so the
    offsets are narrow and mostly zero.

Encoders choose per column and per batch; readers must accept all five.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

from edge_agent.flows.schema import V4_MAPPED_PREFIX
from edge_agent.wire.errors import CorruptBatchError, TruncatedColumnsError


class Encoding(enum.IntEnum):
    """How one column's values are stored; see the module docstring."""

    RAW = 0
    CONST = 1
    FOR = 2
    IPV4 = 3
    DELTA = 4


#: id -> (name, canonical dtype).  Ids are never reused; a new column gets
#: a new id (a minor version) and old readers skip ids they do not know.
COLUMNS: dict[int, tuple[str, np.dtype[Any]]] = {
    1: ("time_start", np.dtype("<i8")),
    2: ("time_end", np.dtype("<i8")),
    3: ("exporter", np.dtype("V16")),
    4: ("src_addr", np.dtype("V16")),
    5: ("dst_addr", np.dtype("V16")),
    6: ("sampling_rate", np.dtype("<u4")),
    7: ("in_if", np.dtype("<u4")),
    8: ("out_if", np.dtype("<u4")),
    9: ("present", np.dtype("<u4")),
    10: ("src_port", np.dtype("<u2")),
    11: ("dst_port", np.dtype("<u2")),
    12: ("protocol", np.dtype("u1")),
    13: ("tos", np.dtype("u1")),
    14: ("export_proto", np.dtype("u1")),
    15: ("ip_version", np.dtype("u1")),
    16: ("direction", np.dtype("u1")),
    17: ("bytes", np.dtype("<u8")),
    18: ("packets", np.dtype("<u8")),
    19: ("flow_count", np.dtype("<u4")),
    20: ("tcp_flags", np.dtype("<u2")),
    # optional: one anomaly score per record from the relay's filter model
    32: ("score", np.dtype("<f4")),
}

COLUMN_IDS: dict[str, int] = {name: cid for cid, (name, _) in COLUMNS.items()}

#: Columns every version 1 batch carries (all but the optional ones).
REQUIRED_COLUMNS: frozenset[str] = frozenset(
    name for name, _ in COLUMNS.values() if name != "score"
)

_V4_PREFIX = np.frombuffer(V4_MAPPED_PREFIX, dtype=np.uint8)
_FOR_WIDTHS = (1, 2, 4, 8)


#: Columns the encoder tries as DELTA of another (column: reference).
DELTA_REFERENCES: dict[str, str] = {"time_end": "time_start"}


def _frame_of_reference(values: np.ndarray) -> tuple[int, int, bytes]:
    """(width, base, byte planes) of an integer column; see ``FOR``.

    Offsets are computed in the column's own width with wrap-around, which
    is exact because max - min < 2**(8 * width) <= 2**(8 * itemsize).
    """
    n = values.shape[0]
    base = int(values.min())
    span = int(values.max()) - base
    width = next(w for w in _FOR_WIDTHS if span < 1 << (8 * w))
    itemsize = values.dtype.itemsize
    unsigned = values.view(f"<u{itemsize}")
    offsets = unsigned - unsigned.dtype.type(base % (1 << (8 * itemsize)))
    planes = offsets.astype(f"<u{width}").view(np.uint8).reshape(n, width)
    return width, base, planes.T.tobytes()


def encode_column(
    name: str, values: np.ndarray, reference: np.ndarray | None = None
) -> list[Any]:
    """Return the msgpack-ready entry of one column (the smallest encoding).

    ``values`` must have the column's canonical dtype; ``reference`` is the
    column named in :data:`DELTA_REFERENCES`, if any, same dtype and length.
    """
    cid = COLUMN_IDS[name]
    dtype = COLUMNS[cid][1]
    values = np.ascontiguousarray(values, dtype=dtype)
    n = values.shape[0]
    if n == 0:
        return [cid, Encoding.RAW, b""]
    if n == 1 or bool(np.all(values == values[0])):
        return [cid, Encoding.CONST, values[:1].tobytes()]
    if dtype.kind == "V":
        raw = values.view(np.uint8).reshape(n, 16)
        if bool(np.all(raw[:, :12] == _V4_PREFIX)):
            return [cid, Encoding.IPV4, np.ascontiguousarray(raw[:, 12:]).tobytes()]
        return [cid, Encoding.RAW, values.tobytes()]
    if dtype.kind not in "iu":
        return [cid, Encoding.RAW, values.tobytes()]
    width, base, planes = _frame_of_reference(values)
    if reference is not None and dtype.kind == "i":
        ref = np.ascontiguousarray(reference, dtype=dtype)
        unsigned = f"<u{dtype.itemsize}"
        signed = f"<i{dtype.itemsize}"
        delta = (values.view(unsigned) - ref.view(unsigned)).view(signed)
        d_width, d_base, d_planes = _frame_of_reference(delta)
        if d_width <= width:
            ref_id = COLUMN_IDS[DELTA_REFERENCES[name]]
            return [cid, Encoding.DELTA, d_planes, d_width, d_base, ref_id]
    return [cid, Encoding.FOR, planes, width, base]


def decode_columns(
    entries: list[Any], count: int
) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Decode a batch's column entries: (columns by name, skipped ids).

    ``DELTA`` columns are decoded after the columns they refer to.  Raises
    :class:`CorruptBatchError` (or :class:`TruncatedColumnsError`) as
    :func:`decode_column` does, and for a repeated column or a bad
    reference.
    """
    columns: dict[str, np.ndarray] = {}
    skipped: list[int] = []
    deltas: list[list[Any]] = []
    for entry in entries:
        if isinstance(entry, list) and len(entry) >= 2 and entry[1] == Encoding.DELTA:
            deltas.append(entry)
            continue
        decoded = decode_column(entry, count)
        if decoded is None:
            skipped.append(int(entry[0]))
            continue
        name, values = decoded
        if name in columns:
            raise CorruptBatchError(f"column {name} appears twice")
        columns[name] = values
    for entry in deltas:
        decoded = _decode_delta(entry, count, columns)
        if decoded is None:
            skipped.append(int(entry[0]))
            continue
        name, values = decoded
        if name in columns:
            raise CorruptBatchError(f"column {name} appears twice")
        columns[name] = values
    return columns, tuple(skipped)


def decode_column(entry: Any, count: int) -> tuple[str, np.ndarray] | None:
    """Decode one column entry into ``count`` values of its canonical dtype.

    Returns None for a column id this reader does not know (skipped, per
    the compatibility rule).  Raises :class:`CorruptBatchError` for a
    malformed entry and :class:`TruncatedColumnsError` when the data does
    not hold exactly ``count`` values.
    """
    if not isinstance(entry, list) or len(entry) < 3:
        raise CorruptBatchError(
            f"column entry is not [id, encoding, data]: {entry!r:.80}"
        )
    cid, encoding, data = entry[0], entry[1], entry[2]
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise CorruptBatchError(f"column id must be an integer, got {cid!r:.40}")
    known = COLUMNS.get(cid)
    if known is None:
        return None
    name, dtype = known
    if not isinstance(data, bytes):
        raise CorruptBatchError(f"column {name}: data must be bytes")
    if encoding == Encoding.RAW:
        _expect_size(name, data, count * dtype.itemsize)
        return name, np.frombuffer(data, dtype=dtype).copy()
    if encoding == Encoding.CONST:
        _expect_size(name, data, dtype.itemsize)
        return name, np.repeat(np.frombuffer(data, dtype=dtype), count)
    if encoding == Encoding.IPV4:
        if dtype.kind != "V":
            raise CorruptBatchError(f"column {name}: IPV4 encoding on a non-address")
        _expect_size(name, data, count * 4)
        out = np.empty((count, 16), dtype=np.uint8)
        out[:, :12] = _V4_PREFIX
        out[:, 12:] = np.frombuffer(data, dtype=np.uint8).reshape(count, 4)
        return name, out.view(dtype).reshape(count)
    if encoding == Encoding.FOR:
        return name, _decode_for(name, dtype, entry, count)
    raise CorruptBatchError(
        f"column {name}: unknown encoding {encoding!r:.20}; "
        f"version 1 has {', '.join(f'{e.value} ({e.name})' for e in Encoding)}"
    )


def _decode_for(
    name: str, dtype: np.dtype[Any], entry: list[Any], count: int
) -> np.ndarray:
    if dtype.kind not in "iu":
        raise CorruptBatchError(f"column {name}: FOR encoding on a non-integer")
    if len(entry) < 5:
        raise CorruptBatchError(f"column {name}: FOR entry lacks width and base")
    width, base = entry[3], entry[4]
    if width not in _FOR_WIDTHS or width > dtype.itemsize:
        raise CorruptBatchError(
            f"column {name}: FOR width {width!r:.20} is not one of "
            f"{[w for w in _FOR_WIDTHS if w <= dtype.itemsize]}"
        )
    bits = 8 * dtype.itemsize
    low = -(1 << (bits - 1)) if dtype.kind == "i" else 0
    if (
        not isinstance(base, int)
        or isinstance(base, bool)
        or not low <= base < low + (1 << bits)
    ):
        raise CorruptBatchError(f"column {name}: FOR base {base!r:.30} out of range")
    data = entry[2]
    _expect_size(name, data, count * width)
    planes = np.frombuffer(data, dtype=np.uint8).reshape(width, count)
    offsets = np.ascontiguousarray(planes.T).view(f"<u{width}").reshape(count)
    unsigned_type = np.dtype(f"<u{dtype.itemsize}")
    values = offsets.astype(unsigned_type) + unsigned_type.type(base % (1 << bits))
    return values.view(dtype)


def _decode_delta(
    entry: list[Any], count: int, columns: dict[str, np.ndarray]
) -> tuple[str, np.ndarray] | None:
    cid = entry[0]
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise CorruptBatchError(f"column id must be an integer, got {cid!r:.40}")
    known = COLUMNS.get(cid)
    if known is None:
        return None
    name, dtype = known
    if len(entry) < 6:
        raise CorruptBatchError(f"column {name}: DELTA entry lacks its reference")
    ref_id = entry[5]
    ref = COLUMNS.get(ref_id) if isinstance(ref_id, int) else None
    if dtype.kind != "i":
        raise CorruptBatchError(f"column {name}: DELTA encoding on a non-signed column")
    if ref is None or ref[1] != dtype or ref[0] not in columns:
        raise CorruptBatchError(
            f"column {name}: DELTA reference {ref_id!r:.20} is not a decoded "
            f"column of dtype {dtype}"
        )
    offsets = _decode_for(name, dtype, entry, count)
    unsigned = f"<u{dtype.itemsize}"
    values = offsets.view(unsigned) + columns[ref[0]].view(unsigned)
    return name, values.view(dtype)


def _expect_size(name: str, data: bytes, size: int) -> None:
    if len(data) != size:
        raise TruncatedColumnsError(
            f"column {name}: {len(data)} bytes of data, expected {size}"
        )
