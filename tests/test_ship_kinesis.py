"""The Kinesis shipper against a real local Kinesis (MiniStack), with faults."""

from __future__ import annotations

import asyncio
import collections
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from edge_agent.ship import (
    Backoff,
    KinesisShipper,
    ShipperConfig,
    ShipperConfigError,
    make_kinesis_client,
    plan_call,
)
from edge_agent.spool import PendingBatch, Spool, SpooledBatch
from tests.faultproxy import (
    ATTEMPT_FAULTS,
    INTERNAL_FAILURE,
    PTEE,
    Action,
    DropAfterForward,
    DropBeforeForward,
    FailRecords,
    FaultProxy,
    Pass,
    ServerError,
    Throttle,
)
from tests.servers import MiniStack, create_stream, kinesis_client, read_all_records

MIB = 1024 * 1024

# -- configuration and endpoints (no server) -----------------------------------


def test_config_needs_a_stream() -> None:
    """A config without stream name or ARN is an error naming the key."""
    with pytest.raises(ShipperConfigError, match=r"ship\.stream_name"):
        ShipperConfig()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"region": "Mars"}, "region"),
        ({"max_records_per_call": 501}, "max_records_per_call"),
        ({"max_in_flight_bytes": MIB}, "max_in_flight_bytes"),
        ({"max_record_bytes": 6 * MIB}, "max_record_bytes"),
        ({"endpoint_url": "127.0.0.1:4566"}, "endpoint_url"),
        ({"backoff_base_s": 0}, "backoff_base_s"),
        ({"stream_arn": "arn:aws:s3:::bucket"}, "stream_arn"),
    ],
)
def test_config_errors_name_the_key(kwargs: dict[str, Any], key: str) -> None:
    """Each invalid setting raises ShipperConfigError naming ship.<key>."""
    with pytest.raises(ShipperConfigError, match=rf"ship\.{key}="):
        ShipperConfig(stream_name="s", **kwargs)


def test_from_mapping_rejects_unknown_keys() -> None:
    """A misspelt key in the [ship] settings is refused, listing valid keys."""
    with pytest.raises(ShipperConfigError, match=r"regoin=.*valid keys: .*stream_name"):
        ShipperConfig.from_mapping({"stream_name": "s", "regoin": "us-east-1"})


@pytest.mark.parametrize(
    ("region", "fips", "endpoint"),
    [
        # Hostnames from the AWS general reference (Kinesis endpoints).
        ("eu-west-1", False, "https://kinesis.eu-west-1.amazonaws.com"),
        ("us-east-1", True, "https://kinesis-fips.us-east-1.amazonaws.com"),
        ("us-gov-west-1", False, "https://kinesis.us-gov-west-1.amazonaws.com"),
        ("us-gov-east-1", False, "https://kinesis.us-gov-east-1.amazonaws.com"),
    ],
)
def test_regions_resolve_to_their_partition_endpoints(
    region: str, fips: bool, endpoint: str
) -> None:
    """Commercial and GovCloud regions reach their published Kinesis endpoints."""
    client = make_kinesis_client(
        ShipperConfig(stream_name="s", region=region, use_fips_endpoint=fips)
    )
    try:
        assert client.meta.endpoint_url == endpoint
    finally:
        client.close()


def test_govcloud_partition_guard() -> None:
    """partition='aws-us-gov' refuses a commercial region and a commercial ARN."""
    ShipperConfig(stream_name="s", region="us-gov-west-1", partition="aws-us-gov")
    with pytest.raises(ShipperConfigError, match="is in partition aws,"):
        ShipperConfig(stream_name="s", region="us-east-1", partition="aws-us-gov")
    with pytest.raises(ShipperConfigError, match="partition"):
        ShipperConfig(
            stream_arn="arn:aws:kinesis:us-gov-west-1:123456789012:stream/s",
            region="us-gov-west-1",
            partition="aws-us-gov",
        )


def test_local_endpoint_is_used_as_given() -> None:
    """endpoint_url sends to the local server; no region needed to sign."""
    client = make_kinesis_client(
        ShipperConfig(stream_name="s", endpoint_url="http://127.0.0.1:4566")
    )
    try:
        assert client.meta.endpoint_url == "http://127.0.0.1:4566"
    finally:
        client.close()


# -- planning and backoff (no server) --------------------------------------------


def _info(n: int, key: str, size: int) -> PendingBatch:
    return PendingBatch(f"b{n}", key, n, size)


def test_strict_plan_takes_one_batch_per_key_in_seq_order() -> None:
    """Strict order: the oldest batch of each key not in flight, nothing after."""
    pending = [
        _info(1, "a", 10),
        _info(2, "b", 10),
        _info(3, "a", 10),
        _info(4, "c", 10),
    ]
    plan = plan_call(
        pending,
        blocked_keys={"c"},
        strict_key_order=True,
        max_records=500,
        max_call_bytes=5 * MIB,
        max_record_bytes=MIB,
        budget_bytes=10 * MIB,
    )
    assert [b.batch_id for b in plan.batches] == ["b1", "b2"]
    assert plan.call_bytes == 2 * (10 + 1)


def test_strict_plan_never_lets_a_key_overtake_a_passed_over_batch() -> None:
    """A batch that does not fit blocks its key for this call; others go on."""
    pending = [_info(1, "a", 900), _info(2, "b", 50), _info(3, "a", 10)]
    plan = plan_call(
        pending,
        strict_key_order=True,
        max_records=500,
        max_call_bytes=1000,
        max_record_bytes=1000,
        budget_bytes=100,
    )
    assert [b.batch_id for b in plan.batches] == ["b2"]


def test_relaxed_plan_fills_the_call_by_count_and_bytes() -> None:
    """Without strict order a call is packed up to 500 records or 5 MiB."""
    many = [_info(i, "a", 100) for i in range(1200)]
    plan = plan_call(
        many,
        strict_key_order=False,
        max_records=500,
        max_call_bytes=5 * MIB,
        max_record_bytes=MIB,
        budget_bytes=10 * MIB,
    )
    assert len(plan.batches) == 500
    # 900 KiB records with a 1-byte key: 5 fit in 5 MiB (5 * 921601 = 4.39 MiB).
    big = [_info(i, "a", 900 * 1024) for i in range(8)]
    plan = plan_call(
        big,
        strict_key_order=False,
        max_records=500,
        max_call_bytes=5 * MIB,
        max_record_bytes=MIB,
        budget_bytes=10 * MIB,
    )
    assert len(plan.batches) == 5
    assert plan.call_bytes == 5 * (900 * 1024 + 1)


def test_plan_reports_records_over_the_record_limit() -> None:
    """A record over max_record_bytes (payload plus key) is listed as too large."""
    pending = [_info(1, "key", MIB - 3), _info(2, "key", MIB - 2)]
    plan = plan_call(
        pending,
        strict_key_order=True,
        max_records=500,
        max_call_bytes=5 * MIB,
        max_record_bytes=MIB,
        budget_bytes=10 * MIB,
    )
    assert [b.batch_id for b in plan.batches] == ["b1"]
    assert [b.batch_id for b in plan.too_large] == ["b2"]


def test_backoff_delays_stay_under_the_doubling_ceiling() -> None:
    """The n-th delay lies in [0, min(cap, base * 2**n)]; reset starts over."""
    backoff = Backoff(0.1, 1.0, random.Random(3))
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    delays = [backoff.next_delay() for _ in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not fixed
    backoff.reset()
    assert backoff.next_delay() <= 0.1


# -- against MiniStack --------------------------------------------------------


def _batch(spool: Spool, n: int, key: str, size: int = 200) -> SpooledBatch:
    batch_id = f"batch-{n:05d}"
    payload = batch_id.encode() + b"|" + random.Random(n).randbytes(size)
    return SpooledBatch(batch_id, key, payload, spool.next_seq())


def _batch_id(record: dict[str, Any]) -> str:
    data: bytes = record["Data"]
    return data.split(b"|", 1)[0].decode()


def _new_stream(server: MiniStack, name: str, shards: int) -> str:
    client = kinesis_client(server.endpoint_url)
    try:
        create_stream(client, name, shards)
    finally:
        client.close()
    return name


def _read_back(server: MiniStack, stream: str) -> list[dict[str, Any]]:
    client = kinesis_client(server.endpoint_url)
    try:
        return read_all_records(client, stream)
    finally:
        client.close()


def _first_arrival_order_is_seq_order(
    records: list[dict[str, Any]], batches: dict[str, SpooledBatch]
) -> bool:
    """Per partition key, first arrivals in shard order have increasing seq."""
    seen: set[str] = set()
    last_seq: dict[str, int] = {}
    for record in records:  # shard by shard, each in sequence-number order
        batch_id = _batch_id(record)
        if batch_id in seen:
            continue
        seen.add(batch_id)
        key, seq = record["PartitionKey"], batches[batch_id].seq
        if seq <= last_seq.get(key, -1):
            return False
        last_seq[key] = seq
    return True


def _config(stream: str, endpoint: str, **kwargs: Any) -> ShipperConfig:
    settings: dict[str, Any] = {
        "stream_name": stream,
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.1,
        "idle_poll_s": 0.05,
    }
    settings.update(kwargs)
    return ShipperConfig(**settings)


async def _run_until(
    shipper: KinesisShipper, done: Callable[[], bool], guard_s: float = 120.0
) -> None:
    """Run the shipper until ``done()``; the guard only catches a hang."""
    task = asyncio.create_task(shipper.run())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + guard_s
    try:
        while not done():
            if task.done():
                task.result()
                raise AssertionError("shipper stopped on its own")
            if loop.time() > deadline:
                raise AssertionError(f"hung: {shipper.stats} {shipper.spool.stats}")
            await asyncio.sleep(0.02)
    finally:
        await shipper.stop()
        await task


@pytest.mark.integration
def test_ships_every_batch_exactly_once_without_faults(
    ministack: MiniStack, tmp_path: Path
) -> None:
    """No faults: each batch arrives once, per key in seq order; spool empties."""
    stream = _new_stream(ministack, "plain", shards=2)
    with Spool(tmp_path / "spool") as spool:
        keys = ["exp-1", "exp-2", "exp-3", "exp-4"]
        batches = {
            b.batch_id: b for b in (_batch(spool, i, keys[i % 4]) for i in range(60))
        }
        for b in batches.values():
            spool.append(b)
        shipper = KinesisShipper(spool, _config(stream, ministack.endpoint_url))
        with capture_logs() as logs:
            for _ in range(200):
                if not spool.stats.count:
                    break
                shipper.ship_once()
            shipper.log_summary()
        shipper.close()
        records = _read_back(ministack, stream)
        assert sorted(_batch_id(r) for r in records) == sorted(batches)
        assert {r["Data"] for r in records} == {b.payload for b in batches.values()}
        assert all(
            r["PartitionKey"] == batches[_batch_id(r)].partition_key for r in records
        )
        assert _first_arrival_order_is_seq_order(records, batches)
        assert spool.stats.count == 0
        stats = shipper.stats
        assert stats.batches_shipped == 60
        assert stats.bytes_shipped == sum(len(b.payload) for b in batches.values())
        assert stats.record_errors == {}
        shipped_events = [e for e in logs if e["event"] == "batch_shipped"]
        assert sorted(e["batch_id"] for e in shipped_events) == sorted(batches)
        assert all(e["log_level"] == "debug" for e in shipped_events)
        summaries = [e for e in logs if e["event"] == "ship_summary"]
        assert len(summaries) == 1 and summaries[0]["log_level"] == "info"
        assert summaries[0]["batches"] == 60 and summaries[0]["spool_count"] == 0


def _fault_script(seed: int, length: int) -> list[Action]:
    rng = random.Random(seed)
    # Weighted so the test stays short: botocore sleeps about 0.5 to 1 s
    # before each transport retry, and that base is not configurable.
    choices: list[Action] = [
        Pass(),
        Pass(),
        Pass(),
        FailRecords((None, PTEE)),
        FailRecords((INTERNAL_FAILURE, None, None)),
        FailRecords((PTEE,)),
        Throttle(),
        ServerError(),
        DropBeforeForward(),
        DropAfterForward(),
    ]
    return [rng.choice(choices) for _ in range(length)]


@pytest.mark.integration
def test_faults_lose_nothing_and_duplicate_only_unanswered_records(
    ministack: MiniStack, tmp_path: Path
) -> None:
    """Through partial failures, throttles, 500s and drops every batch arrives.

    A record is in the stream exactly as often as the proxy let the server
    store it; more than once only where an answer was dropped after the
    server stored it.  The shipper's error counters match the proxy's log.
    """
    stream = _new_stream(ministack, "faults", shards=2)
    with (
        FaultProxy(ministack.endpoint_url, _fault_script(11, 200)) as proxy,
        Spool(tmp_path / "spool") as spool,
    ):
        keys = [f"exp-{k}" for k in range(6)]
        batches = {
            b.batch_id: b for b in (_batch(spool, i, keys[i % 6]) for i in range(60))
        }
        for b in batches.values():
            spool.append(b)
        shipper = KinesisShipper(
            spool, _config(stream, proxy.endpoint_url), rng=random.Random(5)
        )
        asyncio.run(_run_until(shipper, lambda: spool.stats.count == 0))
        records = _read_back(ministack, stream)
        arrived = collections.Counter(r["Data"] for r in records)
        # Nothing missing, and exactly what the proxy let the server store.
        assert set(arrived) == {b.payload for b in batches.values()}
        assert arrived == proxy.stored_counts()
        # At least once, exactly: one acknowledged copy per batch, plus one
        # per time the server stored it but the answer was dropped.
        unanswered: collections.Counter[bytes] = collections.Counter()
        for ex in proxy.exchanges:
            if isinstance(ex.action, DropAfterForward):
                unanswered.update(
                    data
                    for (_key, data), stored in zip(ex.records, ex.stored, strict=True)
                    if stored
                )
        assert unanswered, "the script dropped no answer: the test proves less"
        for b in batches.values():
            assert arrived[b.payload] == 1 + unanswered[b.payload], b.batch_id
        assert _first_arrival_order_is_seq_order(records, batches)
        # The shipper's view agrees with the proxy's log.
        stats = shipper.stats
        assert stats.record_errors == dict(proxy.failed_records())
        assert stats.http_attempts == len(proxy.exchanges)
        faulted = sum(proxy.count(kind) for kind in ATTEMPT_FAULTS)
        assert stats.transport_retries + stats.calls_failed == faulted
        assert stats.batches_shipped == 60
        assert stats.throttled == (proxy.failed_records()[PTEE] + proxy.count(Throttle))
        assert set(proxy.content_types) == {"application/x-amz-json-1.1"}


@pytest.mark.integration
def test_outage_accumulates_in_the_spool_and_replays_in_order(
    ministack: MiniStack, tmp_path: Path
) -> None:
    """Uplink down: batches pile up on disk; back up: all arrive, in seq order."""
    stream = _new_stream(ministack, "outage", shards=1)
    with (
        FaultProxy(ministack.endpoint_url) as proxy,
        Spool(tmp_path / "spool") as spool,
    ):
        proxy.go_down()
        # One attempt per call: botocore's own retry sleeps would only slow
        # the test; the shipper's backoff handles the outage.
        shipper = KinesisShipper(
            spool, _config(stream, proxy.endpoint_url, transport_max_attempts=1)
        )
        batches: dict[str, SpooledBatch] = {}

        async def scenario() -> None:
            task = asyncio.create_task(shipper.run())
            for i in range(40):
                b = _batch(spool, i, f"exp-{i % 3}")
                await asyncio.to_thread(spool.append, b)
                batches[b.batch_id] = b
                shipper.notify()
            while shipper.stats.calls_failed < 3:
                await asyncio.sleep(0.02)
            assert spool.stats.count == 40
            assert shipper.stats.batches_shipped == 0
            assert "EndpointConnectionError" in shipper.stats.call_errors
            proxy.come_up()
            await shipper.stop()
            await task

        asyncio.run(scenario())
        # A retry already under way when the uplink came back may ship a few
        # batches before the stop takes effect; the rest wait in the spool.
        shipped_first = shipper.stats.batches_shipped
        assert spool.stats.count + shipped_first == 40
        shipper = KinesisShipper(spool, _config(stream, proxy.endpoint_url))
        asyncio.run(_run_until(shipper, lambda: spool.stats.count == 0))
        records = _read_back(ministack, stream)
        # Refused connections reach no server: each batch exactly once.
        assert sorted(_batch_id(r) for r in records) == sorted(batches)
        assert _first_arrival_order_is_seq_order(records, batches)
        for key in ("exp-0", "exp-1", "exp-2"):
            seqs = [
                batches[_batch_id(r)].seq for r in records if r["PartitionKey"] == key
            ]
            assert seqs == sorted(seqs)


@pytest.mark.integration
def test_full_spool_during_outage_drops_oldest_and_ships_the_rest(
    ministack: MiniStack, tmp_path: Path
) -> None:
    """With a small bound, the oldest batches are dropped (counted), not shipped."""
    stream = _new_stream(ministack, "bounded", shards=1)
    # Each file: 40 bytes of framing, an 11-byte id, a 5-byte key and a
    # payload of the id, "|" and 200 random bytes.
    file_bytes = 40 + 11 + 5 + (11 + 1 + 200)
    with Spool(tmp_path / "spool", max_bytes=10 * file_bytes) as spool:
        batches = [_batch(spool, i, "exp-1", size=200) for i in range(25)]
        for b in batches:  # the uplink is down: nothing ships meanwhile
            spool.append(b)
        assert spool.stats.dropped_full == 15
        assert spool.stats.dropped_full_bytes == 15 * file_bytes
        shipper = KinesisShipper(spool, _config(stream, ministack.endpoint_url))
        asyncio.run(_run_until(shipper, lambda: spool.stats.count == 0))
        records = _read_back(ministack, stream)
        assert [_batch_id(r) for r in records] == [b.batch_id for b in batches[15:]]


@pytest.mark.integration
def test_oversized_batch_is_set_aside_and_the_rest_ships(
    ministack: MiniStack, tmp_path: Path
) -> None:
    """A batch whose record would exceed 1 MiB goes to rejected/, counted."""
    stream = _new_stream(ministack, "oversize", shards=1)
    with Spool(tmp_path / "spool") as spool:
        small = _batch(spool, 1, "exp-1")
        huge = SpooledBatch("huge", "exp-1", b"x" * MIB, spool.next_seq())
        after = _batch(spool, 2, "exp-1")
        for b in (small, huge, after):
            spool.append(b)
        shipper = KinesisShipper(spool, _config(stream, ministack.endpoint_url))
        for _ in range(10):
            if not spool.stats.count:
                break
            shipper.ship_once()
        shipper.close()
        records = _read_back(ministack, stream)
        assert [_batch_id(r) for r in records] == [small.batch_id, after.batch_id]
        assert shipper.stats.rejected_too_large == 1
        assert spool.stats.rejected == {"record_too_large": 1}
        assert [p.name for p in (tmp_path / "spool" / "rejected").iterdir()] == [
            f"{huge.seq:020d}.sfb"
        ]


@pytest.mark.integration
def test_calls_respect_the_record_and_byte_limits(
    ministack: MiniStack, tmp_path: Path
) -> None:
    """No call carries over 500 records or 5 MiB; big backlogs split as computed."""
    stream = _new_stream(ministack, "limits", shards=2)
    with (
        FaultProxy(ministack.endpoint_url) as proxy,
        Spool(tmp_path / "spool") as spool,
    ):
        small = [_batch(spool, i, f"k{i % 7}", size=50) for i in range(1050)]
        # Small records are 12 + 50 bytes of data and a 2-byte key: 64 bytes.
        # Big ones are 900 KiB and a 3-byte key: 921,603 bytes.  Calls: 500,
        # 500, then 50 small (3,200 bytes) + 5 big (4,608,015) = 4.40 MiB
        # (a sixth big one would make 5.27 MiB), then 5, then 2.
        big = [
            SpooledBatch(
                f"big-{i}", f"b{i:02d}", os.urandom(900 * 1024), spool.next_seq()
            )
            for i in range(12)
        ]
        for b in small + big:
            spool.append(b)
        shipper = KinesisShipper(
            spool, _config(stream, proxy.endpoint_url, strict_key_order=False)
        )
        for _ in range(20):
            if not spool.stats.count:
                break
            shipper.ship_once()
        shipper.close()
        sizes = [len(ex.records) for ex in proxy.exchanges]
        assert sizes == [500, 500, 55, 5, 2]
        for ex in proxy.exchanges:
            assert sum(len(d) + len(k) for k, d in ex.records) <= 5 * MIB
        assert len(_read_back(ministack, stream)) == 1062


@pytest.mark.integration
def test_concurrent_calls_keep_per_key_order(
    ministack: MiniStack, tmp_path: Path
) -> None:
    """Three calls in flight at once still never let a key's batch overtake."""
    stream = _new_stream(ministack, "concurrent", shards=2)
    rng = random.Random(3)
    # Record-level failures only: they make rounds retry out of step.
    kinds: list[Action] = [Pass(), FailRecords((None, PTEE)), FailRecords((PTEE,))]
    script = [rng.choice(kinds) for _ in range(200)]
    with (
        FaultProxy(ministack.endpoint_url, script) as proxy,
        Spool(tmp_path / "spool") as spool,
    ):
        keys = [f"exp-{k}" for k in range(5)]
        batches = {
            b.batch_id: b for b in (_batch(spool, i, keys[i % 5]) for i in range(75))
        }
        for b in batches.values():
            spool.append(b)
        config = _config(
            stream,
            proxy.endpoint_url,
            max_concurrent_calls=3,
            max_record_bytes=1000,
            max_bytes_per_call=1000,
            max_in_flight_bytes=2000,
        )
        shipper = KinesisShipper(spool, config, rng=random.Random(1))
        asyncio.run(_run_until(shipper, lambda: spool.stats.count == 0))
        records = _read_back(ministack, stream)
        assert {_batch_id(r) for r in records} == set(batches)
        assert _first_arrival_order_is_seq_order(records, batches)
        # Each call fits the 1000-byte call limit set above.
        for ex in proxy.exchanges:
            assert sum(len(d) + len(k) for k, d in ex.records) <= 1000
