"""Scoring pending host windows through the model service; detections out.

Closed feature windows leave their host rows *pending* in the engine store
(:meth:`cloud.engine.store.SqliteStore.close_feature_windows`).  After each
micro-batch :class:`HostWindowScorer` sends the pending rows, per tenant
and oldest first, to the model service (:class:`cloud.scoring_client.
ScoringClient`: chunked HTTP, retries), turns alerting rows into
detections (:func:`cloud.store.detections.detections_from_scores`) and
upserts them; only then are the rows forgotten.

* Service down (:class:`~cloud.scoring_client.ServiceUnavailableError`) or
  detection store down: the rows stay pending, the engine goes on, and
  scoring is tried again after ``retry_after_s`` at the next micro-batch
  (a micro-batch runs only when records arrive).  Pending rows survive a
  restart: they are in the store.
* Rows refused (:class:`~cloud.scoring_client.ScoringRejectedError`, a
  4xx such as an unknown tenant): kept as rejected with the rule, counted,
  never retried: the same rows would be refused again.

Detections are keyed (tenant, host, window, model version), so writing one
again after a crash between the upsert and forgetting the rows changes
nothing.

Hysteresis (:class:`Hysteresis`): a window at or above the alert threshold
becomes a detection only when ``k`` of the host's last ``n`` feature
windows (it included) were, docs/models.md's 2 of 3 by default.  The
windows that alerted are noted in the store, so the count spans
micro-batches and restarts.  Known shortcoming: only the raising rule;
an alert does not stay up until ``n`` windows fall below the clear
threshold (the offline :func:`edge_agent.features.scoring.hysteresis`).
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from cloud.engine.store import ALERT_KEY, HostWindowSet, SqliteStore
from cloud.scoring_client import (
    ScoreResult,
    ScoringRejectedError,
    ServiceUnavailableError,
)
from cloud.store.detections import (
    DetectionStore,
    StoreUnavailableError,
    StoreWriteError,
    detections_from_scores,
    host_texts,
)
from edge_agent.features import FEATURE_NAMES

log = structlog.get_logger(__name__)


class RowScorer(Protocol):
    """What the scorer needs: :class:`cloud.scoring_client.ScoringClient`."""

    def score(
        self,
        tenant: str,
        rows: np.ndarray,
        hosts: Sequence[str] | None = None,
        window_starts_ms: np.ndarray | None = None,
    ) -> ScoreResult: ...


@dataclass(frozen=True)
class Hysteresis:
    """K-of-N alert raising over a host's feature windows ``slide_ms``
    apart (``k`` = ``n`` = 1: every alerting window)."""

    k: int = 2
    n: int = 3
    slide_ms: int = 60_000

    def apply(
        self,
        store: SqliteStore,
        tenant_id: str,
        hosts: np.ndarray,
        window_starts_ms: np.ndarray,
        alert: np.ndarray,
    ) -> np.ndarray:
        """Which rows raise a detection: at or above the threshold
        (``alert``) with ``k`` of the host's last ``n`` windows so.  Notes
        the alerting rows in ``store`` first, so rows of one call count
        for each other and for later calls."""
        alert = np.asarray(alert, dtype=bool)
        if self.k == 1 or not alert.any():
            return alert.copy()
        starts = np.asarray(window_starts_ms, dtype=np.int64)
        idx = np.flatnonzero(alert)
        store.record_alerts(tenant_id, hosts[idx], starts[idx])
        span = (self.n - 1) * self.slide_ms
        seen = store.alert_keys_since(tenant_id, int(starts[idx].min()) - span)
        # One lookup per alerting row and earlier window, on the store's
        # key bytes (host, then the window start as 8 big-endian bytes).
        keys = np.empty(idx.size, dtype=ALERT_KEY)
        keys["host"] = np.ascontiguousarray(hosts, dtype="V16")[idx]
        count = np.zeros(idx.size, dtype=np.int64)
        for j in range(self.n):
            keys["start"] = starts[idx] - j * self.slide_ms
            raw = keys.view(f"V{ALERT_KEY.itemsize}").tolist()
            count += np.fromiter((k in seen for k in raw), bool, idx.size)
        out = np.zeros(alert.shape, dtype=bool)
        out[idx] = count >= self.k
        # Later windows look back at most n - 1 slides from their start.
        store.forget_alerts(tenant_id, int(starts.max()) - span)
        return out


@dataclass
class ScoringRound:
    """What one call of :meth:`HostWindowScorer.score_pending` did."""

    scored: int = 0
    detections: int = 0
    detections_new: int = 0
    rejected: int = 0
    unavailable: bool = False
    skipped: bool = False  # waiting out retry_after_s after a failure
    pending_left: int = 0
    model_versions: dict[str, str] = field(default_factory=dict)  # per tenant


@dataclass
class ScorerCounters:
    """Running totals since start."""

    scored: int = 0
    detections: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    service_unavailable: int = 0
    store_unavailable: int = 0


class HostWindowScorer:
    """Scores pending host windows (see the module doc).

    ``detections`` None keeps detections out of any store (they are still
    counted); ``only_alerts`` False stores every scored window, alerting or
    not.  ``clock`` (monotonic seconds) is for tests.
    """

    def __init__(
        self,
        store: SqliteStore,
        client: RowScorer,
        detections: DetectionStore | None,
        *,
        only_alerts: bool = True,
        retry_after_s: float = 10.0,
        max_rows: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        hysteresis: Hysteresis | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.detections = detections
        self.only_alerts = only_alerts
        self.retry_after_s = retry_after_s
        self.max_rows = max_rows
        self.clock = clock
        self.hysteresis = hysteresis or Hysteresis(k=1, n=1)
        self.counters = ScorerCounters()
        self._retry_at = 0.0
        self._indexes_ready = False

    def score_pending(self) -> ScoringRound:
        """Score what is pending (up to ``max_rows``); never raises for an
        outage of the service or the store."""
        report = ScoringRound()
        if self.clock() < self._retry_at:
            report.skipped = True
            report.pending_left = self.store.count_host_windows()
            return report
        sets = self.store.pending_host_windows(self.max_rows)
        by_tenant: dict[str, list[HostWindowSet]] = collections.defaultdict(list)
        for hw in sets:
            by_tenant[hw.tenant_id].append(hw)
        for tenant, group in sorted(by_tenant.items()):
            if not self._score_tenant(tenant, group, report):
                self._retry_at = self.clock() + self.retry_after_s
                break
        report.pending_left = self.store.count_host_windows()
        return report

    def _score_tenant(
        self, tenant: str, sets: list[HostWindowSet], report: ScoringRound
    ) -> bool:
        """Score one tenant's windows; False when the service or store is down."""
        x = np.concatenate([hw.features for hw in sets])
        hosts = np.concatenate([hw.hosts for hw in sets])
        starts = np.concatenate(
            [np.full(len(hw), hw.window_start_ms, dtype=np.int64) for hw in sets]
        )
        ends = np.concatenate(
            [np.full(len(hw), hw.window_end_ms, dtype=np.int64) for hw in sets]
        )
        n = int(x.shape[0])
        try:
            result = self.client.score(tenant, x)
        except ServiceUnavailableError as exc:
            self.counters.service_unavailable += 1
            report.unavailable = True
            log.warning(
                "scoring_deferred",
                tenant=tenant,
                rows=n,
                status=exc.status,
                error=str(exc),
                retry_after_s=self.retry_after_s,
            )
            return False
        except ScoringRejectedError as exc:
            self.counters.rejected[exc.rule] += n
            report.rejected += n
            log.warning("scoring_rejected", tenant=tenant, rows=n, rule=exc.rule)
            self.store.finish_host_windows(sets, rule=exc.rule)
            return True
        alert = self.hysteresis.apply(self.store, tenant, hosts, starts, result.alert)
        # Only the rows kept become documents: format their hosts alone.
        keep = np.flatnonzero(alert) if self.only_alerts else np.arange(n)
        found = detections_from_scores(
            tenant_id=tenant,
            hosts=host_texts(hosts[keep]),
            window_start_ms=starts[keep],
            window_end_ms=ends[keep],
            feature_names=FEATURE_NAMES,
            feature_values=x[keep],
            scores=result.scores[keep],
            threat_classes=[result.classes[i] for i in keep.tolist()],
            alerts=alert[keep],
            loss_names=result.loss_names,
            losses=np.nan_to_num(result.losses[keep], nan=-np.inf),
            model_versions=[result.model_versions[i] for i in keep.tolist()],
            detected_at=dt.datetime.now(dt.UTC),
            only_alerts=self.only_alerts,
        )
        if self.detections is not None and found:
            try:
                self._ensure_indexes()
                counts = self.detections.upsert_detections(found)
            except (StoreUnavailableError, StoreWriteError) as exc:
                self.counters.store_unavailable += 1
                report.unavailable = True
                log.warning(
                    "detections_deferred", tenant=tenant, rows=n, error=str(exc)
                )
                return False
            report.detections_new += counts.upserted
        self.store.finish_host_windows(sets)
        report.scored += n
        report.detections += len(found)
        report.model_versions[tenant] = result.model_versions[-1]
        self.counters.scored += n
        self.counters.detections += len(found)
        return True

    def _ensure_indexes(self) -> None:
        if not self._indexes_ready and self.detections is not None:
            self.detections.ensure_indexes()
            self._indexes_ready = True

    def figures(self) -> dict[str, Any]:
        """Counters for the engine's report."""
        c = self.counters
        return {
            "scored": c.scored,
            "detections": c.detections,
            "rejected": sum(c.rejected.values()),
            "service_unavailable": c.service_unavailable,
            "store_unavailable": c.store_unavailable,
        }
