"""The ``sampleflow`` command line.

Edge commands are listed here.  Cloud commands are plugged in through the
``sampleflow.commands`` entry-point group (declared in pyproject.toml), so
the edge package never imports the cloud one and a relay-only install
simply has fewer subcommands.

Each command module exposes ``register(subparsers)``, which adds its parser
and sets ``func`` to a callable taking the parsed namespace and returning an
exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from edge_agent.logs import configure_logging

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
    result = func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
