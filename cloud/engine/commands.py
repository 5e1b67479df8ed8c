"""``sampleflow engine run`` and ``engine status``: the engine's command line.

Registered through the ``sampleflow.commands`` entry point group, so a
relay-only install (no pyspark) simply lacks it; pyspark is imported when
the command runs, not when the parser is built.  Also adds ``sampleflow
bench engine`` (:mod:`cloud.engine.bench`).

The defaults of the output flags are the local stack's (cloud/local):
model service on 127.0.0.1:8480, store on 127.0.0.1:27017, DynamoDB and
CloudWatch behind ``--endpoint-url``; each takes ``none`` to turn it off.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from cloud.engine.defaults import (
    DEFAULT_STATUS_PORT,
    DEFAULT_TENANT_NETWORKS,
    DETECTION_MODES,
    LOCAL_MODEL_SERVICE_URL,
    LOCAL_MONGO_URI,
    PRIVATE_NETWORKS,
    ConfigError,
    tenant_networks,
)
from edge_agent.logs import FORMAT_ENV, FORMATS, LEVEL_ENV, LEVELS, configure_logging

log = structlog.get_logger(__name__)


def register(subparsers: Any) -> None:
    """Add ``engine`` (with ``run`` and ``status``) to the ``sampleflow``
    parser."""
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
    _add_analysis_arguments(run)
    _add_output_arguments(run)
    run.add_argument(
        "--log-level",
        choices=LEVELS,
        help=f"log level (default ${LEVEL_ENV} or info)",
    )
    run.add_argument(
        "--log-format",
        choices=FORMATS,
        help=f"log format (default ${FORMAT_ENV} or console)",
    )
    run.add_argument(
        "--status-address",
        default="127.0.0.1",
        help="address of the /metrics and /healthz server (default 127.0.0.1)",
    )
    run.add_argument(
        "--status-port",
        type=_port_or_none,
        default=DEFAULT_STATUS_PORT,
        help=f"its port (default {DEFAULT_STATUS_PORT}; 0: any free; 'none': off)",
    )
    run.set_defaults(func=run_command)
    status = commands.add_parser(
        "status",
        help="print a running engine's health and last micro-batch",
        description=(
            "Read a running engine's /healthz and print it for a person.  "
            "Exit 0 when it is healthy (the query runs and is not stuck; an "
            "idle engine is healthy), 1 when it is not or cannot be reached, "
            "2 for a --url that is not one."
        ),
    )
    status.add_argument(
        "--url",
        default=f"http://127.0.0.1:{DEFAULT_STATUS_PORT}",
        help=f"the engine's status server (default http://127.0.0.1:"
        f"{DEFAULT_STATUS_PORT})",
    )
    status.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=5.0,
        help="seconds to wait (default 5)",
    )
    status.set_defaults(func=status_command)
    _register_bench(subparsers)
    engine.set_defaults(func=lambda args: _help(engine))


def _add_analysis_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--feature-window",
        type=int,
        default=300,
        help="host feature window, s; match the model's (default 300)",
    )
    run.add_argument(
        "--feature-slide",
        type=int,
        default=60,
        help="host feature window slide, s (default 60)",
    )
    run.add_argument(
        "--internal-networks",
        default=",".join(PRIVATE_NETWORKS),
        metavar="CIDR[,CIDR...]",
        help="internal networks of every tenant without its own "
        f"(default {','.join(PRIVATE_NETWORKS)})",
    )
    run.add_argument(
        "--tenant-networks",
        action="append",
        default=[],
        metavar="TENANT=CIDR[,CIDR...]",
        help="a tenant's own internal networks (repeatable; default "
        + "; ".join(f"{t}={','.join(c)}" for t, c in DEFAULT_TENANT_NETWORKS)
        + ")",
    )
    run.add_argument(
        "--top-talkers",
        type=int,
        default=10,
        help="talkers kept per final estimate (default 10)",
    )


def _add_output_arguments(run: argparse.ArgumentParser) -> None:
    off = " ('none': off)"
    run.add_argument(
        "--model-service-url",
        default=LOCAL_MODEL_SERVICE_URL,
        help=f"model service base URL (default {LOCAL_MODEL_SERVICE_URL})" + off,
    )
    run.add_argument(
        "--mongo-uri",
        type=_mongo_uri,
        default=LOCAL_MONGO_URI,
        help="MongoDB/DocumentDB URI for detections and estimates "
        f"(default {LOCAL_MONGO_URI})" + off,
    )
    run.add_argument(
        "--mongo-database",
        default="sampleflow",
        help="database of the detections and network_estimates collections",
    )
    run.add_argument(
        "--mongo-timeout",
        type=float,
        default=5.0,
        help="seconds each store call may take (default 5)",
    )
    run.add_argument(
        "--state-table",
        default="sampleflow-tenant-state",
        help="DynamoDB table of per-tenant state (default sampleflow-tenant-state)"
        + off,
    )
    run.add_argument(
        "--metrics-namespace",
        default="Sampleflow/Engine",
        help="CloudWatch namespace of the engine's metrics (default "
        "Sampleflow/Engine)" + off,
    )
    run.add_argument(
        "--aws-endpoint-url",
        help="DynamoDB and CloudWatch endpoint (default: --endpoint-url)",
    )
    run.add_argument(
        "--detections",
        choices=DETECTION_MODES,
        default="alerts",
        help="store alerting windows only, or every scored window",
    )
    run.add_argument(
        "--alert-k",
        type=int,
        default=2,
        help="detections need K of a host's last N windows alerting (default 2)",
    )
    run.add_argument(
        "--alert-n",
        type=int,
        default=3,
        help="the N of --alert-k (default 3; 1 and 1: every alerting window)",
    )
    run.add_argument(
        "--max-future",
        type=int,
        default=300,
        help="flow rows more than this many seconds past their batch's Kinesis "
        "arrival are left out and counted (default 300)",
    )
    run.add_argument(
        "--score-retry",
        type=float,
        default=10.0,
        help="seconds to wait after the model service or store failed (default 10)",
    )


def _port_or_none(value: str) -> int | None:
    if value.lower() in {"none", "off"}:
        return None
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"a port in 0..65535 or 'none' is required, got {value!r}"
        )
    return port


def _positive_seconds(text: str) -> float:
    """``--timeout``: seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds > 0 are required, got {text!r}")
    return value


def status_command(args: argparse.Namespace) -> int:
    """``engine status``: fetch /healthz and print it, one field a line."""
    base = args.url.rstrip("/")
    if base.endswith("/healthz"):  # the endpoint itself was given
        base = base[: -len("/healthz")]
    url = base + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503: answered, not healthy
        body = exc.read()
        if exc.code != 503:
            print(
                f"sampleflow engine status: error: {url} answered HTTP {exc.code} "
                "(not a sampleflow engine? `sampleflow local status` shows the "
                "local stack's engine port)",
                file=sys.stderr,
            )
            return 1
    except ValueError as exc:  # not a URL urllib can open
        print(
            f"sampleflow engine status: error: --url {args.url!r}: {exc} "
            "(give http://HOST:PORT)",
            file=sys.stderr,
        )
        return 2
    except (urllib.error.URLError, OSError) as exc:
        print(
            f"sampleflow engine status: error: cannot read {url}: {exc} "
            "(is the engine running, with --status-port?)",
            file=sys.stderr,
        )
        return 1
    try:
        health = json.loads(body)
    except ValueError:
        print(
            f"sampleflow engine status: error: {url} did not answer JSON",
            file=sys.stderr,
        )
        return 1
    width = max((len(k) for k in health), default=0)
    for key, value in health.items():
        print(f"{key:<{width}}  {'-' if value is None else value}")
    return 0 if health.get("status") == "ok" else 1


def _off(value: str | None) -> str | None:
    return None if value is None or value.lower() in {"", "none", "off"} else value


def _mongo_uri(text: str) -> str:
    """``--mongo-uri``: off, or a URI of a scheme pymongo takes (it checks
    the rest when the engine connects)."""
    if _off(text) is None or text.startswith(("mongodb://", "mongodb+srv://")):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a mongodb:// or mongodb+srv:// URI (or 'none')"
    )


def _networks(args: argparse.Namespace) -> tuple[tuple[str, tuple[str, ...]], ...]:
    pairs = dict(DEFAULT_TENANT_NETWORKS)
    for item in args.tenant_networks:
        tenant, sep, cidrs = item.partition("=")
        if not sep or not tenant:
            raise ConfigError(
                f"--tenant-networks wants TENANT=CIDR[,CIDR...], got {item!r}"
            )
        pairs[tenant] = tuple(c.strip() for c in cidrs.split(",") if c.strip())
    return tenant_networks(pairs)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_command(args: argparse.Namespace) -> int:
    """Run the engine until stopped (SIGINT/SIGTERM) or, with
    ``--available-now``, until the stream is read; returns the exit code."""
    # Imported here: pyspark is in the cloud extra, and every `sampleflow`
    # command loads this module to build its parser.
    from cloud.engine.config import EngineConfig  # noqa: PLC0415
    from cloud.engine.job import start_engine  # noqa: PLC0415
    from cloud.engine.spark import build_spark_session  # noqa: PLC0415

    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as exc:
        print(f"sampleflow engine: {exc}", file=sys.stderr)
        return 2
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
            feature_window_s=args.feature_window,
            feature_slide_s=args.feature_slide,
            internal_networks=tuple(
                c.strip() for c in args.internal_networks.split(",") if c.strip()
            ),
            tenant_networks=_networks(args),
            top_talkers=args.top_talkers,
            model_service_url=_off(args.model_service_url),
            mongo_uri=_off(args.mongo_uri),
            mongo_database=args.mongo_database,
            mongo_timeout_s=args.mongo_timeout,
            state_table=_off(args.state_table),
            metrics_namespace=_off(args.metrics_namespace),
            aws_endpoint_url=args.aws_endpoint_url,
            detections=args.detections,
            alert_k=args.alert_k,
            alert_n=args.alert_n,
            max_future_s=args.max_future,
            score_retry_s=args.score_retry,
            status_address=args.status_address,
            status_port=args.status_port,
        )
    except ConfigError as exc:
        log.error("engine_config_invalid", error=str(exc))
        return 2
    trouble = stream_trouble(config.stream_name, config.endpoint_url, config.region)
    if trouble is not None:
        log.error("engine_stream_unreachable", error=trouble)
        print(f"sampleflow engine run: error: {trouble}", file=sys.stderr)
        return 1
    spark = build_spark_session(
        master=config.master, shuffle_partitions=config.shuffle_partitions
    )
    # Spark's own INFO lines would drown the engine's one line per batch.
    spark.sparkContext.setLogLevel("WARN")
    engine = start_engine(config, spark=spark, available_now=args.available_now)
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


def stream_trouble(
    stream_name: str, endpoint_url: str | None, region: str | None
) -> str | None:
    """Why the stream cannot be read, in one line, or None when it can.

    Asked once before Spark starts: the same failure inside the streaming
    query ends the run with hundreds of lines of Java and Python traces.
    """
    import botocore.exceptions  # noqa: PLC0415 - boto3 is loaded by now anyway

    from cloud.engine.kinesis.client import (  # noqa: PLC0415
        ClientSettings,
        make_client,
    )

    where = endpoint_url or "AWS"
    try:
        client = make_client(
            ClientSettings(
                stream_name,
                endpoint_url,
                region,
                max_attempts=2,
                connect_timeout_s=5.0,
                read_timeout_s=10.0,
            )
        )
        try:
            client.describe_stream_summary(StreamName=stream_name)
        finally:
            client.close()
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        return (
            f"Kinesis stream {stream_name!r} at {where}: "
            f"{error.get('Code', 'error')}: {error.get('Message', exc)}"
        )
    except botocore.exceptions.NoRegionError:
        return "no AWS region: pass --region or set AWS_DEFAULT_REGION"
    except botocore.exceptions.NoCredentialsError:
        return (
            "no AWS credentials found (environment, shared files, instance "
            "or container role)"
        )
    except botocore.exceptions.BotoCoreError as exc:
        return f"cannot reach Kinesis at {where}: {exc} (check --endpoint-url)"
    return None


def _register_bench(subparsers: Any) -> None:
    """Add ``engine`` to the ``bench`` command (made by edge_agent.bench)."""
    bench = subparsers.choices.get("bench")
    if bench is None:
        bench = subparsers.add_parser("bench", help="run a benchmark")
        bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    benchmarks = next(
        a for a in bench._actions if isinstance(a, argparse._SubParsersAction)
    )
    parser = benchmarks.add_parser(
        "engine",
        help="flow rows/s through the engine, micro-batch overhead, latency",
        description=(
            "Measure the engine on synthetic relay batches (2,000 internal "
            "hosts, 1:100): rows/s of the wire-format decode and the driver's "
            "per-micro-batch work (estimates, features, scoring) "
            "in-process, with the model service in-process and over HTTP; "
            "then the Spark engine on a local Kinesis (MiniStack): rows/s, "
            "micro-batch overhead, and latency from put to detection in "
            "the store with a 2 s trigger.  See docs/engine.md."
        ),
    )
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="flow rows (default 1,000,000)"
    )
    parser.add_argument(
        "--latency-batches",
        type=int,
        default=20,
        help="puts timed from Kinesis to the detection store (default 20)",
    )
    parser.add_argument(
        "--skip-spark", action="store_true", help="only the in-process parts"
    )
    parser.add_argument("--workdir", type=Path, help="scratch folder (default tmp)")
    parser.set_defaults(func=bench_engine)


def bench_engine(args: argparse.Namespace) -> int:
    """Run the benchmark (see :mod:`cloud.engine.bench`)."""
    from cloud.engine.bench import print_report, run_benchmark  # noqa: PLC0415

    report = run_benchmark(
        rows=args.rows,
        latency_batches=args.latency_batches,
        spark=not args.skip_spark,
        workdir=args.workdir,
    )
    print_report(report)
    return 0
