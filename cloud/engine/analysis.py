"""Per-micro-batch flow analysis on the driver: buckets in, windows out.

:class:`FlowAnalysis` takes each micro-batch's accepted flow rows per
tenant (``PAYLOAD_DTYPE``) and keeps two kinds of buckets in the engine
store, keyed by micro-batch so a replay rewrites the same:

* network buckets (by ``time_end``, the estimate windows' rule):
  flow starts and the address, port and talker tables of
  :mod:`cloud.engine.network`;
* feature buckets (by ``time_start``, the feature windows' rule): the
  compacted rows of :mod:`cloud.engine.hostwindows`.

A bucket all of whose windows are behind the tenant's watermark is late:
its rows are counted (``late_*_rows``) and left out.  Once the watermark
has moved (:meth:`cloud.engine.store.SqliteStore.advance_watermarks`),
:meth:`FlowAnalysis.network_finals` closes the estimate windows' network
statistics and :meth:`FlowAnalysis.close_feature_windows` turns every
feature window now behind the watermark into pending host rows; buckets
no open window needs any more are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from cloud.engine import hostwindows, network
from cloud.engine.config import EngineConfig
from cloud.engine.network import NetworkStats
from cloud.engine.store import Bucket, SqliteStore


@dataclass
class AnalysisReport:
    """What one micro-batch's analysis did (report fields)."""

    late_network_rows: int = 0
    late_feature_rows: int = 0
    feature_windows_closed: int = 0
    host_windows: int = 0
    features_ms: float = 0.0


def _bucket_starts(time_ms: np.ndarray, size_ms: int) -> np.ndarray:
    return (np.asarray(time_ms, dtype=np.int64) // size_ms) * size_ms


def _by_bucket(
    rows: np.ndarray, time_ms: np.ndarray, size_ms: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(bucket start, its rows in their order) for each bucket of ``rows``
    by ``time_ms``, ascending.  Rows in time order (relays write them by
    ``time_end``) are cut into slices; otherwise one mask a bucket, which
    beat a stable sort and a copy for the few buckets of a micro-batch."""
    starts = _bucket_starts(time_ms, size_ms)
    if starts.size == 0:
        return
    if bool((starts[1:] < starts[:-1]).any()):
        for b in np.unique(starts).tolist():
            yield int(b), rows[starts == b]
        return
    edges = np.flatnonzero(starts[1:] != starts[:-1]) + 1
    lo = 0
    for hi in [*edges.tolist(), int(starts.size)]:
        yield int(starts[lo]), rows[lo:hi]
        lo = hi


class FlowAnalysis:
    """See the module doc; ``features`` False skips the feature buckets
    (no model service to score them)."""

    def __init__(
        self, config: EngineConfig, store: SqliteStore, features: bool
    ) -> None:
        self.config = config
        self.store = store
        self.features = features
        self.window_ms = config.window_s * 1000
        self.slide_ms = config.slide_s * 1000
        self.net_bucket_ms = network.bucket_size_ms(config.window_s, config.slide_s)
        self.feature_window_ms = config.feature_window_s * 1000
        self.feature_slide_ms = config.feature_slide_s * 1000
        self.feature_bucket_ms = network.bucket_size_ms(
            config.feature_window_s, config.feature_slide_s
        )

    def add(
        self, micro_batch: int, flows: Mapping[str, np.ndarray], report: AnalysisReport
    ) -> None:
        """Store this micro-batch's buckets (call before the watermarks move)."""
        net: list[Bucket] = []
        feat: list[Bucket] = []
        for tenant, rows in sorted(flows.items()):
            if rows.size == 0:
                continue
            mark = self.store.watermark(tenant)
            net += self._network_buckets(tenant, rows, mark, report)
            if self.features:
                feat += self._feature_buckets(tenant, rows, mark, report)
        if net:
            self.store.put_buckets(network.KIND, micro_batch, net)
        if feat:
            self.store.put_buckets(hostwindows.KIND, micro_batch, feat)

    def _network_buckets(
        self, tenant: str, rows: np.ndarray, mark: int | None, report: AnalysisReport
    ) -> list[Bucket]:
        out = []
        for b, part in _by_bucket(rows, rows["time_end"], self.net_bucket_ms):
            if mark is not None and b + self.window_ms <= mark:
                report.late_network_rows += int(part.size)
                continue
            value, blob = network.bucket_tables(part)
            out.append(Bucket(tenant, int(b), int(part.size), value, blob))
        return out

    def _feature_buckets(
        self, tenant: str, rows: np.ndarray, mark: int | None, report: AnalysisReport
    ) -> list[Bucket]:
        out = []
        for b, part in _by_bucket(rows, rows["time_start"], self.feature_bucket_ms):
            if mark is not None and b + self.feature_window_ms <= mark:
                report.late_feature_rows += int(part.size)
                continue
            compacted = hostwindows.compact(part)
            out.append(
                Bucket(tenant, int(b), int(compacted.size), 0.0, compacted.tobytes())
            )
        return out

    def flow_starts(
        self, keys: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], float]:
        """Estimated flow starts of each (tenant, estimate window start)."""
        return self.store.bucket_values(network.KIND, keys, self.window_ms)

    def network_finals(
        self, closed: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], NetworkStats]:
        """Closing network statistics of estimate windows closed now: per
        tenant, the buckets of all of them read once and each table sorted
        once (:func:`cloud.engine.network.merge_windows`)."""
        by_tenant: dict[str, list[int]] = {}
        for tenant, start in closed:
            by_tenant.setdefault(tenant, []).append(start)
        out: dict[tuple[str, int], NetworkStats] = {}
        for tenant, seen in sorted(by_tenant.items()):
            starts = sorted(set(seen))
            items = self.store.bucket_items(
                network.KIND, tenant, starts[0], starts[-1] + self.window_ms
            )
            merged = network.merge_windows(
                items, starts, self.window_ms, self.config.top_talkers
            )
            out.update(((tenant, start), stats) for start, stats in merged.items())
        return out

    def drop_network_buckets(self, tenants: Iterable[str], micro_batch: int) -> None:
        """Forget network buckets every window of which was closed by an
        earlier micro-batch (a replay of this one may close its own again).

        Windows close in order of their end, so a bucket no later than the
        latest window closed before is in closed windows only."""
        for tenant in tenants:
            start = self.store.closed_before(tenant, micro_batch)
            if start is not None:
                self.store.drop_buckets(network.KIND, tenant, start + 1)

    def close_feature_windows(
        self, micro_batch: int, tenants: Iterable[str], report: AnalysisReport
    ) -> None:
        """Compute and store (pending) the host rows of every feature
        window behind its tenant's watermark; drop spent buckets."""
        if not self.features:
            return
        for tenant in sorted(set(tenants)):
            mark = self.store.watermark(tenant)
            if mark is None:
                continue
            windows = hostwindows.windows_to_close(
                self.store.bucket_starts(hostwindows.KIND, tenant),
                self.store.closed_feature_windows(tenant),
                mark,
                self.feature_window_ms,
                self.feature_slide_ms,
            )
            sets = []
            nets = self.config.networks_for(tenant)
            if windows:
                # The buckets of every window closing now, read and joined
                # once: each window is a slice of them (a bucket is in five
                # windows at the defaults; joining per window copied it five
                # times).
                span = hostwindows.BucketSpan(
                    self.store.bucket_items(
                        hostwindows.KIND,
                        tenant,
                        windows[0],
                        windows[-1] + self.feature_window_ms,
                    )
                )
            for start in windows:
                data = span.rows(start, start + self.feature_window_ms)
                sets.append(
                    hostwindows.window_features(
                        tenant, start, self.config.feature_window_s, data, nets
                    )
                )
            if windows:
                report.host_windows += self.store.close_feature_windows(
                    micro_batch, tenant, windows, sets
                )
                report.feature_windows_closed += len(windows)
            self.store.drop_buckets(
                hostwindows.KIND, tenant, mark - self.feature_window_ms + 1
            )
            self.store.forget_feature_windows(tenant, mark - 2 * self.feature_window_ms)
