"""``python -m edge_agent.modelsync``: run the relay's jobs agent standalone.

Commands:

* ``run --config FILE``: the agent (see :mod:`.agent`) until SIGTERM/SIGINT;
* ``install-local --config FILE MODEL MANIFEST``: provision the first
  model of a new relay from local files (size and SHA-256 checked against
  the manifest, the canary run), without a job.

The environment variable ``SAMPLEFLOW_MODELSYNC_PAUSE_AT`` (one of
``download``, ``before-pointer``, ``after-pointer``) makes the agent stop
dead at that point of an install and write ``paused-at-POINT`` into the
models folder: the crash tests use it to kill a relay at an exact point.
It must not be set in production.  Only the standalone agent reads it:
``sampleflow relay run`` would take it for a ``[modelsync]`` key and
refuse to start, so the in-relay agent has no kill-point hook.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from edge_agent.filter import RelayFilter
from edge_agent.modelsync import store as st
from edge_agent.modelsync.agent import JobsAgent
from edge_agent.modelsync.config import ModelSyncConfig
from edge_agent.modelsync.errors import ModelRejectedError
from edge_agent.modelsync.installer import FilterInstaller, filter_installer
from edge_agent.modelsync.runner import PAUSE_POINTS, PauseHook, UpdateRunner
from edge_agent.modelsync.verify import check_digest, file_digest, trusted_keys

PAUSE_ENV = "SAMPLEFLOW_MODELSYNC_PAUSE_AT"
log = structlog.get_logger(__name__)


def build_installer(config: ModelSyncConfig) -> FilterInstaller:
    """A :class:`FilterInstaller` over a new :class:`RelayFilter`, reading
    recent rows from ``canary_rows_path``."""
    return filter_installer(RelayFilter(config.internal_networks), config)


def _pause_hook(models_dir: Path) -> PauseHook | None:
    point = os.environ.get(PAUSE_ENV, "")
    if not point:
        return None
    if point not in PAUSE_POINTS:
        raise SystemExit(f"{PAUSE_ENV}={point!r}: valid points are {PAUSE_POINTS}")

    def pause(at: str) -> None:
        if at == point:
            (models_dir / f"paused-at-{at}").write_text(f"{os.getpid()}\n")
            while True:  # wait to be killed
                time.sleep(3600)

    return pause


def _run(config: ModelSyncConfig) -> int:
    store = st.ModelStore(config.models_dir)
    runner = UpdateRunner(
        config,
        store,
        build_installer(config),
        trusted_keys(config.public_keys),
        pause=_pause_hook(config.models_dir),
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    JobsAgent(config, runner).run(stop)
    return 0


def _install_local(config: ModelSyncConfig, model: Path, manifest_path: Path) -> int:
    import json  # noqa: PLC0415

    store = st.ModelStore(config.models_dir)
    manifest = json.loads(manifest_path.read_bytes())
    size, sha = file_digest(model)
    staged = store.new_tmp()
    staged_model = staged / str(manifest["model_file"])
    shutil.copyfile(model, staged_model)
    shutil.copyfile(manifest_path, staged / st.MANIFEST_FILE)
    try:
        check_digest(
            "model", size, sha, int(manifest["bytes"]), str(manifest["sha256"])
        )
        build_installer(config).validate_and_canary(staged_model, manifest)
    except (ModelRejectedError, KeyError) as exc:
        shutil.rmtree(staged, ignore_errors=True)
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    entry = st.entry_name(str(manifest["name"]), str(manifest["version"]), sha)
    store.commit(staged, entry)
    store.set_current(entry)
    print(entry)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m edge_agent.modelsync")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the jobs agent")
    run.add_argument("--config", type=Path, required=True)
    local = sub.add_parser("install-local", help="provision a first model")
    local.add_argument("--config", type=Path, required=True)
    local.add_argument("model", type=Path)
    local.add_argument("manifest", type=Path)
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    try:
        config = ModelSyncConfig.load(args.config)
    except OSError as exc:
        print(
            f"{prog}: error: cannot read --config {args.config}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    except ValueError as exc:
        # ModelSyncConfigError names the key; a JSON or TOML syntax error
        # says where in the file.
        print(f"{prog}: error: --config {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.command == "run":
        return _run(config)
    try:
        return _install_local(config, args.model, args.manifest)
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
