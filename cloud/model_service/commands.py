"""``sampleflow model-service run | openapi`` and ``sampleflow bench model-service``.

Registered through the ``sampleflow.commands`` entry-point group, and the
benchmark through ``sampleflow.benchmarks``.  FastAPI
and uvicorn (cloud extra) are imported when a command runs, not when the
parser is built.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from cloud.model_service.config import (
    DEFAULT_MAX_ROWS,
    DEFAULT_MODEL,
    DEFAULT_POLL_INTERVAL_S,
    PROJECT_MODELS_DIR,
    ConfigError,
    ServiceConfig,
    parse_tenant_models,
)

Subparsers = argparse._SubParsersAction  # argparse exposes no public name


def register(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``model-service`` (``run``, ``openapi``)."""
    service = subparsers.add_parser(
        "model-service", help="the cloud model service (HTTP scoring)"
    )
    commands = service.add_subparsers(dest="model_service_command", metavar="COMMAND")
    service.set_defaults(func=lambda args: _help(service))

    run = commands.add_parser(
        "run",
        help="serve POST /v1/score until SIGTERM or SIGINT",
        description=(
            "Load per-tenant models from a folder or S3, reload them when a "
            "manifest changes, and score feature rows over HTTP.  See "
            "docs/model-service.md."
        ),
    )
    _add_source_arguments(run)
    run.add_argument("--host", default="127.0.0.1", help="listen address")
    run.add_argument(
        "--port", type=_port, default=8480, help="listen port (default 8480)"
    )
    run.set_defaults(func=run_service)

    openapi = commands.add_parser(
        "openapi",
        help="print (or write) the service's OpenAPI document",
        description="Write the OpenAPI JSON of the service, as docs/ commits it.",
    )
    openapi.add_argument("--out", type=Path, metavar="FILE", help="write here")
    openapi.set_defaults(func=write_openapi)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--models-dir",
        type=Path,
        metavar="DIR",
        help=f"models folder (default: {PROJECT_MODELS_DIR})",
    )
    where.add_argument("--s3-uri", metavar="s3://BUCKET/PREFIX", help="models on S3")
    parser.add_argument("--s3-endpoint-url", metavar="URL", help="S3 endpoint (local)")
    parser.add_argument(
        "--default-model",
        default=DEFAULT_MODEL,
        metavar="NAME",
        help=f"shared model for tenants without their own, or 'none' "
        f"(default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--tenant-model",
        action="append",
        default=[],
        metavar="TENANT=NAME",
        help="score TENANT with the shared model NAME (repeatable)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_INTERVAL_S,
        metavar="S",
        help="seconds between checks for new models "
        f"(default {DEFAULT_POLL_INTERVAL_S})",
    )
    parser.add_argument(
        "--max-rows",
        type=int,
        default=DEFAULT_MAX_ROWS,
        metavar="N",
        help=f"rows accepted per request (default {DEFAULT_MAX_ROWS})",
    )


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """Settings from parsed arguments; raises :class:`ConfigError`."""
    models_dir = args.models_dir
    if models_dir is None and args.s3_uri is None:
        models_dir = PROJECT_MODELS_DIR
    default = None if args.default_model.lower() == "none" else args.default_model
    return ServiceConfig(
        models_dir=models_dir,
        s3_uri=args.s3_uri,
        s3_endpoint_url=args.s3_endpoint_url,
        default_model=default,
        tenant_models=parse_tenant_models(args.tenant_model),
        poll_interval_s=args.poll_interval,
        max_rows=args.max_rows,
    )


def _port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0 to 65535, got {port}")
    return port


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (not listening yet).

    Bound before the models load and the app starts, so that a port in use
    is an error at once, not after a "started" log line.  Raises
    ``OSError`` whose message names the address.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror as exc:
        raise OSError(f"--host {host!r}: {exc.strerror}") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_service(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn handles both and drains)."""
    import uvicorn  # noqa: PLC0415 - cloud extra

    from cloud.model_service.app import create_app  # noqa: PLC0415

    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"sampleflow model-service run: error: {exc}", file=sys.stderr)
        return 2
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as exc:
        print(f"sampleflow model-service run: error: {exc}", file=sys.stderr)
        return 1
    with sock:
        app = create_app(config.registry(), max_rows=config.max_rows)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=args.host,
                port=args.port,
                log_level="warning",
                access_log=False,
                workers=1,
            )
        )
        server.run(sockets=[sock])
    return 0


def openapi_document() -> dict[str, Any]:
    """The service's OpenAPI document (independent of the loaded models)."""
    from cloud.model_service.app import create_app  # noqa: PLC0415
    from cloud.model_service.registry import (  # noqa: PLC0415
        DirectorySource,
        ModelRegistry,
    )

    registry = ModelRegistry(DirectorySource(PROJECT_MODELS_DIR), None)
    return create_app(registry, poll=False).openapi()


def write_openapi(args: argparse.Namespace) -> int:
    """Print the OpenAPI document, or write it to ``--out``."""
    text = json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    return 0


def register_bench(benchmarks: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``model-service`` to the ``bench`` subcommands (the
    ``sampleflow.benchmarks`` entry point)."""
    parser = benchmarks.add_parser(
        "model-service",
        help="rows/s scored through HTTP and in-process",
        description=(
            "Start the model service as a real server process on a loopback "
            "port, post batches of feature rows to it, then score the same "
            "batches in-process; print rows/s and rows per CPU-second of both."
        ),
    )
    parser.add_argument("--models-dir", type=Path, metavar="DIR", default=None)
    parser.add_argument(
        "--batch", type=int, default=1000, metavar="N", help="rows per request"
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, metavar="S", help="timing per mode"
    )
    parser.set_defaults(func=bench_model_service)


def bench_model_service(args: argparse.Namespace) -> int:
    """Run the benchmark (see :mod:`cloud.model_service.bench`)."""
    from cloud.model_service.bench import print_report, run_benchmark  # noqa: PLC0415

    report = run_benchmark(
        models_dir=args.models_dir or PROJECT_MODELS_DIR,
        batch=args.batch,
        seconds=args.seconds,
    )
    print_report(report)
    return 0
