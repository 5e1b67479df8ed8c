"""The aggregated record: :data:`AGG_DTYPE`, the row the relay ships.

Pre-aggregation sums flow records that share a key within a time window.
The aggregated row keeps the :data:`~edge_agent.flows.schema.FLOW_DTYPE`
columns the cloud needs plus ``flow_count``, the number of input records
merged into the row.  Column meanings and units are those of
``FLOW_DTYPE`` (times in ms since the epoch, addresses 16 bytes with IPv4
mapped, counters as exported, i.e. sampled and not scaled).

Layout
------
The key columns come first and fill :data:`KEY_SIZE` bytes (padded to a
multiple of 8 by ``_kpad``), so the key of a row is a contiguous byte
prefix that the reducer reads as ``uint64`` words without copying fields.

Key: ``exporter, src_addr, dst_addr, sampling_rate, in_if, out_if,
present, src_port, dst_port, protocol, tos, export_proto, ip_version,
direction``.  ``export_proto``, ``ip_version``, ``direction`` and
``present`` are constant for one exporter template, so keying on them does
not split rows in practice; it keeps their meaning exact (a merged row
never mixes an unknown value with a known one).

Values: ``time_start`` (min), ``time_end`` (max), ``bytes``, ``packets``
and ``flow_count`` (sums), ``tcp_flags`` (bitwise OR).

Dropped: ``exporter_port``, ``domain``, ``next_hop``, ``src_mask``,
``dst_mask``, ``vlan``, ``src_as``, ``dst_as`` and ``sampler_id``; their
presence bits are cleared from ``present``.
"""

from __future__ import annotations

import numpy as np

from edge_agent.flows.schema import FLOW_DTYPE, Field

AGG_DTYPE = np.dtype(
    [
        # -- key (KEY_SIZE bytes) --
        ("exporter", "V16"),
        ("src_addr", "V16"),
        ("dst_addr", "V16"),
        ("sampling_rate", "<u4"),
        ("in_if", "<u4"),
        ("out_if", "<u4"),
        ("present", "<u4"),
        ("src_port", "<u2"),
        ("dst_port", "<u2"),
        ("protocol", "u1"),
        ("tos", "u1"),
        ("export_proto", "u1"),
        ("ip_version", "u1"),
        ("direction", "u1"),
        ("_kpad", "V7"),
        # -- values --
        ("time_start", "<i8"),  # min over merged records, ms since epoch
        ("time_end", "<i8"),  # max over merged records, ms since epoch
        ("bytes", "<u8"),  # sum
        ("packets", "<u8"),  # sum
        ("flow_count", "<u4"),  # number of input records merged
        ("tcp_flags", "<u2"),  # bitwise OR
        ("_vpad", "V2"),
    ]
)
"""The aggregated row; see the module docstring."""

#: Names of the key columns, in layout order.
KEY_FIELDS: tuple[str, ...] = (
    "exporter",
    "src_addr",
    "dst_addr",
    "sampling_rate",
    "in_if",
    "out_if",
    "present",
    "src_port",
    "dst_port",
    "protocol",
    "tos",
    "export_proto",
    "ip_version",
    "direction",
)

#: Bytes of the key prefix of a row (a multiple of 8).
KEY_SIZE: int = AGG_DTYPE.fields["time_start"][1]  # type: ignore[index]

#: Public columns of an aggregated row (the padding is not one).
AGG_COLUMNS: tuple[str, ...] = tuple(
    n for n in AGG_DTYPE.names or () if not n.startswith("_")
)

#: Presence bits of the FLOW_DTYPE columns that AGG_DTYPE keeps.
KEPT_PRESENT: int = int(
    Field.TIME_START
    | Field.TIME_END
    | Field.SRC_ADDR
    | Field.DST_ADDR
    | Field.SRC_PORT
    | Field.DST_PORT
    | Field.PROTOCOL
    | Field.TCP_FLAGS
    | Field.BYTES
    | Field.PACKETS
    | Field.IN_IF
    | Field.OUT_IF
    | Field.TOS
    | Field.DIRECTION
)

assert KEY_SIZE % 8 == 0, "key prefix must be whole uint64 words"
assert AGG_DTYPE.itemsize % 8 == 0


def _gather_columns() -> np.ndarray:
    """Byte offsets in a FLOW_DTYPE row that build one AGG_DTYPE row.

    Padding and ``flow_count`` have no source; they read byte 0 and are
    overwritten after the gather.
    """
    flow_fields = FLOW_DTYPE.fields
    assert flow_fields is not None
    parts = []
    for name in AGG_DTYPE.names or ():
        size = AGG_DTYPE[name].itemsize
        if name in flow_fields:
            offset = flow_fields[name][1]
            if FLOW_DTYPE[name] != AGG_DTYPE[name]:
                raise TypeError(f"column {name} differs between FLOW and AGG")
            parts.append(np.arange(offset, offset + size))
        else:
            parts.append(np.zeros(size, dtype=np.intp))
    return np.concatenate(parts).astype(np.intp)


_GATHER = _gather_columns()
_KPAD = slice(
    AGG_DTYPE.fields["_kpad"][1],  # type: ignore[index]
    AGG_DTYPE.fields["_kpad"][1] + 7,  # type: ignore[index]
)
_VPAD = slice(
    AGG_DTYPE.fields["_vpad"][1],  # type: ignore[index]
    AGG_DTYPE.fields["_vpad"][1] + 2,  # type: ignore[index]
)


def empty_rows(count: int = 0) -> np.ndarray:
    """Return ``count`` zeroed aggregated rows."""
    return np.zeros(count, dtype=AGG_DTYPE)


def take_rows(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``rows[index]`` for AGG_DTYPE rows, gathered through a void view.

    Fancy indexing a structured array copies field by field and is ~10x
    slower than gathering whole rows as opaque ``V`` items.
    """
    void = np.ascontiguousarray(rows).view(f"V{AGG_DTYPE.itemsize}")
    return np.take(void, index).view(AGG_DTYPE)


def concat_rows(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate AGG_DTYPE arrays through void views (~25x faster than
    ``np.concatenate`` on the structured arrays, which copies by field)."""
    if not parts:
        return empty_rows(0)
    void = f"V{AGG_DTYPE.itemsize}"
    joined = np.concatenate([np.ascontiguousarray(p).view(void) for p in parts])
    return joined.view(AGG_DTYPE)


def to_aggregate_rows(records: np.ndarray) -> np.ndarray:
    """Turn FLOW_DTYPE records into AGG_DTYPE rows, one each (vectorised).

    Each row gets ``flow_count`` 1 and ``present`` limited to
    :data:`KEPT_PRESENT`.  Raises :class:`TypeError` for another dtype.
    """
    if records.dtype != FLOW_DTYPE:
        raise TypeError(f"expected FLOW_DTYPE records, got {records.dtype}")
    n = records.shape[0]
    raw = np.ascontiguousarray(records).view(np.uint8).reshape(n, FLOW_DTYPE.itemsize)
    # One gather of whole byte columns is ~10x faster than copying the
    # structured fields one by one (strided copies).
    out = np.take(raw, _GATHER, axis=1)
    out[:, _KPAD] = 0
    out[:, _VPAD] = 0
    rows = out.view(AGG_DTYPE).reshape(n)
    rows["flow_count"] = 1
    rows["present"] &= np.uint32(KEPT_PRESENT)
    return rows
