"""Moving a CTU-13 model to a second network: refit only the per-network part.

What is per network and refit here, on that network's own normal windows:
the robust feature scaler and the auto-encoder (train hours), and the loss
statistics that turn reconstruction losses into normalised losses
(validation hours).  What is global and copied unchanged from the base
model: the detector (logistic weights over normalised losses) and, by
default, its alert and clear thresholds, which were set on normalised
scores and so should carry over if the normalisation does its job; the
evaluation (:func:`cloud.training.evaluate.evaluate_cicids`) checks whether
it does.  With ``recalibrate`` the thresholds are set again from the
network's own validation windows at the base model's alert budget (the
99.9th percentile of a few hundred windows is close to their maximum, so
this is a noisy estimate on a sample this small).

:func:`run_transfer` does this for CIC-IDS2017 (``sampleflow models
transfer``) and writes a model in the shipped format (``.tflite``,
``.weights.npz``, ``.manifest.json``) whose manifest says which parts were
refit and which copied.  It needs TensorFlow (the auto-encoder training);
scoring the result does not.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from cloud.training import cicids
from cloud.training.autoencoder import forward, train_autoencoder
from cloud.training.detector import thresholds_from_budget
from cloud.training.thinning import cut_active_timeout, thin
from cloud.training.train import export_model
from edge_agent.features import FEATURE_SPEC_VERSION, FeatureScaler, HostWindows
from edge_agent.features.scoring import (
    GlobalDetector,
    LossNormaliser,
    reconstruction_losses,
)

log = structlog.get_logger(__name__)

NETWORK = "cicids2017"


@dataclass(frozen=True)
class TransferConfig:
    """Everything that decides a transferred model (all in its manifest)."""

    base_manifest: Path
    rate: int = 100
    seed: int = 6
    n_seeds: int = 4
    epochs: int = 60
    batch_size: int = 256
    out_dir: Path = Path("build/transfer")
    dataset_dir: Path | None = None
    version: str = "1.0.0"
    recalibrate: bool = False

    def seeds(self) -> list[int]:
        """Thinning seeds (one at 1:1, where every seed gives the same)."""
        return (
            [self.seed]
            if self.rate == 1
            else [self.seed + i for i in range(self.n_seeds)]
        )


def benign_windows(
    flows: cicids.CicFlows, rate: int, seed: int, window_s: int
) -> cicids.ClassWindows:
    """Host windows of the benign flows alone, one thinning realisation."""
    directional = cicids.directional_flows(flows)
    records, flow = thin(directional, rate, np.random.default_rng(seed))
    records, flow = cut_active_timeout(records, flow)
    return cicids.class_windows(
        records, flow, flows, cicids.BENIGN, window_s=window_s, seed=seed
    )


def _pooled(sets: list[cicids.ClassWindows], split: int) -> HostWindows:
    parts = [(s.windows, s.split == split) for s in sets]
    return dataclasses.replace(
        parts[0][0],
        host=np.concatenate([w.host[m] for w, m in parts]),
        window_start_ms=np.concatenate([w.window_start_ms[m] for w, m in parts]),
        values=np.concatenate([w.values[m] for w, m in parts]),
    )


def run_transfer(cfg: TransferConfig) -> Path:
    """Refit the per-network part of ``cfg.base_manifest`` on CIC-IDS2017
    benign windows (see module doc); returns the new manifest's path."""
    t0 = time.monotonic()
    base = json.loads(Path(cfg.base_manifest).read_text())
    if int(base["feature_spec_version"]) != FEATURE_SPEC_VERSION:
        raise ValueError(
            f"base model {cfg.base_manifest} has feature spec "
            f"{base['feature_spec_version']}, this code computes "
            f"{FEATURE_SPEC_VERSION}"
        )
    features = tuple(str(n) for n in base["features"])
    hidden = tuple(int(h) for h in base["architecture"]["layers"][1:-1])
    window_s = int(base["window_s"])
    flows = cicids.load_flows(cfg.dataset_dir)
    sets = [benign_windows(flows, cfg.rate, s, window_s) for s in cfg.seeds()]
    train = _pooled(sets, cicids.TRAIN)
    val = _pooled(sets, cicids.VALIDATION)
    scaler = FeatureScaler.fit(train, features)
    x_train = scaler.transform(train)
    weights = train_autoencoder(
        x_train, hidden, seed=cfg.seed, epochs=cfg.epochs, batch_size=cfg.batch_size
    )
    x_val = scaler.transform(val)
    losses_val = reconstruction_losses(x_val, forward(weights, x_val))
    normaliser = LossNormaliser.fit(losses_val, features)
    thresholds = dict(base["thresholds"])
    if cfg.recalibrate:
        detector = GlobalDetector.from_dict(base["detector"])
        val_scores = detector.score(normaliser.transform(losses_val))
        hyst = base["thresholds"]["hysteresis"]
        th = thresholds_from_budget(
            val_scores, float(base["thresholds"]["budget"]), k=hyst["k"], n=hyst["n"]
        )
        thresholds.update(alert=th.alert, clear=th.clear)
    kind = str(base["kind"])
    suffix = "-cal" if cfg.recalibrate else ""
    name = f"{kind}-{NETWORK}-r{cfg.rate}-w{window_s}{suffix}"
    training: dict[str, Any] = {
        "network": NETWORK,
        "dataset": "CIC-IDS2017, DistriNet 'improved' labels, random per-class "
        "samples (ScubaInstructor/fuh sampled_CICIDS2017_improved_rnd_5000); "
        "see ../shared/datasets/README.md",
        "internal_networks": list(cicids.INTERNAL_NETWORKS),
        "base_model": f"{base['name']}:{base['version']}:{base['sha256'][:12]}",
        "refit": ["scaler", "autoencoder", "loss_normaliser"]
        + (["thresholds"] if cfg.recalibrate else []),
        "copied_from_base": ["detector"] + ([] if cfg.recalibrate else ["thresholds"]),
        "periods": {
            "train": "benign windows of train hours (scaler, auto-encoder)",
            "validation": "benign windows of validation hours (loss statistics"
            + (", thresholds)" if cfg.recalibrate else ")"),
            "test": "benign windows of test hours and every attack window: "
            "metrics only (sampleflow models evaluate)",
            "split": "by UTC hour, Fibonacci hash, 60/20/20 "
            "(cloud.training.cicids.split_of_windows)",
        },
        "sampling_rate": cfg.rate,
        "thinning_seeds": cfg.seeds(),
        "active_timeout_s": 60,
        "direction_split": "CICFlowMeter forward and backward sides as two "
        "records; bytes = payload + transport headers + IP headers",
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "rows": {"train": len(train), "validation": len(val)},
        "command": (
            f"sampleflow models transfer {cfg.base_manifest} --rate {cfg.rate}"
            f" --seed {cfg.seed} --seeds {cfg.n_seeds} --epochs {cfg.epochs}"
            + (" --recalibrate" if cfg.recalibrate else "")
        ),
    }
    body: dict[str, Any] = {
        "feature_spec_version": FEATURE_SPEC_VERSION,
        "features": list(features),
        "window_s": window_s,
        "scaler": scaler.to_dict(),
        "loss_normaliser": normaliser.to_dict(),
        "detector": base["detector"],
        "thresholds": thresholds,
        "training": training,
        "metrics": {
            "train_reconstruction_mse": float(
                ((forward(weights, x_train) - x_train) ** 2).mean()
            ),
            "note": "per-class metrics: sampleflow models evaluate <this manifest>",
        },
    }
    path = export_model(
        Path(cfg.out_dir),
        name,
        kind=kind,
        version=cfg.version,
        weights=weights,
        body=body,
    )
    log.info(
        "model_transferred",
        name=name,
        train_rows=len(train),
        validation_rows=len(val),
        seconds=round(time.monotonic() - t0, 1),
    )
    return path
