"""The detection store against a real MongoDB-wire server (SecantusDB)."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Iterator

import numpy as np
import pytest

pymongo = pytest.importorskip("pymongo", reason="pymongo is in the cloud extra")

from cloud.engine.sinks import WindowEstimate  # noqa: E402
from cloud.store.detections import (  # noqa: E402
    Detection,
    DetectionStore,
    StoreUnavailableError,
    StoreWriteError,
    detections_from_scores,
    host_texts,
    open_client,
)
from tests.mongo_server import MongoServer  # noqa: E402
from tests.servers import free_port  # noqa: E402

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def store(
    mongo_server: MongoServer, request: pytest.FixtureRequest
) -> Iterator[DetectionStore]:
    client = open_client(mongo_server.uri)
    name = "t_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]
    s = DetectionStore(client, database=name)
    s.ensure_indexes()
    try:
        yield s
    finally:
        client.drop_database(name)
        client.close()


def _detection(
    host: str,
    start: int,
    version: str = "m:1",
    score: float = 0.97,
    at: dt.datetime = T0,
) -> Detection:
    return Detection(
        tenant_id="acme",
        host=host,
        window_start_ms=start,
        window_end_ms=start + 300_000,
        score=score,
        threat_class="spam",
        alert=True,
        model_version=version,
        features={"pkts_out": 1200.0, "mail_share": 0.75},
        top_losses=[("mail_share", 9.5), ("pkts_out", 3.25)],
        detected_at=at,
    )


def _estimate(start: int, final: bool, packets: float) -> WindowEstimate:
    return WindowEstimate(
        tenant_id="acme",
        window_start_ms=start,
        window_end_ms=start + 60_000,
        final=final,
        confidence=0.95,
        packets=packets,
        packets_low=packets - 10.0,
        packets_high=packets + 10.0,
        bytes=packets * 100.0,
        bytes_low=packets * 90.0,
        bytes_high=packets * 110.0,
        sampled_packets=packets / 100.0,
        sampled_bytes=packets,
        flows=7,
        rows=7,
        unknown_rate_rows=0,
        unknown_rate_packets=0.0,
        unknown_rate_bytes=0.0,
    )


def test_indexes_are_created_idempotently(store: DetectionStore) -> None:
    """ensure_indexes can run at every start; the index keys are as documented."""
    first = store.ensure_indexes()
    second = store.ensure_indexes()
    assert sorted(first) == sorted(second)
    keys = {i["name"]: list(i["key"].items()) for i in store.detections.list_indexes()}
    assert keys["tenant_window"] == [("tenant_id", 1), ("window_start_ms", 1)]
    assert keys["tenant_host_window"] == [
        ("tenant_id", 1),
        ("host", 1),
        ("window_start_ms", 1),
    ]
    assert keys["tenant_score"] == [("tenant_id", 1), ("score", -1)]
    est = {i["name"]: i for i in store.estimates.list_indexes()}
    assert est["tenant_window"]["unique"] is True


def test_detections_round_trip_with_deterministic_ids(store: DetectionStore) -> None:
    """Stored detections carry every field and an _id derived from their key."""
    dets = [_detection("147.32.84.165", 1_000_000), _detection("10.0.0.1", 1_300_000)]
    counts = store.upsert_detections(dets)
    assert (counts.upserted, counts.matched, counts.modified) == (2, 0, 0)
    docs = store.find_detections("acme")
    assert [d["host"] for d in docs] == ["147.32.84.165", "10.0.0.1"]
    key = "\x1f".join(["acme", "147.32.84.165", "1000000", "1300000", "m:1"])
    assert docs[0]["_id"] == hashlib.sha256(key.encode()).hexdigest()[:32]
    assert docs[0]["score"] == 0.97
    assert docs[0]["threat_class"] == "spam"
    assert docs[0]["features"] == {"pkts_out": 1200.0, "mail_share": 0.75}
    assert docs[0]["top_losses"] == [
        {"feature": "mail_share", "z": 9.5},
        {"feature": "pkts_out", "z": 3.25},
    ]
    assert docs[0]["detected_at"] == T0
    assert store.find_detections("acme", start_ms=1_100_000)[0]["host"] == "10.0.0.1"
    assert store.find_detections("acme", end_ms=1_100_000)[0]["host"] == "147.32.84.165"
    assert store.find_detections("other") == []


def test_replayed_micro_batch_writes_nothing_twice(store: DetectionStore) -> None:
    """Writing the same detections again matches them, modifies nothing, and
    keeps the first detected_at."""
    dets = [_detection("147.32.84.165", 1_000_000), _detection("10.0.0.1", 1_000_000)]
    store.upsert_detections(dets)
    later = [
        _detection(d.host, d.window_start_ms, at=T0 + dt.timedelta(minutes=5))
        for d in dets
    ]
    counts = store.upsert_detections(later)
    assert (counts.upserted, counts.matched, counts.modified) == (0, 2, 0)
    assert store.detections.count_documents({}) == 2
    assert all(d["detected_at"] == T0 for d in store.find_detections("acme"))


def test_another_model_version_is_another_detection(store: DetectionStore) -> None:
    """The model version is part of the key: a re-score by a new model is kept
    beside the old one."""
    store.upsert_detections([_detection("10.0.0.1", 1_000_000, version="m:1")])
    counts = store.upsert_detections([_detection("10.0.0.1", 1_000_000, version="m:2")])
    assert counts.upserted == 1
    assert sorted(d["model_version"] for d in store.find_detections("acme")) == [
        "m:1",
        "m:2",
    ]


def test_estimates_upsert_by_tenant_window(store: DetectionStore) -> None:
    """An estimate rewritten by a later micro-batch (and then final) leaves one
    document per (tenant, window) with the last values."""
    store.write([_estimate(60_000, False, 1000.0), _estimate(120_000, False, 50.0)])
    counts = store.upsert_estimates([_estimate(60_000, True, 1500.0)])
    assert (counts.upserted, counts.matched, counts.modified) == (0, 1, 1)
    assert store.estimates.count_documents({}) == 2
    doc = store.find_estimate("acme", 60_000)
    assert doc is not None
    assert doc["final"] is True
    assert doc["packets"] == 1500.0
    assert doc["bytes_high"] == 1500.0 * 110.0
    assert doc["flows"] == 7
    assert store.find_estimate("acme", 180_000) is None
    again = store.upsert_estimates([_estimate(60_000, True, 1500.0)])
    assert again.modified == 0


def test_refused_write_raises_store_write_error(store: DetectionStore) -> None:
    """A write the server refuses (here: a duplicate of the unique tenant/window
    index under another _id) raises StoreWriteError with the server's code."""
    store.estimates.insert_one(
        {"_id": "foreign", "tenant_id": "acme", "window_start_ms": 60_000}
    )
    with pytest.raises(StoreWriteError, match="1 of 1 estimates writes failed") as info:
        store.upsert_estimates([_estimate(60_000, False, 1.0)])
    assert info.value.details["writeErrors"][0]["code"] == 11000


def test_unreachable_server_raises_store_unavailable() -> None:
    """Nothing listening on the port: StoreUnavailableError, not a pymongo error."""
    client = open_client(
        f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", timeout_s=0.5
    )
    try:
        with pytest.raises(StoreUnavailableError):
            DetectionStore(client).upsert_detections([_detection("10.0.0.1", 0)])
    finally:
        client.close()


def test_detections_from_scores_keeps_alerts_and_top_losses() -> None:
    """Only alerting rows become detections; top losses are the largest z first."""
    dets = detections_from_scores(
        tenant_id="acme",
        hosts=["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        window_start_ms=np.array([0, 0, 300_000]),
        window_end_ms=np.array([300_000, 300_000, 600_000]),
        feature_names=["a", "b"],
        feature_values=np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
        scores=np.array([0.99, 0.1, 0.95]),
        threat_classes=["scan", "none", "spam"],
        alerts=np.array([True, False, True]),
        loss_names=["a", "b", "total"],
        losses=np.array([[1.0, 5.0, 3.0], [0.0, 0.0, 0.0], [7.0, -1.0, 2.0]]),
        model_versions=["m:1", "m:1", "m:1"],
        detected_at=T0,
        top_k=2,
    )
    assert [d.host for d in dets] == ["10.0.0.1", "10.0.0.3"]
    assert dets[0].top_losses == [("b", 5.0), ("total", 3.0)]
    assert dets[1].top_losses == [("a", 7.0), ("total", 2.0)]
    assert dets[1].features == {"a": 5.0, "b": 6.0}
    assert dets[1].window_end_ms == 600_000


def test_host_texts_formats_v4_mapped_and_v6() -> None:
    """V16 addresses print as dotted IPv4 when IPv4-mapped, else as IPv6."""
    raw = [
        ipaddress.IPv6Address("::ffff:147.32.84.165").packed,
        ipaddress.IPv6Address("2001:db8::1").packed,
    ]
    hosts = np.frombuffer(b"".join(raw), dtype="V16")
    assert host_texts(hosts) == ["147.32.84.165", "2001:db8::1"]
