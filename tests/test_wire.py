"""Batch wire format v1: round trips, the byte layout of docs/wire-format.md,
Kinesis size limits, and clear errors on bad input.

Batches are built or taken apart here by hand with msgpack and zstandard
following the spec, so the tests check the documented layout, not just
that the encoder and decoder agree with each other.  Writers default to
version 2 (tests/test_wire_v2.py); these tests ask for version 1, which
readers keep reading and writers keep writing on request.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
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
from edge_agent.cli import main as cli_main
from edge_agent.flows.schema import address_bytes
from edge_agent.wire import (
    KINESIS_MAX_RECORD_BYTES,
    CorruptBatchError,
    OversizedBatchError,
    TruncatedColumnsError,
    UnknownVersionError,
    WireFormatError,
    decode_batch,
    encode_batches,
    new_batch_id,
)
from edge_agent.wire.dictionary import DICTIONARY_V1
from tests.reference import read_csv, read_datagrams
from tests.wire_helpers import (
    FIELDS,
    ROUND_TRIP_CAPTURES,
    ROW,
    assert_caller_header,
    assert_split,
    capture_rows,
    flip_middle_byte,
    rows_from_bytes,
    rows_of,
    seqs,
)

#: The version 1 writer.
encode_v1 = functools.partial(encode_batches, format_major=1)

#: SHA-256 of the v1 dictionary, copied from docs/wire-format.md.
DICTIONARY_SHA256 = "6ac910be057508b1a0d22d37b8463f9e0f3387735c3a112e55790326b3163421"


def spec_dictionary() -> zstandard.ZstdCompressionDict:
    """The v1 zstd dictionary, checked against the spec's SHA-256."""
    assert hashlib.sha256(DICTIONARY_V1).hexdigest() == DICTIONARY_SHA256
    return zstandard.ZstdCompressionDict(
        DICTIONARY_V1, dict_type=zstandard.DICT_TYPE_RAWCONTENT
    )


def body_of(data: bytes) -> dict[str, Any]:
    """Take a batch apart by hand: preamble, zstd frame, msgpack map."""
    assert data[:4] == b"SFB\x01"
    raw = zstandard.ZstdDecompressor(dict_data=spec_dictionary()).decompress(data[4:])
    body: dict[str, Any] = msgpack.unpackb(raw)
    return body


def batch_of(body: dict[str, Any], major: int = 1) -> bytes:
    """Build a batch by hand from a msgpack body (with the v1 dictionary)."""
    compressor = zstandard.ZstdCompressor(dict_data=spec_dictionary())
    frame = compressor.compress(msgpack.packb(body))
    return b"SFB" + bytes([major]) + frame


def minimal_body(n: int = 2) -> dict[str, Any]:
    """A hand-written valid v1 body of n rows, every column RAW or CONST."""
    cols: list[list[Any]] = []
    dtypes = {
        1: "<i8", 2: "<i8", 6: "<u4", 7: "<u4", 8: "<u4", 9: "<u4", 10: "<u2",
        11: "<u2", 12: "u1", 13: "u1", 14: "u1", 15: "u1", 16: "u1", 17: "<u8",
        18: "<u8", 19: "<u4", 20: "<u2",
    }  # fmt: skip
    for cid, dtype in dtypes.items():
        cols.append([cid, 0, np.arange(1, n + 1, dtype=dtype).tobytes()])
    for cid in (3, 4, 5):
        cols.append([cid, 1, address_bytes("2001:db8::1")])
    return {
        "v": 0, "t": "acme", "r": "relay-7", "i": bytes(range(16)), "s": 9,
        "w": 10_000, "l": 10_000, "n": n, "e": 2_345, "c": cols,
    }  # fmt: skip


# --- round trips ----------------------------------------------------------


@pytest.mark.parametrize("name", ROUND_TRIP_CAPTURES)
def test_real_capture_rows_survive_a_round_trip(captures_dir: Path, name: str) -> None:
    """Aggregated rows of a real capture come back bit for bit, with the
    header the caller gave."""
    rows = capture_rows(captures_dir / name)
    [batch] = encode_v1(rows, FIELDS, seqs(), "192.0.2.1", now_ms=42)
    decoded = decode_batch(batch.data)
    assert np.array_equal(decoded.records(), rows)
    assert_caller_header(decoded.header, batch, len(rows), created_ms=42)
    assert decoded.header.version == (1, 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(min_size=ROW, max_size=ROW), min_size=1, max_size=40),
    st.integers(1, 3),
)
def test_any_rows_survive_a_round_trip(raw_rows: list[bytes], repeat: int) -> None:
    """Arbitrary bytes as rows (negative times, full-range counters, random
    addresses; repeated rows for constant columns) round-trip exactly."""
    rows = rows_from_bytes(raw_rows, repeat)
    [batch] = encode_v1(rows, FIELDS, seqs(), "k")
    assert decode_batch(batch.data).records().tobytes() == rows.tobytes()


def test_scores_column_round_trips() -> None:
    """Optional per-record scores travel as the float32 'score' column."""
    rows = rows_of(10)
    scores = np.linspace(0, 1, 10, dtype=np.float32)
    [batch] = encode_v1(rows, FIELDS, seqs(), "k", scores=scores)
    decoded = decode_batch(batch.data)
    assert np.array_equal(decoded.columns["score"], scores)
    assert (
        "score"
        not in decode_batch(encode_v1(rows, FIELDS, seqs(), "k")[0].data).columns
    )


def test_empty_records_give_no_batch() -> None:
    """Nothing to ship, nothing encoded (and no seq consumed)."""
    counter = seqs(5)
    assert encode_v1(np.zeros(0, AGG_DTYPE), FIELDS, counter, "k") == []
    assert counter() == 5


# --- the documented layout ---------------------------------------------------


def test_layout_matches_the_spec() -> None:
    """Preamble SFB + major 1, a zstd frame with its content size and a
    checksum, a msgpack map with the documented short keys."""
    rows = rows_of(3)
    [batch] = encode_v1(rows, FIELDS, seqs(7), "192.0.2.1", now_ms=5)
    params = zstandard.get_frame_parameters(batch.data[4:])
    assert params.content_size > 0
    assert params.has_checksum
    body = body_of(batch.data)
    # "m" (model) is given, "p" is left out at its default [0, 1]
    assert set(body) == {"v", "t", "r", "i", "s", "w", "l", "n", "e", "m", "c"}
    assert (body["t"], body["r"], body["m"]) == ("acme", "relay-7", "m-3")
    assert body["s"] == 7
    assert body["n"] == 3
    assert (body["w"], body["l"]) == (1_700_000_000_000, 10_000)
    assert body["e"] == 5 - 1_700_000_000_000
    assert uuid.UUID(bytes=body["i"]) == batch.header.batch_id
    ids = sorted(entry[0] for entry in body["c"])
    assert ids == list(range(1, 21))


def test_column_encodings_by_hand() -> None:
    """Constant columns are CONST, IPv4-mapped addresses IPV4 (4 bytes each),
    integers FOR with the minimum as base and byte planes."""
    rows = np.zeros(3, dtype=AGG_DTYPE)
    rows["time_start"] = [-5, 250, 10]  # span 255 -> width 1, base -5
    rows["bytes"] = [1000, 1001, 1300]  # span 300 -> width 2, base 1000
    rows["protocol"] = 17
    rows["src_addr"] = [np.void(address_bytes(f"10.0.0.{i}")) for i in (1, 2, 3)]
    rows["dst_addr"] = [
        np.void(address_bytes(a)) for a in ("2001:db8::1", "10.0.0.1", "::")
    ]
    [batch] = encode_v1(rows, FIELDS, seqs(), "k")
    cols = {entry[0]: entry for entry in body_of(batch.data)["c"]}
    assert cols[1] == [1, 2, bytes([0, 255, 15]), 1, -5]
    # bytes offsets 0, 1, 300 = 0x012C: low-byte plane then high-byte plane
    assert cols[17] == [17, 2, bytes([0, 1, 0x2C, 0, 0, 0x01]), 2, 1000]
    assert cols[12] == [12, 1, bytes([17])]
    assert cols[4] == [4, 3, bytes([10, 0, 0, 1, 10, 0, 0, 2, 10, 0, 0, 3])]
    assert cols[5][1] == 0  # mixed families stay 16-byte RAW
    assert cols[5][2] == b"".join(
        address_bytes(a) for a in ("2001:db8::1", "10.0.0.1", "::")
    )


def test_time_end_travels_as_a_duration() -> None:
    """time_end is DELTA-coded from time_start (reference id 1) when the
    durations are narrower than the end times themselves."""
    rows = np.zeros(3, dtype=AGG_DTYPE)
    rows["time_start"] = [1_700_000_000_000, 1_700_000_005_000, 1_700_000_000_100]
    rows["time_end"] = rows["time_start"] + [0, 300, 2]  # span 300 -> width 2
    [batch] = encode_v1(rows, FIELDS, seqs(), "k")
    cols = {entry[0]: entry for entry in body_of(batch.data)["c"]}
    assert cols[2] == [2, 4, bytes([0, 0x2C, 2, 0, 1, 0]), 2, 0, 1]
    assert decode_batch(batch.data).columns["time_end"].tolist() == (
        rows["time_end"].tolist()
    )


def test_hand_built_delta_column_decodes() -> None:
    """A DELTA entry adds base and offsets to its reference column."""
    body = minimal_body(3)  # time_start (id 1) is 1, 2, 3
    body["c"] = [c for c in body["c"] if c[0] != 2]
    body["c"].insert(0, [2, 4, bytes([0, 5, 10]), 1, -1, 1])
    decoded = decode_batch(batch_of(body))
    assert decoded.columns["time_end"].tolist() == [0, 6, 12]


def test_delta_column_with_a_bad_reference_is_corrupt() -> None:
    """A DELTA entry must refer to a decoded column of the same dtype."""
    body = minimal_body(3)
    body["c"] = [c for c in body["c"] if c[0] != 2]
    body["c"].append([2, 4, bytes(3), 1, 0, 17])  # bytes is u8, not i8
    with pytest.raises(CorruptBatchError, match="DELTA reference 17"):
        decode_batch(batch_of(body))


def test_hand_built_batch_decodes() -> None:
    """A batch written by hand from the spec decodes to the expected values."""
    decoded = decode_batch(batch_of(minimal_body(3)))
    assert decoded.header.seq == 9
    assert (decoded.header.window_start_ms, decoded.header.window_end_ms) == (
        10_000,
        20_000,
    )
    assert decoded.header.created_ms == 12_345
    assert (decoded.header.part, decoded.header.parts) == (0, 1)
    assert decoded.header.model_version is None
    assert decoded.header.batch_id == uuid.UUID(bytes=bytes(range(16)))
    assert decoded.columns["bytes"].tolist() == [1, 2, 3]
    assert decoded.columns["bytes"].dtype == np.dtype("<u8")
    assert decoded.columns["src_addr"].tolist() == [address_bytes("2001:db8::1")] * 3


def test_frame_without_the_dictionary_decodes_too() -> None:
    """The dictionary is only history: a frame made without it is read."""
    frame = zstandard.ZstdCompressor().compress(msgpack.packb(minimal_body(2)))
    assert decode_batch(b"SFB\x01" + frame).header.seq == 9


def test_dictionary_makes_small_batches_smaller() -> None:
    """With the v1 dictionary a one-row batch is smaller than without."""
    [batch] = encode_v1(rows_of(1), FIELDS, seqs(), "k")
    body = zstandard.ZstdDecompressor(dict_data=spec_dictionary()).decompress(
        batch.data[4:]
    )
    without = zstandard.ZstdCompressor(write_checksum=True).compress(body)
    assert len(batch.data) - 4 < len(without)


def test_unknown_columns_and_header_fields_are_ignored() -> None:
    """A newer minor version may add columns and header fields: skipped."""
    body = minimal_body(2)
    body["v"] = 7
    body["future"] = {"x": 1}
    body["c"].append([99, 0, b"anything"])
    decoded = decode_batch(batch_of(body))
    assert decoded.skipped_columns == (99,)
    assert decoded.header.version == (1, 7)
    assert set(decoded.columns) == set(AGG_COLUMNS)


# --- Kinesis limits ------------------------------------------------------------


def test_large_window_splits_under_the_record_limit() -> None:
    """A window too big for one record becomes several batches, each under
    the limit (data + partition key), numbered, with consecutive seqs and
    distinct ids; together they hold every row in order."""
    rows = rows_of(20_000)
    key = "p" * 200
    batches = encode_v1(rows, FIELDS, seqs(50), key, max_record_bytes=60_000)
    assert_split(batches, key, 60_000, first_seq=50)
    back = np.concatenate([decode_batch(b.data).records() for b in batches])
    assert np.array_equal(back, rows)


@pytest.mark.slow
def test_default_limit_is_one_mebibyte() -> None:
    """Random rows worth well over 1 MiB split into batches of at most
    1 MiB each, data plus partition key."""
    rows = rows_of(150_000, seed=2)
    batches = encode_v1(rows, FIELDS, seqs(), "192.0.2.1")
    assert len(batches) >= 2
    assert all(len(b.data) + 9 <= 1024 * 1024 for b in batches)
    assert KINESIS_MAX_RECORD_BYTES == 1024 * 1024
    assert sum(b.header.record_count for b in batches) == 150_000


def test_a_record_too_big_for_any_batch_is_refused() -> None:
    """A limit below one record's size cannot be met: a clear error."""
    with pytest.raises(OversizedBatchError, match="does not fit"):
        encode_v1(rows_of(4), FIELDS, seqs(), "k", max_record_bytes=100)


@pytest.mark.parametrize("key", ["", "k" * 257])
def test_partition_key_length_is_checked(key: str) -> None:
    """Partition keys must be 1 to 256 characters, as Kinesis requires."""
    with pytest.raises(WireFormatError, match="partition key"):
        encode_v1(rows_of(1), FIELDS, seqs(), key)


def test_wrong_dtype_and_scores_are_refused() -> None:
    """Only AGG_DTYPE rows; scores must have one value per row."""
    with pytest.raises(WireFormatError, match="AGG_DTYPE"):
        encode_v1(np.zeros(2, dtype="<u8"), FIELDS, seqs(), "k")
    with pytest.raises(WireFormatError, match="one value per record"):
        encode_v1(rows_of(3), FIELDS, seqs(), "k", scores=np.zeros(2))


# --- bad input ---------------------------------------------------------------


def test_bad_magic_is_corrupt() -> None:
    """Bytes that are not a batch say so."""
    with pytest.raises(CorruptBatchError, match="magic"):
        decode_batch(b"GIF89a...")
    with pytest.raises(CorruptBatchError, match="magic"):
        decode_batch(b"")


def test_unknown_major_version_is_rejected_before_decompressing() -> None:
    """Major version 3 is refused with its number, whatever follows."""
    with pytest.raises(UnknownVersionError, match="major version 3"):
        decode_batch(b"SFB\x03" + b"not even zstd")


def test_truncated_record_is_corrupt() -> None:
    """A record cut short fails decompression with a clear error."""
    [batch] = encode_v1(rows_of(50), FIELDS, seqs(), "k")
    with pytest.raises(CorruptBatchError, match="zstd"):
        decode_batch(batch.data[:-10])


def test_flipped_byte_fails_the_checksum() -> None:
    """A corrupted byte inside the frame is caught (zstd checksum)."""
    [batch] = encode_v1(rows_of(50), FIELDS, seqs(), "k")
    with pytest.raises(CorruptBatchError):
        decode_batch(flip_middle_byte(batch.data))


def test_trailing_bytes_are_corrupt() -> None:
    """Data after the frame is not silently ignored."""
    [batch] = encode_v1(rows_of(5), FIELDS, seqs(), "k")
    with pytest.raises(CorruptBatchError, match="zstd"):
        decode_batch(batch.data + b"\x00junk")


def test_decompression_bomb_is_refused_before_allocating() -> None:
    """A frame declaring more than the bound is refused from its header."""
    frame = zstandard.ZstdCompressor().compress(b"\x00" * (64 * 1024 * 1024))
    assert len(frame) < 10_000
    with pytest.raises(OversizedBatchError, match="67108864 decompressed bytes"):
        decode_batch(b"SFB\x01" + frame)
    with pytest.raises(OversizedBatchError):
        decode_batch(batch_of(minimal_body(100)), max_decompressed=100)


def const_body(n: int) -> dict[str, Any]:
    """A v1 body of n rows whose every column is CONST: a few hundred
    bytes whatever n claims."""
    body = minimal_body(1)
    body["n"] = n
    for entry in body["c"]:
        entry[1] = 1  # the one value of minimal_body(1), now CONST
    return body


def test_v1_row_count_over_the_bound_is_refused() -> None:
    """A v1 body of CONST columns declaring 262,145 rows (the spec's bound
    is 262,144, as for v2) is refused as oversized before any column is
    allocated; at the bound it decodes."""
    with pytest.raises(OversizedBatchError, match="262145 rows"):
        decode_batch(batch_of(const_body(262_145)))
    with pytest.raises(OversizedBatchError, match="rows"):
        decode_batch(batch_of(const_body(2**40)))
    batch = decode_batch(batch_of(const_body(262_144)))
    assert batch.header.record_count == 262_144
    assert int(batch.columns["bytes"].sum()) == 262_144  # each row's 1


@pytest.mark.slow
def test_v1_writer_splits_at_the_row_bound() -> None:
    """A v1 window of 263,144 rows that compress to almost nothing goes out
    as batches of at most 262,144 rows, all read back."""
    n = 262_144 + 1_000
    rows = np.zeros(n, dtype=AGG_DTYPE)
    rows["flow_count"] = 1
    batches = encode_v1(rows, FIELDS, seqs(), "k")
    assert len(batches) == 2
    counts = [decode_batch(b.data).header.record_count for b in batches]
    assert max(counts) <= 262_144 and sum(counts) == n
    assert all(b.header.version[0] == 1 for b in batches)


def test_frame_without_content_size_is_corrupt() -> None:
    """The spec requires the frame to declare its size (the bomb bound)."""
    raw = msgpack.packb(minimal_body(1))
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(CorruptBatchError, match="declare"):
        decode_batch(b"SFB\x01" + frame)


def test_short_column_is_truncated() -> None:
    """A column with fewer bytes than the record count implies is named."""
    body = minimal_body(4)
    body["c"][0][2] = body["c"][0][2][:-1]
    with pytest.raises(TruncatedColumnsError, match="time_start: 31 bytes"):
        decode_batch(batch_of(body))


def test_missing_required_column_is_corrupt() -> None:
    """Dropping a v1 column is not allowed (columns are only ever added)."""
    body = minimal_body(2)
    body["c"] = [c for c in body["c"] if c[0] != 17]
    with pytest.raises(CorruptBatchError, match="missing: bytes"):
        decode_batch(batch_of(body))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.update(n="two"), "'n'"),
        (lambda b: b.update(i=b"short"), "16 bytes"),
        (lambda b: b.update(m=5), "'m'"),
        (lambda b: b.update(p=[0]), "'p'"),
        (lambda b: b.pop("t"), "'t'"),
        (lambda b: b.update(c="nope"), "column list"),
        (lambda b: b["c"].append([3, 1, address_bytes("::1")]), "twice"),
        (lambda b: b["c"].__setitem__(0, [1, 9, b""]), "unknown encoding 9"),
        (lambda b: b["c"].__setitem__(0, [1, 2, b"\x00\x00", 3, 0]), "FOR width"),
        (lambda b: b["c"].__setitem__(0, [4, 2, b"\x00\x00", 1, 0]), "non-integer"),
        (lambda b: b["c"].__setitem__(0, "x"), "column entry"),
    ],
)
def test_malformed_bodies_are_corrupt(mutate: Any, message: str) -> None:
    """Wrong header types and malformed column entries name the problem."""
    body = minimal_body(2)
    mutate(body)
    with pytest.raises(CorruptBatchError, match=message):
        decode_batch(batch_of(body))


def test_msgpack_garbage_is_corrupt() -> None:
    """A valid zstd frame holding no msgpack map is corrupt, not a crash."""
    frame = zstandard.ZstdCompressor().compress(b"\xc1\xc1\xc1")
    with pytest.raises(CorruptBatchError, match="msgpack"):
        decode_batch(b"SFB\x01" + frame)
    frame = zstandard.ZstdCompressor().compress(msgpack.packb([1, 2]))
    with pytest.raises(CorruptBatchError, match="map"):
        decode_batch(b"SFB\x01" + frame)


# --- batch ids -----------------------------------------------------------------


def test_batch_ids_are_uuid7_with_the_time() -> None:
    """Ids are RFC 9562 version 7: the first 48 bits are the ms timestamp."""
    ids = {new_batch_id(1_700_000_000_123) for _ in range(5000)}
    assert len(ids) == 5000
    for bid in itertools.islice(ids, 50):
        assert bid.version == 7
        assert bid.variant == uuid.RFC_4122
        assert bid.int >> 80 == 1_700_000_000_123


# --- sampleflow bench wire -----------------------------------------------------


def test_bench_wire_measures_two_captures(
    captures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sampleflow bench wire` on two captures prints one line each with the
    record count of the tshark decode and the raw export bytes per record
    summed from the capture's UDP payloads (both computed here)."""
    names = ["nf5-freebsd-ng_netflow.pcap", "w-pynetflow-softflowd-v9.pcap"]
    for name in names:
        (tmp_path / name).symlink_to(captures_dir / name)
    assert (
        cli_main(["bench", "wire", "--captures", str(tmp_path), "--speed-records", "0"])
        == 0
    )
    out = capsys.readouterr().out
    for name in names:
        records = len(read_csv(captures_dir / f"{name}.tshark.csv"))
        raw = sum(len(d.payload) for d in read_datagrams(captures_dir / name))
        [line] = [x for x in out.splitlines() if x.startswith(name)]
        fields = line.split()
        assert int(fields[1]) == records
        assert fields[5] == f"{raw / records:.1f}"
    assert "as shipped vs raw export" in out
