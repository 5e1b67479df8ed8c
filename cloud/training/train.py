"""Training, evaluation and export of the per-network models on CTU-13.

:func:`run_training` is what ``sampleflow models train`` runs:

1. Replay CTU-13 scenario 6 at 1:``rate`` with ``n_seeds`` thinning seeds
   (``seed, seed+1, ...``; one at 1:1, where thinning draws every packet).
2. Per realisation, host windows of ``window_s`` seconds, labelled and cut
   into train / validation / test periods (:mod:`cloud.training.dataset`).
3. Fit the robust scaler and the auto-encoder on the normal training
   windows (the infected host left out).
4. On validation windows: per-feature loss statistics of normal windows,
   then the global detector (positives: the infected host's bot windows),
   then the thresholds from the alert budget.
5. On test windows (never seen before): PR-AUC, ROC-AUC, recall and false
   alert rate at the threshold, with and without hysteresis.
6. Export ``<name>.tflite``, ``<name>.weights.npz`` and
   ``<name>.manifest.json`` into ``out_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from cloud.training import ctu13
from cloud.training.autoencoder import (
    HIDDEN_ACTIVATION,
    OUTPUT_ACTIVATION,
    export_tflite,
    forward,
    train_autoencoder,
)
from cloud.training.dataset import (
    PERIOD_NAMES,
    TEST,
    TEST_SLICE,
    TRAIN,
    VALIDATION,
    VALIDATION_SLICE,
    LabelledWindows,
    build_windows,
    host_keys,
)
from cloud.training.detector import (
    Thresholds,
    average_precision,
    fit_detector,
    roc_auc,
    thresholds_from_budget,
)
from edge_agent.features import (
    FEATURE_NAMES,
    FEATURE_SPEC_VERSION,
    RELAY_FEATURES,
    FeatureScaler,
)
from edge_agent.features.scoring import (
    GlobalDetector,
    LossNormaliser,
    hysteresis,
    reconstruction_losses,
)

log = structlog.get_logger(__name__)

MANIFEST_FORMAT = "sampleflow-model/1"
MODELS_DIR = ctu13.PROJECT_ROOT / "models"


@dataclass(frozen=True)
class ModelLayout:
    """Which features a model reads and its hidden layer widths."""

    kind: str
    features: tuple[str, ...]
    hidden: tuple[int, ...]


LAYOUTS: dict[str, ModelLayout] = {
    "relay": ModelLayout("relay", RELAY_FEATURES, (8, 4, 8)),
    "cloud": ModelLayout("cloud", FEATURE_NAMES, (32, 16, 6, 16, 32)),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a trained model (all of it goes in the
    manifest).  ``window_s`` 300 because at 1:100 a host sending ~110
    packets a minute (the CTU-13 bot) leaves ~1 sampled packet a minute."""

    rate: int = 100
    window_s: int = 300
    seed: int = 6
    n_seeds: int = 4
    epochs: int = 60
    batch_size: int = 256
    budget: float = 0.001
    clear_quantile: float = 0.99
    k: int = 2
    n: int = 3
    kinds: tuple[str, ...] = ("relay", "cloud")
    out_dir: Path = MODELS_DIR
    dataset_dir: Path | None = None
    active_timeout_s: int = 60
    version: str = "1.0.0"
    extra: dict[str, Any] = field(default_factory=dict)

    def name(self, kind: str) -> str:
        """Artifact base name, e.g. ``relay-ctu13s6-r100-w300``."""
        return f"{kind}-ctu13s6-r{self.rate}-w{self.window_s}"

    def seeds(self) -> list[int]:
        """Thinning seeds (one at 1:1, where every seed gives the same)."""
        return (
            [self.seed]
            if self.rate == 1
            else [self.seed + i for i in range(self.n_seeds)]
        )


@dataclass
class PeriodRows:
    """Rows of one period pooled over realisations."""

    values: np.ndarray
    label: np.ndarray
    seed: np.ndarray
    host: np.ndarray
    window_start_ms: np.ndarray
    spec_version: int
    window_s: int


def period_rows(sets: Sequence[LabelledWindows], period: int) -> PeriodRows:
    parts = [(s, s.period == period) for s in sets]
    return PeriodRows(
        values=np.concatenate([s.windows.values[m] for s, m in parts]),
        label=np.concatenate([s.label[m] for s, m in parts]),
        seed=np.concatenate([np.full(int(m.sum()), s.seed) for s, m in parts]),
        host=np.concatenate([host_keys(s.windows)[m] for s, m in parts]),
        window_start_ms=np.concatenate(
            [s.windows.window_start_ms[m] for s, m in parts]
        ),
        spec_version=sets[0].windows.spec_version,
        window_s=sets[0].windows.window_s,
    )


def as_host_windows(rows: PeriodRows, sets: Sequence[LabelledWindows]) -> Any:
    # The scaler only reads values and spec_version from a HostWindows.
    template = sets[0].windows
    return dataclasses.replace(
        template,
        host=np.zeros(len(rows.values), dtype="V16"),
        window_start_ms=rows.window_start_ms,
        values=rows.values,
    )


def json_safe(value: Any) -> Any:
    """Replace NaN/inf floats (no positives, say) by None, recursively."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hysteresis_metrics(
    rows: PeriodRows, score: np.ndarray, th: Thresholds
) -> dict[str, float]:
    """Alert-state metrics over each realisation's (host, window) grid."""
    pos_in_alert = pos_total = 0
    normal_in_alert = normal_total = 0
    normal_hosts_alerted = 0
    infected_alerted = 0
    seeds = np.unique(rows.seed)
    for seed in seeds:
        m = rows.seed == seed
        hosts, h_idx = np.unique(rows.host[m], return_inverse=True)
        wins, w_idx = np.unique(rows.window_start_ms[m], return_inverse=True)
        grid = np.full((hosts.size, wins.size), -np.inf)
        grid[h_idx, w_idx] = score[m]
        lab = np.full((hosts.size, wins.size), 0, dtype=np.int8)
        lab[h_idx, w_idx] = rows.label[m]
        active = hysteresis(grid >= th.alert, grid >= th.clear, th.k, th.n)
        present = np.zeros_like(active)
        present[h_idx, w_idx] = True
        pos = (lab == 1) & present
        normal = (lab == 0) & present
        pos_in_alert += int((active & pos).sum())
        pos_total += int(pos.sum())
        normal_in_alert += int((active & normal).sum())
        normal_total += int(normal.sum())
        infected_rows = (lab != 0).any(axis=1)
        normal_hosts_alerted += int((active & normal).any(axis=1)[~infected_rows].sum())
        infected_alerted += int(active[infected_rows].any())
    return {
        "recall_hysteresis": pos_in_alert / max(pos_total, 1),
        "normal_window_alert_share_hysteresis": normal_in_alert / max(normal_total, 1),
        "normal_hosts_alerted_per_run": normal_hosts_alerted / seeds.size,
        "infected_host_alerted_share_of_runs": infected_alerted / seeds.size,
    }


def window_metrics(
    rows: PeriodRows,
    score: np.ndarray,
    z: np.ndarray,
    losses: np.ndarray,
    th: Thresholds,
) -> dict[str, Any]:
    keep = rows.label >= 0
    y = rows.label[keep] == 1
    s = score[keep]
    per_seed_ap = []
    for seed in np.unique(rows.seed):
        m = rows.seed[keep] == seed
        per_seed_ap.append(average_precision(y[m], s[m]))
    normal = ~y
    return {
        "positive_windows": int(y.sum()),
        "normal_windows": int(normal.sum()),
        "runs": int(np.unique(rows.seed).size),
        "pr_auc": average_precision(y, s),
        "pr_auc_per_run": per_seed_ap,
        "roc_auc": roc_auc(y, s),
        "pr_auc_mean_z_unsupervised": average_precision(y, z[keep].mean(axis=1)),
        "pr_auc_total_loss_unsupervised": average_precision(y, losses[keep, -1]),
        "positive_rate_base": float(y.mean()) if y.size else float("nan"),
        "recall_at_alert": float((s[y] >= th.alert).mean())
        if y.any()
        else float("nan"),
        "false_alert_rate_at_alert": float((s[normal] >= th.alert).mean()),
        **_hysteresis_metrics(rows, score, th),
    }


def _score(
    x: np.ndarray,
    weights: list[np.ndarray],
    normaliser: LossNormaliser | None,
    detector: GlobalDetector | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    losses = reconstruction_losses(x, forward(weights, x))
    if normaliser is None:
        return losses, None, None
    z = normaliser.transform(losses)
    return losses, z, None if detector is None else detector.score(z)


def train_layout(
    cfg: TrainConfig, layout: ModelLayout, sets: Sequence[LabelledWindows]
) -> Path:
    """Train, evaluate and export one model layout; returns the manifest."""
    t0 = time.monotonic()
    train = period_rows(sets, TRAIN)
    val = period_rows(sets, VALIDATION)
    test = period_rows(sets, TEST)
    train_normal = train.label == 0
    scaler = FeatureScaler.fit(
        as_host_windows(_filter(train, train_normal), sets), layout.features
    )
    x_train = scaler.transform(as_host_windows(_filter(train, train_normal), sets))
    weights = train_autoencoder(
        x_train,
        layout.hidden,
        seed=cfg.seed,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
    )
    x_val = scaler.transform(as_host_windows(val, sets))
    losses_val, _, _ = _score(x_val, weights, None, None)
    val_normal = val.label == 0
    normaliser = LossNormaliser.fit(losses_val[val_normal], layout.features)
    z_val = normaliser.transform(losses_val)
    fit_rows = val.label >= 0
    detector = fit_detector(
        z_val[fit_rows], val.label[fit_rows] == 1, normaliser.inputs
    )
    th = thresholds_from_budget(
        detector.score(z_val[val_normal]), cfg.budget, cfg.clear_quantile, cfg.k, cfg.n
    )
    x_test = scaler.transform(as_host_windows(test, sets))
    losses_test, z_test, s_test = _score(x_test, weights, normaliser, detector)
    assert z_test is not None and s_test is not None
    metrics: dict[str, Any] = {
        "test": window_metrics(test, s_test, z_test, losses_test, th),
        "validation": window_metrics(val, detector.score(z_val), z_val, losses_val, th),
        "train_reconstruction_mse": float(
            ((forward(weights, x_train) - x_train) ** 2).mean()
        ),
    }

    name = cfg.name(layout.kind)
    manifest_path = export_model(
        Path(cfg.out_dir),
        name,
        kind=layout.kind,
        version=cfg.version,
        weights=weights,
        body={
            "feature_spec_version": FEATURE_SPEC_VERSION,
            "features": list(layout.features),
            "window_s": cfg.window_s,
            "scaler": scaler.to_dict(),
            "loss_normaliser": normaliser.to_dict(),
            "detector": detector.to_dict(),
            "thresholds": {
                "alert": th.alert,
                "clear": th.clear,
                "budget": th.budget,
                "hysteresis": {"k": th.k, "n": th.n},
            },
            "training": {
                "dataset": "CTU-13 scenario 6 (capture20110816, botnet Menti), "
                "Stratosphere Lab / CTU Prague; see data/NOTICE",
                "internal_networks": list(ctu13.INTERNAL_NETWORKS),
                "infected_host": ctu13.INFECTED_HOST,
                "periods": {
                    "train": f"slices 0-{VALIDATION_SLICE - 1}, infected host left out",
                    "validation": f"slices {VALIDATION_SLICE}-{TEST_SLICE - 1}: loss "
                    "statistics, detector, thresholds",
                    "test": f"slices {TEST_SLICE}-25: metrics only",
                },
                "sampling_rate": cfg.rate,
                "thinning_seeds": cfg.seeds(),
                "active_timeout_s": cfg.active_timeout_s,
                "direction_split": "Argus bidirectional flows split into src->dst "
                "(SrcBytes) and reverse (TotBytes-SrcBytes) records",
                "seed": cfg.seed,
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "rows": {
                    PERIOD_NAMES[TRAIN]: int(train_normal.sum()),
                    PERIOD_NAMES[VALIDATION]: len(val.label),
                    PERIOD_NAMES[TEST]: len(test.label),
                },
                "command": (
                    f"sampleflow models train --rate {cfg.rate} --window {cfg.window_s}"
                    f" --seed {cfg.seed} --seeds {cfg.n_seeds} --epochs {cfg.epochs}"
                ),
            },
            "metrics": metrics,
        },
    )
    log.info(
        "model_trained",
        name=name,
        pr_auc=round(metrics["test"]["pr_auc"], 4),
        roc_auc=round(metrics["test"]["roc_auc"], 4),
        seconds=round(time.monotonic() - t0, 1),
    )
    return manifest_path


def export_model(
    out_dir: Path,
    name: str,
    *,
    kind: str,
    version: str,
    weights: Sequence[np.ndarray],
    body: dict[str, Any],
) -> Path:
    """Write ``<name>.tflite``, ``.weights.npz`` and ``.manifest.json``.

    The manifest starts with the format, names, checksums and architecture
    derived from ``weights``; ``body`` (features, scaler, statistics,
    detector, thresholds, training, metrics) follows in its own order.
    Returns the manifest path.  Needs TensorFlow (the ``.tflite`` export).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tflite_path = out_dir / f"{name}.tflite"
    tflite_path.write_bytes(export_tflite(weights))
    npz_path = out_dir / f"{name}.weights.npz"
    with npz_path.open("wb") as fh:
        arrays: dict[str, Any] = {
            f"{'W' if i % 2 == 0 else 'b'}{i // 2}": w for i, w in enumerate(weights)
        }
        np.savez(fh, **arrays)
    sizes = [int(weights[0].shape[0])] + [int(w.shape[0]) for w in weights[1::2]]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "kind": kind,
        "version": version,
        "model_file": tflite_path.name,
        "sha256": _sha256(tflite_path),
        "bytes": tflite_path.stat().st_size,
        "weights_file": npz_path.name,
        "weights_sha256": _sha256(npz_path),
        "architecture": {
            "layers": sizes,
            "hidden_activation": HIDDEN_ACTIVATION,
            "output_activation": OUTPUT_ACTIVATION,
            "dtype": "float32",
            "input_shape": [None, sizes[0]],
        },
        **body,
    }
    manifest_path = out_dir / f"{name}.manifest.json"
    manifest_path.write_text(
        json.dumps(json_safe(manifest), indent=2, allow_nan=False) + "\n"
    )
    return manifest_path


def _filter(rows: PeriodRows, mask: np.ndarray) -> PeriodRows:
    return PeriodRows(
        values=rows.values[mask],
        label=rows.label[mask],
        seed=rows.seed[mask],
        host=rows.host[mask],
        window_start_ms=rows.window_start_ms[mask],
        spec_version=rows.spec_version,
        window_s=rows.window_s,
    )


def build_sets(cfg: TrainConfig) -> list[LabelledWindows]:
    """Load CTU-13 and build one labelled window set per thinning seed."""
    flows = ctu13.load_flows(cfg.dataset_dir)
    return [
        build_windows(flows, cfg.rate, seed, cfg.window_s, cfg.active_timeout_s)
        for seed in cfg.seeds()
    ]


def run_training(cfg: TrainConfig) -> list[Path]:
    """Train every layout in ``cfg.kinds``; returns the manifest paths."""
    unknown = [k for k in cfg.kinds if k not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown model kind(s) {unknown}; valid: {sorted(LAYOUTS)}")
    sets = build_sets(cfg)
    return [train_layout(cfg, LAYOUTS[kind], sets) for kind in cfg.kinds]
