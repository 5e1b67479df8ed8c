"""Property tests: the decoder survives mutated real datagrams and floods.

Seeds are the datagrams of every shared capture.  Hypothesis mutates them
(bit flips, truncation, length and count fields set to extremes, splices of
two datagrams, inserted bytes) and builds template floods (many ids, huge
field counts, odd field lengths, withdrawals) from many exporters.  After
every datagram the decoder must not have hit an unexpected exception
(``decoder_bug``), must return FLOW_DTYPE, must count the datagram, and
must keep templates, held data, exporters and sampling entries under the
configured bounds.

Examples per test: ``SAMPLEFLOW_FUZZ_EXAMPLES`` (default 200, for CI).
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.collect.pcap import read_capture
from edge_agent.flows.decoder import DecoderConfig, FlowDecoder
from edge_agent.flows.schema import FLOW_DTYPE
from tests.conftest import SHARED_DIR, require_shared

EXAMPLES = int(os.environ.get("SAMPLEFLOW_FUZZ_EXAMPLES", "200"))

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Small bounds so that examples reach them.
CONFIG = DecoderConfig(
    pending_max_records=32,
    pending_max_bytes=64 * 1024,
    pending_max_age_ms=60_000,
    max_templates_per_exporter=16,
    max_template_fields=64,
    max_exporters=8,
)

EXPORTERS = [b"\x00" * 10 + b"\xff\xff" + bytes([192, 0, 2, i]) for i in range(12)]


def _load_corpus() -> list[list[bytes]]:
    """Datagram payloads of every shared capture, one list per capture."""
    folder = SHARED_DIR / "captures"
    if not folder.is_dir():
        return []
    corpus = []
    for path in sorted(folder.glob("*.pcap")):
        datagrams, _ = read_capture(path)
        if datagrams:
            corpus.append([d.payload for d in datagrams])
    return corpus


CORPUS = _load_corpus()
FLAT = [payload for capture in CORPUS for payload in capture] or [b""]


@pytest.fixture(autouse=True)
def _corpus_present() -> None:
    require_shared("captures")
    assert CORPUS, "no datagrams in the shared captures"


# --- where the length and count fields are, from the wire formats ---------


def field_offsets(payload: bytes) -> tuple[list[int], list[int]]:
    """Offsets of u16 and u32 length/count fields (header and set headers).

    NetFlow v5/v9: count at 2; v9 sets from 20 (id, length); IPFIX: message
    length at 2, sets from 16; template records: (id, field count) after
    each set header.  sFlow v5: every 4-byte word is a candidate (lengths
    and counts are u32 there).
    """
    u16: list[int] = [2]
    u32: list[int] = []
    if payload[:4] == b"\x00\x00\x00\x05":
        return [], list(range(0, len(payload) - 3, 4))
    start = {9: 20, 10: 16}.get(int.from_bytes(payload[:2], "big"))
    if start is None:
        return u16, u32
    offset = start
    while offset + 4 <= len(payload):
        set_id, length = struct.unpack_from(">HH", payload, offset)
        u16 += [offset, offset + 2]
        if set_id in (0, 1, 2, 3) and offset + 8 <= len(payload):
            u16 += [offset + 4, offset + 6]  # first template id, field count
        if length < 4:
            break
        offset += length
    return u16, u32


# --- mutation strategies ---------------------------------------------------

EXTREME_U16 = [0, 1, 3, 4, 5, 0x7FFF, 0xFFFE, 0xFFFF]
EXTREME_U32 = [0, 1, 4, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 20]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """One seed datagram with one to four mutations applied."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(
                ["flip", "truncate", "u16", "u32", "splice", "insert", "zero_tail"]
            )
        )
        if kind == "flip" and data:
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "u16":
            u16, _ = field_offsets(bytes(data))
            u16 = [o for o in u16 if o + 2 <= len(data)]
            if u16:
                offset = draw(st.sampled_from(u16))
                value = draw(st.sampled_from([*EXTREME_U16, len(data), len(data) + 1]))
                struct.pack_into(">H", data, offset, value & 0xFFFF)
        elif kind == "u32":
            _, u32 = field_offsets(bytes(data))
            if u32:
                offset = draw(st.sampled_from(u32))
                struct.pack_into(">I", data, offset, draw(st.sampled_from(EXTREME_U32)))
        elif kind == "splice":
            other = draw(st.sampled_from(FLAT))
            cut = draw(st.integers(0, len(data)))
            data = data[:cut] + other[draw(st.integers(0, len(other))) :]
        elif kind == "insert":
            cut = draw(st.integers(0, len(data)))
            data = data[:cut] + draw(st.binary(max_size=64)) + data[cut:]
        elif kind == "zero_tail" and data:
            cut = draw(st.integers(0, len(data) - 1))
            data[cut:] = bytes(len(data) - cut)
    return bytes(data[:65535])


@st.composite
def mutated_stream(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """A capture's first datagrams as sent (templates learnt), then mutants,
    from one to three exporters."""
    capture = draw(st.sampled_from(CORPUS))
    prefix = capture[: draw(st.integers(0, min(len(capture), 8)))]
    mutants = draw(st.lists(mutated(capture), min_size=1, max_size=6))
    exporters = draw(st.lists(st.sampled_from(EXPORTERS), min_size=1, max_size=3))
    payloads = prefix + mutants
    return [(p, exporters[i % len(exporters)]) for i, p in enumerate(payloads)]


def _field_specs(rnd: random.Random, count: int, ipfix: bool, style: str) -> bytes:
    """``count`` field specifiers; 'valid' ones would be accepted."""
    specs = []
    for _ in range(count):
        element = rnd.randrange(1, 0x8000 if style == "valid" or not ipfix else 0x10000)
        if style == "valid":
            length = rnd.choice([1, 2, 4, 8, 16])
        else:
            length = rnd.choice([0, 1, 3, 4, 255, 0xFFFE, 0xFFFF, rnd.randrange(65536)])
        spec = struct.pack(">HH", element, length)
        if ipfix and element & 0x8000:
            spec += struct.pack(">I", rnd.choice([9, 29305, 0xFFFFFFFF]))
        specs.append(spec)
    return b"".join(specs)


@st.composite
def template_flood(draw: st.DrawFn) -> bytes:
    """A v9 or IPFIX message of (options) template records: many ids, some
    well-formed (to reach the template bound), some with field counts far
    above the bound or odd lengths, withdrawals, then data sets."""
    ipfix = draw(st.booleans())
    options = draw(st.booleans())
    # One drawn seed: drawing each byte through hypothesis is far too slow.
    rnd = random.Random(draw(st.integers(0, 2**64 - 1)))
    records = []
    # Some messages hold only well-formed templates, enough to pass the
    # per-exporter bound on their own.
    styles = ["valid"] if rnd.random() < 0.3 else ["valid", "huge", "odd", "withdraw"]
    for _ in range(draw(st.integers(1, 60))):
        style = rnd.choice(styles)
        reserved = rnd.random() < 0.1
        template_id = rnd.randrange(256) if reserved else rnd.randrange(256, 65536)
        fields = {
            "valid": rnd.randrange(1, 12),
            "huge": rnd.randrange(65, 2000),
            "odd": rnd.randrange(0, 40),
            "withdraw": 0,
        }[style]
        # A huge template is cut short: its field count says more than follows.
        specs = _field_specs(rnd, min(fields, 80), ipfix, style)
        if options and ipfix:
            scope = rnd.randrange(0, fields + 2)
            records.append(struct.pack(">HHH", template_id, fields, scope) + specs)
        elif options:
            scope = 4 * rnd.randrange(0, min(fields, 80) + 1)
            option_bytes = max(len(specs) - scope, 0)
            header = struct.pack(">HHH", template_id, scope, option_bytes)
            records.append(header + specs)
        else:
            records.append(struct.pack(">HH", template_id, fields) + specs)
    body = b"".join(records)
    set_id = (3 if options else 2) if ipfix else (1 if options else 0)
    sets = [struct.pack(">HH", set_id, (4 + len(body)) & 0xFFFF) + body]
    for _ in range(rnd.randrange(4)):
        data = rnd.randbytes(rnd.randrange(300))
        sets.append(struct.pack(">HH", rnd.randrange(256, 0x10000), 4 + len(data)))
        sets.append(data)
    payload = b"".join(sets)
    domain = rnd.randrange(4)
    if ipfix:
        length = (16 + len(payload)) & 0xFFFF
        header = struct.pack(">HHIII", 10, length, 1700000000, 0, domain)
    else:
        header = struct.pack(">HHIIII", 9, len(records), 1000, 1700000000, 0, domain)
    return (header + payload)[:65535]


# --- the invariants --------------------------------------------------------


class Checked:
    """A decoder fed one datagram at a time, invariants checked each time."""

    def __init__(self, config: DecoderConfig = CONFIG) -> None:
        self.config = config
        self.decoder = FlowDecoder(config)
        self.fed = 0
        self.returned = 0

    def feed(self, payload: bytes, exporter: bytes, now_ms: int) -> None:
        out = self.decoder.decode(payload, exporter, 2055, now_ms)
        self.fed += 1
        self.returned += len(out)
        self.check(out)

    def check(self, out: Any) -> None:
        decoder, config = self.decoder, self.config
        assert isinstance(out, np.ndarray)
        assert out.dtype == FLOW_DTYPE
        assert out.ndim == 1
        totals = decoder.stats.totals()
        assert totals.errors["decoder_bug"] == 0, totals.errors
        assert totals.datagrams == self.fed
        assert totals.records == self.returned
        assert len(decoder.stats.by_exporter) <= config.max_exporters + 1
        templates = decoder.templates
        assert len(templates.per_exporter) <= config.max_exporters
        assert all(
            n <= config.max_templates_per_exporter
            for n in templates.per_exporter.values()
        )
        assert len(templates.templates) <= (
            config.max_templates_per_exporter * config.max_exporters
        )
        pending = decoder.pending
        assert 0 <= pending.sets <= config.pending_max_records
        assert 0 <= pending.bytes <= config.pending_max_bytes
        assert sum(h.live for h in pending.queue) == pending.sets
        assert len(decoder.sampling.announced) <= decoder.sampling.max_entries
        assert len(decoder.sequences.streams) <= decoder.sequences.max_streams


@FUZZ
@given(stream=mutated_stream())
def test_mutated_captures_never_break_the_decoder(
    stream: list[tuple[bytes, bytes]],
) -> None:
    """Mutated real datagrams: no unexpected exception, FLOW_DTYPE out,
    every datagram and record counted, every bound held."""
    checked = Checked()
    for i, (payload, exporter) in enumerate(stream):
        checked.feed(payload, exporter, 1_700_000_000_000 + i)


@FUZZ
@given(
    floods=st.lists(
        st.tuples(template_flood(), st.sampled_from(EXPORTERS)),
        min_size=1,
        max_size=12,
    )
)
def test_template_floods_stay_bounded(floods: list[tuple[bytes, bytes]]) -> None:
    """Floods of templates with random ids and huge field counts from more
    exporters than the bound keep templates and held data bounded."""
    checked = Checked()
    for i, (payload, exporter) in enumerate(floods):
        checked.feed(payload, exporter, 1_700_000_000_000 + i * 1000)


@FUZZ
@given(payload=st.binary(max_size=2048), exporter=st.sampled_from(EXPORTERS))
def test_random_bytes(payload: bytes, exporter: bytes) -> None:
    """Random bytes, and random bytes behind each protocol's version, are
    counted and never break the decoder."""
    checked = Checked()
    for prefix in (b"", b"\x00\x05", b"\x00\x09", b"\x00\x0a", b"\x00\x00\x00\x05"):
        checked.feed(prefix + payload, exporter, 1_700_000_000_000)


@FUZZ
@given(stream=mutated_stream())
def test_decode_many_equals_decode_one_by_one(
    stream: list[tuple[bytes, bytes]],
) -> None:
    """decode_many on mutated input gives the same records as decode on
    each datagram in turn (the batch path has no extra failure modes)."""
    one = FlowDecoder(CONFIG)
    many = FlowDecoder(CONFIG)
    datagrams = [(p, e, 2055, 1_700_000_000_000 + i) for i, (p, e) in enumerate(stream)]
    singles = [one.decode(*d) for d in datagrams]
    expected = np.concatenate(singles) if singles else np.zeros(0, FLOW_DTYPE)
    got = many.decode_many(datagrams)
    assert got.dtype == FLOW_DTYPE
    assert got.tobytes() == expected.tobytes()
    assert many.stats.totals().errors == one.stats.totals().errors


# --- a targeted bound: held data across hold/release cycles ----------------


def _ipfix(sets: list[bytes]) -> bytes:
    body = b"".join(sets)
    return struct.pack(">HHIII", 10, 16 + len(body), 1700000000, 0, 1) + body


def _set(set_id: int, body: bytes) -> bytes:
    return struct.pack(">HH", set_id, 4 + len(body)) + body


def test_template_bound_refuses_the_excess() -> None:
    """40 well-formed templates from one exporter: 16 (the bound) are kept,
    the other 24 are refused and counted as template_limit."""
    decoder = FlowDecoder(CONFIG)
    records = b"".join(
        struct.pack(">HHHHHH", 256 + i, 2, 8, 4, 12, 4) for i in range(40)
    )
    decoder.decode(_ipfix([_set(2, records)]), EXPORTERS[0], 2055, 1000)
    counters = decoder.stats.exporter(EXPORTERS[0], 2055)
    assert decoder.templates.count(EXPORTERS[0], 2055) == 16
    assert counters.errors["template_limit"] == 40 - 16


def test_pending_bound_drops_the_oldest() -> None:
    """100 data sets for unknown templates: 32 (the bound) are held, the
    68 oldest are dropped and counted as pending_expired."""
    decoder = FlowDecoder(CONFIG)
    for i in range(100):
        payload = _ipfix([_set(1000 + i, bytes(16))])
        decoder.decode(payload, EXPORTERS[0], 2055, 1000 + i)
    counters = decoder.stats.exporter(EXPORTERS[0], 2055)
    assert decoder.pending.sets == 32
    assert counters.pending_held == 100
    assert counters.pending_expired == 100 - 32


def test_pending_queue_stays_bounded_across_release_cycles() -> None:
    """One set waits for a template that never comes while 2,000 others are
    held and released (data, template, withdrawal): the store keeps no
    more entries than its set bound."""
    decoder = FlowDecoder(CONFIG)
    exporter = EXPORTERS[0]

    def feed(payload: bytes) -> None:
        decoder.decode(payload, exporter, 2055, 1000)

    feed(_ipfix([_set(999, b"x" * 100)]))
    for i in range(2000):
        template_id = 256 + i % 100
        feed(_ipfix([_set(template_id, bytes(8))]))
        template = struct.pack(">HHHHHH", template_id, 2, 8, 4, 12, 4)
        feed(_ipfix([_set(2, template)]))
        feed(_ipfix([_set(2, struct.pack(">HH", template_id, 0))]))  # withdraw
    assert decoder.pending.sets == 1
    assert len(decoder.pending.queue) <= CONFIG.pending_max_records


def test_corpus_is_the_shared_captures() -> None:
    """The seeds really are the shared captures (not an empty corpus)."""
    names = sorted(p.name for p in Path(SHARED_DIR / "captures").glob("*.pcap"))
    assert len(CORPUS) == len(names) > 40
