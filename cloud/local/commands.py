"""``sampleflow local up|down|status`` and ``sampleflow demo``.

Registered through the ``sampleflow.commands`` entry-point group
(``local`` and ``demo``).  Exit codes: 0 success, 1 a part failed or a port
is taken, 2 a usage or settings error, 130 stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, get_type_hints

from cloud.local.settings import (
    LocalSettings,
    SettingsError,
    flag_name,
    load_settings,
    setting_names,
)

Subparsers = argparse._SubParsersAction  # argparse exposes no public name


def register(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``local`` (up, down, status)."""
    local = subparsers.add_parser(
        "local",
        help="run the whole pipeline on this machine (local servers)",
        description=(
            "Start, inspect or stop the local stack: MiniStack (AWS APIs), "
            "the MongoDB-compatible store, the Spark engine and a relay, as "
            "child processes on 127.0.0.1."
        ),
    )
    commands = local.add_subparsers(dest="local_command", metavar="COMMAND")
    local.set_defaults(func=lambda args: _help(local))
    up = commands.add_parser(
        "up",
        help="start everything and wait until healthy; Ctrl-C stops it all",
    )
    up.add_argument(
        "--detach",
        action="store_true",
        help="return once healthy and leave it running (stop: local down)",
    )
    _settings_flags(up)
    up.set_defaults(func=local_up)
    down = commands.add_parser("down", help="stop everything the stack started")
    _settings_flags(down)
    down.set_defaults(func=local_down)
    status = commands.add_parser("status", help="each part: pid, ports, health")
    _settings_flags(status)
    status.set_defaults(func=local_status)


def register_demo(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Add ``demo``."""
    from cloud.local import demo  # noqa: PLC0415 - keeps `local` light

    parser = subparsers.add_parser(
        "demo",
        help="replay real botnet traffic through the whole pipeline",
        description=demo.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(parser)
    _settings_flags(parser)
    parser.set_defaults(func=run_demo)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


#: What a default of 0 means, for the settings where it is not a port.
_ZERO_MEANS = {
    "mqtt_port": ": off",
    "engine_status_port": ": a free port picked at each up, shown by status",
    "engine_lateness_s": ": the engine's 120 s; a stack the demo starts scales it",
}


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "settings (also SAMPLEFLOW_LOCAL_<KEY> or [local] in --config)"
    )
    group.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file with a [local] table"
    )
    kinds = get_type_hints(LocalSettings)
    defaults = LocalSettings()
    for key in setting_names():
        kind = kinds[key]
        group.add_argument(
            flag_name(key),
            dest=f"setting_{key}",
            type=kind if kind in (int, float) else str,
            metavar=key.upper().rsplit("_", 1)[-1] if kind is not Path else "DIR",
            default=None,
            help=f"(default {getattr(defaults, key)}{_ZERO_MEANS.get(key, '')})",
        )


def settings_from_args(args: argparse.Namespace) -> LocalSettings:
    """The settings of a parsed command line (raises SettingsError)."""
    flags = {key: getattr(args, f"setting_{key}", None) for key in setting_names()}
    return load_settings(getattr(args, "config", None), flags)


def _settings(args: argparse.Namespace, prog: str) -> LocalSettings | None:
    # The command's own output is its report; library events below warning
    # (data loaded, tables created) would only clutter it, unless asked for.
    from edge_agent.logs import LEVEL_ENV, configure_logging  # noqa: PLC0415

    configure_logging(os.environ.get(LEVEL_ENV) or "warning")
    try:
        return settings_from_args(args)
    except SettingsError as exc:
        print(f"sampleflow {prog}: settings error: {exc}", file=sys.stderr)
        return None


def _say(text: str) -> None:
    print(text, flush=True)


class _Interrupted:
    """Turns SIGINT/SIGTERM into an event (and remembers which came)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupted:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self.event.set()
        # A second Ctrl-C while stopping must not leave children behind:
        # ignore it; the stop has its own timeouts.
        signal.signal(signum, signal.SIG_IGN)


def local_up(args: argparse.Namespace) -> int:
    """``local up``: start, wait healthy, then supervise (or detach)."""
    from cloud.local.stack import LocalStack, StackError  # noqa: PLC0415

    settings = _settings(args, "local up")
    if settings is None:
        return 2
    stack = LocalStack(settings)
    with _Interrupted() as interrupted:
        try:
            stack.up(_say, interrupted.event)
        except StackError as exc:
            print(f"sampleflow local up: error: {exc}", file=sys.stderr)
            return 130 if interrupted.event.is_set() else 1
        _print_status(stack)
        if args.detach:
            _say("running in the background; stop with `sampleflow local down`")
            return 0
        _say("supervising; Ctrl-C stops everything")
        code = 0
        try:
            if not stack.supervise(interrupted.event):
                _say("stopped by `sampleflow local down`")
                return 0
        except StackError as exc:
            print(f"sampleflow local up: error: {exc}", file=sys.stderr)
            code = 1
        try:
            stack.down(_say)
        except StackError as exc:
            print(f"sampleflow local up: error: {exc}", file=sys.stderr)
            return 1
        _say("stopped")
        return 130 if code == 0 and interrupted.signum == signal.SIGINT else code


def local_down(args: argparse.Namespace) -> int:
    """``local down``: stop what ``up`` started (pids from stack.json)."""
    from cloud.local.stack import LocalStack, StackError  # noqa: PLC0415

    settings = _settings(args, "local down")
    if settings is None:
        return 2
    stack = LocalStack.attach(settings)
    with _Interrupted():
        try:
            stopped = stack.down(_say)
        except StackError as exc:
            print(f"sampleflow local down: error: {exc}", file=sys.stderr)
            return 1
    _say(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def local_status(args: argparse.Namespace) -> int:
    """``local status``: exit 0 when every available part is healthy."""
    from cloud.local.stack import LocalStack  # noqa: PLC0415

    settings = _settings(args, "local status")
    if settings is None:
        return 2
    stack = LocalStack.attach(settings)
    statuses = _print_status(stack)
    unavailable = {p.name for p in stack.parts() if p.unavailable is not None}
    return 0 if all(s.healthy for s in statuses if s.name not in unavailable) else 1


def _print_status(stack: Any) -> list[Any]:
    statuses = stack.status()
    _say(f"{'part':<14} {'pid':>7}  {'ports':<20} state")
    for s in statuses:
        ports = ", ".join(str(p) for p in s.ports) or "-"
        pid = str(s.pid) if s.pid is not None and s.running else "-"
        _say(f"{s.name:<14} {pid:>7}  {ports:<20} {s.detail}")
    _say(f"state dir: {stack.state_dir}")
    return list(statuses)


def run_demo(args: argparse.Namespace) -> int:
    """``demo``: see :mod:`cloud.local.demo`."""
    from cloud.local import demo  # noqa: PLC0415

    settings = _settings(args, "demo")
    if settings is None:
        return 2
    with _Interrupted() as interrupted:
        return demo.main(args, settings, interrupted.event)
