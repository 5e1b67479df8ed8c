"""Per-tenant state in DynamoDB, against MiniStack over HTTP."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from cloud.store.state import StateStoreError, TenantStateStore
from tests.servers import MiniStack

pytestmark = pytest.mark.integration


def _client(ministack: MiniStack) -> Any:
    return boto3.client(
        "dynamodb", endpoint_url=ministack.endpoint_url, region_name="us-east-1"
    )


def _rates(at_ms: int, records: int, rate: float, n: float) -> dict[str, Any]:
    return {
        "at_ms": at_ms,
        "records": records,
        "record_rate_per_s": rate,
        "effective_sampling_rate": n,
    }


@pytest.fixture
def store(ministack: MiniStack) -> Iterator[TenantStateStore]:
    client = _client(ministack)
    s = TenantStateStore(client, f"state-{time.monotonic_ns()}")
    s.create_table()
    try:
        yield s
    finally:
        client.delete_table(TableName=s.table_name)
        client.close()


def test_create_table_is_idempotent(ministack: MiniStack) -> None:
    """The first call creates the table with the (tenant_id, item) key; the
    second finds it and says it did not create it."""
    client = _client(ministack)
    s = TenantStateStore(client, f"state-idem-{time.monotonic_ns()}")
    try:
        assert s.create_table() is True
        assert s.create_table() is False
        table = client.describe_table(TableName=s.table_name)["Table"]
        assert {(k["AttributeName"], k["KeyType"]) for k in table["KeySchema"]} == {
            ("tenant_id", "HASH"),
            ("item", "RANGE"),
        }
    finally:
        client.delete_table(TableName=s.table_name)
        client.close()


def test_last_seen_only_moves_forward(store: TenantStateStore) -> None:
    """An older last-seen time is refused and counted; the newest one stays."""
    assert store.touch_relay("acme", "gw-1", 5_000) is True
    assert store.touch_relay("acme", "gw-1", 3_000) is False
    assert store.touch_relay("acme", "gw-1", 5_000) is False
    assert store.touch_relay("acme", "gw-1", 7_000) is True
    assert store.touch_exporter("acme", "10.1.1.1", 6_000, "gw-1") is True
    assert store.touch_exporter("acme", "10.1.1.1", 4_000, "gw-2") is False
    assert store.touch_exporter("acme", "10.1.1.1", 8_000, "gw-2") is True
    state = store.tenant_state("acme")
    assert state.relays_last_seen_ms == {"gw-1": 7_000}
    assert state.exporters_last_seen_ms == {"10.1.1.1": 8_000}
    assert state.exporter_relay == {"10.1.1.1": "gw-2"}
    assert store.stale == {"relay": 2, "exporter": 1}


def test_touch_many_counts_what_moved(store: TenantStateStore) -> None:
    """touch_many updates every relay and exporter and returns how many moved."""
    store.touch_relay("acme", "gw-2", 9_000)
    moved = store.touch_many(
        "acme",
        {"gw-1": 1_000, "gw-2": 2_000},
        {("10.1.1.1", "gw-1"): 1_000, ("10.1.1.2", "gw-2"): 2_000},
    )
    assert moved == 3
    state = store.tenant_state("acme")
    assert state.relays_last_seen_ms == {"gw-1": 1_000, "gw-2": 9_000}
    assert state.exporters_last_seen_ms == {"10.1.1.1": 1_000, "10.1.1.2": 2_000}


def test_concurrent_touches_keep_the_latest_time(
    ministack: MiniStack, store: TenantStateStore
) -> None:
    """Eight writers racing on one relay leave the largest time any of them
    wrote (a read-modify-write would lose some)."""
    rng = random.Random(8)
    times = [[rng.randrange(1, 10**9) for _ in range(25)] for _ in range(8)]
    errors: list[BaseException] = []

    def writer(ts: list[int]) -> None:
        own = TenantStateStore(_client(ministack), store.table_name)
        try:
            for t in ts:
                own.touch_relay("acme", "gw-race", t)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(ts,)) for ts in times]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    expected = max(t for ts in times for t in ts)
    assert store.tenant_state("acme").relays_last_seen_ms == {"gw-race": expected}


def test_rates_count_each_micro_batch_once(store: TenantStateStore) -> None:
    """Rates are written per micro-batch; a replayed or older micro-batch is
    refused, so records_total is the sum over distinct micro-batches."""
    assert store.update_rates("acme", 1, **_rates(10_000, 400, 40.0, 100.0)) is True
    assert store.update_rates("acme", 2, **_rates(20_000, 250, 25.0, 120.5)) is True
    assert store.update_rates("acme", 2, **_rates(20_000, 250, 25.0, 120.5)) is False
    assert store.update_rates("acme", 1, **_rates(10_000, 400, 40.0, 100.0)) is False
    state = store.tenant_state("acme")
    assert state.records_total == 650
    assert state.record_rate_per_s == 25.0
    assert state.effective_sampling_rate == 120.5
    assert state.rates_micro_batch == 2
    assert state.rates_at_ms == 20_000
    assert store.stale["rates"] == 2


def test_concurrent_rate_updates_add_atomically(
    ministack: MiniStack, store: TenantStateStore
) -> None:
    """Racing micro-batch writers: records_total equals the sum of the records
    of exactly the updates that were accepted."""
    accepted: list[int] = []
    lock = threading.Lock()

    def writer(offset: int) -> None:
        own = TenantStateStore(_client(ministack), store.table_name)
        for b in range(offset, 120, 4):
            records = 1000 + b
            if own.update_rates("acme", b, **_rates(b * 1000, records, 1.0, 100.0)):
                with lock:
                    accepted.append(records)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    state = store.tenant_state("acme")
    assert accepted
    assert state.records_total == sum(accepted)
    # Micro-batch 119 is the highest id and always accepted.
    assert state.rates_micro_batch == 119
    assert max(accepted) == 1119


def test_model_version_keeps_the_newest_answer(store: TenantStateStore) -> None:
    """A model version reported with an older time does not replace a newer one."""
    assert store.set_model_version("acme", "cloud:1.0.0:abc", 2_000) is True
    assert store.set_model_version("acme", "cloud:0.9.0:def", 1_000) is False
    state = store.tenant_state("acme")
    assert (state.model_version, state.model_at_ms) == ("cloud:1.0.0:abc", 2_000)
    assert store.tenant_state("other").model_version is None


def test_missing_table_raises_state_store_error(ministack: MiniStack) -> None:
    """A request DynamoDB fails (no such table) raises StateStoreError with
    DynamoDB's error code, not a botocore exception."""
    client = _client(ministack)
    try:
        s = TenantStateStore(client, "no-such-table-here")
        with pytest.raises(StateStoreError, match="ResourceNotFoundException"):
            s.touch_relay("acme", "gw-1", 1)
    finally:
        client.close()
