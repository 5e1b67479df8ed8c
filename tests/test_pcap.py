"""The pcap/pcapng reader against the shared captures and hand-built files.

Expected values come from the captures' tshark summaries, or from frames
taken apart by hand here (fixed header offsets), never from the reader.
"""

from __future__ import annotations

import ipaddress
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from edge_agent.collect.pcap import CaptureError, CaptureReader, read_capture

V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


# --- hand-written capture writers and parsers (independent of the reader) --


def pcap_bytes(
    frames: list[tuple[int, int, bytes]],
    linktype: int = 1,
    endian: str = "<",
    nano: bool = False,
) -> bytes:
    """A classic pcap: frames are (seconds, fraction, data)."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)]
    for seconds, fraction, data in frames:
        out.append(
            struct.pack(endian + "IIII", seconds, fraction, len(data), len(data))
        )
        out.append(data)
    return b"".join(out)


def _ng_block(block_type: int, body: bytes, endian: str) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    length = len(body) + 12
    return (
        struct.pack(endian + "II", block_type, length)
        + body
        + struct.pack(endian + "I", length)
    )


def pcapng_bytes(
    interfaces: list[tuple[int, int | None]],
    packets: list[tuple[int, int, bytes]],
    endian: str = "<",
) -> bytes:
    """A pcapng: interfaces are (linktype, tsresol option or None); packets
    are (interface id, timestamp in interface units, data)."""
    shb = _ng_block(
        0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1), endian
    )
    out = [shb]
    for linktype, tsresol in interfaces:
        body = struct.pack(endian + "HHI", linktype, 0, 262144)
        if tsresol is not None:
            body += struct.pack(endian + "HH", 9, 1) + bytes([tsresol]) + b"\x00" * 3
            body += struct.pack(endian + "HH", 0, 0)
        out.append(_ng_block(1, body, endian))
    for interface, timestamp, data in packets:
        body = struct.pack(
            endian + "IIIII",
            interface,
            timestamp >> 32,
            timestamp & 0xFFFFFFFF,
            len(data),
            len(data),
        )
        out.append(_ng_block(6, body + data, endian))
    return b"".join(out)


def read_raw_pcap(path: Path) -> list[tuple[int, int, bytes]]:
    """Parse a little-endian microsecond pcap by hand: (sec, usec, frame)."""
    raw = path.read_bytes()
    assert struct.unpack("<I", raw[:4])[0] == 0xA1B2C3D4
    offset, frames = 24, []
    while offset < len(raw):
        sec, usec, caplen, _ = struct.unpack("<IIII", raw[offset : offset + 16])
        frames.append((sec, usec, raw[offset + 16 : offset + 16 + caplen]))
        offset += 16 + caplen
    return frames


def split_ethernet_udp4(frame: bytes) -> tuple[bytes, bytes, bytes]:
    """Untagged Ethernet/IPv4/UDP by fixed offsets: (ip packet, src, payload)."""
    assert frame[12:14] == b"\x08\x00"
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack(">H", ip[2:4])[0]
    ulen = struct.unpack(">H", ip[ihl + 4 : ihl + 6])[0]
    return ip[:total], ip[12:16], ip[ihl + 8 : ihl + ulen]


def udp4_packet(src: bytes, payload: bytes, sport: int, dport: int) -> bytes:
    """An IPv4/UDP packet built by hand (checksums zero)."""
    udp = struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, bytes(4)
    )
    return header + udp


def ethernet(packet: bytes, ethertype: bytes = b"\x08\x00") -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + ethertype + packet


def summary(captures_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((captures_dir / f"{name}.summary.json").read_text())


def expected_exporters(info: dict[str, Any]) -> set[tuple[str, int]]:
    """Exporter (address, port) pairs from a tshark summary."""
    out = set()
    for key in info.get("exporters", {}):
        host, port = key.rsplit(":", 1)
        out.add((host, int(port)))
    for key in info.get("agents", {}):
        match = re.search(r"\(udp (.+):(\d+)\)", key)
        assert match is not None
        out.add((match.group(1), int(match.group(2))))
    return out


def text(address: bytes) -> str:
    if address[:12] == V4_MAPPED:
        return str(ipaddress.IPv4Address(address[12:]))
    return str(ipaddress.IPv6Address(address))


# --- the shared captures ---------------------------------------------------


def all_captures() -> list[str]:
    folder = Path(__file__).resolve().parents[1].parent / "shared" / "captures"
    names = sorted(p.name for p in folder.glob("*.pcap"))
    # An empty list would make the parametrised test vanish; the fixture
    # inside the test then reports the missing folder.
    return names or ["missing.pcap"]


@pytest.mark.parametrize("name", all_captures())
def test_every_shared_capture_yields_its_export_datagrams(
    captures_dir: Path, name: str
) -> None:
    """Each capture yields as many datagrams as tshark counted export packets
    (plus the non-sFlow UDP ones), from the exporters tshark names."""
    info = summary(captures_dir, name)
    datagrams, stats = read_capture(captures_dir / name)
    expected = int(info["export_packets"]) + int(info.get("non_sflow_udp_packets", 0))
    assert len(datagrams) == expected
    assert stats.datagrams == expected
    seen = {(text(d.exporter), d.exporter_port) for d in datagrams}
    exporters = expected_exporters(info)
    if name.startswith("sflow-counters"):
        # Its five NetFlow v5 datagrams come from the exporter of the extra CSV.
        exporters |= expected_exporters(
            summary(captures_dir, f"{name}.netflow5-on-port-6343")
        )
    assert seen == exporters


def test_payloads_and_times_match_a_hand_parse(captures_dir: Path) -> None:
    """Payload bytes and millisecond timestamps equal a by-hand frame parse."""
    path = captures_dir / "nf5-freebsd-ng_netflow.pcap"
    frames = read_raw_pcap(path)
    datagrams, _ = read_capture(path)
    assert len(datagrams) == len(frames) == 4
    for (sec, usec, frame), datagram in zip(frames, datagrams, strict=True):
        _, src, payload = split_ethernet_udp4(frame)
        assert datagram.payload == payload
        assert datagram.exporter == V4_MAPPED + src
        assert datagram.received_ms == sec * 1000 + usec // 1000
        # NetFlow v5 header: version 5, 30 records (README: 4 x 30).
        assert struct.unpack(">HH", payload[:4]) == (5, 30)


def test_ipv6_exporter_address_and_port(captures_dir: Path) -> None:
    """IPv6 transport gives the exporter's 16-byte address and source port."""
    datagrams, _ = read_capture(captures_dir / "ipfix-cisco-ipv6-exporter.pcap")
    expected = ipaddress.IPv6Address("2001:4d98:a100:303:0:931:f:1").packed
    assert {(d.exporter, d.exporter_port) for d in datagrams} == {(expected, 52925)}
    assert all(d.payload[:2] == b"\x00\x0a" for d in datagrams)  # IPFIX


def test_non_udp_frames_are_counted(captures_dir: Path) -> None:
    """The BMP-over-TCP frames of the SRv6 capture are skipped as not_udp."""
    path = captures_dir / "ipfix-cisco-srv6-with-bmp.pcap"
    tcp_frames = 0
    for _, _, frame in read_raw_pcap(path):
        offset = 14
        while frame[offset - 2 : offset] == b"\x81\x00":  # 802.1Q tags
            offset += 4
        ethertype = frame[offset - 2 : offset]
        proto = frame[offset + 9] if ethertype == b"\x08\x00" else frame[offset + 6]
        tcp_frames += proto == 6
    assert tcp_frames > 0
    with CaptureReader(path) as reader:
        datagrams = list(reader)
    assert reader.stats.skipped["not_udp"] == tcp_frames
    assert reader.stats.frames == len(datagrams) + tcp_frames
    assert len(datagrams) == 583


def test_port_filter_keeps_only_listed_destination_ports(captures_dir: Path) -> None:
    """A port filter keeps datagrams sent to those ports and counts the rest."""
    path = captures_dir / "ipfix-cisco-srv6-with-bmp.pcap"
    kept, _ = read_capture(path, ports={9991})
    assert len(kept) == 583
    none, stats = read_capture(path, ports={2055})
    assert none == []
    assert stats.skipped["port_filter"] == 583


# --- link types and file formats (built here from a real datagram) ---------


@pytest.fixture(scope="module")
def nf5_frame(captures_dir: Path) -> tuple[int, int, bytes]:
    (frame,) = read_raw_pcap(captures_dir / "nf5-akvorado-router.pcap")
    return frame


def _link_variants(ip: bytes) -> dict[str, tuple[int, bytes]]:
    sll = struct.pack(">HHH8sH", 0, 1, 6, b"\x00" * 8, 0x0800) + ip
    sll2 = struct.pack(">HHiHBB8s", 0x0800, 0, 3, 1, 0, 6, b"\x00" * 8) + ip
    null = struct.pack("<I", 2) + ip
    loop = struct.pack(">I", 2) + ip
    return {
        "sll": (113, sll),
        "sll2": (276, sll2),
        "raw": (101, ip),
        "raw_bsd": (12, ip),
        "ipv4": (228, ip),
        "null": (0, null),
        "loop": (108, loop),
        "vlan": (1, ethernet(b"\x00\x64\x08\x00" + ip, b"\x81\x00")),
    }


@pytest.mark.parametrize(
    "variant", ["sll", "sll2", "raw", "raw_bsd", "ipv4", "null", "loop", "vlan"]
)
def test_link_types(
    tmp_path: Path, nf5_frame: tuple[int, int, bytes], variant: str
) -> None:
    """SLL, SLL2, raw IP, loopback and VLAN-tagged frames give the payload."""
    sec, usec, frame = nf5_frame
    ip, src, payload = split_ethernet_udp4(frame)
    linktype, data = _link_variants(ip)[variant]
    path = tmp_path / f"{variant}.pcap"
    path.write_bytes(pcap_bytes([(sec, usec, data)], linktype=linktype))
    datagrams, stats = read_capture(path)
    assert [(d.payload, d.exporter, d.exporter_port) for d in datagrams] == [
        (payload, V4_MAPPED + src, 40000)
    ]
    assert stats.skipped == {}


def test_big_endian_nanosecond_pcap(
    tmp_path: Path, nf5_frame: tuple[int, int, bytes]
) -> None:
    """A big-endian nanosecond pcap is read, with millisecond timestamps."""
    _, _, frame = nf5_frame
    path = tmp_path / "be-ns.pcap"
    path.write_bytes(
        pcap_bytes([(1680626679, 123_456_789, frame)], endian=">", nano=True)
    )
    (datagram,), _ = read_capture(path)
    assert datagram.received_ms == 1680626679123
    assert len(datagram.payload) == 24 + 29 * 48  # v5 header + 29 records


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcapng_interfaces_with_own_link_types_and_resolutions(
    tmp_path: Path, nf5_frame: tuple[int, int, bytes], endian: str
) -> None:
    """pcapng: each interface keeps its link type and timestamp resolution;
    an interface of an unsupported link type is counted, not fatal."""
    _, _, frame = nf5_frame
    ip, _, payload = split_ethernet_udp4(frame)
    interfaces = [(1, None), (276, 9), (105, None), (101, 0x80 | 10)]
    sll2 = _link_variants(ip)["sll2"][1]
    packets = [
        (0, 1680626679_123456, frame),  # microseconds (default)
        (1, 1680626679_987654321, sll2),  # tsresol 9: nanoseconds
        (2, 0, b"\x00" * 40),  # 802.11: unsupported
        (3, 1680626679 * 1024 + 512, ip),  # tsresol 2^-10 s
    ]
    path = tmp_path / "multi.pcapng"
    path.write_bytes(pcapng_bytes(interfaces, packets, endian))
    with CaptureReader(path) as reader:
        datagrams = list(reader)
    assert reader.format == "pcapng"
    assert [d.payload for d in datagrams] == [payload] * 3
    assert [d.received_ms for d in datagrams] == [
        1680626679123,
        1680626679987,
        1680626679500,
    ]
    assert reader.stats.skipped == {"unsupported_linktype": 1}
    assert reader.stats.frames == 4


def test_ip_fragments_are_skipped_and_counted(
    tmp_path: Path, nf5_frame: tuple[int, int, bytes]
) -> None:
    """IPv4 fragments (first and later) and IPv6 fragments are not yielded."""
    _, _, frame = nf5_frame
    ip, _, _ = split_ethernet_udp4(frame)
    first = bytearray(ip[:20] + ip[20 : 20 + 800])
    first[6:8] = struct.pack(">H", 0x2000)  # MF, offset 0
    first[2:4] = struct.pack(">H", len(first))
    later = bytearray(ip[:20] + ip[20 + 800 :])
    later[6:8] = struct.pack(">H", 800 // 8)  # offset 100 (x 8 bytes)
    later[2:4] = struct.pack(">H", len(later))
    udp = ip[20:]
    v6 = (
        struct.pack(">IHBB", 6 << 28, 8 + len(udp), 44, 64)
        + bytes(16)
        + bytes(15)
        + b"\x01"
        + struct.pack(">BBHI", 17, 0, 0x0001, 7)  # fragment header, M set
        + udp
    )
    path = tmp_path / "fragments.pcap"
    path.write_bytes(
        pcap_bytes(
            [
                (1, 0, ethernet(bytes(first))),
                (2, 0, ethernet(bytes(later))),
                (3, 0, ethernet(v6, b"\x86\xdd")),
            ]
        )
    )
    datagrams, stats = read_capture(path)
    assert datagrams == []
    assert stats.skipped == {"ip_fragment": 3}


def test_padding_truncation_and_non_ip(tmp_path: Path) -> None:
    """Ethernet padding is cut at the UDP length; a snapped frame is
    'truncated', ARP is 'not_ip', a short UDP length is 'malformed'."""
    src = bytes([192, 0, 2, 7])
    small = udp4_packet(src, b"\x00\x05abc", 4000, 2055)
    padded = ethernet(small) + b"\x00" * 20
    snapped = ethernet(udp4_packet(src, b"x" * 100, 4000, 2055))[:-10]
    arp = ethernet(b"\x00\x01\x08\x00\x06\x04" + bytes(22), b"\x08\x06")
    bad_len = bytearray(udp4_packet(src, b"abcd", 4000, 2055))
    bad_len[24:26] = struct.pack(">H", 4)  # UDP length below its header
    path = tmp_path / "mixed.pcap"
    path.write_bytes(
        pcap_bytes(
            [
                (1, 0, padded),
                (2, 0, snapped),
                (3, 0, arp),
                (4, 0, ethernet(bytes(bad_len))),
            ]
        )
    )
    datagrams, stats = read_capture(path)
    assert [(d.payload, d.exporter_port) for d in datagrams] == [(b"\x00\x05abc", 4000)]
    assert stats.skipped == {"truncated": 1, "not_ip": 1, "malformed": 1}
    assert stats.frames == 4


def test_truncated_file_keeps_earlier_datagrams(
    tmp_path: Path, captures_dir: Path
) -> None:
    """A file cut inside a record yields what came before and counts it."""
    raw = (captures_dir / "nf5-freebsd-ng_netflow.pcap").read_bytes()
    path = tmp_path / "cut.pcap"
    path.write_bytes(raw[:-100])
    datagrams, stats = read_capture(path)
    assert len(datagrams) == 3
    assert stats.skipped == {"truncated_file": 1}


def test_bad_files_raise_capture_error(tmp_path: Path) -> None:
    """Missing, non-capture and unsupported-link-type files raise
    CaptureError with a message naming the problem."""
    with pytest.raises(CaptureError, match="cannot open"):
        CaptureReader(tmp_path / "nope.pcap")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("frame,exporter\n1,192.0.2.1\n")
    with pytest.raises(CaptureError, match="not a pcap or pcapng"):
        CaptureReader(text_file)
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    with pytest.raises(CaptureError, match="not a pcap or pcapng"):
        CaptureReader(empty)
    wifi = tmp_path / "wifi.pcap"
    wifi.write_bytes(pcap_bytes([], linktype=105))
    with pytest.raises(CaptureError, match="link type 105"):
        CaptureReader(wifi)
    with pytest.raises(CaptureError, match="cannot open"):
        CaptureReader(tmp_path)  # a directory
