"""The relay's scoring filter: score host windows, keep detail where it matters.

:meth:`RelayFilter.process` takes a batch of records, computes the host
windows (:mod:`edge_agent.features`), scores each with the loaded TFLite
auto-encoder and the manifest's loss statistics and detector, and returns a
:class:`FilterResult`:

* records of host windows scoring at or above the alert threshold keep full
  5-tuple detail and are flagged in ``express_mask``;
* the other records are rolled up (:mod:`edge_agent.filter.rollup`), with
  ``flow_count`` saying how many sampled records each stands for.

The filter never loses data: with no model, a model that failed to load, a
feature spec mismatch, an interpreter error or non-finite model output, the
batch passes through unfiltered (no roll-up, nothing flagged), the reason is
in ``FilterResult.passthrough_reason`` and counted in
:attr:`RelayFilter.counters`.  :meth:`RelayFilter.swap_model` replaces the
model at run time; a batch in flight finishes with the model it started on.

Known shortcoming: a batch is scored on the windows it holds; a batch
shorter than the model's window (``window_s`` in the manifest, 300 s for the
shipped model) gives partial windows that look quieter than those the model
was trained on.  Feed batches aligned to the model window.
:meth:`RelayFilter.process` is meant to be called from one thread; model
swaps may come from any thread.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from edge_agent.features import (
    FeatureSpecError,
    InternalNetworks,
    address_halves,
    host_window_features,
)
from edge_agent.features.scoring import reconstruction_losses
from edge_agent.filter.model import LoadedModel, ModelLoadError, load_model
from edge_agent.filter.rollup import rollup
from edge_agent.flows.schema import FLOW_DTYPE

log = structlog.get_logger(__name__)

#: One scored host window.
HOST_SCORE_DTYPE = np.dtype(
    [
        ("host", "V16"),
        ("window_start_ms", "<i8"),
        ("score", "<f4"),  # detector score in [0, 1]
        ("threat_class", "u1"),  # index into scoring.THREAT_CLASSES
        ("express", "?"),  # score >= the alert threshold
    ]
)


@dataclass(frozen=True)
class FilterResult:
    """What the filter hands on for one batch.

    ``records``: express records first (input order), then the rolled-up
    rest.  ``express_mask``: per output record, True for full detail of a
    flagged host window.  ``flow_count``: sampled records each output record
    stands for.  ``model_version`` is None when passing through.
    """

    records: np.ndarray
    host_scores: np.ndarray
    model_version: str | None
    express_mask: np.ndarray
    flow_count: np.ndarray
    passthrough_reason: str | None = None


@dataclass
class FilterCounters:
    """Everything the filter did; read by the relay's metrics."""

    batches: int = 0
    records_in: int = 0
    records_out: int = 0
    records_express: int = 0
    host_windows_scored: int = 0
    host_windows_express: int = 0
    #: batches passed through unfiltered, by reason (model_missing,
    #: model_load_failed, spec_mismatch, inference_error, non_finite_output)
    passthrough_batches: collections.Counter[str] = field(
        default_factory=collections.Counter
    )
    passthrough_records: int = 0
    model_loads: int = 0
    #: failed loads by ModelLoadError reason
    model_load_failures: collections.Counter[str] = field(
        default_factory=collections.Counter
    )


class RelayFilter:
    """Scores batches with a swappable model; see the module doc.

    ``internal_networks``: CIDRs of this network's hosts.
    ``manifest_path``: the model to load at start (None: run without one).
    """

    def __init__(
        self,
        internal_networks: Sequence[str],
        manifest_path: Path | str | None = None,
    ) -> None:
        self.networks = InternalNetworks.parse(internal_networks)
        self.counters = FilterCounters()
        self._swap_lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._load_error: str | None = None
        self._last_reason: str | None = None
        if manifest_path is not None:
            self.swap_model(manifest_path)

    @property
    def model(self) -> LoadedModel | None:
        """The model in use (None: passing through)."""
        return self._model

    def swap_model(self, manifest_path: Path | str) -> bool:
        """Load a model and make it current; returns False if it failed.

        A failed load keeps the current model (if any) and is counted.
        """
        try:
            model = load_model(manifest_path)
        except ModelLoadError as exc:
            with self._swap_lock:
                self.counters.model_load_failures[exc.reason] += 1
                if self._model is None:
                    self._load_error = exc.reason
            log.warning("model_load_failed", reason=exc.reason, error=str(exc))
            return False
        with self._swap_lock:
            self._model = model
            self._load_error = None
            self.counters.model_loads += 1
        log.info("model_loaded", version=model.version)
        return True

    def process(self, records: np.ndarray) -> FilterResult:
        """Filter one batch of :data:`FLOW_DTYPE` records (see module doc)."""
        if records.dtype != FLOW_DTYPE:
            raise TypeError(f"the filter takes FLOW_DTYPE records, got {records.dtype}")
        model = self._model  # one model for the whole batch
        self.counters.batches += 1
        self.counters.records_in += records.size
        if model is None:
            reason = (
                "model_load_failed" if self._load_error is not None else "model_missing"
            )
            return self._passthrough(records, reason)
        windows = host_window_features(records, self.networks, model.window_s)
        try:
            x = model.scaler.transform(windows)
        except FeatureSpecError:
            return self._passthrough(records, "spec_mismatch")
        try:
            x_hat = model.reconstruct(x)
        except Exception as exc:  # the interpreter raises plain RuntimeError
            log.warning("model_inference_failed", error=str(exc))
            return self._passthrough(records, "inference_error")
        if not np.all(np.isfinite(x_hat)):
            return self._passthrough(records, "non_finite_output")
        z = model.normaliser.transform(reconstruction_losses(x, x_hat))
        score = model.detector.score(z)
        express_rows = score >= model.thresholds.alert
        scores = np.zeros(len(windows), dtype=HOST_SCORE_DTYPE)
        scores["host"] = windows.host
        scores["window_start_ms"] = windows.window_start_ms
        scores["score"] = score
        scores["threat_class"] = np.where(express_rows, model.detector.classify(z), 0)
        scores["express"] = express_rows
        express = self._express_records(records, scores[express_rows], model.window_s)
        kept = records[express]
        rolled, rolled_count = rollup(records[~express], model.window_s)
        out = np.concatenate([kept, rolled])
        mask = np.zeros(out.size, dtype=bool)
        mask[: kept.size] = True
        flow_count = np.concatenate([np.ones(kept.size, np.int64), rolled_count])
        c = self.counters
        c.records_out += out.size
        c.records_express += kept.size
        c.host_windows_scored += len(windows)
        c.host_windows_express += int(express_rows.sum())
        if self._last_reason is not None:
            log.info("filter_resumed", version=model.version)
            self._last_reason = None
        return FilterResult(
            records=out,
            host_scores=scores,
            model_version=model.version,
            express_mask=mask,
            flow_count=flow_count,
        )

    def _express_records(
        self, records: np.ndarray, flagged: np.ndarray, window_s: int
    ) -> np.ndarray:
        """Records whose source or destination is a flagged host window."""
        if flagged.size == 0:
            return np.zeros(records.size, dtype=bool)
        key_dtype = np.dtype([("w", "<i8"), ("hi", "<u8"), ("lo", "<u8")])
        fhi, flo = address_halves(flagged["host"])
        fkey = np.zeros(flagged.size, key_dtype)
        fkey["w"], fkey["hi"], fkey["lo"] = flagged["window_start_ms"], fhi, flo
        window_ms = window_s * 1000
        win = records["time_start"] // window_ms * window_ms
        hit = np.zeros(records.size, dtype=bool)
        for column in ("src_addr", "dst_addr"):
            hi, lo = address_halves(records[column])
            key = np.zeros(records.size, key_dtype)
            key["w"], key["hi"], key["lo"] = win, hi, lo
            hit |= np.isin(key, fkey)
        return hit

    def _passthrough(self, records: np.ndarray, reason: str) -> FilterResult:
        c = self.counters
        c.passthrough_batches[reason] += 1
        c.passthrough_records += records.size
        c.records_out += records.size
        if reason != self._last_reason:
            # Once per change of state, not per batch.
            log.warning("filter_passthrough", reason=reason)
            self._last_reason = reason
        return FilterResult(
            records=records,
            host_scores=np.zeros(0, dtype=HOST_SCORE_DTYPE),
            model_version=None,
            express_mask=np.zeros(records.size, dtype=bool),
            flow_count=np.ones(records.size, dtype=np.int64),
            passthrough_reason=reason,
        )
