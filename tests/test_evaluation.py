"""Evaluation: metric functions by hand, the CIC-IDS2017 loader against the
CSV read with the csv module, and evaluate smoke runs through LiteRT."""

from __future__ import annotations

import calendar
import csv
import datetime
import gzip
import importlib.util
import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from cloud.training import cicids, ctu13
from cloud.training.detector import average_precision, roc_auc
from cloud.training.evaluate import CicSource, Ctu13Source, evaluate_ctu13
from cloud.training.metrics import (
    AlertRule,
    RunRows,
    first_detection_ms,
    onset_ms,
    precision_recall_at,
    run_metrics,
    summarise,
)
from edge_agent.cli import build_parser
from edge_agent.features.spec import FEATURE_NAMES, LOG1P_FEATURES
from edge_agent.filter import load_model
from edge_agent.flows.schema import address_text
from tests.conftest import require_shared

ROOT = Path(__file__).resolve().parents[1]
RELAY = ROOT / "models" / "relay-ctu13s6-r100-w300.manifest.json"
SYN, ACK, PSH, FIN, RST = 0x02, 0x10, 0x08, 0x01, 0x04
WINDOW_MS = 300_000
T0 = 10_000 * WINDOW_MS  # a window boundary


# Metric functions ----------------------------------------------------------


def test_precision_recall_at_by_hand() -> None:
    """Scores .9 .8 .3 .1 for labels + - + -, threshold .5: two flagged, one
    of them positive -> precision 1/2; one of two positives -> recall 1/2.
    Nothing flagged: precision undefined (NaN)."""
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.3, 0.1])
    assert precision_recall_at(y, s, 0.5) == (0.5, 0.5)
    precision, recall = precision_recall_at(y, s, 0.95)
    assert math.isnan(precision) and recall == 0.0


def test_average_precision_and_roc_auc_with_ties_by_hand() -> None:
    """Positives .9 .5, negatives .5 .2 .5.

    ROC-AUC: of 6 (pos, neg) pairs .9 wins 3; .5 ties two (1/2 each) and
    wins one -> (3 + 2) / 6.  AP breaks ties pessimistically (negatives
    first): ranks .9+, .5-, .5-, .5+ -> precision 1/1 and 2/4 -> 3/4.
    """
    y = np.array([1, 1, 0, 0, 0])
    s = np.array([0.9, 0.5, 0.5, 0.2, 0.5])
    assert roc_auc(y, s) == pytest.approx(5 / 6)
    assert average_precision(y, s) == pytest.approx((1 + 2 / 4) / 2)


def hand_run() -> RunRows:
    """Host 0 (infected), hosts 1 and 2 normal, four 300 s slots from T0.

    host 0: left out .2, pos .9, pos .95, pos .3
    host 1: .1, .8, .85, .1 (all normal)
    host 2: .1 in slot 0, .6 in slot 2, nothing in slots 1 and 3
    """
    host = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    slot = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 2])
    label = np.array([-1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    score = np.array([0.2, 0.9, 0.95, 0.3, 0.1, 0.8, 0.85, 0.1, 0.1, 0.6])
    return RunRows(
        host=host,
        window_start_ms=T0 + slot * WINDOW_MS,
        label=label,
        score=score,
        target=host == 0,
        window_s=300,
        first_slot_ms=T0,
        last_slot_ms=T0 + 3 * WINDOW_MS,
    )


def test_run_metrics_by_hand() -> None:
    """Alert .7, clear .5, 2 of 3 (values worked out in the comments)."""
    rule = AlertRule(alert=0.7, clear=0.5, k=2, n=3)
    refs = {
        "start": T0 + 10_000,  # 10 s into slot 0
        "late": T0 + 650_000,  # in slot 2
        "after": T0 + 1_300_000,  # after the last slot
    }
    m = run_metrics(hand_run(), rule, refs)
    assert (m["positive_windows"], m["normal_windows"]) == (3, 6)
    # Flagged >= .7: host 0 slots 1, 2 (positive), host 1 slots 1, 2.
    assert m["precision_at_alert"] == pytest.approx(0.5)
    assert m["recall_at_alert"] == pytest.approx(2 / 3)
    assert m["false_alert_windows"] == 2
    assert m["false_alerts_per_1000_normal_windows"] == pytest.approx(2000 / 6)
    # Four 300 s slots = 1200 s monitored: 2 false windows -> 144 a day.
    assert m["monitored_days"] == pytest.approx(1200 / 86400)
    assert m["false_alerts_per_day"] == pytest.approx(144.0)
    # Positives .9 .95 .3 vs negatives .1 .8 .85 .1 .1 .6: 6 + 6 + 3 of 18.
    assert m["roc_auc"] == pytest.approx(15 / 18)
    # Ranking .95+ .9+ .85- .8- .6- .3+: precisions 1, 1, 3/6.
    assert m["pr_auc"] == pytest.approx(2.5 / 3)
    # Hysteresis: hosts 0 and 1 raise at slot 2 (second window above .7)
    # and stay up in slot 3 (one quiet window < 3); host 2 never.
    assert m["recall_hysteresis"] == pytest.approx(2 / 3)  # slots 2, 3
    assert m["precision_hysteresis"] == pytest.approx(0.5)  # + host 1 slots 2, 3
    assert m["false_alert_windows_per_1000_normal_hysteresis"] == pytest.approx(
        2000 / 6
    )
    # Host 1's raising came from normal windows only: one false event;
    # host 0's came from positives.
    assert m["false_alert_events_hysteresis"] == 1
    assert m["false_alert_events_per_day_hysteresis"] == pytest.approx(72.0)
    # First flagged infected window: slot 1, ends T0 + 600 s.
    assert m["ttd_start_min"] == pytest.approx((600_000 - 10_000) / 60_000)
    # In alert state from slot 2, which ends at T0 + 900 s.
    assert m["ttd_start_min_hysteresis"] == pytest.approx((900_000 - 10_000) / 60_000)
    # After T0 + 650 s the first flagged window to end is slot 2.
    assert m["ttd_late_min"] == pytest.approx(250_000 / 60_000)
    assert m["ttd_late_min_hysteresis"] == pytest.approx(250_000 / 60_000)
    assert math.isnan(m["ttd_after_min"])
    assert math.isnan(m["ttd_after_min_hysteresis"])


def test_first_detection_and_onset_by_hand() -> None:
    """A verdict counts at its window's end.  The onset skips stray flows:
    2 flows at 0 and 1 s, then 100 from 1,000 s, one every 0.1 s; with 10%
    (11 of 102) needed within 5 minutes the strays (2) do not open a busy
    span and the burst does; with the default 1% (2 of 102) they do."""
    starts = np.array([0, WINDOW_MS, 2 * WINDOW_MS])
    flagged = np.array([True, False, True])
    assert first_detection_ms(starts, flagged, 300, after_ms=-1) == WINDOW_MS
    assert first_detection_ms(starts, flagged, 300, after_ms=WINDOW_MS) == 900_000
    assert math.isnan(first_detection_ms(starts, flagged, 300, after_ms=900_000))
    flows = np.concatenate([[1000, 0], 1_000_000 + 100 * np.arange(100)])
    assert onset_ms(flows, share=0.1) == 1_000_000
    assert onset_ms(flows) == 0
    assert math.isnan(onset_ms(np.array([], dtype=np.int64)))


def test_summarise_by_hand() -> None:
    """1, 2, 3 and one undefined run: mean 2, sample std 1, 3 of 4 runs."""
    s = summarise([1.0, 2.0, 3.0, float("nan")])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3, "runs": 4}
    assert math.isnan(summarise([5.0])["std"])
    assert math.isnan(summarise([float("nan")])["mean"])


# CIC-IDS2017 loader --------------------------------------------------------


@pytest.fixture(scope="module")
def cic_dir() -> Path:
    """The shared CIC-IDS2017 sample (fails without ../shared)."""
    return require_shared("datasets", cicids.DATASET_NAME)


@pytest.fixture(scope="module")
def cic_flows(cic_dir: Path) -> cicids.CicFlows:
    """Every CIC-IDS2017 file, parsed."""
    return cicids.load_flows(cic_dir)


def csv_rows(path: Path, n: int | None = None) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows if n is None else rows[:n]


def utc_ms(text: str) -> int:
    t = datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f")
    return calendar.timegm(t.timetuple()) * 1000 + t.microsecond // 1000


def find(flows: cicids.CicFlows, label: str, row_id: int) -> int:
    hits = np.flatnonzero(
        (flows.label == flows.class_index(label)) & (flows.row_id == row_id)
    )
    assert hits.size == 1
    return int(hits[0])


def test_cic_loader_counts_every_row(cic_dir: Path, cic_flows: cicids.CicFlows) -> None:
    """Rows kept plus rows skipped equal the CSV rows (32,669 per the dataset
    README); the one row with negative header lengths is counted, not kept;
    classes are the Label values, BENIGN first."""
    total = 0
    negative = []
    labels = set()
    for path in sorted(cic_dir.glob("*.csv.gz")):
        for row in csv_rows(path):
            total += 1
            labels.add(row["Label"])
            if int(row["Fwd Header Length"]) < 0 or int(row["Bwd Header Length"]) < 0:
                negative.append((row["Label"], int(row["id"])))
    assert total == 32_669
    assert len(cic_flows) + sum(cic_flows.skipped.values()) == total
    assert cic_flows.skipped == {"negative_count": len(negative)} and negative
    assert cic_flows.classes[0] == "BENIGN" and set(cic_flows.classes) == labels
    for label, row_id in negative:
        assert not (
            (cic_flows.label == cic_flows.class_index(label))
            & (cic_flows.row_id == row_id)
        ).any()


@pytest.mark.parametrize(
    "file_name",
    ["BENIGN_5000.csv.gz", "Portscan_5000.csv.gz", "SSH-Patator_2961.csv.gz"],
)
def test_cic_loader_maps_rows_like_the_csv(
    cic_dir: Path, cic_flows: cicids.CicFlows, file_name: str
) -> None:
    """The first rows of a file, field by field, and their two directional
    records: packets per side, bytes = payload + transport header + 20 per
    packet (IPv4), end = start + duration."""
    directional = cicids.directional_flows(cic_flows)
    rec = directional.records
    for row in csv_rows(cic_dir / file_name, 5):
        i = find(cic_flows, row["Label"], int(row["id"]))
        assert cic_flows.start_ms[i] == utc_ms(row["Timestamp"])
        assert address_text(cic_flows.src_addr[i]) == row["Src IP"]
        assert address_text(cic_flows.dst_addr[i]) == row["Dst IP"]
        assert cic_flows.src_port[i] == int(row["Src Port"])
        assert cic_flows.dst_port[i] == int(row["Dst Port"])
        assert cic_flows.protocol[i] == int(row["Protocol"])
        mine = rec[directional.label == i]
        for side, src in (("Fwd", row["Src IP"]), ("Bwd", row["Dst IP"])):
            pkts = int(
                row["Total Fwd Packet"] if side == "Fwd" else row["Total Bwd packets"]
            )
            one = mine[[address_text(a) == src for a in mine["src_addr"]]]
            if pkts == 0:
                assert one.size == 0
                continue
            assert one.size == 1
            assert one["packets"][0] == pkts
            want = (
                int(row[f"Total Length of {side} Packet"])
                + int(row[f"{side} Header Length"])
                + 20 * pkts
            )
            assert one["bytes"][0] == want
            assert one["time_start"][0] == utc_ms(row["Timestamp"])
            end = utc_ms(row["Timestamp"]) + int(row["Flow Duration"]) // 1000
            assert one["time_end"][0] == end
            assert one["sampling_rate"][0] == 1


def test_cic_tcp_flags_per_side(cic_flows: cicids.CicFlows) -> None:
    """Two rows worked by hand from their CSV flag counts.

    Portscan id 337204: 1+1 packets, SYN 1, ACK 1, Bwd RST 1 -> forward SYN
    (the probe), backward ACK+RST (the closed port's answer).
    SSH-Patator id 79300: 14+15 packets, SYN 2, ACK 28 (> 15 backward),
    PSH both ways, no FIN -> SYN+ACK+PSH on both sides.
    """
    fwd, bwd = cicids.direction_flags(cic_flows)
    i = find(cic_flows, "Portscan", 337204)
    assert (fwd[i], bwd[i]) == (SYN, ACK | RST)
    i = find(cic_flows, "SSH-Patator", 79300)
    assert (fwd[i], bwd[i]) == (SYN | ACK | PSH, SYN | ACK | PSH)


def test_cic_botnet_windows_labelled_from_the_csv(
    cic_dir: Path, cic_flows: cicids.CicFlows
) -> None:
    """Unsampled, the positive windows of class Botnet are exactly the
    (internal source, 300 s window) pairs of its CSV rows (its flows last
    < 1 s, so no active-timeout cut moves one); the bots' other windows in
    the attack span are left out, and no normal window is a bot's in the
    span."""
    rows = csv_rows(cic_dir / "Botnet_736.csv.gz")
    want = {
        (r["Src IP"], utc_ms(r["Timestamp"]) // WINDOW_MS * WINDOW_MS) for r in rows
    }
    span_lo = min(utc_ms(r["Timestamp"]) for r in rows)
    span_hi = max(
        utc_ms(r["Timestamp"]) + int(r["Flow Duration"]) // 1000 for r in rows
    )
    bots = {r["Src IP"] for r in rows}
    cw = CicSource(cic_flows).class_windows("Botnet", rate=1, seed=0, window_s=300)
    hosts = [address_text(h) for h in cw.windows.host]
    starts = cw.windows.window_start_ms
    got = {(hosts[j], int(starts[j])) for j in np.flatnonzero(cw.label == 1)}
    assert got == want
    for j in range(len(hosts)):
        in_span = starts[j] + WINDOW_MS > span_lo and starts[j] <= span_hi
        if hosts[j] in bots and in_span:
            assert cw.label[j] in (1, -1)
            assert cw.target[j]
        elif cw.label[j] != 1:
            assert cw.label[j] == 0 and not cw.target[j]


def test_cic_split_by_hour_by_hand() -> None:
    """Fibonacci hashing of the hour: hour 0 -> 0 (train), 1 -> 0.618
    (validation), 2 -> 0.236 (train), 3 -> 0.854 (test); every window of an
    hour shares its split; over 1,000 hours the shares are near 60/20/20."""
    hour = 3_600_000
    starts = np.array([0, hour, 2 * hour, 3 * hour, 3 * hour + 55 * 60_000])
    assert cicids.split_of_windows(starts).tolist() == [0, 1, 0, 2, 2]
    split = cicids.split_of_windows(np.arange(1000) * hour)
    shares = np.bincount(split, minlength=3) / 1000
    np.testing.assert_allclose(shares, [0.6, 0.2, 0.2], atol=0.02)


# Evaluate smoke runs (LiteRT, no TensorFlow) ---------------------------------


def first_line_times(path: Path, host: str) -> tuple[int, list[int]]:
    """First StartTime of a CTU-13 slice and the start times of the lines
    with ``host`` at either end, in UTC ms (StartTime is CEST, UTC+2)."""
    first = None
    times = []
    with gzip.open(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for line in reader:
            t = datetime.datetime.strptime(line[0], "%Y/%m/%d %H:%M:%S.%f")
            ms = calendar.timegm(t.timetuple()) * 1000 + t.microsecond // 1000
            ms -= 2 * 3600 * 1000
            first = ms if first is None else min(first, ms)
            if host in (line[3], line[6]):
                times.append(ms)
    assert first is not None
    return first, times


def test_evaluate_ctu13_smoke_on_three_slices() -> None:
    """The relay .tflite under LiteRT on slices 14, 20, 21 at 1:100, two
    seeds: one run per seed; the first-activity reference is the infected
    host's first line at or after the first test window (from the CSV);
    every detection lands on a window end."""
    flows = ctu13.load_flows(slices=[14, 20, 21])
    model = load_model(RELAY)
    result = evaluate_ctu13(model, Ctu13Source(flows), rate=100, n_seeds=2)
    assert result["seeds"] == [1000, 1001] and len(result["runs"]) == 2
    files = ctu13.slice_files(ctu13.dataset_dir())
    first, times = first_line_times(files[20], ctu13.INFECTED_HOST)
    times += first_line_times(files[21], ctu13.INFECTED_HOST)[1]
    # Slice 20 starts 3.8 ms after 11:40:00 CEST, so the first window that
    # starts inside the test period is 11:45.
    first_slot = -(-first // WINDOW_MS) * WINDOW_MS
    refs = result["references_ms"]
    assert refs["first_activity"] == min(t for t in times if t >= first_slot)
    for run in result["runs"]:
        assert run["positive_windows"] > 0 and run["normal_windows"] > 0
        assert 0.0 <= run["pr_auc"] <= 1.0
        assert run["monitored_days"] > 0
        for name in ("first_activity", "onset"):
            for suffix in ("", "_hysteresis"):
                ttd = run[f"ttd_{name}_min{suffix}"]
                if math.isfinite(ttd):
                    end = refs[name] + ttd * 60_000
                    assert round(end) % WINDOW_MS == 0 and ttd > 0
    assert result["summary"]["pr_auc"]["runs"] == 2


def test_models_evaluate_cli_on_cicids(cic_dir: Path) -> None:
    """'models evaluate --dataset cicids2017 --markdown' scores the relay
    model (LiteRT) on CIC-IDS2017 and prints one row per attack class."""
    args = build_parser().parse_args(
        [
            "models",
            "evaluate",
            str(RELAY),
            "--dataset",
            "cicids2017",
            "--data",
            str(cic_dir),
            "--rates",
            "100",
            "--seeds",
            "1",
            "--markdown",
        ]
    )
    out = io.StringIO()
    with redirect_stdout(out):
        assert args.func(args) == 0
    lines = out.getvalue().splitlines()
    header = next(ln for ln in lines if ln.startswith("| class"))
    rows = [ln for ln in lines if ln.startswith("| ") and ln != header]
    assert all(r.count(" | ") == header.count(" | ") for r in rows)
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "Botnet",
        "DDoS",
        "DoS Hulk",
        "FTP-Patator",
        "Infiltration - Portscan",
        "Portscan",
        "SSH-Patator",
    ]


def test_models_evaluate_rates_are_checked() -> None:
    """--rates takes a comma list of integers >= 1 and names the bad value."""
    parser = build_parser()
    args = parser.parse_args(["models", "evaluate", str(RELAY), "--rates", "1,100"])
    assert args.rates == [1, 100]
    for bad in ("0,100", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["models", "evaluate", str(RELAY), "--rates", bad])


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None,
    reason="TensorFlow is not installed (optional 'train' extra; CI skips it)",
)
def test_transfer_refits_only_the_per_network_part(
    cic_dir: Path, tmp_path: Path
) -> None:
    """'models transfer' writes a loadable model whose detector and
    thresholds equal the base model's, while
    scaler and loss statistics are CIC's own: the scaler's medians equal
    numpy medians of the train-hour benign windows computed here."""
    from cloud.training.transfer import (  # noqa: PLC0415 - needs TF
        TransferConfig,
        benign_windows,
        run_transfer,
    )

    cfg = TransferConfig(
        base_manifest=RELAY,
        rate=100,
        n_seeds=1,
        epochs=1,
        out_dir=tmp_path,
        dataset_dir=cic_dir,
    )
    path = run_transfer(cfg)
    base = json.loads(RELAY.read_text())
    new = json.loads(path.read_text())
    assert new["detector"] == base["detector"]
    assert new["thresholds"] == base["thresholds"]
    assert new["training"]["network"] == "cicids2017"
    model = load_model(path)
    assert model.window_s == base["window_s"]
    bw = benign_windows(cicids.load_flows(cic_dir), 100, cfg.seed, model.window_s)
    train = bw.windows.values[bw.split == cicids.TRAIN]
    for j, name in enumerate(base["features"]):
        col = train[:, FEATURE_NAMES.index(name)]
        if name in LOG1P_FEATURES:
            col = np.log1p(col)
        assert new["scaler"]["median"][j] == pytest.approx(float(np.median(col)))
    assert new["loss_normaliser"] != base["loss_normaliser"]
