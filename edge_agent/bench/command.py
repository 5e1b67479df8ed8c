"""``sampleflow bench``: benchmark commands (``sampleflow bench decode``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import edge_agent
from edge_agent.bench.decode import PROTOCOLS, BenchError, print_report, run_benchmark

#: The shared captures, next to the project root, in a development checkout.
DEFAULT_CAPTURES = Path(edge_agent.__file__).resolve().parents[1].parent / (
    "shared/captures"
)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench`` and its ``decode`` subcommand."""
    bench = subparsers.add_parser("bench", help="run a benchmark")
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    bench.set_defaults(func=lambda args: _help(bench))
    decode = benchmarks.add_parser(
        "decode",
        help="decode throughput per protocol vs the netflow package",
        description=(
            "Decode the shared captures from memory and print records/s per "
            "core for NetFlow v5, v9, IPFIX (fixed-length templates) and "
            "sFlow, beside the netflow PyPI package on the same datagrams."
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
        type=_positive_float,
        default=2.0,
        metavar="N",
        help="seconds of timing per decoder and protocol (default 2)",
    )
    decode.add_argument(
        "--batch",
        type=_positive_int,
        default=256,
        metavar="N",
        help="datagrams per decode_many call (default 256, the collector's)",
    )
    decode.add_argument(
        "--min-round-records",
        type=_positive_int,
        default=20_000,
        metavar="N",
        help="replicate datagrams until a timed round has N records",
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
    decode.set_defaults(func=run_decode)


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
    try:
        results = run_benchmark(
            captures,
            seconds=args.seconds,
            batch=args.batch,
            min_round_records=args.min_round_records,
            protocols=args.protocol or PROTOCOLS,
            compare=not args.no_compare,
        )
    except BenchError as exc:
        print(f"sampleflow bench decode: error: {exc}", file=sys.stderr)
        return 2
    print(f"captures: {captures}")
    print_report(results, sys.stdout)
    return 0
