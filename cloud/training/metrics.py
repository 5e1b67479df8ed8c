"""Detection metrics of one scored run of host windows (numpy only).

A *run* is one thinning realisation of one period: rows of (host, window
start, label, score).  Labels: 1 positive, 0 normal, -1 left out of every
count (see :mod:`cloud.training.dataset`).  :func:`run_metrics` gives, for
one run and one set of thresholds:

* ranking: ROC-AUC and PR-AUC (:func:`~cloud.training.detector.roc_auc`,
  :func:`~cloud.training.detector.average_precision`; sklearn is not a
  dependency of any extra, so both are numpy and tested against hand
  computations);
* per window at ``alert``: precision, recall, false alert windows per
  1,000 normal host windows and per day of monitored time;
* with the k-of-n hysteresis of :func:`~edge_agent.features.scoring.hysteresis`
  over the (host, window slot) grid: precision and recall of the windows
  in alert state, and false alert *events* (alert raisings caused by
  normal windows) per day;
* time to first detection of the target hosts, in minutes after given
  reference times (first activity, first malicious flow).  A window's
  verdict is taken at its end, ``window start + window_s``: that is when
  the window closes and can be scored.

:func:`summarise` turns per-run values into mean, spread and range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud.training.detector import average_precision, roc_auc
from edge_agent.features.scoring import hysteresis

MS_PER_DAY = 86_400_000
MS_PER_MIN = 60_000
#: An attack's onset: the first of its flows followed, within ONSET_SPAN_MS,
#: by at least ONSET_SHARE of all its flows (see :func:`onset_ms`).
ONSET_SHARE = 0.01
ONSET_SPAN_MS = 300_000


@dataclass(frozen=True)
class AlertRule:
    """Thresholds on the detector score and the k-of-n hysteresis."""

    alert: float
    clear: float
    k: int
    n: int


@dataclass(frozen=True)
class RunRows:
    """The scored host windows of one run.

    ``host``: an integer key per host (any key, equal for equal hosts);
    ``window_start_ms``: window starts, multiples of ``window_s * 1000``;
    ``label``: 1 / 0 / -1 (see module doc); ``score``: detector score;
    ``target``: True for rows of the hosts whose detection is timed (the
    infected host); ``first_slot_ms`` / ``last_slot_ms``: the first and last
    window start of the monitored period (the hysteresis grid and the
    monitored time span them, also where no host had traffic).
    """

    host: np.ndarray
    window_start_ms: np.ndarray
    label: np.ndarray
    score: np.ndarray
    target: np.ndarray
    window_s: int
    first_slot_ms: int
    last_slot_ms: int

    @property
    def monitored_days(self) -> float:
        """Length of the monitored period in days (all window slots)."""
        slots = (self.last_slot_ms - self.first_slot_ms) // (self.window_s * 1000) + 1
        return slots * self.window_s * 1000 / MS_PER_DAY


def precision_recall_at(
    y: np.ndarray, score: np.ndarray, threshold: float
) -> tuple[float, float]:
    """Precision and recall of ``score >= threshold`` against labels ``y``.

    Precision is NaN when nothing is flagged, recall NaN with no positive.
    """
    y = np.asarray(y).astype(bool)
    flagged = np.asarray(score) >= threshold
    tp = int((flagged & y).sum())
    n_flagged = int(flagged.sum())
    n_pos = int(y.sum())
    precision = tp / n_flagged if n_flagged else float("nan")
    recall = tp / n_pos if n_pos else float("nan")
    return precision, recall


def onset_ms(
    attack_starts_ms: np.ndarray,
    share: float = ONSET_SHARE,
    span_ms: int = ONSET_SPAN_MS,
) -> float:
    """Start of the first attack flow that opens a busy span.

    The earliest flow at ``t`` such that at least ``share`` of all the
    attack's flows start in ``[t, t + span_ms)``: a reference for detection
    times that a few stray early flows do not move (CTU-13's bot sends 2
    flows at 10:02 and 2 at 10:09:58, then ~40 a minute; the Portscan file
    has 12 flows in the hour before its scan).  NaN for no flow.
    """
    t = np.sort(np.asarray(attack_starts_ms, np.int64))
    if t.size == 0:
        return float("nan")
    need = max(1, int(np.ceil(share * t.size)))
    count = np.searchsorted(t, t + span_ms, side="left") - np.arange(t.size)
    return float(t[np.argmax(count >= need)])


def rising_edges(active: np.ndarray) -> np.ndarray:
    """Boolean ``(hosts, slots)``: True where the alert state turns on."""
    before = np.zeros_like(active)
    before[:, 1:] = active[:, :-1]
    return active & ~before


def first_detection_ms(
    slot_start_ms: np.ndarray, flagged: np.ndarray, window_s: int, after_ms: int
) -> float:
    """End time (ms) of the first flagged slot that ends after ``after_ms``.

    ``slot_start_ms``: window starts (any order); ``flagged``: same shape.
    NaN when no such slot is flagged.
    """
    ends = np.asarray(slot_start_ms, np.int64) + window_s * 1000
    hit = np.asarray(flagged, bool) & (ends > after_ms)
    return float(ends[hit].min()) if hit.any() else float("nan")


def _grid(
    rows: RunRows, values: np.ndarray, fill: float | int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``values`` on a (host, slot) grid; returns grid, present, hosts, slots."""
    window_ms = rows.window_s * 1000
    hosts, h_idx = np.unique(rows.host, return_inverse=True)
    n_slots = (rows.last_slot_ms - rows.first_slot_ms) // window_ms + 1
    s_idx = (rows.window_start_ms - rows.first_slot_ms) // window_ms
    if s_idx.size and (s_idx.min() < 0 or s_idx.max() >= n_slots):
        raise ValueError("a window starts outside the run's slot range")
    grid = np.full((hosts.size, n_slots), fill, dtype=np.asarray(values).dtype)
    grid[h_idx, s_idx] = values
    present = np.zeros((hosts.size, n_slots), dtype=bool)
    present[h_idx, s_idx] = True
    slots = rows.first_slot_ms + np.arange(n_slots, dtype=np.int64) * window_ms
    return grid, present, h_idx, slots


def hysteresis_metrics(
    rows: RunRows, rule: AlertRule
) -> tuple[dict[str, float], np.ndarray]:
    """Alert-state metrics of one run (see module doc), and the window
    starts of the target hosts' slots in alert state.

    A host with no window in a slot sent and received nothing sampled: its
    score there counts as below both thresholds.  A raising counts as a
    false alert event when the windows that caused it (the host's present
    windows among the last ``n`` slots) are all normal, as a true one when
    any is positive; raisings caused by left-out windows count as neither.
    """
    score, present, _, slots = _grid(rows, rows.score.astype(np.float64), -np.inf)
    label, _, _, _ = _grid(rows, rows.label.astype(np.int8), 0)
    target, _, _, _ = _grid(rows, rows.target.astype(bool), False)
    target_host = np.asarray(np.any(target, axis=1), dtype=bool)
    active = hysteresis(score >= rule.alert, score >= rule.clear, rule.k, rule.n)
    pos = present & (label == 1)
    normal = present & (label == 0)
    in_alert_pos = int((active & pos).sum())
    in_alert_normal = int((active & normal).sum())
    # Which labels fed each raising: the host's present windows in the
    # last n slots (this one included).
    edges = rising_edges(active)
    n_slots = score.shape[1]
    any_pos = np.zeros_like(active)
    any_excl = np.zeros_like(active)
    any_present = np.zeros_like(active)
    for lag in range(rule.n):
        shifted = slice(lag, n_slots)
        source = slice(0, n_slots - lag)
        any_pos[:, shifted] |= pos[:, source]
        any_excl[:, shifted] |= present[:, source] & (label[:, source] == -1)
        any_present[:, shifted] |= present[:, source]
    false_events = int((edges & any_present & ~any_pos & ~any_excl).sum())
    n_pos = int(pos.sum())
    n_normal = int(normal.sum())
    flagged = in_alert_pos + in_alert_normal
    detected = active & target_host[:, None]
    metrics = {
        "precision_hysteresis": in_alert_pos / flagged if flagged else float("nan"),
        "recall_hysteresis": in_alert_pos / n_pos if n_pos else float("nan"),
        "false_alert_windows_per_1000_normal_hysteresis": (
            1000.0 * in_alert_normal / n_normal if n_normal else float("nan")
        ),
        "false_alert_events_hysteresis": float(false_events),
        "false_alert_events_per_day_hysteresis": false_events / rows.monitored_days,
    }
    return metrics, slots[np.nonzero(detected)[1]]


def run_metrics(
    rows: RunRows, rule: AlertRule, references_ms: Mapping[str, float]
) -> dict[str, Any]:
    """All metrics of one run (see module doc).

    ``references_ms``: name -> time (ms since epoch); for each, the time to
    first detection of the target hosts in minutes after it, per window
    (``ttd_<name>_min``) and with hysteresis (``ttd_<name>_min_hysteresis``),
    NaN when they were never flagged after it.
    """
    keep = rows.label >= 0
    y = rows.label[keep] == 1
    s = rows.score[keep]
    normal = ~y
    precision, recall = precision_recall_at(y, s, rule.alert)
    false_windows = int((s[normal] >= rule.alert).sum())
    n_normal = int(normal.sum())
    out: dict[str, Any] = {
        "positive_windows": int(y.sum()),
        "normal_windows": n_normal,
        "monitored_days": rows.monitored_days,
        "roc_auc": roc_auc(y, s),
        "pr_auc": average_precision(y, s),
        "precision_at_alert": precision,
        "recall_at_alert": recall,
        "false_alert_windows": float(false_windows),
        "false_alerts_per_1000_normal_windows": (
            1000.0 * false_windows / n_normal if n_normal else float("nan")
        ),
        "false_alerts_per_day": false_windows / rows.monitored_days,
    }
    hyst, detected_slots = hysteresis_metrics(rows, rule)
    out.update(hyst)
    always = np.ones(detected_slots.size, dtype=bool)
    flagged_target = rows.target & (rows.score >= rule.alert)
    for name, ref in references_ms.items():
        for suffix, starts, flags in (
            ("", rows.window_start_ms, flagged_target),
            ("_hysteresis", detected_slots, always),
        ):
            t = first_detection_ms(starts, flags, rows.window_s, int(ref))
            out[f"ttd_{name}_min{suffix}"] = (t - ref) / MS_PER_MIN
    return out


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max over the finite values.

    ``n`` counts the finite values, ``runs`` all of them (a NaN is a run
    where the metric is undefined, e.g. a host never detected).
    """
    arr = np.asarray(values, np.float64)
    finite = arr[np.isfinite(arr)]
    nan = float("nan")
    return {
        "mean": float(finite.mean()) if finite.size else nan,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else nan,
        "min": float(finite.min()) if finite.size else nan,
        "max": float(finite.max()) if finite.size else nan,
        "n": float(finite.size),
        "runs": float(arr.size),
    }


def summarise_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """:func:`summarise` of every numeric metric the runs share."""
    if not runs:
        return {}
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {k: summarise([float(r[k]) for r in runs]) for k in keys}
