"""``python -m cloud.bench.wire_floor``: the code lengths it sums and the
rows it measures.

The adaptive code lengths are checked against hand computation of the
PPM method C estimator; the rows against an independent decoder (the
``netflow`` package) of the same IPFIX export, and the whole-replay
transform against the rows it was made of (it must be lossless for its
size to bound anything).
"""

from __future__ import annotations

import math

import netflow
import numpy as np

from cloud.bench.wire_ctu13 import ctu13_datagrams
from cloud.bench.wire_floor import (
    Shipped,
    chain_bits,
    column_floors,
    level_bits,
    multi_window_bytes,
    ship,
    static_entropy_bits,
)
from cloud.training import ctu13
from edge_agent.relay.bench import default_filter
from edge_agent.wire.columns_v2 import decode_columns_v2, encode_columns_v2, sort_rows


def test_level_bits_follow_method_c_by_hand() -> None:
    """Values 5, 5, 7, 5 in one context: the first costs nothing here and
    escapes; the second 5 costs -log2(1/2); 7 escapes at -log2(1/3); the
    last 5 costs -log2(2/5)."""
    bits, escaped = level_bits(np.zeros(4, dtype=np.int64), np.array([5, 5, 7, 5]))
    assert escaped.tolist() == [True, False, True, False]
    expected = [0.0, 1.0, math.log2(3), math.log2(5 / 2)]
    assert np.allclose(bits, expected)


def test_chain_bits_escape_to_the_coarser_context_then_spell() -> None:
    """Contexts A A B B over values 1 1 1 2, then one shared context, then
    10 bits for a value new there.  Row by row: the first 1 escapes A and
    the shared context for free (both empty) and is spelled (10); the
    second costs -log2(1/2) in A; the third escapes B for free and costs
    -log2(2/3) in the shared context (seen twice in two rows, one
    distinct); the 2 escapes B at -log2(1/2), the shared context at
    -log2(1/4) and is spelled (10)."""
    context = np.array([0, 0, 1, 1])
    total = chain_bits(
        [context, np.zeros(4, dtype=np.int64)],
        np.array([1, 1, 1, 2]),
        np.full(4, 10.0),
    )
    by_hand = 10.0 + 1.0 + math.log2(3 / 2) + 1.0 + 2.0 + 10.0
    assert math.isclose(total, by_hand)


def test_static_entropy_of_a_fair_coin_is_one_bit_a_row() -> None:
    """Four rows, two values twice each: 4 bits in all."""
    assert math.isclose(static_entropy_bits(np.array([3, 9, 3, 9])), 4.0)


def _slice_20() -> tuple[Shipped, int, int]:
    replay = ctu13_datagrams(100, 6, [20])
    shipped = ship(
        replay.datagrams, 10_000, 30_000, default_filter(ctu13.INTERNAL_NETWORKS)
    )
    templates: dict[str, dict[int, object]] = {"netflow": {}, "ipfix": {}}
    flows = octets = 0
    for datagram in replay.datagrams:
        for flow in netflow.parse_packet(datagram.payload, templates).flows:
            data = dict(flow.data)
            if "samplingInterval" in data:  # the options record
                continue
            flows += 1
            octets += int(data["octetDeltaCount"])
    return shipped, flows, octets


def test_rows_measured_hold_every_record_and_the_transform_is_lossless() -> None:
    """On CTU-13 slice 20: the rows read back from the batches carry every
    flow record and byte the netflow package decodes from the export; the
    whole-replay version 2 transform decodes back to those rows; the
    per-column floor sums are positive and the order credit is below
    log2(n!) of the batches; one window a record costs about what ships."""
    shipped, flows, octets = _slice_20()
    assert shipped.input_records == flows
    assert int(shipped.columns["flow_count"].sum()) == flows
    assert int(shipped.columns["bytes"].sum()) == octets
    assert sum(shipped.rows_per_batch) == shipped.batch.shape[0]

    c = shipped.columns
    order = sort_rows(c["src_addr"], c["dst_addr"])
    rows = {name: np.take(v, order) for name, v in c.items()}
    entries, zero = encode_columns_v2(rows)
    back, skipped = decode_columns_v2(entries, shipped.batch.shape[0], zero)
    assert skipped == ()
    for name, values in rows.items():
        assert np.array_equal(back[name].view(np.uint8), values.view(np.uint8)), name

    floors, credit, _ = column_floors(shipped)
    assert all(f.stream_bits > 0 and f.batch_bits > 0 for f in floors)
    most = sum(math.lgamma(n + 1) / math.log(2) for n in shipped.rows_per_batch)
    assert 0 < credit <= most

    one = multi_window_bytes(shipped, 1)
    # Same rows, same specs and levels; only the batch ids and the extra
    # window column differ, so within a few percent of what shipped.
    assert abs(one - shipped.shipped_bytes) < 0.05 * shipped.shipped_bytes
