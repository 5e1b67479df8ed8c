"""Differential tests: ``decode_many`` against ``decode`` one datagram at a time.

The promise (``edge_agent.flows.decoder``): a batch gives exactly the records
of decoding each datagram on its own, in the same order, and leaves the same
per-exporter counters, sequence state and sampling table.  Each test builds
a stream from the shared captures, decodes it both ways with fresh decoders
and compares everything; the one-by-one decode is the reference.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from edge_agent.bench.decode import Replicas, Stream
from edge_agent.collect.datagram import Datagram
from edge_agent.collect.pcap import read_capture
from edge_agent.flows import netflow_v9, plans
from edge_agent.flows.decoder import DecoderConfig, FlowDecoder
from edge_agent.flows.schema import FLOW_DTYPE, ExportProtocol
from tests.conftest import require_shared

#: Batch sizes around the decoder's thresholds (16, 32, 128 datagrams).
SIZES = [1, 15, 16, 31, 32, 33, 127, 128, 129, 256, 1024]
Item = tuple[bytes, bytes, int, int]


def address(last: int) -> bytes:
    """The IPv4-mapped 16-byte form of 192.0.2.``last``."""
    return b"\x00" * 10 + b"\xff\xff" + bytes([192, 0, 2, last])


def capture(name: str) -> list[Datagram]:
    """The datagrams of one shared capture, in capture order."""
    datagrams, _ = read_capture(require_shared("captures", name))
    assert datagrams, f"no datagrams in {name}"
    return datagrams


def moved(datagrams: list[Datagram], exporter: bytes, port: int) -> list[Datagram]:
    """The datagrams as sent from ``exporter``:``port``."""
    return [d._replace(exporter=exporter, exporter_port=port) for d in datagrams]


def replicated(datagrams: list[Datagram], copies: int) -> list[Datagram]:
    """``copies`` passes of a stream, sequence numbers moved on per pass."""
    replicas = Replicas([Stream("stream", datagrams)])
    return [d for i in range(copies) for d in replicas.replica(i)[0].datagrams]


def state(decoder: FlowDecoder) -> dict[str, Any]:
    """Every piece of decoder state the promise covers, as plain values."""
    counters = {}
    for key, value in decoder.stats.by_exporter.items():
        fields = dataclasses.asdict(value)
        fields["errors"] = {k: v for k, v in value.errors.items() if v}
        counters[key] = fields
        # Plain ints (numpy ones compare equal but break JSON and metrics).
        numbers = [v for v in fields.values() if not isinstance(v, dict)]
        assert all(type(v) is int for v in numbers), fields

    def streams(tracker: Any) -> dict[Any, dict[str, Any]]:
        return {
            key: {name: getattr(s, name) for name in s.__slots__}
            for key, s in tracker.streams.items()
        }

    return {
        "counters": counters,
        "sequences": streams(decoder.sequences),
        "sflow_sequences": streams(decoder.sflow.sequences),
        "sampling": dict(decoder.sampling.announced),
        "sampling_latest": dict(decoder.sampling.latest),
        "templates": sorted(decoder.templates.templates, key=repr),
        "pending": [(h.key, h.received_ms) for h in decoder.pending.queue],
    }


def joined(parts: list[np.ndarray]) -> np.ndarray:
    """The records of several calls, in call order."""
    return np.concatenate(parts) if parts else np.zeros(0, FLOW_DTYPE)


def one_by_one(config: DecoderConfig, items: Sequence[Item]) -> tuple[np.ndarray, Any]:
    """The reference: every datagram through ``decode`` on its own."""
    decoder = FlowDecoder(config)
    records = joined([decoder.decode(*item) for item in items])
    return records, state(decoder)


def batched(
    config: DecoderConfig, items: Sequence[Item], sizes: list[int]
) -> tuple[np.ndarray, Any]:
    """The datagrams through ``decode_many`` in batches of ``sizes`` (cycled)."""
    decoder = FlowDecoder(config)
    parts = []
    start = 0
    turn = 0
    while start < len(items):
        size = sizes[turn % len(sizes)]
        parts.append(decoder.decode_many(list(items[start : start + size])))
        start += size
        turn += 1
    return joined(parts), state(decoder)


def assert_same(config: DecoderConfig, items: Sequence[Item], sizes: list[int]) -> None:
    """decode_many in ``sizes`` batches equals decode one by one."""
    expected, expected_state = one_by_one(config, items)
    records, got_state = batched(config, items, sizes)
    assert len(records) == len(expected)
    if not np.array_equal(records, expected):
        rows = np.flatnonzero(records != expected)
        names = [
            n
            for n in FLOW_DTYPE.names or ()
            if not np.array_equal(records[n][rows], expected[n][rows])
        ]
        pytest.fail(f"{len(rows)} records differ (first {rows[:5]}), fields {names}")
    for key, value in expected_state.items():
        assert got_state[key] == value, key


def interleave(streams: list[list[Datagram]], seed: int) -> list[Item]:
    """The streams merged in a random order of random-length runs."""
    rng = random.Random(seed)
    taken = [0] * len(streams)
    live = [i for i, s in enumerate(streams) if s]
    out: list[Item] = []
    while live:
        i = rng.choice(live)
        run = rng.choice([1, 3, 16, 40, 200])
        out.extend(streams[i][taken[i] : taken[i] + run])
        taken[i] += run
        if taken[i] >= len(streams[i]):
            live.remove(i)
    return out


@pytest.mark.parametrize("plans", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_v5_and_v9_interleaved_sockets(size: int, plans: bool) -> None:
    """Replicated v5, v9 and IPFIX streams from sockets that share an address
    (one capture sent from two ports) decode the same in batches of any size
    as one by one: records in order, counters, sequences, sampling."""
    streams = [
        moved(replicated(capture("w-nf5-12-datagrams.pcap"), 12), address(1), 2055),
        moved(replicated(capture("w-nf5-12-datagrams.pcap"), 12), address(1), 2056),
        moved(replicated(capture("w-nf9-cisco-asr9k.pcap"), 30), address(1), 2057),
        moved(replicated(capture("w-nf9-cisco-asr9k.pcap"), 30), address(2), 2055),
        moved(
            replicated(capture("w-pynetflow-softflowd-ipfix.pcap"), 30),
            address(3),
            4739,
        ),
    ]
    items = interleave(streams, seed=size)
    assert_same(DecoderConfig(datagram_plans=plans), items, [size])


def test_v5_sampling_change_and_garbage_mid_run() -> None:
    """A v5 run whose header sampling interval changes midway, with a sequence
    reset, a truncated datagram and an unknown version inside it, decodes the
    same through the pre-pass as one by one."""
    base = moved(replicated(capture("w-nf5-12-datagrams.pcap"), 10), address(4), 2055)
    items: list[Datagram] = []
    for i, d in enumerate(base):
        payload = d.payload
        if i >= 40:
            # sampling mode 1, interval 100 (bytes 22-23 of the header)
            payload = payload[:22] + b"\x40\x64" + payload[24:]
        if i == 70:
            payload = payload[:16] + bytes(4) + payload[20:]
        items.append(d._replace(payload=payload))
    items.insert(50, items[50]._replace(payload=items[50].payload[:30]))
    items.insert(60, items[60]._replace(payload=b"\x00\x07" + bytes(70)))
    for size in (33, 64, 128):
        assert_same(DecoderConfig(), items, [size])


@pytest.mark.parametrize("plans", [True, False])
def test_pending_expiry_across_batches(plans: bool) -> None:
    """Data held before its template, expired by age and by a one-set cap
    across batch boundaries, is counted and released the same as one by one."""
    stream = replicated(capture("nf9-fortigate-data-before-template.pcap"), 4)
    items = [
        d._replace(exporter=address(5), exporter_port=2055, received_ms=1000 * i)
        for i, d in enumerate(stream)
    ]
    config = DecoderConfig(
        pending_max_age_ms=20_000, pending_max_records=1, datagram_plans=plans
    )
    assert_same(config, items, [33, 1, 129])


def test_sflow_rate_after_v9_records_in_one_batch() -> None:
    """v9 records decoded before an sFlow datagram of the same exporter
    announces a rate keep the rate known when they arrived (none: 0), as one
    by one."""
    nbar = capture("w-nf9-cisco-nbar.pcap")
    sflow = capture("w-goflow2-sflow.pcap")
    items = moved([*nbar, sflow[1]], address(1), 2056)
    # Hand check: the nbar capture announces no sampling (README), so its 5
    # data records carry rate 0; sFlow datagram 1 announces 16383 afterwards.
    records = FlowDecoder().decode_many(items)
    v9 = records[records["export_proto"] == ExportProtocol.NETFLOW_V9]
    assert len(v9) == 5
    assert v9["sampling_rate"].tolist() == [0] * 5
    assert_same(DecoderConfig(), items, [len(items)])


def test_bytearray_payloads_in_a_large_batch() -> None:
    """Payloads given as bytearray decode the same in a batch of 36 (through
    the pre-pass) as one by one: the capture's 30 records (30 tshark lines)
    three times."""
    stream = replicated(capture("w-nf5-12-datagrams.pcap"), 3)
    # Any: the signature says bytes; a receive buffer may well be a bytearray.
    items: list[Any] = [(bytearray(d.payload), *d[1:]) for d in stream]
    expected = FlowDecoder()
    assert sum(len(expected.decode(*item)) for item in items) == 30 * 3
    records = FlowDecoder().decode_many(items)
    assert len(records) == 30 * 3


@pytest.mark.parametrize(
    ("name", "copies"),
    [
        ("nf9-cisco-reordered-sequence.pcap", 12),
        ("nf9-nprobe-many-templates.pcap", 6),
        ("ipfix-cisco-ipv6-exporter.pcap", 40),
        ("w-ipfix-mikrotik.pcap", 120),
    ],
)
def test_sequence_breaks_inside_bulk_runs(name: str, copies: int) -> None:
    """One socket's replicated stream with the capture's own sequence gaps
    and reordering, plus datagrams dropped, repeated and swapped, goes
    through walk_many's bulk path (runs of 128 and more) and leaves the
    same sequence state, gap and loss counts and records as one by one."""
    stream = replicated(capture(name), copies)
    items = [d._replace(exporter=address(6), exporter_port=2055) for d in stream]
    del items[150]  # a lost datagram
    items.insert(200, items[190])  # a duplicate, late
    items[240], items[241] = items[241], items[240]  # reordered
    for size in (256, 1024):
        assert_same(DecoderConfig(), items, [size])


def test_options_announcements_inside_bulk_runs() -> None:
    """A v9 exporter that re-announces its sampling rate every four
    datagrams (the 212-byte options datagram: four records, each with rate
    30000 in IEs 50 and 34), and for a while announces 20000 instead, then
    flips between the two: the runs walk_many reads in bulk give each record
    the rate one-by-one decoding gives it, and the same counters (options
    records included)."""
    stream = replicated(capture("nf9-options-sampling-30000.pcap"), 100)
    items = [d._replace(exporter=address(7), exporter_port=2055) for d in stream]
    old, new = (30000).to_bytes(4, "big"), (20000).to_bytes(4, "big")
    assert items[1].payload.count(old) == 8
    for index in [*range(161, 241, 4), 281, 289, 297]:
        payload = items[index].payload
        assert len(payload) == 212, index
        items[index] = items[index]._replace(payload=payload.replace(old, new))
    for size in (129, 256, 1024):
        assert_same(DecoderConfig(), items, [size])
    records, _ = one_by_one(DecoderConfig(), items)
    assert set(records["sampling_rate"].tolist()) == {30000, 20000}


@pytest.mark.parametrize(
    ("name", "copies"),
    [
        ("nf9-nprobe-many-templates.pcap", 6),
        ("w-pynetflow-softflowd-ipfix.pcap", 150),
        ("ipfix-physical-interfaces.pcap", 300),
        ("ipfix-mpls-labels.pcap", 300),
    ],
)
def test_options_resent_inside_bulk_runs(name: str, copies: int) -> None:
    """Captures whose datagrams carry options records (sampling, system init
    time) next to templates and data, replicated on one socket, decode the
    same in large batches as one by one."""
    stream = replicated(capture(name), copies)
    items = [d._replace(exporter=address(8), exporter_port=4739) for d in stream]
    for size in (256, 1024):
        assert_same(DecoderConfig(), items, [size])


def test_templates_shared_by_plans_read_at_once_or_plan_by_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Cisco ASA capture's ten datagram layouts share four templates,
    the FortiGate's (uptime-relative times) three: walk_many reads each
    template's records across its plans at once, and if that fails (a bug)
    plan by plan; either way the records and state are one-by-one
    decoding's."""
    items = [
        d._replace(exporter=address(9), exporter_port=2055)
        for d in replicated(capture("nf9-cisco-asa-nsel.pcap"), 60)
    ]
    items += [
        d._replace(exporter=address(10), exporter_port=2055)
        for d in replicated(capture("nf9-fortigate-data-before-template.pcap"), 60)
    ]
    calls = {"template": 0, "plan": 0}
    by_template = plans.BulkQueue._by_template
    by_plan = plans.BulkQueue._by_plan

    def counting_template(self: Any, *args: Any) -> Any:
        calls["template"] += 1
        return by_template(self, *args)

    def counting_plan(self: Any, *args: Any) -> Any:
        calls["plan"] += 1
        return by_plan(self, *args)

    monkeypatch.setattr(plans.BulkQueue, "_by_template", counting_template)
    monkeypatch.setattr(plans.BulkQueue, "_by_plan", counting_plan)
    assert_same(DecoderConfig(), items, [256])
    assert calls["template"] > 0
    assert calls["plan"] == 0

    def failing(self: Any, *args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(plans.BulkQueue, "_by_template", failing)
    calls["plan"] = 0
    assert_same(DecoderConfig(), items, [256])
    assert calls["plan"] > 0


def _packet_space_stream(version: int) -> list[Item]:
    """An exporter whose options records announce samplingPacketInterval 1
    (IE 305) and samplingPacketSpace (IE 306) 99, then 199 from the 68th
    data datagram on, each datagram with four records of template 256."""

    def message(seq: int, sets: list[tuple[int, bytes]]) -> bytes:
        body = b"".join(struct.pack(">HH", sid, 4 + len(b)) + b for sid, b in sets)
        if version == 9:
            head = struct.pack(">HHIIII", 9, len(sets), 100000, 1700000000, seq, 1)
        else:
            head = struct.pack(">HHIII", 10, 16 + len(body), 1700000000, seq, 1)
        return head + body

    data_template = (0 if version == 9 else 2, struct.pack(">HH4H", 256, 2, 8, 4, 1, 8))
    if version == 9:
        # scope System (1), 4 bytes; 305 and 306
        options = (1, struct.pack(">HHH6H", 257, 4, 8, 1, 4, 305, 4, 306, 4))
    else:
        # scope observationDomainId (149); 305 and 306
        options = (3, struct.pack(">HHH6H", 257, 3, 1, 149, 4, 305, 4, 306, 4))

    def datagram(i: int, space: int) -> bytes:
        seq = 1 + i if version == 9 else 4 * i
        records = struct.pack(">IQ", 0x0A000001, 100) * 4
        return message(seq, [(257, struct.pack(">III", 1, 1, space)), (256, records)])

    stream = [message(0, [data_template, options])]
    stream += [datagram(i, 99 if i < 67 else 199) for i in range(131)]
    return [(p, address(11), 2055, 1000 + i) for i, p in enumerate(stream)]


@pytest.mark.parametrize("version", [9, 10])
def test_packet_space_change_inside_a_bulk_run(version: int) -> None:
    """A rate announced through samplingPacketSpace alone changing (rate
    (interval + space) / interval: 100, then 200) is walked, not taken as a
    repeat: records before it carry 100, after it 200, as one by one
    (found by a differential fuzzer: IE 306 was left out of the compared
    bytes)."""
    items = _packet_space_stream(version)
    decoder = FlowDecoder()
    parts = [decoder.decode_many(items[:4]), decoder.decode_many(items[4:])]
    rates = np.concatenate(parts)["sampling_rate"]
    # 4 records per data datagram: 67 datagrams at 1 + 99, 64 at 1 + 199.
    assert rates.tolist() == [100] * (4 * 67) + [200] * (4 * 64)
    assert_same(DecoderConfig(), items, [4, 1024])


def alternate(*streams: list[Datagram]) -> list[Datagram]:
    """The streams' datagrams taken in turn, one from each."""
    out: list[Datagram] = []
    for k in range(max(len(s) for s in streams)):
        out.extend(s[k] for s in streams if k < len(s))
    return out


@pytest.fixture
def mixed_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many walk_many runs accounted in bulk held several sockets."""
    seen: list[int] = []
    run = netflow_v9.TemplatedDecoder._run

    def spy(  # noqa: PLR0917 - the spied method's signature
        self: Any, i: int, j: int, call: Any, tables: Any, queue: Any, batch: Any
    ) -> bool:
        candidates = set(call.taken[i:j].tolist())
        if len({id(call.owners[q]) for q in candidates}) > 1:
            seen.append(j - i)
        return run(self, i, j, call, tables, queue, batch)

    monkeypatch.setattr(netflow_v9.TemplatedDecoder, "_run", spy)
    return seen


def test_alternating_sockets_share_a_sampling_domain(mixed_runs: list[int]) -> None:
    """Two v9 sockets of one address and source id (one sampling domain)
    whose datagrams alternate, each re-announcing rate 30000 every four
    datagrams, one of them announcing 20000 for a while: each record
    carries the rate of its moment in arrival order, the other socket's
    announcement included, as one by one; the runs go through walk_many's
    bulk path with both sockets in them."""
    old, new = (30000).to_bytes(4, "big"), (20000).to_bytes(4, "big")
    first = moved(
        replicated(capture("nf9-options-sampling-30000.pcap"), 100), address(10), 2055
    )
    second = moved(
        replicated(capture("nf9-options-sampling-30000.pcap"), 100), address(10), 2056
    )
    for index in range(161, 241, 4):
        payload = first[index].payload
        assert len(payload) == 212, index
        first[index] = first[index]._replace(payload=payload.replace(old, new))
    # Half a period apart: each socket's announcement holds for two of
    # the other's datagrams.
    items = first[:2] + alternate(first[2:], second)
    for size in (128, 256, 1024):
        assert_same(DecoderConfig(), items, [size])
    assert mixed_runs
    records, _ = one_by_one(DecoderConfig(), items)
    by_port = {
        port: set(records["sampling_rate"][records["exporter_port"] == port].tolist())
        for port in (2055, 2056)
    }
    # The second socket announces only 30000, yet some of its records
    # carry the 20000 the first one announced for their shared domain.
    assert by_port == {2055: {30000, 20000}, 2056: {30000, 20000}}


@pytest.mark.parametrize("size", [128, 256, 1024])
def test_cisco_two_domains_capture_alternating_ports(
    size: int, mixed_runs: list[int]
) -> None:
    """The Cisco capture whose two observation domains come from two ports
    of one address, datagram about datagram, replicated: walk_many takes
    runs that hold both sockets, with the same records, counters and
    sequence state as one by one."""
    items = replicated(capture("ipfix-cisco-two-domains.pcap"), 400)
    assert len({d.exporter_port for d in items}) == 2
    assert_same(DecoderConfig(), items, [size])
    assert mixed_runs


@pytest.mark.parametrize("plans", [True, False])
def test_held_data_of_alternating_sockets_under_one_bound(plans: bool) -> None:
    """FortiGate data that comes before its template, from two sockets in
    turn, under a held-data bound of one set shared by both: what is held,
    pushed out and released is the same as one by one."""
    stream = replicated(capture("nf9-fortigate-data-before-template.pcap"), 6)
    items = alternate(
        moved(stream, address(11), 2055), moved(stream, address(11), 2056)
    )
    items = [d._replace(received_ms=100 * i) for i, d in enumerate(items)]
    config = DecoderConfig(pending_max_records=1, datagram_plans=plans)
    for size in (128, 1024):
        assert_same(config, items, [size])
