"""The relay's scoring filter: score host windows, keep detail where it matters.

:meth:`RelayFilter.process` takes a batch of records (:data:`FLOW_DTYPE`
records, or the relay's aggregated :data:`AGG_DTYPE` rows, whose
``flow_count`` column says how many sampled records each stands for),
computes the host windows (:mod:`edge_agent.features`), scores each with
the loaded TFLite auto-encoder and the manifest's loss statistics and
detector, and returns a :class:`FilterResult`:

* records of host windows scoring at or above the alert threshold keep full
  5-tuple detail and are flagged in ``express_mask``;
* the other records are rolled up (:mod:`edge_agent.filter.rollup`), with
  ``flow_count`` saying how many sampled records each stands for;
* ``row_scores`` gives each output record the score of its host window
  (the higher of its source's and destination's; NaN when neither end is
  an internal host).

The filter never loses data: with no model, a model that failed to load, a
feature spec mismatch, an interpreter error or non-finite model output, the
batch passes through unfiltered (no roll-up, nothing flagged), the reason is
in ``FilterResult.passthrough_reason`` and counted in
:attr:`RelayFilter.counters`.  :meth:`RelayFilter.swap_model` replaces the
model at run time; a batch in flight finishes with the model it started on.

A batch is scored on the windows it holds, so a batch shorter than the
model's window (``window_s`` in the manifest, 300 s for the shipped model)
gives partial windows that look quieter than those the model was trained
on.  With ``history_rows`` > 0 the filter keeps a bounded
:class:`~edge_agent.filter.history.ScoringHistory` and scores every batch
on its host windows so far (what the relay does; its batches are 10 s
aggregation windows).  Known shortcoming: without a history, feed batches
aligned to the model window.
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

from edge_agent.aggregate import AGG_DTYPE
from edge_agent.features import (
    FeatureSpecError,
    HostWindows,
    InternalNetworks,
    address_halves,
    host_window_features,
)
from edge_agent.features.scoring import reconstruction_losses
from edge_agent.filter.history import ScoringHistory
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
    rest, in the input's dtype.  ``express_mask``: per output record, True
    for full detail of a flagged host window.  ``flow_count``: sampled
    records each output record stands for.  ``model_version`` is None when
    passing through.  ``host_scores``: the host windows the batch's records
    belong to.  ``row_scores``: float32 per output record (see the module
    doc); None when passing through.
    """

    records: np.ndarray
    host_scores: np.ndarray
    model_version: str | None
    express_mask: np.ndarray
    flow_count: np.ndarray
    passthrough_reason: str | None = None
    row_scores: np.ndarray | None = None


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
    #: times the scoring history hit its bound and restarted from one batch
    history_restarts: int = 0


class RelayFilter:
    """Scores batches with a swappable model; see the module doc.

    ``internal_networks``: CIDRs of this network's hosts.
    ``manifest_path``: the model to load at start (None: run without one).
    ``alert_threshold``: a detector score in [0, 1] that replaces the
    model's own alert threshold (None: the manifest's).
    ``history_rows``: bound on the scoring history (0: none, every batch
    is scored on its own; see the module doc).
    """

    def __init__(
        self,
        internal_networks: Sequence[str],
        manifest_path: Path | str | None = None,
        *,
        alert_threshold: float | None = None,
        history_rows: int = 0,
    ) -> None:
        if alert_threshold is not None and not 0.0 <= alert_threshold <= 1.0:
            raise ValueError(
                f"alert_threshold must be in [0, 1], got {alert_threshold}"
            )
        if history_rows < 0:
            raise ValueError(f"history_rows must be >= 0, got {history_rows}")
        self.networks = InternalNetworks.parse(internal_networks)
        self.alert_threshold = alert_threshold
        self.history_rows = history_rows
        self.counters = FilterCounters()
        self._swap_lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._load_error: str | None = None
        self._last_reason: str | None = None
        self._history: ScoringHistory | None = None
        self._recent: HostWindows | None = None
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

    def recent_windows(self) -> HostWindows | None:
        """The host windows the last scored batch was scored on (None before
        any): recent real feature rows, e.g. for a model canary."""
        return self._recent

    def process(self, records: np.ndarray) -> FilterResult:
        """Filter one batch of FLOW_DTYPE records or AGG_DTYPE rows (see the
        module doc); raises TypeError for another dtype."""
        if records.dtype == AGG_DTYPE:
            counts = records["flow_count"].astype(np.int64)
        elif records.dtype == FLOW_DTYPE:
            counts = np.ones(records.size, dtype=np.int64)
        else:
            raise TypeError(
                f"the filter takes FLOW_DTYPE records or AGG_DTYPE rows, "
                f"got {records.dtype}"
            )
        model = self._model  # one model for the whole batch
        self.counters.batches += 1
        self.counters.records_in += records.size
        if model is None:
            reason = (
                "model_load_failed" if self._load_error is not None else "model_missing"
            )
            return self._passthrough(records, counts, reason)
        # AGG rows carry their flow_count column; FLOW records count 1 each.
        source = records
        if self.history_rows:
            source = self._remember(records, counts, model.window_s)
        windows = host_window_features(source, self.networks, model.window_s)
        try:
            x = model.scaler.transform(windows)
        except FeatureSpecError:
            return self._passthrough(records, counts, "spec_mismatch")
        try:
            x_hat = model.reconstruct(x)
        except Exception as exc:  # the interpreter raises plain RuntimeError
            log.warning("model_inference_failed", error=str(exc))
            return self._passthrough(records, counts, "inference_error")
        if not np.all(np.isfinite(x_hat)):
            return self._passthrough(records, counts, "non_finite_output")
        self._recent = windows
        z = model.normaliser.transform(reconstruction_losses(x, x_hat))
        score = model.detector.score(z)
        alert = (
            self.alert_threshold
            if self.alert_threshold is not None
            else model.thresholds.alert
        )
        express_rows = score >= alert
        scores = np.zeros(len(windows), dtype=HOST_SCORE_DTYPE)
        scores["host"] = windows.host
        scores["window_start_ms"] = windows.window_start_ms
        scores["score"] = score
        scores["threat_class"] = np.where(express_rows, model.detector.classify(z), 0)
        scores["express"] = express_rows
        lookup = _WindowLookup(scores, model.window_s)
        express, touched = lookup.express(records)
        scores = scores[touched]
        kept = records[express]
        rolled, rolled_count = rollup(
            records[~express], model.window_s, counts[~express]
        )
        out = np.concatenate([kept, rolled])
        mask = np.zeros(out.size, dtype=bool)
        mask[: kept.size] = True
        flow_count = np.concatenate([counts[express], rolled_count])
        c = self.counters
        c.records_out += out.size
        c.records_express += kept.size
        c.host_windows_scored += len(scores)
        c.host_windows_express += int(scores["express"].sum())
        if self._last_reason is not None:
            log.info("filter_resumed", version=model.version)
            self._last_reason = None
        return FilterResult(
            records=out,
            host_scores=scores,
            model_version=model.version,
            express_mask=mask,
            flow_count=flow_count,
            row_scores=lookup.row_scores(out),
        )

    def _remember(
        self, records: np.ndarray, counts: np.ndarray, window_s: int
    ) -> np.ndarray:
        """Add the batch to the scoring history; the rows to score on."""
        history = self._history
        if history is None or history.window_s != window_s:
            # A model with another window length starts a fresh history.
            history = self._history = ScoringHistory(
                self.networks, window_s, self.history_rows
            )
        restarts = history.restarts
        rows = history.add(records, counts)
        if history.restarts != restarts:
            self.counters.history_restarts += 1
            log.warning(
                "filter_history_full", max_rows=self.history_rows, window_s=window_s
            )
        return rows

    def _passthrough(
        self, records: np.ndarray, counts: np.ndarray, reason: str
    ) -> FilterResult:
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
            flow_count=counts,
            passthrough_reason=reason,
        )


_KEY_DTYPE = np.dtype([("w", "<i8"), ("hi", "<u8"), ("lo", "<u8")])


class _WindowLookup:
    """Finds each record's source and destination host window in a table
    of scored host windows (one sort of all keys, no per-record Python)."""

    def __init__(self, scores: np.ndarray, window_s: int) -> None:
        self.scores = scores
        self.window_ms = window_s * 1000
        hi, lo = address_halves(scores["host"])
        self.keys = np.zeros(scores.size, _KEY_DTYPE)
        self.keys["w"], self.keys["hi"], self.keys["lo"] = (
            scores["window_start_ms"],
            hi,
            lo,
        )

    def _find(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index into the table of each record's (source, destination)
        window; -1 where that end has none (not an internal host)."""
        n = records.size
        win = records["time_start"] // self.window_ms * self.window_ms
        ends = np.zeros(2 * n, _KEY_DTYPE)
        for i, column in enumerate(("src_addr", "dst_addr")):
            hi, lo = address_halves(records[column])
            part = ends[i * n : (i + 1) * n]
            part["w"], part["hi"], part["lo"] = win, hi, lo
        m = self.keys.size
        uniq, inverse = np.unique(
            np.concatenate([self.keys, ends]), return_inverse=True
        )
        inverse = inverse.reshape(-1)
        table = np.full(uniq.size, -1, dtype=np.int64)
        table[inverse[:m]] = np.arange(m)
        found = table[inverse[m:]]
        return found[:n], found[n:]

    def express(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(records of a flagged host window, table rows the records touch)."""
        src, dst = self._find(records)
        flagged = np.append(self.scores["express"], False)  # index -1: none
        touched = np.zeros(self.keys.size + 1, dtype=bool)
        touched[src] = True
        touched[dst] = True
        return flagged[src] | flagged[dst], touched[:-1]

    def row_scores(self, records: np.ndarray) -> np.ndarray:
        """The higher score of each record's two host windows (NaN: none)."""
        src, dst = self._find(records)
        score = np.append(self.scores["score"].astype(np.float32), np.nan)
        with np.errstate(invalid="ignore"):
            return np.fmax(score[src], score[dst]).astype(np.float32)
