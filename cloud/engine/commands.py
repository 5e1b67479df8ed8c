"""``sampleflow engine run``: the engine's command line.

Registered through the ``sampleflow.commands`` entry point group, so a
relay-only install (no pyspark) simply lacks it; pyspark is imported when
the command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType
from typing import Any

import structlog

log = structlog.get_logger(__name__)


def register(subparsers: Any) -> None:
    """Add ``engine`` (with ``run``) to the ``sampleflow`` parser."""
    engine = subparsers.add_parser(
        "engine", help="the cloud streaming engine (Spark Structured Streaming)"
    )
    commands = engine.add_subparsers(dest="engine_command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="consume relay batches from Kinesis and write per-tenant estimates",
        description=(
            "Read relay batches from a Kinesis stream in micro-batches, drop "
            "duplicates, set invalid records aside and write full-network "
            "estimates per tenant and window.  See docs/engine.md."
        ),
    )
    run.add_argument("--stream", required=True, help="Kinesis stream name")
    run.add_argument(
        "--checkpoint", required=True, help="Spark checkpoint folder (or URI)"
    )
    run.add_argument("--endpoint-url", help="Kinesis endpoint (omit on AWS)")
    run.add_argument("--region", help="AWS region of the stream")
    run.add_argument(
        "--starting-position",
        choices=("TRIM_HORIZON", "LATEST"),
        default="TRIM_HORIZON",
        help="where a new checkpoint starts (default TRIM_HORIZON)",
    )
    run.add_argument(
        "--max-records-per-batch",
        type=int,
        default=10_000,
        help="Kinesis records per micro-batch, all shards (default 10000)",
    )
    run.add_argument(
        "--max-bytes-per-batch",
        type=int,
        default=64 * 1024 * 1024,
        help="record data per micro-batch, all shards (default 64 MiB)",
    )
    run.add_argument(
        "--trigger-interval",
        type=float,
        default=2.0,
        help="seconds between micro-batches (default 2)",
    )
    run.add_argument(
        "--window", type=int, default=60, help="window length, s (default 60)"
    )
    run.add_argument(
        "--slide", type=int, default=10, help="window slide, s (default 10)"
    )
    run.add_argument(
        "--lateness",
        type=int,
        default=120,
        help="seconds a window stays open past its end (default 120)",
    )
    run.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="confidence level of the intervals (default 0.95)",
    )
    run.add_argument("--state", help="SQLite state file (default: in --checkpoint)")
    run.add_argument("--estimates-out", help="append estimates as JSON lines here")
    run.add_argument(
        "--master",
        default="local[*]",
        help="Spark master (default local[*]; 'submit' leaves it to spark-submit)",
    )
    run.add_argument(
        "--shuffle-partitions",
        type=int,
        default=4,
        help="spark.sql.shuffle.partitions (default 4)",
    )
    run.add_argument(
        "--available-now",
        action="store_true",
        help="process what the stream holds now, then exit",
    )
    run.set_defaults(func=run_command)
    engine.set_defaults(func=lambda args: _help(engine))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_command(args: argparse.Namespace) -> int:
    """Run the engine until stopped (SIGINT/SIGTERM) or, with
    ``--available-now``, until the stream is read; returns the exit code."""
    # Imported here: pyspark is in the cloud extra, and every `sampleflow`
    # command loads this module to build its parser.
    from cloud.engine.config import ConfigError, EngineConfig  # noqa: PLC0415
    from cloud.engine.job import start_engine  # noqa: PLC0415

    try:
        config = EngineConfig(
            stream_name=args.stream,
            checkpoint_dir=args.checkpoint,
            endpoint_url=args.endpoint_url,
            region=args.region,
            starting_position=args.starting_position,
            max_records_per_batch=args.max_records_per_batch,
            max_bytes_per_batch=args.max_bytes_per_batch,
            trigger_interval_s=args.trigger_interval,
            window_s=args.window,
            slide_s=args.slide,
            lateness_s=args.lateness,
            confidence=args.confidence,
            state_path=args.state,
            estimates_path=args.estimates_out,
            master=None if args.master == "submit" else args.master,
            shuffle_partitions=args.shuffle_partitions,
        )
    except ConfigError as exc:
        log.error("engine_config_invalid", error=str(exc))
        return 2
    engine = start_engine(config, available_now=args.available_now)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("engine_stopping", signal=signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        while engine.query.isActive and not stop.is_set():
            engine.query.awaitTermination(timeout=1)
    finally:
        engine.close()
    error = engine.query.exception()
    # Stopping the session drains Spark's listener bus while this process
    # can still answer its callbacks (else the last progress event fails).
    engine.spark.stop()
    if error is not None:
        log.error("engine_failed", error=str(error))
        return 1
    c = engine.processor.counters
    log.info(
        "engine_stop",
        micro_batches=c.micro_batches,
        records=c.records,
        batches_accepted=c.batches_accepted,
        invalid=sum(c.invalid.values()),
    )
    return 0
