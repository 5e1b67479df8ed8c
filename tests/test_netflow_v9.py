"""NetFlow v9 (RFC 3954) decoding with hand-built datagrams.

Each test writes the datagram with struct.pack and computes the expected
values from what it wrote.
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import numpy as np
import pytest

from edge_agent.flows.counters import ExporterCounters
from edge_agent.flows.decoder import DecoderConfig, FlowDecoder
from edge_agent.flows.schema import ExportProtocol, Field, address_text
from tests.reference import read_datagrams

EXPORTER = bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 7])
PORT = 2055
UNIX_SECS = 1_710_000_000
UPTIME_MS = 900_000
SOURCE_ID = 42

# (type, length) of a small IPv4 template: src, dst, sport, dport, proto,
# bytes, packets, first, last.
IPV4_FIELDS = [
    (8, 4),
    (12, 4),
    (7, 2),
    (11, 2),
    (4, 1),
    (1, 4),
    (2, 4),
    (22, 4),
    (21, 4),
]


def header(count: int, seq: int = 0, source_id: int = SOURCE_ID) -> bytes:
    return struct.pack(">HHIIII", 9, count, UPTIME_MS, UNIX_SECS, seq, source_id)


def flowset(set_id: int, body: bytes, pad_to: int = 4) -> bytes:
    """A flowset with its header; padded to a multiple of ``pad_to``."""
    length = 4 + len(body)
    padding = (-length) % pad_to
    return struct.pack(">HH", set_id, length + padding) + body + b"\x00" * padding


def template_record(template_id: int, fields: list[tuple[int, int]]) -> bytes:
    out = struct.pack(">HH", template_id, len(fields))
    for field_type, length in fields:
        out += struct.pack(">HH", field_type, length)
    return out


def options_template_record(
    template_id: int, scope: list[tuple[int, int]], options: list[tuple[int, int]]
) -> bytes:
    out = struct.pack(">HHH", template_id, 4 * len(scope), 4 * len(options))
    for field_type, length in scope + options:
        out += struct.pack(">HH", field_type, length)
    return out


def ipv4_record(
    src: int, dst: int, sport: int, dport: int, octets: int, *, first: int = 1000
) -> bytes:
    return struct.pack(
        ">IIHHBIIII",
        src,
        dst,
        sport,
        dport,
        6,
        octets,
        octets // 100 + 1,
        UPTIME_MS - first,
        UPTIME_MS - 10,
    )


def ip(a: int, b: int, c: int, d: int) -> int:
    return a << 24 | b << 16 | c << 8 | d


def decode(decoder: FlowDecoder, payload: bytes, received_ms: int = 0) -> np.ndarray:
    return decoder.decode(payload, EXPORTER, PORT, received_ms)


def counters(decoder: FlowDecoder) -> ExporterCounters:
    return decoder.stats.exporter(EXPORTER, PORT)


def test_template_and_data_in_one_datagram() -> None:
    """A template then its data in one datagram: every field decoded, times
    converted with the header's sysUptime and unix seconds."""
    decoder = FlowDecoder()
    rec = ipv4_record(ip(10, 0, 0, 1), ip(10, 0, 0, 2), 1234, 80, 5000)
    payload = (
        header(2)
        + flowset(0, template_record(256, IPV4_FIELDS))
        + flowset(256, rec + ipv4_record(ip(10, 0, 0, 3), ip(10, 0, 0, 4), 5, 6, 99))
    )
    records = decode(decoder, payload)
    assert len(records) == 2
    r = records[0]
    assert address_text(r["src_addr"].tobytes()) == "10.0.0.1"
    assert address_text(r["dst_addr"].tobytes()) == "10.0.0.2"
    assert (int(r["src_port"]), int(r["dst_port"]), int(r["protocol"])) == (1234, 80, 6)
    assert (int(r["bytes"]), int(r["packets"])) == (5000, 51)
    assert int(r["time_start"]) == UNIX_SECS * 1000 - 1000
    assert int(r["time_end"]) == UNIX_SECS * 1000 - 10
    assert int(r["domain"]) == SOURCE_ID
    assert int(r["export_proto"]) == ExportProtocol.NETFLOW_V9
    assert not int(r["present"]) & Field.IN_IF  # the template has no interface
    assert int(records[1]["bytes"]) == 99
    c = counters(decoder)
    assert (c.records, c.templates, c.templates_received) == (2, 1, 1)


def test_header_count_too_small_is_ignored() -> None:
    """Flowsets are walked by length: a header Count of 1 for a datagram
    with a template and two data flowsets still yields every record."""
    decoder = FlowDecoder()
    rec = ipv4_record(ip(1, 1, 1, 1), ip(2, 2, 2, 2), 1, 2, 300)
    payload = (
        header(count=1)
        + flowset(0, template_record(300, IPV4_FIELDS))
        + flowset(300, rec)
        + flowset(300, rec + rec)
    )
    assert len(decode(decoder, payload)) == 3


def test_data_before_template_is_held_and_released() -> None:
    """Data whose template has not arrived is held; the datagram that brings
    the template returns the held records (with their own header's times)
    and counts them as decoded."""
    decoder = FlowDecoder()
    early = ipv4_record(ip(10, 9, 9, 9), ip(10, 8, 8, 8), 7, 8, 700, first=5000)
    held = decode(decoder, header(1, seq=0) + flowset(256, early), received_ms=1_000)
    assert len(held) == 0
    c = counters(decoder)
    assert (c.pending_held, c.pending_decoded) == (1, 0)
    assert decoder.pending.sets == 1
    later = ipv4_record(ip(10, 1, 1, 1), ip(10, 2, 2, 2), 1, 2, 100)
    payload = (
        header(2, seq=1)
        + flowset(0, template_record(256, IPV4_FIELDS))
        + flowset(256, later)
    )
    records = decode(decoder, payload, received_ms=2_000)
    assert sorted(records["bytes"].tolist()) == [100, 700]
    assert c.pending_decoded == 1
    assert c.pending_expired == 0
    assert decoder.pending.sets == 0
    assert c.records == 2


def test_held_data_expires_by_age_and_is_counted() -> None:
    """Held data older than pending_max_age_ms is dropped and counted in
    pending_expired; the template that arrives later releases nothing."""
    decoder = FlowDecoder(DecoderConfig(pending_max_age_ms=10_000))
    rec = ipv4_record(ip(10, 0, 0, 1), ip(10, 0, 0, 2), 1, 2, 100)
    decode(decoder, header(1) + flowset(256, rec), received_ms=1_000)
    decode(decoder, header(1, seq=1) + flowset(257, rec), received_ms=8_000)
    assert decoder.expire_pending(now_ms=11_500) == 1  # only the first is too old
    c = counters(decoder)
    assert (c.pending_held, c.pending_expired) == (2, 1)
    payload = header(1, seq=2) + flowset(
        0, template_record(256, IPV4_FIELDS) + template_record(257, IPV4_FIELDS)
    )
    records = decode(decoder, payload, received_ms=12_000)
    assert len(records) == 1  # only the set held for 257 was still there
    assert (c.pending_decoded, c.pending_expired) == (1, 1)


def test_held_data_expires_on_a_later_datagram() -> None:
    """The age bound is also applied as datagrams arrive (receive time),
    without an explicit expire_pending call."""
    decoder = FlowDecoder(DecoderConfig(pending_max_age_ms=1_000))
    rec = ipv4_record(ip(10, 0, 0, 1), ip(10, 0, 0, 2), 1, 2, 100)
    decode(decoder, header(1) + flowset(256, rec), received_ms=0)
    decode(decoder, header(0, seq=1), received_ms=5_000)
    assert counters(decoder).pending_expired == 1
    assert decoder.pending.sets == 0


def test_held_data_count_and_byte_bounds_drop_the_oldest() -> None:
    """Past pending_max_records sets (or pending_max_bytes) the oldest held
    set is dropped and counted; the newest are kept."""
    decoder = FlowDecoder(DecoderConfig(pending_max_records=2))
    for i in range(3):
        rec = ipv4_record(ip(10, 0, 0, i), ip(10, 0, 0, 9), 1, 2, 100 + i)
        decode(decoder, header(1, seq=i) + flowset(256, rec))
    c = counters(decoder)
    assert (c.pending_held, c.pending_expired) == (3, 1)
    released = decode(
        decoder, header(1, seq=3) + flowset(0, template_record(256, IPV4_FIELDS))
    )
    assert sorted(released["bytes"].tolist()) == [101, 102]

    small = FlowDecoder(DecoderConfig(pending_max_bytes=60))
    rec = ipv4_record(ip(10, 0, 0, 1), ip(10, 0, 0, 9), 1, 2, 100)  # 33 bytes
    decode(small, header(1) + flowset(256, rec))
    decode(small, header(1, seq=1) + flowset(256, rec))
    assert counters(small).pending_expired == 1
    assert small.pending.bytes <= 60


def test_template_redefinition_replaces_the_old_one() -> None:
    """A template id sent again with other fields (exporter restart)
    replaces the old definition for the data that follows."""
    decoder = FlowDecoder()
    first = header(2) + flowset(0, template_record(256, [(8, 4), (1, 4)]))
    first += flowset(256, struct.pack(">II", ip(10, 0, 0, 1), 1111))
    second = header(2, seq=1) + flowset(0, template_record(256, [(1, 4), (8, 4)]))
    second += flowset(256, struct.pack(">II", 2222, ip(10, 0, 0, 2)))
    a = decode(decoder, first)
    b = decode(decoder, second)
    assert (int(a["bytes"][0]), address_text(a["src_addr"][0].tobytes())) == (
        1111,
        "10.0.0.1",
    )
    assert (int(b["bytes"][0]), address_text(b["src_addr"][0].tobytes())) == (
        2222,
        "10.0.0.2",
    )
    assert counters(decoder).templates == 1
    assert counters(decoder).templates_received == 2


def test_redefinition_inside_one_batch_keeps_each_definition() -> None:
    """decode_many over data, redefinition, data decodes each data set with
    the template in force when it arrived."""
    decoder = FlowDecoder()
    datagrams = [
        header(2)
        + flowset(0, template_record(256, [(1, 4)]))
        + flowset(256, struct.pack(">I", 5)),
        header(1, seq=1) + flowset(256, struct.pack(">I", 6)),
        header(2, seq=2)
        + flowset(0, template_record(256, [(2, 4)]))
        + flowset(256, struct.pack(">I", 7)),
    ]
    records = decoder.decode_many((d, EXPORTER, PORT, 0) for d in datagrams)
    assert records["bytes"].tolist() == [5, 6, 0]
    assert records["packets"].tolist() == [0, 0, 7]
    assert [bool(p & Field.PACKETS) for p in records["present"]] == [False, False, True]


def test_options_sampling_applies_to_data_records() -> None:
    """An options record (scope System; FLOW_SAMPLER_ID 48, SAMPLING
    algorithm 49 and interval 50) announces a rate: data records naming
    that sampler get it; records without a sampler id get the domain's."""
    decoder = FlowDecoder()
    options = options_template_record(257, [(1, 4)], [(48, 1), (49, 1), (50, 4)])
    options_data = struct.pack(">IBBI", 0, 3, 2, 500) + struct.pack(
        ">IBBI", 0, 4, 2, 64
    )
    data_fields = [*IPV4_FIELDS, (48, 1)]
    rec = ipv4_record(ip(10, 0, 0, 1), ip(10, 0, 0, 2), 1, 2, 100)
    payload = (
        header(5)
        + flowset(1, options)
        + flowset(257, options_data)
        + flowset(
            0, template_record(258, data_fields) + template_record(259, IPV4_FIELDS)
        )
        + flowset(258, rec + b"\x03" + rec + b"\x04" + rec + b"\x09")
        + flowset(259, rec)
    )
    records = decode(decoder, payload)
    # sampler 3 -> 500, sampler 4 -> 64, unknown sampler 9 and no sampler:
    # the rate last announced for the domain.
    assert records["sampling_rate"].tolist() == [500, 64, 64, 64]
    assert records["sampler_id"].tolist() == [3, 4, 9, 0]
    c = counters(decoder)
    assert c.options_records == 2
    assert c.records == 4
    # The v9 scope field "System" (type 1) is not octetDeltaCount (IE 1).
    assert records["bytes"].tolist() == [100, 100, 100, 100]


def test_sampling_interval_in_data_records() -> None:
    """A data template that carries SAMPLING_INTERVAL (34) gives each record
    that rate, and the operator override still wins."""
    fields = [*IPV4_FIELDS, (34, 4)]
    rec = ipv4_record(ip(10, 0, 0, 1), ip(10, 0, 0, 2), 1, 2, 100)
    payload = header(2) + flowset(0, template_record(260, fields))
    payload += flowset(260, rec + struct.pack(">I", 2048))
    assert decode(FlowDecoder(), payload)["sampling_rate"].tolist() == [2048]
    override = FlowDecoder(DecoderConfig(sampling_overrides={"198.51.100.7": 10}))
    assert decode(override, payload)["sampling_rate"].tolist() == [10]


def test_reduced_size_encoding() -> None:
    """Counters and interfaces sent shorter than their usual width (1, 2, 3,
    5, 6 and 7 bytes) are read at the width the template gives."""
    fields = [(1, 3), (2, 2), (10, 1), (14, 2), (85, 5), (16, 6), (17, 7)]
    body = (
        (0x0A0B0C).to_bytes(3, "big")
        + (513).to_bytes(2, "big")
        + (7).to_bytes(1, "big")
        + (1025).to_bytes(2, "big")
        + (0x0102030405).to_bytes(5, "big")
        + (65_551).to_bytes(6, "big")
        + (4_200_000_000).to_bytes(7, "big")
    )
    payload = header(2) + flowset(0, template_record(261, fields)) + flowset(261, body)
    r = decode(FlowDecoder(), payload)[0]
    assert int(r["bytes"]) == 0x0A0B0C  # octetDeltaCount wins over total (85)
    assert int(r["packets"]) == 513
    assert (int(r["in_if"]), int(r["out_if"])) == (7, 1025)
    assert int(r["src_as"]) == 65_551
    assert int(r["dst_as"]) == 4_200_000_000


def test_padding_and_zero_filled_tail_are_not_flowsets() -> None:
    """Flowset padding and a datagram zero-filled to a fixed size decode
    cleanly; non-zero bytes after the last flowset are counted."""
    decoder = FlowDecoder()
    rec = ipv4_record(ip(10, 0, 0, 1), ip(10, 0, 0, 2), 1, 2, 100)  # 33 bytes
    payload = (
        header(2)
        + flowset(0, template_record(256, IPV4_FIELDS))
        + flowset(256, rec, pad_to=8)
    )
    assert len(decode(decoder, payload + bytes(1400 - len(payload)))) == 1
    assert sum(counters(decoder).errors.values()) == 0
    assert len(decode(decoder, payload + b"\x00\x01")) == 1
    assert counters(decoder).errors["trailing_bytes"] == 1


def test_hostile_flowsets_are_counted_and_never_raise() -> None:
    """Lengths that lie and bad templates are counted by reason."""
    decoder = FlowDecoder(DecoderConfig(max_template_fields=4))
    rec = ipv4_record(ip(10, 0, 0, 1), ip(10, 0, 0, 2), 1, 2, 100)
    cases = {
        "set_too_short": header(1) + struct.pack(">HH", 256, 2) + b"\x01" * 10,
        "set_beyond_datagram": header(1) + struct.pack(">HH", 256, 500) + rec,
        "template_too_many_fields": header(1)
        + flowset(0, template_record(300, IPV4_FIELDS)),
        "template_zero_length_field": header(1)
        + flowset(0, template_record(301, [(8, 4), (1, 0)])),
        "template_truncated": header(1)
        + struct.pack(">HHHH", 0, 12, 302, 9)
        + struct.pack(">HH", 8, 4),
        "template_id_reserved": header(1) + flowset(0, template_record(12, [(8, 4)])),
        "reserved_set_id": header(1) + flowset(7, b"\x00" * 8),
        "options_template_bad_length": header(1)
        + flowset(1, struct.pack(">HHH", 303, 3, 4) + b"\x00" * 8),
    }
    for reason, payload in cases.items():
        assert len(decode(decoder, payload)) == 0, reason
        assert counters(decoder).errors[reason] == 1, reason
    assert counters(decoder).errors["decoder_bug"] == 0


def test_template_flood_is_bounded() -> None:
    """Past max_templates_per_exporter new templates are refused and
    counted; known ones can still be redefined."""
    decoder = FlowDecoder(DecoderConfig(max_templates_per_exporter=2))
    templates = b"".join(template_record(256 + i, [(1, 4)]) for i in range(5))
    decode(decoder, header(5) + flowset(0, templates))
    c = counters(decoder)
    assert c.templates == 2
    assert c.errors["template_limit"] == 3
    decode(decoder, header(1, seq=1) + flowset(0, template_record(257, [(2, 4)])))
    assert c.templates == 2
    assert c.errors["template_limit"] == 3


def test_two_exporters_keep_their_own_templates() -> None:
    """The same template id from two exporters (and from two source ids of
    one exporter) are different templates."""
    decoder = FlowDecoder()
    other = bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 8])
    a = (
        header(2)
        + flowset(0, template_record(256, [(1, 4)]))
        + flowset(256, struct.pack(">I", 1))
    )
    b = (
        header(2)
        + flowset(0, template_record(256, [(2, 4)]))
        + flowset(256, struct.pack(">I", 2))
    )
    ra = decoder.decode(a, EXPORTER, PORT, 0)
    rb = decoder.decode(b, other, PORT, 0)
    again = decoder.decode(
        header(1, seq=1) + flowset(256, struct.pack(">I", 3)), EXPORTER, PORT, 0
    )
    assert (int(ra["bytes"][0]), int(rb["packets"][0]), int(again["bytes"][0])) == (
        1,
        2,
        3,
    )
    other_domain = header(1, seq=2, source_id=43) + flowset(256, struct.pack(">I", 4))
    assert len(decoder.decode(other_domain, EXPORTER, PORT, 0)) == 0  # held
    assert counters(decoder).pending_held == 1


def test_ipv6_template_and_both_families() -> None:
    """IPv6 addresses, next hop and masks; a template with both families
    takes the non-zero one per record and sets ip_version."""
    fields = [(8, 4), (12, 4), (27, 16), (28, 16), (62, 16), (9, 1), (29, 1)]
    v6_src = bytes.fromhex("20010db8000000000000000000000001")
    v6_dst = bytes.fromhex("20010db8000000000000000000000002")
    v6_hop = bytes.fromhex("fe800000000000000000000000000001")
    v4_record = (
        struct.pack(">II", ip(10, 0, 0, 1), ip(10, 0, 0, 2)) + bytes(48) + b"\x18\x00"
    )
    v6_record = bytes(8) + v6_src + v6_dst + v6_hop + b"\x00\x40"
    payload = header(2) + flowset(0, template_record(262, fields))
    payload += flowset(262, v4_record + v6_record)
    r4, r6 = decode(FlowDecoder(), payload)
    assert address_text(r4["src_addr"].tobytes()) == "10.0.0.1"
    assert (int(r4["ip_version"]), int(r4["src_mask"])) == (4, 24)
    assert r6["src_addr"].tobytes() == v6_src
    assert r6["dst_addr"].tobytes() == v6_dst
    assert r6["next_hop"].tobytes() == v6_hop
    assert (int(r6["ip_version"]), int(r6["src_mask"])) == (6, 64)


def test_icmp_type_code_goes_to_dst_port() -> None:
    """ICMP_TYPE (32) fills dst_port for ICMP flows whose port is zero."""
    fields = [(4, 1), (11, 2), (32, 2)]
    body = struct.pack(">BHH", 1, 0, 0x0800) + struct.pack(">BHH", 17, 53, 0x0303)
    payload = header(2) + flowset(0, template_record(263, fields)) + flowset(263, body)
    records = decode(FlowDecoder(), payload)
    assert records["dst_port"].tolist() == [0x0800, 53]


def test_v9_variable_length_field() -> None:
    """A v9 field of length 65535 (H3C) is read as IPFIX variable length:
    the fields after it are still found."""
    fields = [(8, 4), (82, 65535), (1, 4)]
    body = struct.pack(">I", ip(10, 0, 0, 1)) + b"\x03eth" + struct.pack(">I", 77)
    body += (
        struct.pack(">I", ip(10, 0, 0, 2)) + b"\xff\x00\x02ab" + struct.pack(">I", 78)
    )
    payload = header(2) + flowset(0, template_record(264, fields)) + flowset(264, body)
    records = decode(FlowDecoder(), payload)
    assert records["bytes"].tolist() == [77, 78]
    assert [address_text(a.tobytes()) for a in records["src_addr"]] == [
        "10.0.0.1",
        "10.0.0.2",
    ]


@pytest.mark.parametrize("by_records", [False, True])
def test_v9_sequence_counts_datagrams_or_records(by_records: bool) -> None:
    """v9 sequence numbers count datagrams (RFC 3954); an exporter whose
    numbers advance by the records of the previous datagram is followed in
    records.  Either way a missing datagram is one gap."""
    decoder = FlowDecoder()
    template = header(1, seq=0) + flowset(0, template_record(256, [(1, 4)]))
    three = flowset(256, struct.pack(">III", 1, 2, 3))
    decode(decoder, template)
    seq = 1
    for i in range(6):
        if i == 4:
            seq += 3 if by_records else 1  # datagram i == 4 is lost
            continue
        decode(decoder, header(1, seq=seq) + three)
        seq += 3 if by_records else 1
    c = counters(decoder)
    assert c.sequence_gaps == 1
    assert c.estimated_lost == (3 if by_records else 1)


def test_reordered_capture_counts_missing_datagrams_once(captures_dir: Path) -> None:
    """nf9-cisco-reordered-sequence: the template datagram comes first with
    the highest number, nine older datagrams follow late.  Late datagrams
    are out of order but not lost; the loss is the datagram numbers above
    the first one that never arrive (counted from the headers here)."""
    datagrams = read_datagrams(captures_dir / "nf9-cisco-reordered-sequence.pcap")
    seqs = [struct.unpack_from(">I", d.payload, 12)[0] for d in datagrams]
    first = seqs[0]
    missing = set(range(first, max(seqs) + 1)) - set(seqs)
    late = sum(1 for s in seqs[1:] if s < first)
    decoder = FlowDecoder()
    for d in datagrams:
        decoder.decode(d.payload, d.src, d.src_port, d.time_ms)
    totals = decoder.stats.totals()
    assert totals.estimated_lost == len(missing)
    assert late == 9
    # One gap event per jump over missing numbers, plus one per late datagram.
    jumps = sum(
        1
        for a, b in itertools.pairwise(sorted(s for s in seqs if s >= first))
        if b > a + 1
    )
    assert totals.sequence_gaps == jumps + late


def test_periodic_resends_count_and_a_changed_one_is_learnt() -> None:
    """A template set re-sent byte for byte (as exporters do every minute)
    counts its templates as received; the same set after the exporter
    redefined one template in another set is read again, so the data that
    follows decodes with the set's own definitions."""
    decoder = FlowDecoder()
    templates = flowset(
        0, template_record(300, [(1, 4)]) + template_record(301, [(2, 4)])
    )
    for seq in range(3):
        data = flowset(300, struct.pack(">I", 10 + seq))
        data += flowset(301, struct.pack(">I", 20 + seq))
        records = decode(decoder, header(4, seq=seq) + templates + data)
        assert records["bytes"].tolist() == [10 + seq, 0]
        assert records["packets"].tolist() == [0, 20 + seq]
    assert counters(decoder).templates_received == 6
    redefine = flowset(0, template_record(300, [(2, 4)]))
    decode(decoder, header(1, seq=3) + redefine)
    data = flowset(300, struct.pack(">I", 77))
    records = decode(decoder, header(3, seq=4) + templates + data)
    # 300 is octets again: the re-sent set was read, not skipped.
    assert (records["bytes"].tolist(), records["packets"].tolist()) == ([77], [0])
    assert counters(decoder).templates_received == 6 + 1 + 2
    assert counters(decoder).templates == 2


def test_options_resent_announce_again() -> None:
    """Options data re-sent unchanged announces its rate again: sampler 1
    (1-in-100, options template 257) and sampler 2 (1-in-1000, template
    258) take turns with the same bytes each time, and records without a
    sampler id take the rate announced last each time."""
    decoder = FlowDecoder()
    options = flowset(
        1,
        options_template_record(257, [(1, 4)], [(48, 1), (50, 4)])
        + options_template_record(258, [(1, 4)], [(48, 1), (50, 4)]),
    )
    templates = flowset(0, template_record(259, IPV4_FIELDS))
    rec = ipv4_record(ip(10, 0, 0, 1), ip(10, 0, 0, 2), 1, 2, 100)
    rates = []
    for seq in range(6):
        if seq % 2 == 0:
            announce = flowset(257, struct.pack(">IBI", 0, 1, 100))
        else:
            announce = flowset(258, struct.pack(">IBI", 0, 2, 1000))
        payload = header(4, seq=seq) + options + announce + templates
        payload += flowset(259, rec)
        rates += decode(decoder, payload)["sampling_rate"].tolist()
    assert rates == [100, 1000] * 3
    assert counters(decoder).options_records == 6
