"""Markdown tables of evaluation results (``models evaluate --markdown``).

Every cell is ``mean ± std`` over the runs (thinning seeds) of
:func:`cloud.training.metrics.summarise`; a single run shows its value
alone; a metric undefined in some runs (a host never detected) shows how
many runs it is defined in, ``(3/4)``; "–" when it is defined in none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def cell(summary: Mapping[str, float] | None, digits: int = 3) -> str:
    """One ``mean ± std`` cell (see module doc)."""
    if summary is None or not summary.get("n"):
        return "–"
    # Results read back from JSON carry None where a float was NaN.
    mean = float(summary["mean"])
    std = float("nan") if summary["std"] is None else float(summary["std"])
    text = f"{mean:.{digits}f}"
    if np.isfinite(std):
        text += f" ± {std:.{digits}f}"
    if summary["n"] < summary["runs"]:
        text += f" ({int(summary['n'])}/{int(summary['runs'])})"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _model_name(result: Mapping[str, Any]) -> str:
    return str(result["model"]).split(":")[0]


def _per_run(summary: Mapping[str, Any], key: str) -> str:
    s = summary.get(key)
    return "–" if s is None else f"{s['mean']:.1f}"


def ctu13_tables(results: Sequence[Mapping[str, Any]]) -> str:
    """Two tables: ranking and per-window alerts; hysteresis and detection."""
    first: list[list[str]] = []
    second: list[list[str]] = []
    for r in results:
        s = r["summary"]
        lead = [_model_name(r), f"1:{r['rate']}", r["period"], str(len(r["runs"]))]
        first.append(
            [
                *lead,
                f"{_per_run(s, 'positive_windows')} / {_per_run(s, 'normal_windows')}",
                cell(s.get("pr_auc")),
                cell(s.get("roc_auc")),
                cell(s.get("precision_at_alert"), 2),
                cell(s.get("recall_at_alert"), 2),
                cell(s.get("false_alerts_per_1000_normal_windows"), 2),
                cell(s.get("false_alerts_per_day"), 1),
            ]
        )
        second.append(
            [
                *lead,
                cell(s.get("precision_hysteresis"), 2),
                cell(s.get("recall_hysteresis"), 2),
                cell(s.get("false_alert_windows_per_1000_normal_hysteresis"), 2),
                cell(s.get("false_alert_events_per_day_hysteresis"), 1),
                cell(s.get("ttd_first_activity_min"), 1),
                cell(s.get("ttd_first_activity_min_hysteresis"), 1),
                cell(s.get("ttd_first_malicious_min"), 1),
                cell(s.get("ttd_onset_min"), 1),
                cell(s.get("ttd_onset_min_hysteresis"), 1),
            ]
        )
    lead_h = ["model", "rate", "period", "runs"]
    return (
        _table(
            [
                *lead_h,
                "pos / normal windows per run",
                "PR-AUC",
                "ROC-AUC",
                "precision @alert",
                "recall @alert",
                "false alerts / 1000 normal",
                "false alerts / day",
            ],
            first,
        )
        + "\n\n"
        + _table(
            [
                *lead_h,
                "precision (k-of-n)",
                "recall (k-of-n)",
                "normal windows in alert / 1000",
                "false alert events / day",
                "TTD from first activity, min",
                "TTD (k-of-n)",
                "TTD from first malicious flow, min",
                "TTD from onset, min",
                "TTD from onset (k-of-n)",
            ],
            second,
        )
    )


def cicids_table(result: Mapping[str, Any]) -> str:
    """One row per attack class of one CIC-IDS2017 result."""
    rows = []
    for name, c in result["classes"].items():
        s = c["summary"]
        rows.append(
            [
                name,
                f"{_per_run(s, 'positive_windows')} / {_per_run(s, 'normal_windows')}",
                cell(s.get("pr_auc")),
                cell(s.get("roc_auc")),
                cell(s.get("precision_at_alert"), 2),
                cell(s.get("recall_at_alert"), 2),
                cell(s.get("recall_hysteresis"), 2),
                cell(s.get("false_alerts_per_1000_normal_windows"), 1),
                cell(s.get("ttd_first_attack_min"), 1),
                cell(s.get("ttd_onset_min"), 1),
                cell(s.get("ttd_onset_min_hysteresis"), 1),
                f"{_per_run(s, 'principal_hosts_flagged')} / "
                f"{_per_run(s, 'principal_hosts')}",
            ]
        )
    title = (
        f"{_model_name(result)} at 1:{result['rate']} ({len(result['seeds'])} run(s))"
    )
    return f"{title}\n\n" + _table(
        [
            "class",
            "pos / normal windows per run",
            "PR-AUC",
            "ROC-AUC",
            "precision @alert",
            "recall @alert",
            "recall (k-of-n)",
            "false alerts / 1000 normal",
            "TTD from first attack flow, min",
            "TTD from onset, min",
            "TTD from onset (k-of-n)",
            "attack hosts flagged / attack hosts",
        ],
        rows,
    )


def markdown_tables(results: Sequence[Mapping[str, Any]]) -> str:
    """Tables for a list of results from :func:`evaluate_models`."""
    ctu = [r for r in results if r["dataset"] == "ctu13"]
    parts = [ctu13_tables(ctu)] if ctu else []
    parts += [cicids_table(r) for r in results if r["dataset"] == "cicids2017"]
    return "\n\n".join(parts)
