"""Reading the stream as a consumer, and scoring host windows from it.

:class:`StreamReader` reads the relay batches off a Kinesis stream
(``GetRecords`` per shard from an iterator taken when it opens) and
decodes them with the wire format's own reader; it counts what it saw:
batches, bytes, rows, flows, and undecodable records by error class.

:class:`WindowScorer` turns the flow rows of those batches into host-window
feature rows (:func:`edge_agent.features.host_window_features`, the
model's window length), has the model service score them
(``POST /v1/score``), applies the alert hysteresis of docs/models.md (an
alert is raised when ``k`` of the last ``n`` windows scored at least the
alert threshold, cleared after ``n`` windows in a row below the clear
threshold) and writes the alerting windows to the detection store.

This is the demo's stand-in for the engine's scoring step: the engine has
a seam for it (``flow_consumers``) but does not score yet.  Detections are
keyed as the store keys them (tenant, host, window, model version), so
the engine writing the same detections later changes nothing.

A window is scored once the batches read so far reach ``lateness_ms``
past its end (in flow end time), or at :meth:`WindowScorer.finish`.
Batches arrive in the order the relay shipped them, and the relay ships
records in the order their flows ended, so every flow that starts in a
window has been read once a flow ending one active timeout after the
window's end has.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from edge_agent.features import FEATURE_NAMES, FEATURE_SPEC_VERSION
from edge_agent.features import host_window_features as features_of
from edge_agent.features.scoring import hysteresis
from edge_agent.flows.schema import address_text
from edge_agent.wire import DecodedBatch, WireFormatError, decode_batch

log = structlog.get_logger(__name__)

#: Columns kept from each batch for scoring.
SCORING_COLUMNS = (
    "exporter",
    "time_start",
    "time_end",
    "src_addr",
    "dst_addr",
    "dst_port",
    "protocol",
    "tcp_flags",
    "bytes",
    "packets",
    "sampling_rate",
    "flow_count",
)


class ScoringError(RuntimeError):
    """The model service refused or failed a request (message says why)."""


@dataclass
class ReaderStats:
    """What a :class:`StreamReader` read."""

    records: int = 0  # Kinesis records (relay batches)
    bytes: int = 0  # their data bytes
    rows: int = 0  # aggregated rows in them
    flows: int = 0  # flow records those rows stand for (sum of flow_count)
    #: undecodable records by error class
    invalid: collections.Counter[str] = field(default_factory=collections.Counter)


class StreamReader:
    """Read and decode every relay batch put on a stream after :meth:`open`.

    Not thread-safe; one thread polls.
    """

    def __init__(self, client: Any, stream_name: str) -> None:
        self.client = client
        self.stream_name = stream_name
        self.stats = ReaderStats()
        self._iterators: dict[str, str | None] = {}

    def open(self, position: str = "LATEST") -> None:
        """Take one iterator per shard (``LATEST``: only what comes next)."""
        shards = self.client.list_shards(StreamName=self.stream_name)["Shards"]
        for shard in shards:
            self._iterators[shard["ShardId"]] = self.client.get_shard_iterator(
                StreamName=self.stream_name,
                ShardId=shard["ShardId"],
                ShardIteratorType=position,
            )["ShardIterator"]

    def poll(self) -> list[tuple[DecodedBatch, int]]:
        """One ``GetRecords`` per shard; (batch, its data bytes) in order."""
        out: list[tuple[DecodedBatch, int]] = []
        for shard_id, iterator in list(self._iterators.items()):
            if iterator is None:
                continue
            page = self.client.get_records(ShardIterator=iterator, Limit=10000)
            self._iterators[shard_id] = page.get("NextShardIterator")
            for record in page["Records"]:
                data = bytes(record["Data"])
                self.stats.records += 1
                self.stats.bytes += len(data)
                try:
                    batch = decode_batch(data)
                except WireFormatError as exc:
                    self.stats.invalid[type(exc).__name__] += 1
                    continue
                self.stats.rows += batch.header.record_count
                self.stats.flows += int(
                    batch.columns["flow_count"].sum(dtype=np.uint64)
                )
                out.append((batch, len(data)))
        return out


@dataclass(frozen=True)
class ScoredWindow:
    """The model service's answer for one window's host rows."""

    window_start_ms: int
    hosts: list[str]
    scores: np.ndarray
    alert: np.ndarray
    classes: list[str]
    features: np.ndarray


@dataclass(frozen=True)
class RaisedAlert:
    """A host's alert raised by the hysteresis (times in ms, stream time)."""

    host: str
    window_start_ms: int  # the window that raised it
    window_end_ms: int
    score: float  # that window's score
    threat_class: str
    first_above_ms: int  # start of the first window above the alert threshold


class ModelServiceClient:
    """``POST /v1/score`` over HTTP (JSON), one tenant."""

    def __init__(self, base_url: str, tenant: str, timeout_s: float = 30.0) -> None:
        self.url = base_url.rstrip("/") + "/v1/score"
        self.tenant = tenant
        self.timeout_s = timeout_s

    def score(
        self, rows: np.ndarray, hosts: list[str], starts: list[int]
    ) -> dict[str, Any]:
        """The service's response body for these raw feature rows."""
        body = json.dumps(
            {
                "tenant": self.tenant,
                "spec_version": FEATURE_SPEC_VERSION,
                "rows": rows.tolist(),
                "hosts": hosts,
                "window_starts_ms": starts,
            }
        ).encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                answer: dict[str, Any] = json.loads(resp.read())
                return answer
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise ScoringError(f"{self.url} answered {exc.code}: {detail}") from exc
        except OSError as exc:
            raise ScoringError(f"cannot reach {self.url}: {exc}") from exc


class WindowScorer:
    """Host windows from flow rows, scored, with hysteresis; see module doc.

    ``exporter`` (16 bytes) keeps only rows of that exporter; ``store`` is
    a :class:`cloud.store.detections.DetectionStore` or None.
    """

    def __init__(
        self,
        service: ModelServiceClient,
        internal_networks: Sequence[str],
        window_s: int,
        *,
        exporter: bytes | None = None,
        lateness_ms: int = 65_000,
        store: Any = None,
    ) -> None:
        self.service = service
        self.internal_networks = tuple(internal_networks)
        self.window_s = int(window_s)
        self.window_ms = self.window_s * 1000
        self.exporter = exporter
        self.lateness_ms = lateness_ms
        self.store = store
        self.windows: list[ScoredWindow] = []
        self.alerts: list[RaisedAlert] = []
        self.thresholds: dict[str, Any] = {}
        self.model_version = ""
        self.store_errors = 0
        self._parts: list[dict[str, np.ndarray]] = []
        self._watermark_ms: int | None = None
        self._scored_upto: int | None = None  # windows before this are done

    @property
    def alerting_windows(self) -> int:
        """Host windows scored at or above the alert threshold."""
        return sum(int(w.alert.sum()) for w in self.windows)

    def add(self, batches: Sequence[DecodedBatch]) -> None:
        """Take the rows of ``batches``; score the windows they close."""
        for batch in batches:
            cols = batch.columns
            keep = None
            if self.exporter is not None:
                raw = np.ascontiguousarray(cols["exporter"]).view(np.uint8)
                keep = (
                    raw.reshape(-1, 16) == np.frombuffer(self.exporter, np.uint8)
                ).all(axis=1)
                if not keep.any():
                    continue
            part = {
                name: (cols[name] if keep is None else cols[name][keep])
                for name in SCORING_COLUMNS
            }
            self._parts.append(part)
            latest = int(part["time_end"].max())
            if self._watermark_ms is None or latest > self._watermark_ms:
                self._watermark_ms = latest
        if self._watermark_ms is not None:
            self._score_until(self._watermark_ms - self.lateness_ms)

    def finish(self) -> None:
        """Score every window still open."""
        self._score_until(None)

    def _score_until(self, before_ms: int | None) -> None:
        """Score the buffered windows that end at or before ``before_ms``
        (all of them for None)."""
        if not self._parts:
            return
        cols = {
            name: np.concatenate([p[name] for p in self._parts])
            for name in SCORING_COLUMNS
        }
        window = cols["time_start"] // self.window_ms
        if before_ms is None:
            done = np.ones(window.shape, dtype=bool)
        else:
            done = (window + 1) * self.window_ms <= before_ms
        if not done.any():
            return
        ready = {name: values[done] for name, values in cols.items()}
        rest = {name: values[~done] for name, values in cols.items()}
        self._parts = [rest] if rest["time_start"].size else []
        windows = features_of(ready, self.internal_networks, self.window_s)
        for start in np.unique(windows.window_start_ms).tolist():
            rows = windows.window_start_ms == start
            self._score_window(int(start), windows.host[rows], windows.values[rows])

    def _score_window(
        self, start_ms: int, hosts_v16: np.ndarray, values: np.ndarray
    ) -> None:
        if self._scored_upto is not None and start_ms < self._scored_upto:
            # Rows of a window already scored (a flow that ended later than
            # the lateness allowed): counted, not scored twice.
            log.warning(
                "scorer_late_rows", window_start_ms=start_ms, rows=len(hosts_v16)
            )
            return
        hosts = [address_text(bytes(h)) for h in hosts_v16]
        answer = self.service.score(values, hosts, [start_ms] * len(hosts))
        self.thresholds = answer["thresholds"]
        self.model_version = answer["model_version"]
        scored = ScoredWindow(
            window_start_ms=start_ms,
            hosts=hosts,
            scores=np.asarray(answer["scores"], np.float64),
            alert=np.asarray(answer["alert"], bool),
            classes=list(answer["classes"]),
            features=values,
        )
        self.windows.append(scored)
        self._scored_upto = start_ms + self.window_ms
        self._write_detections(scored, answer)
        self._update_alerts()

    def _write_detections(self, w: ScoredWindow, answer: dict[str, Any]) -> None:
        if self.store is None or not w.alert.any():
            return
        from cloud.store.detections import (  # noqa: PLC0415 - pymongo
            StoreUnavailableError,
            StoreWriteError,
            detections_from_scores,
        )

        n = len(w.hosts)
        detections = detections_from_scores(
            tenant_id=self.service.tenant,
            hosts=w.hosts,
            window_start_ms=np.full(n, w.window_start_ms),
            window_end_ms=np.full(n, w.window_start_ms + self.window_ms),
            feature_names=FEATURE_NAMES,
            feature_values=w.features,
            scores=w.scores,
            threat_classes=w.classes,
            alerts=w.alert,
            loss_names=answer["loss_names"],
            losses=np.asarray(answer["losses"], np.float64),
            model_versions=[answer["model_version"]] * n,
            detected_at=dt.datetime.now(dt.UTC),
        )
        try:
            self.store.upsert_detections(detections)
        except (StoreUnavailableError, StoreWriteError) as exc:
            self.store_errors += 1
            log.warning("scorer_store_failed", error=str(exc))

    def _update_alerts(self) -> None:
        """Recompute the hysteresis over every window scored so far."""
        th = self.thresholds
        k, n = int(th["hysteresis_k"]), int(th["hysteresis_n"])
        first = self.windows[0].window_start_ms
        n_windows = (self.windows[-1].window_start_ms - first) // self.window_ms + 1
        index: dict[str, int] = {}
        for w in self.windows:
            for h in w.hosts:
                index.setdefault(h, len(index))
        above_alert = np.zeros((len(index), n_windows), dtype=bool)
        above_clear = np.zeros_like(above_alert)
        score = np.zeros(above_alert.shape)
        classes: dict[tuple[int, int], str] = {}
        for w in self.windows:
            col = (w.window_start_ms - first) // self.window_ms
            rows = [index[h] for h in w.hosts]
            above_alert[rows, col] = w.scores >= float(th["alert"])
            above_clear[rows, col] = w.scores >= float(th["clear"])
            score[rows, col] = w.scores
            for r, c in zip(rows, w.classes, strict=True):
                classes[(r, col)] = c
        active = hysteresis(above_alert, above_clear, k, n)
        raised = active & ~np.concatenate(
            [np.zeros((active.shape[0], 1), bool), active[:, :-1]], axis=1
        )
        hosts = list(index)
        alerts = []
        for r, c in zip(*np.nonzero(raised), strict=True):
            above = np.flatnonzero(above_alert[r, : c + 1])
            start = first + int(c) * self.window_ms
            alerts.append(
                RaisedAlert(
                    host=hosts[r],
                    window_start_ms=start,
                    window_end_ms=start + self.window_ms,
                    score=float(score[r, c]),
                    threat_class=classes.get((int(r), int(c)), "none"),
                    first_above_ms=first + int(above[0]) * self.window_ms
                    if above.size
                    else start,
                )
            )
        self.alerts = sorted(alerts, key=lambda a: (a.window_start_ms, a.host))
