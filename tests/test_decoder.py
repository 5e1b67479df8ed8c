"""FlowDecoder against tshark: every NetFlow v1/v5/v9 and IPFIX capture.

Each shared capture is decoded datagram by datagram and compared, record by
record and field by field, with its tshark reference CSV (see
``../shared/captures/README.md``).  Held data (``before_template=1``) must
come out in the datagram that brought its template.  Where tshark's decode
is not what a correct collector produces, :func:`expected_record` states the
right value and why.

The front door's own behaviour (dispatch, config validation, batching,
never raising) is tested at the end with hand-built datagrams.
"""

from __future__ import annotations

import collections
import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.flows.decoder import DecoderConfig, FlowDecoder
from edge_agent.flows.schema import FLOW_DTYPE, ExportProtocol, Field, address_text
from tests.reference import (
    address16,
    epoch_ms,
    is_zero_address,
    other,
    read_csv,
    read_datagrams,
    read_summary,
    tshark_date_ms,
)

#: (capture, reference CSV suffix): every NetFlow/IPFIX capture in the folder.
CAPTURES: list[tuple[str, str]] = [
    ("ipfix-cisco-ipv6-exporter.pcap", ".tshark.csv"),
    ("ipfix-cisco-srv6-with-bmp.pcap", ".tshark.csv"),
    ("ipfix-cisco-two-domains.pcap", ".tshark.csv"),
    ("ipfix-datalink-frame-section.pcap", ".tshark.csv"),
    ("ipfix-eompls-datalink.pcap", ".tshark.csv"),
    ("ipfix-ipfixprobe-pen29305.pcap", ".tshark.csv"),
    ("ipfix-mpls-labels.pcap", ".tshark.csv"),
    ("ipfix-physical-interfaces.pcap", ".tshark.csv"),
    ("nf5-akvorado-router.pcap", ".tshark.csv"),
    ("nf5-freebsd-ng_netflow.pcap", ".tshark.csv"),
    ("nf5-header-sampling-100.pcap", ".tshark.csv"),
    ("nf9-cisco-asa-nsel.pcap", ".tshark.csv"),
    ("nf9-cisco-reordered-sequence.pcap", ".tshark.csv"),
    ("nf9-fortigate-data-before-template.pcap", ".tshark.csv"),
    ("nf9-header-count-too-small.pcap", ".tshark.csv"),
    ("nf9-icmp.pcap", ".tshark.csv"),
    ("nf9-nat-events.pcap", ".tshark.csv"),
    ("nf9-nprobe-many-templates.pcap", ".tshark.csv"),
    ("nf9-options-sampling-30000.pcap", ".tshark.csv"),
    ("nf9-pmacctd.pcap", ".tshark.csv"),
    ("nf9-samplingrate-2048.pcap", ".tshark.csv"),
    ("sflow-counters-30-pdus.pcap", ".netflow5-on-port-6343.tshark.csv"),
    ("w-goflow2-nfv5.pcap", ".tshark.csv"),
    ("w-goflow2-nfv9.pcap", ".tshark.csv"),
    ("w-ipfix-barracuda.pcap", ".tshark.csv"),
    ("w-ipfix-ixia-pen3054.pcap", ".tshark.csv"),
    ("w-ipfix-mikrotik.pcap", ".tshark.csv"),
    ("w-ipfix-netscaler-varlen-pen5951.pcap", ".tshark.csv"),
    ("w-ipfix-openbsd-pflow.pcap", ".tshark.csv"),
    ("w-ipfix-yaf-pen6871.pcap", ".tshark.csv"),
    ("w-nf5-12-datagrams.pcap", ".tshark.csv"),
    ("w-nf5-juniper-mx80.pcap", ".tshark.csv"),
    ("w-nf5-mikrotik.pcap", ".tshark.csv"),
    ("w-nf9-cisco-aci-padding.pcap", ".tshark.csv"),
    ("w-nf9-cisco-asr9k.pcap", ".tshark.csv"),
    ("w-nf9-cisco-nbar.pcap", ".tshark.csv"),
    ("w-nf9-h3c-varstring.pcap", ".tshark.csv"),
    ("w-nf9-iptnetflow-reduced-size.pcap", ".tshark.csv"),
    ("w-nf9-paloalto-zero-filled.pcap", ".tshark.csv"),
    ("w-nf9-two-exporters-interleaved.pcap", ".tshark.csv"),
    ("w-nf9-ubnt-edgerouter-mpls.pcap", ".tshark.csv"),
    ("w-pynetflow-softflowd-ipfix-ether.pcap", ".tshark.csv"),
    ("w-pynetflow-softflowd-ipfix.pcap", ".tshark.csv"),
    ("w-pynetflow-softflowd-v9.pcap", ".tshark.csv"),
    ("w-pynetflow-v1-v5.pcap", ".tshark.csv"),
]

#: Captures whose records carry both an IPv4 and an IPv6 address that are
#: both non-zero, and which family the template lists first.  Cisco SRv6
#: template 340 describes the outer IPv6 header (addresses, protocol 4 =
#: IPv4 inside, ports 0) before the inner IPv4 one; tshark joins both into
#: one column ("v4|v6").  A decoder takes the first occurrence of a
#: repeated element, so the outer header, consistently for every column.
BOTH_FAMILIES_FIRST = {"ipfix-cisco-srv6-with-bmp.pcap": 6}

NETFLOW_VERSIONS = {"1", "5", "9", "10"}
UINT_COLUMNS = (
    ("src_port", Field.SRC_PORT),
    ("protocol", Field.PROTOCOL),
    ("bytes", Field.BYTES),
    ("packets", Field.PACKETS),
    ("in_if", Field.IN_IF),
    ("out_if", Field.OUT_IF),
    ("tcp_flags", Field.TCP_FLAGS),
    ("tos", Field.TOS),
    ("src_as", Field.SRC_AS),
    ("dst_as", Field.DST_AS),
    ("src_mask", Field.SRC_MASK),
    ("dst_mask", Field.DST_MASK),
    ("sampler_id", Field.SAMPLER_ID),
)
#: Order of the values in a comparable record (see :func:`actual_record`).
KEYS = (
    "exporter",
    "exporter_port",
    "domain",
    "src_addr",
    "dst_addr",
    "dst_port",
    *(name for name, _ in UINT_COLUMNS),
    "next_hop",
    "direction",
    "time_start",
    "time_end",
    "sampling_rate",
)


def _first(text: str) -> str:
    """tshark joins repeated elements with '|' in wire order: the first."""
    return text.split("|", maxsplit=1)[0] if text else ""


def _int(text: str) -> int | None:
    text = _first(text)
    if not text:
        return None
    return int(text, 16) if text.startswith("0x") else int(text)


def _domain(row: dict[str, str]) -> int:
    text = row["domain"]
    if "/" in text:  # v5: engine_type/engine_id
        engine_type, engine_id = text.split("/")
        return int(engine_type) << 8 | int(engine_id)
    return int(text) if text else 0


@dataclass
class Reference:
    """What the CSV says, in the order a collector sees it."""

    capture: str
    rows: list[dict[str, str]]
    options_ids: set[tuple[str, int, int]]  # (exporter:port, domain, set id)
    #: data rows by the frame in which a collector emits them
    by_frame: dict[int, list[dict[str, str]]] = field(default_factory=dict)
    options_rows: list[dict[str, str]] = field(default_factory=list)

    def is_options(self, row: dict[str, str]) -> bool:
        """Options-data rows are consumed by the decoder, not emitted."""
        key = (f"{row['exporter']}:{row['exporter_port']}", _domain(row))
        return (*key, int(row["set_id"] or 0)) in self.options_ids


def load_reference(captures_dir: Path, capture: str, suffix: str) -> Reference:
    """Read a capture's CSV and summary into a :class:`Reference`."""
    rows = [
        r
        for r in read_csv(captures_dir / (capture + suffix))
        if r["version"] in NETFLOW_VERSIONS
    ]
    summary_path = captures_dir / (
        capture + suffix.replace("tshark.csv", "summary.json")
    )
    summary = read_summary(summary_path)
    options_ids = {
        (t["exporter"], int(t["domain"] or 0), int(t["template_id"]))
        for t in summary.get("templates", [])
        if t["kind"] == "Options Template"
    }
    ref = Reference(capture, rows, options_ids)
    for row in rows:
        if ref.is_options(row):
            ref.options_rows.append(row)
            continue
        frame = int(row["frame"])
        if row["before_template"] == "1":
            # Held by the collector until the datagram with the template.
            frame = int(row["template_frame"])
        ref.by_frame.setdefault(frame, []).append(row)
    return ref


@dataclass
class Announced:
    """Sampling and system-init announcements, replayed in frame order."""

    rates: dict[tuple[str, int, int], int] = field(default_factory=dict)
    latest: dict[tuple[str, int], int] = field(default_factory=dict)
    init_ms: dict[tuple[str, int], int] = field(default_factory=dict)

    def learn(self, row: dict[str, str]) -> None:
        """Take in what one options (or v5) row announces."""
        exporter = row["exporter"]
        domain = _domain(row)
        rate = _int(row["sampling_rate"])
        if rate:
            self.rates[(exporter, domain, _int(row["sampler_id"]) or 0)] = rate
            self.latest[(exporter, domain)] = rate
        init = other(row).get("cflow.sys_init_time")
        if init:
            self.init_ms[(exporter, domain)] = tshark_date_ms(init)

    def rate(self, row: dict[str, str]) -> int:
        """The rate of a data row: its own, its sampler's, its domain's."""
        own = _int(row["sampling_rate"])
        if own:
            return own
        exporter = row["exporter"]
        domain = _domain(row)
        sid = _int(row["sampler_id"]) or 0
        for key in ((exporter, domain, sid), (exporter, domain, 0)):
            if key in self.rates:
                return self.rates[key]
        return self.latest.get((exporter, domain), 0)


def _uptime_abs(row: dict[str, str], value: int) -> int:
    """README formula abs = unix_secs*1000 - (sysuptime_ms - value), with
    u32 wrap: sysUptime wraps every 49.7 days, so an uptime value more than
    2^31 above the header's (softflowd v9 here; a NetFlow v5 FIRST of
    0xFFFFFFFF in w-nf5-12-datagrams) was taken before the wrap.  The plain
    formula would put those flows weeks in the future."""
    delta = int(row["sysuptime_ms"]) - value
    if delta < -(1 << 31):
        delta += 1 << 32
    return int(row["unix_secs"]) * 1000 - delta


def _time(row: dict[str, str], end: str, announced: Announced) -> int | None:
    extra = other(row)
    other_end = "last" if end == "first" else "first"
    uptime = row[f"{end}_uptime_ms"]
    absolute = row[f"{end}_abs"]
    if uptime:
        if row["version"] != "10":
            return _uptime_abs(row, int(uptime))
        # IPFIX sysUpTime elements count from systemInitTimeMilliseconds,
        # announced in the record itself or in options data before it;
        # without it the time is unknown.
        init_text = extra.get("cflow.sys_init_time")
        init = (
            tshark_date_ms(init_text)
            if init_text
            else announced.init_ms.get((row["exporter"], _domain(row)))
        )
        return None if init is None else init + int(uptime)
    if absolute:
        ms = epoch_ms(absolute)
        if ms == 0 and row["version"] == "9" and row[f"{other_end}_uptime_ms"]:
            # nProbe's FIRST_SWITCHED of 0: tshark shows a zero uptime as
            # the epoch when the other end is uptime-relative.  It is
            # uptime 0 (the exporter's boot), converted like any uptime.
            return _uptime_abs(row, 0)
        # nProbe sends an absolute time of 0 for "not measured"; tshark
        # shows 1970-01-01.  That is not a flow time: expected absent.
        return ms or None
    obs = extra.get("cflow.observation_time_milliseconds")
    if obs and not row["first_raw"] and not row["last_raw"]:
        # NAT/firewall event records carry only the event time: it is
        # both the start and the end of what the record describes.
        return tshark_date_ms(obs)
    return None


def _address(row: dict[str, str], column: str, capture: str) -> str | None:
    text = row[column]
    if not text:
        return None
    values = text.split("|")
    v4 = [v for v in values if ipaddress.ip_address(v).version == 4]
    v6 = [v for v in values if ipaddress.ip_address(v).version == 6]
    if v4 and v6:
        # tshark lists the IPv4 column before the IPv6 one, whatever the
        # wire order: the capture's entry in BOTH_FAMILIES_FIRST says which
        # family the template lists first.
        return _canonical((v6 if BOTH_FAMILIES_FIRST[capture] == 6 else v4)[0])
    return _canonical(values[0])


def _canonical(text: str) -> str:
    """Address text as the 16-byte column renders it: an IPv4-mapped IPv6
    address is the IPv4 address (one column holds both families)."""
    return address_text(address16(text))


def expected_record(
    row: dict[str, str], announced: Announced, capture: str
) -> tuple[Any, ...]:
    """The record a correct collector emits for one CSV data row.

    ``None`` means the export did not carry the field (present bit clear).
    """
    extra = other(row)
    values: dict[str, Any] = {
        "exporter": _canonical(row["exporter"]),
        "exporter_port": int(row["exporter_port"]),
        "domain": _domain(row),
        "src_addr": _address(row, "src_addr", capture),
        "dst_addr": _address(row, "dst_addr", capture),
    }
    for name, _ in UINT_COLUMNS:
        values[name] = _int(row[name])
    # ingress/egressPhysicalInterface (252/253) are the interfaces when the
    # template has no ingress/egressInterface (10/14); tshark lists them
    # under their own names.
    if values["in_if"] is None and "cflow.ingress_physical_interface" in extra:
        values["in_if"] = _int(extra["cflow.ingress_physical_interface"])
    if values["out_if"] is None and "cflow.egress_physical_interface" in extra:
        values["out_if"] = _int(extra["cflow.egress_physical_interface"])
    # octetTotalCount/packetTotalCount (85/86, tshark: "permanent") are the
    # counters when the template has no delta counters (YAF).
    if values["bytes"] is None and "cflow.permanent_octets" in extra:
        values["bytes"] = _int(extra["cflow.permanent_octets"])
    if values["packets"] is None and "cflow.permanent_packets" in extra:
        values["packets"] = _int(extra["cflow.permanent_packets"])
    # Cisco ASA NSEL counts bytes only as initiatorOctets (231).
    if values["bytes"] is None and "cflow.initiator_octets" in extra:
        values["bytes"] = _int(extra["cflow.initiator_octets"])
    if values["packets"] is None and "cflow.initiator_packets" in extra:
        values["packets"] = _int(extra["cflow.initiator_packets"])

    dst_port = _int(row["dst_port"])
    if dst_port is None or (dst_port == 0 and values["protocol"] in (1, 58)):
        # ICMP type/code goes into dst_port (type*256+code) when the export
        # has no port (softflowd's ICMP templates, which carry no protocol
        # either), or a zero one for an ICMP flow, as v5 exporters do.
        icmp = _icmp(extra)
        if icmp is not None:
            dst_port = icmp
    values["dst_port"] = dst_port

    hop = row["next_hop"]
    bgp = row["bgp_next_hop"]
    if (not hop or is_zero_address(_first(hop))) and bgp:
        hop = bgp  # the BGP next hop stands in when the IP one is unset
    values["next_hop"] = _canonical(_first(hop)) if hop else None
    values["direction"] = _int(row["direction"])
    values["time_start"] = _time(row, "first", announced)
    values["time_end"] = _time(row, "last", announced)
    values["sampling_rate"] = announced.rate(row)
    return tuple(values[k] for k in KEYS)


def _icmp(extra: dict[str, str]) -> int | None:
    if "cflow.icmp_ipv6_type" in extra:
        code = _int(extra.get("cflow.icmp_ipv6_code", "0")) or 0
        return (_int(extra["cflow.icmp_ipv6_type"]) or 0) * 256 + code
    if "cflow.icmp_type_code_ipv4" in extra:
        return _int(extra["cflow.icmp_type_code_ipv4"])
    if "cflow.icmp_ipv4_type" in extra:
        code = _int(extra.get("cflow.icmp_ipv4_code", "0")) or 0
        return (_int(extra["cflow.icmp_ipv4_type"]) or 0) * 256 + code
    return None


def actual_record(rec: np.void) -> tuple[Any, ...]:
    """A decoded record as the same tuple, None where the bit is clear."""
    present = int(rec["present"])

    def pick(value: Any, bit: Field) -> Any:
        if present & bit:
            return value
        assert not value, f"bit {bit.name} clear but value {value!r}"
        return None

    values: dict[str, Any] = {
        "exporter": address_text(rec["exporter"].tobytes()),
        "exporter_port": int(rec["exporter_port"]),
        "domain": int(rec["domain"]),
        "src_addr": pick(address_text(rec["src_addr"].tobytes()), Field.SRC_ADDR)
        if present & Field.SRC_ADDR
        else None,
        "dst_addr": pick(address_text(rec["dst_addr"].tobytes()), Field.DST_ADDR)
        if present & Field.DST_ADDR
        else None,
        "dst_port": pick(int(rec["dst_port"]), Field.DST_PORT),
        "next_hop": address_text(rec["next_hop"].tobytes())
        if present & Field.NEXT_HOP
        else None,
        "direction": int(rec["direction"]) if present & Field.DIRECTION else None,
        "time_start": pick(int(rec["time_start"]), Field.TIME_START),
        "time_end": pick(int(rec["time_end"]), Field.TIME_END),
        "sampling_rate": int(rec["sampling_rate"]),
    }
    if not present & Field.DIRECTION:
        assert rec["direction"] == 255
    for name, bit in UINT_COLUMNS:
        values[name] = pick(int(rec[name]), bit)
    return tuple(values[k] for k in KEYS)


def _sort_key(record: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(repr(v) for v in record)


def _datagrams(captures_dir: Path, capture: str) -> Iterator[Any]:
    yield from read_datagrams(captures_dir / capture)


def _describe(expected: tuple[Any, ...], actual: tuple[Any, ...]) -> str:
    return ", ".join(
        f"{k}: expected {e!r} got {a!r}"
        for k, e, a in zip(KEYS, expected, actual, strict=True)
        if e != a
    )


@pytest.mark.parametrize(("capture", "suffix"), CAPTURES, ids=[c for c, _ in CAPTURES])
def test_capture_matches_tshark(captures_dir: Path, capture: str, suffix: str) -> None:
    """Every data record of the capture is decoded with tshark's values (all
    rows, held ones in the datagram that brings their template), options
    records are consumed and their sampling rates learnt."""
    ref = load_reference(captures_dir, capture, suffix)
    decoder = FlowDecoder()
    announced = Announced()
    options_by_frame: dict[int, list[dict[str, str]]] = collections.defaultdict(list)
    for row in ref.options_rows:
        frame = int(row["frame"])
        if row["before_template"] == "1":
            frame = int(row["template_frame"])
        options_by_frame[frame].append(row)
    v5_rows = {int(r["frame"]): r for r in ref.rows if r["version"] in ("1", "5")}
    emitted = 0
    for dgram in _datagrams(captures_dir, capture):
        records = decoder.decode(
            dgram.payload, dgram.src, dgram.src_port, dgram.time_ms
        )
        assert records.dtype == FLOW_DTYPE
        records = records[
            np.isin(
                records["export_proto"],
                [int(p) for p in ExportProtocol if p != ExportProtocol.SFLOW_V5],
            )
        ]
        # Announcements of this datagram apply to its own records.
        if dgram.frame in v5_rows:
            announced.learn(v5_rows[dgram.frame])
        for row in options_by_frame.get(dgram.frame, []):
            announced.learn(row)
        expected = sorted(
            (
                expected_record(row, announced, capture)
                for row in ref.by_frame.get(dgram.frame, [])
            ),
            key=_sort_key,
        )
        actual = sorted((actual_record(r) for r in records), key=_sort_key)
        assert len(actual) == len(expected), f"frame {dgram.frame}: record count"
        for exp, act in zip(expected, actual, strict=True):
            assert exp == act, f"frame {dgram.frame}: {_describe(exp, act)}"
        emitted += len(records)

    data_rows = sum(len(v) for v in ref.by_frame.values())
    assert emitted == data_rows
    totals = decoder.stats.totals()
    assert totals.errors["decoder_bug"] == 0
    assert totals.options_records == len(ref.options_rows)
    # What the options records announced is what the table now says.
    for (exporter, domain, sid), rate in announced.rates.items():
        assert decoder.sampling.lookup(address16(exporter), domain, sid) == rate


@pytest.mark.parametrize(("capture", "suffix"), CAPTURES, ids=[c for c, _ in CAPTURES])
def test_capture_held_sets_are_counted(
    captures_dir: Path, capture: str, suffix: str
) -> None:
    """Data sets that arrive before their template are held and decoded when
    it comes; sets whose template never comes stay held (not lost)."""
    ref = load_reference(captures_dir, capture, suffix)
    summary = read_summary(
        captures_dir / (capture + suffix.replace("tshark.csv", "summary.json"))
    )
    held_sets = {
        (r["frame"], r["set_pos"]) for r in ref.rows if r["before_template"] == "1"
    }
    never = summary.get("undecodable_sets_two_pass", 0)
    decoder = FlowDecoder()
    decoder.decode_many(
        (d.payload, d.src, d.src_port, d.time_ms)
        for d in _datagrams(captures_dir, capture)
    )
    totals = decoder.stats.totals()
    assert totals.pending_decoded == len(held_sets)
    assert totals.pending_held == len(held_sets) + never
    assert decoder.pending.sets == never


def test_capture_list_is_complete(captures_dir: Path) -> None:
    """Every NetFlow/IPFIX capture in the shared folder is in CAPTURES."""
    listed = {c for c, _ in CAPTURES}
    for summary_path in captures_dir.glob("*.pcap.summary.json"):
        versions = set(read_summary(summary_path).get("versions", {}))
        if versions & NETFLOW_VERSIONS:
            assert summary_path.name.removesuffix(".summary.json") in listed


@pytest.mark.parametrize(("capture", "suffix"), CAPTURES, ids=[c for c, _ in CAPTURES])
def test_decode_many_equals_decode(
    captures_dir: Path, capture: str, suffix: str
) -> None:
    """decode_many (batched numpy passes) gives exactly the records of
    decode() called on each datagram in order."""
    datagrams = [
        (d.payload, d.src, d.src_port, d.time_ms)
        for d in _datagrams(captures_dir, capture)
    ]
    one = FlowDecoder()
    parts = [one.decode(*d) for d in datagrams]
    expected = np.concatenate(parts) if parts else np.zeros(0, FLOW_DTYPE)
    many = FlowDecoder().decode_many(datagrams)
    assert many.tobytes() == expected.tobytes()


# -- front door, hand-built datagrams ------------------------------------------

EXPORTER = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])


def _v5(count: int = 1, seq: int = 0, sampling: int = 0) -> bytes:
    header = struct.pack(
        ">HHIIIIBBH", 5, count, 10_000, 1_700_000_000, 0, seq, 1, 2, sampling
    )
    record = struct.pack(
        ">4s4s4sHHIIIIHHBBBBHHBBH",
        bytes([10, 0, 0, 1]),
        bytes([10, 0, 0, 2]),
        bytes(4),
        1,
        2,
        3,
        300,
        9_000,
        9_500,
        1234,
        80,
        0,
        0x12,
        6,
        0,
        0,
        0,
        24,
        24,
        0,
    )
    return header + record * count


def test_config_rejects_bad_values_with_the_field_name() -> None:
    """DecoderConfig names the field, the bad value and the rule."""
    with pytest.raises(
        ValueError, match=r"max_exporters must be an integer >= 1, got 0"
    ):
        DecoderConfig(max_exporters=0)
    with pytest.raises(ValueError, match=r"pending_max_age_ms .* got -1"):
        DecoderConfig(pending_max_age_ms=-1)
    with pytest.raises(ValueError, match=r"sampling_overrides key .* 'router'"):
        DecoderConfig(sampling_overrides={"router": 100})
    with pytest.raises(ValueError, match=r"sampling_overrides\['192.0.2.1'\]"):
        DecoderConfig(sampling_overrides={"192.0.2.1": 0})


def test_unknown_version_and_empty_datagrams_are_counted() -> None:
    """A version that is not 1/5/9/10 (or sFlow) is counted, never raised."""
    decoder = FlowDecoder()
    assert len(decoder.decode(b"\x00\x07" + bytes(30), EXPORTER, 2055, 0)) == 0
    assert len(decoder.decode(b"", EXPORTER, 2055, 0)) == 0
    assert len(decoder.decode(b"\x00", EXPORTER, 2055, 0)) == 0
    errors = decoder.stats.exporter(EXPORTER, 2055).errors
    assert errors["unknown_version"] == 1
    assert errors["empty_datagram"] == 1
    assert errors["truncated_header"] == 1
    assert decoder.stats.exporter(EXPORTER, 2055).datagrams == 3


def test_ipv4_exporter_is_normalised_to_mapped_form() -> None:
    """A 4-byte exporter address and its IPv4-mapped form are one exporter:
    same counters, same column value."""
    decoder = FlowDecoder()
    a = decoder.decode(_v5(), bytes([192, 0, 2, 1]), 2055, 0)
    b = decoder.decode(_v5(seq=1), EXPORTER, 2055, 0)
    assert a["exporter"][0].tobytes() == EXPORTER == b["exporter"][0].tobytes()
    counters = decoder.stats.exporter(EXPORTER, 2055)
    assert counters.datagrams == 2
    assert counters.records == 2
    assert counters.sequence_gaps == 0
    bad = decoder.decode(_v5(), b"\x01\x02", 2055, 0)
    assert len(bad) == 0
    assert decoder.stats.exporter(b"\x01\x02", 2055).errors["bad_exporter_address"] == 1


def test_sampling_override_and_default_apply() -> None:
    """The per-exporter override wins over the header rate; the operator
    default applies when nothing was announced."""
    config = DecoderConfig(
        default_sampling_rate=7, sampling_overrides={"192.0.2.1": 50}
    )
    decoder = FlowDecoder(config)
    overridden = decoder.decode(_v5(sampling=0x4000 | 100), EXPORTER, 2055, 0)
    assert overridden["sampling_rate"].tolist() == [50]
    other_exporter = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 9])
    default = decoder.decode(_v5(), other_exporter, 2055, 0)
    assert default["sampling_rate"].tolist() == [7]


def test_garbage_never_raises() -> None:
    """Random and truncated datagrams of every version decode to nothing or
    to what fits, and never raise or hit the decoder_bug counter."""
    rng = np.random.default_rng(7)
    decoder = FlowDecoder()
    seeds = [_v5(3), b"\x00\x09" + bytes(18), b"\x00\x0a\x00\x10" + bytes(12)]
    for _ in range(3000):
        base = seeds[int(rng.integers(len(seeds)))]
        noise = rng.integers(0, 256, size=int(rng.integers(0, 200)), dtype=np.uint8)
        payload = base[: int(rng.integers(0, len(base) + 1))] + noise.tobytes()
        decoder.decode(payload, EXPORTER, 2055, 0)
    assert decoder.stats.totals().errors["decoder_bug"] == 0


#: Elements the decoder maps plus some it does not, for random templates.
_FUZZ_ELEMENTS = [1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 21, 22, 27, 32, 34, 48, 58, 61]
_FUZZ_ELEMENTS += [62, 85, 150, 152, 154, 156, 158, 160, 161, 302, 305, 306, 309, 310]
_FUZZ_ELEMENTS += [323, 0, 82, 315, 32767]


def _random_template_message(rng: np.random.Generator, seq: int) -> bytes:
    """A v9 or IPFIX message: a random template (odd widths, variable
    length, enterprise fields, options) and random data for it, maybe cut
    or with flipped bytes."""
    template_id = int(rng.integers(256, 261))
    fields = []
    for _ in range(int(rng.integers(1, 12))):
        element = int(rng.choice(_FUZZ_ELEMENTS))
        length = int(rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 16, 65535, 0, 33]))
        pen = int(rng.choice([0, 0, 0, 29305]))
        fields.append((element, length, pen))
    data = rng.integers(
        0, 256, size=int(rng.integers(0, 300)), dtype=np.uint8
    ).tobytes()
    if rng.random() < 0.5:
        options = rng.random() < 0.3
        body = struct.pack(">HH", template_id, len(fields))
        if options:
            body += struct.pack(">H", int(rng.integers(0, len(fields) + 1)))
        for element, length, pen in fields:
            if pen:
                body += struct.pack(">HHI", element | 0x8000, length, pen)
            else:
                body += struct.pack(">HH", element, length)
        sets = struct.pack(">HH", 3 if options else 2, 4 + len(body)) + body
        sets += struct.pack(">HH", template_id, 4 + len(data)) + data
        domain = int(rng.integers(0, 3))
        msg = struct.pack(">HHIII", 10, 16 + len(sets), 1_700_000_000, seq, domain)
        msg += sets
    else:
        body = struct.pack(">HH", template_id, len(fields))
        body += b"".join(struct.pack(">HH", e, n) for e, n, _ in fields)
        sets = struct.pack(">HH", 0, 4 + len(body)) + body
        sets += struct.pack(">HH", template_id, 4 + len(data)) + data
        msg = struct.pack(">HHIIII", 9, 2, 1000, 1_700_000_000, seq, 0) + sets
    if rng.random() < 0.2:
        msg = msg[: int(rng.integers(0, len(msg) + 1))]
    if rng.random() < 0.2:
        flipped = bytearray(msg)
        for _ in range(int(rng.integers(1, 6))):
            if flipped:
                flipped[int(rng.integers(len(flipped)))] = int(rng.integers(256))
        msg = bytes(flipped)
    return msg


def test_random_templates_never_raise() -> None:
    """Random templates (odd widths, variable length, enterprise fields,
    options, zero lengths) with random data, decoded one by one and in
    batches: no exception, no numpy warning, no decoder_bug."""
    rng = np.random.default_rng(11)
    decoder = FlowDecoder()
    for seq in range(2000):
        msg = _random_template_message(rng, seq)
        if seq % 2:
            decoder.decode(msg, EXPORTER, 2055, seq)
        else:
            decoder.decode_many(
                [(msg, EXPORTER, 2055, seq), (msg, EXPORTER, 2056, seq)]
            )
    totals = decoder.stats.totals()
    assert totals.errors["decoder_bug"] == 0
    assert totals.records > 0  # some random templates do decode
