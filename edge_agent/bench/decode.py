"""Decode throughput: our FlowDecoder against the ``netflow`` PyPI package.

The inputs are the shared captures, read once into memory and grouped by
export protocol (NetFlow v5, NetFlow v9, IPFIX with fixed-length templates
only, sFlow v5).  For each protocol both decoders get the same datagrams
in capture order (templates first, as captured), replicated until a round
holds at least ``min_round_records`` records, and rounds are repeated for
``seconds``, alternating rounds of the two decoders.  The rate reported
is the median over rounds, from ``time.perf_counter``, on one core (this
process is single-threaded); the rate per second of process CPU time is
printed beside it, since on a busy machine wall time includes waiting.

For sFlow the rate counts samples, flow and counter samples alike: both
are decoded, and a capture of counter samples alone yields no record.

The ratio is ours over theirs in datagrams per second on identical input,
so it compares speed even where the two decoders disagree about how many
records a datagram holds (options records, sets they cannot decode).

The ``netflow`` package keys templates by template id only, so it gets
one template cache per capture (as if each capture came from its own
collector); without that, captures would overwrite each other's
templates.  It has no sFlow decoder.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import statistics
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

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

#: Records (sFlow: flow samples) per second per core we aim for.
TARGET_RATES = {
    "netflow_v5": 5_000_000,
    "netflow_v9": 2_000_000,
    "ipfix": 2_000_000,
    "sflow": 300_000,
}

#: How many times faster than the netflow package we aim to be.
TARGET_RATIO = 10.0


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


def load_inputs(captures_dir: Path) -> dict[str, list[Stream]]:
    """Read every ``*.pcap`` / ``*.pcapng`` and group datagrams by protocol."""
    if not captures_dir.is_dir():
        raise BenchError(f"captures folder {captures_dir} does not exist")
    files = sorted(
        p for p in captures_dir.iterdir() if p.suffix in (".pcap", ".pcapng")
    )
    if not files:
        raise BenchError(f"no .pcap or .pcapng files in {captures_dir}")
    inputs: dict[str, list[Stream]] = {p: [] for p in PROTOCOLS}
    for path in files:
        try:
            datagrams, _ = read_capture(path)
        except CaptureError:
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
    return inputs


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
    def datagrams_per_second(self) -> float:
        return self.datagrams_per_round / self.seconds_per_round

    @property
    def cpu_share(self) -> float:
        """CPU over wall time per round; under 1, the machine was busy."""
        return self.cpu_seconds_per_round / self.seconds_per_round


@dataclass
class _Runner:
    """A prepared decoder: ``run`` decodes one round, returns (records, errors)."""

    run: Callable[[], tuple[int, int]]
    datagrams_per_round: int
    counter_samples: Callable[[], int] = lambda: 0
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    records: int = 0
    errors: int = 0

    def round(self) -> None:
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        self.records, self.errors = self.run()
        self.cpu.append(time.process_time() - cpu_start)
        self.wall.append(time.perf_counter() - wall_start)

    def measurement(self) -> Measurement:
        return Measurement(
            datagrams_per_round=self.datagrams_per_round,
            records_per_round=self.records,
            rounds=len(self.wall),
            seconds_per_round=statistics.median(self.wall),
            cpu_seconds_per_round=statistics.median(self.cpu),
            errors_per_round=self.errors,
            counter_samples_per_round=self.counter_samples(),
        )


def _alternate(runners: Sequence[_Runner], seconds: float, min_rounds: int = 3) -> None:
    """Run rounds of each runner in turn for ``seconds`` per runner.

    Alternating rounds lets a busy machine slow both decoders alike, so the
    ratio stays meaningful even when the absolute rates do not.
    """
    deadline = time.perf_counter() + seconds * len(runners)
    while time.perf_counter() < deadline or any(
        len(r.wall) < min_rounds for r in runners
    ):
        for runner in runners:
            runner.round()


def _replicate(streams: Sequence[Stream], factor: int) -> list[Stream]:
    return [Stream(s.capture, s.datagrams * factor) for s in streams]


def prepare_ours(streams: Sequence[Stream], batch: int, factor: int) -> _Runner:
    """FlowDecoder.decode_many over ``streams`` replicated ``factor`` times."""
    decoder = FlowDecoder(DecoderConfig())
    # Warm up: learn templates and options (sampling) before timing.
    for stream in streams:
        decoder.decode_many(stream.datagrams)
    rounds = _replicate(streams, factor)
    chunks = [
        s.datagrams[i : i + batch]
        for s in rounds
        for i in range(0, len(s.datagrams), batch)
    ]
    decode_many = decoder.decode_many
    counter_samples = 0

    def run_round() -> tuple[int, int]:
        nonlocal counter_samples
        before = decoder.stats.totals()
        records = 0
        for chunk in chunks:
            records += len(decode_many(chunk))
        after = decoder.stats.totals()
        counter_samples = after.counter_samples - before.counter_samples
        errors = sum(after.errors.values()) - sum(before.errors.values())
        return records, errors

    return _Runner(
        run_round,
        sum(len(s.datagrams) for s in rounds),
        counter_samples=lambda: counter_samples,
    )


def netflow_available() -> bool:
    """Whether the ``netflow`` PyPI package can be imported."""
    return importlib.util.find_spec("netflow") is not None


def prepare_netflow_package(streams: Sequence[Stream], factor: int) -> _Runner:
    """``netflow.parse_packet`` over the same datagrams.

    Each capture gets its own warm template cache.  A datagram the package
    raises on counts as an error (and its time is still counted).
    """
    # Imported here: the package is a dev extra, absent from relay installs.
    netflow = importlib.import_module("netflow")
    parse_packet: Callable[[bytes, dict[str, Any]], Any] = netflow.parse_packet
    caches: dict[str, dict[str, Any]] = {}
    for stream in streams:
        templates = caches.setdefault(stream.capture, {"netflow": {}, "ipfix": {}})
        for datagram in stream.datagrams:
            with contextlib.suppress(Exception):
                parse_packet(datagram.payload, templates)
    rounds = [
        (caches[s.capture], [d.payload for d in s.datagrams])
        for s in _replicate(streams, factor)
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

    return _Runner(run_round, sum(len(p) for _, p in rounds))


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

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.theirs is None:
            return None
        return self.ours.datagrams_per_second / self.theirs.datagrams_per_second


def run_benchmark(
    captures_dir: Path,
    *,
    seconds: float = 2.0,
    batch: int = 256,
    min_round_records: int = 20_000,
    protocols: Sequence[str] = PROTOCOLS,
    compare: bool = True,
) -> list[ProtocolResult]:
    """Measure every protocol; ``seconds`` is per decoder and protocol."""
    inputs = load_inputs(captures_dir)
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
        runners = [prepare_ours(streams, batch, factor)]
        if protocol == "sflow":
            result.theirs_note = "n/a (no sFlow decoder)"
        elif not have_netflow:
            result.theirs_note = "n/a (netflow package not installed)"
        else:
            runners.append(prepare_netflow_package(streams, factor))
        _alternate(runners, seconds)
        result.ours = runners[0].measurement()
        if len(runners) > 1:
            result.theirs = runners[1].measurement()
        rate = result.ours.samples_per_second
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


def print_report(results: Sequence[ProtocolResult], stream: TextIO) -> None:
    """Print the results table and the pass/fail lines."""
    header = (
        f"{'protocol':<21} {'captures':>8} {'dgrams/rnd':>10} {'rec/rnd':>8} "
        f"{'ours rec/s':>10} {'rec/cpu-s':>10} {'netflow rec/s':>13} "
        f"{'ratio':>7} {'cpu':>5}"
    )
    print(header, file=stream)
    print("-" * len(header), file=stream)
    for r in results:
        if r.ours is None:
            print(f"{LABELS[r.protocol]:<21} {'no input':>8}", file=stream)
            continue
        theirs = _rate(r.theirs.records_per_second) if r.theirs else "n/a"
        ratio = f"{r.ratio:.1f}x" if r.ratio is not None else "n/a"
        print(
            f"{LABELS[r.protocol]:<21} {len(r.captures):>8} "
            f"{r.ours.datagrams_per_round:>10} {r.ours.records_per_round:>8} "
            f"{_rate(r.ours.records_per_second):>10} "
            f"{_rate(r.ours.records_per_cpu_second):>10} {theirs:>13} {ratio:>7} "
            f"{r.ours.cpu_share:>5.2f}",
            file=stream,
        )
    print(file=stream)
    print(
        "rates: records (sFlow: flow samples) per second on one core, median "
        "round (perf_counter); rec/cpu-s: the same per second of process CPU "
        "time; ratio: datagrams/s ours over the netflow package on the same "
        "datagrams, rounds alternating; cpu: process CPU / wall time (under 1 "
        "means a busy machine: the wall-clock rates are then too low)",
        file=stream,
    )
    for r in results:
        notes = []
        if r.theirs_note:
            notes.append(f"netflow: {r.theirs_note}")
        if r.theirs is not None and r.theirs.errors_per_round:
            notes.append(
                f"netflow raised on {r.theirs.errors_per_round} of "
                f"{r.theirs.datagrams_per_round} datagrams per round"
            )
        if r.ours is not None and r.ours.counter_samples_per_round:
            notes.append(
                f"{r.ours.counter_samples_per_round} counter samples per round "
                f"besides {r.ours.records_per_round} flow samples: "
                f"{_rate(r.ours.samples_per_second)} samples/s in all"
            )
        if r.ours is not None and r.ours.errors_per_round:
            notes.append(f"our decode errors per round: {r.ours.errors_per_round}")
        if notes:
            print(f"  {LABELS[r.protocol]}: " + "; ".join(notes), file=stream)
    print(file=stream)
    for r in results:
        if r.ours is None:
            print(f"SKIP {LABELS[r.protocol]}: no input", file=stream)
            continue
        target = TARGET_RATES[r.protocol]
        unit = "samples/s" if r.protocol == "sflow" else "rec/s"
        verdict = "PASS" if r.checks["rate"] else "FAIL"
        print(
            f"{verdict} {LABELS[r.protocol]}: {_rate(r.ours.samples_per_second)} "
            f"{unit} (target >= {_rate(target)}; "
            f"{_rate(r.ours.samples_per_cpu_second)} per CPU second)",
            file=stream,
        )
        if "ratio" in r.checks:
            verdict = "PASS" if r.checks["ratio"] else "FAIL"
            print(
                f"{verdict} {LABELS[r.protocol]}: {r.ratio:.1f}x the netflow "
                f"package (target >= {TARGET_RATIO:.0f}x)",
                file=stream,
            )
