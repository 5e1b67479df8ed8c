"""Datagram plans: repeated v9/IPFIX layouts read in bulk, same output.

The real captures are replicated (sequence numbers carried on, as a live
exporter would send them) and decoded with plans on and off: records and
every counter must be identical.  Hand-built exporters check what must
stop a plan from applying (a redefined or withdrawn template) and that a
rate announced between planned datagrams applies from its place on; the
expected values are written out in each test.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from edge_agent.bench.decode import Replicas, Stream
from edge_agent.collect.datagram import Datagram
from edge_agent.collect.pcap import read_capture
from edge_agent.flows import netflow_v9
from edge_agent.flows.decoder import DecoderConfig, FlowDecoder, normalise_exporter
from edge_agent.flows.fields import RecordBatch
from edge_agent.flows.netflow_v9 import Sockets
from edge_agent.flows.sequence import StreamState

EXPORTER = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7])
PORT = 2055
REPLICAS = 24


def _templated_captures(captures_dir: Path) -> list[Path]:
    paths = sorted(captures_dir.glob("*.pcap"))
    assert paths, f"no captures in {captures_dir}"
    return paths


def _stream(path: Path) -> Stream:
    datagrams, _ = read_capture(path)
    chosen = [d for d in datagrams if d.payload[:2] in (b"\x00\x09", b"\x00\x0a")]
    return Stream(path.name, chosen)


def _decode(
    datagrams: list[Datagram], plans: bool, batch: int
) -> tuple[FlowDecoder, bytes]:
    """Decode in batches of ``batch``; return the decoder and the records."""
    decoder = FlowDecoder(DecoderConfig(datagram_plans=plans))
    parts = [
        decoder.decode_many(datagrams[i : i + batch]).tobytes()
        for i in range(0, len(datagrams), batch)
    ]
    return decoder, b"".join(parts)


def test_replicated_captures_decode_the_same_with_plans(captures_dir: Path) -> None:
    """Every v9/IPFIX capture sent 24 times over (sequence numbers carried
    on) gives byte-identical records and identical per-exporter counters,
    sequence state, held data and sampling table with plans on and off, in
    batches of 256 datagrams and in one batch."""
    planned = 0
    for path in _templated_captures(captures_dir):
        stream = _stream(path)
        if not stream.datagrams:
            continue
        replicas = Replicas([stream])
        datagrams = [
            d for i in range(REPLICAS) for d in replicas.replica(i)[0].datagrams
        ]
        for batch in (256, len(datagrams)):
            on, records_on = _decode(datagrams, True, batch)
            off, records_off = _decode(datagrams, False, batch)
            name = f"{path.name} batch {batch}"
            assert records_on == records_off, name
            assert on.stats.by_exporter == off.stats.by_exporter, name
            for mine, theirs in (
                (on.sequences.streams, off.sequences.streams),
                (on.sampling.announced, off.sampling.announced),
            ):
                assert mine.keys() == theirs.keys(), name
            for key, state in on.sequences.streams.items():
                other = off.sequences.streams[key]
                assert (state.expected, state.lost, state.by_records) == (
                    other.expected,
                    other.lost,
                    other.by_records,
                ), name
            assert on.sampling.announced == off.sampling.announced, name
            assert on.pending.sets == off.pending.sets, name
            assert not off._v9.plans and not off._ipfix.plans
            planned += len(on._v9.plans) + len(on._ipfix.plans)
    # The captures do repeat layouts: the comparison exercised plans.
    assert planned > 10


# -- hand-built NetFlow v9 -----------------------------------------------------

V9_HEADER = struct.Struct(">HHIIII")
UPTIME_MS = 50_000
UNIX_SECS = 1_700_000_000


def _v9(seq: int, *sets: bytes, source_id: int = 1) -> bytes:
    body = b"".join(sets)
    return V9_HEADER.pack(9, 0, UPTIME_MS, UNIX_SECS, seq, source_id) + body


def _set(set_id: int, body: bytes) -> bytes:
    return struct.pack(">HH", set_id, 4 + len(body)) + body


def _template(template_id: int, fields: list[tuple[int, int]]) -> bytes:
    return _set(
        0,
        struct.pack(">HH", template_id, len(fields))
        + b"".join(struct.pack(">HH", t, n) for t, n in fields),
    )


#: bytes (IN_BYTES), packets (IN_PKTS), protocol, source port: 11 bytes
FIELDS_A = [(1, 4), (2, 4), (4, 1), (7, 2)]
#: the same widths in another order: source port, protocol, packets, bytes
FIELDS_B = [(7, 2), (4, 1), (2, 4), (1, 4)]


def _record_a(octets: int, packets: int, proto: int, sport: int) -> bytes:
    return struct.pack(">IIBH", octets, packets, proto, sport)


def _record_b(octets: int, packets: int, proto: int, sport: int) -> bytes:
    return struct.pack(">HBII", sport, proto, packets, octets)


def test_redefined_template_stops_the_plan_mid_batch() -> None:
    """40 datagrams of a layout, then the template redefined with the same
    record length in another field order, then 40 more datagrams of the
    same size, all in one batch: the first 40 read with the old fields,
    the rest with the new; counters as sent."""
    datagrams = [_v9(0, _template(256, FIELDS_A))]
    seq = 1
    for i in range(40):
        records = _record_a(1000 + i, 10 + i, 6, 2000 + i) + _record_a(
            5000 + i, 50 + i, 17, 3000 + i
        )
        datagrams.append(_v9(seq, _set(256, records)))
        seq += 1
    datagrams.append(_v9(seq, _template(256, FIELDS_B)))
    seq += 1
    for i in range(40):
        records = _record_b(7000 + i, 70 + i, 6, 4000 + i) + _record_b(
            9000 + i, 90 + i, 17, 6000 + i
        )
        datagrams.append(_v9(seq, _set(256, records)))
        seq += 1
    decoder = FlowDecoder()
    out = decoder.decode_many([(d, EXPORTER, PORT, 0) for d in datagrams])
    expected = []
    for i in range(40):
        expected += [(1000 + i, 10 + i, 6, 2000 + i), (5000 + i, 50 + i, 17, 3000 + i)]
    for i in range(40):
        expected += [(7000 + i, 70 + i, 6, 4000 + i), (9000 + i, 90 + i, 17, 6000 + i)]
    got = list(
        zip(
            out["bytes"].tolist(),
            out["packets"].tolist(),
            out["protocol"].tolist(),
            out["src_port"].tolist(),
            strict=True,
        )
    )
    assert got == expected
    counters = decoder.stats.exporter(EXPORTER, PORT)
    assert counters.records == 160
    assert counters.templates_received == 2
    assert counters.sequence_gaps == 0
    assert sum(counters.errors.values()) == 0


def test_sampling_rate_announced_between_planned_datagrams() -> None:
    """Options data announcing 1-in-100, 40 data datagrams, options data
    announcing 1-in-1000, 40 more, in one batch: the first 80 records say
    100 and the last 80 say 1000."""
    options_template = _set(
        1,
        struct.pack(">HHH", 257, 4, 4)  # scope: system, 4 bytes
        + struct.pack(">HH", 1, 4)
        + struct.pack(">HH", 34, 4),  # SAMPLING_INTERVAL
    )
    datagrams = [_v9(0, _template(256, FIELDS_A), options_template)]
    seq = 1
    for rate in (100, 1000):
        datagrams.append(_v9(seq, _set(257, struct.pack(">II", 0, rate))))
        seq += 1
        for i in range(40):
            records = _record_a(i, 1, 6, i) + _record_a(i, 2, 6, i)
            datagrams.append(_v9(seq, _set(256, records)))
            seq += 1
    decoder = FlowDecoder()
    out = decoder.decode_many([(d, EXPORTER, PORT, 0) for d in datagrams])
    assert out["sampling_rate"].tolist() == [100] * 80 + [1000] * 80
    # Times come from the header: unix secs - (uptime - value); no time
    # field here, so none is present.
    assert decoder.stats.exporter(EXPORTER, PORT).options_records == 2


# -- hand-built IPFIX ----------------------------------------------------------


def _ipfix(seq: int, *sets: bytes, domain: int = 3) -> bytes:
    body = b"".join(sets)
    return struct.pack(">HHIII", 10, 16 + len(body), UNIX_SECS, seq, domain) + body


def _ipfix_template(template_id: int, fields: list[tuple[int, int]]) -> bytes:
    return _set(
        2,
        struct.pack(">HH", template_id, len(fields))
        + b"".join(struct.pack(">HH", t, n) for t, n in fields),
    )


@pytest.mark.parametrize("count", [1, 3])
def test_withdrawn_template_holds_later_data(count: int) -> None:
    """An IPFIX template, 40 datagrams of its data (``count`` records each),
    its withdrawal, then 5 datagrams of the same layout: the 40 are decoded,
    the 5 are held (their template is gone), none is read with the old
    plan."""
    datagrams = [_ipfix(0, _ipfix_template(300, FIELDS_A))]
    seq = 0
    for i in range(40):
        records = b"".join(_record_a(100 * i + k, k, 6, i) for k in range(count))
        datagrams.append(_ipfix(seq, _set(300, records)))
        seq += count
    datagrams.append(_ipfix(seq, _set(2, struct.pack(">HH", 300, 0))))
    for i in range(5):
        records = b"".join(_record_a(k, k, 17, i) for k in range(count))
        datagrams.append(_ipfix(seq, _set(300, records)))
    decoder = FlowDecoder()
    out = decoder.decode_many([(d, EXPORTER, 4739, 0) for d in datagrams])
    assert len(out) == 40 * count
    assert out["bytes"].tolist() == [
        100 * i + k for i in range(40) for k in range(count)
    ]
    counters = decoder.stats.exporter(EXPORTER, 4739)
    assert counters.templates_withdrawn == 1
    assert counters.pending_held == 5
    assert decoder.pending.sets == 5


@pytest.mark.parametrize("options_first", [True, False])
def test_options_data_in_planned_datagrams(options_first: bool) -> None:
    """Datagrams carrying options data (a rate) and data of one layout, the
    rate 1-in-100 for 40 datagrams then 1-in-1000 for 40: with the options
    set first a datagram's records take its own rate; with it last they
    take the rate of the datagram before (the first datagram's: unknown)."""
    options_template = _set(
        1,
        struct.pack(">HHH", 257, 4, 4)
        + struct.pack(">HH", 1, 4)
        + struct.pack(">HH", 34, 4),
    )
    datagrams = [_v9(0, _template(256, FIELDS_A), options_template)]
    rates = [100] * 40 + [1000] * 40
    for seq, rate in enumerate(rates, start=1):
        options = _set(257, struct.pack(">II", 0, rate))
        data = _set(256, _record_a(seq, 1, 6, 80) + _record_a(seq, 2, 6, 81))
        sets = (options, data) if options_first else (data, options)
        datagrams.append(_v9(seq, *sets))
    decoder = FlowDecoder()
    out = decoder.decode_many([(d, EXPORTER, PORT, 0) for d in datagrams])
    applied = rates if options_first else [0, *rates[:-1]]
    assert out["sampling_rate"].tolist() == [r for r in applied for _ in range(2)]
    assert out["bytes"].tolist() == [s for s in range(1, 81) for _ in range(2)]
    counters = decoder.stats.exporter(EXPORTER, PORT)
    assert counters.options_records == 80
    assert counters.records == 160
    assert counters.sequence_gaps == 0


# -- walk_many: one socket's datagrams in one call -----------------------------


def _interleaved_changes(capture: list[Datagram], ipfix: bool) -> list[Datagram]:
    """The capture's datagrams with, from the same socket, a hand-built
    stream of another domain mixed in: a template redefined (same record
    length, other field order) every 7 data datagrams, IPFIX withdrawals,
    a sequence gap and a late datagram."""
    first = capture[0]
    mixed: list[Datagram] = []
    seq = 0
    fields = (FIELDS_A, FIELDS_B)
    records = (_record_a, _record_b)
    domain = 0x5EED
    for i, datagram in enumerate(capture):
        mixed.append(datagram)
        k = i // 7 % 2
        if i % 7 == 0:
            if ipfix:
                if k == 0 and i:
                    mixed.append(
                        first._replace(
                            payload=_ipfix(
                                seq,
                                _set(2, struct.pack(">HH", 300, 0)),
                                domain=domain,
                            )
                        )
                    )
                template = _ipfix_template(300, fields[k])
                payload = _ipfix(seq, template, domain=domain)
            else:
                payload = _v9(seq, _template(300, fields[k]), source_id=domain)
                seq += 1
            mixed.append(first._replace(payload=payload))
        body = records[k](1000 + i, i, 6, 2000 + i) + records[k](7, i, 17, 53)
        if i % 23 == 5:
            seq += 3  # a gap (and, two datagrams on, a late one)
        number = seq - 5 if i % 23 == 7 else seq
        payload = (
            _ipfix(number, _set(300, body), domain=domain)
            if ipfix
            else _v9(number, _set(300, body), source_id=domain)
        )
        mixed.append(first._replace(payload=payload))
        seq += 2 if ipfix else 1
    return mixed


def _walk_socket(decoder: FlowDecoder, datagrams: list[Datagram], many: bool) -> bytes:
    """Decode through the v9/IPFIX walkers, per socket and version in
    arrival order: ``walk_many`` once per group or ``walk`` per datagram."""
    batch = RecordBatch()
    for walker in (decoder._v5, decoder._v9, decoder._ipfix):
        walker.bind(batch)
    groups: dict[tuple[bytes, int, bytes], tuple[list[bytes], list[int]]] = {}
    for d in datagrams:
        address = normalise_exporter(d.exporter)
        assert address is not None
        group = groups.setdefault((address, d.exporter_port, d.payload[:2]), ([], []))
        group[0].append(d.payload)
        group[1].append(d.received_ms)
        counters = decoder.stats.exporter(address, d.exporter_port)
        counters.datagrams += 1
        counters.bytes += len(d.payload)
    for (address, port, version), (payloads, received) in groups.items():
        walker = decoder._v9 if version == b"\x00\x09" else decoder._ipfix
        counters = decoder.stats.exporter(address, port)
        if many:
            walker.walk_many(
                payloads, received, Sockets([(address, port)], [counters]), batch
            )
        else:
            for payload, received_ms in zip(payloads, received, strict=True):
                walker.walk(payload, address, port, received_ms, counters, batch)
    return batch.build(decoder.sampling.lookup, decoder.sampling.override).tobytes()


def _stream_state(decoder: FlowDecoder) -> dict[object, tuple[object, ...]]:
    return {
        key: tuple(getattr(state, name) for name in StreamState.__slots__)
        for key, state in decoder.sequences.streams.items()
    }


@pytest.mark.parametrize(("size", "shortest"), [(256, 4), (61, 2)])
def test_walk_many_equals_walk_on_replicated_captures(
    captures_dir: Path, monkeypatch: pytest.MonkeyPatch, size: int, shortest: int
) -> None:
    """Every v9/IPFIX capture sent 24 times over, with a stream of
    templates redefined and withdrawn, gaps and a late datagram mixed in
    on the same socket: walk_many per socket gives the same records,
    counters, sequence state, templates, held data and sampling table as
    walk on each datagram, in batches of ``size`` datagrams."""
    # Bulk-match short calls too, and sizes and runs from ``shortest``
    # datagrams, so that every capture takes the bulk path somewhere and
    # the walk takes some datagrams of the same plans.
    monkeypatch.setattr(netflow_v9, "_BULK_MIN", 8)
    monkeypatch.setattr(netflow_v9, "_MATCH_MIN", shortest)
    monkeypatch.setattr(netflow_v9, "_RUN_MIN", shortest)
    compared = 0
    for path in _templated_captures(captures_dir):
        stream = _stream(path)
        if not stream.datagrams:
            continue
        replicas = Replicas([stream])
        datagrams = [
            d for i in range(REPLICAS) for d in replicas.replica(i)[0].datagrams
        ]
        ipfix = stream.datagrams[0].payload[:2] == b"\x00\x0a"
        for mixed in (datagrams, _interleaved_changes(datagrams, ipfix)):
            one, many = FlowDecoder(), FlowDecoder()
            name = f"{path.name} ({len(mixed)} datagrams)"
            for i in range(0, len(mixed), size):
                chunk = mixed[i : i + size]
                assert _walk_socket(one, chunk, False) == _walk_socket(
                    many, chunk, True
                ), name
            assert one.stats.by_exporter == many.stats.by_exporter, name
            assert _stream_state(one) == _stream_state(many), name
            assert {k: t.raw for k, t in one.templates.templates.items()} == {
                k: t.raw for k, t in many.templates.templates.items()
            }, name
            assert one.pending.sets == many.pending.sets, name
            assert one.sampling.announced == many.sampling.announced, name
            assert one._ipfix.init_times == many._ipfix.init_times, name
            compared += 1
    assert compared > 40
