"""Parse the first bytes of a sampled packet down to its flow keys.

sFlow raw packet header records (format 1) and IPFIX ``dataLinkFrameSection``
(IE 315) carry the leading bytes of a sampled frame instead of flow keys.
:func:`parse_packet` walks those bytes through

* Ethernet II, any number (up to :data:`MAX_VLAN_TAGS`) of 802.1Q / 802.1ad
  (QinQ) tags, PPPoE session framing;
* an MPLS label stack (up to :data:`MAX_MPLS_LABELS` labels), after which the
  payload is IPv4 or IPv6 (first nibble 4 or 6) or an Ethernet pseudowire
  preceded by its control word (first nibble 0, RFC 4385);
* IPv4 (options skipped by IHL) or IPv6 (hop-by-hop, routing, fragment,
  destination options, AH, mobility and HIP/shim6 extension headers skipped,
  at most :data:`MAX_IPV6_EXTENSIONS`);
* TCP, UDP, SCTP and UDP-Lite ports, TCP flags, ICMP / ICMPv6 type and code.

It returns the outer flow keys: tunnels (GRE, VXLAN, IP-in-IP, ...) are not
decapsulated, so a sampled VXLAN packet gives the outer UDP 4789 flow, which
is what crossed the sampled interface.

The parser never raises on short or malformed input: it returns what it
could read, and :attr:`PacketFields.present` (a :class:`~edge_agent.flows.
schema.Field` bitmask) says which fields are real.  A header cut short inside
the IP header gives no addresses; one cut inside the transport header gives
addresses and protocol but no ports.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from edge_agent.flows.schema import V4_MAPPED_PREFIX, Field

#: sFlow ``header_protocol`` values understood here (sFlow v5, section 5.4).
HEADER_ETHERNET = 1
HEADER_IPV4 = 11
HEADER_IPV6 = 12
HEADER_MPLS = 13

#: Bounds on the loops over untrusted bytes.
MAX_VLAN_TAGS = 4
MAX_MPLS_LABELS = 16
MAX_IPV6_EXTENSIONS = 8
#: An outer frame plus the frame inside one Ethernet-over-MPLS pseudowire.
MAX_ETHERNET_LAYERS = 2

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_PPPOE_SESSION = 0x8864
#: 802.1Q, 802.1ad, and the pre-standard QinQ types some switches still use.
VLAN_ETHERTYPES = frozenset({0x8100, 0x88A8, 0x9100, 0x9200, 0x9300})
MPLS_ETHERTYPES = frozenset({0x8847, 0x8848})

#: Transport protocols whose first four bytes are source and destination port.
PORT_PROTOCOLS = frozenset({6, 17, 132, 136})
PROTO_TCP = 6
PROTO_ICMP = 1
PROTO_ICMPV6 = 58
#: IPv6 extension headers with the (next header, length in 8-octet units
#: not counting the first) layout.
_IPV6_EXT_8 = frozenset({0, 43, 60, 135, 139, 140})
_IPV6_FRAGMENT = 44
_IPV6_AH = 51

_U16 = struct.Struct("!H").unpack_from
_U16X2 = struct.Struct("!HH").unpack_from
# version/IHL, TOS, flags/fragment offset, protocol, source, destination
_IPV4 = struct.Struct("!BB4xHxB2x4s4s").unpack_from
# version/class/flow label, next header, source, destination
_IPV6 = struct.Struct("!I2xBx16s16s").unpack_from
# ports, then data offset/reserved/flags
_TCP = struct.Struct("!HH8xH").unpack_from

_IP_PRESENT = int(Field.SRC_ADDR | Field.DST_ADDR | Field.PROTOCOL | Field.TOS)
_IP_NO_PROTOCOL = _IP_PRESENT & ~int(Field.PROTOCOL)
_PORTS_PRESENT = int(Field.SRC_PORT | Field.DST_PORT)
_TCP_PRESENT = _PORTS_PRESENT | int(Field.TCP_FLAGS)
_V4 = V4_MAPPED_PREFIX
_VLAN = int(Field.VLAN)
_DST_PORT = int(Field.DST_PORT)
_IPV6_EXTENSIONS = _IPV6_EXT_8 | {_IPV6_FRAGMENT, _IPV6_AH}
_UDP_LIKE = PORT_PROTOCOLS - {PROTO_TCP}
_IP_ETHERTYPES = frozenset({ETHERTYPE_IPV4, ETHERTYPE_IPV6})

#: The plain-tuple form of "nothing found" (see :func:`parse_packet_tuple`).
NOTHING: tuple[int, bytes, bytes, int, int, int, int, int, int, int] = (
    0,
    b"",
    b"",
    0,
    0,
    0,
    0,
    0,
    0,
    0,
)

#: The plain tuple :func:`parse_packet_tuple` returns, in PacketFields order.
FieldsTuple = tuple[int, bytes, bytes, int, int, int, int, int, int, int]


class PacketFields(NamedTuple):
    """Flow keys read from a packet's leading bytes.

    Fields whose bit is clear in :attr:`present` hold 0 (``b""`` for
    addresses) and mean "not found", not zero.
    """

    ip_version: int  # 4 or 6; 0 when no IP header was read
    src_addr: bytes  # 16 bytes, IPv4-mapped for IPv4; b"" when absent
    dst_addr: bytes
    protocol: int  # IANA protocol (IPv6: the upper-layer header)
    src_port: int
    dst_port: int  # ICMP / ICMPv6: type * 256 + code
    tcp_flags: int  # the 12 flag bits of the TCP header (NS ... FIN)
    tos: int  # IPv4 TOS byte / IPv6 traffic class (DSCP and ECN)
    vlan: int  # outermost 802.1Q VLAN id; 0 when untagged
    present: int  # Field bits of the above that were found


#: What a packet with nothing readable gives.
NO_FIELDS = PacketFields(*NOTHING)


def parse_packet(
    buf: bytes,
    offset: int = 0,
    end: int | None = None,
    header_protocol: int = HEADER_ETHERNET,
) -> PacketFields:
    """Parse ``buf[offset:end]``, a packet starting at layer ``header_protocol``.

    ``header_protocol`` uses the sFlow numbering: 1 Ethernet, 11 IPv4,
    12 IPv6, 13 MPLS; any other value gives :data:`NO_FIELDS`.  ``end``
    defaults to ``len(buf)``.  Never raises for any bytes.
    """
    size = len(buf)
    if end is None or end > size:
        end = size
    return PacketFields._make(parse_packet_tuple(buf, offset, end, header_protocol))


def parse_packet_tuple(
    buf: bytes, p: int, end: int, header_protocol: int
) -> FieldsTuple:
    """:func:`parse_packet` as a plain tuple, for hot loops.

    ``end`` must not exceed ``len(buf)`` (the caller has checked it).  The
    tuple is in :class:`PacketFields` order.
    """
    vlan = 0
    present = 0
    if header_protocol == HEADER_ETHERNET:
        if p + 14 > end:
            return NOTHING
        etype = _U16(buf, p + 12)[0]
        p += 14
        if etype in VLAN_ETHERTYPES:
            if p + 4 > end:
                return NOTHING
            # The outermost tag names the VLAN the sampled port saw; VID 0
            # is a priority tag, not a VLAN.
            tci, etype = _U16X2(buf, p)
            p += 4
            vlan = tci & 0x0FFF
            if vlan:
                present = _VLAN
            tags = 1
            while etype in VLAN_ETHERTYPES:
                if tags == MAX_VLAN_TAGS or p + 4 > end:
                    return (0, b"", b"", 0, 0, 0, 0, 0, vlan, present)
                etype = _U16(buf, p + 2)[0]
                p += 4
                tags += 1
    elif header_protocol == HEADER_IPV4:
        etype = ETHERTYPE_IPV4
    elif header_protocol == HEADER_IPV6:
        etype = ETHERTYPE_IPV6
    elif header_protocol == HEADER_MPLS:
        etype = 0x8847
    else:
        return NOTHING
    if etype not in _IP_ETHERTYPES:
        p, etype = _skip_to_ip(buf, p, end, etype)

    if etype == ETHERTYPE_IPV4:
        if p + 20 > end:
            return (0, b"", b"", 0, 0, 0, 0, 0, vlan, present)
        version_ihl, tos, fragment, protocol, src, dst = _IPV4(buf, p)
        if version_ihl >> 4 != 4 or version_ihl & 0x0F < 5:
            return (0, b"", b"", 0, 0, 0, 0, 0, vlan, present)
        src = _V4 + src
        dst = _V4 + dst
        present |= _IP_PRESENT
        if fragment & 0x1FFF:
            # Only the first fragment carries the transport header.
            return (4, src, dst, protocol, 0, 0, 0, tos, vlan, present)
        l4 = p + ((version_ihl & 0x0F) << 2)
        version = 4
        icmp = PROTO_ICMP
    elif etype == ETHERTYPE_IPV6:
        if p + 40 > end:
            return (0, b"", b"", 0, 0, 0, 0, 0, vlan, present)
        first, protocol, src, dst = _IPV6(buf, p)
        if first >> 28 != 6:
            return (0, b"", b"", 0, 0, 0, 0, 0, vlan, present)
        tos = (first >> 20) & 0xFF
        l4 = p + 40
        version = 6
        icmp = PROTO_ICMPV6
        if protocol in _IPV6_EXTENSIONS:
            l4, protocol, later_fragment = _skip_ipv6_extensions(buf, l4, end, protocol)
            if protocol < 0:
                # The chain runs past the captured bytes or past
                # MAX_IPV6_EXTENSIONS: the upper-layer protocol is unknown.
                present |= _IP_NO_PROTOCOL
                return (6, src, dst, 0, 0, 0, 0, tos, vlan, present)
            if later_fragment:
                present |= _IP_PRESENT
                return (6, src, dst, protocol, 0, 0, 0, tos, vlan, present)
        present |= _IP_PRESENT
    else:
        return (0, b"", b"", 0, 0, 0, 0, 0, vlan, present)

    if protocol == PROTO_TCP:
        if l4 + 14 <= end:
            src_port, dst_port, flags = _TCP(buf, l4)
            return (
                version,
                src,
                dst,
                protocol,
                src_port,
                dst_port,
                flags & 0x0FFF,
                tos,
                vlan,
                present | _TCP_PRESENT,
            )
        if l4 + 4 <= end:
            src_port, dst_port = _U16X2(buf, l4)
            present |= _PORTS_PRESENT
            return (
                version,
                src,
                dst,
                protocol,
                src_port,
                dst_port,
                0,
                tos,
                vlan,
                present,
            )
    elif protocol in _UDP_LIKE:
        if l4 + 4 <= end:
            src_port, dst_port = _U16X2(buf, l4)
            present |= _PORTS_PRESENT
            return (
                version,
                src,
                dst,
                protocol,
                src_port,
                dst_port,
                0,
                tos,
                vlan,
                present,
            )
    elif protocol == icmp and l4 + 2 <= end:
        type_code = _U16(buf, l4)[0]
        present |= _DST_PORT
        return (version, src, dst, protocol, 0, type_code, 0, tos, vlan, present)
    return (version, src, dst, protocol, 0, 0, 0, tos, vlan, present)


def _skip_to_ip(buf: bytes, p: int, end: int, etype: int) -> tuple[int, int]:
    """Walk PPPoE, MPLS and pseudowire layers from ``p`` (after ``etype``).

    Returns the offset of the IP header and its ethertype, or ``(p, 0)``
    when no IPv4/IPv6 header follows within the captured bytes.
    """
    for _layer in range(MAX_ETHERNET_LAYERS):
        if etype == ETHERTYPE_PPPOE_SESSION:
            if p + 8 > end:
                return p, 0
            ppp = _U16(buf, p + 6)[0]
            p += 8
            if ppp == 0x0021:
                return p, ETHERTYPE_IPV4
            if ppp == 0x0057:
                return p, ETHERTYPE_IPV6
            return p, 0
        if etype not in MPLS_ETHERTYPES:
            return p, 0
        for _label in range(MAX_MPLS_LABELS):
            if p + 4 > end:
                return p, 0
            bottom = buf[p + 2] & 1
            p += 4
            if bottom:
                break
        else:
            return p, 0
        if p >= end:
            return p, 0
        nibble = buf[p] >> 4
        if nibble == 4:
            return p, ETHERTYPE_IPV4
        if nibble == 6:
            return p, ETHERTYPE_IPV6
        if nibble != 0:
            return p, 0
        # Pseudowire control word, then the customer's Ethernet frame, whose
        # VLAN tags are the customer's, not the sampled port's.
        p += 4
        if p + 14 > end:
            return p, 0
        etype = _U16(buf, p + 12)[0]
        p += 14
        for _tag in range(MAX_VLAN_TAGS):
            if etype not in VLAN_ETHERTYPES:
                break
            if p + 4 > end:
                return p, 0
            etype = _U16(buf, p + 2)[0]
            p += 4
        if etype in _IP_ETHERTYPES:
            return p, etype
    return p, 0


def _skip_ipv6_extensions(
    buf: bytes, l4: int, end: int, protocol: int
) -> tuple[int, int, bool]:
    """Skip IPv6 extension headers starting at ``l4``.

    Returns the offset of the upper-layer header, its protocol (-1 when the
    chain is cut short or longer than MAX_IPV6_EXTENSIONS) and whether the
    packet is a non-first fragment (no transport header).
    """
    later_fragment = False
    for _ext in range(MAX_IPV6_EXTENSIONS):
        if protocol in _IPV6_EXT_8:
            if l4 + 2 > end:
                return l4, -1, False
            protocol = buf[l4]
            l4 += (buf[l4 + 1] + 1) << 3
        elif protocol == _IPV6_FRAGMENT:
            if l4 + 8 > end:
                return l4, -1, False
            protocol = buf[l4]
            later_fragment = bool(_U16(buf, l4 + 2)[0] & 0xFFF8)
            l4 += 8
        elif protocol == _IPV6_AH:
            if l4 + 2 > end:
                return l4, -1, False
            protocol = buf[l4]
            l4 += (buf[l4 + 1] + 2) << 2
        else:
            return l4, protocol, later_fragment
    return l4, -1, False
