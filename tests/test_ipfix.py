"""IPFIX (RFC 7011) decoding with hand-built messages.

Each test writes the message with struct.pack and computes the expected
values from what it wrote.
"""

from __future__ import annotations

import struct

import numpy as np

from edge_agent.flows.counters import ExporterCounters
from edge_agent.flows.decoder import DecoderConfig, FlowDecoder
from edge_agent.flows.schema import ExportProtocol, Field, address_text

EXPORTER = bytes(10) + b"\xff\xff" + bytes([203, 0, 113, 9])
PORT = 4739
EXPORT_TIME = 1_720_000_000
DOMAIN = 7
NTP_OFFSET = 2_208_988_800


def message(*sets: bytes, seq: int = 0, domain: int = DOMAIN) -> bytes:
    body = b"".join(sets)
    return struct.pack(">HHIII", 10, 16 + len(body), EXPORT_TIME, seq, domain) + body


def ipfix_set(set_id: int, body: bytes, pad_to: int = 1) -> bytes:
    length = 4 + len(body)
    padding = (-length) % pad_to
    return struct.pack(">HH", set_id, length + padding) + body + b"\x00" * padding


def field(ie: int, length: int, pen: int = 0) -> bytes:
    if pen:
        return struct.pack(">HHI", ie | 0x8000, length, pen)
    return struct.pack(">HH", ie, length)


def template(template_id: int, *fields: bytes) -> bytes:
    return struct.pack(">HH", template_id, len(fields)) + b"".join(fields)


def options_template(template_id: int, scope_count: int, *fields: bytes) -> bytes:
    return struct.pack(">HHH", template_id, len(fields), scope_count) + b"".join(fields)


def ip(a: int, b: int, c: int, d: int) -> int:
    return a << 24 | b << 16 | c << 8 | d


def decode(decoder: FlowDecoder, payload: bytes, received_ms: int = 0) -> np.ndarray:
    return decoder.decode(payload, EXPORTER, PORT, received_ms)


def counters(decoder: FlowDecoder) -> ExporterCounters:
    return decoder.stats.exporter(EXPORTER, PORT)


BASIC = (field(8, 4), field(12, 4), field(1, 8), field(2, 8))


def basic_record(octets: int, packets: int = 1) -> bytes:
    return struct.pack(">IIQQ", ip(10, 0, 0, 1), ip(10, 0, 0, 2), octets, packets)


def test_template_and_data() -> None:
    """Template set 2 then a data set: fields decoded, protocol IPFIX,
    observation domain as the domain."""
    decoder = FlowDecoder()
    payload = message(
        ipfix_set(2, template(256, *BASIC)),
        ipfix_set(256, basic_record(1500, 3) + basic_record(40)),
    )
    records = decode(decoder, payload)
    assert records["bytes"].tolist() == [1500, 40]
    assert records["packets"].tolist() == [3, 1]
    assert int(records["export_proto"][0]) == ExportProtocol.IPFIX
    assert int(records["domain"][0]) == DOMAIN
    assert address_text(records["src_addr"][0].tobytes()) == "10.0.0.1"
    assert not int(records["present"][0]) & Field.TIME_START


def test_template_withdrawal() -> None:
    """A template record with field count 0 withdraws it: later data for
    that id is held (not decoded with the old template) until redefined."""
    decoder = FlowDecoder()
    decode(decoder, message(ipfix_set(2, template(256, *BASIC)), seq=0))
    c = counters(decoder)
    assert c.templates == 1
    withdraw = message(ipfix_set(2, struct.pack(">HH", 256, 0)), seq=0)
    assert len(decode(decoder, withdraw)) == 0
    assert (c.templates, c.templates_withdrawn) == (0, 1)
    assert len(decode(decoder, message(ipfix_set(256, basic_record(9)), seq=0))) == 0
    assert c.pending_held == 1
    redefined = message(ipfix_set(2, template(256, field(1, 4))), seq=1)
    records = decode(decoder, redefined)
    # The held set (24 bytes) read with the new 4-byte template: 6 records;
    # the first is bytes 0-3 of the held record: 10.0.0.1 as a number.
    assert len(records) == 6
    assert int(records["bytes"][0]) == ip(10, 0, 0, 1)
    assert c.pending_decoded == 1
    unknown = message(ipfix_set(2, struct.pack(">HH", 999, 0)), seq=7)
    decode(decoder, unknown)
    assert c.errors["withdrawal_unknown_template"] == 1


def test_withdraw_all_data_or_options_templates() -> None:
    """Template id 2 with count 0 in set 2 withdraws every data template of
    the domain; id 3 in set 3 every options template; the other kind and
    other domains stay."""
    decoder = FlowDecoder()
    setup = message(
        ipfix_set(2, template(256, *BASIC) + template(257, field(1, 4))),
        ipfix_set(3, options_template(258, 1, field(302, 4), field(305, 4))),
    )
    decode(decoder, setup)
    decode(decoder, message(ipfix_set(2, template(256, field(1, 4))), domain=8))
    c = counters(decoder)
    assert c.templates == 4
    decode(decoder, message(ipfix_set(2, struct.pack(">HH", 2, 0)), seq=0))
    assert (c.templates, c.templates_withdrawn) == (2, 2)
    assert len(decode(decoder, message(ipfix_set(256, basic_record(1))))) == 0
    assert (
        len(decode(decoder, message(ipfix_set(256, b"\x00\x00\x00\x05"), domain=8)))
        == 1
    )
    decode(decoder, message(ipfix_set(3, struct.pack(">HH", 3, 0))))
    assert (c.templates, c.templates_withdrawn) == (1, 3)


def test_variable_length_fields() -> None:
    """Variable-length fields with the 1-byte and the 3-byte (255 + u16)
    length prefix are skipped; the fixed fields around them are decoded."""
    decoder = FlowDecoder()
    tmpl = template(300, field(8, 4), field(82, 65535), field(1, 4), field(94, 65535))
    short = (
        struct.pack(">I", ip(10, 0, 0, 1))
        + b"\x04eth0"
        + struct.pack(">I", 11)
        + b"\x00"
    )
    long_text = b"x" * 300
    long = (
        struct.pack(">I", ip(10, 0, 0, 2))
        + b"\xff"
        + struct.pack(">H", len(long_text))
        + long_text
        + struct.pack(">I", 22)
        + b"\x02ok"
    )
    payload = message(ipfix_set(2, tmpl), ipfix_set(300, short + long, pad_to=4))
    records = decode(decoder, payload)
    assert records["bytes"].tolist() == [11, 22]
    assert [address_text(a.tobytes()) for a in records["src_addr"]] == [
        "10.0.0.1",
        "10.0.0.2",
    ]
    assert sum(counters(decoder).errors.values()) == 0


def test_variable_length_overrun_is_counted() -> None:
    """A length prefix pointing past the set drops that record, keeps the
    complete ones and counts record_overrun."""
    decoder = FlowDecoder()
    tmpl = template(301, field(1, 4), field(82, 65535))
    body = struct.pack(">I", 5) + b"\x01a" + struct.pack(">I", 6) + b"\x30short"
    records = decode(decoder, message(ipfix_set(2, tmpl), ipfix_set(301, body)))
    assert records["bytes"].tolist() == [5]
    assert counters(decoder).errors["record_overrun"] == 1


def test_enterprise_fields_are_skipped_by_length() -> None:
    """Enterprise-specific fields (PEN bit set), even with a standard
    element number, are not read as that element and are skipped."""
    decoder = FlowDecoder()
    tmpl = template(
        302,
        field(1, 4),
        field(1, 4, pen=29305),  # reverseOctetDeltaCount (RFC 5103)
        field(7, 2),
        field(999, 3, pen=9),
        field(11, 2),
    )
    body = (
        struct.pack(">IIH", 100, 200, 1111) + b"\x01\x02\x03" + struct.pack(">H", 2222)
    )
    r = decode(decoder, message(ipfix_set(2, tmpl), ipfix_set(302, body)))[0]
    assert (int(r["bytes"]), int(r["src_port"]), int(r["dst_port"])) == (
        100,
        1111,
        2222,
    )


def test_reduced_size_counters() -> None:
    """octetDeltaCount/packetDeltaCount (u64) in 1, 2, 4 and 8 bytes, and
    odd widths, all decode to the same values."""
    for width in (1, 2, 3, 4, 5, 6, 7, 8):
        octets = (
            200 if width == 1 else 0xABCD if width == 2 else (1 << (8 * width - 1)) + 5
        )
        tmpl = template(310, field(1, width), field(2, 1))
        body = octets.to_bytes(width, "big") + b"\x07"
        r = decode(FlowDecoder(), message(ipfix_set(2, tmpl), ipfix_set(310, body)))[0]
        assert (int(r["bytes"]), int(r["packets"])) == (octets, 7), width


def test_message_length_is_checked_against_the_datagram() -> None:
    """A message longer than its datagram is rejected; bytes after the
    message are ignored and counted; a length below the header is
    rejected."""
    decoder = FlowDecoder()
    good = message(ipfix_set(2, template(256, *BASIC)), ipfix_set(256, basic_record(5)))
    assert len(decode(decoder, good[:-4])) == 0
    assert counters(decoder).errors["message_length_beyond_datagram"] == 1
    assert len(decode(decoder, good + b"\xde\xad\xbe\xef")) == 1
    assert counters(decoder).errors["datagram_longer_than_message"] == 1
    tiny = struct.pack(">HHIII", 10, 8, EXPORT_TIME, 0, DOMAIN)
    assert len(decode(decoder, tiny)) == 0
    assert counters(decoder).errors["message_length_too_small"] == 1


def test_every_message_of_a_datagram_is_decoded() -> None:
    """A datagram of three messages back to back (template and 2 records in
    domain 7, 3 records in domain 7, 1 record in domain 9 with its own
    template): all 6 records come out in order with their own domain, the
    sequence numbers follow per domain, nothing is counted wrong; garbage
    after the messages is counted, a message running past the datagram is
    rejected after the ones before it are decoded."""
    tmpl = ipfix_set(2, template(256, *BASIC))
    first = message(tmpl, ipfix_set(256, basic_record(1) + basic_record(2)), seq=10)
    second = message(
        ipfix_set(256, basic_record(3) + basic_record(4) + basic_record(5)), seq=12
    )
    third = message(tmpl, ipfix_set(256, basic_record(6)), seq=0, domain=9)
    decoder = FlowDecoder()
    out = decode(decoder, first + second + third)
    assert out["bytes"].tolist() == [1, 2, 3, 4, 5, 6]
    assert out["domain"].tolist() == [7, 7, 7, 7, 7, 9]
    c = counters(decoder)
    assert c.records == 6
    assert c.templates_received == 2
    assert sum(c.errors.values()) == 0
    assert c.sequence_gaps == 0
    # The next datagram carries on both domains' sequences: 15 and 1.
    follow = message(ipfix_set(256, basic_record(7)), seq=15) + message(
        ipfix_set(256, basic_record(8)), seq=1, domain=9
    )
    assert decode(decoder, follow + b"\x01" * 20)["bytes"].tolist() == [7, 8]
    assert c.sequence_gaps == 0
    assert c.errors["datagram_longer_than_message"] == 1
    cut = message(ipfix_set(256, basic_record(9)), seq=16)
    assert decode(decoder, first + cut[:-1])["bytes"].tolist() == [1, 2]
    assert c.errors["message_length_beyond_datagram"] == 1


def test_bad_sets_are_counted() -> None:
    """Set lengths below 4 or beyond the message, reserved set ids and
    options templates without scope are counted by reason."""
    decoder = FlowDecoder()
    cases = {
        "set_too_short": message(struct.pack(">HH", 256, 3) + b"\x00" * 8),
        "set_beyond_message": message(struct.pack(">HH", 256, 64) + b"\x00" * 8),
        "reserved_set_id": message(ipfix_set(5, b"\x00" * 4)),
        "options_template_no_scope": message(
            ipfix_set(3, options_template(400, 0, field(305, 4)))
        ),
        "template_truncated": message(
            ipfix_set(2, struct.pack(">HH", 401, 3) + field(1, 4))
        ),
    }
    for reason, payload in cases.items():
        assert len(decode(decoder, payload)) == 0, reason
        assert counters(decoder).errors[reason] == 1, reason


def test_time_elements() -> None:
    """flowStart/End Seconds, Milliseconds, and NTP Micro/Nanoseconds give
    absolute ms; flowDurationMilliseconds gives the missing end;
    flowStart/EndDeltaMicroseconds count back from the export time."""
    start_s = EXPORT_TIME - 60
    frac = int(0.25 * (1 << 32))  # .250 s
    ntp = (start_s + NTP_OFFSET) << 32 | frac
    tmpl = template(
        320,
        field(150, 4),  # flowStartSeconds
        field(153, 8),  # flowEndMilliseconds
    )
    body = struct.pack(">IQ", start_s, (EXPORT_TIME - 5) * 1000 + 7)
    r = decode(FlowDecoder(), message(ipfix_set(2, tmpl), ipfix_set(320, body)))[0]
    assert (int(r["time_start"]), int(r["time_end"])) == (
        start_s * 1000,
        (EXPORT_TIME - 5) * 1000 + 7,
    )
    for ie in (154, 156):  # micro, nano: NTP format
        tmpl = template(321, field(ie, 8), field(161, 4))
        body = struct.pack(">QI", ntp, 1500)
        r = decode(FlowDecoder(), message(ipfix_set(2, tmpl), ipfix_set(321, body)))[0]
        assert int(r["time_start"]) == start_s * 1000 + 250, ie
        assert int(r["time_end"]) == start_s * 1000 + 250 + 1500, ie
        assert int(r["present"]) & (Field.TIME_START | Field.TIME_END) == (
            Field.TIME_START | Field.TIME_END
        )
    tmpl = template(322, field(158, 4), field(159, 4))
    body = struct.pack(">II", 3_000_000, 500_000)  # 3 s and 0.5 s before export
    r = decode(FlowDecoder(), message(ipfix_set(2, tmpl), ipfix_set(322, body)))[0]
    assert (int(r["time_start"]), int(r["time_end"])) == (
        EXPORT_TIME * 1000 - 3000,
        EXPORT_TIME * 1000 - 500,
    )


def test_sysuptime_elements_need_system_init_time() -> None:
    """flowStart/EndSysUpTime (22/21) are relative to
    systemInitTimeMilliseconds (160): from the record, or announced in
    options data; without it the times are unknown (bits clear)."""
    init = (EXPORT_TIME - 3600) * 1000
    tmpl = template(330, field(22, 4), field(21, 4), field(1, 4))
    body = struct.pack(">III", 1000, 2000, 9)
    unknown = decode(FlowDecoder(), message(ipfix_set(2, tmpl), ipfix_set(330, body)))[
        0
    ]
    assert not int(unknown["present"]) & (Field.TIME_START | Field.TIME_END)
    assert int(unknown["time_start"]) == 0

    decoder = FlowDecoder()
    options = options_template(331, 1, field(149, 4), field(160, 8))
    payload = message(
        ipfix_set(3, options),
        ipfix_set(331, struct.pack(">IQ", DOMAIN, init)),
        ipfix_set(2, tmpl),
        ipfix_set(330, body),
    )
    r = decode(decoder, payload)[0]
    assert (int(r["time_start"]), int(r["time_end"])) == (init + 1000, init + 2000)
    assert counters(decoder).options_records == 1

    in_record = template(332, field(160, 8), field(22, 4), field(21, 4))
    body = struct.pack(">QII", init + 5, 1, 2)
    r = decode(FlowDecoder(), message(ipfix_set(2, in_record), ipfix_set(332, body)))[0]
    assert (int(r["time_start"]), int(r["time_end"])) == (init + 6, init + 7)


def test_options_sampling_rates() -> None:
    """Options data announce rates by selector: population/size (309/310),
    else (interval + space) / interval (305/306); data records naming the
    selector (302) get its rate, others the domain's last one."""
    decoder = FlowDecoder()
    options = options_template(
        340,
        1,
        field(302, 4),
        field(305, 4),
        field(306, 4),
        field(309, 4),
        field(310, 4),
    )
    announce = struct.pack(">IIIII", 1, 1, 9, 0, 0)  # selector 1: 1 in 10
    announce += struct.pack(">IIIII", 2, 0, 0, 3, 3000)  # selector 2: 1 in 1000
    data = template(341, field(1, 4), field(302, 4))
    payload = message(
        ipfix_set(3, options),
        ipfix_set(340, announce),
        ipfix_set(2, data + template(342, field(1, 4))),
        ipfix_set(341, struct.pack(">IIII", 5, 1, 6, 2)),
        ipfix_set(342, struct.pack(">I", 7)),
    )
    records = decode(decoder, payload)
    assert records["sampling_rate"].tolist() == [10, 1000, 1000]
    assert records["sampler_id"].tolist() == [1, 2, 0]
    assert counters(decoder).options_records == 2
    assert decoder.sampling.lookup(EXPORTER, DOMAIN, 1) == 10


def test_rate_change_within_a_batch_applies_from_then_on() -> None:
    """decode_many: records before a new announcement keep the old rate,
    records after it get the new one (same as decoding one by one)."""
    options = options_template(350, 1, field(302, 4), field(305, 4), field(306, 4))
    data = template(351, field(1, 4), field(302, 4))
    setup = message(ipfix_set(3, options), ipfix_set(2, data), seq=0)
    one = struct.pack(">II", 1, 4)
    datagrams = [
        message(ipfix_set(350, struct.pack(">III", 4, 1, 99))),
        message(ipfix_set(351, one)),
        message(ipfix_set(350, struct.pack(">III", 4, 1, 49))),
        message(ipfix_set(351, one)),
    ]
    batched = FlowDecoder()
    decode(batched, setup)
    many = batched.decode_many((d, EXPORTER, PORT, 0) for d in datagrams)
    assert many["sampling_rate"].tolist() == [100, 50]


def test_ipfix_sequence_counts_data_records() -> None:
    """IPFIX sequence numbers count data records (options data included):
    the next message's number is this one's plus its records."""
    decoder = FlowDecoder()
    decode(decoder, message(ipfix_set(2, template(256, *BASIC)), seq=100))
    decode(decoder, message(ipfix_set(256, basic_record(1) * 3), seq=100))
    decode(decoder, message(ipfix_set(256, basic_record(1) * 2), seq=103))
    c = counters(decoder)
    assert (c.sequence_gaps, c.estimated_lost) == (0, 0)
    decode(decoder, message(ipfix_set(256, basic_record(1)), seq=110))
    assert (c.sequence_gaps, c.estimated_lost) == (1, 5)
    decode(decoder, message(ipfix_set(256, basic_record(1) * 5), seq=105))  # late
    assert (c.sequence_gaps, c.estimated_lost) == (2, 0)


def test_srv6_record_with_both_families_takes_the_first() -> None:
    """A record with non-zero IPv6 (first in the template) and IPv4 addresses
    (SRv6 outer and inner headers) reports the IPv6 ones, like every
    other element the template repeats (first occurrence)."""
    v6_src = bytes.fromhex("20010db8009100000000000000000001")
    v6_dst = bytes.fromhex("20010db80090e0020000000000000000")
    tmpl = template(
        360,
        field(27, 16),
        field(28, 16),
        field(4, 1),
        field(8, 4),
        field(12, 4),
        field(4, 1),
    )
    body = (
        v6_src
        + v6_dst
        + b"\x04"
        + struct.pack(">II", ip(192, 0, 2, 13), ip(192, 0, 2, 12))
        + b"\x11"
    )
    r = decode(FlowDecoder(), message(ipfix_set(2, tmpl), ipfix_set(360, body)))[0]
    assert r["src_addr"].tobytes() == v6_src
    assert r["dst_addr"].tobytes() == v6_dst
    assert (int(r["protocol"]), int(r["ip_version"])) == (4, 6)


def test_set_padding_is_not_a_record() -> None:
    """Padding shorter than a record at the end of a data set, and padding
    in a template set, are ignored."""
    decoder = FlowDecoder()
    payload = message(
        ipfix_set(2, template(256, *BASIC), pad_to=16),
        ipfix_set(256, basic_record(1) + basic_record(2), pad_to=32),
    )
    assert decode(decoder, payload)["bytes"].tolist() == [1, 2]
    assert sum(counters(decoder).errors.values()) == 0


def test_template_size_bound() -> None:
    """A template with more fields than max_template_fields is refused."""
    decoder = FlowDecoder(DecoderConfig(max_template_fields=3))
    decode(decoder, message(ipfix_set(2, template(256, *BASIC))))
    assert counters(decoder).errors["template_too_many_fields"] == 1
    assert counters(decoder).templates == 0


def test_exporter_normalisation_shares_templates() -> None:
    """A template learnt from the IPv4-mapped address applies to data from
    the same exporter given as 4 bytes (another socket family)."""
    decoder = FlowDecoder()
    decode(decoder, message(ipfix_set(2, template(256, *BASIC))))
    records = decoder.decode(
        message(ipfix_set(256, basic_record(3))), bytes([203, 0, 113, 9]), PORT, 0
    )
    assert records["bytes"].tolist() == [3]
    assert records["exporter"][0].tobytes() == EXPORTER
