"""The engine's durable state: accepted batch ids, window sums, set-asides.

Exactly-once across restarts rests on one rule: everything a micro-batch
writes is keyed by its Spark batch id, and writing it again (a replayed
micro-batch, after a crash between the sink and the checkpoint's commit)
changes nothing.

* Batch ledger: a relay batch id belongs to the first micro-batch that
  saw it.  Later micro-batches drop it as a duplicate; a replay of that
  same micro-batch accepts it again.
* Window partials: per (tenant, window start, micro-batch) the summed
  estimator statistics; a window's totals are the sum of its partials.
* Tenant watermarks and closed windows: a window is final once its end is
  ``lateness`` behind the latest flow time seen for the tenant; partials
  for a closed window from a later micro-batch are refused (counted late).
* Invalid records: shard, sequence number and error, per micro-batch.
* Buckets: per (kind, tenant, bucket start, micro-batch) an opaque blob
  and a number: the compacted flows of a feature bucket
  (:mod:`cloud.engine.hostwindows`) or the address, port and talker
  tables of a network bucket (:mod:`cloud.engine.network`).  Windows are
  unions of buckets; a bucket is dropped once every window holding it
  is closed.
* Feature windows closed (with the micro-batch that closed them) and the
  host windows they produced, pending until scored: closing a window and
  storing its host rows is one transaction, so a crash cannot lose them
  and a replay cannot make them twice.

:class:`SqliteStore` keeps this in one SQLite file on the driver: right for
local mode and tests; a cluster driver that can move to another host needs
a shared store behind the same :class:`EngineStore` protocol (DynamoDB or
MongoDB, next).  The ledger is pruned by age (``prune``), so a duplicate
older than the horizon would pass again.
"""

from __future__ import annotations

import collections
import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cloud.engine.estimates import STAT_FIELDS


@dataclass(frozen=True)
class BatchClaim:
    """A relay batch seen in a micro-batch (one Kinesis record)."""

    batch_id: str
    tenant_id: str
    relay_id: str
    relay_seq: int
    shard_id: str
    sequence_number: str


@dataclass(frozen=True)
class WindowPartial:
    """Summed statistics of one tenant's window from one micro-batch."""

    tenant_id: str
    window_start_ms: int
    window_end_ms: int
    max_time_ms: int  # latest flow time_end in it
    flows: int
    stats: dict[str, float]


@dataclass(frozen=True)
class WindowTotals:
    """A window's statistics summed over all its partials."""

    tenant_id: str
    window_start_ms: int
    window_end_ms: int
    flows: int
    stats: dict[str, float]
    closed: bool


@dataclass(frozen=True)
class Bucket:
    """One micro-batch's blob for a (kind, tenant, bucket start)."""

    tenant_id: str
    bucket_start_ms: int
    rows: int
    value: float
    data: bytes


@dataclass(frozen=True)
class HostWindowSet:
    """The host rows of one tenant's feature window.

    ``hosts``: ``V16`` addresses (IPv4-mapped for IPv4); ``features``:
    ``(len(hosts), 15)`` float64 raw features in FEATURE_NAMES order.
    """

    tenant_id: str
    window_start_ms: int
    window_end_ms: int
    hosts: np.ndarray
    features: np.ndarray

    def __len__(self) -> int:
        return int(self.hosts.shape[0])


#: A noted alert as :meth:`SqliteStore.alert_keys_since` gives it.
ALERT_KEY = np.dtype([("host", "V16"), ("start", ">i8")])

#: Host window states in ``host_windows``.
HOST_PENDING = 0
HOST_REJECTED = 2


@dataclass(frozen=True)
class InvalidRecord:
    """A Kinesis record set aside because it does not decode."""

    shard_id: str
    sequence_number: str
    error_kind: str
    error: str


class EngineStore(Protocol):
    """What the micro-batch processor needs from durable state."""

    def claim_batches(self, micro_batch: int, claims: Sequence[BatchClaim]) -> set[str]:
        """Return the batch ids of ``claims`` this micro-batch owns."""
        ...

    def add_partials(
        self, micro_batch: int, partials: Sequence[WindowPartial]
    ) -> list[WindowPartial]:
        """Store partials; return those refused because their window closed."""
        ...

    def advance_watermarks(
        self, lateness_ms: int, tenants_max_ms: dict[str, int], micro_batch: int = -1
    ) -> list[tuple[str, int]]:
        """Move tenant watermarks; close windows behind them; return the
        (tenant, window start) pairs closed now, and those ``micro_batch``
        closed in an earlier attempt (a replay)."""
        ...

    def window_totals(self, keys: Iterable[tuple[str, int]]) -> list[WindowTotals]:
        """Totals of the given (tenant, window start) windows."""
        ...

    def set_aside(self, micro_batch: int, records: Sequence[InvalidRecord]) -> None:
        """Keep invalid records for inspection."""
        ...


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    micro_batch INTEGER NOT NULL,
    tenant_id TEXT NOT NULL,
    relay_id TEXT NOT NULL,
    relay_seq INTEGER NOT NULL,
    shard_id TEXT NOT NULL,
    sequence_number TEXT NOT NULL,
    seen_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_seen ON batches (seen_ms);
CREATE TABLE IF NOT EXISTS partials (
    tenant_id TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    micro_batch INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    max_time_ms INTEGER NOT NULL,
    flows INTEGER NOT NULL,
    {", ".join(f"{name} REAL NOT NULL" for name in STAT_FIELDS)},
    PRIMARY KEY (tenant_id, window_start_ms, micro_batch)
);
CREATE TABLE IF NOT EXISTS watermarks (
    tenant_id TEXT PRIMARY KEY,
    watermark_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS closed_windows (
    tenant_id TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    micro_batch INTEGER NOT NULL DEFAULT -1,
    PRIMARY KEY (tenant_id, window_start_ms)
);
CREATE TABLE IF NOT EXISTS buckets (
    kind TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    bucket_start_ms INTEGER NOT NULL,
    micro_batch INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    value REAL NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (kind, tenant_id, bucket_start_ms, micro_batch)
);
CREATE TABLE IF NOT EXISTS feature_windows (
    tenant_id TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    micro_batch INTEGER NOT NULL,
    hosts INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, window_start_ms)
);
CREATE TABLE IF NOT EXISTS host_windows (
    tenant_id TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    micro_batch INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    hosts BLOB NOT NULL,
    features BLOB NOT NULL,
    status INTEGER NOT NULL,
    rule TEXT,
    PRIMARY KEY (tenant_id, window_start_ms)
);
CREATE INDEX IF NOT EXISTS host_windows_status ON host_windows (status);
CREATE TABLE IF NOT EXISTS host_alerts (
    tenant_id TEXT NOT NULL,
    host BLOB NOT NULL,
    window_start_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, host, window_start_ms)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS host_alert_sets (
    tenant_id TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    digest BLOB NOT NULL,
    hosts BLOB NOT NULL,
    PRIMARY KEY (tenant_id, window_start_ms, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS invalid_records (
    micro_batch INTEGER NOT NULL,
    shard_id TEXT NOT NULL,
    sequence_number TEXT NOT NULL,
    error_kind TEXT NOT NULL,
    error TEXT NOT NULL,
    PRIMARY KEY (shard_id, sequence_number)
);
"""


#: Bucket blobs kept in memory as well, at most (bytes).
BLOB_CACHE_BYTES = 256 * 1024 * 1024

_BlobKey = tuple[str, str, int, int]  # kind, tenant, bucket start, micro-batch


class _BlobCache:
    """The bucket blobs this process wrote, newest kept, up to ``limit``
    bytes: a window reads each of its buckets back several times (a 300 s
    feature window every 60 s reads a bucket five times), and reading
    megabytes of blobs from SQLite cost more than computing on them.
    SQLite stays the record; a blob not here is read from it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._blobs: collections.OrderedDict[_BlobKey, bytes] = (
            collections.OrderedDict()
        )

    def put(self, key: _BlobKey, data: bytes) -> None:
        old = self._blobs.pop(key, None)
        if old is not None:
            self.size -= len(old)
        if len(data) > self.limit:
            return
        self._blobs[key] = data
        self.size += len(data)
        while self.size > self.limit:
            _, dropped = self._blobs.popitem(last=False)  # the oldest
            self.size -= len(dropped)

    def get(self, key: _BlobKey) -> bytes | None:
        return self._blobs.get(key)

    def drop(self, which: Callable[[_BlobKey], bool]) -> None:
        for key in [k for k in self._blobs if which(k)]:
            self.size -= len(self._blobs.pop(key))


class SqliteStore:
    """:class:`EngineStore` in one SQLite file (driver-local); bucket blobs
    are also kept in memory up to ``blob_cache_bytes``."""

    def __init__(
        self, path: Path | str, blob_cache_bytes: int = BLOB_CACHE_BYTES
    ) -> None:
        self.path = Path(path)
        self._blobs = _BlobCache(blob_cache_bytes)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Spark calls foreachBatch on a py4j callback thread, not the creator's.
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        # Bucket blobs are megabytes each and deleted a few minutes later:
        # 64 KiB pages (taken only by a new file) make their overflow chains
        # 16 times shorter to write and to free, and deleted pages are not
        # zeroed (Python's SQLite builds enable secure_delete), which cost
        # more than the insert.  Measured on 240 MB of 2 MB blobs inserted
        # and deleted: 1.32 -> 0.53 CPU-s.
        self._db.execute("PRAGMA page_size=65536")
        self._db.execute("PRAGMA secure_delete=OFF")
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous NORMAL: a commit survives a crash of this
        # process, not a power loss of the host (no fsync per commit, which
        # dominated the micro-batch's wall time).  Fewer, larger checkpoints
        # (the fsyncs left) because buckets churn megabytes of blobs.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA wal_autocheckpoint=16384")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(closed_windows)")}
        if "micro_batch" not in columns:  # a state file from before the column
            self._db.execute(
                "ALTER TABLE closed_windows ADD COLUMN micro_batch INTEGER "
                "NOT NULL DEFAULT -1"
            )

    def close(self) -> None:
        self._db.close()

    def claim_batches(self, micro_batch: int, claims: Sequence[BatchClaim]) -> set[str]:
        now = int(time.time() * 1000)
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        c.batch_id,
                        micro_batch,
                        c.tenant_id,
                        c.relay_id,
                        c.relay_seq,
                        c.shard_id,
                        c.sequence_number,
                        now,
                    )
                    for c in claims
                ],
            )
            owned: set[str] = set()
            ids = sorted({c.batch_id for c in claims})
            for lo in range(0, len(ids), 500):
                chunk = ids[lo : lo + 500]
                marks = ",".join("?" * len(chunk))
                owned.update(
                    row[0]
                    for row in self._db.execute(
                        f"SELECT batch_id FROM batches WHERE micro_batch = ? "
                        f"AND batch_id IN ({marks})",
                        (micro_batch, *chunk),
                    )
                )
        return owned

    def add_partials(
        self, micro_batch: int, partials: Sequence[WindowPartial]
    ) -> list[WindowPartial]:
        refused: list[WindowPartial] = []
        columns = ", ".join(STAT_FIELDS)
        marks = ", ".join("?" * (6 + len(STAT_FIELDS)))
        with self._db:
            self._db.execute("BEGIN")
            for p in partials:
                key = (p.tenant_id, p.window_start_ms)
                closed = self._db.execute(
                    "SELECT 1 FROM closed_windows WHERE tenant_id = ? "
                    "AND window_start_ms = ?",
                    key,
                ).fetchone()
                stored = self._db.execute(
                    "SELECT 1 FROM partials WHERE tenant_id = ? "
                    "AND window_start_ms = ? AND micro_batch = ?",
                    (*key, micro_batch),
                ).fetchone()
                if closed and not stored:
                    refused.append(p)
                    continue
                self._db.execute(
                    f"INSERT OR REPLACE INTO partials (tenant_id, window_start_ms, "
                    f"micro_batch, window_end_ms, max_time_ms, flows, {columns}) "
                    f"VALUES ({marks})",
                    (
                        p.tenant_id,
                        p.window_start_ms,
                        micro_batch,
                        p.window_end_ms,
                        p.max_time_ms,
                        p.flows,
                        *(float(p.stats[name]) for name in STAT_FIELDS),
                    ),
                )
        return refused

    def advance_watermarks(
        self, lateness_ms: int, tenants_max_ms: dict[str, int], micro_batch: int = -1
    ) -> list[tuple[str, int]]:
        closed: list[tuple[str, int]] = []
        if micro_batch >= 0:
            # A replay: the windows its first attempt closed, closed again.
            for tenant in sorted(tenants_max_ms):
                closed += [
                    (tenant, int(start))
                    for (start,) in self._db.execute(
                        "SELECT window_start_ms FROM closed_windows WHERE "
                        "tenant_id = ? AND micro_batch = ? ORDER BY window_start_ms",
                        (tenant, micro_batch),
                    )
                ]
        with self._db:
            self._db.execute("BEGIN")
            for tenant, latest in sorted(tenants_max_ms.items()):
                mark = latest - lateness_ms
                self._db.execute(
                    "INSERT INTO watermarks VALUES (?, ?) ON CONFLICT (tenant_id) "
                    "DO UPDATE SET watermark_ms = "
                    "MAX(watermark_ms, excluded.watermark_ms)",
                    (tenant, mark),
                )
                (current,) = self._db.execute(
                    "SELECT watermark_ms FROM watermarks WHERE tenant_id = ?", (tenant,)
                ).fetchone()
                rows = self._db.execute(
                    "SELECT DISTINCT window_start_ms FROM partials p "
                    "WHERE tenant_id = ? AND window_end_ms <= ? AND NOT EXISTS "
                    "(SELECT 1 FROM closed_windows c WHERE c.tenant_id = p.tenant_id "
                    "AND c.window_start_ms = p.window_start_ms)",
                    (tenant, current),
                ).fetchall()
                for (start,) in rows:
                    self._db.execute(
                        "INSERT INTO closed_windows VALUES (?, ?, ?)",
                        (tenant, start, micro_batch),
                    )
                    closed.append((tenant, int(start)))
        return closed

    def closed_before(self, tenant_id: str, micro_batch: int) -> int | None:
        """Start of the tenant's latest window closed by a micro-batch
        before ``micro_batch`` (None: none), for dropping spent buckets
        while keeping what a replay of ``micro_batch`` needs."""
        (start,) = self._db.execute(
            "SELECT MAX(window_start_ms) FROM closed_windows WHERE tenant_id = ? "
            "AND micro_batch < ?",
            (tenant_id, micro_batch),
        ).fetchone()
        return None if start is None else int(start)

    def window_totals(self, keys: Iterable[tuple[str, int]]) -> list[WindowTotals]:
        sums = ", ".join(f"SUM({name})" for name in STAT_FIELDS)
        out: list[WindowTotals] = []
        for tenant, start in sorted(set(keys)):
            row = self._db.execute(
                f"SELECT MAX(window_end_ms), SUM(flows), {sums} FROM partials "
                "WHERE tenant_id = ? AND window_start_ms = ?",
                (tenant, start),
            ).fetchone()
            if row is None or row[0] is None:
                continue
            closed = self._db.execute(
                "SELECT 1 FROM closed_windows WHERE tenant_id = ? "
                "AND window_start_ms = ?",
                (tenant, start),
            ).fetchone()
            out.append(
                WindowTotals(
                    tenant_id=tenant,
                    window_start_ms=start,
                    window_end_ms=int(row[0]),
                    flows=int(row[1]),
                    stats=dict(zip(STAT_FIELDS, map(float, row[2:]), strict=True)),
                    closed=closed is not None,
                )
            )
        return out

    def set_aside(self, micro_batch: int, records: Sequence[InvalidRecord]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO invalid_records VALUES (?, ?, ?, ?, ?)",
                [
                    (micro_batch, r.shard_id, r.sequence_number, r.error_kind, r.error)
                    for r in records
                ],
            )

    def invalid_records(self) -> list[InvalidRecord]:
        """Every record set aside, in (shard, sequence) order."""
        rows = self._db.execute(
            "SELECT shard_id, sequence_number, error_kind, error FROM invalid_records"
        ).fetchall()
        out = [InvalidRecord(*row) for row in rows]
        return sorted(out, key=lambda r: (r.shard_id, int(r.sequence_number)))

    def watermark(self, tenant_id: str) -> int | None:
        """The tenant's watermark (ms), or None before its first flows."""
        row = self._db.execute(
            "SELECT watermark_ms FROM watermarks WHERE tenant_id = ?", (tenant_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def put_buckets(
        self, kind: str, micro_batch: int, buckets: Sequence[Bucket]
    ) -> None:
        """Store this micro-batch's buckets (a replay rewrites the same)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        kind,
                        b.tenant_id,
                        b.bucket_start_ms,
                        micro_batch,
                        b.rows,
                        float(b.value),
                        b.data,
                    )
                    for b in buckets
                ],
            )
        for b in buckets:
            self._blobs.put((kind, b.tenant_id, b.bucket_start_ms, micro_batch), b.data)

    def bucket_data(
        self, kind: str, tenant_id: str, start_ms: int, end_ms: int
    ) -> list[bytes]:
        """Blobs of the tenant's buckets starting in ``[start_ms, end_ms)``."""
        return [
            data for _, data in self.bucket_items(kind, tenant_id, start_ms, end_ms)
        ]

    def bucket_items(
        self, kind: str, tenant_id: str, start_ms: int, end_ms: int
    ) -> list[tuple[int, bytes]]:
        """(bucket start, blob) of the tenant's buckets starting in
        ``[start_ms, end_ms)``, by bucket start, then micro-batch."""
        keys = self._db.execute(
            "SELECT bucket_start_ms, micro_batch FROM buckets WHERE kind = ? AND "
            "tenant_id = ? AND bucket_start_ms >= ? AND bucket_start_ms < ? "
            "ORDER BY bucket_start_ms, micro_batch",
            (kind, tenant_id, start_ms, end_ms),
        ).fetchall()
        out: list[tuple[int, bytes]] = []
        for start, micro_batch in keys:
            key = (kind, tenant_id, int(start), int(micro_batch))
            data = self._blobs.get(key)
            if data is None:  # written before a restart, or pushed out
                (raw,) = self._db.execute(
                    "SELECT data FROM buckets WHERE kind = ? AND tenant_id = ? "
                    "AND bucket_start_ms = ? AND micro_batch = ?",
                    key,
                ).fetchone()
                data = bytes(raw)
            out.append((int(start), data))
        return out

    def bucket_values(
        self, kind: str, keys: Iterable[tuple[str, int]], length_ms: int
    ) -> dict[tuple[str, int], float]:
        """Sum of the bucket values of each (tenant, window start) window
        ``length_ms`` long."""
        out: dict[tuple[str, int], float] = {}
        for tenant, start in set(keys):
            (total,) = self._db.execute(
                "SELECT COALESCE(SUM(value), 0) FROM buckets WHERE kind = ? AND "
                "tenant_id = ? AND bucket_start_ms >= ? AND bucket_start_ms < ?",
                (kind, tenant, start, start + length_ms),
            ).fetchone()
            out[(tenant, start)] = float(total)
        return out

    def bucket_starts(self, kind: str, tenant_id: str) -> list[int]:
        """Distinct bucket starts the tenant has of ``kind``, ascending."""
        rows = self._db.execute(
            "SELECT DISTINCT bucket_start_ms FROM buckets WHERE kind = ? AND "
            "tenant_id = ? ORDER BY bucket_start_ms",
            (kind, tenant_id),
        ).fetchall()
        return [int(r[0]) for r in rows]

    def drop_buckets(self, kind: str, tenant_id: str, before_ms: int) -> int:
        """Forget the tenant's buckets starting before ``before_ms``."""
        with self._db:
            cursor = self._db.execute(
                "DELETE FROM buckets WHERE kind = ? AND tenant_id = ? AND "
                "bucket_start_ms < ?",
                (kind, tenant_id, before_ms),
            )
        self._blobs.drop(
            lambda k: k[0] == kind and k[1] == tenant_id and k[2] < before_ms
        )
        return int(cursor.rowcount)

    def closed_feature_windows(self, tenant_id: str) -> set[int]:
        """Starts of the tenant's feature windows already closed (kept
        until :meth:`forget_feature_windows`)."""
        rows = self._db.execute(
            "SELECT window_start_ms FROM feature_windows WHERE tenant_id = ?",
            (tenant_id,),
        ).fetchall()
        return {int(r[0]) for r in rows}

    def close_feature_windows(
        self,
        micro_batch: int,
        tenant_id: str,
        window_starts: Sequence[int],
        sets: Sequence[HostWindowSet],
    ) -> int:
        """Mark windows closed and store their host rows pending, in one
        transaction; returns the host rows stored."""
        hosts = {s.window_start_ms: len(s) for s in sets}
        stored = 0
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO feature_windows VALUES (?, ?, ?, ?)",
                [(tenant_id, w, micro_batch, hosts.get(w, 0)) for w in window_starts],
            )
            for hw in sets:
                if not len(hw):
                    continue
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO host_windows (tenant_id, window_start_ms, "
                    "window_end_ms, micro_batch, rows, hosts, features, status) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        hw.tenant_id,
                        hw.window_start_ms,
                        hw.window_end_ms,
                        micro_batch,
                        len(hw),
                        np.ascontiguousarray(hw.hosts, dtype="V16").tobytes(),
                        np.ascontiguousarray(hw.features, dtype="<f8").tobytes(),
                        HOST_PENDING,
                    ),
                )
                stored += len(hw) if cursor.rowcount else 0
        return stored

    def forget_feature_windows(self, tenant_id: str, before_ms: int) -> None:
        """Forget closed feature windows starting before ``before_ms``."""
        with self._db:
            self._db.execute(
                "DELETE FROM feature_windows WHERE tenant_id = ? AND "
                "window_start_ms < ?",
                (tenant_id, before_ms),
            )

    def pending_host_windows(self, max_rows: int) -> list[HostWindowSet]:
        """Windows not scored yet, oldest first, until ``max_rows`` host
        rows (at least one window)."""
        out: list[HostWindowSet] = []
        total = 0
        for tenant, start, end, hosts, features in self._db.execute(
            "SELECT tenant_id, window_start_ms, window_end_ms, hosts, features "
            "FROM host_windows WHERE status = ? ORDER BY window_start_ms, tenant_id",
            (HOST_PENDING,),
        ):
            h = np.frombuffer(hosts, dtype="V16")
            out.append(
                HostWindowSet(
                    tenant_id=tenant,
                    window_start_ms=int(start),
                    window_end_ms=int(end),
                    hosts=h,
                    features=np.frombuffer(features, dtype="<f8").reshape(h.size, -1),
                )
            )
            total += h.size
            if total >= max_rows:
                break
        return out

    def finish_host_windows(
        self, sets: Sequence[HostWindowSet], rule: str | None = None
    ) -> None:
        """Scored windows (``rule`` None) are forgotten; rejected ones are
        kept with the rule the model service named and never retried."""
        keys = [(s.tenant_id, s.window_start_ms) for s in sets]
        with self._db:
            self._db.execute("BEGIN")
            if rule is None:
                self._db.executemany(
                    "DELETE FROM host_windows WHERE tenant_id = ? AND "
                    "window_start_ms = ?",
                    keys,
                )
            else:
                self._db.executemany(
                    "UPDATE host_windows SET status = ?, rule = ? WHERE "
                    "tenant_id = ? AND window_start_ms = ?",
                    [(HOST_REJECTED, rule, *k) for k in keys],
                )

    def record_alerts(
        self, tenant_id: str, hosts: np.ndarray, window_starts_ms: np.ndarray
    ) -> None:
        """Note host windows (``V16`` hosts) that scored at or above the
        alert threshold, for hysteresis (writing one again changes
        nothing).  One row per window and call: its hosts sorted into one
        blob, keyed by the blob's digest, so the same hosts again are the
        same row (one row per host cost 0.1 CPU-s per 50,000 alerts)."""
        h = np.ascontiguousarray(hosts, dtype="V16")
        starts = np.asarray(window_starts_ms, dtype=np.int64)
        rows = []
        for start in np.unique(starts).tolist():
            blob = np.unique(h[starts == start]).tobytes()
            digest = hashlib.blake2b(blob, digest_size=16).digest()
            rows.append((tenant_id, int(start), digest, blob))
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO host_alert_sets VALUES (?, ?, ?, ?)", rows
            )

    def alert_keys_since(self, tenant_id: str, since_ms: int) -> set[bytes]:
        """The tenant's noted alerts from ``since_ms`` on, each as 24 bytes
        (:data:`ALERT_KEY`: the host's 16, then the window start as a
        signed 64-bit big-endian integer), compared whole."""
        keys: set[bytes] = set()
        for start, blob in self._db.execute(
            "SELECT window_start_ms, hosts FROM host_alert_sets WHERE "
            "tenant_id = ? AND window_start_ms >= ?",
            (tenant_id, since_ms),
        ):
            found = np.frombuffer(blob, dtype="V16")
            rows = np.empty(found.size, dtype=ALERT_KEY)
            rows["host"] = found
            rows["start"] = int(start)
            keys.update(rows.view(f"V{ALERT_KEY.itemsize}").tolist())
        # Alerts noted one row per host (state files from before the sets).
        for host, start in self._db.execute(
            "SELECT host, window_start_ms FROM host_alerts WHERE tenant_id = ? "
            "AND window_start_ms >= ?",
            (tenant_id, since_ms),
        ):
            keys.add(bytes(host) + int(start).to_bytes(8, "big", signed=True))
        return keys

    def forget_alerts(self, tenant_id: str, before_ms: int) -> None:
        """Forget the tenant's noted alerts of windows before ``before_ms``."""
        with self._db:
            self._db.execute("BEGIN")
            for table in ("host_alert_sets", "host_alerts"):
                self._db.execute(
                    f"DELETE FROM {table} WHERE tenant_id = ? AND window_start_ms < ?",
                    (tenant_id, before_ms),
                )

    def count_host_windows(self, status: int = HOST_PENDING) -> int:
        """How many host rows are in ``status``."""
        (n,) = self._db.execute(
            "SELECT COALESCE(SUM(rows), 0) FROM host_windows WHERE status = ?",
            (status,),
        ).fetchone()
        return int(n)

    def prune(self, older_than_ms: int) -> int:
        """Forget ledger entries first seen before ``older_than_ms``."""
        with self._db:
            cursor = self._db.execute(
                "DELETE FROM batches WHERE seen_ms < ?", (older_than_ms,)
            )
        return int(cursor.rowcount)
