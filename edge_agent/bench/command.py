"""``sampleflow bench``: benchmark commands.

* ``bench decode``: decode throughput per protocol (edge_agent.bench.decode);
* ``bench wire``: bytes shipped per record and codec speeds on the shared
  captures (the relay's own path, edge_agent.relay.bench).

Benchmarks of other packages join through the ``sampleflow.benchmarks``
entry-point group: each entry is a ``register(benchmarks)`` callable adding
its subcommand to the ``bench`` subparsers, as the top-level commands do
with ``sampleflow.commands`` (so the edge package never imports the cloud
one; a relay-only install lists fewer benchmarks).

Benchmarks that judge targets (``decode``, ``relay``) print PASS/FAIL lines
and exit 0 whatever they read, because timings on a shared machine report
rather than judge; ``--check`` makes any FAIL exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TextIO

import edge_agent
from edge_agent.argtypes import positive_float
from edge_agent.bench import decode as decode_bench
from edge_agent.bench.decode import PROTOCOLS
from edge_agent.relay import bench as wire_bench

#: Entry-point group of benchmarks from other packages.
BENCHMARK_ENTRY_POINTS = "sampleflow.benchmarks"

#: The shared captures, next to the project root, in a development checkout.
DEFAULT_CAPTURES = Path(edge_agent.__file__).resolve().parents[1].parent / (
    "shared/captures"
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


Subparsers = argparse._SubParsersAction  # argparse exposes no public name

#: ``--check``'s help, the same for every benchmark that judges targets.
CHECK_HELP = (
    "exit 1 when any target line reads FAIL (default: exit 0 whatever the "
    "verdicts: on a shared machine a benchmark reports, it does not judge)"
)


def add_check_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--check`` to a benchmark that prints PASS/FAIL lines."""
    parser.add_argument("--check", action="store_true", help=CHECK_HELP)


def verdicts_exit_code(
    command: str, verdicts: Iterable[bool], check: bool, err: TextIO | None = None
) -> int:
    """The exit code of a benchmark whose targets gave ``verdicts`` (True:
    PASS): 1 when ``check`` is set and any is False, saying so in one line
    on ``err`` (default stderr); else 0."""
    failed = sum(1 for ok in verdicts if not ok)
    if not (check and failed):
        return 0
    print(
        f"{command}: --check: {failed} target(s) FAIL",
        file=sys.stderr if err is None else err,
    )
    return 1


def register(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``bench`` with ``decode``, ``wire`` and the plugged-in benchmarks."""
    bench = subparsers.add_parser("bench", help="run a benchmark")
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    bench.set_defaults(func=lambda args: _help(bench))
    _register_decode(benchmarks)
    _register_wire(benchmarks)
    for ep in entry_points(group=BENCHMARK_ENTRY_POINTS):
        try:
            plug = ep.load()
        except ImportError as exc:
            _register_unavailable(benchmarks, ep.name, exc)
            continue
        plug(benchmarks)


def _register_unavailable(
    benchmarks: Subparsers[argparse.ArgumentParser], name: str, error: ImportError
) -> None:
    """A benchmark whose package cannot load here explains why when run."""
    if name in benchmarks.choices:
        return
    message = (
        f"sampleflow bench {name}: not available in this install ({error}); "
        "install the cloud and dev extras: pip install 'sampleflow[cloud,dev]'"
    )
    sub = benchmarks.add_parser(name, help="(needs the cloud extra)", add_help=False)
    sub.add_argument("rest", nargs=argparse.REMAINDER)

    def explain(_args: argparse.Namespace) -> int:
        print(message, file=sys.stderr)
        return 2

    sub.set_defaults(func=explain)


def _register_decode(benchmarks: Subparsers[argparse.ArgumentParser]) -> None:
    decode = benchmarks.add_parser(
        "decode",
        help="decode throughput per protocol vs the netflow package",
        description=(
            "Decode the shared captures from memory and print records/s per "
            "core for NetFlow v5, v9, IPFIX (fixed-length templates) and "
            "sFlow, beside the netflow PyPI package on the same datagrams.  "
            "The whole run (every protocol, with the comparison) takes about "
            "15 s per --seconds: about 30 s at the default."
        ),
    )
    decode.add_argument(
        "--captures",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder of .pcap files (default: {DEFAULT_CAPTURES})",
    )
    decode.add_argument(
        "--seconds",
        type=positive_float,
        default=2.0,
        metavar="N",
        help="seconds of timing per decoder and protocol (default 2)",
    )
    decode.add_argument(
        "--batch",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="datagrams per decode_many call (default 1024, the collector's)",
    )
    decode.add_argument(
        "--min-round-records",
        type=_positive_int,
        default=20_000,
        metavar="N",
        help="replicate datagrams until a timed round has N records (default "
        "20000; ours also fills whole --batch calls)",
    )
    decode.add_argument(
        "--protocol",
        action="append",
        choices=PROTOCOLS,
        help="only these protocols (repeatable; default all)",
    )
    decode.add_argument(
        "--no-compare",
        action="store_true",
        help="do not run the netflow package",
    )
    add_check_flag(decode)
    decode.set_defaults(func=run_decode)


def _register_wire(benchmarks: Subparsers[argparse.ArgumentParser]) -> None:
    wire = benchmarks.add_parser(
        "wire",
        help="bytes shipped per flow record vs raw export and gzip'd JSON",
        description=(
            "Replay the shared captures through decode, aggregation and the "
            "batch encoder; print bytes per record beside the raw export and "
            "gzip'd JSON lines, and the aggregation and codec speeds."
        ),
    )
    wire.add_argument(
        "--captures",
        type=Path,
        metavar="DIR",
        default=None,
        help=f"folder of .pcap files (default: {DEFAULT_CAPTURES})",
    )
    wire.add_argument("--window-s", type=positive_float, default=10.0, metavar="S")
    wire.add_argument("--lateness-s", type=float, default=30.0, metavar="S")
    wire.add_argument(
        "--speed-records",
        type=int,
        default=1_000_000,
        metavar="N",
        help="records for the speed measurement (0: skip it)",
    )
    wire.add_argument(
        "--no-filter",
        action="store_true",
        help="leave the filter out (as filter.enabled = false)",
    )
    wire.set_defaults(func=run_wire)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_decode(args: argparse.Namespace) -> int:
    """Run ``sampleflow bench decode``; returns the exit code."""
    captures = args.captures
    if captures is None:
        if not DEFAULT_CAPTURES.is_dir():
            print(
                f"sampleflow bench decode: error: no captures folder at "
                f"{DEFAULT_CAPTURES}; pass --captures DIR",
                file=sys.stderr,
            )
            return 2
        captures = DEFAULT_CAPTURES
    skipped: list[str] = []
    try:
        with decode_bench.counted_log_events() as events:
            results = decode_bench.run_benchmark(
                captures,
                seconds=args.seconds,
                batch=args.batch,
                min_round_records=args.min_round_records,
                protocols=args.protocol or PROTOCOLS,
                compare=not args.no_compare,
                skipped=skipped,
            )
    except decode_bench.BenchError as exc:
        print(f"sampleflow bench decode: error: {exc}", file=sys.stderr)
        return 2
    print(f"captures: {captures}")
    for note in skipped:
        print(f"skipped (unreadable): {note}")
    decode_bench.print_report(results, sys.stdout, events)
    # print_report writes one PASS/FAIL line per check of a measured protocol.
    verdicts = [ok for r in results if r.ours is not None for ok in r.checks.values()]
    return verdicts_exit_code("sampleflow bench decode", verdicts, args.check)


def run_wire(args: argparse.Namespace) -> int:
    """Run ``sampleflow bench wire``; returns the exit code."""
    captures = args.captures or DEFAULT_CAPTURES
    if not captures.is_dir():
        print(
            f"sampleflow bench wire: error: no captures folder at {captures}; "
            "pass --captures DIR",
            file=sys.stderr,
        )
        return 2
    try:
        results, speed = wire_bench.run_benchmark(
            captures,
            window_ms=round(args.window_s * 1000),
            lateness_ms=round(args.lateness_s * 1000),
            speed_records=args.speed_records,
            use_filter=not args.no_filter,
        )
    except wire_bench.BenchError as exc:
        print(f"sampleflow bench wire: error: {exc}", file=sys.stderr)
        return 2
    print(f"captures: {captures}")
    wire_bench.print_report(results, speed, sys.stdout)
    return 0
