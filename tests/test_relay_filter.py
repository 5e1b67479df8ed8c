"""The filter as the relay runs it: on aggregated rows, window by window,
with a scoring history; roll-up of aggregated rows; per-row scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cloud.training import ctu13
from edge_agent.aggregate import (
    AGG_DTYPE,
    concat_rows,
    reduce_rows,
    to_aggregate_rows,
)
from edge_agent.features import host_window_features
from edge_agent.filter import RelayFilter, ScoringHistory, rollup
from edge_agent.filter.model import default_model_manifest
from edge_agent.flows.schema import Field, address_bytes
from tests.test_filter import RELAY

NETS = list(ctu13.INTERNAL_NETWORKS)


@pytest.fixture(scope="module")
def records() -> np.ndarray:
    """Slices 20-21 of CTU-13 (10 min, the bot active) at 1:100, by end time."""
    recs, _ = ctu13.sampled_records(100, seed=11, slices=[20, 21])
    recs["present"] |= np.uint32(Field.TIME_START | Field.TIME_END)
    return recs[np.argsort(recs["time_end"], kind="stable")]


def test_default_model_is_the_shipped_relay_model() -> None:
    """Without filter.model the relay uses models/relay-...manifest.json."""
    assert default_model_manifest() == RELAY


def test_rollup_of_aggregated_rows_by_hand() -> None:
    """Rows r0 (flow_count 2) and r1 (3): 10.0.0.1:50000/50001 -> :443, ACK,
    one 60 s window -> one row, src_port 0, flow_count 5, 7 packets, 700
    bytes.  r2 (SYN) and r3 (next window) stay apart; r4 of exporter B
    sorts after exporter A's rows."""
    rows = np.zeros(5, dtype=AGG_DTYPE)
    a, b = address_bytes("192.0.2.1"), address_bytes("192.0.2.2")
    rows["exporter"] = [a, a, a, a, b]
    rows["src_addr"] = address_bytes("10.0.0.1")
    rows["dst_addr"] = address_bytes("198.51.100.7")
    rows["src_port"] = [50000, 50001, 50002, 50003, 50004]
    rows["dst_port"] = 443
    rows["protocol"] = 6
    rows["tcp_flags"] = [0x10, 0x10, 0x02, 0x10, 0x10]
    rows["flow_count"] = [2, 3, 1, 4, 6]
    rows["packets"] = [3, 4, 1, 2, 9]
    rows["bytes"] = [300, 400, 60, 200, 900]
    rows["time_start"] = [1000, 2000, 3000, 61000, 5000]
    rows["time_end"] = [1500, 9000, 3000, 61000, 5000]
    out, count = rollup(rows, 60)
    assert out.size == 4
    assert np.array_equal(out["flow_count"], count)
    merged = out[(out["tcp_flags"] == 0x10) & (out["time_start"] == 1000)]
    assert merged.size == 1
    m = merged[0]
    assert (m["src_port"], m["flow_count"], m["packets"], m["bytes"]) == (0, 5, 7, 700)
    assert (m["time_start"], m["time_end"]) == (1000, 9000)
    assert bytes(out["exporter"][-1]) == b
    assert int(count.sum()) == 16
    assert (int(out["packets"].sum()), int(out["bytes"].sum())) == (19, 1860)


def test_rollup_of_aggregated_rows_keeps_features_exact(records: np.ndarray) -> None:
    """Features of rolled-up aggregated rows equal those of the rows."""
    rows = reduce_rows(to_aggregate_rows(records))
    out, _ = rollup(rows, 300)
    assert out.size < rows.size
    before = host_window_features(rows, NETS, 300)
    after = host_window_features(out, NETS, 300)
    np.testing.assert_array_equal(before.host, after.host)
    np.testing.assert_allclose(before.values, after.values, rtol=1e-12)
    for name in ("packets", "bytes", "flow_count"):
        assert int(out[name].sum()) == int(rows[name].sum())


def chunks(records: np.ndarray, seconds: int) -> list[np.ndarray]:
    """Aggregated rows per ``seconds`` of end time, as the relay's windows."""
    slot = records["time_end"] // (seconds * 1000)
    bounds = np.flatnonzero(np.diff(slot)) + 1
    return [reduce_rows(to_aggregate_rows(part)) for part in np.split(records, bounds)]


def test_history_scores_the_model_window_so_far(records: np.ndarray) -> None:
    """Fed 10 s at a time, the last batch's host windows of the two newest
    model windows score as the whole replay scored at once does."""
    pieces = chunks(records, 10)
    streaming = RelayFilter(NETS, RELAY, history_rows=1_000_000)
    for piece in pieces:
        last = streaming.process(piece)
    whole = RelayFilter(NETS, RELAY).process(concat_rows(pieces))
    table = {
        (bytes(h["host"]), int(h["window_start_ms"])): float(h["score"])
        for h in whole.host_scores
    }
    newest = int(pieces[-1]["time_start"].max()) // 300_000 * 300_000
    compared = 0
    for h in last.host_scores:
        if int(h["window_start_ms"]) >= newest - 300_000:
            key = (bytes(h["host"]), int(h["window_start_ms"]))
            assert math.isclose(float(h["score"]), table[key], rel_tol=1e-5)
            compared += 1
    assert compared > 0
    assert streaming.counters.history_restarts == 0


def test_history_bound_restarts_and_is_counted(records: np.ndarray) -> None:
    """A history bound of 50 rows restarts (counted); rows still come out
    with every packet, byte and record."""
    f = RelayFilter(NETS, RELAY, history_rows=50)
    packets = flows = 0
    for piece in chunks(records, 10):
        result = f.process(piece)
        assert result.passthrough_reason is None
        packets += int(result.records["packets"].sum())
        flows += int(result.flow_count.sum())
    assert f.counters.history_restarts > 0
    assert (packets, flows) == (int(records["packets"].sum()), records.size)


def test_history_keeps_only_internal_rows_reduced() -> None:
    """Two records of one host to one service from two client ports become
    one history row with their sums; an external-only record is not kept."""
    rows = np.zeros(3, dtype=AGG_DTYPE)
    rows["src_addr"] = [address_bytes(a) for a in ("10.0.0.1", "10.0.0.1", "8.8.8.8")]
    rows["dst_addr"] = address_bytes("192.0.2.9")
    rows["src_port"] = [40000, 40001, 53]
    rows["dst_port"] = 53
    rows["protocol"] = 17
    rows["packets"] = [1, 2, 5]
    rows["bytes"] = [60, 120, 300]
    rows["flow_count"] = [1, 4, 1]
    rows["time_start"] = [10_000, 20_000, 30_000]
    # A bound of one row forces the reduction now.
    history = ScoringHistory(
        RelayFilter(["10.0.0.0/8"]).networks, window_s=300, max_rows=1
    )
    [held] = history.add(rows, rows["flow_count"].astype(np.int64))
    assert (held["packets"], held["bytes"], held["flow_count"]) == (3, 180, 5)
    assert (held["time_start"], held["dst_port"]) == (0, 53)
    assert history.rows == 1 and history.restarts == 0


def test_row_scores_are_the_higher_host_window_score(records: np.ndarray) -> None:
    """Each output row's score is the max of its source's and destination's
    host window scores (looked up here from host_scores); NaN when neither
    end is internal."""
    result = RelayFilter(NETS, RELAY).process(reduce_rows(to_aggregate_rows(records)))
    assert result.row_scores is not None
    table = {
        (bytes(h["host"]), int(h["window_start_ms"])): float(h["score"])
        for h in result.host_scores
    }
    nan_rows = 0
    for row, got in zip(result.records, result.row_scores, strict=True):
        window = int(row["time_start"]) // 300_000 * 300_000
        ends = [
            table[(bytes(row[c]), window)]
            for c in ("src_addr", "dst_addr")
            if (bytes(row[c]), window) in table
        ]
        if ends:
            assert math.isclose(float(got), max(ends), rel_tol=1e-6)
        else:
            assert math.isnan(float(got))
            nan_rows += 1
    assert 0 < nan_rows < result.records.size


def test_express_rows_keep_their_flow_counts(records: np.ndarray) -> None:
    """Aggregated rows of the flagged infected host come out unchanged (its
    source ports and flow counts), flagged in express_mask."""
    rows = reduce_rows(to_aggregate_rows(records))
    result = RelayFilter(NETS, RELAY).process(rows)
    infected = np.void(address_bytes(ctu13.INFECTED_HOST))
    express = result.records[result.express_mask]
    assert (express["src_addr"] == infected).any()
    mine = rows[rows["src_addr"] == infected]
    kept = express[express["src_addr"] == infected]
    key = ["time_start", "dst_addr", "src_port", "dst_port", "flow_count"]
    assert sorted(kept[key].tolist()) == sorted(mine[key].tolist())
    assert int(result.flow_count.sum()) == records.size
