"""Information elements shared by NetFlow v9 and IPFIX, and the vector builder.

NetFlow v9 field types 1-127 and IPFIX information elements (IANA registry)
share one numbering, so one table serves both.  A template is compiled
(:func:`compile_layout`) into a numpy structured dtype that covers only the
fields a schema column needs; :func:`build_records` turns a view of many
records of one template into :data:`~edge_agent.flows.schema.FLOW_DTYPE`
with vector arithmetic, never per record in Python.

NetFlow v1/v5 records are described with the same element numbers (a fixed
"template"), so every protocol but sFlow goes through one builder.
:class:`RecordBatch` collects the record regions of many datagrams, joins
those of one layout and builds them in cache-sized blocks.

Known shortcoming: a variable-length field is never mapped to a column,
even for an element the table knows (no exporter seen sends one that way).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import structlog

from edge_agent.flows.schema import (
    FLOW_DTYPE,
    RECORD_STRUCT,
    V4_MAPPED_PREFIX,
    Direction,
    ExportProtocol,
    Field,
)

log = structlog.get_logger(__name__)

#: IPFIX/v9 field length meaning "variable length" (RFC 7011 §7).
VARLEN = 65535
#: Seconds between the NTP epoch (1900) and the UNIX epoch (1970).
NTP_UNIX_OFFSET_S = 2_208_988_800

# Element ids (IANA "IPFIX Information Elements"; v9 uses the same numbers).
OCTET_DELTA = 1
PACKET_DELTA = 2
PROTOCOL = 4
TOS = 5
TCP_FLAGS = 6
SRC_PORT = 7
SRC_V4 = 8
SRC_MASK_V4 = 9
IN_IF = 10
DST_PORT = 11
DST_V4 = 12
DST_MASK_V4 = 13
OUT_IF = 14
NEXT_HOP_V4 = 15
SRC_AS = 16
DST_AS = 17
BGP_NEXT_HOP_V4 = 18
END_SYSUPTIME = 21
START_SYSUPTIME = 22
POST_OCTET_DELTA = 23
POST_PACKET_DELTA = 24
SRC_V6 = 27
DST_V6 = 28
SRC_MASK_V6 = 29
DST_MASK_V6 = 30
ICMP_TYPE_CODE_V4 = 32
SAMPLING_INTERVAL = 34
SAMPLING_ALGORITHM = 35
SAMPLER_ID = 48
SAMPLER_MODE = 49
SAMPLER_RANDOM_INTERVAL = 50
VLAN = 58
IP_VERSION = 60
DIRECTION = 61
NEXT_HOP_V6 = 62
BGP_NEXT_HOP_V6 = 63
OCTET_TOTAL = 85
PACKET_TOTAL = 86
ICMP_TYPE_CODE_V6 = 139
START_SECONDS = 150
END_SECONDS = 151
START_MILLISECONDS = 152
END_MILLISECONDS = 153
START_MICROSECONDS = 154
END_MICROSECONDS = 155
START_NANOSECONDS = 156
END_NANOSECONDS = 157
START_DELTA_MICROSECONDS = 158
END_DELTA_MICROSECONDS = 159
SYSTEM_INIT_MILLISECONDS = 160
DURATION_MILLISECONDS = 161
DURATION_MICROSECONDS = 162
ICMP_TYPE_V4 = 176
ICMP_CODE_V4 = 177
ICMP_TYPE_V6 = 178
ICMP_CODE_V6 = 179
INITIATOR_OCTETS = 231
DOT1Q_VLAN = 243
IN_PHYSICAL_IF = 252
OUT_PHYSICAL_IF = 253
INITIATOR_PACKETS = 298
SELECTOR_ID = 302
SELECTOR_ALGORITHM = 304
SAMPLING_PACKET_INTERVAL = 305
SAMPLING_PACKET_SPACE = 306
SAMPLING_SIZE = 309
SAMPLING_POPULATION = 310
OBSERVATION_TIME_MILLISECONDS = 323

#: Unsigned elements copied into one column, in order of preference: the
#: first element the template carries wins.  Bytes: octetDeltaCount, then
#: octetTotalCount (YAF), then postOctetDeltaCount (exporters that count
#: only egress, OUT_BYTES), then initiatorOctets (Cisco ASA NSEL).
UINT_COLUMNS: dict[str, tuple[tuple[int, ...], Field]] = {
    "bytes": (
        (OCTET_DELTA, OCTET_TOTAL, POST_OCTET_DELTA, INITIATOR_OCTETS),
        Field.BYTES,
    ),
    "packets": (
        (PACKET_DELTA, PACKET_TOTAL, POST_PACKET_DELTA, INITIATOR_PACKETS),
        Field.PACKETS,
    ),
    "protocol": ((PROTOCOL,), Field.PROTOCOL),
    "tos": ((TOS,), Field.TOS),
    "tcp_flags": ((TCP_FLAGS,), Field.TCP_FLAGS),
    "src_port": ((SRC_PORT,), Field.SRC_PORT),
    "in_if": ((IN_IF, IN_PHYSICAL_IF), Field.IN_IF),
    "out_if": ((OUT_IF, OUT_PHYSICAL_IF), Field.OUT_IF),
    "src_as": ((SRC_AS,), Field.SRC_AS),
    "dst_as": ((DST_AS,), Field.DST_AS),
    "vlan": ((VLAN, DOT1Q_VLAN), Field.VLAN),
    "sampler_id": ((SAMPLER_ID, SELECTOR_ID), Field.SAMPLER_ID),
}

IPV4_ELEMENTS = frozenset({SRC_V4, DST_V4, NEXT_HOP_V4, BGP_NEXT_HOP_V4})
IPV6_ELEMENTS = frozenset({SRC_V6, DST_V6, NEXT_HOP_V6, BGP_NEXT_HOP_V6})

#: Elements holding NTP timestamps (RFC 7011 dateTimeMicro/Nanoseconds).
NTP_ELEMENTS = frozenset(
    {START_MICROSECONDS, END_MICROSECONDS, START_NANOSECONDS, END_NANOSECONDS}
)

#: Elements a template is compiled for (everything else is skipped by length).
MAPPED_ELEMENTS: frozenset[int] = frozenset(
    {ie for ids, _ in UINT_COLUMNS.values() for ie in ids}
    | IPV4_ELEMENTS
    | IPV6_ELEMENTS
    | NTP_ELEMENTS
    | {
        SRC_MASK_V4,
        DST_MASK_V4,
        SRC_MASK_V6,
        DST_MASK_V6,
        DST_PORT,
        IP_VERSION,
        DIRECTION,
        ICMP_TYPE_CODE_V4,
        ICMP_TYPE_CODE_V6,
        ICMP_TYPE_V4,
        ICMP_CODE_V4,
        ICMP_TYPE_V6,
        ICMP_CODE_V6,
        START_SYSUPTIME,
        END_SYSUPTIME,
        START_SECONDS,
        END_SECONDS,
        START_MILLISECONDS,
        END_MILLISECONDS,
        START_DELTA_MICROSECONDS,
        END_DELTA_MICROSECONDS,
        SYSTEM_INIT_MILLISECONDS,
        DURATION_MILLISECONDS,
        DURATION_MICROSECONDS,
        OBSERVATION_TIME_MILLISECONDS,
        SAMPLING_INTERVAL,
        SAMPLING_ALGORITHM,
        SAMPLER_MODE,
        SAMPLER_RANDOM_INTERVAL,
        SELECTOR_ALGORITHM,
        SAMPLING_PACKET_INTERVAL,
        SAMPLING_PACKET_SPACE,
        SAMPLING_SIZE,
        SAMPLING_POPULATION,
    }
)

#: Elements that announce a sampling rate (options data, sometimes data).
RATE_ELEMENTS = frozenset(
    {
        SAMPLING_INTERVAL,
        SAMPLER_RANDOM_INTERVAL,
        SAMPLING_PACKET_INTERVAL,
        SAMPLING_SIZE,
        SAMPLING_POPULATION,
    }
)

#: Every element whose value options records announce to the decoder:
#: what :func:`record_rates` and :func:`sampler_ids` read (packet space
#: included: it changes the rate), and the system init time.
ANNOUNCING_ELEMENTS = RATE_ELEMENTS | {
    SAMPLING_PACKET_SPACE,
    SAMPLER_ID,
    SELECTOR_ID,
    SYSTEM_INIT_MILLISECONDS,
}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a template as sent on the wire.

    ``pen`` is the IPFIX enterprise number (0 for IANA elements).  NetFlow v9
    options scope fields have their own type space and are marked with
    ``scope=True`` so that scope type 1 ("System") is not read as element 1.
    """

    ie: int
    length: int
    pen: int = 0
    scope: bool = False


#: A mapped field: (name in the layout dtype, wire width in bytes).
FieldRef = tuple[str, int]


@dataclass(frozen=True, slots=True)
class BuildPlan:
    """What :func:`build_records` does for a layout, worked out once.

    ``uint`` lists the plain unsigned columns as (column, field); the masks
    (column, IPv4 field, IPv6 field) either may be None; ``present`` holds
    the presence bits every record of the layout has (time bits excepted:
    they depend on the values).
    """

    uint: tuple[tuple[str, FieldRef], ...]
    masks: tuple[tuple[str, FieldRef | None, FieldRef | None], ...]
    dst_port: FieldRef | None
    icmp: bool
    direction: FieldRef | None
    present: int


@dataclass(frozen=True, slots=True, eq=False)
class Layout:
    """How to read the mapped fields of one record.

    ``dtype`` is a structured dtype of ``itemsize`` bytes whose named fields
    sit at their wire offsets; ``fields`` maps an element id to the name and
    wire width of its first occurrence.  ``unusable`` counts mapped elements
    whose width makes no sense for their column (skipped).  Layouts compare
    and hash by identity: a batch groups records by the layout object.
    """

    dtype: np.dtype
    fields: dict[int, FieldRef]
    unusable: int
    plan: BuildPlan


def _uint_width_ok(ie: int, width: int) -> bool:
    if ie in IPV4_ELEMENTS:
        return width == 4
    if ie in IPV6_ELEMENTS:
        return width == 16
    return 1 <= width <= 8


def compile_layout(fields: Sequence[FieldSpec], record_length: int) -> Layout:
    """Compile the fixed-length fields of a template into a numpy layout.

    ``fields`` must be fixed length; their offsets are the running sum of
    lengths.  Variable-length templates are compiled over a projection that
    keeps only fixed fields (see :mod:`edge_agent.flows.templates`).
    """
    names: list[str] = []
    formats: list[object] = []
    offsets: list[int] = []
    mapped: dict[int, tuple[str, int]] = {}
    unusable = 0
    offset = 0
    for spec in fields:
        width = spec.length
        if (
            spec.pen == 0
            and not spec.scope
            and spec.ie in MAPPED_ELEMENTS
            and spec.ie not in mapped
        ):
            if _uint_width_ok(spec.ie, width):
                name = f"e{spec.ie}"
                mapped[spec.ie] = (name, width)
                names.append(name)
                offsets.append(offset)
                if spec.ie in IPV4_ELEMENTS:
                    # Addresses keep their wire byte order: read as a
                    # little-endian u4 (IPv4) or two u8 (IPv6), the bytes are
                    # in place for the 16-byte column.
                    formats.append("<u4")
                elif spec.ie in IPV6_ELEMENTS:
                    formats.append(("<u8", (2,)))
                elif width in (1, 2, 4, 8):
                    formats.append(f">u{width}")
                else:
                    # Odd widths (reduced-size 3/5/6/7-byte counters) are
                    # read as byte sub-arrays and combined arithmetically.
                    formats.append(("u1", (width,)))
            else:
                unusable += 1
        offset += width
    dtype = np.dtype(
        {
            "names": names,
            "formats": formats,
            "offsets": offsets,
            "itemsize": max(record_length, 1),
        }
    )
    return Layout(
        dtype=dtype, fields=mapped, unusable=unusable, plan=_compile_plan(mapped)
    )


def _compile_plan(fields: dict[int, FieldRef]) -> BuildPlan:
    present = 0
    uint: list[tuple[str, FieldRef]] = []
    for column, ids, bit in _UINT_PLAN:
        for ie in ids:
            ref = fields.get(ie)
            if ref is not None:
                uint.append((column, ref))
                present |= bit
                break
    for _column, v4_ie, v6_ie, bit in _ADDRESS_PLAN:
        if v4_ie in fields or v6_ie in fields:
            present |= bit
    if _NEXT_HOP_IDS.intersection(fields):
        present |= _NEXT_HOP
    masks: list[tuple[str, FieldRef | None, FieldRef | None]] = []
    for column, v4_ie, v6_ie, bit in _MASK_PLAN:
        m4 = fields.get(v4_ie)
        m6 = fields.get(v6_ie)
        if m4 is not None or m6 is not None:
            masks.append((column, m4, m6))
            present |= bit
    icmp = bool(_ICMP_IDS.intersection(fields))
    dst_port = fields.get(DST_PORT)
    if dst_port is not None or icmp:
        present |= _DST_PORT
    direction = fields.get(DIRECTION)
    if direction is not None:
        present |= _DIRECTION
    return BuildPlan(
        uint=tuple(uint),
        masks=tuple(masks),
        dst_port=dst_port,
        icmp=icmp,
        direction=direction,
        present=present,
    )


def _all(values: np.ndarray) -> bool:
    """Whether every value is non-zero (``ndarray.all`` costs a Python-level
    call; this is the C count)."""
    return int(np.count_nonzero(values)) == values.size


def uint_column(view: np.ndarray, name: str, width: int) -> np.ndarray:
    """Return a field as uint64, whatever its (reduced-size) width."""
    col = view[name]
    if col.ndim == 1:
        return col.astype(np.uint64)
    out = np.zeros(col.shape[0], dtype=np.uint64)
    for i in range(width):
        out <<= np.uint64(8)
        out |= col[:, i]
    return out


@dataclass(slots=True)
class RecordContext:
    """Per-record values that come from outside the record.

    Arrays have one entry per record (``np.repeat`` of per-datagram values)
    or are 0-d when every record shares the value; the scalars hold for the
    whole group (one template, one exporter).
    ``sysuptime_ms`` is -1 for IPFIX; ``init_ms`` is the exporter's
    systemInitTimeMilliseconds when an options record announced it, else -1.
    ``rate`` is the sampling rate looked up for the domain when the data was
    walked; ``sampler_lookup`` gives the rate of a record's sampler id
    (records that carry IE 48/302).  ``override`` (operator, per exporter)
    wins over everything when non-zero.
    """

    exporter: bytes
    exporter_port: int
    proto: ExportProtocol
    domain: int
    unix_secs: np.ndarray
    sysuptime_ms: np.ndarray
    export_ms: np.ndarray
    init_ms: np.ndarray
    rate: np.ndarray
    override: int
    sampler_lookup: Callable[[int], int] | None


#: Bytes 8-15 of an IPv4-mapped address read as a little-endian u64:
#: ``00 00 ff ff`` then the IPv4 address in the high half.
_V4_MAPPED_WORD = np.uint64(0xFFFF0000)


def _overlay_dtype() -> np.dtype:
    """FLOW_DTYPE plus overlapping fields that let the builder write less.

    ``<col>_ffff``/``<col>_v4`` are bytes 10-11 and 12-15 of an address
    column (an IPv4-mapped address is two writes into a zeroed record),
    ``<col>_w0``/``<col>_w1`` its two halves as little-endian u64 (the
    address words as :func:`_v4_words` makes them);
    ``head`` is exporter_port, export_proto, ip_version and domain as one
    little-endian u64.
    """
    fields = FLOW_DTYPE.fields
    assert fields is not None
    names: list[str] = []
    formats: list[object] = []
    offsets: list[int] = []
    for name, (dtype, offset, *_) in fields.items():
        names.append(name)
        formats.append(dtype)
        offsets.append(offset)
    for column in ("src_addr", "dst_addr", "next_hop"):
        base = fields[column][1]
        names += [f"{column}_ffff", f"{column}_v4", f"{column}_w0", f"{column}_w1"]
        formats += ["<u2", "<u4", "<u8", "<u8"]
        offsets += [base + 10, base + 12, base, base + 8]
    head = fields["exporter_port"][1]
    assert fields["export_proto"][1] == head + 2
    assert fields["ip_version"][1] == head + 3
    assert fields["domain"][1] == head + 4
    names.append("head")
    formats.append("<u8")
    offsets.append(head)
    return np.dtype(
        {
            "names": names,
            "formats": formats,
            "offsets": offsets,
            "itemsize": FLOW_DTYPE.itemsize,
        }
    )


_OVERLAY = _overlay_dtype()

#: One address column's source: (IPv4 as ``<u4`` wire bytes, IPv6 as (n, 2)
#: u64 words, per-record "use IPv6" mask when both exist); Nones if absent.
_AddrSource = tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]


def _v4_words(col: np.ndarray) -> np.ndarray:
    """IPv4 addresses (wire bytes read as ``<u4``) -> (n, 2) u64 mapped form."""
    out = np.zeros((col.shape[0], 2), dtype=np.uint64)
    out[:, 1] = (col.astype(np.uint64) << np.uint64(32)) | _V4_MAPPED_WORD
    return out


def _words_nonzero(words: np.ndarray) -> np.ndarray:
    return (words[:, 0] | words[:, 1]) != 0


def _address(
    view: np.ndarray,
    fields: dict[int, tuple[str, int]],
    v4_ie: int,
    v6_ie: int,
) -> _AddrSource:
    """Where one address column comes from.

    When a template carries both families the non-zero one wins (records
    use one family and leave the other all zero); when both are non-zero
    (an SRv6 record describing outer and inner headers) the family that
    comes first in the template wins, as for every other repeated element.
    """
    v4 = fields.get(v4_ie)
    v6 = fields.get(v6_ie)
    raw4 = view[v4[0]] if v4 is not None else None
    raw6 = view[v6[0]] if v6 is not None else None
    if raw4 is None or raw6 is None:
        return raw4, raw6, None
    assert v4 is not None and v6 is not None
    has4 = raw4 != 0
    has6 = _words_nonzero(raw6)
    fields_by_name = view.dtype.fields
    assert fields_by_name is not None
    use6 = np.logical_and(has6, ~has4)
    if fields_by_name[v6[0]][1] < fields_by_name[v4[0]][1]:
        use6 |= np.logical_and(has6, has4)
    return raw4, raw6, use6


def _as_words(source: _AddrSource) -> np.ndarray:
    v4, v6, use6 = source
    if v6 is None:
        assert v4 is not None
        return _v4_words(v4)
    if v4 is None:
        return np.ascontiguousarray(v6)
    assert use6 is not None
    return np.where(use6[:, None], v6, _v4_words(v4))


def _next_hop(view: np.ndarray, fields: dict[int, tuple[str, int]]) -> _AddrSource:
    """The IP next hop, else the BGP next hop where the IP one is zero."""
    hop = _address(view, fields, NEXT_HOP_V4, NEXT_HOP_V6)
    bgp = _address(view, fields, BGP_NEXT_HOP_V4, BGP_NEXT_HOP_V6)
    if hop[0] is None and hop[1] is None:
        return bgp
    if bgp[0] is None and bgp[1] is None:
        return hop
    if hop[1] is None and bgp[1] is None:
        assert hop[0] is not None and bgp[0] is not None
        return np.where(hop[0] != 0, hop[0], bgp[0]), None, None
    words_hop = _as_words(hop)
    words = np.where(_words_nonzero(words_hop)[:, None], words_hop, _as_words(bgp))
    return None, words, None


def _ntp_ms(value: np.ndarray) -> np.ndarray:
    secs = (value >> np.uint64(32)).astype(np.int64) - NTP_UNIX_OFFSET_S
    frac = value & np.uint64(0xFFFFFFFF)
    return secs * 1000 + ((frac * np.uint64(1000)) >> np.uint64(32)).astype(np.int64)


#: Reductions called as ufunc methods (np.min/np.max add a Python-level
#: wrapper that costs more than the reduction of a small block).
_MIN = np.minimum.reduce
_MAX = np.maximum.reduce

#: (ms since epoch, valid mask or None when every record is valid)
_Times = tuple[np.ndarray | None, np.ndarray | None]


def _uptime_abs(
    value: np.ndarray, ctx: RecordContext, base: list[np.ndarray]
) -> _Times:
    """Convert sysUptime milliseconds to absolute ms.

    ``base`` caches unix_secs*1000 - sysUptime for the block and the
    smallest header uptime (shared by the start and the end).
    """
    v = value if value.dtype == np.int64 else value.astype(np.int64)
    if ctx.proto == ExportProtocol.IPFIX:
        # IPFIX has no uptime in its header: the base is the exporter's
        # systemInitTimeMilliseconds, from the record or from options data.
        valid = ctx.init_ms >= 0
        return ctx.init_ms + v, None if _all(valid) else valid
    uptime = ctx.sysuptime_ms
    if not base:
        base.append(ctx.unix_secs * 1000 - uptime)
        base.append(_MIN(uptime, axis=None) if uptime.size else uptime)
    ms = base[0] + v
    # sysUptime is a u32 that wraps every 49.7 days: a value more than 2^31
    # above the header's uptime was taken before the wrap.  No record can be
    # when the largest value is within 2^31 of the smallest header uptime
    # (one reduction instead of a subtraction, a comparison and a count).
    if v.size and int(_MAX(v, axis=None)) - int(base[1]) > 1 << 31:
        wrapped = (v - uptime) > (1 << 31)
        ms[wrapped] -= 1 << 32
    return ms, None


def _time(
    view: np.ndarray,
    fields: dict[int, tuple[str, int]],
    ctx: RecordContext,
    ids: tuple[int, int, int, int, int, int],
    base: list[np.ndarray],
) -> _Times:
    """One end of the flow from the first time element the template has.

    ``ids`` = (milliseconds, seconds, microseconds, nanoseconds, sysUptime,
    delta-microseconds) element ids for that end.
    """
    ms_ie, s_ie, us_ie, ns_ie, up_ie, delta_ie = ids
    # An absolute time of 0 (nProbe sends it for "not measured") is 1970,
    # not a flow time: treated as absent.
    for ie, convert in (
        (ms_ie, _int64),
        (s_ie, _seconds_ms),
        (us_ie, _ntp_ms),
        (ns_ie, _ntp_ms),
    ):
        if ie in fields:
            raw = uint_column(view, *fields[ie])
            valid = raw != 0
            return convert(raw), None if _all(valid) else valid
    if up_ie in fields:
        name, width = fields[up_ie]
        col = view[name]
        # One cast straight to int64 for a plain field.
        raw = col.astype(np.int64) if col.ndim == 1 else uint_column(view, name, width)
        return _uptime_abs(raw, ctx, base)
    if delta_ie in fields:
        us = uint_column(view, *fields[delta_ie]).astype(np.int64)
        return ctx.export_ms - us // 1000, None
    return None, None


def _int64(value: np.ndarray) -> np.ndarray:
    return value.astype(np.int64)


def _seconds_ms(value: np.ndarray) -> np.ndarray:
    return value.astype(np.int64) * 1000


START_IDS = (
    START_MILLISECONDS,
    START_SECONDS,
    START_MICROSECONDS,
    START_NANOSECONDS,
    START_SYSUPTIME,
    START_DELTA_MICROSECONDS,
)
END_IDS = (
    END_MILLISECONDS,
    END_SECONDS,
    END_MICROSECONDS,
    END_NANOSECONDS,
    END_SYSUPTIME,
    END_DELTA_MICROSECONDS,
)


def record_rates(
    view: np.ndarray, fields: dict[int, tuple[str, int]]
) -> np.ndarray | None:
    """Sampling rate carried by each record (0 where none), or None.

    population/size if present, else (packetInterval + packetSpace) /
    packetInterval, else samplingInterval (34) or samplerRandomInterval (50).
    """
    if not RATE_ELEMENTS.intersection(fields):
        return None
    n = view.shape[0]
    rate = np.zeros(n, dtype=np.uint64)
    for ie in (SAMPLER_RANDOM_INTERVAL, SAMPLING_INTERVAL):
        if ie in fields:
            value = uint_column(view, *fields[ie])
            rate = np.where(value > 0, value, rate)
    if SAMPLING_PACKET_INTERVAL in fields:
        interval = uint_column(view, *fields[SAMPLING_PACKET_INTERVAL])
        space = (
            uint_column(view, *fields[SAMPLING_PACKET_SPACE])
            if SAMPLING_PACKET_SPACE in fields
            else np.zeros(n, dtype=np.uint64)
        )
        safe = np.maximum(interval, np.uint64(1))
        rate = np.where(interval > 0, (interval + space) // safe, rate)
    if SAMPLING_SIZE in fields and SAMPLING_POPULATION in fields:
        size = uint_column(view, *fields[SAMPLING_SIZE])
        population = uint_column(view, *fields[SAMPLING_POPULATION])
        safe = np.maximum(size, np.uint64(1))
        rate = np.where(size > 0, population // safe, rate)
    return np.minimum(rate, np.uint64(0xFFFFFFFF))


def sampler_ids(
    view: np.ndarray, fields: dict[int, tuple[str, int]]
) -> np.ndarray | None:
    """The sampler/selector id of each record (IE 48, else 302), or None."""
    for ie in (SAMPLER_ID, SELECTOR_ID):
        if ie in fields:
            return uint_column(view, *fields[ie])
    return None


#: Records built per pass: the block of output (146 B a record) and its
#: inputs stay in the L2 cache while ~30 columns are written one at a time;
#: over a whole large array each column pass would stream it from memory
#: (measured ~10x slower).
BLOCK_RECORDS = 8192

#: (column, element ids in order of preference, presence bit) as plain ints
_UINT_PLAN = tuple(
    (column, ids, int(bit)) for column, (ids, bit) in UINT_COLUMNS.items()
)
_ADDRESS_PLAN = (
    ("src_addr", SRC_V4, SRC_V6, int(Field.SRC_ADDR)),
    ("dst_addr", DST_V4, DST_V6, int(Field.DST_ADDR)),
)
_MASK_PLAN = (
    ("src_mask", SRC_MASK_V4, SRC_MASK_V6, int(Field.SRC_MASK)),
    ("dst_mask", DST_MASK_V4, DST_MASK_V6, int(Field.DST_MASK)),
)
_ICMP_IDS = frozenset(
    {
        ICMP_TYPE_CODE_V4,
        ICMP_TYPE_CODE_V6,
        ICMP_TYPE_V4,
        ICMP_TYPE_V6,
    }
)
_NEXT_HOP_IDS = frozenset({NEXT_HOP_V4, NEXT_HOP_V6, BGP_NEXT_HOP_V4, BGP_NEXT_HOP_V6})
_ZERO16 = bytes(16)
_V4_PREFIX16 = V4_MAPPED_PREFIX + bytes(4)
_UNKNOWN_DIRECTION = int(Direction.UNKNOWN)
_TIME_START = int(Field.TIME_START)
_TIME_END = int(Field.TIME_END)
_NEXT_HOP = int(Field.NEXT_HOP)
_DST_PORT = int(Field.DST_PORT)
_DIRECTION = int(Field.DIRECTION)
_SAMPLER_ID = int(Field.SAMPLER_ID)


def build_records(
    view: np.ndarray,
    layout: Layout,
    ctx: RecordContext,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Turn ``n`` records of one layout into ``n`` FLOW_DTYPE records.

    ``out`` (``n`` contiguous records, any content) is filled if given.
    Callers should pass at most :data:`BLOCK_RECORDS` records at a time.

    Everything the records share (exporter, port, protocol, domain, and
    whatever the layout makes constant: IPv4-mapped prefixes, unknown
    direction, presence bits, one sampling rate) is packed into one template
    record copied over the block; only the columns that vary are written
    one by one.
    """
    fields = layout.fields
    plan = layout.plan
    n = view.shape[0]
    if out is None:
        out = np.empty(n, dtype=FLOW_DTYPE)
    overlay = out.view(_OVERLAY)
    present = plan.present

    # Addresses: the family of the source address decides ip_version.
    family6: np.ndarray | None = None
    ip_version: int | np.ndarray = 0
    addresses: list[tuple[str, _AddrSource]] = []
    for column, v4_ie, v6_ie, _bit in _ADDRESS_PLAN:
        source = _address(view, fields, v4_ie, v6_ie)
        if source[0] is None and source[1] is None:
            continue
        addresses.append((column, source))
        if family6 is None and isinstance(ip_version, int) and not ip_version:
            if source[1] is None:
                ip_version = 4
            elif source[0] is None:
                ip_version = 6
                family6 = np.ones(n, dtype=bool)
            else:
                assert source[2] is not None
                family6 = source[2]
                ip_version = np.where(family6, 6, 4).astype(np.uint64)
    if IP_VERSION in fields:
        ip_version = uint_column(view, *fields[IP_VERSION])
    hop = _next_hop(view, fields)
    if hop[0] is not None or hop[1] is not None:
        addresses.append(("next_hop", hop))

    times = _times(view, fields, ctx)
    time_bits: int | np.ndarray = 0
    for _column, _values, valid, bit in times:
        if valid is None:
            time_bits = time_bits | bit
        else:
            time_bits = time_bits | np.where(valid, np.uint32(bit), np.uint32(0))
    rate = _rates(view, fields, ctx, present)
    one_rate = isinstance(rate, int) or rate.ndim == 0

    # The template: what every record of the block has (RECORD_STRUCT
    # takes the columns in FLOW_DTYPE order; values wrap to their width as
    # numpy's casts do).
    prefix = {column: _V4_PREFIX16 for column, source in addresses if source[1] is None}
    out.view(_RECORD_VOID)[...] = RECORD_STRUCT.pack(
        0,  # time_start
        0,  # time_end
        ctx.exporter,
        ctx.exporter_port,
        int(ctx.proto),
        ip_version if isinstance(ip_version, int) else 0,
        ctx.domain,
        prefix.get("src_addr", _ZERO16),
        prefix.get("dst_addr", _ZERO16),
        prefix.get("next_hop", _ZERO16),
        0,  # src_port
        0,  # dst_port
        0,  # protocol
        0,  # tos
        0,  # src_mask
        0,  # dst_mask
        0,  # tcp_flags
        0 if plan.direction is not None else _UNKNOWN_DIRECTION,
        0,  # _pad
        0,  # vlan
        0,  # bytes
        0,  # packets
        0,  # in_if
        0,  # out_if
        0,  # src_as
        0,  # dst_as
        0,  # sampler_id
        int(rate) & 0xFFFFFFFF if one_rate else 0,
        present | time_bits if isinstance(time_bits, int) else 0,
    )

    if not isinstance(ip_version, int):
        head = ctx.exporter_port | int(ctx.proto) << 16 | ctx.domain << 32
        overlay["head"] = np.uint64(head) | (ip_version & np.uint64(0xFF)) << np.uint64(
            24
        )
    if not isinstance(time_bits, int):
        out["present"] = time_bits | np.uint32(present)
    if not one_rate:
        out["sampling_rate"] = rate

    for column, ref in plan.uint:
        col = view[ref[0]]
        # A plain big-endian field is cast on the copy; reduced-size odd
        # widths are assembled first.
        out[column] = col if col.ndim == 1 else uint_column(view, *ref)

    for column, source in addresses:
        v4, v6, _ = source
        if v6 is None:
            # IPv4 only: the prefix is in the template.
            overlay[f"{column}_v4"] = v4
        else:
            words = _as_words(source)
            overlay[f"{column}_w0"] = words[:, 0]
            overlay[f"{column}_w1"] = words[:, 1]

    # Masks: the one of the record's family when a template has both.
    for column, m4, m6 in plan.masks:
        if m4 is not None and m6 is not None and family6 is not None:
            out[column] = np.where(
                family6, uint_column(view, *m6), uint_column(view, *m4)
            )
        else:
            mask = m4 if m4 is not None else m6
            assert mask is not None
            col = view[mask[0]]
            out[column] = col if col.ndim == 1 else uint_column(view, *mask)

    # Destination port; ICMP type/code goes there when the port is absent
    # or zero for an ICMP flow (type*256+code, as v5 exporters do).
    if plan.dst_port is not None:
        col = view[plan.dst_port[0]]
        out["dst_port"] = col if col.ndim == 1 else uint_column(view, *plan.dst_port)
    if plan.icmp:
        icmp = _icmp(view, fields, out)
        assert icmp is not None
        if plan.dst_port is not None:
            proto = out["protocol"]
            use = ((proto == 1) | (proto == 58)) & (out["dst_port"] == 0)
            out["dst_port"] = np.where(use, icmp, out["dst_port"])
        else:
            # An ICMP-only template (softflowd) may not even carry the
            # protocol: its type/code element says the flows are ICMP.
            out["dst_port"] = icmp

    if plan.direction is not None:
        col = view[plan.direction[0]]
        out["direction"] = col if col.ndim == 1 else uint_column(view, *plan.direction)

    for column, values, valid, _bit in times:
        out[column] = values if valid is None else np.where(valid, values, 0)
    return out


def _icmp(
    view: np.ndarray, fields: dict[int, tuple[str, int]], out: np.ndarray
) -> np.ndarray | None:
    code4 = fields.get(ICMP_TYPE_CODE_V4)
    code6 = fields.get(ICMP_TYPE_CODE_V6)
    value: np.ndarray | None = None
    if code4 is not None:
        value = uint_column(view, *code4)
    elif ICMP_TYPE_V4 in fields:
        value = uint_column(view, *fields[ICMP_TYPE_V4]) << np.uint64(8)
        if ICMP_CODE_V4 in fields:
            value |= uint_column(view, *fields[ICMP_CODE_V4])
    v6: np.ndarray | None = None
    if code6 is not None:
        v6 = uint_column(view, *code6)
    elif ICMP_TYPE_V6 in fields:
        v6 = uint_column(view, *fields[ICMP_TYPE_V6]) << np.uint64(8)
        if ICMP_CODE_V6 in fields:
            v6 |= uint_column(view, *fields[ICMP_CODE_V6])
    if v6 is not None:
        value = v6 if value is None else np.where(out["protocol"] == 58, v6, value)
    return value


#: (column, ms since epoch, valid mask or None for all, presence bit)
_TimeColumn = tuple[str, np.ndarray, np.ndarray | None, int]


def _times(
    view: np.ndarray,
    fields: dict[int, tuple[str, int]],
    ctx: RecordContext,
) -> list[_TimeColumn]:
    """The time_start/time_end values the layout gives, with their validity."""
    if SYSTEM_INIT_MILLISECONDS in fields:
        init = uint_column(view, *fields[SYSTEM_INIT_MILLISECONDS]).astype(np.int64)
        ctx.init_ms = np.where(init > 0, init, ctx.init_ms)
    base: list[np.ndarray] = []
    start, start_ok = _time(view, fields, ctx, START_IDS, base)
    end, end_ok = _time(view, fields, ctx, END_IDS, base)
    duration: np.ndarray | None = None
    if DURATION_MILLISECONDS in fields:
        duration = uint_column(view, *fields[DURATION_MILLISECONDS]).astype(np.int64)
    elif DURATION_MICROSECONDS in fields:
        duration = (
            uint_column(view, *fields[DURATION_MICROSECONDS]).astype(np.int64) // 1000
        )
    if duration is not None:
        if start is None and end is not None:
            start, start_ok = end - duration, end_ok
        elif end is None and start is not None:
            end, end_ok = start + duration, start_ok
    if start is None and end is None and OBSERVATION_TIME_MILLISECONDS in fields:
        # Event exporters (NAT, firewall) stamp the event, not a flow.
        obs = uint_column(view, *fields[OBSERVATION_TIME_MILLISECONDS])
        start, start_ok = obs.astype(np.int64), None if _all(obs) else obs != 0
        end, end_ok = start, start_ok
    out: list[_TimeColumn] = []
    if start is not None:
        out.append(("time_start", start, start_ok, _TIME_START))
    if end is not None:
        out.append(("time_end", end, end_ok, _TIME_END))
    return out


def _rates(
    view: np.ndarray,
    fields: dict[int, tuple[str, int]],
    ctx: RecordContext,
    present: int,
) -> np.ndarray | int:
    """The sampling rate of each record (0 = unknown); an int or a 0-d
    array when one rate holds for every record."""
    if ctx.override:
        return ctx.override
    rate: np.ndarray = ctx.rate
    if ctx.sampler_lookup is not None and present & _SAMPLER_ID:
        # The ids as the sampler_id column holds them (32 bits).
        ids = sampler_ids(view, fields)
        assert ids is not None
        sids = ids.astype(np.uint32)
        uniq = np.unique(sids)
        lookup = ctx.sampler_lookup
        if len(uniq) == 1:
            rate = np.full(view.shape[0], lookup(int(uniq[0])), np.uint32)
        else:
            table = np.array([lookup(int(s)) for s in uniq], dtype=np.uint32)
            rate = table[np.searchsorted(uniq, sids)]
    carried = record_rates(view, fields)
    if carried is not None:
        rate = np.where(carried > 0, carried, rate)
    return rate


class _Group:
    """Data of one layout from one exporter and domain, in arrival order."""

    __slots__ = (
        "context",
        "counts",
        "domain",
        "exporter",
        "layout",
        "ordered",
        "port",
        "proto",
        "regions",
        "starts",
    )

    def __init__(
        self,
        layout: Layout,
        exporter: bytes,
        port: int,
        domain: int,
        proto: ExportProtocol,
    ) -> None:
        self.layout = layout
        self.exporter = exporter
        self.port = port
        self.domain = domain
        self.proto = proto
        self.regions: list[bytes | memoryview] = []
        self.counts: list[int] = []
        self.starts: list[int] = []
        self.context: list[tuple[int, int, int, int, int]] = []
        #: False once a run was added at a position before the last one
        self.ordered = True

    def prepare(self) -> PreparedGroup:
        """Join the regions and turn the contexts into per-record columns."""
        regions = self.regions
        data = regions[0] if len(regions) == 1 else b"".join(regions)
        view = np.frombuffer(data, dtype=self.layout.dtype)
        contexts = self.context
        n = len(contexts)
        columns: list[np.ndarray]
        if n == 1 or (n <= 8 and len(set(contexts)) == 1):
            # One header context (one datagram): 0-d arrays broadcast, which
            # saves five full-length arrays on the small per-datagram path.
            columns = [np.array(value, dtype=np.int64) for value in contexts[0]]
        else:
            counts = np.array(self.counts, dtype=np.int64)
            # A flat iterator: numpy reads a list of tuples ~3x slower.
            table = np.fromiter(chain.from_iterable(contexts), np.int64, 5 * n)
            table = table.reshape(n, 5)
            columns = [np.repeat(table[:, i], counts) for i in range(5)]
        return PreparedGroup(
            layout=self.layout,
            exporter=self.exporter,
            port=self.port,
            domain=self.domain,
            proto=self.proto,
            view=view,
            columns=columns,
            counts=self.counts,
            starts=self.starts,
            ordered=self.ordered,
        )


@dataclass(slots=True, eq=False)
class PreparedGroup:
    """Records of one layout, exporter, port and domain, ready to build.

    ``view`` holds the records in arrival order (one ``layout.dtype``
    element each); ``columns`` are the five :class:`RecordContext` values
    (unix secs, sysUptime ms, export ms, init ms, rate), each per record or
    0-d for all.  The records come in runs (one per data set or datagram):
    run ``i`` has ``counts[i]`` records, the first at batch position
    ``starts[i]``.
    """

    layout: Layout
    exporter: bytes
    port: int
    domain: int
    proto: ExportProtocol
    view: np.ndarray
    columns: list[np.ndarray]
    counts: Sequence[int] | np.ndarray
    starts: Sequence[int] | np.ndarray
    #: False when the runs may be out of output order (a joined group)
    ordered: bool = True

    @property
    def records(self) -> int:
        return int(self.view.shape[0])


#: Run lengths or positions: a list while queued, an array once prepared.
_Ints = Sequence[int] | np.ndarray
#: (layout, exporter address, exporter port, domain)
GroupKey = tuple[Layout, bytes, int, int]
#: Looks up the rate of (exporter, domain, sampler id) at build time.
SamplerLookup = Callable[[bytes, int, int], int]
#: Returns the operator override for an exporter (0 if none).
OverrideLookup = Callable[[bytes], int]


class RecordBatch:
    """Collects data records of many datagrams and builds them in one pass.

    Walkers :meth:`add` record regions (raw bytes of ``count`` records of
    one layout) with the per-datagram context; :meth:`build` joins the
    regions of each (layout, exporter, port, domain) group, reads them with
    one ``np.frombuffer`` and scatters the results back into arrival
    order, so the output equals decoding each datagram on its own.
    Records whose rate depends on a sampler id are looked up at build time;
    the decoder calls :meth:`settle` before a sampling announcement changes
    the table so that such records see the rates of their own time.

    A walker that queues datagrams of its own (NetFlow v5 runs) reserves
    their positions by adding to :attr:`total`, registers a flusher with
    :meth:`on_settle` and hands over :class:`PreparedGroup` values with
    :meth:`add_prepared` when the batch settles.
    """

    def __init__(self) -> None:
        self.groups: dict[GroupKey, _Group] = {}
        self.prepared: list[PreparedGroup] = []
        self.ready: list[tuple[int, np.ndarray]] = []
        self.packed: list[tuple[int, list[bytes]]] = []
        self.done: list[np.ndarray] = []
        self.total = 0
        self.deferred = False
        #: (exporter, port, records) of groups whose build failed (a bug)
        self.failures: list[tuple[bytes, int, int]] = []
        self._flushers: list[Callable[[], None]] = []
        self._holes: list[tuple[_Ints, _Ints]] = []

    def add(
        self,
        key: GroupKey,
        proto: ExportProtocol,
        region: bytes | memoryview,
        count: int,
        context: tuple[int, int, int, int, int],
    ) -> None:
        """Queue ``count`` records of ``key`` = (layout, exporter, port, domain).

        ``context`` = (unix secs, sysUptime ms, export ms, init ms, rate).
        """
        group = self.groups.get(key)
        if group is None:
            layout = key[0]
            group = _Group(layout, key[1], key[2], key[3], proto)
            self.groups[key] = group
            if SAMPLER_ID in layout.fields or SELECTOR_ID in layout.fields:
                self.deferred = True
        group.regions.append(region)
        group.counts.append(count)
        group.starts.append(self.total)
        group.context.append(context)
        self.total += count

    def add_at(
        self,
        key: GroupKey,
        proto: ExportProtocol,
        region: bytes | memoryview,
        count: int,
        context: tuple[int, int, int, int, int],
        *,
        start: int,
    ) -> None:
        """Like :meth:`add`, at positions reserved earlier (``total`` stays)."""
        group = self.groups.get(key)
        if group is None:
            layout = key[0]
            group = _Group(layout, key[1], key[2], key[3], proto)
            self.groups[key] = group
            if SAMPLER_ID in layout.fields or SELECTOR_ID in layout.fields:
                self.deferred = True
        elif group.starts and start < group.starts[-1]:
            group.ordered = False
        group.regions.append(region)
        group.counts.append(count)
        group.starts.append(start)
        group.context.append(context)

    def lost(self, exporter: bytes, port: int, counts: _Ints, starts: _Ints) -> None:
        """Give up reserved positions (a bug while reading them): counted in
        :attr:`failures`, left out of the output."""
        self._failed(exporter, port, int(np.sum(counts)))
        self._holes.append((counts, starts))

    def add_records(self, records: np.ndarray) -> None:
        """Queue records already decoded (sFlow) at the current position."""
        if len(records):
            self.ready.append((self.total, records))
            self.total += len(records)

    def add_packed(self, records: list[bytes]) -> None:
        """Queue records packed one by one (sFlow, RECORD_STRUCT) at the
        current position; they are joined once per batch."""
        self.packed.append((self.total, records))
        self.total += len(records)

    def add_prepared(self, group: PreparedGroup) -> None:
        """Queue records whose positions were reserved (see the class doc)."""
        if group.records:
            self.prepared.append(group)

    def on_settle(self, flush: Callable[[], None]) -> None:
        """Call ``flush`` each time before the queued records are built."""
        self._flushers.append(flush)

    def settle(self, sampler: SamplerLookup, override: OverrideLookup) -> None:
        """Build everything queued so far (keeps arrival order)."""
        for flush in self._flushers:
            flush()
        if self.total:
            self.done.append(self._build(sampler, override))
        self.groups = {}
        self.prepared = []
        self.ready = []
        self.packed = []
        self._holes = []
        self.total = 0
        self.deferred = False

    def build(self, sampler: SamplerLookup, override: OverrideLookup) -> np.ndarray:
        """Return every queued record as one FLOW_DTYPE array."""
        self.settle(sampler, override)
        done = self.done
        self.done = []
        if not done:
            return np.zeros(0, dtype=FLOW_DTYPE)
        if len(done) == 1:
            return done[0]
        return np.concatenate([d.view(_RECORD_VOID) for d in done]).view(FLOW_DTYPE)

    def _prepared(self, failed: list[tuple[_Ints, _Ints]]) -> list[PreparedGroup]:
        """Every queued group in its prepared form.

        A group that cannot be prepared is counted as a failure and its
        (counts, starts) appended to ``failed``.
        """
        out = list(self.prepared)
        for group in self.groups.values():
            try:
                out.append(group.prepare())
            except Exception:
                self._failed(group.exporter, group.port, sum(group.counts))
                failed.append((group.counts, group.starts))
        if len(out) < 2:
            return out
        # Small groups of one layout, exporter and domain (v9/IPFIX plans
        # and a walker's group) are built as one: building costs a few
        # dozen numpy calls per group whatever its size.  Large ones are
        # built apart (joining them would cost more than it saves).
        same: dict[tuple[Layout, bytes, int, int, int], list[PreparedGroup]] = {}
        merged: list[PreparedGroup] = []
        for part in out:
            if part.records >= _MERGE_BELOW:
                merged.append(part)
                continue
            key = (part.layout, part.exporter, part.port, part.domain, part.proto)
            same.setdefault(key, []).append(part)
        if len(same) + len(merged) == len(out):
            return out
        for parts in same.values():
            if len(parts) == 1:
                merged.append(parts[0])
                continue
            try:
                merged.append(_merge(parts))
            except Exception:
                for part in parts:
                    self._failed(part.exporter, part.port, part.records)
                    failed.append((part.counts, part.starts))
        return merged

    def _build(self, sampler: SamplerLookup, override: OverrideLookup) -> np.ndarray:
        failed = list(self._holes)
        groups = self._prepared(failed)
        packed = self.packed
        if not groups and not self.ready and not failed and len(packed) >= 1:
            # Packed records only (an sFlow batch): one join, no scatter.
            data = bytearray().join(chain.from_iterable(p for _, p in packed))
            if len(data) == self.total * FLOW_DTYPE.itemsize:
                return np.frombuffer(data, dtype=FLOW_DTYPE)
        if (
            len(groups) == 1
            and not self.ready
            and not packed
            and not failed
            and groups[0].records == self.total
            and (groups[0].ordered or isinstance(_positions(groups[0]), slice))
        ):
            group = groups[0]
            try:
                return _build_group(group, sampler, override, None)
            except Exception:
                self._failed(group.exporter, group.port, group.records)
                return np.zeros(0, dtype=FLOW_DTYPE)
        # Several groups: each is built block by block in a warm scratch
        # buffer and copied to its positions in the one output array (a
        # fresh array per group would double the page faults).
        out = np.empty(self.total, dtype=FLOW_DTYPE)
        # Whole-record copies through a void view: numpy copies structured
        # records field by field (~40x slower).
        whole = out.view(_RECORD_VOID)
        for group in groups:
            try:
                _build_group(group, sampler, override, whole)
            except Exception:
                self._failed(group.exporter, group.port, group.records)
                failed.append((group.counts, group.starts))
        for start, records in self.ready:
            whole[start : start + len(records)] = records.view(_RECORD_VOID)
        if packed:
            data = bytearray().join(chain.from_iterable(p for _, p in packed))
            whole[
                _run_positions([len(p) for _, p in packed], [s for s, _ in packed])
            ] = np.frombuffer(data, dtype=_RECORD_VOID)
        if failed:
            keep = np.ones(self.total, dtype=bool)
            for counts, starts in failed:
                keep[_run_positions(counts, starts)] = False
            return out[keep]
        return out

    def _failed(self, exporter: bytes, port: int, records: int) -> None:
        # A bug, not bad input (walkers reject that): the group's records
        # are dropped and counted, the rest is returned.
        _log_build_failure(port)
        self.failures.append((exporter, port, records))


_RECORD_VOID = np.dtype(f"V{FLOW_DTYPE.itemsize}")
#: Prepared groups with fewer records than this are joined with the others
#: of their key before building (a guess at where a group's fixed building
#: cost stops mattering).
_MERGE_BELOW = 1024


def _merge(parts: list[PreparedGroup]) -> PreparedGroup:
    """One group holding the records and runs of several of one key."""
    first = parts[0]
    columns: list[np.ndarray] = []
    for i in range(len(first.columns)):
        values = [part.columns[i] for part in parts]
        if all(v.ndim == 0 for v in values) and len({int(v) for v in values}) == 1:
            columns.append(values[0])
            continue
        columns.append(
            np.concatenate(
                [
                    np.full(part.records, v, dtype=np.int64) if v.ndim == 0 else v
                    for v, part in zip(values, parts, strict=True)
                ]
            )
        )
    dtype = first.layout.dtype
    # Whole records through a void view: numpy copies structured records
    # field by field.
    whole = np.dtype(f"V{dtype.itemsize}")
    return PreparedGroup(
        layout=first.layout,
        exporter=first.exporter,
        port=first.port,
        domain=first.domain,
        proto=first.proto,
        view=np.concatenate([part.view.view(whole) for part in parts]).view(dtype),
        columns=columns,
        counts=np.concatenate([np.asarray(p.counts, dtype=np.int64) for p in parts]),
        starts=np.concatenate([np.asarray(p.starts, dtype=np.int64) for p in parts]),
        ordered=False,
    )


_scratch = threading.local()


def _scratch_block() -> np.ndarray:
    """A per-thread block of BLOCK_RECORDS records, reused (stays warm)."""
    block: np.ndarray | None = getattr(_scratch, "block", None)
    if block is None:
        block = np.empty(BLOCK_RECORDS, dtype=FLOW_DTYPE)
        _scratch.block = block
    return block


_build_failures = 0


def _log_build_failure(port: int) -> None:
    """Log a failed group build, at most once per 1000 (hot path)."""
    global _build_failures  # noqa: PLW0603 - a process-wide log sampler
    _build_failures += 1
    if _build_failures % 1000 == 1:
        log.exception(
            "record_build_failed", exporter_port=port, failures=_build_failures
        )


def _positions(group: PreparedGroup) -> np.ndarray | slice:
    """Output positions of a group's records (its runs, in order)."""
    return _run_positions(group.counts, group.starts)


def _run_positions(
    counts: Sequence[int] | np.ndarray, starts: Sequence[int] | np.ndarray
) -> np.ndarray | slice:
    """Positions of runs of ``counts[i]`` records starting at ``starts[i]``."""
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    shift = starts - (np.cumsum(counts) - counts)
    total = int(counts.sum())
    if len(shift) == 1 or _all(shift == shift[0]):
        # The runs follow one another: one slice.
        return slice(int(shift[0]), int(shift[0]) + total)
    return np.repeat(shift, counts) + np.arange(total)


def _build_group(
    group: PreparedGroup,
    sampler: SamplerLookup,
    override: OverrideLookup,
    into: np.ndarray | None,
) -> np.ndarray:
    """Build one group's records: into a new array (returned), or, with
    ``into`` (the batch output as a void view), at the group's positions."""
    layout = group.layout
    view = group.view
    columns = group.columns
    exporter = group.exporter
    domain = group.domain
    rate_override = override(exporter)

    def lookup(sid: int) -> int:
        return sampler(exporter, domain, sid)

    n = view.shape[0]
    positions: np.ndarray | slice | None = None
    if into is None:
        out = np.empty(n, dtype=FLOW_DTYPE)
    else:
        out = _scratch_block()
        positions = _positions(group)
    for start in range(0, n, BLOCK_RECORDS):
        block = slice(start, start + BLOCK_RECORDS)
        ctx = RecordContext(
            exporter=exporter,
            exporter_port=group.port,
            proto=group.proto,
            domain=domain,
            unix_secs=_block(columns[0], block),
            sysuptime_ms=_block(columns[1], block),
            export_ms=_block(columns[2], block),
            init_ms=_block(columns[3], block),
            rate=_block(columns[4], block),
            override=rate_override,
            sampler_lookup=lookup,
        )
        if into is None:
            build_records(view[block], layout, ctx, out[block])
            continue
        size = min(BLOCK_RECORDS, n - start)
        build_records(view[block], layout, ctx, out[:size])
        built = out[:size].view(_RECORD_VOID)
        if isinstance(positions, slice):
            first = positions.start + start
            into[first : first + size] = built
        else:
            assert positions is not None
            np.put(into, positions[block], built)
    return out


def _block(column: np.ndarray, block: slice) -> np.ndarray:
    return column if column.ndim == 0 else column[block]
