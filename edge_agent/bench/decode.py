"""Decode throughput: our FlowDecoder against the ``netflow`` PyPI package.

The inputs are the shared captures, read once into memory and grouped by
export protocol (NetFlow v5, NetFlow v9, IPFIX with fixed-length templates
only, sFlow v5).  For each protocol both decoders get the same datagrams
in capture order (templates first, as captured), replicated until a round
holds at least ``min_round_records`` records, and rounds are repeated for
``seconds``, alternating rounds of the two decoders.

Each replica of a capture continues its export streams: the header
sequence numbers are moved on by what one pass of the capture advances
them, so the decoder sees a live exporter (with the capture's own gaps and
reordering), not the same datagrams over and over, which its sequence
tracking would count as late duplicates.  Replicas are received after the
capture, one millisecond apart (all datagrams of a replica in the same
millisecond): at these rates an exporter's datagrams arrive microseconds
apart, not minutes apart as in some captures, whose receive times would
otherwise span more than the held-data age within one batch.  The
renumbered datagrams are made before a round starts, outside the timing,
and both decoders get the same bytes.

Our decoder's rounds hold enough replicas of every capture to fill whole
``batch``-datagram calls (the collector's batches are full when exporters
send this fast); the ``netflow`` package decodes datagram by datagram, so
its rounds only hold ``min_round_records`` records.  The ratio is per
datagram, on replicas of the same captures in the same proportions.

The rates reported are medians over rounds, one from ``time.perf_counter``
and one per second of process CPU time (this process is single-threaded).
On a busy machine wall time includes waiting for a core, so the targets
are judged on CPU time, and so is the ratio.

For sFlow the rate counts samples, flow and counter samples alike: both
are decoded, and a capture of counter samples alone yields no record.

The ratio is ours over theirs in datagrams per CPU second on identical
input, so it compares speed even where the two decoders disagree about how
many records a datagram holds (options records, sets they cannot decode).

The ``netflow`` package keys templates by template id only, so it gets
one template cache per capture (as if each capture came from its own
collector); without that, captures would overwrite each other's
templates.  It has no sFlow decoder.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import importlib
import importlib.util
import json
import statistics
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import structlog

from edge_agent.collect.datagram import Datagram
from edge_agent.collect.pcap import CaptureError, read_capture
from edge_agent.flows.decoder import DecoderConfig, FlowDecoder

PROTOCOLS: tuple[str, ...] = ("netflow_v5", "netflow_v9", "ipfix", "sflow")

LABELS = {
    "netflow_v5": "NetFlow v5",
    "netflow_v9": "NetFlow v9",
    "ipfix": "IPFIX (fixed-length)",
    "sflow": "sFlow v5",
}

#: Records (sFlow: samples, flow and counter alike) per CPU second we aim for.
TARGET_RATES = {
    "netflow_v5": 5_000_000,
    "netflow_v9": 2_000_000,
    "ipfix": 2_000_000,
    "sflow": 300_000,
}

#: How many times faster than the netflow package we aim to be.
TARGET_RATIO = 10.0


#: Rounds of this many datagrams or more start with a full garbage collection.
_COLLECT_FROM = 10_000


class BenchError(Exception):
    """Raised when the benchmark has no usable input (message says why)."""


def classify(payload: bytes) -> str | None:
    """Tell the export protocol of a datagram from its version field."""
    if len(payload) < 4:
        return None
    version16 = struct.unpack_from(">H", payload)[0]
    if version16 == 5:
        return "netflow_v5"
    if version16 == 9:
        return "netflow_v9"
    if version16 == 10:
        return "ipfix"
    if struct.unpack_from(">I", payload)[0] == 5:
        return "sflow"
    return None  # NetFlow v1 and anything else: not benchmarked


def _has_variable_length_template(capture: Path) -> bool:
    """True if the capture's tshark summary lists a variable-length template.

    Without a summary the capture is walked for IPFIX template sets with a
    field length of 65535.
    """
    summary = capture.with_name(capture.name + ".summary.json")
    if summary.exists():
        with contextlib.suppress(ValueError, OSError):
            info = json.loads(summary.read_text())
            return any(t.get("varlen") for t in info.get("templates", []))
    datagrams, _ = read_capture(capture)
    return any(_ipfix_varlen(d.payload) for d in datagrams)


def _ipfix_varlen(payload: bytes) -> bool:
    offset = 16
    while offset + 4 <= len(payload):
        set_id, length = struct.unpack_from(">HH", payload, offset)
        if length < 4:
            return False
        if set_id in (2, 3):
            body = payload[offset + 4 : offset + length]
            for i in range(0, len(body) - 3, 4):
                if body[i + 2 : i + 4] == b"\xff\xff":
                    return True
        offset += length
    return False


@dataclass
class Stream:
    """The datagrams of one protocol from one capture, in capture order."""

    capture: str
    datagrams: list[Datagram]


def load_inputs(
    captures_dir: Path, skipped: list[str] | None = None
) -> dict[str, list[Stream]]:
    """Read every ``*.pcap`` / ``*.pcapng`` and group datagrams by protocol.

    Files that cannot be read are named in ``skipped`` (``name: why``);
    :class:`BenchError` when the folder is missing or none of its files
    holds a flow export.
    """
    if not captures_dir.exists():
        raise BenchError(f"captures folder {captures_dir} does not exist")
    if not captures_dir.is_dir():
        raise BenchError(f"--captures {captures_dir} is not a folder")
    files = sorted(
        p for p in captures_dir.iterdir() if p.suffix in (".pcap", ".pcapng")
    )
    if not files:
        raise BenchError(f"no .pcap or .pcapng files in {captures_dir}")
    inputs: dict[str, list[Stream]] = {p: [] for p in PROTOCOLS}
    unread: list[str] = []
    for path in files:
        try:
            datagrams, _ = read_capture(path)
        except CaptureError as exc:
            unread.append(f"{path.name}: {exc}")
            continue
        by_protocol: dict[str, list[Datagram]] = {}
        for datagram in datagrams:
            protocol = classify(datagram.payload)
            if protocol is not None:
                by_protocol.setdefault(protocol, []).append(datagram)
        for protocol, selected in by_protocol.items():
            if protocol == "ipfix" and _has_variable_length_template(path):
                continue
            inputs[protocol].append(Stream(path.name, selected))
    if not any(inputs.values()):
        raise BenchError(
            f"none of the {len(files)} capture files in {captures_dir} holds a "
            "flow export the bench can use"
            + (f" (unreadable: {'; '.join(unread)})" if unread else "")
        )
    if skipped is not None:
        skipped.extend(unread)
    return inputs


_U32 = struct.Struct(">I")
_MASK = 0xFFFFFFFF

#: (tracker: "flows" or "sflow", stream key as that tracker keys it)
_StreamKey = tuple[str, tuple[bytes, int, int, int]]


def locate_sequence(datagram: Datagram) -> tuple[int, _StreamKey, int] | None:
    """Where a datagram's header sequence number is, and the stream it counts.

    Returns (byte offset, stream key, sequence number), or None for a
    datagram without one (NetFlow v1, anything too short).  The key is
    the decoder's own: (exporter, port, version, domain) for NetFlow and
    IPFIX, (exporter + agent, port, 20, sub-agent) for sFlow.
    """
    payload = datagram.payload
    size = len(payload)
    protocol = classify(payload)
    exporter, port = datagram.exporter, datagram.exporter_port
    if protocol == "netflow_v5" and size >= 24:
        domain = struct.unpack_from(">H", payload, 20)[0]
        return (
            16,
            ("flows", (exporter, port, 5, domain)),
            _U32.unpack_from(payload, 16)[0],
        )
    if protocol == "netflow_v9" and size >= 20:
        domain = _U32.unpack_from(payload, 16)[0]
        return (
            12,
            ("flows", (exporter, port, 9, domain)),
            _U32.unpack_from(payload, 12)[0],
        )
    if protocol == "ipfix" and size >= 16:
        domain = _U32.unpack_from(payload, 12)[0]
        return (
            8,
            ("flows", (exporter, port, 10, domain)),
            _U32.unpack_from(payload, 8)[0],
        )
    if protocol == "sflow" and size >= 8:
        address_type = _U32.unpack_from(payload, 4)[0]
        agent_length = {0: 0, 1: 4, 2: 16}.get(address_type)
        if agent_length is None or size < 20 + agent_length:
            return None
        agent = payload[8 : 8 + agent_length]
        if agent_length == 4:
            agent = b"\x00" * 10 + b"\xff\xff" + agent
        elif agent_length == 0:
            agent = bytes(16)
        sub_agent, seq = struct.unpack_from(">II", payload, 8 + agent_length)
        key = (exporter + agent, port, 20, sub_agent)
        return 12 + agent_length, ("sflow", key), seq
    return None


class Replicas:
    """Replicas of some streams that continue their exporters' sequences.

    Replica 0 is the capture as it is; replica ``i`` moves every header
    sequence number of a stream on by ``i`` times what one pass of the
    capture advances it (the decoder's expected next number after a pass,
    minus the first number seen), so consecutive replicas look like one
    exporter that kept sending.  Streams the decoder cannot follow (no
    expected number after a pass) keep their numbers.  Every datagram of
    replica ``i`` is received ``i`` ms after the capture's last datagram.
    """

    def __init__(self, streams: Sequence[Stream]) -> None:
        self.streams = list(streams)
        #: per stream, per datagram: (sequence offset, first seq, span) or None
        self.plans: list[list[tuple[int, int, int] | None]] = []
        #: per stream: the last receive time of the capture (UTC ms)
        self.last_ms: list[int] = []
        for stream in self.streams:
            decoder = FlowDecoder(DecoderConfig())
            located = [locate_sequence(d) for d in stream.datagrams]
            decoder.decode_many(stream.datagrams)
            trackers = {
                "flows": decoder.sequences.streams,
                "sflow": decoder.sflow.sequences.streams,
            }
            spans: dict[_StreamKey, int] = {}
            firsts: dict[_StreamKey, int] = {}
            for item in located:
                if item is not None:
                    firsts.setdefault(item[1], item[2])
            for key, first in firsts.items():
                state = trackers[key[0]].get(key[1])
                if state is not None and state.expected is not None:
                    spans[key] = (state.expected - first) & _MASK
            self.plans.append(
                [
                    (item[0], item[2], spans[item[1]])
                    if item is not None and spans.get(item[1])
                    else None
                    for item in located
                ]
            )
            # Replicas arrive after the capture, one millisecond apart.
            self.last_ms.append(
                max((d.received_ms for d in stream.datagrams), default=0)
            )

    def replica(self, index: int) -> list[Stream]:
        """Replica ``index`` of every stream (0: the datagrams as captured)."""
        if index == 0:
            return self.streams
        out = []
        for stream, plan, last_ms in zip(
            self.streams, self.plans, self.last_ms, strict=True
        ):
            datagrams = []
            received_ms = last_ms + index
            for datagram, where in zip(stream.datagrams, plan, strict=True):
                if where is None:
                    datagrams.append(datagram._replace(received_ms=received_ms))
                    continue
                offset, seq, span = where
                payload = datagram.payload
                number = _U32.pack((seq + index * span) & _MASK)
                datagrams.append(
                    datagram._replace(
                        payload=payload[:offset] + number + payload[offset + 4 :],
                        received_ms=received_ms,
                    )
                )
            out.append(Stream(stream.capture, datagrams))
        return out

    def rounds(self, factor: int) -> Callable[[], list[Stream]]:
        """A function returning the next round: ``factor`` replicas per stream,
        in stream order, each round carrying on from the one before."""
        served = 0

        def next_round() -> list[Stream]:
            nonlocal served
            parts = [self.replica(served + 1 + i) for i in range(factor)]
            served += factor
            return [
                Stream(
                    stream.capture,
                    [d for part in parts for d in part[n].datagrams],
                )
                for n, stream in enumerate(self.streams)
            ]

        return next_round


@dataclass
class Measurement:
    """One decoder's throughput on one protocol's inputs."""

    datagrams_per_round: int
    records_per_round: int
    rounds: int
    #: median seconds per round (wall clock, perf_counter)
    seconds_per_round: float
    #: median process CPU seconds per round (process_time)
    cpu_seconds_per_round: float
    errors_per_round: int = 0
    #: sFlow counter samples decoded per round (0 for other protocols)
    counter_samples_per_round: int = 0
    #: fewest process CPU seconds a round took
    best_cpu_seconds_per_round: float = 0.0
    #: sequence gaps our decoder counted per round (the captures' own)
    sequence_gaps_per_round: int = 0
    #: our decode errors per round by reason
    error_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def records_per_second(self) -> float:
        return self.records_per_round / self.seconds_per_round

    @property
    def samples_per_second(self) -> float:
        """Records plus sFlow counter samples per second."""
        samples = self.records_per_round + self.counter_samples_per_round
        return samples / self.seconds_per_round

    @property
    def records_per_cpu_second(self) -> float:
        return self.records_per_round / max(self.cpu_seconds_per_round, 1e-9)

    @property
    def samples_per_cpu_second(self) -> float:
        """Like :attr:`samples_per_second`, per second of process CPU time."""
        samples = self.records_per_round + self.counter_samples_per_round
        return samples / max(self.cpu_seconds_per_round, 1e-9)

    @property
    def best_samples_per_cpu_second(self) -> float:
        """Samples per CPU second of the fastest round."""
        samples = self.records_per_round + self.counter_samples_per_round
        return samples / max(self.best_cpu_seconds_per_round, 1e-9)

    @property
    def datagrams_per_second(self) -> float:
        return self.datagrams_per_round / self.seconds_per_round

    @property
    def datagrams_per_cpu_second(self) -> float:
        return self.datagrams_per_round / max(self.cpu_seconds_per_round, 1e-9)

    @property
    def cpu_share(self) -> float:
        """CPU over wall time per round; under 1, the machine was busy."""
        return self.cpu_seconds_per_round / self.seconds_per_round


@dataclass
class _Runner:
    """A prepared decoder: ``run`` decodes one round, returns (records, errors).

    ``prepare`` makes the next round's datagrams; it runs before the clock
    starts.
    """

    run: Callable[[], tuple[int, int]]
    prepare: Callable[[], None]
    datagrams_per_round: int
    #: drops the round's datagrams once it ran (the other decoder's rounds
    #: then do not carry them)
    release: Callable[[], None] = lambda: None
    counter_samples: Callable[[], int] = lambda: 0
    sequence_gaps: Callable[[], int] = lambda: 0
    error_reasons: Callable[[], dict[str, int]] = dict
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    records: int = 0
    errors: int = 0

    def round(self) -> None:
        self.prepare()
        # The round's prepared datagrams (hundreds of thousands of tuples)
        # are the bench's, not the decoder's: frozen, the cyclic garbage
        # collector does not walk them during the timed run (a collector
        # holds one batch).  The garbage of a large round before is
        # collected first, outside the timing (a full collection costs
        # tens of ms: small rounds skip it).
        if self.datagrams_per_round >= _COLLECT_FROM:
            gc.collect()
        gc.freeze()
        try:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            self.records, self.errors = self.run()
            self.cpu.append(time.process_time() - cpu_start)
            self.wall.append(time.perf_counter() - wall_start)
        finally:
            gc.unfreeze()
            self.release()

    def measurement(self) -> Measurement:
        return Measurement(
            datagrams_per_round=self.datagrams_per_round,
            records_per_round=self.records,
            rounds=len(self.wall),
            seconds_per_round=statistics.median(self.wall),
            cpu_seconds_per_round=statistics.median(self.cpu),
            errors_per_round=self.errors,
            counter_samples_per_round=self.counter_samples(),
            best_cpu_seconds_per_round=min(self.cpu),
            sequence_gaps_per_round=self.sequence_gaps(),
            error_reasons=self.error_reasons(),
        )


def _alternate(runners: Sequence[_Runner], seconds: float, min_rounds: int = 3) -> None:
    """Run rounds of each runner in turn for ``seconds`` per runner.

    Alternating rounds lets a busy machine slow both decoders alike, so the
    ratio stays meaningful even when the absolute rates do not.  Only the
    rounds count towards ``seconds``, not the making of their datagrams.
    """
    spent = 0.0
    while spent < seconds * len(runners) or any(
        len(r.wall) < min_rounds for r in runners
    ):
        for runner in runners:
            runner.round()
            spent += runner.wall[-1]


def prepare_ours(
    streams: Sequence[Stream], batch: int, factor: int, replicas: Replicas | None = None
) -> _Runner:
    """FlowDecoder.decode_many over ``factor`` replicas of ``streams`` a round."""
    replicas = replicas or Replicas(streams)
    decoder = FlowDecoder(DecoderConfig())
    # Warm up: learn templates and options (sampling) before timing.
    for stream in replicas.replica(0):
        decoder.decode_many(stream.datagrams)
    next_round = replicas.rounds(factor)
    chunks: list[list[Datagram]] = []

    def prepare() -> None:
        nonlocal chunks
        chunks = [
            s.datagrams[i : i + batch]
            for s in next_round()
            for i in range(0, len(s.datagrams), batch)
        ]

    def release() -> None:
        nonlocal chunks
        chunks = []

    decode_many = decoder.decode_many
    counter_samples = sequence_gaps = 0
    reasons: dict[str, int] = {}

    def run_round() -> tuple[int, int]:
        nonlocal counter_samples, sequence_gaps, reasons
        before = decoder.stats.totals()
        records = 0
        for chunk in chunks:
            records += len(decode_many(chunk))
        after = decoder.stats.totals()
        counter_samples = after.counter_samples - before.counter_samples
        sequence_gaps = after.sequence_gaps - before.sequence_gaps
        reasons = dict(after.errors - before.errors)
        errors = sum(after.errors.values()) - sum(before.errors.values())
        return records, errors

    return _Runner(
        run_round,
        prepare,
        factor * sum(len(s.datagrams) for s in streams),
        release=release,
        counter_samples=lambda: counter_samples,
        sequence_gaps=lambda: sequence_gaps,
        error_reasons=lambda: reasons,
    )


def netflow_available() -> bool:
    """Whether the ``netflow`` PyPI package can be imported."""
    return importlib.util.find_spec("netflow") is not None


def prepare_netflow_package(
    streams: Sequence[Stream], factor: int, replicas: Replicas | None = None
) -> _Runner:
    """``netflow.parse_packet`` over the same datagrams.

    Each capture gets its own warm template cache.  A datagram the package
    raises on counts as an error (and its time is still counted).
    """
    # Imported here: the package is a dev extra, absent from relay installs.
    netflow = importlib.import_module("netflow")
    parse_packet: Callable[[bytes, dict[str, Any]], Any] = netflow.parse_packet
    replicas = replicas or Replicas(streams)
    caches: dict[str, dict[str, Any]] = {}
    for stream in replicas.replica(0):
        templates = caches.setdefault(stream.capture, {"netflow": {}, "ipfix": {}})
        for datagram in stream.datagrams:
            with contextlib.suppress(Exception):
                parse_packet(datagram.payload, templates)
    next_round = replicas.rounds(factor)
    rounds: list[tuple[dict[str, Any], list[bytes]]] = []

    def prepare() -> None:
        nonlocal rounds
        rounds = [
            (caches[s.capture], [d.payload for d in s.datagrams]) for s in next_round()
        ]

    def run_round() -> tuple[int, int]:
        records = errors = 0
        for templates, payloads in rounds:
            for payload in payloads:
                try:
                    records += len(parse_packet(payload, templates).flows)
                except Exception:  # the peer's failures are its own
                    errors += 1
        return records, errors

    def release() -> None:
        nonlocal rounds
        rounds = []

    return _Runner(
        run_round,
        prepare,
        factor * sum(len(s.datagrams) for s in streams),
        release=release,
    )


@dataclass
class ProtocolResult:
    """Both decoders on one protocol."""

    protocol: str
    captures: list[str]
    ours: Measurement | None
    theirs: Measurement | None
    #: why ``theirs`` is missing, if it is
    theirs_note: str = ""
    checks: dict[str, bool] = field(default_factory=dict)
    #: how many times each capture is replayed in a round (ours, theirs)
    replicas: tuple[int, int] = (0, 0)

    @property
    def ratio(self) -> float | None:
        """Ours over theirs in datagrams per CPU second (median rounds)."""
        if self.ours is None or self.theirs is None:
            return None
        return self.ours.datagrams_per_cpu_second / self.theirs.datagrams_per_cpu_second


def run_benchmark(
    captures_dir: Path,
    *,
    seconds: float = 2.0,
    batch: int = 1024,
    min_round_records: int = 20_000,
    protocols: Sequence[str] = PROTOCOLS,
    compare: bool = True,
    skipped: list[str] | None = None,
) -> list[ProtocolResult]:
    """Measure every protocol; ``seconds`` is per decoder and protocol.
    Capture files that cannot be read are named in ``skipped``."""
    inputs = load_inputs(captures_dir, skipped)
    have_netflow = compare and netflow_available()
    results = []
    for protocol in protocols:
        streams = inputs[protocol]
        result = ProtocolResult(protocol, [s.capture for s in streams], None, None)
        results.append(result)
        if not streams:
            result.theirs_note = "no input"
            continue
        # Size the replication from one plain pass.
        probe = FlowDecoder(DecoderConfig())
        per_pass = sum(len(probe.decode_many(s.datagrams)) for s in streams)
        factor = max(1, -(-min_round_records // max(per_pass, 1)))
        # Ours also replays every capture long enough to fill whole batches,
        # as the collector's are when exporters send at these rates.
        shortest = min(len(s.datagrams) for s in streams)
        filled = max(factor, -(-batch // max(shortest, 1)))
        replicas = Replicas(streams)
        result.replicas = (filled, factor)
        runners = [prepare_ours(streams, batch, filled, replicas)]
        if protocol == "sflow":
            result.theirs_note = "no sFlow decoder"
        elif not compare:
            result.theirs_note = "--no-compare"
        elif not have_netflow:
            result.theirs_note = "netflow package not installed"
        else:
            runners.append(prepare_netflow_package(streams, factor, replicas))
        _alternate(runners, seconds)
        result.ours = runners[0].measurement()
        if len(runners) > 1:
            result.theirs = runners[1].measurement()
        rate = result.ours.samples_per_cpu_second
        result.checks["rate"] = rate >= TARGET_RATES[protocol]
        ratio = result.ratio
        if ratio is not None:
            result.checks["ratio"] = ratio >= TARGET_RATIO
    return results


def _rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


@contextlib.contextmanager
def counted_log_events() -> Iterator[collections.Counter[str]]:
    """Count log events below error by name instead of printing them.

    The decoder logs what it meets in the captures (a held-data bound
    reached, a template it cannot use); in a benchmark these are the
    inputs' own, so the report lists them once with counts.
    """
    events: collections.Counter[str] = collections.Counter()

    def count(_logger: Any, method: str, event_dict: Any) -> Any:
        if method not in {"error", "critical", "exception"}:
            events[str(event_dict.get("event", "?"))] += 1
            raise structlog.DropEvent
        return event_dict

    saved = structlog.get_config()
    structlog.configure(processors=[count, *saved["processors"]])
    try:
        yield events
    finally:
        structlog.configure(**saved)


def print_report(
    results: Sequence[ProtocolResult],
    stream: TextIO,
    log_events: collections.Counter[str] | None = None,
) -> None:
    """Print the results table and the pass/fail lines (and the log events
    the run counted, see :func:`counted_log_events`)."""
    header = (
        f"{'protocol':<21} {'captures':>8} {'dgrams/rnd':>10} {'rec/rnd':>8} "
        f"{'ours rec/s':>10} {'rec/cpu-s':>10} {'netflow rec/cpu-s':>17} "
        f"{'ratio':>7} {'cpu':>5}"
    )
    print(header, file=stream)
    print("-" * len(header), file=stream)
    for r in results:
        if r.ours is None:
            print(f"{LABELS[r.protocol]:<21} {'no input':>8}", file=stream)
            continue
        theirs = _rate(r.theirs.records_per_cpu_second) if r.theirs else "n/a"
        ratio = f"{r.ratio:.1f}x" if r.ratio is not None else "n/a"
        print(
            f"{LABELS[r.protocol]:<21} {len(r.captures):>8} "
            f"{r.ours.datagrams_per_round:>10} {r.ours.records_per_round:>8} "
            f"{_rate(r.ours.records_per_second):>10} "
            f"{_rate(r.ours.records_per_cpu_second):>10} {theirs:>17} {ratio:>7} "
            f"{r.ours.cpu_share:>5.2f}",
            file=stream,
        )
    print(file=stream)
    print(
        "dgrams/rnd, rec/rnd: datagrams and records one timed round decodes; "
        "rates: records (sFlow: flow samples) per second on one core, median "
        "round (the sFlow verdict counts counter samples too, see its note); "
        "ours rec/s: wall clock (perf_counter); rec/cpu-s: per second "
        "of process CPU time; ratio: datagrams per CPU second, ours over the "
        "netflow package on the same datagrams, rounds alternating; cpu: "
        "process CPU / wall time (under 1 means a busy machine: the wall-clock "
        "rate is then too low).  Targets are judged per CPU second, for the "
        "default --batch (the collector's).",
        file=stream,
    )
    for r in results:
        notes = []
        ours_times, theirs_times = r.replicas
        if ours_times:
            notes.append(
                f"a round replays each capture {ours_times} times"
                + (f" ({theirs_times} for the netflow package)" if r.theirs else "")
            )
        if r.theirs_note:
            notes.append(f"netflow: n/a ({r.theirs_note})")
        if r.theirs is not None and r.theirs.errors_per_round:
            notes.append(
                f"netflow raised on {r.theirs.errors_per_round} of "
                f"{r.theirs.datagrams_per_round} datagrams per round"
            )
        if r.ours is not None and r.ours.counter_samples_per_round:
            notes.append(
                f"{r.ours.counter_samples_per_round} counter samples per round "
                f"besides {r.ours.records_per_round} flow samples: "
                f"{_rate(r.ours.samples_per_cpu_second)} samples per CPU "
                "second in all"
            )
        if r.ours is not None and r.ours.errors_per_round:
            reasons = ", ".join(
                f"{reason} {count}"
                for reason, count in sorted(r.ours.error_reasons.items())
            )
            # Every reason but decoder_bug is a fault of the input.
            whose = (
                "decoder_bug is ours"
                if "decoder_bug" in r.ours.error_reasons
                else "faults of the captures' own bytes"
            )
            notes.append(
                f"our decode errors per round: {r.ours.errors_per_round}"
                + (f" ({reasons}; {whose})" if reasons else "")
            )
        if r.ours is not None and r.ours.sequence_gaps_per_round:
            notes.append(
                f"sequence gaps per round: {r.ours.sequence_gaps_per_round} "
                "(the captures' own)"
            )
        if notes:
            print(f"  {LABELS[r.protocol]}: " + "; ".join(notes), file=stream)
    if log_events:
        listed = ", ".join(
            f"{name} {count}" for name, count in sorted(log_events.items())
        )
        print(
            "  decoder log events (the relay would log these; here they come "
            f"from the captures' own content, counted, not shown): {listed}",
            file=stream,
        )
    print(file=stream)
    for r in results:
        if r.ours is None:
            print(f"SKIP {LABELS[r.protocol]}: no input", file=stream)
            continue
        target = TARGET_RATES[r.protocol]
        unit = "samples" if r.protocol == "sflow" else "rec"
        verdict = "PASS" if r.checks["rate"] else "FAIL"
        print(
            f"{verdict} {LABELS[r.protocol]}: "
            f"{_rate(r.ours.samples_per_cpu_second)} {unit} per CPU second "
            f"(target >= {_rate(target)}; best round "
            f"{_rate(r.ours.best_samples_per_cpu_second)}, wall clock "
            f"{_rate(r.ours.samples_per_second)}/s)",
            file=stream,
        )
        if "ratio" in r.checks:
            verdict = "PASS" if r.checks["ratio"] else "FAIL"
            print(
                f"{verdict} {LABELS[r.protocol]}: {r.ratio:.1f}x the netflow "
                f"package (target >= {TARGET_RATIO:.0f}x)",
                file=stream,
            )
        elif r.protocol != "sflow":
            print(
                f"SKIP {LABELS[r.protocol]}: ratio to the netflow package not "
                f"measured ({r.theirs_note})",
                file=stream,
            )
