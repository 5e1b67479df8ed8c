"""What the tests of both batch wire format versions share.

tests/test_wire.py (version 1) and tests/test_wire_v2.py (version 2) build
the same header, the same hand-made rows and real captures' rows, and
check the header a caller gave and a window split under a record limit in
the same terms; the checks of one version's own layout stay in its file.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edge_agent.aggregate import AGG_DTYPE, reduce_rows, to_aggregate_rows
from edge_agent.collect.pcap import read_capture
from edge_agent.flows.decoder import FlowDecoder
from edge_agent.flows.schema import address_bytes
from edge_agent.wire import BatchHeader, EncodedBatch, HeaderFields

#: The header fields every test batch is written with.
FIELDS = HeaderFields("acme", "relay-7", 1_700_000_000_000, 1_700_000_010_000, "m-3")
#: Bytes of one aggregated row.
ROW = AGG_DTYPE.itemsize
#: Real captures, one per export protocol, whose rows must round-trip.
ROUND_TRIP_CAPTURES = (
    "nf5-freebsd-ng_netflow.pcap",
    "nf9-nprobe-many-templates.pcap",
    "ipfix-cisco-ipv6-exporter.pcap",
    "w-goflow2-sflow.pcap",
)


def seqs(start: int = 100) -> Callable[[], int]:
    """A next_seq callable counting from ``start``."""
    return itertools.count(start).__next__


def rows_of(n: int, seed: int = 1) -> np.ndarray:
    """n aggregated rows with varied, partly random values."""
    rng = np.random.default_rng(seed)
    rows = np.zeros(n, dtype=AGG_DTYPE)
    addr = np.zeros((n, 16), dtype=np.uint8)
    addr[:, 10:12] = 0xFF
    addr[:, 12:] = rng.integers(0, 256, (n, 4))
    rows["src_addr"] = addr.view("V16").ravel()
    rows["dst_addr"] = np.void(address_bytes("198.51.100.7"))
    rows["exporter"] = np.void(address_bytes("192.0.2.1"))
    rows["src_port"] = rng.integers(0, 65536, n)
    rows["dst_port"] = 443
    rows["protocol"] = 6
    rows["bytes"] = rng.integers(40, 10**9, n)
    rows["packets"] = rng.integers(1, 10**6, n)
    rows["flow_count"] = rng.integers(1, 50, n)
    rows["time_start"] = 1_700_000_000_000 + rng.integers(0, 10_000, n)
    rows["time_end"] = rows["time_start"] + rng.integers(0, 60_000, n)
    rows["sampling_rate"] = 100
    return rows


def rows_from_bytes(raw_rows: Sequence[bytes], repeat: int) -> np.ndarray:
    """Arbitrary row-sized byte strings (repeated ``repeat`` times) as rows,
    their padding zeroed (no writer ships padding)."""
    rows = np.frombuffer(b"".join(raw_rows) * repeat, dtype=AGG_DTYPE).copy()
    rows["_kpad"] = np.void(bytes(7))
    rows["_vpad"] = np.void(bytes(2))
    return rows


def capture_rows(path: Path) -> np.ndarray:
    """A real capture decoded, aggregated and reduced: the rows a relay
    would ship for it."""
    datagrams, _ = read_capture(path)
    return reduce_rows(to_aggregate_rows(FlowDecoder().decode_many(datagrams)))


def multiset(rows: np.ndarray, scores: np.ndarray | None = None) -> list[bytes]:
    """Rows (with their score's bytes) as a sorted list: order-free equality."""
    raw = [bytes(r) for r in rows.view(np.dtype((np.void, ROW)))]
    if scores is not None:
        raw = [r + s.tobytes() for r, s in zip(raw, scores, strict=True)]
    return sorted(raw)


def assert_caller_header(
    h: BatchHeader, batch: EncodedBatch, n_rows: int, created_ms: int
) -> None:
    """A decoded header holds what the caller gave: :data:`FIELDS`, the
    first number of :func:`seqs`, one part of one, ``n_rows`` rows, the
    creation time and the encoder's batch id."""
    assert (h.tenant_id, h.relay_id, h.seq, h.record_count) == (
        "acme",
        "relay-7",
        100,
        n_rows,
    )
    assert (h.window_start_ms, h.window_end_ms) == (
        1_700_000_000_000,
        1_700_000_010_000,
    )
    assert (h.model_version, h.part, h.parts, h.created_ms) == (
        "m-3",
        0,
        1,
        created_ms,
    )
    assert h.batch_id == batch.header.batch_id


def assert_split(
    batches: Sequence[EncodedBatch], key: str, limit: int, first_seq: int
) -> None:
    """Batches of one window split under ``limit`` bytes a record (data and
    partition key): more than three, each under the limit, numbered part
    i of n, consecutive sequence numbers from ``first_seq``, distinct ids."""
    assert len(batches) > 3
    for i, batch in enumerate(batches):
        assert len(batch.data) + len(key) <= limit
        assert batch.record_bytes <= limit
        assert (batch.header.part, batch.header.parts) == (i, len(batches))
        assert batch.header.seq == first_seq + i
    assert len({b.header.batch_id for b in batches}) == len(batches)


def flip_middle_byte(data: bytes) -> bytes:
    """``data`` with the bits of its middle byte inverted."""
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)
