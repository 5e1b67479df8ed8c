"""The engine's driver-side analysis: network statistics, feature buckets,
window closing, scoring outcomes, tenant figures and settings.

No Spark here.  Expected values are worked out by hand in each test, or
(for compaction) taken from the shared feature library on the rows as
they were before compaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from cloud.engine import hostwindows, network
from cloud.engine.config import ConfigError, EngineConfig, tenant_networks
from cloud.engine.scoring import Hysteresis
from cloud.engine.sinks import DeferringSink, MemorySink, WindowEstimate
from cloud.engine.store import Bucket, HostWindowSet, SqliteStore
from cloud.engine.tenants import TenantBatch
from cloud.engine.transform import PAYLOAD_DTYPE
from cloud.store.detections import StoreUnavailableError
from edge_agent.features import InternalNetworks, host_window_features
from edge_agent.flows.schema import address_bytes


def _addr(text: str) -> np.void:
    return np.frombuffer(address_bytes(text), dtype="V16")[0]


def _rows(spec: list[tuple[str, str, int, int, int, int, int, int]]) -> np.ndarray:
    """(src, dst, dst_port, protocol, flags, bytes, packets, rate) rows."""
    out = np.zeros(len(spec), dtype=PAYLOAD_DTYPE)
    for i, (src, dst, port, proto, flags, octets, pkts, rate) in enumerate(spec):
        out[i]["src_addr"] = _addr(src)
        out[i]["dst_addr"] = _addr(dst)
        out[i]["dst_port"] = port
        out[i]["protocol"] = proto
        out[i]["tcp_flags"] = flags
        out[i]["bytes"] = octets
        out[i]["packets"] = pkts
        out[i]["sampling_rate"] = rate
        out[i]["flow_count"] = 1
        out[i]["time_start"] = 1_000 * i
        out[i]["time_end"] = 1_000 * i + 500
    return out


SYN, ACK, RST = 0x02, 0x10, 0x04
ROWS = _rows(
    [
        ("10.0.0.1", "8.8.8.8", 53, 17, 0, 100, 1, 100),
        ("10.0.0.1", "1.1.1.1", 443, 6, SYN, 60, 1, 100),
        ("10.0.0.1", "1.1.1.1", 443, 6, SYN | ACK, 1500, 2, 100),
        ("10.0.0.2", "1.1.1.1", 25, 6, SYN, 60, 1, 100),
        ("10.0.0.2", "9.9.9.9", 25, 6, SYN, 60, 1, 0),  # unknown rate
        ("10.0.0.3", "8.8.8.8", 0, 1, 0, 84, 1, 100),  # ICMP: no port
    ]
)


def test_network_bucket_statistics_by_hand() -> None:
    """Flow starts are SYN-without-ACK TCP rows × rate (unknown rate left
    out); hosts and ports get Chao1 over sampled records; talkers rank
    sources by scaled bytes."""
    starts, blob = network.bucket_tables(ROWS)
    assert starts == 2 * 100.0  # rows 1 and 3; row 4 has rate 0
    stats = network.merge_tables([blob], top_k=2)
    # Addresses (src or dst) and how many records show each:
    # 10.0.0.1: 3, 8.8.8.8: 2, 1.1.1.1: 3, 10.0.0.2: 2, 9.9.9.9: 1,
    # 10.0.0.3: 1 -> S_obs 6, f1 2, f2 2 -> 6 + 4/4 = 7.
    assert stats.distinct_hosts_observed == 6
    assert stats.distinct_hosts == pytest.approx(7.0)
    # TCP/UDP destination ports: 53: 1, 443: 2, 25: 2 -> 3 + 1/4.
    assert stats.distinct_ports_observed == 3
    assert stats.distinct_ports == pytest.approx(3.25)
    # Sent bytes × 100: 10.0.0.1 (100+60+1500), 10.0.0.3 84, 10.0.0.2 60.
    assert stats.top_talkers == [
        {"host": "10.0.0.1", "bytes": 166_000.0},
        {"host": "10.0.0.3", "bytes": 8_400.0},
    ]


def test_network_tables_add_up_across_buckets() -> None:
    """Merging two buckets' tables equals the tables of all their rows,
    and Chao1 with f2 = 0 uses S_obs + f1(f1-1)/2."""
    _, one = network.bucket_tables(ROWS[:3])
    _, two = network.bucket_tables(ROWS[3:])
    _, whole = network.bucket_tables(ROWS)
    assert network.merge_tables([one, two], 5) == network.merge_tables([whole], 5)
    _, single = network.bucket_tables(ROWS[:1])  # 10.0.0.1 and 8.8.8.8 once
    stats = network.merge_tables([single], 5)
    assert stats.distinct_hosts == 2 + 2 * 1 / 2
    assert stats.distinct_ports == 1.0  # f1 = 1: 1 + 0
    assert network.merge_tables([], 5).distinct_hosts_observed == 0


def test_windows_merged_together_by_hand() -> None:
    """Several windows closed at once over shared buckets get each its own
    statistics: the window holding both buckets those of all the rows, the
    one holding the second bucket alone those of its three rows, an empty
    one none."""
    _, first = network.bucket_tables(ROWS[:3])
    _, second = network.bucket_tables(ROWS[3:])
    got = network.merge_windows(
        [(0, first), (10_000, second)], [0, 10_000, 30_000], 20_000, top_k=2
    )
    whole = got[0]  # as in test_network_bucket_statistics_by_hand
    assert (whole.distinct_hosts_observed, whole.distinct_hosts) == (6, 7.0)
    assert (whole.distinct_ports_observed, whole.distinct_ports) == (3, 3.25)
    assert [t["host"] for t in whole.top_talkers] == ["10.0.0.1", "10.0.0.3"]
    # Rows 4-6: 10.0.0.2 in two records; 1.1.1.1, 9.9.9.9, 10.0.0.3 and
    # 8.8.8.8 in one each -> S_obs 5, f1 4, f2 1 -> 5 + 16/2 = 13.  Port 25
    # twice -> 1 + 0.  Sent bytes x 100 (rate 0 left out): 10.0.0.3 8,400,
    # 10.0.0.2 6,000.
    late = got[10_000]
    assert (late.distinct_hosts_observed, late.distinct_hosts) == (5, 13.0)
    assert (late.distinct_ports_observed, late.distinct_ports) == (1, 1.0)
    assert late.top_talkers == [
        {"host": "10.0.0.3", "bytes": 8_400.0},
        {"host": "10.0.0.2", "bytes": 6_000.0},
    ]
    empty = got[30_000]
    assert (empty.distinct_hosts_observed, empty.top_talkers) == (0, [])


def test_top_talkers_keep_ties_in_address_order() -> None:
    """The k largest values come largest first, and values tied at the
    cut-off are taken in index (address) order, as a stable sort would."""
    values = np.array([5.0, 9.0, 9.0, 1.0, 9.0, 3.0, 5.0])
    assert network.top_indices(values, 2).tolist() == [1, 2]
    assert network.top_indices(values, 4).tolist() == [1, 2, 4, 0]
    assert network.top_indices(values, 5).tolist() == [1, 2, 4, 0, 6]
    assert network.top_indices(values, 10).tolist() == [1, 2, 4, 0, 6, 5, 3]
    assert network.top_indices(values, 0).tolist() == []
    assert network.top_indices(np.zeros(0), 3).tolist() == []


def test_compaction_keeps_every_feature() -> None:
    """Rows equal on what features read merge (sums exact) and the
    feature library computes the same rows from either form."""
    rows = np.concatenate([ROWS, ROWS[1:3], ROWS[1:2]])
    rows["bytes"][-1] = 2**40  # exact uint64 sums
    compacted = hostwindows.compact(rows)
    assert len(compacted) == len(ROWS)
    assert int(compacted["bytes"].sum()) == int(rows["bytes"].sum())
    assert int(compacted["flow_count"].sum()) == len(rows)
    nets = InternalNetworks.parse(("10.0.0.0/8",))
    before = {n: rows[n] for n in PAYLOAD_DTYPE.names or ()}
    before["time_start"] = np.zeros(len(rows), dtype=np.int64)
    want = host_window_features(before, nets, 300)
    got = hostwindows.window_features("t", 600_000, 300, compacted, nets)
    assert got.hosts.tolist() == want.host.tolist()
    np.testing.assert_allclose(got.features, want.values)
    assert (got.window_start_ms, got.window_end_ms) == (600_000, 900_000)


def test_windows_to_close_by_hand() -> None:
    """300 s windows every 60 s: a bucket at 600 s is in the windows
    starting 360..600 s; with the watermark at 900 s those ending by then
    close, except those already closed."""
    starts = hostwindows.windows_to_close(
        [600_000], {480_000}, 900_000, 300_000, 60_000
    )
    assert starts == [360_000, 420_000, 540_000, 600_000]
    assert hostwindows.windows_to_close([600_000], set(), 899_999, 300_000, 60_000) == [
        360_000,
        420_000,
        480_000,
        540_000,
    ]


def test_closing_a_window_and_its_rows_is_one_idempotent_step(tmp_path: Path) -> None:
    """Host rows are stored pending with their window; closing the same
    window again (a replay) stores nothing twice; scored rows are
    forgotten, rejected ones kept aside."""
    store = SqliteStore(tmp_path / "s.sqlite")
    hosts = np.frombuffer(bytes(16) + b"\x01" * 16, dtype="V16")
    features = np.arange(30.0).reshape(2, 15)
    first = HostWindowSet("t", 0, 300_000, hosts, features)
    second = HostWindowSet("t", 60_000, 360_000, hosts[:1], features[:1])
    assert store.close_feature_windows(3, "t", [0, 60_000], [first, second]) == 3
    assert store.close_feature_windows(3, "t", [0, 60_000], [first, second]) == 0
    assert store.closed_feature_windows("t") == {0, 60_000}
    assert store.count_host_windows() == 3
    pending = store.pending_host_windows(10)
    assert [len(p) for p in pending] == [2, 1]
    np.testing.assert_array_equal(pending[0].features, features)
    assert pending[0].hosts.tolist() == hosts.tolist()
    assert len(store.pending_host_windows(1)) == 1  # whole windows, oldest first
    store.finish_host_windows(pending[:1])
    store.finish_host_windows(pending[1:], rule="unknown_tenant")
    assert store.count_host_windows() == 0
    assert store.count_host_windows(2) == 1
    store.close()


def _estimate(start: int) -> WindowEstimate:
    return WindowEstimate(
        tenant_id="t",
        window_start_ms=start,
        window_end_ms=start + 60_000,
        final=False,
        confidence=0.95,
        packets=1.0,
        packets_low=1.0,
        packets_high=1.0,
        bytes=1.0,
        bytes_low=1.0,
        bytes_high=1.0,
        sampled_packets=1.0,
        sampled_bytes=1.0,
        flows=1,
        rows=1,
        unknown_rate_rows=0,
        unknown_rate_packets=0.0,
        unknown_rate_bytes=0.0,
    )


class _DownStore:
    def __init__(self) -> None:
        self.down = True
        self.inner = MemorySink()

    def write(self, estimates: Sequence[WindowEstimate]) -> None:
        if self.down:
            raise StoreUnavailableError("down")
        self.inner.write(estimates)


def test_estimates_wait_for_the_store_and_keep_the_latest() -> None:
    """While the store is down estimates are kept (latest per window) and
    written with the next ones once it is back."""
    store = _DownStore()
    sink = DeferringSink(store, (StoreUnavailableError,))
    sink.write([_estimate(0), _estimate(60_000)])
    sink.write([_estimate(0)])
    assert sink.failures == 2 and len(sink.pending) == 2
    store.down = False
    sink.write([_estimate(120_000)])
    assert set(store.inner.latest) == {("t", 0), ("t", 60_000), ("t", 120_000)}
    assert sink.pending == {}


def test_bucket_blobs_read_back_alike_from_memory_and_disk(tmp_path: Path) -> None:
    """Bucket blobs come back in (bucket start, micro-batch) order with the
    bytes written, whether kept in memory, pushed out of its bound (64
    bytes here) or read by a new store on the same file; dropped buckets
    are gone from both."""
    path = tmp_path / "state.sqlite"
    store = SqliteStore(path, blob_cache_bytes=64)
    blobs = {(0, 1): b"a" * 40, (0, 2): b"b" * 40, (60_000, 1): b"c" * 10}
    for (start, mb), data in blobs.items():
        store.put_buckets("k", mb, [Bucket("t", start, 1, 0.0, data)])
    want = [b"a" * 40, b"b" * 40, b"c" * 10]  # the first pushed out by the others
    assert store.bucket_data("k", "t", 0, 120_000) == want
    assert store.bucket_data("k", "t", 60_000, 120_000) == [b"c" * 10]
    again = SqliteStore(path)
    assert again.bucket_data("k", "t", 0, 120_000) == want
    store.drop_buckets("k", "t", 60_000)
    assert store.bucket_data("k", "t", 0, 120_000) == [b"c" * 10]
    assert again.bucket_data("k", "t", 0, 120_000) == [b"c" * 10]
    store.close()
    again.close()


def test_hysteresis_needs_k_of_the_last_n_windows(tmp_path: Path) -> None:
    """With 2 of 3 (windows a minute apart) an alerting window raises a
    detection only if one of the host's two windows before alerted too,
    counted across calls (micro-batches), a restart and per tenant; with
    1 of 1 every alerting window does."""
    m = 60_000
    a, b = _addr("10.0.0.1"), _addr("10.0.0.2")
    rule = Hysteresis(k=2, n=3, slide_ms=m)
    store = SqliteStore(tmp_path / "state.sqlite")
    got = rule.apply(
        store,
        "t",
        np.array([a, a, b, a], dtype="V16"),
        np.array([0, m, 2 * m, 2 * m]),
        np.array([True, True, True, False]),
    )
    # a@0: alone in {-2m, -m, 0}; a@1: a@0 and a@1; b@2: alone; a@2: below.
    assert got.tolist() == [False, True, False, False]
    store.close()
    again = SqliteStore(tmp_path / "state.sqlite")  # a restart
    got = rule.apply(
        again,
        "t",
        np.array([a, a, a], dtype="V16"),
        np.array([3 * m, 5 * m, 8 * m]),
        np.array([True, True, True]),
    )
    # a@3: a@1 and a@3 in {1, 2, 3}; a@5: a@3, a@5; a@8: alone in {6, 7, 8}.
    assert got.tolist() == [True, True, False]
    got = rule.apply(
        again, "u", np.array([a], dtype="V16"), np.array([9 * m]), np.array([True])
    )
    assert got.tolist() == [False]  # tenant t's windows do not count for u
    every = Hysteresis(k=1, n=1, slide_ms=m)
    flags = np.array([True, False, True])
    got = every.apply(
        again, "t", np.array([a, a, b], dtype="V16"), np.array([0, m, 2 * m]), flags
    )
    assert got.tolist() == [True, False, True]
    again.close()


def test_hysteresis_counts_alerts_of_an_older_state_file(tmp_path: Path) -> None:
    """An alert noted one row per host (the layout before alert sets) still
    counts towards K of N, and is forgotten like the others."""
    import sqlite3  # noqa: PLC0415

    m = 60_000
    a = _addr("10.0.0.1")
    path = tmp_path / "state.sqlite"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE host_alerts (tenant_id TEXT NOT NULL, host BLOB NOT NULL, "
        "window_start_ms INTEGER NOT NULL, "
        "PRIMARY KEY (tenant_id, host, window_start_ms))"
    )
    old.execute("INSERT INTO host_alerts VALUES ('t', ?, 0)", (a.tobytes(),))
    old.commit()
    old.close()
    store = SqliteStore(path)
    rule = Hysteresis(k=2, n=3, slide_ms=m)
    hosts = np.array([a], dtype="V16")
    # a@0 (old row) and a@m: 2 of {-m, 0, m}.
    assert rule.apply(store, "t", hosts, np.array([m]), np.array([True])).tolist() == [
        True
    ]
    # a@5m alone in {3m, 4m, 5m}; then what is before 3m is forgotten: the
    # old row a@0 and a@m.
    got = rule.apply(store, "t", hosts, np.array([5 * m]), np.array([True]))
    assert got.tolist() == [False]
    assert store.alert_keys_since("t", 0) == {a.tobytes() + (5 * m).to_bytes(8, "big")}
    store.close()


def test_tenant_figures_by_hand() -> None:
    """Effective rate is scaled over sampled packets for known rates;
    exporters keep their latest flow end; relays their latest batch."""
    t = TenantBatch()
    rows = ROWS.copy()
    rows["exporter"][:3] = _addr("192.0.2.1")
    rows["exporter"][3:] = _addr("192.0.2.2")
    rows["sampling_rate"][0] = 10
    t.add_rows("r1", rows)
    t.add_relay("r1", 5)
    t.add_relay("r1", 3)
    # packets of known rate: 1@10, 1@100, 2@100, 1@100, 1@100 -> 510 / 6
    assert t.effective_sampling_rate == pytest.approx(510 / 6)
    assert t.flows == 6
    assert t.relays_seen_ms == {"r1": 5}
    assert t.exporters_seen_ms == {
        ("192.0.2.1", "r1"): 2_500,
        ("192.0.2.2", "r1"): 5_500,
    }


def test_per_tenant_networks_and_bad_settings(tmp_path: Path) -> None:
    """A tenant's own networks replace the default; the demo tenant has
    147.32.0.0/16; bad CIDRs and modes are refused by name."""
    config = EngineConfig(
        "s", str(tmp_path), tenant_networks=tenant_networks({"acme": ["10.1.0.0/16"]})
    )
    assert config.networks_for("acme").cidrs == ("10.1.0.0/16",)
    assert "192.168.0.0/16" in config.networks_for("other").cidrs
    assert (
        "147.32.0.0/16" in EngineConfig("s", str(tmp_path)).networks_for("local").cidrs
    )
    with pytest.raises(ConfigError, match="acme"):
        EngineConfig("s", str(tmp_path), tenant_networks=(("acme", ("10.1.0.1/16",)),))
    with pytest.raises(ConfigError, match="detections"):
        EngineConfig("s", str(tmp_path), detections="some")
    with pytest.raises(ConfigError, match="feature_slide_s"):
        EngineConfig("s", str(tmp_path), feature_window_s=60, feature_slide_s=120)
    with pytest.raises(ConfigError, match="alert_k"):
        EngineConfig("s", str(tmp_path), alert_k=3, alert_n=2)


def test_a_replay_closes_its_windows_again(tmp_path: Path) -> None:
    """Windows a micro-batch closed are closed again by its replay (so
    their final estimates are rewritten whole), not by a later one; the
    latest window closed before a micro-batch bounds what may be dropped."""
    from cloud.engine.store import WindowPartial  # noqa: PLC0415

    store = SqliteStore(tmp_path / "s.sqlite")
    stats = dict.fromkeys(
        (
            "rows",
            "sampled_packets",
            "sampled_bytes",
            "est_packets",
            "var_packets",
            "est_bytes",
            "var_bytes",
            "unknown_rate_rows",
            "unknown_rate_packets",
            "unknown_rate_bytes",
        ),
        1.0,
    )
    for start in (0, 60_000):
        store.add_partials(
            0, [WindowPartial("t", start, start + 60_000, start + 1, 1, stats)]
        )
    assert store.advance_watermarks(0, {"t": 60_000}, 4) == [("t", 0)]
    assert store.advance_watermarks(0, {"t": 60_000}, 4) == [("t", 0)]
    assert store.advance_watermarks(0, {"t": 60_000}, 5) == []
    assert store.advance_watermarks(0, {"t": 120_000}, 6) == [("t", 60_000)]
    assert store.closed_before("t", 4) is None
    assert store.closed_before("t", 6) == 0
    assert store.closed_before("t", 7) == 60_000
    store.close()


def test_bench_engine_command_reports_every_stage() -> None:
    """`sampleflow bench engine --skip-spark` prints a rate for decoding
    and for the driver's work with the model in-process and over HTTP."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "bench",
            "engine",
            "--skip-spark",
            "--rows",
            "20000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("engine bench: 20,000 flow rows")
    for stage in ("decode", "driver, model in-process", "driver, model over HTTP"):
        (line,) = [x for x in lines if x.startswith(stage)]
        rates = [float(v.replace(",", "")) for v in line[34:].split()[:2]]
        assert all(r > 0 for r in rates), line
