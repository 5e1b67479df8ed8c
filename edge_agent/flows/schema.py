"""The columnar flow record: one numpy structured dtype for every protocol.

Every decoder (NetFlow v1/v5, v9, IPFIX, sFlow v5) produces a
``numpy.ndarray`` of :data:`FLOW_DTYPE`.  Downstream code (aggregation,
features, wire format, the cloud engine) only ever sees this schema.

Conventions
-----------
* Addresses (``exporter``, ``src_addr``, ``dst_addr``, ``next_hop``) are 16
  raw bytes in network order.  IPv4 addresses are stored IPv4-mapped
  (``::ffff:a.b.c.d``) so one column holds both families; ``ip_version`` says
  which family the flow's own addresses are.
* Times are absolute UTC in **milliseconds** since the UNIX epoch (int64).
  sysUptime-relative fields are converted with the export header; sFlow
  samples carry no flow time, so start and end are the datagram's receive
  time.
* ``present`` is a bitmask of :class:`Field` telling which columns the export
  actually carried.  A column whose bit is clear holds 0 and means "unknown",
  not "zero".
* ``sampling_rate`` is the 1-in-N packet sampling rate that applies to the
  record; 0 means unknown (no header value, no options data, no operator
  default).  1 means unsampled.
"""

from __future__ import annotations

import enum
import ipaddress
import struct

import numpy as np


class ExportProtocol(enum.IntEnum):
    """Which export protocol a record came from (``export_proto`` column)."""

    NETFLOW_V1 = 1
    NETFLOW_V5 = 5
    NETFLOW_V9 = 9
    IPFIX = 10
    SFLOW_V5 = 20


class Direction(enum.IntEnum):
    """Flow direction relative to the observation point (IE 61)."""

    INGRESS = 0
    EGRESS = 1
    UNKNOWN = 255


class Field(enum.IntFlag):
    """Presence bits for the ``present`` column."""

    TIME_START = 1 << 0
    TIME_END = 1 << 1
    SRC_ADDR = 1 << 2
    DST_ADDR = 1 << 3
    SRC_PORT = 1 << 4
    DST_PORT = 1 << 5
    PROTOCOL = 1 << 6
    TCP_FLAGS = 1 << 7
    BYTES = 1 << 8
    PACKETS = 1 << 9
    IN_IF = 1 << 10
    OUT_IF = 1 << 11
    TOS = 1 << 12
    SRC_AS = 1 << 13
    DST_AS = 1 << 14
    NEXT_HOP = 1 << 15
    SRC_MASK = 1 << 16
    DST_MASK = 1 << 17
    DIRECTION = 1 << 18
    VLAN = 1 << 19
    SAMPLER_ID = 1 << 20


FLOW_DTYPE = np.dtype(
    [
        ("time_start", "<i8"),  # ms since epoch, UTC
        ("time_end", "<i8"),  # ms since epoch, UTC
        ("exporter", "V16"),  # exporter address, IPv4-mapped for IPv4
        ("exporter_port", "<u2"),  # exporter UDP source port
        ("export_proto", "u1"),  # ExportProtocol
        ("ip_version", "u1"),  # 4 or 6 (0: not an IP flow / unknown)
        ("domain", "<u4"),  # v9 source id, IPFIX obs. domain, v5 engine
        ("src_addr", "V16"),
        ("dst_addr", "V16"),
        ("next_hop", "V16"),
        ("src_port", "<u2"),
        ("dst_port", "<u2"),  # ICMP: type*256+code, as v5 exporters do
        ("protocol", "u1"),  # IANA protocol number
        ("tos", "u1"),
        ("src_mask", "u1"),
        ("dst_mask", "u1"),
        ("tcp_flags", "<u2"),  # IPFIX tcpControlBits is 16 bits wide
        ("direction", "u1"),  # Direction
        ("_pad", "u1"),
        ("vlan", "<u2"),
        ("bytes", "<u8"),  # as exported (sampled counts, not scaled)
        ("packets", "<u8"),
        ("in_if", "<u4"),
        ("out_if", "<u4"),
        ("src_as", "<u4"),
        ("dst_as", "<u4"),
        ("sampler_id", "<u4"),  # IE 48/302, sFlow source id; 0 if none
        ("sampling_rate", "<u4"),  # 1-in-N; 0 = unknown
        ("present", "<u4"),  # Field bitmask
    ]
)
"""The flow record schema; see the module docstring for conventions."""


def _record_struct() -> struct.Struct:
    """A little-endian struct laid out exactly like FLOW_DTYPE."""
    fields = FLOW_DTYPE.fields
    assert fields is not None
    codes = []
    for name in FLOW_DTYPE.names or ():
        dtype = fields[name][0]
        if dtype.kind == "V":
            codes.append(f"{dtype.itemsize}s")
        else:
            codes.append(
                {"i8": "q", "u8": "Q", "u4": "I", "u2": "H", "u1": "B"}[
                    f"{dtype.kind}{dtype.itemsize}"
                ]
            )
    packer = struct.Struct("<" + "".join(codes))
    if packer.size != FLOW_DTYPE.itemsize:
        raise RuntimeError("FLOW_DTYPE has padding: the record struct cannot pack it")
    return packer


#: Packs one record from its column values in FLOW_DTYPE order (a plain
#: ``bytes`` of ``FLOW_DTYPE.itemsize``): the way to build records one at a
#: time without numpy's per-field cost.
RECORD_STRUCT = _record_struct()

FLOW_COLUMNS: tuple[str, ...] = tuple(
    n for n in FLOW_DTYPE.names or () if not n.startswith("_")
)

#: The 12-byte prefix that turns an IPv4 address into an IPv4-mapped one.
V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def empty_records(count: int = 0) -> np.ndarray:
    """Return ``count`` zeroed records (direction unknown, nothing present)."""
    records = np.zeros(count, dtype=FLOW_DTYPE)
    records["direction"] = Direction.UNKNOWN
    return records


def concat_records(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate record arrays; an empty list gives an empty array."""
    if not parts:
        return empty_records(0)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts)


def ipv4_to_mapped(addresses: np.ndarray) -> np.ndarray:
    """Vectorised: turn a ``(n, 4)`` uint8 (or ``>u4``) array into ``V16``.

    Accepts either an array of big-endian ``uint32`` or an ``(n, 4)`` byte
    array, and returns ``n`` IPv4-mapped 16-byte values.
    """
    raw = np.ascontiguousarray(addresses)
    if raw.dtype != np.uint8:
        raw = raw.astype(">u4").view(np.uint8).reshape(-1, 4)
    out = np.zeros((raw.shape[0], 16), dtype=np.uint8)
    out[:, 10] = 0xFF
    out[:, 11] = 0xFF
    out[:, 12:16] = raw
    return out.view("V16").reshape(-1)


def address_bytes(text: str) -> bytes:
    """Parse an IPv4/IPv6 address into the 16-byte column form.

    IPv4 and IPv4-mapped IPv6 both give the mapped form, so an exporter
    seen over an IPv6 socket keys the same templates as over IPv4.
    """
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv4Address):
        return V4_MAPPED_PREFIX + addr.packed
    return addr.packed


def address_text(raw: bytes) -> str:
    """Format a 16-byte column value as the usual text form."""
    raw = bytes(raw)
    if raw[:12] == V4_MAPPED_PREFIX:
        return str(ipaddress.IPv4Address(raw[12:]))
    return str(ipaddress.IPv6Address(raw))
