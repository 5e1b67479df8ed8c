"""Evaluating a shipped model on CTU-13 replayed at any sampling rate.

Runs the model's ``.tflite`` through the relay's own loader (LiteRT), so the
numbers are those of the artifact, not of the Keras model it came from.
Only the test period (slices 20-25, never used in training) is scored, with
thinning seeds other than the training ones (default 1000, 1001, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cloud.training import ctu13
from cloud.training.dataset import TEST, build_windows
from cloud.training.detector import Thresholds
from cloud.training.train import as_host_windows, period_rows, window_metrics
from edge_agent.features.scoring import reconstruction_losses
from edge_agent.filter.model import load_model


def evaluate_manifest(
    manifest_path: Path,
    *,
    rate: int | None = None,
    seed: int = 1000,
    n_seeds: int = 4,
    dataset_dir: Path | None = None,
) -> dict[str, Any]:
    """Metrics of one model on the test period at 1:``rate`` (default: the
    rate it was trained at)."""
    model = load_model(manifest_path)
    trained_rate = int(model.manifest["training"]["sampling_rate"])
    rate = trained_rate if rate is None else rate
    seeds = [seed] if rate == 1 else [seed + i for i in range(n_seeds)]
    flows = ctu13.load_flows(dataset_dir)
    sets = [build_windows(flows, rate, s, model.window_s) for s in seeds]
    rows = period_rows(sets, TEST)
    x = model.scaler.transform(as_host_windows(rows, sets))
    x_hat = model.reconstruct(x)
    if not np.all(np.isfinite(x_hat)):
        raise ValueError(f"model {model.name} gave non-finite output")
    losses = reconstruction_losses(x, x_hat)
    z = model.normaliser.transform(losses)
    score = model.detector.score(z)
    th = model.thresholds
    thresholds = Thresholds(
        alert=th.alert, clear=th.clear, budget=float("nan"), k=th.k, n=th.n
    )
    return {
        "model": model.version,
        "trained_rate": trained_rate,
        "rate": rate,
        "window_s": model.window_s,
        "seeds": seeds,
        "test": window_metrics(rows, score, z, losses, thresholds),
    }
