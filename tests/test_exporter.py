"""The demo's IPFIX exporter, decoded by two decoders.

Records are real CTU-13 scenario 6 flows thinned 1:100 (the project's copy
in data/), plus hand-made IPv6 and ICMP records.  The messages are decoded
by the project's FlowDecoder and, independently, by the ``netflow`` PyPI
package (dev extra); both must give back the values that went in.  Message
sizes, sequence numbers and template timing are checked against figures
worked out by hand from RFC 7011 and the template layout.
"""

from __future__ import annotations

import ipaddress
import struct

import netflow
import numpy as np
import pytest

from cloud.local.exporter import ExporterConfig, IpfixExporter
from cloud.training import ctu13
from edge_agent.flows.decoder import FlowDecoder
from edge_agent.flows.schema import (
    ExportProtocol,
    Field,
    address_bytes,
    address_text,
    empty_records,
)

EXPORTER = address_bytes("192.0.2.10")
EXPORT_TIME_S = 1_313_481_706
#: IPv4 data record: 8+8 (times) + 4+4 (addresses) + 2+2 (ports)
#: + 2 (ICMP type/code) + 1 (protocol) + 1 (ToS) + 2 (flags) + 8+8 (counters).
V4_RECORD_BYTES = 50
#: IPv6: the same with 16-byte addresses.
V6_RECORD_BYTES = 74


@pytest.fixture(scope="module")
def ctu_records() -> np.ndarray:
    """Real flows: the first CTU-13 slice file thinned 1:100 (seed 6)."""
    records, _labels = ctu13.sampled_records(100, 6, slices=[0])
    return records


def _handmade() -> np.ndarray:
    """Two IPv6 flows (TCP, ICMPv6 echo) and an IPv4 ICMP unreachable."""
    rec = empty_records(3)
    rec["time_start"] = [1_600_000_000_000, 1_600_000_000_500, 1_600_000_001_000]
    rec["time_end"] = [1_600_000_059_999, 1_600_000_000_500, 1_600_000_002_000]
    rec["src_addr"] = [
        address_bytes("2001:db8::1"),
        address_bytes("2001:db8::2"),
        address_bytes("198.51.100.7"),
    ]
    rec["dst_addr"] = [
        address_bytes("2001:db8:ffff::80"),
        address_bytes("2001:db8::1"),
        address_bytes("203.0.113.9"),
    ]
    rec["ip_version"] = [6, 6, 4]
    rec["protocol"] = [6, 58, 1]
    rec["src_port"] = [51_000, 0, 0]
    # ICMPv6 echo request 128/0, ICMP port unreachable 3/3 (type*256+code).
    rec["dst_port"] = [443, 128 * 256, 3 * 256 + 3]
    rec["tcp_flags"] = [0x1B, 0, 0]
    rec["tos"] = [0x28, 0, 0xB8]
    rec["bytes"] = [2**40 + 5, 64, 56]
    rec["packets"] = [3, 1, 1]
    rec["sampling_rate"] = 100
    return rec


def _decode(messages: list[bytes], decoder: FlowDecoder | None = None) -> np.ndarray:
    decoder = decoder or FlowDecoder()
    return decoder.decode_many([(m, EXPORTER, 4739, 0) for m in messages])


def _same_columns(got: np.ndarray, want: np.ndarray) -> None:
    for name in (
        "time_start",
        "time_end",
        "src_addr",
        "dst_addr",
        "src_port",
        "dst_port",
        "protocol",
        "tos",
        "tcp_flags",
        "bytes",
        "packets",
        "ip_version",
    ):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_flow_decoder_reads_back_real_records(ctu_records: np.ndarray) -> None:
    """Every CTU record comes back from the FlowDecoder with the same values,
    the rate learnt from the options record, and no error or gap."""
    exporter = IpfixExporter(ExporterConfig(observation_domain=7, sampling_rate=100))
    messages = exporter.encode(ctu_records, EXPORT_TIME_S)
    decoder = FlowDecoder()
    got = _decode(messages, decoder)
    assert got.shape == ctu_records.shape
    _same_columns(got, ctu_records)
    assert (got["sampling_rate"] == 100).all()
    assert (got["export_proto"] == ExportProtocol.IPFIX).all()
    assert (got["domain"] == 7).all()
    assert (got["present"] & Field.TIME_END).all()
    counters = decoder.stats.exporter(EXPORTER, 4739)
    assert not counters.errors
    assert counters.sequence_gaps == 0
    assert counters.options_records == 1
    assert counters.templates == 3


def test_flow_decoder_reads_back_ipv6_and_icmp() -> None:
    """IPv6 and ICMP records survive: ICMP type/code goes out in its own
    element and comes back in dst_port, counters beyond 32 bits stay exact."""
    records = _handmade()
    got = _decode(IpfixExporter().encode(records, EXPORT_TIME_S))
    # IPv4 messages are sent first, then IPv6 ones.
    want = records[[2, 0, 1]]
    _same_columns(got, want)
    assert got["bytes"][1] == 2**40 + 5


def test_independent_decoder_agrees(ctu_records: np.ndarray) -> None:
    """The netflow package decodes the same values, finds the sampling
    options record, and sees header sequence numbers that count the data
    records sent before each message."""
    records = np.concatenate([ctu_records[:500], _handmade()])
    exporter = IpfixExporter(ExporterConfig(observation_domain=3, sampling_rate=100))
    messages = exporter.encode(records, EXPORT_TIME_S)
    templates: dict[str, dict[int, object]] = {"netflow": {}, "ipfix": {}}
    flows: list[dict[str, int | str]] = []
    options: list[dict[str, int]] = []
    expected_sequence = 0
    for message in messages:
        packet = netflow.parse_packet(message, templates)
        assert packet.header.version == 10
        assert packet.header.sequence_number == expected_sequence
        assert packet.header.export_uptime == EXPORT_TIME_S  # the export time
        for flow in packet.flows:
            data = dict(flow.data)
            if "samplingInterval" in data:
                options.append(data)
            else:
                flows.append(data)
        expected_sequence += len(packet.flows)
    assert options == [
        {"observationDomainId": 3, "samplingInterval": 100, "samplingAlgorithm": 2}
    ]
    assert len(flows) == records.size
    v4 = records[records["ip_version"] == 4]
    v6 = records[records["ip_version"] == 6]
    for flow, record in zip(flows, [*v4, *v6], strict=True):
        if record["ip_version"] == 4:
            src = str(ipaddress.IPv4Address(flow["sourceIPv4Address"]))
            dst = str(ipaddress.IPv4Address(flow["destinationIPv4Address"]))
            icmp = flow["icmpTypeCodeIPv4"]
        else:
            src = str(ipaddress.IPv6Address(flow["sourceIPv6Address"]))
            dst = str(ipaddress.IPv6Address(flow["destinationIPv6Address"]))
            icmp = flow["icmpTypeCodeIPv6"]
        assert src == address_text(record["src_addr"])
        assert dst == address_text(record["dst_addr"])
        assert flow["flowStartMilliseconds"] == record["time_start"]
        assert flow["flowEndMilliseconds"] == record["time_end"]
        assert flow["protocolIdentifier"] == record["protocol"]
        assert flow["tcpControlBits"] == record["tcp_flags"]
        assert flow["ipClassOfService"] == record["tos"]
        assert flow["octetDeltaCount"] == record["bytes"]
        assert flow["packetDeltaCount"] == record["packets"]
        if record["protocol"] in (1, 58):
            assert (icmp, flow["destinationTransportPort"]) == (record["dst_port"], 0)
        else:
            assert flow["sourceTransportPort"] == record["src_port"]
            assert flow["destinationTransportPort"] == record["dst_port"]
            assert icmp == 0


def test_message_sizes_follow_the_template_layout(ctu_records: np.ndarray) -> None:
    """Data messages hold as many records as fit in max_message_bytes:
    (1400 - 16 header - 4 set header) // 50 = 27 IPv4 records."""
    exporter = IpfixExporter(ExporterConfig(max_message_bytes=1400))
    records = ctu_records[:100]
    messages = exporter.encode(records, EXPORT_TIME_S)
    data = messages[1:]  # the first one carries the templates
    per_message = (1400 - 16 - 4) // V4_RECORD_BYTES
    assert per_message == 27
    counts = [(len(m) - 20) // V4_RECORD_BYTES for m in data]
    assert counts == [27, 27, 27, 19]
    for m in data:
        version, length = struct.unpack_from(">HH", m)
        assert (version, length) == (10, len(m))
        assert len(m) <= 1400
    assert exporter.stats.records == 100
    assert exporter.stats.bytes == sum(len(m) for m in messages)
    # Two IPv6 records: header, set header, 2 * 74 bytes.
    v6 = IpfixExporter().encode(_handmade()[:2], EXPORT_TIME_S)[-1]
    assert len(v6) == 16 + 4 + 2 * V6_RECORD_BYTES


def test_templates_are_resent_every_refresh_interval() -> None:
    """Templates and the options record go out at the first call and again
    once template_refresh_s of export time has passed (set ids 2 and 3 and
    the options data set 258 in a message of their own)."""
    exporter = IpfixExporter(ExporterConfig(template_refresh_s=30))
    record = _handmade()[2:]
    sent_at = []
    for t in (1000, 1010, 1029, 1030, 1031, 1065):
        for message in exporter.encode(record, t):
            (set_id,) = struct.unpack_from(">H", message, 16)
            if set_id == 2:
                sent_at.append(t)
                sets = _set_ids(message)
                assert sets == [2, 3, 258]
    assert sent_at == [1000, 1030, 1065]
    assert exporter.stats.template_messages == 3


def _set_ids(message: bytes) -> list[int]:
    out, pos = [], 16
    while pos < len(message):
        set_id, length = struct.unpack_from(">HH", message, pos)
        out.append(set_id)
        pos += length
    return out


def test_a_late_collector_learns_templates_at_the_next_refresh(
    ctu_records: np.ndarray,
) -> None:
    """A decoder that missed the first template message decodes nothing
    until the refresh, then everything after it."""
    exporter = IpfixExporter(ExporterConfig(template_refresh_s=30))
    first = exporter.encode(ctu_records[:50], 2000)
    later = exporter.encode(ctu_records[50:80], 2030)
    decoder = FlowDecoder()
    got = _decode(first[1:] + later, decoder)
    # The data before the templates is held, then released by them.
    assert got.size == 80
    counters = decoder.stats.exporter(EXPORTER, 4739)
    assert counters.pending_held > 0
    assert counters.pending_decoded == counters.pending_held


def test_unannounced_rate_stays_unknown(ctu_records: np.ndarray) -> None:
    """sampling_rate 0 sends no options record: the collector sees rate 0."""
    exporter = IpfixExporter(ExporterConfig(sampling_rate=0))
    messages = exporter.encode(ctu_records[:10], EXPORT_TIME_S)
    assert _set_ids(messages[0]) == [2]
    got = _decode(messages)
    assert (got["sampling_rate"] == 0).all()


def test_unencodable_records_are_counted_not_raised() -> None:
    """Records with no IP version, an IPv4 record holding an IPv6 address
    and a negative time are skipped and counted by reason."""
    records = _handmade()
    bad = empty_records(3)
    bad["ip_version"] = [0, 4, 4]
    bad["src_addr"][1] = address_bytes("2001:db8::5")
    bad["src_addr"][2] = address_bytes("192.0.2.1")
    bad["dst_addr"][1:] = address_bytes("192.0.2.2")
    bad["time_start"][2] = -5
    exporter = IpfixExporter()
    got = _decode(exporter.encode(np.concatenate([records, bad]), EXPORT_TIME_S))
    assert got.size == 3
    assert exporter.stats.skipped == {"bad_ip_version": 2, "negative_time": 1}
    assert exporter.stats.records == 3


def test_bad_arguments_are_refused() -> None:
    """Wrong dtype, out-of-range settings and export times raise with the
    value named."""
    with pytest.raises(TypeError, match="FLOW_DTYPE"):
        IpfixExporter().encode(np.zeros(3), EXPORT_TIME_S)
    with pytest.raises(ValueError, match="max_message_bytes"):
        ExporterConfig(max_message_bytes=80)
    with pytest.raises(ValueError, match="template_refresh_s"):
        ExporterConfig(template_refresh_s=0)
    with pytest.raises(ValueError, match="export_time_s"):
        IpfixExporter().encode(_handmade(), 2**32)
