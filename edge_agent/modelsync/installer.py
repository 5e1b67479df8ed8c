"""The :class:`ModelInstaller` seam to the relay's filter, and the canary.

The jobs agent does not score flows; the relay's filter
(:class:`edge_agent.filter.RelayFilter`) does.  The agent talks to it
through :class:`ModelInstaller`:

* ``validate_and_canary(model_path, manifest)`` loads the file in a *fresh*
  interpreter (never the running one) and runs it on recent real feature
  rows; it raises :class:`ModelRejectedError` with the reason and leaves
  the running model alone;
* ``swap(model_path, manifest)`` makes the installed model the one that
  scores.  The filter reads its model reference once per batch, so a batch
  in flight finishes with the model it started on and none is dropped.

``model_path`` sits next to its ``manifest.json`` (the layout of
:mod:`.store`, in tmp/ and in versions/ alike).  :class:`FilterInstaller`
implements the protocol over a :class:`RelayFilter`; the filter's own
:func:`~edge_agent.filter.load_model` does the load-time checks (format,
SHA-256, feature spec version, interpreter input signature).

Canary checks on the freshly loaded model, after those (reason codes
from :mod:`.errors`):

1. ``spec_mismatch``: the recent rows were computed with another feature
   spec version than the model's;
2. ``no_canary_rows``: fewer than ``min_rows`` recent rows;
3. ``non_finite_output``: a NaN/inf reconstruction or score;
4. ``score_out_of_range``: a score outside [0, 1];
5. ``canary_alert_share``: more than ``max_alert_share`` of the recent rows
   score at or above the manifest's alert threshold.  Recent traffic is
   mostly normal and models are tuned to alert on about 0.1% of normal
   windows, so a model that flags a large share is broken, not insightful.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog

from edge_agent.features.extract import FeatureSpecError, HostWindows
from edge_agent.features.scoring import reconstruction_losses
from edge_agent.filter import LoadedModel, ModelLoadError, RelayFilter, load_model
from edge_agent.modelsync.config import ModelSyncConfig
from edge_agent.modelsync.errors import (
    BAD_MANIFEST,
    CANARY_ALERT_SHARE,
    INPUT_MISMATCH,
    LOAD_FAILED,
    NO_CANARY_ROWS,
    NON_FINITE_OUTPUT,
    SCORE_OUT_OF_RANGE,
    SHA256_MISMATCH,
    SPEC_MISMATCH,
    ModelRejectedError,
)
from edge_agent.modelsync.store import MANIFEST_FILE

log = structlog.get_logger(__name__)

#: The filter's load-failure reasons mapped to this package's.
_LOAD_REASONS = {
    "missing": BAD_MANIFEST,
    "bad_manifest": BAD_MANIFEST,
    "checksum": SHA256_MISMATCH,
    "spec_version": SPEC_MISMATCH,
    "no_interpreter": LOAD_FAILED,
    "bad_model": LOAD_FAILED,
}


class ModelInstaller(Protocol):
    """What the jobs agent needs from the relay's filter (see module doc)."""

    def validate_and_canary(
        self, model_path: Path, manifest: Mapping[str, Any]
    ) -> None:
        """Load in a fresh interpreter and test; raise ModelRejectedError."""

    def swap(self, model_path: Path, manifest: Mapping[str, Any]) -> None:
        """Make this installed model the one that scores."""


#: Returns the recent real feature rows to run a canary on (or None).
RecentRows = Callable[[], HostWindows | None]


@dataclass(frozen=True)
class CanaryPolicy:
    """Limits of the canary; see the module doc."""

    min_rows: int = 20
    max_rows: int = 5000
    max_alert_share: float = 0.2

    def __post_init__(self) -> None:
        if self.min_rows < 1 or self.max_rows < self.min_rows:
            raise ValueError(
                f"canary needs 1 <= min_rows <= max_rows, got {self.min_rows}, "
                f"{self.max_rows}"
            )
        if not 0.0 < self.max_alert_share <= 1.0:
            raise ValueError(
                f"canary max_alert_share must be in (0, 1], got {self.max_alert_share}"
            )


def load_fresh(model_path: Path) -> LoadedModel:
    """Load the model next to ``manifest.json`` in a new interpreter."""
    try:
        return load_model(model_path.parent / MANIFEST_FILE)
    except ModelLoadError as exc:
        raise ModelRejectedError(
            _LOAD_REASONS.get(exc.reason, LOAD_FAILED), str(exc)
        ) from exc


def canary_scores(model: LoadedModel, rows: HostWindows) -> np.ndarray:
    """Detector scores of ``rows``; raises on spec mismatch or non-finite output."""
    try:
        x = model.scaler.transform(rows)
    except FeatureSpecError as exc:
        raise ModelRejectedError(SPEC_MISMATCH, str(exc)) from exc
    try:
        x_hat = model.reconstruct(x)
    except (RuntimeError, ValueError) as exc:
        raise ModelRejectedError(LOAD_FAILED, f"inference failed: {exc}") from exc
    if x_hat.shape != x.shape:
        raise ModelRejectedError(
            INPUT_MISMATCH, f"model output {x_hat.shape}, expected {x.shape}"
        )
    bad = ~np.isfinite(x_hat).all(axis=1)
    if bad.any():
        raise ModelRejectedError(
            NON_FINITE_OUTPUT,
            f"{int(bad.sum())} of {len(x)} reconstructions are not finite",
        )
    z = model.normaliser.transform(reconstruction_losses(x, x_hat))
    return np.asarray(model.detector.score(z), np.float64)


def run_canary(
    model: LoadedModel, rows: HostWindows | None, policy: CanaryPolicy
) -> float:
    """Checks 1-5 of the module doc; returns the share of rows at alert."""
    n = 0 if rows is None else len(rows)
    if rows is None or n < policy.min_rows:
        raise ModelRejectedError(
            NO_CANARY_ROWS,
            f"{n} recent feature rows, the canary needs {policy.min_rows}",
        )
    if n > policy.max_rows:
        rows = _tail(rows, policy.max_rows)
    scores = canary_scores(model, rows)
    if not np.all(np.isfinite(scores)):
        raise ModelRejectedError(NON_FINITE_OUTPUT, "detector scores are not finite")
    if scores.min() < 0.0 or scores.max() > 1.0:
        raise ModelRejectedError(
            SCORE_OUT_OF_RANGE,
            f"scores span [{scores.min():.4g}, {scores.max():.4g}], not [0, 1]",
        )
    alert = model.thresholds.alert
    share = float((scores >= alert).mean())
    if share > policy.max_alert_share:
        raise ModelRejectedError(
            CANARY_ALERT_SHARE,
            f"{share:.1%} of {len(scores)} recent rows at or above the alert "
            f"threshold {alert:.4g}; the limit is {policy.max_alert_share:.1%}",
        )
    return share


class FilterInstaller:
    """:class:`ModelInstaller` over the relay's :class:`RelayFilter`."""

    def __init__(
        self,
        relay_filter: RelayFilter,
        recent_rows: RecentRows,
        policy: CanaryPolicy | None = None,
    ) -> None:
        self.filter = relay_filter
        self.recent_rows = recent_rows
        self.policy = policy or CanaryPolicy()
        #: the manifest of the model the last :meth:`swap` put in (None before)
        self.running: Mapping[str, Any] | None = None

    def validate_and_canary(
        self, model_path: Path, manifest: Mapping[str, Any]
    ) -> None:
        """Load fresh, run the canary; raises :class:`ModelRejectedError`."""
        model = load_fresh(model_path)
        share = run_canary(model, self.recent_rows(), self.policy)
        log.info("modelsync_canary_passed", version=model.version, alert_share=share)

    def swap(self, model_path: Path, manifest: Mapping[str, Any]) -> None:
        """Have the filter load the installed model and use it."""
        if not self.filter.swap_model(model_path.parent / MANIFEST_FILE):
            raise ModelRejectedError(
                LOAD_FAILED, f"the filter refused {model_path} (see its counters)"
            )
        self.running = manifest


def filter_installer(
    relay_filter: RelayFilter, config: ModelSyncConfig
) -> FilterInstaller:
    """A :class:`FilterInstaller` over ``relay_filter`` whose canary reads
    the rows at ``config.canary_rows_path`` (none set: no rows, so every
    canary refuses with ``no_canary_rows``) with the configured limits."""
    rows_path = config.canary_rows_path

    def recent_rows() -> HostWindows | None:
        return rows_from_npz(rows_path) if rows_path is not None else None

    policy = CanaryPolicy(
        min_rows=config.canary_min_rows, max_alert_share=config.canary_max_alert_share
    )
    return FilterInstaller(relay_filter, recent_rows, policy)


def _tail(rows: HostWindows, n: int) -> HostWindows:
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(
        rows,
        host=rows.host[-n:],
        window_start_ms=rows.window_start_ms[-n:],
        values=rows.values[-n:],
    )


def rows_from_npz(path: Path) -> HostWindows | None:
    """Feature rows saved with ``values``, ``spec_version``, ``window_s`` keys.

    Returns None when the file does not exist (a relay with no rows yet).
    """
    try:
        data = np.load(path)
    except FileNotFoundError:
        return None
    values = np.asarray(data["values"], np.float64)
    n = values.shape[0]
    return HostWindows(
        host=np.zeros(n, dtype="V16"),
        window_start_ms=np.zeros(n, dtype=np.int64),
        values=values,
        window_s=int(data["window_s"]),
        spec_version=int(data["spec_version"]),
        records_in=0,
        records_unknown_rate=0,
        records_external=0,
    )
