"""NetFlow v1/v5 decoding with hand-built datagrams (struct.pack in the test).

Expected values are computed here from the bytes written, never taken from
the decoder.  The shared captures are compared with tshark in
tests/test_decoder.py.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edge_agent.flows.decoder import FlowDecoder
from edge_agent.flows.schema import ExportProtocol, Field, address_text

EXPORTER = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 5])
PORT = 2055
UNIX_SECS = 1_700_000_000
UPTIME_MS = 50_000_000


def v5_record(
    *,
    src: str = "10.1.2.3",
    dst: str = "10.4.5.6",
    hop: str = "10.0.0.254",
    in_if: int = 7,
    out_if: int = 9,
    packets: int = 12,
    octets: int = 3456,
    first: int = UPTIME_MS - 4_000,
    last: int = UPTIME_MS - 1_000,
    sport: int = 51000,
    dport: int = 443,
    flags: int = 0x1B,
    proto: int = 6,
    tos: int = 0x28,
    src_as: int = 64500,
    dst_as: int = 15169,
    src_mask: int = 24,
    dst_mask: int = 16,
) -> bytes:
    """One 48-byte v5 record in wire order."""
    return struct.pack(
        ">4s4s4sHHIIIIHHBBBBHHBBH",
        bytes(int(x) for x in src.split(".")),
        bytes(int(x) for x in dst.split(".")),
        bytes(int(x) for x in hop.split(".")),
        in_if,
        out_if,
        packets,
        octets,
        first,
        last,
        sport,
        dport,
        0,
        flags,
        proto,
        tos,
        src_as,
        dst_as,
        src_mask,
        dst_mask,
        0,
    )


def v5_datagram(
    records: list[bytes],
    *,
    seq: int = 0,
    engine_type: int = 1,
    engine_id: int = 3,
    sampling: int = 0,
    count: int | None = None,
    uptime: int = UPTIME_MS,
) -> bytes:
    """A v5 header (count = len(records) unless given) and the records."""
    header = struct.pack(
        ">HHIIIIBBH",
        5,
        len(records) if count is None else count,
        uptime,
        UNIX_SECS,
        123_456_789,
        seq,
        engine_type,
        engine_id,
        sampling,
    )
    return header + b"".join(records)


def test_v5_record_fields_are_decoded() -> None:
    """Every v5 field lands in its column; times are converted with the
    header (abs = unix_secs*1000 - (sysUptime - value)); the domain is
    engine_type << 8 | engine_id."""
    decoder = FlowDecoder()
    records = decoder.decode(v5_datagram([v5_record()]), EXPORTER, PORT, 0)
    assert len(records) == 1
    r = records[0]
    assert address_text(r["src_addr"].tobytes()) == "10.1.2.3"
    assert address_text(r["dst_addr"].tobytes()) == "10.4.5.6"
    assert address_text(r["next_hop"].tobytes()) == "10.0.0.254"
    assert address_text(r["exporter"].tobytes()) == "192.0.2.5"
    assert r["src_addr"].tobytes() == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert (int(r["in_if"]), int(r["out_if"])) == (7, 9)
    assert (int(r["packets"]), int(r["bytes"])) == (12, 3456)
    assert (int(r["src_port"]), int(r["dst_port"])) == (51000, 443)
    assert (int(r["tcp_flags"]), int(r["protocol"]), int(r["tos"])) == (0x1B, 6, 0x28)
    assert (int(r["src_as"]), int(r["dst_as"])) == (64500, 15169)
    assert (int(r["src_mask"]), int(r["dst_mask"])) == (24, 16)
    assert int(r["time_start"]) == UNIX_SECS * 1000 - 4_000
    assert int(r["time_end"]) == UNIX_SECS * 1000 - 1_000
    assert int(r["domain"]) == (1 << 8) | 3
    assert int(r["ip_version"]) == 4
    assert int(r["export_proto"]) == ExportProtocol.NETFLOW_V5
    assert int(r["exporter_port"]) == PORT
    assert int(r["sampling_rate"]) == 0  # nothing announced, no default
    assert int(r["direction"]) == 255
    expected = (
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
        | Field.SRC_AS
        | Field.DST_AS
        | Field.NEXT_HOP
        | Field.SRC_MASK
        | Field.DST_MASK
    )
    assert int(r["present"]) == int(expected)
    counters = decoder.stats.exporter(EXPORTER, PORT)
    assert (counters.datagrams, counters.records) == (1, 1)
    assert counters.bytes == 24 + 48


def test_v5_header_sampling_interval_and_mode() -> None:
    """The low 14 bits of the sampling field are the interval (the rate),
    the top 2 the mode; the rate applies to the records of that domain."""
    decoder = FlowDecoder()
    mode1 = decoder.decode(
        v5_datagram([v5_record()] * 2, sampling=(1 << 14) | 100), EXPORTER, PORT, 0
    )
    assert mode1["sampling_rate"].tolist() == [100, 100]
    mode0 = decoder.decode(
        v5_datagram([v5_record()], sampling=1000, engine_id=4), EXPORTER, PORT, 0
    )
    assert mode0["sampling_rate"].tolist() == [1000]
    # 0x3FFF is the largest interval; mode bits never leak into the rate.
    big = decoder.decode(
        v5_datagram([v5_record()], sampling=(2 << 14) | 0x3FFF, engine_id=5),
        EXPORTER,
        PORT,
        0,
    )
    assert big["sampling_rate"].tolist() == [0x3FFF]
    assert decoder.sampling.lookup(EXPORTER, (1 << 8) | 3) == 100


def test_v1_datagram_is_decoded() -> None:
    """NetFlow v1: 16-byte header, 48-byte records with protocol, tos and
    flags at v1's offsets; no domain, no sequence number."""
    header = struct.pack(">HHIII", 1, 1, UPTIME_MS, UNIX_SECS, 0)
    record = struct.pack(
        ">4s4s4sHHIIIIHHHBBBBBB4s",
        bytes([172, 16, 0, 1]),
        bytes([172, 16, 0, 2]),
        bytes(4),
        3,
        4,
        5,
        600,
        UPTIME_MS - 10,
        UPTIME_MS - 5,
        53,
        33000,
        0,
        17,  # prot
        0x10,  # tos
        0,  # flags
        0,
        0,
        0,
        bytes(4),
    )
    records = FlowDecoder().decode(header + record, EXPORTER, PORT, 0)
    assert len(records) == 1
    r = records[0]
    assert int(r["export_proto"]) == ExportProtocol.NETFLOW_V1
    assert (int(r["protocol"]), int(r["tos"]), int(r["tcp_flags"])) == (17, 0x10, 0)
    assert (int(r["src_port"]), int(r["dst_port"])) == (53, 33000)
    assert (int(r["packets"]), int(r["bytes"])) == (5, 600)
    assert int(r["time_end"]) == UNIX_SECS * 1000 - 5
    assert int(r["domain"]) == 0


def test_count_larger_than_datagram_decodes_what_fits() -> None:
    """A header count above what the bytes hold is counted, and the records
    that are complete are decoded (no partial record)."""
    decoder = FlowDecoder()
    payload = v5_datagram([v5_record(), v5_record()], count=5) + b"\x00" * 20
    records = decoder.decode(payload, EXPORTER, PORT, 0)
    assert len(records) == 2
    errors = decoder.stats.exporter(EXPORTER, PORT).errors
    assert errors["count_exceeds_datagram"] == 1


def test_bytes_after_counted_records_are_counted_not_decoded() -> None:
    """Records beyond the header count are not decoded; the surplus is
    counted."""
    decoder = FlowDecoder()
    payload = v5_datagram([v5_record(), v5_record()], count=1)
    assert len(decoder.decode(payload, EXPORTER, PORT, 0)) == 1
    errors = decoder.stats.exporter(EXPORTER, PORT).errors
    assert errors["datagram_longer_than_count"] == 1


def test_truncated_header_is_counted() -> None:
    """Fewer than 24 bytes of a v5 header: counted, nothing decoded."""
    decoder = FlowDecoder()
    assert len(decoder.decode(v5_datagram([])[:20], EXPORTER, PORT, 0)) == 0
    assert decoder.stats.exporter(EXPORTER, PORT).errors["truncated_header"] == 1


def test_uptime_wrap_is_handled() -> None:
    """A FIRST taken just before sysUptime wrapped (0xFFFFFFF0, header
    uptime 100) started 116 ms before the export, not 49 days after it."""
    record = v5_record(first=0xFFFFFFF0, last=90)
    records = FlowDecoder().decode(v5_datagram([record], uptime=100), EXPORTER, PORT, 0)
    # (100 - 0xFFFFFFF0) mod 2^32 = 116
    assert int(records["time_start"][0]) == UNIX_SECS * 1000 - 116
    assert int(records["time_end"][0]) == UNIX_SECS * 1000 - 10


def test_sequence_gaps_reordering_and_wraparound() -> None:
    """v5 sequence numbers count records: a jump is a gap with that many
    records lost; a late datagram fills its gap back; the u32 wrap is not
    a gap; an exporter restart (back to 0) resynchronises."""
    decoder = FlowDecoder()
    counters = decoder.stats.exporter(EXPORTER, PORT)
    two = [v5_record(), v5_record()]

    def send(seq: int) -> None:
        decoder.decode(v5_datagram(two, seq=seq), EXPORTER, PORT, 0)

    send(1000)
    send(1002)  # in order
    assert (counters.sequence_gaps, counters.estimated_lost) == (0, 0)
    send(1006)  # 1004..1005 missing
    assert (counters.sequence_gaps, counters.estimated_lost) == (1, 2)
    send(1004)  # the missing datagram arrives late
    assert (counters.sequence_gaps, counters.estimated_lost) == (2, 0)
    send(1008)  # still in order after the late one
    assert (counters.sequence_gaps, counters.estimated_lost) == (2, 0)

    wrap = FlowDecoder()
    wrap_counters = wrap.stats.exporter(EXPORTER, PORT)
    wrap.decode(v5_datagram(two, seq=0xFFFFFFFF), EXPORTER, PORT, 0)
    wrap.decode(v5_datagram(two, seq=1), EXPORTER, PORT, 0)  # 0xFFFFFFFF + 2
    assert (wrap_counters.sequence_gaps, wrap_counters.estimated_lost) == (0, 0)

    send(5_000_000)  # far ahead: counted as loss
    lost_before = counters.estimated_lost
    send(0)  # restart: far behind, resynchronise without loss
    send(2)
    assert counters.estimated_lost == lost_before
    # The restart itself is one out-of-sequence event.
    assert counters.sequence_gaps == 4


def test_sequences_are_per_exporter_port_and_engine() -> None:
    """Two engines of one exporter, and two ports, have their own sequence."""
    decoder = FlowDecoder()
    one = [v5_record()]
    decoder.decode(v5_datagram(one, seq=10, engine_id=1), EXPORTER, PORT, 0)
    decoder.decode(v5_datagram(one, seq=500, engine_id=2), EXPORTER, PORT, 0)
    decoder.decode(v5_datagram(one, seq=11, engine_id=1), EXPORTER, PORT, 0)
    decoder.decode(v5_datagram(one, seq=501, engine_id=2), EXPORTER, PORT, 0)
    decoder.decode(v5_datagram(one, seq=77, engine_id=1), EXPORTER, PORT + 1, 0)
    assert decoder.stats.totals().sequence_gaps == 0


def test_decode_many_batches_several_exporters_in_order() -> None:
    """decode_many over interleaved exporters returns the records of each
    datagram in order, with each exporter's own header values."""
    other = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 6])
    datagrams = []
    for i in range(50):
        exporter = EXPORTER if i % 3 else other
        records = [v5_record(packets=i * 10 + j) for j in range(1 + i % 4)]
        datagrams.append((v5_datagram(records, seq=i * 100), exporter, PORT, 0))
    many = FlowDecoder().decode_many(datagrams)
    expected_packets = [i * 10 + j for i in range(50) for j in range(1 + i % 4)]
    assert many["packets"].tolist() == expected_packets
    expected_exporters = [
        (EXPORTER if i % 3 else other) for i in range(50) for _ in range(1 + i % 4)
    ]
    assert [r.tobytes() for r in many["exporter"]] == expected_exporters
    single = FlowDecoder()
    one_by_one = np.concatenate([single.decode(*d) for d in datagrams])
    assert many.tobytes() == one_by_one.tobytes()


def test_long_batch_of_one_exporter_keeps_values_sequence_and_errors() -> None:
    """Sixty datagrams of one exporter in one batch (read as one vector run):
    each record keeps its own values and its datagram's header time, a
    sequence jump of 7 records is one gap of 7, and a datagram whose count
    exceeds its bytes is counted, decodes what fits and loses the rest."""
    datagrams = []
    seq = 1000
    expected_packets: list[int] = []
    expected_start: list[int] = []
    for i in range(60):
        n = 1 + i % 5
        records = [v5_record(packets=i * 10 + j, first=UPTIME_MS - j) for j in range(n)]
        uptime = UPTIME_MS + i  # one ms later each datagram: a new base
        count = n + 3 if i == 40 else None  # promises 3 more than it holds
        if i == 30:
            seq += 7  # seven records lost before datagram 30
        payload = v5_datagram(records, seq=seq, uptime=uptime, count=count)
        datagrams.append((payload, EXPORTER, PORT, 0))
        expected_packets += [i * 10 + j for j in range(n)]
        # abs = unix_secs*1000 - (sysUptime - first)
        expected_start += [
            UNIX_SECS * 1000 - (uptime - (UPTIME_MS - j)) for j in range(n)
        ]
        seq += (n + 3) if i == 40 else n
    decoder = FlowDecoder()
    decoded = decoder.decode_many(datagrams)
    assert decoded["packets"].tolist() == expected_packets
    assert decoded["time_start"].tolist() == expected_start
    counters = decoder.stats.exporter(EXPORTER, PORT)
    # Datagram 40 said n+3 records but held n: the 3 cut off are lost too.
    assert (counters.sequence_gaps, counters.estimated_lost) == (2, 7 + 3)
    assert counters.errors["count_exceeds_datagram"] == 1
    assert counters.records == len(expected_packets)


def test_rates_are_those_known_when_each_datagram_arrived() -> None:
    """In one batch: 20 datagrams from port A announce no rate (unknown, 0),
    then port B of the same exporter and engine announces 1-in-100, and
    port A's later datagrams take 100 (the exporter's latest rate).  With
    A announcing 50 and B 200, A's records after B's announce 50 again."""
    one = [v5_record()]
    quiet = [
        (v5_datagram(one, engine_id=0, seq=i), EXPORTER, PORT, 0) for i in range(20)
    ]
    loud = (v5_datagram(one, engine_id=0, sampling=100), EXPORTER, PORT + 1, 0)
    later = [
        (v5_datagram(one, engine_id=0, seq=20 + i), EXPORTER, PORT, 0)
        for i in range(20)
    ]
    records = FlowDecoder().decode_many([*quiet, loud, *later])
    assert records["sampling_rate"].tolist() == [0] * 20 + [100] * 21

    a50 = [
        (v5_datagram(one, engine_id=0, sampling=50, seq=i), EXPORTER, PORT, 0)
        for i in range(15)
    ]
    b200 = (v5_datagram(one, engine_id=0, sampling=200), EXPORTER, PORT + 1, 0)
    a50_later = [
        (v5_datagram(one, engine_id=0, sampling=50, seq=15 + i), EXPORTER, PORT, 0)
        for i in range(15)
    ]
    records = FlowDecoder().decode_many([*a50, b200, *a50_later])
    assert records["sampling_rate"].tolist() == [50] * 15 + [200] + [50] * 15


# -- batches through the classifying pre-pass ---------------------------------

OTHER_V4 = bytes([198, 51, 100, 9])  # an exporter handed over as 4 bytes
OTHER_MAPPED = bytes(10) + b"\xff\xff" + OTHER_V4


def _interleaved() -> tuple[list[tuple[bytes, bytes, int, int]], list[int]]:
    """60 v5 datagrams from three sockets in an irregular order (two ports
    of EXPORTER, OTHER as 4 bytes), 1-4 records each, with the packets of
    record j of datagram i set to i * 10 + j; socket (EXPORTER, PORT + 1)
    skips 5 records before its datagram 30."""
    sockets = [(EXPORTER, PORT), (EXPORTER, PORT + 1), (OTHER_V4, PORT)]
    seqs = [0, 0, 0]
    datagrams = []
    packets: list[int] = []
    for i in range(60):
        which = (i * 7 // 3) % 3
        exporter, port = sockets[which]
        n = 1 + i % 4
        if i == 30:
            which, (exporter, port) = 1, sockets[1]
            seqs[1] += 5
        records = [v5_record(packets=i * 10 + j) for j in range(n)]
        datagrams.append((v5_datagram(records, seq=seqs[which]), exporter, port, 0))
        seqs[which] += n
        packets += [i * 10 + j for j in range(n)]
    return datagrams, packets


def test_interleaved_sockets_keep_order_counters_and_sequences() -> None:
    """Sixty v5 datagrams of three sockets interleaved in one batch come out
    in arrival order; each socket counts its own datagrams, bytes and
    records, the 5 records skipped on one socket are one gap of 5, and an
    exporter given as 4 bytes is the IPv4-mapped one."""
    datagrams, packets = _interleaved()
    decoder = FlowDecoder()
    records = decoder.decode_many(datagrams)
    assert records["packets"].tolist() == packets
    for exporter, port in ((EXPORTER, PORT), (EXPORTER, PORT + 1), (OTHER_V4, PORT)):
        mine = [d for d in datagrams if d[1] == exporter and d[2] == port]
        address = OTHER_MAPPED if exporter == OTHER_V4 else exporter
        counters = decoder.stats.by_exporter[address, port]
        assert counters.datagrams == len(mine)
        assert counters.bytes == sum(len(d[0]) for d in mine)
        assert counters.records == sum((len(d[0]) - 24) // 48 for d in mine)
        lost = 5 if port == PORT + 1 else 0
        assert (counters.sequence_gaps, counters.estimated_lost) == (
            int(lost > 0),
            lost,
        )
    assert set(decoder.stats.by_exporter) == {
        (EXPORTER, PORT),
        (EXPORTER, PORT + 1),
        (OTHER_MAPPED, PORT),
    }
    single = FlowDecoder()
    one_by_one = np.concatenate([single.decode(*d) for d in datagrams])
    assert records.tobytes() == one_by_one.tobytes()


def test_other_datagrams_between_v5_runs_are_counted_in_place() -> None:
    """In one batch, an empty datagram, one of unknown version 7 and a v1
    datagram between two runs of twenty v5 datagrams are counted as
    errors (empty_datagram, unknown_version) or decoded (v1) in place:
    the v1 record sits between the two runs' records."""
    first = [
        (v5_datagram([v5_record(packets=i)], seq=i), EXPORTER, PORT, 0)
        for i in range(20)
    ]
    v1 = struct.pack(">HHIII", 1, 1, UPTIME_MS, UNIX_SECS, 0) + v5_record(packets=999)
    between = [
        (b"", EXPORTER, PORT, 0),
        (struct.pack(">HH", 7, 0) + bytes(20), EXPORTER, PORT, 0),
        (v1, EXPORTER, PORT, 0),
    ]
    second = [
        (v5_datagram([v5_record(packets=100 + i)], seq=20 + i), EXPORTER, PORT, 0)
        for i in range(20)
    ]
    decoder = FlowDecoder()
    records = decoder.decode_many([*first, *between, *second])
    assert records["packets"].tolist() == [
        *range(20),
        999,
        *range(100, 120),
    ]
    counters = decoder.stats.by_exporter[EXPORTER, PORT]
    assert counters.errors["empty_datagram"] == 1
    assert counters.errors["unknown_version"] == 1
    assert counters.datagrams == 43
    assert counters.records == 41
    assert counters.sequence_gaps == 0


def test_bad_exporter_address_in_a_long_batch_is_counted() -> None:
    """A datagram whose exporter address is 5 bytes, in a batch of forty, is
    counted as bad_exporter_address; the other 39 are decoded."""
    datagrams = [
        (v5_datagram([v5_record(packets=i)], seq=i), EXPORTER, PORT, 0)
        for i in range(40)
    ]
    datagrams[17] = (datagrams[17][0], bytes(5), PORT, 0)
    decoder = FlowDecoder()
    records = decoder.decode_many(datagrams)
    assert records["packets"].tolist() == [i for i in range(40) if i != 17]
    assert decoder.stats.by_exporter[bytes(5), PORT].errors == {
        "bad_exporter_address": 1
    }
    counters = decoder.stats.by_exporter[EXPORTER, PORT]
    assert (counters.datagrams, counters.records) == (39, 39)
    # The sequence number of the missing datagram is one record lost.
    assert (counters.sequence_gaps, counters.estimated_lost) == (1, 1)


def test_engine_change_inside_a_batch_starts_a_new_stream() -> None:
    """Forty datagrams of one socket in one batch, the engine id changing
    from 3 to 4 after twenty: records carry domain 1 << 8 | 3, then
    1 << 8 | 4, and each engine's sequence numbers are their own stream
    (both starting at 0: no gap)."""
    datagrams = [
        (
            v5_datagram(
                [v5_record(packets=i)], seq=i % 20, engine_id=3 if i < 20 else 4
            ),
            EXPORTER,
            PORT,
            0,
        )
        for i in range(40)
    ]
    decoder = FlowDecoder()
    records = decoder.decode_many(datagrams)
    assert records["domain"].tolist() == [1 << 8 | 3] * 20 + [1 << 8 | 4] * 20
    assert records["packets"].tolist() == list(range(40))
    counters = decoder.stats.by_exporter[EXPORTER, PORT]
    assert (counters.datagrams, counters.sequence_gaps) == (40, 0)
    for domain in (1 << 8 | 3, 1 << 8 | 4):
        assert decoder.sequences.streams[EXPORTER, PORT, 5, domain].expected == 20


def test_a_failing_pre_pass_falls_back_to_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the batch pre-pass or the v5 bulk planning raises (a bug), the
    batch is still decoded datagram by datagram: every record, in order,
    with its counters; nothing is counted as lost."""
    datagrams = [
        (v5_datagram([v5_record(packets=i)], seq=i), EXPORTER, PORT, 0)
        for i in range(40)
    ]

    def broken(*args: object) -> None:
        raise RuntimeError("injected")

    for target in ("edge_agent.flows.decoder._classify", "_plan"):
        decoder = FlowDecoder()
        if target == "_plan":
            monkeypatch.setattr(decoder._v5, "_plan", broken)
        else:
            monkeypatch.setattr(target, broken)
        records = decoder.decode_many(datagrams)
        monkeypatch.undo()
        assert records["packets"].tolist() == list(range(40)), target
        counters = decoder.stats.by_exporter[EXPORTER, PORT]
        assert (counters.datagrams, counters.records) == (40, 40), target
        assert counters.errors == {}, target
