"""Pre-aggregation: sums per key per window, windowing rules, memory bound.

Expected values come from plain-Python reference sums over the input
records (dicts keyed by tuples, computed here) or from hand computation,
never from the vectorised reducer.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.aggregate import (
    AGG_DTYPE,
    Aggregator,
    FlushReason,
    reduce_rows,
    to_aggregate_rows,
)
from edge_agent.aggregate import reduce as reduce_module
from edge_agent.collect.pcap import read_capture
from edge_agent.flows.decoder import FlowDecoder
from edge_agent.flows.schema import Field, address_bytes, empty_records

W = 10_000  # window, ms
T0 = 1_700_000_000_000  # a window boundary (divisible by W), ms

TIMED = int(
    Field.TIME_START
    | Field.TIME_END
    | Field.SRC_ADDR
    | Field.DST_ADDR
    | Field.SRC_PORT
    | Field.DST_PORT
    | Field.PROTOCOL
    | Field.BYTES
    | Field.PACKETS
    | Field.TCP_FLAGS
)
#: presence bits AGG_DTYPE keeps, written out independently of the module
KEPT = (
    TIMED | int(Field.IN_IF) | int(Field.OUT_IF) | int(Field.TOS) | int(Field.DIRECTION)
)
KEY = (
    "exporter",
    "src_addr",
    "dst_addr",
    "sampling_rate",
    "in_if",
    "out_if",
    "src_port",
    "dst_port",
    "protocol",
    "tos",
    "export_proto",
    "ip_version",
    "direction",
)


def make(rows: list[dict[str, Any]]) -> np.ndarray:
    """FLOW_DTYPE records from dicts; addresses given as text."""
    recs = empty_records(len(rows))
    for i, row in enumerate(rows):
        values = {
            "exporter": "192.0.2.1",
            "src_addr": "10.0.0.1",
            "dst_addr": "10.0.0.2",
            "protocol": 6,
            "ip_version": 4,
            "export_proto": 5,
            "sampling_rate": 100,
            "present": TIMED,
            **row,
        }
        for name, value in values.items():
            is_address = name in ("exporter", "src_addr", "dst_addr", "next_hop")
            recs[i][name] = np.void(address_bytes(value)) if is_address else value
    return recs


def reference(records: np.ndarray) -> dict[tuple[Any, ...], dict[str, int]]:
    """Plain-Python aggregation of FLOW records: key tuple -> merged values."""
    out: dict[tuple[Any, ...], dict[str, int]] = {}
    for rec in records.tolist():
        row = dict(zip(records.dtype.names or (), rec, strict=True))
        key = (*(row[k] for k in KEY), row["present"] & KEPT)
        agg = out.get(key)
        if agg is None:
            out[key] = {
                "bytes": row["bytes"],
                "packets": row["packets"],
                "flow_count": 1,
                "tcp_flags": row["tcp_flags"],
                "time_start": row["time_start"],
                "time_end": row["time_end"],
            }
        else:
            agg["bytes"] += row["bytes"]
            agg["packets"] += row["packets"]
            agg["flow_count"] += 1
            agg["tcp_flags"] |= row["tcp_flags"]
            agg["time_start"] = min(agg["time_start"], row["time_start"])
            agg["time_end"] = max(agg["time_end"], row["time_end"])
    return out


def as_dict(rows: np.ndarray) -> dict[tuple[Any, ...], dict[str, int]]:
    """Aggregated rows in the reference's shape; fails on a repeated key."""
    out: dict[tuple[Any, ...], dict[str, int]] = {}
    for rec in rows.tolist():
        row = dict(zip(rows.dtype.names or (), rec, strict=True))
        key = (*(row[k] for k in KEY), row["present"])
        assert key not in out, f"key {key} appears twice"
        out[key] = {
            k: row[k]
            for k in (
                "bytes",
                "packets",
                "flow_count",
                "tcp_flags",
                "time_start",
                "time_end",
            )
        }
    return out


def test_rows_with_one_key_merge_by_hand() -> None:
    """Three records of one key give one row: sums, OR of flags, min/max times;
    a record differing only in the destination port stays separate."""
    recs = make(
        [
            {"src_port": 1234, "dst_port": 80, "bytes": 100, "packets": 2,
             "tcp_flags": 0x02, "time_start": T0 + 10, "time_end": T0 + 20},
            {"src_port": 1234, "dst_port": 80, "bytes": 50, "packets": 1,
             "tcp_flags": 0x10, "time_start": T0 + 5, "time_end": T0 + 15},
            {"src_port": 1234, "dst_port": 80, "bytes": 7, "packets": 1,
             "tcp_flags": 0x01, "time_start": T0 + 30, "time_end": T0 + 40},
            {"src_port": 1234, "dst_port": 443, "bytes": 9, "packets": 1,
             "tcp_flags": 0x04, "time_start": T0 + 1, "time_end": T0 + 2},
        ]
    )  # fmt: skip
    out = reduce_rows(to_aggregate_rows(recs))
    assert len(out) == 2
    by_port = {int(r["dst_port"]): r for r in out}
    merged = by_port[80]
    assert int(merged["bytes"]) == 157
    assert int(merged["packets"]) == 4
    assert int(merged["flow_count"]) == 3
    assert int(merged["tcp_flags"]) == 0x13
    assert int(merged["time_start"]) == T0 + 5
    assert int(merged["time_end"]) == T0 + 40
    single = by_port[443]
    assert (int(single["bytes"]), int(single["flow_count"])) == (9, 1)


def test_dropped_columns_lose_their_presence_bits() -> None:
    """Presence bits of columns AGG_DTYPE does not keep (next hop, AS numbers)
    are cleared, so two records differing only there merge."""
    recs = make(
        [
            {"bytes": 1, "present": TIMED | int(Field.NEXT_HOP | Field.SRC_AS),
             "next_hop": "192.0.2.254", "src_as": 65001},
            {"bytes": 2, "present": TIMED | int(Field.NEXT_HOP),
             "next_hop": "192.0.2.253"},
        ]
    )  # fmt: skip
    out = reduce_rows(to_aggregate_rows(recs))
    assert len(out) == 1
    assert int(out["present"][0]) == TIMED
    assert int(out["bytes"][0]) == 3


def test_rows_come_out_ordered_by_exporter_then_addresses() -> None:
    """Output rows are sorted by exporter, source, then destination address."""
    recs = make(
        [
            {"exporter": "192.0.2.2", "src_addr": "10.0.0.1"},
            {"exporter": "192.0.2.1", "src_addr": "10.0.0.9"},
            {"exporter": "192.0.2.1", "src_addr": "10.0.0.3"},
            {"exporter": "192.0.2.1", "src_addr": "10.0.0.3", "dst_addr": "10.0.0.1"},
        ]
    )
    out = reduce_rows(to_aggregate_rows(recs))
    got = [
        (bytes(r["exporter"]), bytes(r["src_addr"]), bytes(r["dst_addr"])) for r in out
    ]
    assert got == sorted(got)


def test_to_aggregate_rows_rejects_other_dtypes() -> None:
    """Only FLOW_DTYPE records are accepted."""
    with pytest.raises(TypeError, match="FLOW_DTYPE"):
        to_aggregate_rows(np.zeros(3, dtype=AGG_DTYPE))


def test_hash_collisions_fall_back_to_the_exact_sort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With every key hashing alike, rows are still merged exactly per key."""
    rng = np.random.default_rng(7)
    recs = make([{} for _ in range(500)])
    recs["src_port"] = rng.integers(0, 5, 500)
    recs["dst_port"] = rng.integers(0, 5, 500)
    recs["bytes"] = rng.integers(1, 1000, 500)
    monkeypatch.setattr(
        reduce_module,
        "_hash_words",
        lambda words: np.zeros(words.shape[0], dtype=np.uint64),
    )
    assert as_dict(reduce_rows(to_aggregate_rows(recs))) == reference(recs)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["192.0.2.1", "2001:db8::1"]),  # exporter
            st.integers(0, 3),  # src host
            st.integers(0, 3),  # dst port
            st.sampled_from([0, 1, 100]),  # sampling rate
            st.integers(0, 2**40),  # bytes
            st.integers(0, 2**20),  # packets
            st.integers(0, 0x1FF),  # tcp flags
            st.integers(-5_000, 5_000),  # time offset, ms
        ),
        min_size=1,
        max_size=200,
    )
)
def test_reduction_matches_plain_python(rows: list[tuple[Any, ...]]) -> None:
    """Any mix of records reduces to exactly the plain-Python aggregation."""
    recs = make(
        [
            {
                "exporter": exp,
                "src_addr": f"10.0.0.{host}",
                "dst_port": port,
                "sampling_rate": rate,
                "bytes": b,
                "packets": p,
                "tcp_flags": flags,
                "time_start": T0 + dt - 100,
                "time_end": T0 + dt,
            }
            for exp, host, port, rate, b, p, flags, dt in rows
        ]
    )
    assert as_dict(reduce_rows(to_aggregate_rows(recs))) == reference(recs)


def test_incremental_adds_equal_one_add() -> None:
    """Feeding records in many small chunks gives the same rows as one chunk."""
    rng = np.random.default_rng(3)
    n = 5000
    recs = make([{} for _ in range(n)])
    recs["src_port"] = rng.integers(0, 40, n)
    recs["dst_port"] = rng.integers(0, 40, n)
    recs["bytes"] = rng.integers(1, 1500, n)
    recs["packets"] = 1
    recs["time_end"] = T0 + rng.integers(0, W, n)
    recs["time_start"] = recs["time_end"] - 5
    one = Aggregator(window_ms=W, max_keys=10_000, lateness_ms=0)
    one.add(recs, T0 + W - 1)
    many = Aggregator(window_ms=W, max_keys=10_000, lateness_ms=0)
    for lo in range(0, n, 97):
        many.add(recs[lo : lo + 97], T0 + W - 1)
    [a] = one.flush()
    [b] = many.flush()
    assert as_dict(a.records) == as_dict(b.records) == reference(recs)


def test_windows_follow_record_end_time() -> None:
    """A record counts in the window of its time_end, not its start or the
    receive time."""
    recs = make(
        [
            {"time_start": T0 - 50_000, "time_end": T0 + 1, "bytes": 1},
            {"time_start": T0 + 9_000, "time_end": T0 + W + 2, "bytes": 2},
        ]
    )
    agg = Aggregator(window_ms=W, lateness_ms=30_000)
    assert agg.add(recs, T0 + W + 500) == []
    windows = agg.flush()
    assert [(w.start_ms, int(w.records["bytes"].sum())) for w in windows] == [
        (T0, 1),
        (T0 + W, 2),
    ]
    assert all(w.reason is FlushReason.SHUTDOWN for w in windows)


def test_untimed_late_and_future_records_use_the_receive_time() -> None:
    """No time_end, an end older than the lateness allows, or an end more than
    a window after arrival: the record goes to its receive window, counted."""
    received = T0 + 100_000 + 5
    recs = make(
        [
            {"present": TIMED & ~int(Field.TIME_END), "time_end": 0, "bytes": 1},
            {"time_end": received - 45_000, "bytes": 10},  # window closed 15 s ago
            {"time_end": received + 3 * W, "bytes": 100},  # exporter clock ahead
            {"time_end": received - 15_000, "bytes": 1000},  # within lateness
        ]
    )
    agg = Aggregator(window_ms=W, lateness_ms=30_000)
    agg.add(recs, received)
    got = {w.start_ms: int(w.records["bytes"].sum()) for w in agg.flush()}
    assert got == {T0 + 100_000: 111, T0 + 80_000: 1000}
    assert agg.stats.untimed_records == 1
    assert agg.stats.late_records == 1
    assert agg.stats.future_records == 1


def test_window_closes_once_watermark_passes_end_plus_lateness() -> None:
    """A window is emitted when the watermark reaches its end plus the
    lateness, not before; an older watermark closes nothing."""
    agg = Aggregator(window_ms=W, lateness_ms=5_000)
    agg.add(make([{"time_end": T0 + 1, "bytes": 4}]), T0 + 2)
    assert agg.advance(T0 + W + 4_999) == []
    [closed] = agg.advance(T0 + W + 5_000)
    assert (closed.start_ms, closed.end_ms) == (T0, T0 + W)
    assert closed.reason is FlushReason.CLOSED
    assert closed.input_records == 1
    assert agg.advance(T0) == []
    assert agg.open_windows == 0


def test_records_for_a_closed_window_join_the_oldest_open_one() -> None:
    """After the watermark passed, a record received earlier (a slow pipeline)
    is not lost: it goes to the oldest open window and counts as late."""
    agg = Aggregator(window_ms=W, lateness_ms=0)
    agg.advance(T0 + 3 * W)
    agg.add(make([{"time_end": T0 + 1, "bytes": 5}]), T0 + 2)
    [window] = agg.flush()
    assert window.start_ms == T0 + 3 * W
    assert int(window.records["bytes"][0]) == 5
    assert agg.stats.late_records == 1


def test_max_keys_flushes_the_oldest_window_early() -> None:
    """Past max_keys distinct keys, the oldest window is flushed early and
    counted; the rows held stay within 2 * max_keys; nothing is lost."""
    max_keys = 100
    agg = Aggregator(window_ms=W, max_keys=max_keys, lateness_ms=60_000)
    emitted = []
    all_recs = []
    for i in range(30):
        recs = make([{"src_port": i * 20 + k, "bytes": 1} for k in range(20)])
        recs["time_end"] = T0 + (i % 2) * W + 1
        all_recs.append(recs)
        emitted += agg.add(recs, T0 + W + 2)
        assert agg.held_rows <= 2 * max_keys
    emitted += agg.flush()
    assert agg.stats.early_flushes >= 1
    assert any(w.reason is FlushReason.MAX_KEYS for w in emitted)
    assert sum(int(w.records["bytes"].sum()) for w in emitted) == 600
    assert sum(w.input_records for w in emitted) == 600
    assert agg.stats.records_in == 600


CAPTURES = [
    "nf5-freebsd-ng_netflow.pcap",
    "nf9-nprobe-many-templates.pcap",
    "ipfix-cisco-srv6-with-bmp.pcap",
    "nf9-fortigate-data-before-template.pcap",
    "w-nf5-12-datagrams.pcap",
    "w-goflow2-sflow.pcap",
    "sflow-counters-30-pdus.pcap",
    "nf5-header-sampling-100.pcap",
    "ipfix-physical-interfaces.pcap",
]


@pytest.mark.parametrize("name", CAPTURES)
def test_totals_are_conserved_on_real_captures(captures_dir: Path, name: str) -> None:
    """Replaying a real capture through decoder and aggregator (10 s windows,
    watermark from capture time) conserves bytes and packets per (exporter,
    sampling rate), and flow_count sums to the number of decoded records."""
    datagrams, _ = read_capture(captures_dir / name)
    decoder = FlowDecoder()
    agg = Aggregator(window_ms=W, max_keys=50, lateness_ms=30_000)
    inputs = []
    windows = []
    for lo in range(0, len(datagrams), 8):
        chunk = datagrams[lo : lo + 8]
        recs = decoder.decode_many(chunk)
        inputs.append(recs)
        windows += agg.add(recs, chunk[-1].received_ms)
        windows += agg.advance(chunk[-1].received_ms)
    windows += agg.flush()
    recs = np.concatenate(inputs)
    assert len(recs) > 0

    expected: collections.Counter[tuple[bytes, int, str]] = collections.Counter()
    for rec in recs:
        key = (bytes(rec["exporter"]), int(rec["sampling_rate"]))
        expected[(*key, "bytes")] += int(rec["bytes"])
        expected[(*key, "packets")] += int(rec["packets"])
    got: collections.Counter[tuple[bytes, int, str]] = collections.Counter()
    for window in windows:
        for row in window.records:
            key = (bytes(row["exporter"]), int(row["sampling_rate"]))
            got[(*key, "bytes")] += int(row["bytes"])
            got[(*key, "packets")] += int(row["packets"])
    assert got == expected
    assert sum(w.input_records for w in windows) == len(recs)
    assert agg.stats.records_in == len(recs)


@pytest.mark.parametrize("name", CAPTURES[:4])
def test_one_window_of_a_real_capture_matches_plain_python(
    captures_dir: Path, name: str
) -> None:
    """All of a capture's records in one window aggregate to exactly the
    plain-Python reference rows."""
    datagrams, _ = read_capture(captures_dir / name)
    recs = FlowDecoder().decode_many(datagrams)
    assert as_dict(reduce_rows(to_aggregate_rows(recs))) == reference(recs)
