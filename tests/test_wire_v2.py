"""Batch wire format v2: the byte layout of docs/wire-format.md, round trips
(rows sorted, totals conserved), version 1 still read the same, Kinesis
limits, and specific errors on hostile or truncated input.

Batches are built and taken apart here by hand with msgpack and zstandard
following the spec (the dictionary read from its file and checked against
the SHA-256 the spec gives), so the tests check the documented layout, not
just that the encoder and decoder agree with each other.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.aggregate import AGG_COLUMNS, AGG_DTYPE
from edge_agent.flows.schema import address_bytes
from edge_agent.wire import (
    KINESIS_MAX_RECORD_BYTES,
    CorruptBatchError,
    OversizedBatchError,
    TruncatedColumnsError,
    WireFormatError,
    decode_batch,
    encode_batches,
)
from edge_agent.wire.batch import MAX_BATCH_ROWS
from tests.reference import read_csv
from tests.wire_helpers import (
    FIELDS,
    ROUND_TRIP_CAPTURES,
    ROW,
    assert_caller_header,
    assert_split,
    capture_rows,
    flip_middle_byte,
    multiset,
    rows_from_bytes,
    rows_of,
    seqs,
)

ROOT = Path(__file__).resolve().parents[1]

#: SHA-256 of the v2 dictionary, copied from docs/wire-format.md.
DICTIONARY_SHA256 = "846e6df718506025c08cd333eb4599146f502fcb451f8a9b81591f62a4dc410e"


def spec_dictionary() -> zstandard.ZstdCompressionDict:
    """The v2 dictionary file, checked against the spec's SHA-256."""
    data = (ROOT / "edge_agent" / "wire" / "dictionary_v2.zdict").read_bytes()
    assert hashlib.sha256(data).hexdigest() == DICTIONARY_SHA256
    assert len(data) == 16_384
    return zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_FULLDICT)


MAGICLESS = zstandard.FORMAT_ZSTD1_MAGICLESS


def body_of(data: bytes) -> dict[str, Any]:
    """Take a v2 batch apart: preamble, magicless zstd frame, msgpack map."""
    assert data[:4] == b"SFB\x02"
    decompressor = zstandard.ZstdDecompressor(
        dict_data=spec_dictionary(), format=MAGICLESS
    )
    body: dict[str, Any] = msgpack.unpackb(decompressor.decompress(data[4:]))
    return body


def batch_of(body: Any, *, content_size: bool = True) -> bytes:
    """Build a v2 batch by hand from a msgpack body."""
    params = zstandard.ZstdCompressionParameters.from_level(
        3,
        format=MAGICLESS,
        write_checksum=True,
        write_content_size=content_size,
        write_dict_id=False,
    )
    compressor = zstandard.ZstdCompressor(
        dict_data=spec_dictionary(), compression_params=params
    )
    return b"SFB\x02" + compressor.compress(msgpack.packb(body))


#: Bit of every required column id: a body with z = ALL_ZERO and no
#: entries is n all-zero rows.
ALL_ZERO = sum(1 << cid for cid in range(1, 21))


def header(n: int, **extra: Any) -> dict[str, Any]:
    """A hand-written v2 header of n rows (every column zero unless given)."""
    body: dict[str, Any] = {
        "v": 0, "t": "acme", "r": "relay-7", "i": bytes(range(10)), "s": 9,
        "w": 10_000, "l": 10_000, "n": n, "e": 2_345, "z": ALL_ZERO, "c": [],
    }  # fmt: skip
    body.update(extra)
    return body


def with_columns(n: int, *entries: list[Any]) -> dict[str, Any]:
    """A v2 body of n rows with these entries, every other column zero."""
    given = {entry[0] for entry in entries}
    zero = sum(1 << cid for cid in range(1, 21) if cid not in given)
    return header(n, z=zero, c=list(entries))


def ip(text: str) -> bytes:
    """16-byte column form of an address."""
    return address_bytes(text)


# --- layout ----------------------------------------------------------------


def test_layout_matches_the_spec() -> None:
    """Preamble SFB + major 2, a zstd frame without its magic number that
    declares its size and carries a checksum, a msgpack map with the
    documented keys, the batch id's random 80 bits in 'i'."""
    rows = rows_of(3)
    [batch] = encode_batches(rows, FIELDS, seqs(7), "192.0.2.1", now_ms=5)
    assert batch.data[4:8] != zstandard.MAGIC_NUMBER.to_bytes(4, "little")
    params = zstandard.get_frame_parameters(b"\x28\xb5\x2f\xfd" + batch.data[4:])
    assert params.content_size > 0
    assert params.has_checksum
    assert params.dict_id == 0
    body = body_of(batch.data)
    # in_if, out_if, present, tos, export_proto, ip_version, direction and
    # tcp_flags are all zero in rows_of: named in z, no entries
    assert set(body) == {"v", "t", "r", "i", "s", "w", "l", "n", "e", "m", "z", "c"}
    zero_ids = {7, 8, 9, 13, 14, 15, 16, 20}
    assert body["z"] == sum(1 << cid for cid in zero_ids)
    assert {entry[0] for entry in body["c"]} == set(range(1, 21)) - zero_ids | set()
    assert (body["t"], body["r"], body["m"], body["s"], body["n"]) == (
        "acme",
        "relay-7",
        "m-3",
        7,
        3,
    )
    assert (body["w"], body["l"], body["e"]) == (
        1_700_000_000_000,
        10_000,
        5 - 1_700_000_000_000,
    )
    bid = batch.header.batch_id
    assert body["i"] == bid.bytes[6:]
    assert bid.int >> 80 == 5  # the id's 48-bit time is created_ms
    decoded = decode_batch(batch.data)
    assert decoded.header.batch_id == bid
    assert decoded.header.version == (2, 0)
    assert decoded.header.created_ms == 5


def test_hand_built_specs_decode() -> None:
    """Every spec of the table, written by hand, gives the values the spec
    says (computed here); columns named in z are zero."""
    n = 3
    planes_1 = bytes([5, 250])  # DIFF: two 1-byte offsets
    body = with_columns(
        n,
        [1, 3, planes_1, 1, 1_000],  # DIFF: 1000, 1005, 1255
        [2, 4, 1, [1, (7).to_bytes(8, "little")]],  # DELTA of 1 + CONST 7
        [3, 1, ip("192.0.2.9")],  # CONST address
        [4, 6, [3, bytes([1, 255]), 1, 0x0A000001]],  # IPV4 DIFF
        [5, 6, [0, bytes([10, 0, 0, 9, 10, 0, 0, 8, 10, 0, 0, 9])]],  # IPV4 RAW
        [10, 5, 2, [0, np.array([80, 443], "<u2").tobytes()], bytes([1, 0, 1]), 1],
        [11, 2, bytes([0, 0, 1, 0, 1, 0]), 2, 1_000],  # FOR width 2 planes
        [17, 2, bytes([3, 0, 0, 2, 0, 0, 1, 0, 1]), 3, 10],  # FOR width 3
        [12, 1, bytes([17])],
        [32, 5, 2, [0, np.array([0.5, np.nan], "<f4").tobytes()], bytes(3), 1],
    )
    decoded = decode_batch(batch_of(body))
    c = decoded.columns
    assert c["time_start"].tolist() == [1_000, 1_005, 1_255]
    assert c["time_end"].tolist() == [1_007, 1_012, 1_262]
    assert c["exporter"].tolist() == [ip("192.0.2.9")] * 3
    assert c["src_addr"].tolist() == [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.1.1")]
    assert c["dst_addr"].tolist() == [ip("10.0.0.9"), ip("10.0.0.8"), ip("10.0.0.9")]
    assert c["src_port"].tolist() == [443, 80, 443]
    assert c["dst_port"].tolist() == [1_000, 1_256, 1_001]
    # offsets 0x010203, 0x000000, 0x010000 in three planes, plus 10
    assert c["bytes"].tolist() == [0x010203 + 10, 10, 0x010000 + 10]
    assert c["protocol"].tolist() == [17] * 3
    assert c["score"].tolist() == [0.5] * 3
    for name in ("packets", "flow_count", "in_if", "direction", "tcp_flags"):
        assert c[name].tolist() == [0] * 3
    assert set(c) == set(AGG_COLUMNS) | {"score"}
    for name, values in c.items():
        assert values.shape == (3,)
        want = AGG_DTYPE[name] if name != "score" else np.dtype("<f4")
        assert values.dtype == want, name
    assert decoded.header.batch_id == uuid.UUID(
        bytes=(12_345).to_bytes(6, "big") + bytes(range(10))
    )


def test_signed_bases_and_wrapping_arithmetic() -> None:
    """Arithmetic is modulo 2**bits: a negative FOR base and a DIFF running
    over the top of int64 give the two's-complement values."""
    top = (1 << 63) - 1
    body = with_columns(
        2,
        [1, 2, bytes([0, 1]), 1, -1],  # -1, 0
        [2, 3, bytes([2]), 1, top],  # top, top + 2 wraps to -2**63 + 1
    )
    c = decode_batch(batch_of(body)).columns
    assert c["time_start"].tolist() == [-1, 0]
    assert c["time_end"].tolist() == [top, -(1 << 63) + 1]


def test_encoder_uses_the_documented_specs() -> None:
    """Rows sorted by source address: the source column is IPV4 DIFF, a
    constant exporter CONST, time_end a DELTA of time_start, few distinct
    ports a DICT, zero columns only in z."""
    rows = np.zeros(40, dtype=AGG_DTYPE)
    rows["exporter"] = np.void(ip("192.0.2.1"))
    rows["src_addr"] = [np.void(ip(f"10.0.{i % 4}.{40 - i}")) for i in range(40)]
    rows["dst_addr"] = np.void(ip("198.51.100.7"))
    rows["dst_port"] = [(53, 443)[i % 2] for i in range(40)]
    rows["time_start"] = 1_700_000_000_000 + np.arange(40) * 97
    rows["time_end"] = rows["time_start"] + 5
    rows["bytes"] = 1000 + np.arange(40)
    [batch] = encode_batches(rows, FIELDS, seqs(), "k")
    body = body_of(batch.data)
    cols = {entry[0]: entry[1:] for entry in body["c"]}
    assert cols[3] == [1, ip("192.0.2.1")]
    assert cols[4][0] == 6 and cols[4][1][0] == 3  # IPV4 of a DIFF
    assert cols[4][1][3] == 0x0A000004  # first: the smallest, 10.0.0.4
    assert cols[2] == [4, 1, [1, (5).to_bytes(8, "little")]]
    assert cols[11][:2] == [5, 2]  # DICT of two values
    assert cols[5] == [1, ip("198.51.100.7")]
    zero_ids = {6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 18, 19, 20}
    assert body["z"] == sum(1 << cid for cid in zero_ids)
    assert set(cols) == {1, 2, 3, 4, 5, 11, 17}


def test_rows_arrive_sorted_with_their_scores() -> None:
    """The batch holds the same rows, ordered by source then destination
    address in network order, each with its own score."""
    rows = rows_of(200, seed=3)
    rows["dst_addr"][::3] = np.void(ip("2001:db8::1"))
    scores = np.random.default_rng(4).random(200).astype(np.float32)
    [batch] = encode_batches(rows, FIELDS, seqs(), "k", scores=scores)
    decoded = decode_batch(batch.data)
    back = decoded.records()
    pairs = zip(back["src_addr"], back["dst_addr"], strict=True)
    keys = [bytes(s) + bytes(d) for s, d in pairs]
    assert keys == sorted(keys)
    assert multiset(back, decoded.columns["score"]) == multiset(rows, scores)


# --- round trips -------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.binary(min_size=ROW, max_size=ROW), min_size=1, max_size=60),
    st.integers(1, 3),
    st.one_of(st.none(), st.binary(min_size=720, max_size=720)),
)
def test_any_rows_survive_a_round_trip(
    raw_rows: list[bytes], repeat: int, raw_scores: bytes | None
) -> None:
    """Arbitrary bytes as rows (negative times, full-range counters, random
    addresses and scores, NaN patterns included; repeats for CONST and
    DICT) come back as the same rows, each with its score."""
    rows = rows_from_bytes(raw_rows, repeat)
    scores = None
    if raw_scores is not None:
        scores = np.frombuffer(raw_scores, dtype="<f4")[: rows.shape[0]].copy()
    [batch] = encode_batches(rows, FIELDS, seqs(), "k", scores=scores)
    decoded = decode_batch(batch.data)
    assert multiset(decoded.records(), decoded.columns.get("score")) == multiset(
        rows, scores
    )


@pytest.mark.parametrize("name", ROUND_TRIP_CAPTURES)
def test_real_capture_rows_survive_a_round_trip(captures_dir: Path, name: str) -> None:
    """Aggregated rows of a real capture come back as the same rows, with
    the header the caller gave."""
    rows = capture_rows(captures_dir / name)
    [batch] = encode_batches(rows, FIELDS, seqs(), "192.0.2.1", now_ms=42)
    decoded = decode_batch(batch.data)
    assert multiset(decoded.records()) == multiset(rows)
    assert_caller_header(decoded.header, batch, len(rows), created_ms=42)


@pytest.mark.parametrize(
    "name", ["nf5-freebsd-ng_netflow.pcap", "nf9-nprobe-many-templates.pcap"]
)
def test_totals_conserved_against_tshark(captures_dir: Path, name: str) -> None:
    """Bytes, packets and records read back from the v2 batches of a real
    capture (split into small batches) equal the sums of tshark's decode."""
    reference = [
        r for r in read_csv(captures_dir / f"{name}.tshark.csv") if r["bytes"] != ""
    ]
    rows = capture_rows(captures_dir / name)
    batches = encode_batches(rows, FIELDS, seqs(), "k", max_record_bytes=400)
    assert len(batches) > 1
    cols = [decode_batch(b.data).columns for b in batches]
    assert sum(int(c["bytes"].sum()) for c in cols) == sum(
        int(r["bytes"]) for r in reference
    )
    assert sum(int(c["packets"].sum()) for c in cols) == sum(
        int(r["packets"]) for r in reference
    )
    assert sum(int(c["flow_count"].sum()) for c in cols) == len(reference)


def test_version_1_and_2_give_the_same_columns() -> None:
    """The same rows written as v1 and as v2 decode to the same column
    names, dtypes, header fields (but the version) and rows."""
    rows = rows_of(300, seed=5)
    scores = np.linspace(0, 1, 300, dtype=np.float32)
    out = {}
    for major in (1, 2):
        [batch] = encode_batches(
            rows, FIELDS, seqs(), "k", scores=scores, now_ms=77, format_major=major
        )
        out[major] = decode_batch(batch.data)
    one, two = out[1], out[2]
    assert one.columns.keys() == two.columns.keys()
    for name in one.columns:
        assert one.columns[name].dtype == two.columns[name].dtype, name
    assert multiset(one.records(), one.columns["score"]) == multiset(
        two.records(), two.columns["score"]
    )
    assert np.array_equal(one.records(), rows)  # v1 keeps the order given
    h1, h2 = one.header, two.header
    assert (h1.version, h2.version) == ((1, 0), (2, 0))
    same = ("tenant_id", "relay_id", "seq", "window_start_ms", "window_end_ms",
            "record_count", "model_version", "part", "parts", "created_ms")  # fmt: skip
    for field in same:
        assert getattr(h1, field) == getattr(h2, field), field


def test_v2_is_smaller_than_v1_on_real_rows(captures_dir: Path) -> None:
    """On a real capture's rows, version 2 ships fewer bytes than version 1."""
    rows = capture_rows(captures_dir / "nf9-nprobe-many-templates.pcap")
    sizes = {
        major: sum(
            len(b.data)
            for b in encode_batches(rows, FIELDS, seqs(), "k", format_major=major)
        )
        for major in (1, 2)
    }
    assert sizes[2] < sizes[1]


# --- Kinesis limits ------------------------------------------------------------


def test_large_window_splits_under_the_record_limit() -> None:
    """A window too big for one record becomes several batches, each under
    the limit (data + partition key), numbered, with consecutive seqs and
    distinct ids; together they hold every row."""
    rows = rows_of(20_000)
    key = "p" * 200
    batches = encode_batches(rows, FIELDS, seqs(50), key, max_record_bytes=60_000)
    assert_split(batches, key, 60_000, first_seq=50)
    assert all(batch.data[:4] == b"SFB\x02" for batch in batches)
    back = np.concatenate([decode_batch(b.data).records() for b in batches])
    assert multiset(back) == multiset(rows)


@pytest.mark.slow
def test_row_bound_splits_a_window_that_compresses_to_nothing() -> None:
    """Rows that compress to almost nothing still split at MAX_BATCH_ROWS
    rows a batch (the reader's allocation bound), each under 1 MiB."""
    n = MAX_BATCH_ROWS + 1_000
    rows = np.zeros(n, dtype=AGG_DTYPE)
    rows["flow_count"] = 1
    batches = encode_batches(rows, FIELDS, seqs(), "k")
    assert len(batches) == 2
    assert all(b.header.record_count <= MAX_BATCH_ROWS for b in batches)
    assert all(b.record_bytes <= KINESIS_MAX_RECORD_BYTES for b in batches)
    assert sum(int(decode_batch(b.data).columns["flow_count"].sum()) for b in batches)
    assert sum(b.header.record_count for b in batches) == n


def test_bad_format_major_is_refused() -> None:
    """Writers write version 1 or 2 only."""
    with pytest.raises(WireFormatError, match="format_major"):
        encode_batches(rows_of(1), FIELDS, seqs(), "k", format_major=3)


# --- hostile and truncated input ------------------------------------------------


def test_decompression_bomb_is_refused_before_allocating() -> None:
    """A v2 frame declaring more than the bound is refused from its header."""
    params = zstandard.ZstdCompressionParameters.from_level(3, format=MAGICLESS)
    frame = zstandard.ZstdCompressor(compression_params=params).compress(
        b"\x00" * (64 * 1024 * 1024)
    )
    assert len(frame) < 10_000
    with pytest.raises(OversizedBatchError, match="67108864 decompressed bytes"):
        decode_batch(b"SFB\x02" + frame)
    with pytest.raises(OversizedBatchError):
        decode_batch(batch_of(header(3)), max_decompressed=20)


def test_row_count_over_the_bound_is_refused() -> None:
    """A tiny body claiming more rows than MAX_BATCH_ROWS (all zero, so
    nothing per row) is refused before any column is allocated."""
    with pytest.raises(OversizedBatchError, match="rows"):
        decode_batch(batch_of(header(MAX_BATCH_ROWS + 1)))
    assert decode_batch(batch_of(header(4))).columns["bytes"].tolist() == [0] * 4


def test_frame_without_content_size_is_corrupt() -> None:
    """The frame must declare its size (the bomb bound)."""
    with pytest.raises(CorruptBatchError, match="declare"):
        decode_batch(batch_of(header(1), content_size=False))


def test_frame_with_its_magic_number_is_corrupt() -> None:
    """A v2 frame is magicless: an ordinary zstd frame after SFB 2 is not
    read as one."""
    frame = zstandard.ZstdCompressor(dict_data=spec_dictionary()).compress(
        msgpack.packb(header(1))
    )
    with pytest.raises(CorruptBatchError):
        decode_batch(b"SFB\x02" + frame)


def test_truncated_and_extended_records_are_corrupt() -> None:
    """A record cut short or with bytes after the frame fails clearly."""
    [batch] = encode_batches(rows_of(50), FIELDS, seqs(), "k")
    with pytest.raises(CorruptBatchError, match="zstd"):
        decode_batch(batch.data[:-10])
    with pytest.raises(CorruptBatchError, match="zstd"):
        decode_batch(batch.data + b"\x00junk")
    with pytest.raises(CorruptBatchError):
        decode_batch(b"SFB\x02")


def test_flipped_byte_fails_the_checksum() -> None:
    """A corrupted byte inside the frame is caught (zstd checksum)."""
    [batch] = encode_batches(rows_of(50), FIELDS, seqs(), "k")
    with pytest.raises(CorruptBatchError):
        decode_batch(flip_middle_byte(batch.data))


U8 = (1).to_bytes(8, "little")


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (header(2, i=bytes(16)), CorruptBatchError, "10 bytes"),
        (header(2, z="all"), CorruptBatchError, "'z'"),
        (header(2, z=-1), CorruptBatchError, "'z' is negative"),
        (header(2, z=0), CorruptBatchError, "missing"),
        (with_columns(2, [17, 9, b""]), CorruptBatchError, "unknown encoding 9"),
        (with_columns(2, [17, 2, b"\x00\x00"]), CorruptBatchError, "takes 4 items"),
        (with_columns(2, [17, 2, bytes(2), 0, 0]), CorruptBatchError, "width"),
        (with_columns(2, [17, 2, bytes(18), 9, 0]), CorruptBatchError, "width"),
        (with_columns(2, [11, 2, bytes(6), 3, 0]), CorruptBatchError, "width"),
        (with_columns(2, [11, 2, bytes(2), 1, 1 << 16]), CorruptBatchError, "base"),
        (with_columns(2, [17, 2, bytes(3), 1, 0]), TruncatedColumnsError, "3 bytes"),
        (with_columns(2, [17, 2, "ab", 1, 0]), TruncatedColumnsError, "str"),
        (with_columns(2, [17, 0, bytes(15)]), TruncatedColumnsError, "15 bytes"),
        (with_columns(2, [17, 1, bytes(4)]), TruncatedColumnsError, "4 bytes"),
        (with_columns(2, [17, 3, bytes(2), 1, 0]), TruncatedColumnsError, "2 bytes"),
        (with_columns(2, [17, 5, 3, [1, U8], bytes(2), 1]), CorruptBatchError,
         "DICT count"),
        (with_columns(2, [17, 5, 1, [1, U8], bytes([0, 1]), 1]), CorruptBatchError,
         "beyond its 1-value table"),
        (with_columns(2, [17, 5, 1, [5, 1, [1, U8], bytes(1), 1], bytes(2), 1]),
         CorruptBatchError, "not allowed here"),
        (with_columns(2, [17, 4, 1, [1, U8]]), CorruptBatchError, "DELTA reference"),
        (with_columns(2, [1, 4, 2, [1, U8]], [2, 4, 1, [1, U8]]), CorruptBatchError,
         "DELTA reference"),
        (with_columns(2, [1, 4, 17, [1, U8]], [17, 1, U8]), CorruptBatchError,
         "DELTA reference 17"),
        (with_columns(2, [1, 6, [1, bytes(4)]]), CorruptBatchError, "not allowed"),
        (with_columns(2, [4, 2, bytes(2), 1, 0]), CorruptBatchError,
         "not allowed for addresses"),
        (with_columns(2, [4, 6, [6, [1, bytes(4)]]]), CorruptBatchError, "not allowed"),
        (with_columns(2, [4, 6, [0, bytes(7)]]), TruncatedColumnsError, "7 bytes"),
        (with_columns(2, [4, 5, 1, [6, [1, bytes(4)]], bytes(2), 1]),
         CorruptBatchError, "not allowed for addresses here"),
        (with_columns(2, [17, 1, U8], [17, 1, U8]), CorruptBatchError, "twice"),
        (header(2, c=[[17, 1, U8]]), CorruptBatchError, "both given and marked zero"),
        (with_columns(2, [17]), CorruptBatchError, "column entry"),
        (header(2, c=["x"]), CorruptBatchError, "column entry"),
        (with_columns(2, [True, 1, U8]), CorruptBatchError, "column id"),
        (with_columns(2, [17, []]), CorruptBatchError, "unknown encoding"),
    ],
)  # fmt: skip
def test_hostile_bodies_raise_specific_errors(
    body: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Malformed headers and column specs raise the documented exception
    with a message that names the problem."""
    with pytest.raises(error, match=message):
        decode_batch(batch_of(body))


def test_unknown_columns_and_header_fields_are_ignored() -> None:
    """A newer minor version may add columns, zero bits and header fields."""
    body = header(2, v=4, future={"x": 1}, z=ALL_ZERO | 1 << 40)
    body["c"].append([99, 0, b"anything"])
    decoded = decode_batch(batch_of(body))
    assert decoded.skipped_columns == (99,)
    assert decoded.header.version == (2, 4)
    assert set(decoded.columns) == set(AGG_COLUMNS)


_VALID = encode_batches(rows_of(30, seed=9), FIELDS, seqs(), "k")[0].data


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255), st.integers(0, 40))
def test_damaged_records_raise_wire_format_errors(
    position: int, xor: int, cut: int
) -> None:
    """Any byte of a real v2 record flipped, or the record cut short, gives
    a WireFormatError (or, for an unchanged record, the rows): never another
    exception."""
    damaged = bytearray(_VALID[: len(_VALID) - cut])
    if position < len(damaged):
        damaged[position] ^= xor
    try:
        decoded = decode_batch(bytes(damaged))
    except WireFormatError:
        return
    assert decoded.header.record_count == 30


_leaf = st.one_of(
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.binary(max_size=40),
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8, 255]),
    st.text(max_size=3),
    st.none(),
)
_spec = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=6), max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.lists(_spec, max_size=6)), max_size=8),
    st.integers(0, 5),
    st.integers(0, 1 << 41),
)
def test_random_column_entries_raise_wire_format_errors(
    entries: list[tuple[int, list[Any]]], n: int, zero: int
) -> None:
    """Random column entries (ids, specs, nesting, wrong types) decode or
    raise a WireFormatError; nothing else escapes decode_batch."""
    body = header(n, z=zero, c=[[cid, *spec] for cid, spec in entries])
    try:
        decoded = decode_batch(batch_of(body))
    except WireFormatError:
        return
    for values in decoded.columns.values():
        assert values.shape == (n,)


# --- the relay's window encoder ------------------------------------------------


@pytest.mark.parametrize("major", [1, 2])
def test_window_encoder_writes_the_version_asked(major: int) -> None:
    """The relay's WindowEncoder writes version 2 by default and version 1
    when configured so (a rollout before every reader knows version 2);
    both decode to the window's rows, one group per exporter."""
    from edge_agent.aggregate import AggregatedWindow, FlushReason  # noqa: PLC0415
    from edge_agent.relay.encode import WindowEncoder  # noqa: PLC0415

    rows = rows_of(50, seed=11)
    rows["exporter"][25:] = np.void(ip("192.0.2.2"))
    window = AggregatedWindow(
        FIELDS.window_start_ms, FIELDS.window_end_ms, rows, FlushReason.CLOSED
    )
    encoder = WindowEncoder("acme", "relay-7", "exporter", None)
    if major == 1:
        encoder = WindowEncoder("acme", "relay-7", "exporter", None, format_major=1)
    groups = list(encoder.encode(window, seqs()))
    assert [g.rows for g in groups] == [25, 25]
    back = []
    for group in groups:
        [batch] = group.batches
        assert batch.data[:4] == b"SFB" + bytes([major])
        back.append(decode_batch(batch.data).records())
    assert multiset(np.concatenate(back)) == multiset(rows)
