"""Validate feature rows and score them with one model, in one batch.

Rows are the engine's raw host-window features: one row per host window,
the columns of :data:`edge_agent.features.FEATURE_NAMES` in that order
(raw units, before ``log1p`` and scaling), float64.  The model's own
scaler picks and scales its features, so the engine needs to know nothing
about the model.  Scoring is the shared code of
:mod:`edge_agent.features.scoring` on the model's reconstruction: per-feature
losses, normalised by the network's loss statistics (``z``), the global
detector's score, and the dominant threat class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.features import FEATURE_NAMES, FEATURE_SPEC_VERSION, HostWindows
from edge_agent.features.scoring import THREAT_CLASSES, reconstruction_losses
from edge_agent.filter.model import LoadedModel

ROW_WIDTH = len(FEATURE_NAMES)


class RowsRejectedError(ValueError):
    """Raised when a request's rows break a rule; ``rule`` names it.

    Rules: ``spec_version`` (rows of another feature spec), ``row_width``
    (a row without exactly :data:`ROW_WIDTH` values), ``non_finite`` (NaN
    or infinity), ``negative`` (a count or share below zero), ``ids_length``
    (host or window ids not one per row), ``too_many_rows``.
    """

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class NonFiniteOutputError(RuntimeError):
    """Raised when a model returns NaN or infinity (a broken model file)."""


@dataclass(frozen=True)
class Scored:
    """Scores of ``n`` rows by one model.

    ``scores``: detector probability in [0, 1]; ``alert``: score >= the
    manifest's alert threshold; ``classes``: index into
    :data:`~edge_agent.features.scoring.THREAT_CLASSES` of the dominant
    group, 0 (``none``) where the row does not alert; ``z``: normalised
    losses, ``(n, len(model features) + 1)``, the last column ``total``.
    """

    scores: np.ndarray
    alert: np.ndarray
    classes: np.ndarray
    z: np.ndarray


def check_rows(rows: list[list[float]], spec_version: int, max_rows: int) -> np.ndarray:
    """Turn request rows into an ``(n, ROW_WIDTH)`` float64 array, or raise
    :class:`RowsRejectedError` naming the rule and the first bad row."""
    if spec_version != FEATURE_SPEC_VERSION:
        raise RowsRejectedError(
            "spec_version",
            f"rows have feature spec version {spec_version}, this service's "
            f"models take spec version {FEATURE_SPEC_VERSION}: compute the "
            f"features with spec {FEATURE_SPEC_VERSION}",
        )
    if len(rows) > max_rows:
        raise RowsRejectedError(
            "too_many_rows",
            f"{len(rows)} rows in one request, at most {max_rows}: split the batch",
        )
    for i, row in enumerate(rows):
        if len(row) != ROW_WIDTH:
            raise RowsRejectedError(
                "row_width",
                f"row {i} has {len(row)} values, every row needs {ROW_WIDTH} "
                f"(the features {', '.join(FEATURE_NAMES)})",
            )
    x = np.array(rows, dtype=np.float64).reshape(len(rows), ROW_WIDTH)
    finite = np.isfinite(x)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise RowsRejectedError(
            "non_finite",
            f"row {i} feature {FEATURE_NAMES[j]} is {x[i, j]}: features must "
            f"be finite numbers ({int((~finite).any(axis=1).sum())} rows affected)",
        )
    negative = x < 0
    if negative.any():
        i, j = np.argwhere(negative)[0]
        raise RowsRejectedError(
            "negative",
            f"row {i} feature {FEATURE_NAMES[j]} is {x[i, j]}: features are "
            "counts, entropies and shares, never below 0",
        )
    return x


def score_rows(model: LoadedModel, x: np.ndarray) -> Scored:
    """Score checked rows (see :func:`check_rows`) in one model pass."""
    n = x.shape[0]
    windows = HostWindows(
        host=np.zeros(n, dtype="V16"),
        window_start_ms=np.zeros(n, dtype=np.int64),
        values=x,
        window_s=model.window_s,
        spec_version=FEATURE_SPEC_VERSION,
        records_in=0,
        records_unknown_rate=0,
        records_external=0,
    )
    scaled = model.scaler.transform(windows)
    x_hat = model.reconstruct(scaled)
    if not np.all(np.isfinite(x_hat)):
        raise NonFiniteOutputError(
            f"model {model.version} returned non-finite output for "
            f"{int((~np.isfinite(x_hat)).any(axis=1).sum())} of {n} rows"
        )
    z = model.normaliser.transform(reconstruction_losses(scaled, x_hat))
    scores = model.detector.score(z)
    alert = scores >= model.thresholds.alert
    classes = np.where(alert, model.detector.classify(z), 0)
    return Scored(scores=scores, alert=alert, classes=classes, z=z)


def class_names(classes: np.ndarray) -> list[str]:
    """Class indices as names (:data:`THREAT_CLASSES`)."""
    names = np.asarray(THREAT_CLASSES, dtype=object)
    return list(names[classes])
