"""``sampleflow relay run | check-config | status``.

Exit codes: 0 success, 1 a runtime failure (a port or the spool in use,
the metrics endpoint unreachable), 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.argtypes import positive_float
from edge_agent.collect.udp import CollectorError
from edge_agent.modelsync.verify import check_tls_files
from edge_agent.relay.config import (
    ConfigError,
    Settings,
    load_settings,
    render_settings,
)
from edge_agent.relay.metrics import ModelSyncCollector
from edge_agent.relay.pipeline import RelayPipeline
from edge_agent.spool import SpoolError

if TYPE_CHECKING:
    from edge_agent.modelsync.service import ModelSyncService

Subparsers = argparse._SubParsersAction  # argparse exposes no public name


class ModelSyncSetupError(RuntimeError):
    """The ``[modelsync]`` agent cannot be built (a key file unreadable)."""


def register(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``relay`` with its subcommands."""
    relay = subparsers.add_parser("relay", help="run or inspect the edge relay")
    commands = relay.add_subparsers(dest="relay_command", metavar="COMMAND")
    relay.set_defaults(func=lambda args: _help(relay))

    run = commands.add_parser(
        "run",
        help="run the relay until SIGTERM or SIGINT",
        description=(
            "Receive flow exports on UDP, decode, pre-aggregate, encode, "
            "spool and ship to Kinesis.  Settings come from --config and "
            "SAMPLEFLOW_<SECTION>_<KEY> environment variables (those win)."
        ),
    )
    run.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    run.set_defaults(func=run_relay)

    check = commands.add_parser(
        "check-config",
        help="validate settings and print the effective ones",
        description="Exit 0 and print every setting with its source, or exit 2.",
    )
    check.add_argument("config", type=Path, nargs="?", metavar="FILE")
    check.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        dest="config_option",
        help="the same as FILE (as relay run takes it)",
    )
    check.set_defaults(func=check_config)

    status = commands.add_parser(
        "status",
        help="print the running relay's figures from its metrics endpoint",
    )
    status.add_argument(
        "--url",
        metavar="URL",
        help="metrics endpoint (default: from the settings, http://ADDRESS:PORT)",
    )
    status.add_argument("--config", type=Path, metavar="FILE", help="TOML settings")
    status.add_argument("--timeout", type=positive_float, default=5.0, metavar="S")
    status.set_defaults(func=relay_status)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _load(path: Path | None, prog: str) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"sampleflow relay {prog}: configuration error: {exc}", file=sys.stderr)
        return None


def check_config(args: argparse.Namespace) -> int:
    """``relay check-config``: validate, print the effective settings.

    Settings ``relay run`` needs but that are not set (the tenant) do not
    fail the check; they are named on stderr.
    """
    option = getattr(args, "config_option", None)
    if option is not None and args.config is not None and option != args.config:
        print(
            "sampleflow relay check-config: error: two files given "
            f"({args.config} and --config {option}); give one",
            file=sys.stderr,
        )
        return 2
    settings = _load(args.config or option, "check-config")
    if settings is None:
        return 2
    sys.stdout.write(render_settings(settings))
    try:
        settings.require_tenant()
    except ConfigError as exc:
        print(f"sampleflow relay check-config: note: {exc}", file=sys.stderr)
    model = settings.filter.model
    if settings.filter.enabled and model is not None and not model.is_file():
        print(
            f"sampleflow relay check-config: note: filter.model={str(model)!r} "
            "is not a file: until a model is there (or modelsync brings one), "
            "rows pass unscored",
            file=sys.stderr,
        )
    return 0


def configure_logging(level: str, fmt: str, stream: TextIO = sys.stderr) -> None:
    """structlog: one line per event, JSON or console, at ``level``."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def run_relay(args: argparse.Namespace) -> int:
    """``relay run``: run the pipeline until SIGTERM/SIGINT."""
    settings = _load(args.config, "run")
    if settings is None:
        return 2
    try:
        settings.require_tenant()
    except ConfigError as exc:
        print(f"sampleflow relay run: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.relay.log_level, settings.relay.log_format)
    try:
        asyncio.run(_run(settings))
    except ModelSyncSetupError as exc:
        print(f"sampleflow relay run: configuration error: {exc}", file=sys.stderr)
        return 2
    except CollectorError as exc:
        structlog.get_logger(__name__).error("relay_failed", error=str(exc))
        print(
            f"sampleflow relay run: error: {exc} "
            "(settings collector.listen_addresses, collector.ports)",
            file=sys.stderr,
        )
        return 1
    except (SpoolError, OSError) as exc:
        structlog.get_logger(__name__).error("relay_failed", error=str(exc))
        print(f"sampleflow relay run: error: {exc}", file=sys.stderr)
        return 1
    return 0


def build_model_sync(
    settings: Settings, pipeline: RelayPipeline
) -> ModelSyncService | None:
    """The in-process update agent over the pipeline's filter, registered
    in its metrics (None without ``[modelsync]``).  Raises ``ValueError``
    naming the file when a trusted key or the TLS certificate, key or CA
    cannot be read or parsed, ``OSError`` when
    the models folder cannot be created."""
    if settings.modelsync is None or pipeline.filter is None:
        return None
    # Imported here: awsiotsdk is only loaded by relays that take updates.
    from edge_agent.modelsync.service import ModelSyncService  # noqa: PLC0415

    m = settings.modelsync
    service = ModelSyncService(m, pipeline.filter)
    check_tls_files(m.cert_path, m.key_path, m.ca_path)
    pipeline.registry.register(ModelSyncCollector(service))
    return service


async def _run(settings: Settings) -> None:
    pipeline = RelayPipeline(settings)
    try:
        updates = build_model_sync(settings, pipeline)
    except (OSError, ValueError) as exc:
        raise ModelSyncSetupError(f"[modelsync]: {exc}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if updates is not None:
        # Before the pipeline loads the configured model: the store's
        # current model is the one that runs.
        await asyncio.to_thread(updates.load_current, settings.filter_model)
    await pipeline.start()
    if updates is not None:
        updates.start()
    # Everything allocated so far (modules, boto3's service models: a few
    # hundred thousand objects) lives as long as the process: keep it out
    # of the cyclic collector, whose full passes over it stall the event
    # loop for tens of ms, long enough for the socket buffer to overflow.
    gc.freeze()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        if updates is not None:
            # First, so that no swap starts while the pipeline drains.
            await asyncio.to_thread(updates.stop)
        await pipeline.stop()


# -- status -----------------------------------------------------------------


def _metrics_url(args: argparse.Namespace) -> str | None:
    if args.url:
        parts = urllib.parse.urlsplit(str(args.url))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            print(
                f"sampleflow relay status: error: --url {args.url!r} is not an "
                "http:// or https:// URL (e.g. http://127.0.0.1:9464)",
                file=sys.stderr,
            )
            return None
        return str(args.url).rstrip("/") + (
            "" if str(args.url).rstrip("/").endswith("/metrics") else "/metrics"
        )
    settings = _load(args.config, "status")
    if settings is None:
        return None
    m = settings.metrics
    host = f"[{m.listen_address}]" if ":" in m.listen_address else m.listen_address
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{m.port}/metrics"


def read_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> {sample name: [(labels, value), ...]}."""
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), float(sample.value)))
    return out


def relay_status(args: argparse.Namespace) -> int:
    """``relay status``: fetch /metrics and print it for a person."""
    url = _metrics_url(args)
    if url is None:
        return 2
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        print(
            f"sampleflow relay status: error: cannot read {url}: {exc} "
            "(is the relay running, with metrics enabled?)",
            file=sys.stderr,
        )
        return 1
    print_status(read_metrics(text), sys.stdout)
    return 0


def print_status(
    metrics: dict[str, list[tuple[dict[str, str], float]]], stream: TextIO
) -> None:
    """Print the relay's figures: identity, flow through each stage, drops."""
    p = "sampleflow_relay_"

    def total(name: str) -> float:
        return sum(v for _, v in metrics.get(p + name, []))

    def line(label: str, value: str) -> None:
        print(f"{label:<28} {value}", file=stream)

    for labels, _ in metrics.get(p + "info", []):
        line("relay", f"{labels.get('tenant_id')}/{labels.get('relay_id')}")
        line("stream", labels.get("stream", ""))
    line("uptime", f"{total('uptime_seconds'):.0f} s")
    line("datagrams received", f"{total('datagrams_total'):.0f}")
    line("records decoded", f"{total('exporter_records_total'):.0f}")
    line("records aggregated", f"{total('records_in_total'):.0f}")
    line("rows out", f"{total('records_out_total'):.0f}")
    line("aggregation ratio", f"{total('aggregation_ratio'):.2f} records per row")
    if total("filter_enabled"):
        models = [
            labels["version"] for labels, _ in metrics.get(p + "filter_model_info", [])
        ]
        line("filter model", models[0] if models else "none (rows pass through)")
        line(
            "filter rows",
            f"{total('filter_rows_in_total'):.0f} in, "
            f"{total('filter_rows_out_total'):.0f} out, "
            f"{total('filter_express_rows_total'):.0f} express",
        )
        passthrough = [
            f"{labels['reason']} {value:.0f}"
            for labels, value in metrics.get(p + "filter_passthrough_total", [])
            if value > 0
        ]
        if passthrough:
            line("filter passed through", ", ".join(passthrough) + " windows")
    else:
        line("filter", "off")
    line("batches encoded", f"{total('batches_encoded_total'):.0f}")
    line("batches spooled", f"{total('batches_spooled_total'):.0f}")
    line("batches shipped", f"{total('batches_shipped_total'):.0f}")
    line("batches retried", f"{total('batches_retried_total'):.0f}")
    line(
        "spool",
        f"{total('spool_batches'):.0f} batches, {total('spool_bytes'):.0f} of "
        f"{total('spool_max_bytes'):.0f} bytes, oldest "
        f"{total('spool_oldest_batch_age_seconds'):.1f} s",
    )
    since = total("seconds_since_ship")
    line("last shipped", "never" if since < 0 else f"{since:.1f} s ago")
    drops = [(labels, v) for labels, v in metrics.get(p + "dropped_total", []) if v > 0]
    if drops:
        print("drops:", file=stream)
        for labels, value in sorted(drops, key=lambda d: -d[1]):
            line(f"  {labels['stage']}/{labels['reason']}", f"{value:.0f}")
    else:
        line("drops", "none")
    _print_modelsync(metrics, line)
    exporters = metrics.get(p + "exporter_records_total", [])
    if exporters:
        print("exporters (records):", file=stream)
        for labels, value in sorted(exporters, key=lambda d: -d[1])[:20]:
            line(f"  {labels['exporter']}", f"{value:.0f}")


def _print_modelsync(
    metrics: dict[str, list[tuple[dict[str, str], float]]],
    line: Any,
) -> None:
    """The model-update lines of ``relay status`` (none without the agent)."""
    p = "sampleflow_relay_modelsync_"
    info = metrics.get(p + "info", [])
    if not info:
        line("model updates", "off")
        return

    def total(name: str) -> float:
        return sum(v for _, v in metrics.get(p + name, []))

    labels = info[0][0]
    state = "connected" if total("connected") else "not connected"
    if not total("agent_running"):
        state = "agent stopped"
    line("model updates", f"{state} as {labels['thing']} to {labels['endpoint']}")
    models = metrics.get(p + "model_info", [])
    line(
        "  update model",
        " ".join((models[0][0]["model"], models[0][0]["version"]))
        if models
        else "none installed",
    )
    failed = [
        (labels["reason"], value)
        for labels, value in metrics.get(p + "jobs_failed_total", [])
        if value > 0
    ]
    text = (
        f"{total('jobs_started_total'):.0f} taken, "
        f"{total('jobs_succeeded_total'):.0f} succeeded, "
        f"{sum(v for _, v in failed):.0f} failed"
    )
    if failed:
        text += " (" + ", ".join(f"{r} {v:.0f}" for r, v in failed) + ")"
    if total("update_in_progress"):
        text += ", one installing"
    line("  update jobs", text)
    line(
        "  update downloads",
        f"{total('downloads_total'):.0f} files, "
        f"{total('download_bytes_total'):.0f} bytes",
    )
    line(
        "  broker",
        f"{total('reconnects_total'):.0f} reconnects, "
        f"{total('connect_failures_total'):.0f} failed connects",
    )
