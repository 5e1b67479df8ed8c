"""Benchmarks on the cloud side, plugged into ``sampleflow bench``.

Registered through the ``sampleflow.benchmarks`` entry-point group (see
edge_agent.bench.command): ``bench relay`` (:mod:`cloud.bench.relay`).
They live here rather than in the edge package because they drive the
local stack's servers (cloud.local), which the edge package must not
import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from edge_agent.bench.command import DEFAULT_CAPTURES

Subparsers = argparse._SubParsersAction  # argparse exposes no public name


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


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
        type=_positive_float,
        default=250_000.0,
        metavar="N",
        help="flow records per second to send (default 250000)",
    )
    p.add_argument(
        "--seconds",
        type=_positive_float,
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
    p.add_argument("--window-s", type=_positive_float, default=2.0, metavar="S")
    p.add_argument("--lateness-s", type=float, default=1.0, metavar="S")
    p.add_argument(
        "--workdir", type=Path, metavar="DIR", help="keep logs and state here"
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures")
    p.set_defaults(func=run_relay_bench)


def run_relay_bench(args: argparse.Namespace) -> int:
    """Run ``sampleflow bench relay``; returns the exit code."""
    from cloud.bench import relay as bench  # noqa: PLC0415 - heavy imports
    from cloud.bench.streams import (  # noqa: PLC0415
        DEFAULT_CAPTURES as STREAM_CAPTURES,
    )
    from cloud.bench.streams import StreamError, load_streams  # noqa: PLC0415

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
        bench.print_report(result, peer, sys.stdout)
        if args.json:
            args.json.write_text(
                json.dumps(bench.result_json(result, peer), indent=2, default=str)
            )
    return 0


def _client(endpoint: str) -> object:
    import boto3  # noqa: PLC0415

    return boto3.session.Session(
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "local"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
        region_name="us-east-1",
    ).client("kinesis", endpoint_url=endpoint)
