"""Raw packet header parsing: hand-built frames with known flow keys, and
the real sampled frames of the IPFIX IE 315 captures against tshark.

Every expected value is either written into the frame by the test
(struct.pack) or taken from tshark's decode, never read back from the parser.
"""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.flows.packet_headers import (
    HEADER_ETHERNET,
    HEADER_IPV4,
    HEADER_IPV6,
    HEADER_MPLS,
    MAX_MPLS_LABELS,
    MAX_VLAN_TAGS,
    NO_FIELDS,
    PacketFields,
    parse_packet,
    parse_packet_tuple,
)
from edge_agent.flows.schema import Field
from tests.reference import read_csv, read_datagrams

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
V4_SRC = "192.0.2.10"
V4_DST = "198.51.100.20"
V6_SRC = "2001:db8::1"
V6_DST = "2001:db8:ffff::2"

IP_BITS = Field.SRC_ADDR | Field.DST_ADDR | Field.PROTOCOL | Field.TOS
PORT_BITS = Field.SRC_PORT | Field.DST_PORT


def mapped(text: str) -> bytes:
    """The 16-byte column form of an address (IPv4-mapped for IPv4)."""
    addr = ipaddress.ip_address(text)
    if addr.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def ethernet(ethertype: int) -> bytes:
    return MAC_A + MAC_B + struct.pack("!H", ethertype)


def vlan_tag(tpid_next: int, vid: int, pcp: int = 0) -> bytes:
    """A tag's TCI and the ethertype that follows it (the TPID is before)."""
    return struct.pack("!HH", (pcp << 13) | vid, tpid_next)


def mpls(label: int, bottom: bool, ttl: int = 64) -> bytes:
    return struct.pack("!I", (label << 12) | (int(bottom) << 8) | ttl)


def ipv4(
    protocol: int,
    payload_len: int,
    *,
    tos: int = 0,
    fragment: int = 0,
    options: bytes = b"",
    src: str = V4_SRC,
    dst: str = V4_DST,
) -> bytes:
    ihl = 5 + len(options) // 4
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            tos,
            ihl * 4 + payload_len,
            0x1234,
            fragment,
            64,
            protocol,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + options
    )


def ipv6(next_header: int, payload_len: int, traffic_class: int = 0) -> bytes:
    first = (6 << 28) | (traffic_class << 20) | 0x12345
    return struct.pack(
        "!IHBB16s16s",
        first,
        payload_len,
        next_header,
        64,
        ipaddress.IPv6Address(V6_SRC).packed,
        ipaddress.IPv6Address(V6_DST).packed,
    )


def tcp(src_port: int, dst_port: int, flags: int) -> bytes:
    # data offset 5 words in the top nibble of the flags word
    return struct.pack(
        "!HHIIHHHH", src_port, dst_port, 1, 2, (5 << 12) | flags, 0, 0, 0
    )


def udp(src_port: int, dst_port: int) -> bytes:
    return struct.pack("!HHHH", src_port, dst_port, 8, 0)


def test_ethernet_ipv4_tcp() -> None:
    """Untagged Ethernet, IPv4 and TCP give the 5-tuple, TOS and flags."""
    frame = ethernet(0x0800) + ipv4(6, 20, tos=0xB8) + tcp(40000, 443, 0x012)
    got = parse_packet(frame)
    assert got == PacketFields(
        ip_version=4,
        src_addr=mapped(V4_SRC),
        dst_addr=mapped(V4_DST),
        protocol=6,
        src_port=40000,
        dst_port=443,
        tcp_flags=0x012,
        tos=0xB8,
        vlan=0,
        present=int(IP_BITS | PORT_BITS | Field.TCP_FLAGS),
    )


def test_qinq_mpls_ipv6_udp() -> None:
    """802.1ad outer tag 100, 802.1Q inner tag 200, two MPLS labels, IPv6
    and UDP: the outer VLAN, the IPv6 addresses, traffic class and ports."""
    frame = (
        ethernet(0x88A8)
        + vlan_tag(0x8100, 100, pcp=5)
        + vlan_tag(0x8847, 200)
        + mpls(16001, bottom=False)
        + mpls(24, bottom=True)
        + ipv6(17, 8, traffic_class=0x2E)
        + udp(5353, 53)
    )
    got = parse_packet(frame)
    assert got.vlan == 100
    assert got.ip_version == 6
    assert got.src_addr == mapped(V6_SRC)
    assert got.dst_addr == mapped(V6_DST)
    assert (got.protocol, got.src_port, got.dst_port) == (17, 5353, 53)
    assert got.tos == 0x2E
    assert got.tcp_flags == 0
    assert got.present == int(IP_BITS | PORT_BITS | Field.VLAN)


def test_priority_tag_is_not_a_vlan() -> None:
    """A tag with VID 0 (priority only) leaves the VLAN unknown."""
    frame = ethernet(0x8100) + vlan_tag(0x0800, 0, pcp=3) + ipv4(17, 8) + udp(1, 2)
    got = parse_packet(frame)
    assert got.vlan == 0
    assert not got.present & Field.VLAN
    assert (got.src_port, got.dst_port) == (1, 2)


def test_ethernet_pseudowire_over_mpls() -> None:
    """MPLS, a pseudowire control word, then the customer's tagged Ethernet
    frame: the inner IPv4 5-tuple, and the outer (provider) VLAN only."""
    inner = (
        ethernet(0x8100) + vlan_tag(0x0800, 3000) + ipv4(6, 20) + tcp(80, 1234, 0x10)
    )
    frame = (
        ethernet(0x8100)
        + vlan_tag(0x8847, 42)
        + mpls(300012, bottom=False)
        + mpls(17, bottom=True)
        + b"\x00\x00\x00\x00"
        + inner
    )
    got = parse_packet(frame)
    assert (got.src_addr, got.dst_addr) == (mapped(V4_SRC), mapped(V4_DST))
    assert (got.protocol, got.src_port, got.dst_port, got.tcp_flags) == (
        6,
        80,
        1234,
        0x10,
    )
    assert got.vlan == 42


def test_pppoe_session() -> None:
    """PPPoE session framing with PPP protocol 0x0021 carries IPv4."""
    pppoe = struct.pack("!BBHHH", 0x11, 0, 0x0001, 2 + 28, 0x0021)
    frame = ethernet(0x8864) + pppoe + ipv4(17, 8) + udp(500, 4500)
    got = parse_packet(frame)
    assert (got.ip_version, got.protocol, got.src_port, got.dst_port) == (
        4,
        17,
        500,
        4500,
    )


def test_ipv4_options_are_skipped_by_ihl() -> None:
    """An IPv4 header with 8 bytes of options (IHL 7): ports after them."""
    frame = ethernet(0x0800) + ipv4(17, 8, options=b"\x01" * 8) + udp(1111, 2222)
    got = parse_packet(frame)
    assert (got.src_port, got.dst_port) == (1111, 2222)


def test_ipv4_later_fragment_has_no_ports() -> None:
    """A non-first IPv4 fragment (offset 185 x 8 bytes) has addresses and
    protocol but no transport header."""
    frame = ethernet(0x0800) + ipv4(17, 8, fragment=185) + udp(9, 9)
    got = parse_packet(frame)
    assert got.present == int(IP_BITS)
    assert (got.protocol, got.src_port, got.dst_port) == (17, 0, 0)


def test_ipv4_first_fragment_has_ports() -> None:
    """The first fragment (more-fragments flag, offset 0) has its ports."""
    frame = ethernet(0x0800) + ipv4(17, 8, fragment=0x2000) + udp(7, 8)
    assert parse_packet(frame).present & PORT_BITS == PORT_BITS


def test_ipv6_extension_headers() -> None:
    """Hop-by-hop (8 bytes) then a first fragment header, then TCP: the
    protocol is the upper layer (6) and the ports are read."""
    hop_by_hop = struct.pack("!BB6x", 44, 0)
    fragment = struct.pack("!BBHI", 6, 0, 0x0001, 7)  # offset 0, more frags
    frame = ethernet(0x86DD) + ipv6(0, 36) + hop_by_hop + fragment + tcp(22, 5000, 2)
    got = parse_packet(frame)
    assert (got.protocol, got.src_port, got.dst_port, got.tcp_flags) == (6, 22, 5000, 2)


def test_ipv6_later_fragment_has_no_ports() -> None:
    """An IPv6 fragment header with offset 100 (x 8 bytes): protocol known
    from the fragment header, no ports."""
    fragment = struct.pack("!BBHI", 17, 0, 100 << 3, 7)
    frame = ethernet(0x86DD) + ipv6(44, 16) + fragment + udp(1, 2)
    got = parse_packet(frame)
    assert got.protocol == 17
    assert got.present == int(IP_BITS)


def test_ipv6_extension_chain_cut_short() -> None:
    """A hop-by-hop header whose next header (destination options, 60) is
    not captured: the addresses are known, the upper-layer protocol is not.
    A hop-by-hop header naming TCP, with TCP not captured, still gives the
    protocol but no ports."""
    frame = ethernet(0x86DD) + ipv6(0, 8) + struct.pack("!BB6x", 60, 0)
    got = parse_packet(frame)
    assert got.src_addr == mapped(V6_SRC)
    assert got.present == int(IP_BITS & ~Field.PROTOCOL)
    frame_tcp = ethernet(0x86DD) + ipv6(0, 28) + struct.pack("!BB6x", 6, 0)
    got_tcp = parse_packet(frame_tcp)
    assert got_tcp.protocol == 6
    assert got_tcp.present == int(IP_BITS)


def test_icmp_type_and_code_in_dst_port() -> None:
    """ICMP echo request (type 8, code 0) gives dst_port 8 * 256 + 0, as
    NetFlow v5 exporters do; ICMPv6 time exceeded (3, 1) gives 0x0301."""
    icmp = struct.pack("!BBHI", 8, 0, 0, 0)
    got = parse_packet(ethernet(0x0800) + ipv4(1, 8) + icmp)
    assert (got.protocol, got.src_port, got.dst_port) == (1, 0, 0x0800)
    assert got.present == int(IP_BITS | Field.DST_PORT)
    icmp6 = struct.pack("!BBHI", 3, 1, 0, 0)
    got6 = parse_packet(ethernet(0x86DD) + ipv6(58, 8) + icmp6)
    assert (got6.protocol, got6.dst_port) == (58, 0x0301)


def test_header_protocols_ipv4_ipv6_mpls() -> None:
    """sFlow header_protocol 11 (IPv4), 12 (IPv6) and 13 (MPLS) start the
    walk at that layer."""
    v4 = ipv4(17, 8) + udp(10, 20)
    assert parse_packet(v4, header_protocol=HEADER_IPV4)[3:6] == (17, 10, 20)
    v6 = ipv6(6, 20) + tcp(30, 40, 0x18)
    got6 = parse_packet(v6, header_protocol=HEADER_IPV6)
    assert (got6.ip_version, got6.src_port, got6.dst_port, got6.tcp_flags) == (
        6,
        30,
        40,
        0x18,
    )
    labelled = mpls(100, bottom=True) + v4
    assert parse_packet(labelled, header_protocol=HEADER_MPLS)[3:6] == (17, 10, 20)


def test_unsupported_header_protocol_gives_nothing() -> None:
    """Header protocols other than 1, 11, 12 and 13 (say 7, PPP) are not
    parsed."""
    frame = ethernet(0x0800) + ipv4(6, 20) + tcp(1, 2, 0)
    assert parse_packet(frame, header_protocol=7) == NO_FIELDS


def test_non_ip_ethertype_keeps_only_the_vlan() -> None:
    """An ARP frame on VLAN 7: only the VLAN is known."""
    frame = ethernet(0x8100) + vlan_tag(0x0806, 7) + b"\x00" * 28
    got = parse_packet(frame)
    assert got.vlan == 7
    assert got.present == int(Field.VLAN)


def test_offset_and_end_bound_the_walk() -> None:
    """The frame is read between offset and end only: bytes after end (here
    the TCP header) are not used."""
    frame = ethernet(0x0800) + ipv4(6, 20) + tcp(1, 2, 0x02)
    buf = b"\xff" * 10 + frame + b"\xff" * 10
    whole = parse_packet(buf, 10, 10 + len(frame))
    assert (whole.src_port, whole.dst_port, whole.tcp_flags) == (1, 2, 0x02)
    cut = parse_packet(buf, 10, 10 + 14 + 20)
    assert cut.present == int(IP_BITS)


def test_every_truncation_of_a_frame() -> None:
    """Each prefix of a VLAN/IPv4/TCP frame gives exactly the fields wholly
    inside it: VLAN from 18 bytes, IP from 38, ports from 42, flags from 52."""
    frame = ethernet(0x8100) + vlan_tag(0x0800, 9) + ipv4(6, 20) + tcp(5, 6, 0x11)
    assert len(frame) == 58
    for n in range(len(frame) + 1):
        got = parse_packet(frame, 0, n)
        expected = 0
        if n >= 18:
            expected |= Field.VLAN
        if n >= 38:
            expected |= IP_BITS
        if n >= 42:
            expected |= PORT_BITS
        if n >= 52:
            expected |= Field.TCP_FLAGS
        assert got.present == int(expected), n


def test_loops_are_bounded() -> None:
    """More VLAN tags than MAX_VLAN_TAGS, or more MPLS labels than
    MAX_MPLS_LABELS without a bottom of stack, stop the walk (no IP)."""
    tags = ethernet(0x8100) + b"".join(
        vlan_tag(0x8100, 5) for _ in range(MAX_VLAN_TAGS + 2)
    )
    frame = tags + vlan_tag(0x0800, 5) + ipv4(6, 20) + tcp(1, 2, 0)
    got = parse_packet(frame)
    assert got.vlan == 5
    assert not got.present & Field.SRC_ADDR
    labels = b"".join(mpls(i, bottom=False) for i in range(MAX_MPLS_LABELS + 1))
    deep = ethernet(0x8847) + labels + ipv4(6, 20) + tcp(1, 2, 0)
    assert parse_packet(deep) == NO_FIELDS


def test_tuple_form_matches_named_form() -> None:
    """parse_packet_tuple returns the same values as parse_packet."""
    frame = ethernet(0x0800) + ipv4(6, 20) + tcp(1, 2, 0x02)
    assert parse_packet_tuple(frame, 0, len(frame), HEADER_ETHERNET) == tuple(
        parse_packet(frame)
    )


@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(max_size=200),
    protocol=st.sampled_from([HEADER_ETHERNET, HEADER_IPV4, HEADER_IPV6, HEADER_MPLS]),
)
def test_random_bytes_never_raise(data: bytes, protocol: int) -> None:
    """Any bytes at any supported layer parse without raising, and the
    result has ten fields with 16-byte or empty addresses."""
    got = parse_packet(data, header_protocol=protocol)
    assert len(got) == 10
    assert len(got.src_addr) in (0, 16)


@settings(max_examples=300, deadline=None)
@given(prefix=st.binary(min_size=14, max_size=14), tail=st.binary(max_size=120))
def test_random_bytes_after_ip_ethertypes_never_raise(
    prefix: bytes, tail: bytes
) -> None:
    """Random bytes after the IPv4, IPv6, MPLS, PPPoE and VLAN ethertypes
    (the branches random data rarely reaches) never raise."""
    for ethertype in (0x0800, 0x86DD, 0x8847, 0x8864, 0x8100):
        frame = prefix[:12] + struct.pack("!H", ethertype) + tail
        assert len(parse_packet(frame)) == 10


# ------------------------------------- real frames: IPFIX IE 315 captures


def ipfix_frame_sections(path: Path) -> list[bytes]:
    """The dataLinkFrameSection (IE 315) values of an IPFIX capture, in
    record order, read with a minimal walk of templates and data sets
    (enough for these two captures: no options templates, no withdrawals)."""
    templates: dict[int, list[tuple[int, int, bool]]] = {}
    out: list[bytes] = []
    for datagram in read_datagrams(path):
        b = datagram.payload
        length = struct.unpack_from("!H", b, 2)[0]
        off = 16
        while off + 4 <= length:
            set_id, set_length = struct.unpack_from("!HH", b, off)
            end, q = off + set_length, off + 4
            if set_id == 2:
                while q + 4 <= end:
                    template_id, count = struct.unpack_from("!HH", b, q)
                    q += 4
                    fields = []
                    for _ in range(count):
                        ie, size = struct.unpack_from("!HH", b, q)
                        q += 4
                        if ie & 0x8000:
                            q += 4  # enterprise number
                        fields.append((ie & 0x7FFF, size, bool(ie & 0x8000)))
                    templates[template_id] = fields
            elif set_id in templates:
                while end - q >= 4:
                    for ie, declared, enterprise in templates[set_id]:
                        size = declared
                        if declared == 0xFFFF:
                            size = b[q]
                            q += 1
                            if size == 255:
                                size = struct.unpack_from("!H", b, q)[0]
                                q += 2
                        if ie == 315 and not enterprise:
                            out.append(b[q : q + size])
                        q += size
            off = end
    return out


@pytest.mark.parametrize(
    "name", ["ipfix-datalink-frame-section.pcap", "ipfix-eompls-datalink.pcap"]
)
def test_ipfix_frame_sections_match_tshark(captures_dir: Path, name: str) -> None:
    """The sampled frames carried in IPFIX IE 315 (VLAN-tagged frames and
    Ethernet-over-MPLS pseudowires with a control word) give tshark's
    addresses, protocol, ports, TCP flags and VLAN.  Record 3 of the EoMPLS
    capture is the exception: tshark misplaces the inner frame, but by the
    bytes (hand-decoded: labels 300012 and 17, control word 00000000, inner
    Ethernet 02:00:00:00:00:06 -> :05 type 0800, IPv4 198.51.100.1 ->
    198.51.100.2, TCP 443 -> 55427, ACK) it is an ordinary TCP packet."""
    frames = ipfix_frame_sections(captures_dir / name)
    rows = read_csv(captures_dir / f"{name}.datalink.tshark.csv")
    assert len(frames) == len(rows)
    for index, (frame, tshark_row) in enumerate(zip(frames, rows, strict=True)):
        assert len(frame) == int(tshark_row["inner_frame_len"])
        got = parse_packet(frame)
        row = tshark_row
        if name == "ipfix-eompls-datalink.pcap" and index == 3:
            assert not tshark_row["ip.src"]
            row = dict(
                tshark_row,
                **{
                    "ip.src": "198.51.100.1",
                    "ip.dst": "198.51.100.2",
                    "ip.proto": "6",
                    "tcp.srcport": "443",
                    "tcp.dstport": "55427",
                    "tcp.flags": "0x0010",
                },
            )
        assert got.src_addr == mapped(row["ip.src"]), index
        assert got.dst_addr == mapped(row["ip.dst"]), index
        assert got.protocol == int(row["ip.proto"]), index
        src_port = row["tcp.srcport"] or row["udp.srcport"]
        dst_port = row["tcp.dstport"] or row["udp.dstport"]
        assert (got.src_port, got.dst_port) == (int(src_port), int(dst_port)), index
        if row["tcp.flags"]:
            assert got.tcp_flags == int(row["tcp.flags"], 16), index
        else:
            assert not got.present & Field.TCP_FLAGS, index
        # tshark lists the VLAN of every Ethernet layer; the outer frame's
        # tag is the first (pseudowire rows have none outside).
        outer_vlan = row["vlan.id"].split("|")[0] if not row["mpls.label"] else ""
        assert got.vlan == (int(outer_vlan) if outer_vlan else 0), index
