"""``sampleflow demo``: real botnet traffic through the whole pipeline.

What it does, in order:

1. Uses the running local stack (``sampleflow local up``) or starts one in
   ``--state-dir`` and stops it at the end (unless ``--keep``).
2. Loads CTU-13 scenario 6 (the project's copy in ``data/``, through
   :mod:`cloud.training.ctu13`): the Argus flows that *start* within the
   slice (``--start``, ``--minutes``; default the whole 129-minute
   capture), each in full, and their true unsampled packet and byte totals.
3. Replays them as a router sampling 1 packet in ``--rate`` would
   (:func:`cloud.training.thinning.sample_flows`: binomial thinning, 60 s
   active timeout), shifted in time to now (by a multiple of 300 s, so the
   feature windows hold what they held in the capture; see
   :func:`choose_shift_ms`), exported as IPFIX by
   :class:`cloud.local.exporter.IpfixExporter` (the sampling rate
   announced in an options record, so the relay learns it from the wire)
   from 127.0.0.6, and sent over UDP to the relay at ``--speedup`` times
   real time.  ``--pcap FILE`` replays captures of flow exports alongside,
   from 127.0.0.1.
4. Meanwhile reads the stream as a second consumer: counts batches and
   bytes, scores 300 s host windows through the model service and writes
   the alerting ones to the store (:mod:`cloud.local.scorer`), and shows
   progress: flows sent, batches on Kinesis, engine micro-batches,
   detections.
5. Waits until the relay has shipped, and the engine has counted, every
   flow sent, then prints a report: flows in, bytes exported and shipped,
   estimated vs true totals with the estimate's confidence interval,
   detections, whether the infected host 147.32.84.165 raised an alert
   and how long after its first botnet flow, and where the results are.

``--json FILE`` writes the report's figures; ``--save-pcap FILE`` every
datagram sent, for Wireshark or an independent decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

DESCRIPTION = __doc__ or ""

DEFAULT_SPEEDUP = 60.0
DEFAULT_RATE = 100
DEFAULT_SEED = 6
#: The CTU exporter's address (loopback; "scenario 6").
CTU_EXPORTER = "127.0.0.6"
#: Feature windows of the shipped models are 300 s; the time shift keeps
#: their boundaries where they were in the capture.
SHIFT_UNIT_MS = 300_000
#: Gap left after the previous demo's last flow, so no window is shared.
SHIFT_GAP_MS = 600_000
DEMO_STATE = "demo.json"
CAPTURE_TZ = dt.timezone(dt.timedelta(hours=2), "CEST")
POLL_S = 0.5


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


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""


# -- the slice ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slice:
    """The replayed part of the capture (capture times, UTC ms)."""

    start_ms: int  # first flow start of the slice
    end_ms: int  # exclusive bound on flow start
    flows: Any  # ArgusFlows of the flows starting in [start_ms, end_ms)
    capture_start_ms: int  # first flow start of the whole capture
    truth_packets: int
    truth_bytes: int
    bot_first_ms: int | None  # first botnet-labelled flow start in the slice


def load_slice(
    start_min: float, minutes: float | None, directory: Path | None
) -> Slice:
    """Load the flows starting in ``[start, start + minutes)`` minutes of the
    capture (all slice files that can hold one) and their true totals."""
    from cloud.training import ctu13  # noqa: PLC0415 - loads the data

    count = len(ctu13.slice_files(ctu13.dataset_dir(directory)))
    loaded = [ctu13.load_flows(directory, [0])]
    capture_start = int(loaded[0].start_ms.min())
    lo = capture_start + round(start_min * 60_000)
    hi = None if minutes is None else lo + round(minutes * 60_000)
    # A slice file holds about five minutes of flow starts, in time order:
    # read files until one starts at or after the end of the slice.
    for index in range(1, count):
        part = ctu13.load_flows(directory, [index])
        if hi is not None and int(part.start_ms.min()) >= hi:
            break
        loaded.append(part)
    flows = _concat(loaded)
    keep = flows.start_ms >= lo
    if hi is not None:
        keep &= flows.start_ms < hi
    picked = _subset(flows, keep)
    bot = picked.label == ctu13.LABEL_BOTNET
    return Slice(
        start_ms=lo,
        end_ms=hi if hi is not None else int(flows.start_ms.max()) + 1,
        flows=picked,
        capture_start_ms=capture_start,
        truth_packets=int(picked.tot_pkts.sum(dtype=np.uint64)),
        truth_bytes=int(picked.tot_bytes.sum(dtype=np.uint64)),
        bot_first_ms=int(picked.start_ms[bot].min()) if bot.any() else None,
    )


def _concat(parts: list[Any]) -> Any:
    """One ArgusFlows from several (skip counters added up)."""
    if len(parts) == 1:
        return parts[0]
    arrays = {
        f.name: np.concatenate([getattr(p, f.name) for p in parts])
        for f in dataclasses.fields(parts[0])
        if isinstance(getattr(parts[0], f.name), np.ndarray)
    }
    skipped = parts[0].skipped.copy()
    for p in parts[1:]:
        skipped.update(p.skipped)
    return dataclasses.replace(parts[0], skipped=skipped, **arrays)


def _subset(flows: Any, keep: np.ndarray) -> Any:
    """The ArgusFlows rows where ``keep`` is true."""
    arrays = {
        f.name: getattr(flows, f.name)[keep]
        for f in dataclasses.fields(flows)
        if isinstance(getattr(flows, f.name), np.ndarray)
    }
    return dataclasses.replace(flows, **arrays)


def choose_shift_ms(first_ms: int, now_ms: int, previous_end_ms: int | None) -> int:
    """How far to move capture times so the replay happens "now".

    A multiple of :data:`SHIFT_UNIT_MS` that puts ``first_ms`` at most one
    unit before ``now_ms``, or, if an earlier demo's flows (ending at
    ``previous_end_ms``, shifted) would be closer than
    :data:`SHIFT_GAP_MS`, just after them: the engine's windows close by
    event time per tenant, so a replay must never go back in time.
    """
    shift = (now_ms - first_ms) // SHIFT_UNIT_MS * SHIFT_UNIT_MS
    if previous_end_ms is not None:
        floor = previous_end_ms + SHIFT_GAP_MS - first_ms
        if shift < floor:
            shift = -(-floor // SHIFT_UNIT_MS) * SHIFT_UNIT_MS
    return int(shift)


# -- helpers ------------------------------------------------------------------


def _fetch_metrics(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from edge_agent.relay.commands import read_metrics  # noqa: PLC0415

    with urllib.request.urlopen(url, timeout=5.0) as resp:
        return read_metrics(resp.read().decode())


def _metric(
    metrics: dict[str, list[tuple[dict[str, str], float]]],
    name: str,
    **labels: str,
) -> float:
    total = 0.0
    for have, value in metrics.get("sampleflow_relay_" + name, []):
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def _micro_batches(checkpoint: Path) -> int:
    """Micro-batches the engine has committed (Spark's commit log)."""
    commits = checkpoint / "commits"
    try:
        names = [p.name for p in commits.iterdir() if p.name.isdigit()]
    except OSError:
        return 0
    return len(names)


def _capture_text(ms: int) -> str:
    when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).astimezone(CAPTURE_TZ)
    return when.strftime("%Y-%m-%d %H:%M:%S CEST")


def _utc_text(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%H:%M:%S UTC")


def _interval(
    estimate: float, variance: float, floor: float, z: float
) -> dict[str, float]:
    half = z * math.sqrt(max(variance, 0.0))
    return {
        "estimate": estimate,
        "low": max(estimate - half, floor),
        "high": estimate + half,
    }


def estimates_from_engine(
    path: Path, tenant: str, lo_ms: int, hi_ms: int
) -> dict[str, Any] | None:
    """Totals over the engine's tumbling windows in ``[lo, hi]`` from its
    estimates file (the last line per window is its value), or None.

    The engine's windows slide; those starting at a multiple of their own
    length tile time, so summing them counts every flow once.  Variances
    are recovered from each interval's upper end (``high = est + z·sd``).
    """
    latest: dict[int, dict[str, Any]] = {}
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e.get("tenant_id") != tenant:
                    continue
                latest[int(e["window_start_ms"])] = e
    except OSError:
        return None
    chosen = [
        e
        for start, e in latest.items()
        if (start % (e["window_end_ms"] - start) == 0)
        and lo_ms <= e["window_end_ms"]
        and start <= hi_ms
    ]
    if not chosen:
        return None
    z = statistics.NormalDist().inv_cdf(0.5 + chosen[0]["confidence"] / 2.0)
    out: dict[str, Any] = {
        "source": f"engine network estimates ({path})",
        "windows": len(chosen),
        "flows": int(sum(e["flows"] for e in chosen)),
        "confidence": chosen[0]["confidence"],
        "unknown_rate_rows": int(sum(e["unknown_rate_rows"] for e in chosen)),
        "final_windows": sum(1 for e in chosen if e["final"]),
    }
    for what in ("packets", "bytes"):
        est = sum(e[what] for e in chosen)
        var = sum(((e[f"{what}_high"] - e[what]) / z) ** 2 for e in chosen)
        floor = sum(e[f"sampled_{what}"] for e in chosen)
        out[what] = _interval(est, var, floor, z)
    return out


def estimates_from_rows(
    packets: np.ndarray, bytes_: np.ndarray, rate: np.ndarray, confidence: float = 0.95
) -> dict[str, Any]:
    """The engine's estimator applied to rows read off the stream."""
    from cloud.engine.estimates import row_statistics  # noqa: PLC0415

    stats = row_statistics(packets, bytes_, rate)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
    total = {k: float(v.sum()) for k, v in stats.items()}
    return {
        "source": "relay batches read from the stream, scaled by their rate",
        "confidence": confidence,
        "unknown_rate_rows": int(total["unknown_rate_rows"]),
        "packets": _interval(
            total["est_packets"], total["var_packets"], total["sampled_packets"], z
        ),
        "bytes": _interval(
            total["est_bytes"], total["var_bytes"], total["sampled_bytes"], z
        ),
    }


# -- the run ------------------------------------------------------------------


class _Progress:
    """One progress line: rewritten in place on a terminal, else every 5 s."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._last = 0.0
        self._started = time.monotonic()

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._started
        line = f"[{elapsed:5.0f} s] {text}"
        if self.tty:
            sys.stdout.write("\r" + line.ljust(110)[:110])
            sys.stdout.flush()
            self._last = now
        elif force or now - self._last >= 5.0:
            print(line, flush=True)
            self._last = now

    def end(self) -> None:
        if self.tty:
            sys.stdout.write("\n")
            sys.stdout.flush()


def main(args: argparse.Namespace, settings: Any, stop: threading.Event) -> int:
    """Run the demo (see the module docstring); returns the exit code."""
    from cloud.local.stack import LocalStack, StackError  # noqa: PLC0415

    if args.speedup <= 0:
        print("sampleflow demo: --speedup must be > 0", file=sys.stderr)
        return 2
    if args.minutes is not None and args.minutes <= 0:
        print("sampleflow demo: --minutes must be > 0", file=sys.stderr)
        return 2
    if args.rate < 1:
        print("sampleflow demo: --rate must be >= 1", file=sys.stderr)
        return 2
    t_begin = time.monotonic()
    stack = LocalStack.attach(settings)
    started_here = False
    try:
        running = stack.running_parts()
        if running:
            unhealthy = [s for s in stack.status() if s.running and not s.healthy]
            if unhealthy:
                raise DemoError(
                    "the local stack is running but not healthy ("
                    + ", ".join(f"{s.name}: {s.detail}" for s in unhealthy)
                    + "); see `sampleflow local status`"
                )
            print(f"using the running local stack in {stack.state_dir}")
        else:
            print(f"starting the local stack in {stack.state_dir}")
            started_here = True
            stack.up(lambda text: print("  " + text, flush=True), stop)
        t_stack = time.monotonic()
        pids = {r.name: r.pid for r in stack.running_parts()}
        report = _run(args, stack, stop, t_begin, t_stack)
        if report is None:
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
        print(f"sampleflow demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if started_here and not args.keep:
            print("stopping the local stack")
            try:
                stack.down()
            except StackError as exc:
                print(f"sampleflow demo: {exc}", file=sys.stderr)
    return 0


def _run(
    args: argparse.Namespace,
    stack: Any,
    stop: threading.Event,
    t_begin: float,
    t_stack: float,
) -> dict[str, Any] | None:
    from cloud.local.exporter import ExporterConfig, IpfixExporter  # noqa: PLC0415
    from cloud.local.replay import (  # noqa: PLC0415
        PcapReplay,
        PcapWriter,
        RecordReplay,
    )
    from cloud.local.scorer import (  # noqa: PLC0415
        ModelServiceClient,
        StreamReader,
        WindowScorer,
    )
    from cloud.training import ctu13  # noqa: PLC0415
    from cloud.training.thinning import sample_flows  # noqa: PLC0415
    from edge_agent.collect.pcap import CaptureError  # noqa: PLC0415
    from edge_agent.flows.schema import address_bytes  # noqa: PLC0415

    s = stack.settings
    minutes = "all" if args.minutes is None else f"{args.minutes:g}"
    print(f"loading CTU-13 scenario 6 (start {args.start:g} min, minutes {minutes})")
    try:
        piece = load_slice(args.start, args.minutes, args.data)
    except FileNotFoundError as exc:
        raise DemoError(str(exc)) from exc
    if len(piece.flows) == 0:
        raise DemoError("no flow starts in that slice of the capture")
    records, _labels = sample_flows(piece.flows, args.rate, args.seed)
    records = records[np.argsort(records["time_end"], kind="stable")]
    state_path = stack.state_dir / DEMO_STATE
    previous_end = _read_previous_end(state_path)
    shift = choose_shift_ms(
        int(records["time_end"][0]) if records.size else piece.start_ms,
        int(time.time() * 1000),
        previous_end,
    )
    records["time_start"] += shift
    records["time_end"] += shift
    if records.size:
        _write_previous_end(state_path, int(records["time_end"][-1]))
    print(
        f"  {len(piece.flows):,} Argus flows ({piece.truth_packets:,} packets, "
        f"{piece.truth_bytes:,} bytes) -> {records.size:,} flow records sampled "
        f"1:{args.rate}; times moved by {shift / 86_400_000:,.3f} days to now"
    )

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

    kinesis = stack.aws_client("kinesis")
    reader = StreamReader(kinesis, s.stream_name)
    reader.open("LATEST")
    model = _model_manifest()
    store, store_client = _open_store(s.store_uri)
    scorer = WindowScorer(
        ModelServiceClient(s.model_service_url, s.tenant_id),
        ctu13.INTERNAL_NETWORKS,
        int(model["window_s"]),
        exporter=address_bytes(CTU_EXPORTER),
        store=store,
    )
    ctu_exporter = address_bytes(CTU_EXPORTER)
    ctu = _CtuCounter(ctu_exporter)
    base_metrics = _safe_metrics(s.relay_metrics_url)
    checkpoint = stack.checkpoint_dir
    base_batches = _micro_batches(checkpoint)
    progress = _Progress()

    def line() -> str:
        return (
            f"flows sent {replay.stats.records:,}/{records.size:,} | batches on "
            f"Kinesis {reader.stats.records:,} | micro-batches "
            f"{_micro_batches(checkpoint) - base_batches:,} | detections "
            f"{scorer.alerting_windows} windows, {len(scorer.alerts)} alerts"
        )

    def pump() -> None:
        batches = reader.poll()
        ctu.add(batches)
        scorer.add([b for b, _ in batches])

    threads = [threading.Thread(target=replay.run, args=(stop,), daemon=True)]
    threads += [
        threading.Thread(target=p.run, args=(stop,), daemon=True) for p in pcaps
    ]
    print(
        f"replaying at {args.speedup:g}x to the relay on udp {s.relay_port} "
        f"(about {replay.duration_s:.0f} s)"
    )
    t_replay = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and not stop.is_set():
        pump()
        progress.show(line())
        stop.wait(POLL_S)
    for t in threads:
        t.join(timeout=5.0)
    if pcap_out is not None:
        pcap_out.close()
    t_sent = time.monotonic()
    if stop.is_set():
        progress.end()
        print("interrupted")
        return None

    # Drain: the relay ships the last windows, the engine counts them.
    deadline = time.monotonic() + args.drain_timeout
    sent = replay.stats.records
    waits = {"relay": False, "engine": False}
    engine_estimate = None
    dead: list[str] = []
    while time.monotonic() < deadline and not stop.is_set():
        pump()
        progress.show(line())
        alive = {r.name for r in stack.running_parts()}
        dead = [name for name in ("relay", "engine") if name not in alive]
        if dead:
            # Nothing more will come: report what arrived.
            break
        if not waits["relay"] and ctu.flows >= sent:
            waits["relay"] = True
        if waits["relay"]:
            lo = int(records["time_end"][0]) if records.size else 0
            hi = int(records["time_end"][-1]) if records.size else 0
            engine_estimate = estimates_from_engine(
                stack.estimates_path, s.tenant_id, lo, hi
            )
            if engine_estimate is not None and engine_estimate["flows"] >= ctu.flows:
                waits["engine"] = True
                break
        stop.wait(POLL_S)
    progress.show(line(), force=True)
    progress.end()
    if stop.is_set():
        print("interrupted")
        return None
    for name in dead:
        print(
            f"sampleflow demo: the {name} exited during the demo; see "
            f"{stack.logs_dir / (name + '.log')}",
            file=sys.stderr,
        )
    t_drained = time.monotonic()
    scorer.finish()
    end_metrics = _safe_metrics(s.relay_metrics_url)
    if store_client is not None:
        store_client.close()

    report = _report(
        args=args,
        stack=stack,
        piece=piece,
        shift=shift,
        records=records,
        exporter=exporter,
        replay=replay,
        pcaps=pcaps,
        reader=reader,
        ctu=ctu,
        scorer=scorer,
        engine_estimate=engine_estimate if waits["engine"] else None,
        base=base_metrics,
        end=end_metrics,
        micro_batches=_micro_batches(checkpoint) - base_batches,
        waits=waits,
        model=model,
    )
    report["timings"] = {
        "stack_start_s": round(t_stack - t_begin, 1),
        "load_s": round(t_replay - t_stack, 1),
        "replay_s": round(t_sent - t_replay, 1),
        "drain_s": round(t_drained - t_sent, 1),
    }
    return report


class _CtuCounter:
    """Rows, flows and bytes of the CTU exporter's batches on the stream."""

    def __init__(self, exporter: bytes) -> None:
        self.exporter = np.frombuffer(exporter, np.uint8)
        self.batches = 0
        self.bytes = 0
        self.rows = 0
        self.flows = 0
        self.packets: list[np.ndarray] = []
        self.octets: list[np.ndarray] = []
        self.rates: list[np.ndarray] = []

    def add(self, batches: list[tuple[Any, int]]) -> None:
        for batch, size in batches:
            cols = batch.columns
            if not cols["exporter"].size:
                continue
            first = np.frombuffer(bytes(cols["exporter"][0]), np.uint8)
            # The relay ships one exporter per batch (split_by_exporter).
            if not np.array_equal(first, self.exporter):
                continue
            self.batches += 1
            self.bytes += size
            self.rows += batch.header.record_count
            self.flows += int(cols["flow_count"].sum(dtype=np.uint64))
            self.packets.append(cols["packets"])
            self.octets.append(cols["bytes"])
            self.rates.append(cols["sampling_rate"])


def _safe_metrics(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    try:
        return _fetch_metrics(url)
    except OSError:
        return {}


def _model_manifest() -> dict[str, Any]:
    from cloud.model_service.config import (  # noqa: PLC0415
        DEFAULT_MODEL,
        PROJECT_MODELS_DIR,
    )

    path = PROJECT_MODELS_DIR / f"{DEFAULT_MODEL}.manifest.json"
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DemoError(f"cannot read the model manifest {path}: {exc}") from exc
    return manifest


def _open_store(uri: str) -> tuple[Any, Any]:
    try:
        from cloud.store.detections import (  # noqa: PLC0415
            DetectionStore,
            open_client,
        )
    except ImportError:
        return None, None
    client = open_client(uri, timeout_s=5.0)
    return DetectionStore(client), client


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


def _report(
    *,
    args: argparse.Namespace,
    stack: Any,
    piece: Slice,
    shift: int,
    records: np.ndarray,
    exporter: Any,
    replay: Any,
    pcaps: list[Any],
    reader: Any,
    ctu: _CtuCounter,
    scorer: Any,
    engine_estimate: dict[str, Any] | None,
    base: dict[str, list[tuple[dict[str, str], float]]],
    end: dict[str, list[tuple[dict[str, str], float]]],
    micro_batches: int,
    waits: dict[str, bool],
    model: dict[str, Any],
) -> dict[str, Any]:
    from cloud.training import ctu13  # noqa: PLC0415

    s = stack.settings
    label = f"{CTU_EXPORTER}:{replay.source_port}"

    def delta(name: str, **labels: str) -> float:
        return _metric(end, name, **labels) - _metric(base, name, **labels)

    if engine_estimate is not None:
        estimate = engine_estimate
    else:
        cat = np.concatenate
        estimate = estimates_from_rows(
            cat(ctu.packets) if ctu.packets else np.zeros(0),
            cat(ctu.octets) if ctu.octets else np.zeros(0),
            cat(ctu.rates) if ctu.rates else np.zeros(0),
        )
        estimate["note"] = (
            "the engine did not count every flow (it stopped, or "
            "--drain-timeout passed): see the engine's log"
        )
    truth = {"packets": piece.truth_packets, "bytes": piece.truth_bytes}
    for what in ("packets", "bytes"):
        e = estimate[what]
        e["truth"] = truth[what]
        e["within_interval"] = bool(e["low"] <= truth[what] <= e["high"])
        e["error_percent"] = (
            100.0 * (e["estimate"] - truth[what]) / truth[what] if truth[what] else 0.0
        )
    infected = _infected(scorer, piece, shift, ctu13.INFECTED_HOST)
    export_bytes = replay.stats.bytes
    return {
        "slice": {
            "start_minute": args.start,
            "minutes": args.minutes,
            "first_flow_capture": _capture_text(piece.start_ms),
            "end_capture": _capture_text(piece.end_ms),
            "argus_flows": len(piece.flows),
            "sampling_rate": args.rate,
            "seed": args.seed,
            "speedup": args.speedup,
            "time_shift_ms": shift,
        },
        "truth": {
            "argus_flows": len(piece.flows),
            "packets": piece.truth_packets,
            "bytes": piece.truth_bytes,
        },
        "sent": {
            "flow_records": replay.stats.records,
            "sampled_packets": int(records["packets"].sum(dtype=np.uint64)),
            "sampled_bytes": int(records["bytes"].sum(dtype=np.uint64)),
            "datagrams": replay.stats.datagrams,
            "export_bytes": export_bytes,
            "template_messages": exporter.stats.template_messages,
            "send_errors": dict(replay.stats.send_errors),
            "exporter": label,
        },
        "pcaps": [
            {
                "file": str(p.path),
                "datagrams": p.stats.datagrams,
                "bytes": p.stats.bytes,
                "skipped_frames": dict(p.reader.stats.skipped),
                "records_decoded": sum(
                    delta("exporter_records_total", exporter=f"127.0.0.1:{port}")
                    for port in p.source_ports
                ),
            }
            for p in pcaps
        ],
        "relay": {
            "records_decoded": int(delta("exporter_records_total", exporter=label)),
            "decode_errors": int(delta("exporter_errors_total", exporter=label)),
            "sequence_gaps": int(delta("exporter_sequence_gaps_total", exporter=label)),
            "rows_out": int(delta("records_out_total")),
            "batches_shipped": int(delta("batches_shipped_total")),
            "bytes_shipped": int(delta("bytes_shipped_total")),
            "dropped": int(delta("dropped_total")),
        },
        "kinesis": {
            "batches": ctu.batches,
            "bytes": ctu.bytes,
            "rows": ctu.rows,
            "flows": ctu.flows,
            "all_batches": reader.stats.records,
            "invalid": dict(reader.stats.invalid),
            "export_to_shipped_ratio": export_bytes / ctu.bytes if ctu.bytes else None,
            "bytes_per_flow": ctu.bytes / ctu.flows if ctu.flows else None,
        },
        "engine": {
            "micro_batches": micro_batches,
            "counted_every_flow": waits["engine"],
            "flows_counted": engine_estimate["flows"] if engine_estimate else None,
        },
        "estimate": estimate,
        "detections": {
            "source": "demo scorer: stream -> host windows -> model service",
            "model": scorer.model_version or model.get("name"),
            "window_s": scorer.window_s,
            "thresholds": scorer.thresholds,
            "windows_scored": len(scorer.windows),
            "host_windows_scored": sum(len(w.hosts) for w in scorer.windows),
            "alerting_windows": scorer.alerting_windows,
            "alerts": [
                {
                    "host": a.host,
                    "window_start_capture": _capture_text(a.window_start_ms - shift),
                    "raised_capture": _capture_text(a.window_end_ms - shift),
                    "raised_stream_time": _utc_text(a.window_end_ms),
                    "score": round(a.score, 4),
                    "class": a.threat_class,
                }
                for a in scorer.alerts
            ],
            "store_errors": scorer.store_errors,
        },
        "infected_host": infected,
        "where": {
            "store": f"{s.store_uri} database sampleflow, collections detections "
            f"and network_estimates (tenant_id {s.tenant_id!r})",
            "engine_estimates": str(stack.estimates_path),
            "relay_metrics": s.relay_metrics_url,
            "model_service_metrics": f"{s.model_service_url}/metrics",
            "kinesis": f"{s.ministack_url} stream {s.stream_name}",
            "logs": str(stack.logs_dir),
        },
    }


def _infected(scorer: Any, piece: Slice, shift: int, host: str) -> dict[str, Any]:
    out: dict[str, Any] = {"host": host, "active": piece.bot_first_ms is not None}
    if piece.bot_first_ms is not None:
        out["first_botnet_flow_capture"] = _capture_text(piece.bot_first_ms)
    alerts = [a for a in scorer.alerts if a.host == host]
    above = [
        w.window_start_ms
        for w in scorer.windows
        for h, hit in zip(w.hosts, w.alert.tolist(), strict=True)
        if h == host and hit
    ]
    out["found"] = bool(alerts)
    out["windows_above_alert"] = len(above)
    if alerts and piece.bot_first_ms is not None:
        raised = alerts[0].window_end_ms - shift
        out["raised_capture"] = _capture_text(raised)
        out["minutes_after_first_botnet_flow"] = round(
            (raised - piece.bot_first_ms) / 60_000, 1
        )
        out["score"] = round(alerts[0].score, 4)
    return out


def print_report(report: dict[str, Any], out: Any) -> None:
    """The report for a person."""

    def p(text: str = "") -> None:
        print(text, file=out)

    sl, truth, sent = report["slice"], report["truth"], report["sent"]
    relay, kin, eng = report["relay"], report["kinesis"], report["engine"]
    est, det, inf = report["estimate"], report["detections"], report["infected_host"]
    p()
    p("=" * 72)
    p("sampleflow demo report: CTU-13 scenario 6 (botnet Menti), real traffic")
    p("=" * 72)
    minutes = "whole capture" if sl["minutes"] is None else f"{sl['minutes']:g} min"
    p(
        f"slice: {minutes} from minute {sl['start_minute']:g} "
        f"({sl['first_flow_capture']} on), sampled 1:{sl['sampling_rate']}, "
        f"replayed at {sl['speedup']:g}x"
    )
    p(f"flows in:        {truth['argus_flows']:>12,} Argus flows (unsampled)")
    p(
        f"exported:        {sent['flow_records']:>12,} IPFIX flow records in "
        f"{sent['datagrams']:,} datagrams, {sent['export_bytes']:,} bytes"
    )
    p(
        f"relay decoded:   {relay['records_decoded']:>12,} records "
        f"({relay['decode_errors']} errors, {relay['sequence_gaps']} sequence gaps), "
        f"{relay['rows_out']:,} rows after pre-aggregation"
    )
    ratio = kin["export_to_shipped_ratio"]
    p(
        f"shipped:         {kin['batches']:>12,} batches on Kinesis, "
        f"{kin['bytes']:,} bytes"
        + (
            f" ({ratio:.1f}x smaller than the exports, "
            f"{kin['bytes_per_flow']:.1f} bytes/flow)"
            if ratio
            else ""
        )
    )
    p(
        f"engine:          {eng['micro_batches']:>12,} micro-batches"
        + (
            f", {eng['flows_counted']:,} flows counted"
            if eng["flows_counted"] is not None
            else ", did not count every flow in time"
        )
    )
    p()
    conf = 100 * est["confidence"]
    p(f"estimated vs true totals ({conf:g}% interval; from {est['source']}):")
    for what in ("packets", "bytes"):
        e = est[what]
        inside = "inside" if e["within_interval"] else "OUTSIDE"
        p(
            f"  {what:<8} true {e['truth']:>16,}  estimate {e['estimate']:>18,.0f} "
            f"({e['error_percent']:+.2f}%)"
        )
        p(f"  {'':<8} interval [{e['low']:,.0f}, {e['high']:,.0f}]: truth {inside}")
    if "note" in est:
        p(f"  note: {est['note']}")
    p()
    p(
        f"detections ({det['source']}; model {det['model']}, "
        f"{det['window_s']} s windows):"
    )
    p(
        f"  {det['host_windows_scored']:,} host windows scored in "
        f"{det['windows_scored']} windows; {det['alerting_windows']} above the "
        f"alert threshold; {len(det['alerts'])} alerts raised (hysteresis)"
    )
    for a in det["alerts"][:10]:
        p(
            f"  ALERT {a['host']:<16} raised {a['raised_capture']} "
            f"score {a['score']:.3f} class {a['class']}"
        )
    if len(det["alerts"]) > 10:
        p(f"  ... {len(det['alerts']) - 10} more in the JSON report")
    if not inf["active"]:
        p(f"infected host {inf['host']}: no botnet flow in this slice")
    elif inf["found"]:
        p(
            f"infected host {inf['host']}: FOUND, alert raised "
            f"{inf['raised_capture']}, {inf['minutes_after_first_botnet_flow']:g} "
            f"min after its first botnet flow ({inf['first_botnet_flow_capture']})"
        )
    else:
        p(
            f"infected host {inf['host']}: not found in this slice "
            f"({inf['windows_above_alert']} window(s) above the threshold; an "
            "alert needs 2 of 3 windows)"
        )
    for pc in report["pcaps"]:
        p(
            f"pcap {pc['file']}: {pc['datagrams']:,} datagrams sent, "
            f"{pc['records_decoded']:,.0f} records decoded by the relay"
        )
    p()
    p("where to look:")
    for key, value in report["where"].items():
        p(f"  {key:<22} {value}")
    t = report["timings"]
    p(
        f"timings: stack {t['stack_start_s']:g} s, load {t['load_s']:g} s, "
        f"replay {t['replay_s']:g} s, drain {t['drain_s']:g} s, "
        f"total {t.get('total_s', 0):g} s"
    )
