"""The demo's report: figures of every stage, as JSON and for a person.

:func:`build_report` gathers the figures (all counts are of this replay:
relay counters are differences over the run, stream and store figures are
filtered to the replay's exporter, tenant and time range);
:func:`print_report` prints them.  Times of detections are given in
capture time (CEST, the capture's local time), the replay's time shift
taken back.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any, TextIO

import numpy as np

from cloud.local.capture import Slice
from cloud.local.results import detections_by_host, estimates_from_rows

CAPTURE_TZ = dt.timezone(dt.timedelta(hours=2), "CEST")
INFECTED_HOST = "147.32.84.165"  # cloud.training.ctu13.INFECTED_HOST

Metrics = dict[str, list[tuple[dict[str, str], float]]]


def capture_time(ms: int) -> str:
    """A capture-time instant (UTC ms) as the capture's local time."""
    when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).astimezone(CAPTURE_TZ)
    return when.strftime("%Y-%m-%d %H:%M:%S CEST")


def _metric(metrics: Metrics, name: str, **labels: str) -> float:
    total = 0.0
    for have, value in metrics.get("sampleflow_relay_" + name, []):
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def build_report(
    *,
    args: argparse.Namespace,
    settings: Any,
    stack: Any,
    piece: Slice,
    shift: int,
    records: np.ndarray,
    exporter: Any,
    replay: Any,
    pcaps: list[Any],
    reader: Any,
    engine: dict[str, Any],
    base: Metrics,
    end: Metrics,
    micro_batches: int,
) -> dict[str, Any]:
    """Every figure of one replay (see the module docstring)."""
    s = settings
    label = f"{replay.source_address}:{replay.source_port}"

    def delta(name: str, **labels: str) -> float:
        return _metric(end, name, **labels) - _metric(base, name, **labels)

    estimate = engine["estimate"]
    if estimate is None:
        estimate = estimates_from_rows(*reader.exporter_rows())
        estimate["note"] = (
            "the engine did not count every flow (it stopped, or "
            "--drain-timeout passed): see its log"
        )
    truth = {"packets": piece.truth_packets, "bytes": piece.truth_bytes}
    for what in ("packets", "bytes"):
        e = estimate[what]
        e["truth"] = truth[what]
        e["within_interval"] = bool(e["low"] <= truth[what] <= e["high"])
        e["error_percent"] = 100.0 * (e["estimate"] - truth[what]) / truth[what]
    stream = reader.stats.exporter
    export_bytes = replay.stats.bytes
    detections = _detections(engine, shift)
    return {
        "slice": {
            "start_minute": args.start,
            "minutes": args.minutes,
            "first_flow_capture": capture_time(piece.start_ms),
            "sampling_rate": args.rate,
            "seed": args.seed,
            "speedup": args.speedup,
            "time_shift_ms": shift,
        },
        "truth": {
            "argus_flows": len(piece),
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
                "records_decoded": int(
                    sum(
                        delta("exporter_records_total", exporter=f"127.0.0.1:{port}")
                        for port in p.source_ports
                    )
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
            "batches": stream.batches,
            "bytes": stream.bytes,
            "rows": stream.rows,
            "flows": stream.flows,
            "all_batches": reader.stats.total.batches,
            "invalid": dict(reader.stats.invalid),
            "read_errors": dict(reader.stats.errors),
            "export_to_shipped_ratio": export_bytes / stream.bytes
            if stream.bytes
            else None,
            "bytes_per_flow": stream.bytes / stream.flows if stream.flows else None,
        },
        "engine": {
            "micro_batches": micro_batches,
            "counted_every_flow": engine["estimate"] is not None,
            "flows_counted": engine["estimate"]["flows"]
            if engine["estimate"] is not None
            else None,
        },
        "estimate": estimate,
        "detections": detections,
        "infected_host": _infected(detections, piece, shift),
        "where": {
            "store": f"{s.store_uri} database sampleflow, collections detections "
            f"and network_estimates (tenant_id {s.tenant_id!r})",
            "engine_estimates_file": str(stack.estimates_path),
            "relay_metrics": s.relay_metrics_url,
            "model_service_metrics": f"{s.model_service_url}/metrics",
            "cloudwatch": f"{s.ministack_url} namespace Sampleflow/Engine",
            "kinesis": f"{s.ministack_url} stream {s.stream_name}",
            "logs": str(stack.logs_dir),
        },
    }


def _detections(engine: dict[str, Any], shift: int) -> dict[str, Any]:
    docs = engine["detections"]
    if not engine["scores"]:
        return {
            "source": "none: the engine of this install does not score, or the "
            "store is not running",
            "alerting_windows": 0,
            "hosts": [],
        }
    hosts = detections_by_host(docs)
    for h in hosts:
        h["first_window_start_capture"] = capture_time(
            h["first_window_start_ms"] - shift
        )
        h["first_window_end_capture"] = capture_time(h["first_window_end_ms"] - shift)
        h["max_score"] = round(h["max_score"], 4)
    window_s = {(int(d["window_end_ms"]) - int(d["window_start_ms"])) for d in docs}
    return {
        "source": "the engine: host windows scored by the model service, "
        "alerting ones in sampleflow.detections",
        "models": sorted({str(d.get("model_version")) for d in docs}),
        "window_s": sorted(w // 1000 for w in window_s),
        "alerting_windows": sum(1 for d in docs if d.get("alert", True)),
        "hosts": hosts,
    }


def _infected(detections: dict[str, Any], piece: Slice, shift: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "host": INFECTED_HOST,
        "active": piece.bot_first_ms is not None,
    }
    if piece.bot_first_ms is not None:
        out["first_botnet_flow_capture"] = capture_time(piece.bot_first_ms)
    found = [h for h in detections["hosts"] if h["host"] == INFECTED_HOST]
    out["found"] = bool(found)
    if found:
        h = found[0]
        out["first_detection_window_end_capture"] = h["first_window_end_capture"]
        out["alerting_windows"] = h["windows"]
        out["max_score"] = h["max_score"]
        if piece.bot_first_ms is not None:
            detected = h["first_window_end_ms"] - shift
            out["minutes_after_first_botnet_flow"] = round(
                (detected - piece.bot_first_ms) / 60_000, 1
            )
    return out


def print_report(report: dict[str, Any], out: TextIO) -> None:
    """The report for a person."""

    def p(text: str = "") -> None:
        print(text, file=out)

    sl, truth, sent = report["slice"], report["truth"], report["sent"]
    relay, kin, eng = report["relay"], report["kinesis"], report["engine"]
    est, det, inf = report["estimate"], report["detections"], report["infected_host"]
    p()
    p("=" * 76)
    p("sampleflow demo: CTU-13 scenario 6 (botnet Menti), real traffic")
    p("=" * 76)
    minutes = "whole capture" if sl["minutes"] is None else f"{sl['minutes']:g} min"
    p(
        f"slice: {minutes} from minute {sl['start_minute']:g} "
        f"({sl['first_flow_capture']}), sampled 1:{sl['sampling_rate']}, "
        f"replayed at {sl['speedup']:g}x"
    )
    p(f"flows in:       {truth['argus_flows']:>11,} Argus flows (unsampled)")
    p(
        f"exported:       {sent['flow_records']:>11,} IPFIX flow records, "
        f"{sent['datagrams']:,} datagrams, {sent['export_bytes']:,} bytes"
    )
    p(
        f"relay decoded:  {relay['records_decoded']:>11,} records "
        f"({relay['decode_errors']} errors, {relay['sequence_gaps']} sequence "
        f"gaps), {relay['rows_out']:,} rows after pre-aggregation"
    )
    ratio = kin["export_to_shipped_ratio"]
    shipped = (
        f"shipped:        {kin['batches']:>11,} batches on Kinesis, "
        f"{kin['bytes']:,} bytes"
    )
    if ratio:
        shipped += (
            f" ({ratio:.1f}x less than exported, {kin['bytes_per_flow']:.1f} "
            "bytes/flow)"
        )
    p(shipped)
    counted = (
        f", {eng['flows_counted']:,} flows counted"
        if eng["flows_counted"] is not None
        else ", did not count every flow"
    )
    p(f"engine:         {eng['micro_batches']:>11,} micro-batches" + counted)
    p()
    p(f"estimated vs true totals ({100 * est['confidence']:g}% interval):")
    p(f"  from {est['source']}")
    for what in ("packets", "bytes"):
        e = est[what]
        inside = "inside" if e["within_interval"] else "OUTSIDE"
        p(
            f"  {what:<7} true {e['truth']:>15,}   estimate {e['estimate']:>17,.0f} "
            f"({e['error_percent']:+.2f}%)"
        )
        p(f"  {'':<7} interval [{e['low']:,.0f}, {e['high']:,.0f}]: truth {inside}")
    if "note" in est:
        p(f"  note: {est['note']}")
    p()
    p(f"detections: {det['source']}")
    if det.get("models"):
        p(f"  model {', '.join(det['models'])}, windows of {det['window_s']} s")
    p(
        f"  {det['alerting_windows']} alerting host windows, "
        f"{len(det['hosts'])} host(s):"
    )
    for h in det["hosts"][:10]:
        p(
            f"  DETECTED {h['host']:<16} first window ending "
            f"{h['first_window_end_capture']}, {h['windows']} window(s), "
            f"score up to {h['max_score']:.3f}, {h['threat_class']}"
        )
    if len(det["hosts"]) > 10:
        p(f"  ... {len(det['hosts']) - 10} more in the JSON report")
    if not inf["active"]:
        p(f"infected host {inf['host']}: no botnet flow in this slice")
    elif inf["found"] and "minutes_after_first_botnet_flow" in inf:
        p(
            f"infected host {inf['host']}: FOUND in the window ending "
            f"{inf['first_detection_window_end_capture']}, "
            f"{inf['minutes_after_first_botnet_flow']:g} min after its first "
            f"botnet flow ({inf['first_botnet_flow_capture']})"
        )
    else:
        p(f"infected host {inf['host']}: not detected in this slice")
    for pc in report["pcaps"]:
        p(
            f"pcap {pc['file']}: {pc['datagrams']:,} datagrams sent, "
            f"{pc['records_decoded']:,} records decoded by the relay"
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
