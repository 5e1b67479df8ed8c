"""The ``sampleflow`` command line.

Edge commands are listed here.  Cloud commands are plugged in through the
``sampleflow.commands`` entry-point group (declared in pyproject.toml), so
the edge package never imports the cloud one and a relay-only install
simply has fewer subcommands.

Each command module exposes ``register(subparsers)``, which adds its parser
and sets ``func`` to a callable taking the parsed namespace and returning an
exit code.

Exit codes: 0 success, 1 a failure of the environment while running (an
unreachable endpoint, missing credentials, a missing extra), 2 a bad
argument or input (usage, a missing or unreadable file, an invalid
configuration).  Either is one line ``sampleflow <command>: error: <what>``
on stderr; for an exception that escapes a command, ``--debug`` (before
the command) or ``SAMPLEFLOW_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from edge_agent.logs import configure_logging

#: Set to 1 to get the traceback of an error instead of its one-line summary.
DEBUG_ENV = "SAMPLEFLOW_DEBUG"

#: Our own top-level packages: a missing one is a broken install, not a
#: missing extra.
OWN_PACKAGES = frozenset({"edge_agent", "cloud"})

#: Modules of the edge package that contribute subcommands.
EDGE_COMMAND_MODULES: tuple[str, ...] = (
    "edge_agent.collect.decode_command",
    "edge_agent.bench.command",
    "edge_agent.relay.commands",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="sampleflow",
        description="Sampled network flow threat detection.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an error (also {DEBUG_ENV}=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in EDGE_COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for ep in entry_points(group="sampleflow.commands"):
        try:
            register = ep.load()
        except ImportError as exc:
            # A relay-only install declares the cloud commands too (one
            # pyproject) but lacks their dependencies: offer a clear message
            # instead of breaking every other command.
            _register_unavailable(subparsers, ep.name, exc)
            continue
        register(subparsers)
    return parser


def _register_unavailable(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    error: ImportError,
) -> None:
    """Add a subcommand that explains why ``name`` cannot run here."""
    if name in subparsers.choices:
        return
    message = (
        f"sampleflow {name}: not available in this install ({error}); "
        "install the cloud extra: pip install 'sampleflow[cloud]'"
    )
    sub = subparsers.add_parser(name, help="(needs the cloud extra)", add_help=False)
    sub.add_argument("rest", nargs=argparse.REMAINDER)

    def explain(_args: argparse.Namespace) -> int:
        print(message, file=sys.stderr)
        return 2

    sub.set_defaults(func=explain)


def command_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``"relay status"``: the chain of subcommands ``args`` selected."""
    words: list[str] = []
    current: argparse.ArgumentParser | None = parser
    while current is not None:
        chosen = None
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                word = getattr(args, action.dest or "", None)
                if isinstance(word, str) and word in action.choices:
                    words.append(word)
                    chosen = action.choices[word]
                break
        current = chosen
    return " ".join(words)


def describe_error(exc: BaseException, func: object) -> str | None:
    """One line saying what went wrong, for the errors a user or the
    environment causes; None for the others (a bug: its traceback shows).

    ``func`` is the command that raised: a missing module under a cloud
    command means the cloud extra is not installed.
    """
    if isinstance(exc, ModuleNotFoundError):
        missing = (exc.name or "").partition(".")[0]
        if missing in OWN_PACKAGES:
            return None
        module = getattr(func, "__module__", "") or ""
        if module.startswith("cloud.") and missing == "tensorflow":
            return (
                f"this command needs the train extra: pip install "
                f"'sampleflow[train]' (module {exc.name} is not installed)"
            )
        if module.startswith("cloud."):
            return (
                f"this command needs the cloud extra: pip install "
                f"'sampleflow[cloud]' (module {exc.name} is not installed)"
            )
        return f"module {exc.name} is not installed (reinstall sampleflow)"
    if isinstance(exc, OSError):
        return str(exc) or type(exc).__name__
    boto = _describe_boto_error(exc)
    if boto is not None:
        return boto
    return _describe_mongo_error(exc)


def _describe_boto_error(exc: BaseException) -> str | None:
    # botocore is a base dependency (boto3); imported here, as only a
    # failing command needs it.
    from botocore.exceptions import (  # noqa: PLC0415
        BotoCoreError,
        ClientError,
        NoCredentialsError,
    )

    if isinstance(exc, NoCredentialsError):
        return (
            f"{exc} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    if isinstance(exc, (BotoCoreError, ClientError)):
        return str(exc)
    return None


def _describe_mongo_error(exc: BaseException) -> str | None:
    try:
        from pymongo.errors import PyMongoError  # noqa: PLC0415 - cloud extra
    except ImportError:
        return None
    if isinstance(exc, PyMongoError):
        return f"MongoDB: {exc}"
    return None


def _stdout_broken() -> bool:
    """Whether stdout is a pipe whose reader has gone.

    A BrokenPipeError may come from a socket too; only the one of stdout is
    the quiet ``| head`` case.  Linux reports a pipe without readers as
    POLLERR on its write end.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(
        events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)
    )


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): exit quietly.  Python
    flushes stdout again at exit; pointing it at /dev/null keeps that flush
    from raising a second BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging()
    except ValueError as exc:
        print(f"sampleflow: {exc}", file=sys.stderr)
        return 2
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        result = func(args)
        sys.stdout.flush()
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_broken():
            return _stdout_closed()
        message = None if debug else describe_error(exc, func)
        if message is None:
            raise
        name = command_name(parser, args)
        print(f"sampleflow {name}: error: {message}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
