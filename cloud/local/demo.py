"""``sampleflow demo``: real botnet traffic through the whole pipeline.

What it does, in order:

1. Uses the running local stack (``sampleflow local up``) or starts one in
   ``--state-dir`` and stops it at the end (unless ``--keep``).
2. Loads the slice of CTU-13 scenario 6 to replay (:mod:`cloud.local.
   capture`): the Argus flows that start within ``--start`` and
   ``--minutes`` (default: the whole 129-minute capture), with their true
   unsampled totals.
3. Samples them as a router sampling 1 packet in ``--rate`` would
   (:func:`cloud.training.thinning.sample_flows`: binomial thinning, 60 s
   active timeout), moves them in time to now (in whole 300 s units, so the
   feature windows hold what they held in the capture), exports them as
   IPFIX (:class:`cloud.local.exporter.IpfixExporter`, the sampling rate
   announced in an options record so the relay learns it from the wire)
   from 127.0.0.6, each record when its flow ends, at ``--speedup`` times
   real time (:mod:`cloud.local.replay`).  ``--pcap FILE`` replays
   captures of flow exports alongside, from 127.0.0.1.
4. Meanwhile reads the stream as a second consumer (:mod:`cloud.local.
   stream`) and shows progress: flows sent, batches on Kinesis,
   micro-batches the engine finished, detections in the store.
5. Waits until the relay has shipped and the engine has counted every
   flow sent (and finished its micro-batch), then reports: flows in,
   bytes exported and shipped, estimated vs true totals with their
   confidence interval, the engine's detections, whether the infected
   host 147.32.84.165 was detected and how long after its first botnet
   flow, and where to look (:mod:`cloud.local.report`).

``--json FILE`` writes the report's figures; ``--save-pcap FILE`` every
datagram sent, for Wireshark or an independent decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cloud.local.stack import LocalStack

DESCRIPTION = __doc__ or ""

DEFAULT_SPEEDUP = 60.0
DEFAULT_RATE = 100
DEFAULT_SEED = 6
#: The CTU exporter's address (loopback; "scenario 6").
CTU_EXPORTER = "127.0.0.6"
DEMO_STATE = "demo.json"
POLL_S = 0.5
#: Seconds between two looks at the store during the replay.
STORE_POLL_S = 2.0

Metrics = dict[str, list[tuple[dict[str, str], float]]]


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's own flags (the settings flags are added by commands)."""
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        metavar="M",
        help="replay the flows that start in M minutes (default: all, 129 min)",
    )
    parser.add_argument(
        "--start",
        type=float,
        default=0.0,
        metavar="MIN",
        help="minutes into the capture where the slice starts (default 0)",
    )
    parser.add_argument(
        "--speedup",
        type=float,
        default=DEFAULT_SPEEDUP,
        metavar="X",
        help=f"times faster than real time (default {DEFAULT_SPEEDUP:g})",
    )
    parser.add_argument(
        "--rate",
        type=int,
        default=DEFAULT_RATE,
        metavar="N",
        help=f"packet sampling 1-in-N (default {DEFAULT_RATE})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"thinning seed (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--pcap",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="also replay this capture of flow exports (repeatable)",
    )
    parser.add_argument(
        "--data", type=Path, metavar="DIR", help="CTU-13 scenario 6 folder"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report")
    parser.add_argument(
        "--save-pcap", type=Path, metavar="FILE", help="write every datagram sent"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave a stack the demo started running (stop: local down)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=180.0,
        metavar="S",
        help="seconds to wait for the relay and engine after sending (180)",
    )


def main(args: argparse.Namespace, settings: Any, stop: threading.Event) -> int:
    """Run the demo (see the module docstring); returns the exit code."""
    from cloud.local.report import print_report  # noqa: PLC0415
    from cloud.local.stack import LocalStack, StackError  # noqa: PLC0415

    for ok, rule in (
        (args.speedup > 0, "--speedup must be > 0"),
        (args.minutes is None or args.minutes > 0, "--minutes must be > 0"),
        (args.start >= 0, "--start must be >= 0"),
        (args.rate >= 1, "--rate must be >= 1"),
    ):
        if not ok:
            print(f"sampleflow demo: {rule}", file=sys.stderr)
            return 2
    t_begin = time.monotonic()
    stack = LocalStack.attach(settings)
    started_here = False
    try:
        if stack.running_parts():
            check_running_stack(stack)
            print(f"using the running local stack in {stack.state_dir}")
        else:
            print(f"starting the local stack in {stack.state_dir}")
            started_here = True
            if not stack.settings.engine_lateness_s:
                stack.settings = dataclasses.replace(
                    stack.settings,
                    engine_lateness_s=replay_lateness_s(args.speedup),
                )
            stack.up(lambda text: print("  " + text, flush=True), stop)
        pids = {r.name: r.pid for r in stack.running_parts()}
        run = DemoRun(args, stack, stop)
        report = run.run(stack_start_s=time.monotonic() - t_begin)
        if report is None:
            print("interrupted")
            return 130
        stops = started_here and not args.keep
        report["stack"] = {
            "state_dir": str(stack.state_dir),
            "started_by_demo": started_here,
            "stopped_by_demo": stops,
            "pids": pids,
        }
        report["timings"]["total_s"] = round(time.monotonic() - t_begin, 1)
        print_report(report, sys.stdout)
        if stops:
            print(
                "the demo stops the stack it started: run `sampleflow local up` "
                "first (or pass --keep) to look at the results afterwards"
            )
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"report written to {args.json}")
    except (DemoError, StackError) as exc:
        print(f"sampleflow demo: error: {exc}", file=sys.stderr)
        return 130 if stop.is_set() else 1
    finally:
        if started_here and not args.keep:
            print("stopping the local stack")
            try:
                stack.down()
            except StackError as exc:
                print(f"sampleflow demo: error: {exc}", file=sys.stderr)
    return 0


#: Wall seconds by which one exporter's relay batches may trail another's
#: (the relay's 1 s window and 1 s lateness, shipping, a micro-batch).
REPLAY_LAG_WALL_S = 3.0
#: The engine's own default lateness, s.
ENGINE_LATENESS_S = 120


def replay_lateness_s(speedup: float) -> int:
    """The engine lateness (event time, s) for a replay at ``speedup``: a
    few wall seconds of relay and engine delay are ``speedup`` times as
    many event seconds, and rows behind the watermark would be left out
    of the estimates.  At least the engine's default of 120 s (60x gives
    180 s, 600x 1800 s).
    """
    return max(ENGINE_LATENESS_S, math.ceil(REPLAY_LAG_WALL_S * speedup))


def check_running_stack(stack: LocalStack) -> None:
    """Raise :class:`DemoError` naming each part of a running stack that is
    down (its process gone: killed, crashed) or unhealthy, with how to
    restart; parts this install cannot run are left out (``local up``
    skips them too)."""
    available = {p.name for p in stack.parts() if p.unavailable is None}
    bad = [
        s
        for s in stack.status()
        if s.name in available and not (s.running and s.healthy)
    ]
    if bad:
        raise DemoError(
            f"the local stack in {stack.state_dir} is running, but not all of "
            "it: "
            + ", ".join(f"{s.name}: {s.detail}" for s in bad)
            + "; restart it with `sampleflow local down` then `sampleflow local "
            "up` (logs in "
            + str(stack.logs_dir)
            + "; `sampleflow local status` shows each part)"
        )


class _Progress:
    """One progress line: rewritten in place on a terminal, else every 5 s."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._last = 0.0
        self._started = time.monotonic()

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        line = f"[{now - self._started:5.0f} s] {text}"
        if self.tty:
            sys.stdout.write("\r" + line[:120].ljust(120))
            sys.stdout.flush()
        elif force or now - self._last >= 5.0:
            print(line, flush=True)
            self._last = now

    def end(self) -> None:
        if self.tty:
            sys.stdout.write("\n")
            sys.stdout.flush()


class DemoRun:
    """One replay on a running stack; :meth:`run` returns the report."""

    def __init__(
        self, args: argparse.Namespace, stack: Any, stop: threading.Event
    ) -> None:
        self.args = args
        self.stack = stack
        self.settings = stack.settings
        self.stop = stop
        self.store: Any = None
        self._store_client: Any = None
        self._detections_seen = 0
        self._last_store_poll = 0.0

    # -- the phases -----------------------------------------------------------

    def run(self, stack_start_s: float) -> dict[str, Any] | None:
        """Load, replay, drain, report (None: interrupted)."""
        from cloud.local.exporter import ExporterConfig, IpfixExporter  # noqa: PLC0415
        from cloud.local.replay import PcapReplay, PcapWriter, RecordReplay  # noqa: PLC0415
        from cloud.local.stream import StreamReader  # noqa: PLC0415
        from edge_agent.collect.pcap import CaptureError  # noqa: PLC0415
        from edge_agent.flows.schema import address_bytes  # noqa: PLC0415

        args, s = self.args, self.settings
        t0 = time.monotonic()
        piece, records, shift = self._load()
        target = ("127.0.0.1", s.relay_port)
        pcap_out = PcapWriter(args.save_pcap, target) if args.save_pcap else None
        exporter = IpfixExporter(ExporterConfig(sampling_rate=args.rate))
        replay = RecordReplay(
            records,
            target,
            exporter,
            args.speedup,
            pcap=pcap_out,
            source_address=CTU_EXPORTER,
        )
        pcaps = []
        for path in args.pcap:
            try:
                pcaps.append(PcapReplay(path, target, args.speedup, pcap=pcap_out))
            except CaptureError as exc:
                raise DemoError(str(exc)) from exc
        self.reader = StreamReader(
            self.stack.aws_client("kinesis"), s.stream_name, address_bytes(CTU_EXPORTER)
        )
        self.reader.open("LATEST")
        self._open_store()
        lo = int(records["time_end"][0]) if records.size else 0
        hi = int(records["time_end"][-1]) if records.size else 0
        self.time_range = (lo, hi)
        base_metrics = self._metrics()
        self.base_batches = self._micro_batches()[0]
        progress = _Progress()
        self.replay = replay

        print(
            f"replaying at {args.speedup:g}x to the relay on udp {s.relay_port} "
            f"(about {replay.duration_s:.0f} s)"
        )
        t_replay = time.monotonic()
        threads = [threading.Thread(target=replay.run, args=(self.stop,), daemon=True)]
        threads += [
            threading.Thread(target=p.run, args=(self.stop,), daemon=True)
            for p in pcaps
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and not self.stop.is_set():
            self._pump()
            progress.show(self._line(records.size))
            self.stop.wait(POLL_S)
        for t in threads:
            t.join(timeout=5.0)
        if pcap_out is not None:
            pcap_out.close()
        t_sent = time.monotonic()
        if self.stop.is_set():
            progress.end()
            return None
        drained, dead = self._drain(progress, records.size)
        progress.show(self._line(records.size), force=True)
        progress.end()
        if self.stop.is_set():
            return None
        for name in dead:
            print(
                f"sampleflow demo: the {name} exited during the demo; see "
                f"{self.stack.logs_dir / (name + '.log')}",
                file=sys.stderr,
            )
        t_drained = time.monotonic()
        from cloud.local.report import build_report  # noqa: PLC0415

        report = build_report(
            args=args,
            settings=s,
            stack=self.stack,
            piece=piece,
            shift=shift,
            records=records,
            exporter=exporter,
            replay=replay,
            pcaps=pcaps,
            reader=self.reader,
            engine=self._engine_results(drained),
            base=base_metrics,
            end=self._metrics(),
            micro_batches=self._micro_batches()[0] - self.base_batches,
        )
        if self._store_client is not None:
            self._store_client.close()
        report["timings"] = {
            "stack_start_s": round(stack_start_s, 1),
            "load_s": round(t_replay - t0, 1),
            "replay_s": round(t_sent - t_replay, 1),
            "drain_s": round(t_drained - t_sent, 1),
        }
        return report

    def _load(self) -> tuple[Any, np.ndarray, int]:
        from cloud.local.capture import choose_shift_ms, load_slice  # noqa: PLC0415
        from cloud.training.thinning import sample_flows  # noqa: PLC0415

        args = self.args
        minutes = "all" if args.minutes is None else f"{args.minutes:g}"
        print(
            f"loading CTU-13 scenario 6 (start {args.start:g} min, minutes {minutes})"
        )
        try:
            piece = load_slice(args.start, args.minutes, args.data)
        except FileNotFoundError as exc:
            raise DemoError(str(exc)) from exc
        if len(piece) == 0:
            raise DemoError("no flow starts in that slice of the capture")
        records, _labels = sample_flows(piece.flows, args.rate, args.seed)
        if records.size == 0:
            raise DemoError("no packet of the slice was sampled: try a lower --rate")
        records = records[np.argsort(records["time_end"], kind="stable")]
        state_path = self.stack.state_dir / DEMO_STATE
        shift = choose_shift_ms(
            int(records["time_end"][0]),
            int(time.time() * 1000),
            _read_previous_end(state_path),
        )
        records["time_start"] += shift
        records["time_end"] += shift
        _write_previous_end(state_path, int(records["time_end"][-1]))
        print(
            f"  {len(piece):,} Argus flows ({piece.truth_packets:,} packets, "
            f"{piece.truth_bytes:,} bytes) -> {records.size:,} flow records "
            f"sampled 1:{args.rate}; times moved by {shift / 86_400_000:,.3f} "
            "days to now"
        )
        return piece, records, shift

    def _drain(self, progress: _Progress, total: int) -> tuple[bool, list[str]]:
        """Wait until the engine counted every flow sent and finished its
        micro-batch; returns (done, parts that died meanwhile)."""
        deadline = time.monotonic() + self.args.drain_timeout
        sent = self.replay.stats.records
        while time.monotonic() < deadline and not self.stop.is_set():
            self._pump()
            progress.show(self._line(total))
            alive = {r.name for r in self.stack.running_parts()}
            dead = [name for name in ("relay", "engine") if name not in alive]
            if dead:
                return False, dead  # nothing more will come
            if self.reader.stats.exporter.flows >= sent:
                estimate = self._engine_estimate()
                committed, started = self._micro_batches()
                if (
                    estimate is not None
                    and estimate["flows"] >= sent
                    and committed == started
                ):
                    return True, []
            self.stop.wait(POLL_S)
        return False, []

    # -- helpers --------------------------------------------------------------

    def _pump(self) -> None:
        self.reader.poll()
        now = time.monotonic()
        if self.store is not None and now - self._last_store_poll >= STORE_POLL_S:
            self._last_store_poll = now
            self._detections_seen = len(self._detections())

    def _line(self, total: int) -> str:
        stats = self.reader.stats.exporter
        committed = self._micro_batches()[0] - self.base_batches
        detections = f"{self._detections_seen} detections" if self.store else "no store"
        return (
            f"flows sent {self.replay.stats.records:,}/{total:,} | batches on "
            f"Kinesis {stats.batches:,} | micro-batches {committed:,} | {detections}"
        )

    def _micro_batches(self) -> tuple[int, int]:
        from cloud.local.results import micro_batches  # noqa: PLC0415

        result: tuple[int, int] = micro_batches(self.stack.checkpoint_dir)
        return result

    def _metrics(self) -> Metrics:
        from edge_agent.relay.commands import read_metrics  # noqa: PLC0415

        try:
            with urllib.request.urlopen(
                self.settings.relay_metrics_url, timeout=5.0
            ) as resp:
                metrics: Metrics = read_metrics(resp.read().decode())
                return metrics
        except OSError:
            return {}

    def _open_store(self) -> None:
        """The detection store, when the engine writes to it."""
        if not self.stack.engine_scores:
            return
        if "store" not in {r.name for r in self.stack.running_parts()}:
            return
        from cloud.store.detections import DetectionStore, open_client  # noqa: PLC0415

        self._store_client = open_client(self.settings.store_uri, timeout_s=5.0)
        self.store = DetectionStore(self._store_client)

    def _detections(self) -> list[dict[str, Any]]:
        from cloud.local.results import read_detections  # noqa: PLC0415
        from cloud.store.detections import StoreUnavailableError  # noqa: PLC0415

        try:
            return read_detections(
                self.store, self.settings.tenant_id, *self.time_range
            )
        except StoreUnavailableError:
            return []

    def _engine_estimate(self) -> dict[str, Any] | None:
        """Totals of the engine's estimates over the replay's time range:
        from the store if the engine writes there, else its file."""
        from cloud.local import results  # noqa: PLC0415

        lo, hi = self.time_range
        tenant = self.settings.tenant_id
        if self.store is not None:
            from cloud.store.detections import StoreUnavailableError  # noqa: PLC0415

            try:
                docs = results.read_store_estimates(self.store, tenant, lo, hi)
            except StoreUnavailableError:
                docs = []
            source = (
                f"the engine's network estimates in the store "
                f"({self.settings.store_uri}, sampleflow.network_estimates)"
            )
        else:
            docs = results.read_estimates_file(self.stack.estimates_path, tenant)
            source = f"the engine's network estimates ({self.stack.estimates_path})"
        totals: dict[str, Any] | None = results.totals_from_windows(
            results.tumbling(docs, lo, hi), source
        )
        return totals

    def _engine_results(self, drained: bool) -> dict[str, Any]:
        """What the report takes from the engine's outputs."""
        return {
            "drained": drained,
            "estimate": self._engine_estimate() if drained else None,
            "scores": self.store is not None,
            "detections": self._detections() if self.store is not None else [],
        }


def _read_previous_end(path: Path) -> int | None:
    try:
        value = json.loads(path.read_text()).get("last_flow_end_ms")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def _write_previous_end(path: Path, end_ms: int) -> None:
    previous = _read_previous_end(path)
    value = end_ms if previous is None else max(previous, end_ms)
    path.write_text(json.dumps({"last_flow_end_ms": value}) + "\n")
