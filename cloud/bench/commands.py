"""Benchmarks on the cloud side, plugged into ``sampleflow bench``.

Registered through the ``sampleflow.benchmarks`` entry-point group (see
edge_agent.bench.command): ``bench relay`` (:mod:`cloud.bench.relay`) and
``bench wire-ctu13`` (:mod:`cloud.bench.wire_ctu13`).  They live here
rather than in the edge package because they use the local stack's
servers and IPFIX exporter and the CTU-13 loader (cloud.local,
cloud.training), which the edge package must not import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from edge_agent.argtypes import positive_float
from edge_agent.bench.command import (
    DEFAULT_CAPTURES,
    add_check_flag,
    verdicts_exit_code,
)

Subparsers = argparse._SubParsersAction  # argparse exposes no public name


def _default_cores() -> tuple[int | None, int | None]:
    """(relay core, sender core): the first two this process may use."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return cores[0], cores[1]


def register_relay(benchmarks: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``bench relay``."""
    relay_core, sender_core = _default_cores()
    p = benchmarks.add_parser(
        "relay",
        help="the real relay's flow records/s, loss by where, peak RSS",
        description=(
            "Run `sampleflow relay run` pinned to one core against a local "
            "Kinesis (MiniStack), replay real NetFlow v5/v9 and IPFIX capture "
            "payloads to it from another core at a target rate, wait until "
            "every batch is acknowledged, and print throughput, datagrams "
            "sent/received/decoded, loss by where, peak RSS and the ratio to a "
            "bare asyncio-dgram receive loop on the same core."
        ),
    )
    p.add_argument(
        "--rate",
        type=positive_float,
        default=250_000.0,
        metavar="N",
        help="flow records per second to send (default 250000)",
    )
    p.add_argument(
        "--seconds",
        type=positive_float,
        default=10.0,
        metavar="S",
        help="seconds of sending (default 10)",
    )
    p.add_argument(
        "--captures",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder of the captures to replay (default: {DEFAULT_CAPTURES})",
    )
    p.add_argument(
        "--capture",
        action="append",
        metavar="NAME",
        help="replay this capture (repeatable; default: nine v5/v9/IPFIX ones)",
    )
    p.add_argument("--relay-core", type=int, default=relay_core, metavar="N")
    p.add_argument("--sender-core", type=int, default=sender_core, metavar="N")
    p.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="a running Kinesis (e.g. the local stack's); default: start MiniStack",
    )
    p.add_argument("--no-peer", action="store_true", help="skip the peer loop")
    p.add_argument("--window-s", type=positive_float, default=2.0, metavar="S")
    p.add_argument("--lateness-s", type=float, default=1.0, metavar="S")
    p.add_argument(
        "--workdir", type=Path, metavar="DIR", help="keep logs and state here"
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures")
    add_check_flag(p)
    p.set_defaults(func=run_relay_bench)


def run_relay_bench(args: argparse.Namespace) -> int:
    """Run ``sampleflow bench relay``; returns the exit code."""
    from cloud.bench import relay as bench  # noqa: PLC0415 - heavy imports
    from cloud.bench.streams import (  # noqa: PLC0415
        DEFAULT_CAPTURES as STREAM_CAPTURES,
    )
    from cloud.bench.streams import StreamError, load_streams  # noqa: PLC0415

    allowed = sorted(os.sched_getaffinity(0))
    for name, core in (
        ("--relay-core", args.relay_core),
        ("--sender-core", args.sender_core),
    ):
        if core is not None and core not in allowed:
            print(
                f"sampleflow bench relay: error: {name} {core} is not a core this "
                f"process may run on (allowed: {', '.join(map(str, allowed))})",
                file=sys.stderr,
            )
            return 2
    captures = args.captures or DEFAULT_CAPTURES
    try:
        streams = load_streams(captures, args.capture or STREAM_CAPTURES)
    except StreamError as exc:
        print(f"sampleflow bench relay: error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sampleflow-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ministack = None
        try:
            if args.endpoint_url:
                endpoint = args.endpoint_url
                kinesis = _client(endpoint)
            else:
                ministack = bench.MiniStackProcess(
                    workdir / "ministack", core=args.sender_core
                )
                ministack.start()
                endpoint = ministack.endpoint_url
                kinesis = ministack.kinesis()
            plan = bench.Plan(
                streams,
                args.rate,
                args.seconds,
                relay_core=args.relay_core,
                sender_core=args.sender_core,
                window_s=args.window_s,
                lateness_s=args.lateness_s,
            )
            peer = None if args.no_peer else bench.run_peer_round(plan)
            result = bench.run_relay_round(plan, workdir / "relay", endpoint, kinesis)
        except bench.RelayBenchError as exc:
            print(f"sampleflow bench relay: error: {exc}", file=sys.stderr)
            return 1
        finally:
            if ministack is not None:
                ministack.stop()
        print(
            f"relay core {args.relay_core}, sender core {args.sender_core}; "
            f"{len(streams)} streams from {captures}"
        )
        verdicts = bench.print_report(result, peer, sys.stdout)
        if args.json:
            args.json.write_text(
                json.dumps(bench.result_json(result, peer), indent=2, default=str)
            )
    return verdicts_exit_code(
        "sampleflow bench relay", [ok for _, ok in verdicts], args.check
    )


def _client(endpoint: str) -> object:
    import boto3  # noqa: PLC0415

    return boto3.session.Session(
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "local"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
        region_name="us-east-1",
    ).client("kinesis", endpoint_url=endpoint)


def _slices(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of slices: {text!r}") from None
    bad = [v for v in values if not 0 <= v <= 25]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"slices are 0 to 25 (comma-separated), got {text!r}"
        )
    return values


def register_wire_ctu13(benchmarks: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``bench wire-ctu13``."""
    p = benchmarks.add_parser(
        "wire-ctu13",
        help="bytes shipped per record on CTU-13 replayed as sampled IPFIX",
        description=(
            "Replay CTU-13 scenario 6 sampled 1:N as IPFIX (the demo's "
            "exporter), run the datagrams through the relay's decode, "
            "aggregation, filter and encoder, and print bytes shipped per "
            "record beside the IPFIX export and gzip'd JSON lines."
        ),
    )
    p.add_argument("--rate", type=int, default=100, metavar="N", help="1-in-N")
    p.add_argument("--seed", type=int, default=6, metavar="S")
    p.add_argument(
        "--slices",
        type=_slices,
        default=None,
        metavar="LIST",
        help="slices 0-25, comma-separated (default: all, 2 h 9 min)",
    )
    p.add_argument(
        "--window-s",
        type=positive_float,
        action="append",
        metavar="S",
        help="aggregation window, repeatable for a sweep (default 10, the relay's)",
    )
    p.add_argument("--lateness-s", type=float, default=30.0, metavar="S")
    p.add_argument("--no-filter", action="store_true", help="as filter.enabled=false")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures")
    p.set_defaults(func=run_wire_ctu13)


def run_wire_ctu13(args: argparse.Namespace) -> int:
    """Run ``sampleflow bench wire-ctu13``; returns the exit code."""
    from cloud.bench.wire_ctu13 import (  # noqa: PLC0415 - heavy imports
        ctu13_datagrams,
        print_wire_report,
    )
    from cloud.training.ctu13 import DatasetNotFoundError  # noqa: PLC0415
    from edge_agent.relay.bench import (  # noqa: PLC0415
        default_filter,
        measure_datagrams,
    )

    try:
        replay = ctu13_datagrams(args.rate, args.seed, args.slices)
    except DatasetNotFoundError as exc:
        print(f"sampleflow bench wire-ctu13: error: {exc}", file=sys.stderr)
        return 2
    from cloud.training import ctu13  # noqa: PLC0415

    results = []
    for window_s in args.window_s or [10.0]:
        relay_filter = (
            None if args.no_filter else default_filter(ctu13.INTERNAL_NETWORKS)
        )
        results.append(
            measure_datagrams(
                f"{window_s:g} s windows",
                replay.datagrams,
                round(window_s * 1000),
                round(args.lateness_s * 1000),
                relay_filter,
            )
        )
    print(
        f"CTU-13 scenario 6 at 1:{args.rate} (seed {args.seed}), "
        f"{replay.records:,} sampled records exported as "
        f"{len(replay.datagrams):,} IPFIX datagrams"
        + ("" if not args.no_filter else "; filter off")
    )
    print_wire_report(results, sys.stdout)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "records": replay.records,
                    "exported": replay.exported,
                    "datagrams": len(replay.datagrams),
                    "results": [r.__dict__ for r in results],
                },
                indent=2,
            )
        )
    return 0
