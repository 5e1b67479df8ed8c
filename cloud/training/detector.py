"""Fitting the global detector and its thresholds; ranking metrics (numpy).

The detector is a logistic regression on normalised losses (see
:mod:`edge_agent.features.scoring`), fit by full-batch gradient descent
with class-balanced weights, an L2 penalty and weights kept >= 0: a larger
loss may only ever raise the score, which keeps the model explainable and
hard to overfit on few positives.  With no positives it falls back to equal
weights (the mean normalised loss), bias 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.features.scoring import GlobalDetector


def fit_detector(
    z: np.ndarray,
    y: np.ndarray,
    inputs: tuple[str, ...],
    *,
    l2: float = 1e-2,
    iterations: int = 3000,
    learning_rate: float = 0.05,
) -> GlobalDetector:
    """Fit ``sigmoid(z @ w + b)`` to labels ``y`` (0/1); see module doc."""
    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.float64)
    n_pos = float(y.sum())
    if n_pos in (0, y.size):
        return GlobalDetector(inputs, np.full(z.shape[1], 1.0 / z.shape[1]), 0.0)
    # Balanced: each class carries half of the total weight.
    sample_w = np.where(y == 1, 0.5 / n_pos, 0.5 / (y.size - n_pos))
    w = np.zeros(z.shape[1])
    b = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w + b, -50, 50)))
        g = sample_w * (p - y)
        w -= learning_rate * (z.T @ g + l2 * w)
        b -= learning_rate * g.sum()
        np.maximum(w, 0.0, out=w)
    return GlobalDetector(inputs, w, float(b))


@dataclass(frozen=True)
class Thresholds:
    """Alert and clear thresholds on the detector score, with hysteresis."""

    alert: float  # score >= alert counts toward raising
    clear: float  # score < clear counts toward clearing
    budget: float  # share of normal windows allowed above ``alert``
    k: int
    n: int


def thresholds_from_budget(
    normal_scores: np.ndarray,
    budget: float = 0.001,
    clear_quantile: float = 0.99,
    k: int = 2,
    n: int = 3,
) -> Thresholds:
    """``alert`` = the (1 - budget) quantile of normal scores (99.9th at the
    default budget); ``clear`` = the ``clear_quantile`` quantile."""
    if not 0 < budget < 1:
        raise ValueError(f"alert budget must be in (0, 1), got {budget}")
    alert = float(np.quantile(normal_scores, 1.0 - budget))
    clear = min(float(np.quantile(normal_scores, clear_quantile)), alert)
    return Thresholds(alert=alert, clear=clear, budget=budget, k=k, n=n)


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve (step-wise, as in AP).

    ``sum over positives (in descending score order) of precision at that
    rank / number of positives``; ties are broken pessimistically
    (negatives first).  NaN when there is no positive.
    """
    y = np.asarray(y).astype(bool)
    if not y.any():
        return float("nan")
    order = np.lexsort((y, -np.asarray(score)))  # score desc, negatives first
    ys = y[order]
    tp = np.cumsum(ys)
    precision = tp / np.arange(1, ys.size + 1)
    return float(precision[ys].sum() / ys.sum())


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Probability a random positive outscores a random negative (ties 1/2)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size)
    sorted_s = s[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
