"""Detections and network estimates in a MongoDB-compatible store (pymongo).

Production runs on Amazon DocumentDB, so only commands DocumentDB
supports are used: ``createIndexes``, ``find``, and unordered
``bulk_write`` of ``UpdateOne(..., upsert=True)`` with ``$set`` and
``$setOnInsert``.  Retryable writes are off (DocumentDB rejects them);
every write here is an idempotent upsert, so the caller retries the whole
call instead.

Idempotence rests on deterministic ``_id`` values:

* a detection is keyed (tenant, host, window start, window end, model
  version): :func:`detection_id`.  Writing the same detection again (a
  replayed micro-batch) matches the stored document and changes nothing;
  ``detected_at`` is only set on insert, so the first write's time stays.
* a network estimate is keyed (tenant, window start): :func:`estimate_id`.
  Estimates are rewritten every micro-batch that touches their window and
  once more when it closes (``final``), so later values replace earlier
  ones.

Collections (database ``sampleflow`` by default): ``detections`` and
``network_estimates``; their indexes are created by
:meth:`DetectionStore.ensure_indexes`, which is safe to call at every start.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pymongo
import pymongo.errors
import structlog
from pymongo import ASCENDING, DESCENDING, IndexModel, UpdateOne

log = structlog.get_logger(__name__)

DEFAULT_DATABASE = "sampleflow"
DETECTIONS = "detections"
ESTIMATES = "network_estimates"

Document = dict[str, Any]


class StoreUnavailableError(Exception):
    """Raised when the store cannot be reached (connection, timeout).

    Every write is idempotent: retry the same call later.
    """


class StoreWriteError(Exception):
    """Raised when the store refused some writes (``details`` says which)."""

    def __init__(self, message: str, details: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.details = dict(details)


@dataclass(frozen=True)
class Detection:
    """One scored host window worth keeping.

    ``host`` is the address as text (IPv4 as ``a.b.c.d``); times are ms
    since the UNIX epoch, UTC; ``score`` is the detector's probability in
    [0, 1]; ``threat_class`` one of
    :data:`edge_agent.features.scoring.THREAT_CLASSES`; ``features`` the
    raw feature values of the row by name; ``top_losses`` the features with
    the largest normalised reconstruction loss (z), largest first.
    """

    tenant_id: str
    host: str
    window_start_ms: int
    window_end_ms: int
    score: float
    threat_class: str
    alert: bool
    model_version: str
    features: Mapping[str, float]
    top_losses: Sequence[tuple[str, float]]
    detected_at: dt.datetime


@dataclass(frozen=True)
class UpsertCounts:
    """What one bulk upsert did: new documents, matched, and changed ones."""

    upserted: int
    matched: int
    modified: int


def _key_hash(*parts: str) -> str:
    # The unit separator cannot occur in tenant ids, hosts or versions, so
    # distinct keys never join to the same string.
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def detection_id(
    tenant_id: str,
    host: str,
    window_start_ms: int,
    window_end_ms: int,
    model_version: str,
) -> str:
    """The detection's ``_id``: 32 hex digits of a SHA-256 of its key."""
    return _key_hash(
        tenant_id,
        host,
        str(int(window_start_ms)),
        str(int(window_end_ms)),
        model_version,
    )


def estimate_id(tenant_id: str, window_start_ms: int) -> str:
    """A network estimate's ``_id``: 32 hex digits of a SHA-256 of its key."""
    return _key_hash(tenant_id, str(int(window_start_ms)))


_V4_MAPPED_PREFIX = np.array([0] * 10 + [0xFF, 0xFF], dtype=np.uint8)


def host_texts(hosts: np.ndarray) -> list[str]:
    """``V16`` (IPv4-mapped for IPv4) host addresses as text."""
    raw = np.ascontiguousarray(hosts).reshape(-1).view(np.uint8).reshape(-1, 16)
    mapped = (raw[:, :12] == _V4_MAPPED_PREFIX).all(axis=1)
    out = [""] * raw.shape[0]
    # IPv4 (nearly every host) formatted from its four bytes; the rest by
    # ipaddress, which also gives IPv6 its canonical compressed form.
    for i, (a, b, c, d) in zip(
        np.flatnonzero(mapped).tolist(), raw[mapped, 12:].tolist(), strict=True
    ):
        out[i] = f"{a}.{b}.{c}.{d}"
    for i in np.flatnonzero(~mapped).tolist():
        out[i] = str(ipaddress.IPv6Address(raw[i].tobytes()))
    return out


def detections_from_scores(
    *,
    tenant_id: str,
    hosts: Sequence[str],
    window_start_ms: np.ndarray,
    window_end_ms: np.ndarray,
    feature_names: Sequence[str],
    feature_values: np.ndarray,
    scores: np.ndarray,
    threat_classes: Sequence[str],
    alerts: np.ndarray,
    loss_names: Sequence[str],
    losses: np.ndarray,
    model_versions: Sequence[str],
    detected_at: dt.datetime,
    only_alerts: bool = True,
    top_k: int = 3,
) -> list[Detection]:
    """Build :class:`Detection` objects from one tenant's scored rows.

    Arrays are row-aligned (``n`` rows).  ``feature_values`` is ``(n,
    len(feature_names))``, ``losses`` ``(n, len(loss_names))`` normalised
    losses.  With ``only_alerts`` (the default) rows below the alert
    threshold are left out.  ``top_k`` losses are kept per detection.
    """
    n = len(hosts)
    for name, arr in (
        ("window_start_ms", window_start_ms),
        ("window_end_ms", window_end_ms),
        ("feature_values", feature_values),
        ("scores", scores),
        ("alerts", alerts),
        ("losses", losses),
    ):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} rows, hosts has {n}")
    if len(threat_classes) != n or len(model_versions) != n:
        raise ValueError("threat_classes and model_versions need one entry per row")
    alert = np.asarray(alerts, bool)
    keep = np.flatnonzero(alert) if only_alerts else np.arange(n)
    losses = np.asarray(losses, np.float64)[keep]
    order = np.argsort(-losses, axis=1, kind="stable")[:, :top_k]
    top_z = np.take_along_axis(losses, order, axis=1).tolist()
    top_names = np.asarray(list(loss_names), dtype=object)[order].tolist()
    values = np.asarray(feature_values, np.float64)[keep].tolist()
    names = tuple(feature_names)
    # Whole columns to Python at once: per-element numpy indexing would
    # cost more than building the objects.
    return [
        Detection(
            tenant_id,
            hosts[i],
            start,
            end,
            score,
            str(threat_classes[i]),
            is_alert,
            str(model_versions[i]),
            dict(zip(names, row, strict=True)),
            list(zip(top_n, top_v, strict=True)),
            detected_at,
        )
        for i, start, end, score, is_alert, row, top_n, top_v in zip(
            keep.tolist(),
            np.asarray(window_start_ms, np.int64)[keep].tolist(),
            np.asarray(window_end_ms, np.int64)[keep].tolist(),
            np.asarray(scores, np.float64)[keep].tolist(),
            alert[keep].tolist(),
            values,
            top_names,
            top_z,
            strict=True,
        )
    ]


def open_client(uri: str, timeout_s: float = 10.0) -> pymongo.MongoClient[Document]:
    """A pymongo client for ``uri`` as the stores use it.

    Retryable writes are off because DocumentDB rejects them (the URI may
    not override that); ``timeout_s`` bounds server selection, connecting
    and each operation.  Add DocumentDB's ``tls=true&tlsCAFile=...`` to the
    URI in production.
    """
    ms = int(timeout_s * 1000)
    return pymongo.MongoClient(
        uri,
        retryWrites=False,
        serverSelectionTimeoutMS=ms,
        connectTimeoutMS=ms,
        timeoutMS=ms,
        tz_aware=True,
    )


class DetectionStore:
    """The ``detections`` and ``network_estimates`` collections.

    Inert until used: the constructor only keeps references.  Methods are
    thread-safe (pymongo clients are).
    """

    def __init__(
        self,
        client: pymongo.MongoClient[Document],
        database: str = DEFAULT_DATABASE,
        detections: str = DETECTIONS,
        estimates: str = ESTIMATES,
    ) -> None:
        db = client[database]
        self.client = client
        self.detections = db[detections]
        self.estimates = db[estimates]

    def ensure_indexes(self) -> list[str]:
        """Create the indexes if missing (idempotent); return their names."""
        try:
            names = self.detections.create_indexes(
                [
                    IndexModel(
                        [("tenant_id", ASCENDING), ("window_start_ms", ASCENDING)],
                        name="tenant_window",
                    ),
                    IndexModel(
                        [
                            ("tenant_id", ASCENDING),
                            ("host", ASCENDING),
                            ("window_start_ms", ASCENDING),
                        ],
                        name="tenant_host_window",
                    ),
                    IndexModel(
                        [("tenant_id", ASCENDING), ("score", DESCENDING)],
                        name="tenant_score",
                    ),
                ]
            )
            names += self.estimates.create_indexes(
                [
                    IndexModel(
                        [("tenant_id", ASCENDING), ("window_start_ms", ASCENDING)],
                        name="tenant_window",
                        unique=True,
                    )
                ]
            )
        except pymongo.errors.ConnectionFailure as exc:
            raise StoreUnavailableError(f"cannot create indexes: {exc}") from exc
        return names

    def upsert_detections(self, detections: Sequence[Detection]) -> UpsertCounts:
        """Write detections; one already stored (same key) is left as is.

        Raises :class:`StoreUnavailableError` or :class:`StoreWriteError`.
        """
        ops = []
        for d in detections:
            fields: Document = {
                "tenant_id": d.tenant_id,
                "host": d.host,
                "window_start_ms": int(d.window_start_ms),
                "window_end_ms": int(d.window_end_ms),
                "score": float(d.score),
                "threat_class": d.threat_class,
                "alert": bool(d.alert),
                "model_version": d.model_version,
                "features": {k: float(v) for k, v in d.features.items()},
                "top_losses": [
                    {"feature": name, "z": float(z)} for name, z in d.top_losses
                ],
            }
            _id = detection_id(
                d.tenant_id, d.host, d.window_start_ms, d.window_end_ms, d.model_version
            )
            ops.append(
                UpdateOne(
                    {"_id": _id},
                    {"$set": fields, "$setOnInsert": {"detected_at": d.detected_at}},
                    upsert=True,
                )
            )
        return self._bulk(self.detections, ops, "detections")

    def upsert_estimates(self, estimates: Sequence[Any]) -> UpsertCounts:
        """Write network estimates (dataclasses or mappings with at least
        ``tenant_id`` and ``window_start_ms``); the last write of a key wins.

        Raises :class:`StoreUnavailableError` or :class:`StoreWriteError`.
        """
        ops = []
        for e in estimates:
            is_record = dataclasses.is_dataclass(e) and not isinstance(e, type)
            fields = _plain(dataclasses.asdict(e) if is_record else e)
            try:
                _id = estimate_id(fields["tenant_id"], fields["window_start_ms"])
            except KeyError as exc:
                raise ValueError(f"estimate lacks {exc.args[0]!r}: {fields}") from exc
            ops.append(UpdateOne({"_id": _id}, {"$set": fields}, upsert=True))
        return self._bulk(self.estimates, ops, "estimates")

    def write(self, estimates: Sequence[Any]) -> None:
        """The engine's ``EstimateSink`` protocol: :meth:`upsert_estimates`."""
        self.upsert_estimates(estimates)

    def find_detections(
        self,
        tenant_id: str,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[Document]:
        """A tenant's detections with ``start_ms <= window_start_ms < end_ms``,
        in (window start, host) order."""
        query: Document = {"tenant_id": tenant_id}
        bounds: Document = {}
        if start_ms is not None:
            bounds["$gte"] = int(start_ms)
        if end_ms is not None:
            bounds["$lt"] = int(end_ms)
        if bounds:
            query["window_start_ms"] = bounds
        try:
            return list(
                self.detections.find(query).sort(
                    [("window_start_ms", ASCENDING), ("host", ASCENDING)]
                )
            )
        except pymongo.errors.ConnectionFailure as exc:
            raise StoreUnavailableError(f"cannot read detections: {exc}") from exc

    def find_estimate(self, tenant_id: str, window_start_ms: int) -> Document | None:
        """The stored estimate of one tenant window, or ``None``."""
        try:
            return self.estimates.find_one(
                {"_id": estimate_id(tenant_id, window_start_ms)}
            )
        except pymongo.errors.ConnectionFailure as exc:
            raise StoreUnavailableError(f"cannot read estimates: {exc}") from exc

    def _bulk(self, collection: Any, ops: list[UpdateOne], what: str) -> UpsertCounts:
        if not ops:
            return UpsertCounts(0, 0, 0)
        try:
            result = collection.bulk_write(ops, ordered=False)
        except pymongo.errors.BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            first = errors[0] if errors else {}
            log.warning(
                "store_write_errors",
                what=what,
                errors=len(errors),
                code=first.get("code"),
                error=first.get("errmsg"),
            )
            raise StoreWriteError(
                f"{len(errors)} of {len(ops)} {what} writes failed; first: "
                f"{first.get('errmsg')}",
                exc.details,
            ) from exc
        except (
            pymongo.errors.ConnectionFailure,
            pymongo.errors.ExecutionTimeout,
        ) as exc:
            raise StoreUnavailableError(f"cannot write {what}: {exc}") from exc
        counts = UpsertCounts(
            upserted=result.upserted_count,
            matched=result.matched_count,
            modified=result.modified_count,
        )
        log.debug("store_upsert", what=what, ops=len(ops), **dataclasses.asdict(counts))
        return counts


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and tuples turned into BSON-ready types."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
