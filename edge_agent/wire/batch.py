"""Batch wire format (versions 1 and 2): one Kinesis record = one batch.

Layout of a record's data (see docs/wire-format.md for the full spec)::

    b"SFB" | major version (1 byte) | zstd frame of one msgpack map

The 4-byte preamble stays outside the compression so a reader rejects an
unknown major version (which may change the compression too) before it
decompresses anything.  Version 1 frames are compressed with the fixed v1
raw-content dictionary, version 2 frames with the trained v2 dictionary
and without zstd's 4-byte magic number
(:mod:`edge_agent.wire.dictionary`).  The msgpack map holds the header
fields under short keys and the columns under ``"c"`` (version 1:
:mod:`edge_agent.wire.columns`; version 2, rows sorted, all-zero columns
named by ``"z"``: :mod:`edge_agent.wire.columns_v2`).  The zstd frame
declares its decompressed size and carries a checksum; readers refuse
frames over :data:`MAX_DECOMPRESSED_BYTES` before allocating.

Writers write version 2 unless asked for version 1 (``format_major=1``),
which they keep for as long as some reader only knows version 1.

:func:`encode_batches` is the relay's side, :func:`decode_batch` the
cloud's: the one function that turns a record back into columns.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import zstandard

from edge_agent.aggregate.schema import AGG_COLUMNS, AGG_DTYPE
from edge_agent.wire.columns import (
    DELTA_REFERENCES,
    REQUIRED_COLUMNS,
    decode_columns,
    encode_column,
)
from edge_agent.wire.columns_v2 import decode_columns_v2, encode_columns_v2, sort_rows
from edge_agent.wire.dictionary import zstd_dictionary, zstd_dictionary_v2
from edge_agent.wire.errors import (
    CorruptBatchError,
    OversizedBatchError,
    UnknownVersionError,
    WireFormatError,
)
from edge_agent.wire.limits import (
    KINESIS_MAX_PARTITION_KEY_CHARS,
    KINESIS_MAX_RECORD_BYTES,
)

MAGIC = b"SFB"
#: The major version writers write by default, and the ones readers read.
FORMAT_MAJOR = 2
READ_MAJORS = (1, 2)
FORMAT_MINOR = 0
PREAMBLE = MAGIC + bytes([FORMAT_MAJOR])
_PREAMBLES = {major: MAGIC + bytes([major]) for major in READ_MAJORS}

#: Most rows in one batch of either version (writers split above it,
#: readers refuse more): it bounds what a reader allocates for a batch
#: whose columns are all CONST or zero, about 30 MB of columns at this
#: count.
MAX_BATCH_ROWS = 262_144

#: Largest decompressed msgpack body a reader accepts (and a writer makes).
MAX_DECOMPRESSED_BYTES = 32 * 1024 * 1024

#: zstd level: 3 (the library default) compresses a batch of AGG rows to
#: within ~5% of level 19 at a small fraction of the CPU time, which
#: matters on a small ARM gateway.
ZSTD_LEVEL = 3
#: Version 2 compresses small bodies harder: (largest body, level) tiers,
#: level 3 above.  Small bodies are a quiet exporter's few rows, where the
#: fixed bytes of a batch dominate and the extra CPU per batch is small;
#: on big bodies the CPU per row is what counts.  Measured (one core):
#: level 19 takes ~6% off bodies up to 1 KiB for ~60 us a batch, level 9
#: ~4% off bodies up to 8 KiB for ~0.4 us a row (level 19 there: ~4 us).
ZSTD_LEVELS_V2 = ((1024, 19), (8192, 9))
#: The zstd magic number, which version 2 frames leave out (4 bytes a
#: batch); the reader puts it back to read the frame header.
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

#: Rows of the prefix from which the split of a big window is estimated.
_SAMPLE_ROWS = 32_768

#: Bytes kept free under the record limit for the header fields that are
#: only known once the split is final (part numbers); they take < 10.
_HEADER_SLACK = 64

_DICTIONARIES = {1: zstd_dictionary(), 2: zstd_dictionary_v2()}
# zstandard's (de)compressor objects must not be used by two threads at
# once; the relay encodes in a worker thread and readers may use many.
_local = threading.local()


def _compress(data: bytes, major: int = FORMAT_MAJOR) -> bytes:
    """One zstd frame of ``data``; version 2 without the magic number.

    Made as an ordinary frame and cut, not with zstd's magicless format
    parameter: that needs explicit compression parameters, which stop zstd
    from fitting them to the input size (3% larger frames, measured).
    """
    level = ZSTD_LEVEL
    if major == 2:
        level = next((lv for top, lv in ZSTD_LEVELS_V2 if len(data) <= top), level)
    compressors = getattr(_local, "compressors", None)
    if compressors is None:
        compressors = _local.compressors = {}
    compressor = compressors.get((major, level))
    if compressor is None:
        compressor = compressors[(major, level)] = zstandard.ZstdCompressor(
            level=level,
            dict_data=_DICTIONARIES[major],
            write_checksum=True,
            write_content_size=True,
            write_dict_id=False,
        )
    packed: bytes = compressor.compress(data)
    return packed[len(_ZSTD_MAGIC) :] if major == 2 else packed


def _decompress(frame: bytes, major: int) -> bytes:
    """Inverse of :func:`_compress` (``frame`` with the magic put back for
    version 2)."""
    decompressors = getattr(_local, "decompressors", None)
    if decompressors is None:
        decompressors = _local.decompressors = {}
    decompressor = decompressors.get(major)
    if decompressor is None:
        decompressor = decompressors[major] = zstandard.ZstdDecompressor(
            dict_data=_DICTIONARIES[major]
        )
    raw: bytes = decompressor.decompress(frame, allow_extra_data=False)
    return raw


@dataclass(frozen=True)
class HeaderFields:
    """What the caller knows about a batch before it is encoded.

    ``window_start_ms``/``window_end_ms`` bound the aggregation window
    (ms since the epoch, end exclusive); ``model_version`` names the filter
    model that scored the records, or None.
    """

    tenant_id: str
    relay_id: str
    window_start_ms: int
    window_end_ms: int
    model_version: str | None = None


@dataclass(frozen=True)
class BatchHeader:
    """The header of one batch, as written and as read back.

    ``seq`` increases by one per batch of a relay (the caller persists it
    across restarts; gaps are allowed, repeats are not).  ``batch_id`` is a
    UUIDv7, unique across relays and restarts.  ``part``/``parts`` number
    the batches one window (of one partition key) was split into, from 0.
    ``created_ms`` is when the batch was encoded.
    """

    tenant_id: str
    relay_id: str
    batch_id: uuid.UUID
    seq: int
    window_start_ms: int
    window_end_ms: int
    record_count: int
    model_version: str | None
    part: int
    parts: int
    created_ms: int
    version: tuple[int, int] = (FORMAT_MAJOR, FORMAT_MINOR)


@dataclass(frozen=True)
class EncodedBatch:
    """One batch ready for the spool: the Kinesis record's data and key."""

    header: BatchHeader
    partition_key: str
    data: bytes

    @property
    def record_bytes(self) -> int:
        """Bytes the Kinesis record counts: data plus UTF-8 partition key."""
        return len(self.data) + len(self.partition_key.encode())


@dataclass(frozen=True)
class DecodedBatch:
    """A decoded batch: its header and one numpy array per column.

    ``columns`` maps column names to arrays of ``header.record_count``
    values in the canonical dtypes of :data:`~edge_agent.wire.columns.COLUMNS`
    (``score`` only when the batch carries it).  ``skipped_columns`` lists
    the ids of columns this reader does not know (newer minor versions).
    """

    header: BatchHeader
    columns: dict[str, np.ndarray]
    skipped_columns: tuple[int, ...] = ()

    def records(self) -> np.ndarray:
        """The columns as one :data:`AGG_DTYPE` array (``score`` dropped)."""
        out = np.zeros(self.header.record_count, dtype=AGG_DTYPE)
        for name in AGG_COLUMNS:
            out[name] = self.columns[name]
        return out


def new_batch_id(now_ms: int | None = None) -> uuid.UUID:
    """Return a UUIDv7 (RFC 9562): 48-bit ms timestamp, 74 random bits.

    Time-ordered, so ids sort roughly by creation; the random bits make a
    clash between relays or across restarts negligible without any
    coordination.
    """
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    value = (ms & ((1 << 48) - 1)) << 80
    value |= int.from_bytes(os.urandom(10), "big") & ((1 << 80) - 1)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


def encode_batches(
    records: np.ndarray,
    fields: HeaderFields,
    next_seq: Callable[[], int],
    partition_key: str,
    *,
    scores: np.ndarray | None = None,
    max_record_bytes: int = KINESIS_MAX_RECORD_BYTES,
    now_ms: int | None = None,
    format_major: int = FORMAT_MAJOR,
) -> list[EncodedBatch]:
    """Encode AGG_DTYPE ``records`` as one or more batches.

    Each batch's data plus partition key fits in ``max_record_bytes`` (the
    Kinesis record limit by default) and its body in
    :data:`MAX_DECOMPRESSED_BYTES`: a window too large for one batch is
    split into consecutive row ranges (estimated from the encoded size of
    the whole, or of its first rows for a big window, then each part
    verified and halved again if needed).
    Each batch takes its sequence number from ``next_seq()`` (the spool's
    ``Spool.next_seq``, which keeps seqs increasing across restarts), in
    batch order, once the split is final.  An empty ``records``
    gives no batch.  ``scores`` (float32, one per record) adds the
    optional ``score`` column.  Both versions split above
    :data:`MAX_BATCH_ROWS` rows too.  ``format_major`` 2 (the default)
    sorts the rows by source and destination address (with their scores);
    1 writes version 1, rows in the order given.

    Raises :class:`WireFormatError` for a bad argument (dtype, partition
    key, score length) and :class:`OversizedBatchError` if a single record
    cannot fit (only with a tiny ``max_record_bytes``).
    """
    if records.dtype != AGG_DTYPE:
        raise WireFormatError(f"expected AGG_DTYPE records, got {records.dtype}")
    if format_major not in READ_MAJORS:
        raise WireFormatError(
            f"format_major must be one of {READ_MAJORS}, got {format_major!r}"
        )
    if not 1 <= len(partition_key) <= KINESIS_MAX_PARTITION_KEY_CHARS:
        raise WireFormatError(
            f"partition key must be 1 to {KINESIS_MAX_PARTITION_KEY_CHARS} "
            f"characters, got {len(partition_key)}"
        )
    n = int(records.shape[0])
    if scores is not None:
        scores = np.asarray(scores, dtype="<f4")
        if scores.shape != (n,):
            raise WireFormatError(
                f"scores must hold one value per record ({n}), got shape {scores.shape}"
            )
    if n == 0:
        return []
    columns = {name: np.ascontiguousarray(records[name]) for name in AGG_COLUMNS}
    if scores is not None:
        columns["score"] = scores
    if format_major == 2:
        # Column by column: measured 3-4x cheaper than gathering whole rows.
        order = sort_rows(columns["src_addr"], columns["dst_addr"])
        columns = {name: np.take(values, order) for name, values in columns.items()}
    writer = _BodyWriter(
        fields,
        columns,
        time.time_ns() // 1_000_000 if now_ms is None else now_ms,
        format_major,
    )
    preamble = _PREAMBLES[format_major]
    budget = max_record_bytes - len(partition_key.encode()) - len(preamble)
    ranges = writer.split(n, budget - _HEADER_SLACK)
    out = []
    for part, (lo, hi) in enumerate(ranges):
        header = BatchHeader(
            tenant_id=fields.tenant_id,
            relay_id=fields.relay_id,
            batch_id=new_batch_id(writer.created_ms),
            seq=_checked_seq(next_seq()),
            window_start_ms=fields.window_start_ms,
            window_end_ms=fields.window_end_ms,
            record_count=hi - lo,
            model_version=fields.model_version,
            part=part,
            parts=len(ranges),
            created_ms=writer.created_ms,
            version=(format_major, FORMAT_MINOR),
        )
        data = preamble + _compress(writer.body(lo, hi, header), format_major)
        batch = EncodedBatch(header, partition_key, data)
        if batch.record_bytes > max_record_bytes:  # the slack makes this unreachable
            raise OversizedBatchError(
                f"batch of {hi - lo} records is {batch.record_bytes} bytes, "
                f"over {max_record_bytes}"
            )
        out.append(batch)
    return out


def _frame_bound(size: int) -> int:
    """Most bytes a zstd frame of ``size`` input bytes can take: zstd's
    ZSTD_COMPRESSBOUND plus the frame header and checksum (18 bytes)."""
    small = (128 * 1024 - size) >> 11 if size < 128 * 1024 else 0
    return size + (size >> 8) + small + 18


def _checked_seq(seq: int) -> int:
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise WireFormatError(f"next_seq() must return an int >= 0, got {seq!r}")
    return seq


class _BodyWriter:
    """Packs row ranges of one window's columns into msgpack bodies."""

    def __init__(
        self,
        fields: HeaderFields,
        columns: dict[str, np.ndarray],
        created_ms: int,
        major: int = FORMAT_MAJOR,
    ) -> None:
        self.fields = fields
        self.columns = columns
        self.created_ms = created_ms
        self.major = major
        self.max_rows = MAX_BATCH_ROWS
        # The split measures a range's body before the header is final;
        # its column entries are kept for the batch that follows.
        self._entries: dict[tuple[int, int], tuple[list[Any], int]] = {}

    def entries(self, lo: int, hi: int) -> tuple[list[Any], int]:
        """Column entries and zero bitmask of rows ``lo:hi`` (memoised)."""
        key = (lo, hi)
        cached = self._entries.get(key)
        if cached is not None:
            return cached
        cols = self.columns
        if self.major == 2:
            cached = encode_columns_v2(
                {name: values[lo:hi] for name, values in cols.items()}
            )
        else:
            cached = (
                [
                    encode_column(
                        name,
                        values[lo:hi],
                        cols[DELTA_REFERENCES[name]][lo:hi]
                        if name in DELTA_REFERENCES
                        else None,
                    )
                    for name, values in cols.items()
                ],
                0,
            )
        self._entries[key] = cached
        return cached

    def body(self, lo: int, hi: int, header: BatchHeader | None = None) -> bytes:
        """The msgpack body of rows ``lo:hi``; placeholder ids without header.

        Optional keys are left out at their default (``m`` None, ``p``
        [0, 1]): every byte counts in the many small batches of quiet
        exporters.
        """
        f = self.fields
        batch_id = (header.batch_id if header else uuid.UUID(int=0)).bytes
        body: dict[str, Any] = {
            "v": FORMAT_MINOR,
            "t": f.tenant_id,
            "r": f.relay_id,
            # v2: the id's 48-bit time is created_ms (w + e); the rest travels
            "i": batch_id if self.major == 1 else batch_id[6:],
            "s": header.seq if header else 0,
            "w": f.window_start_ms,
            "l": f.window_end_ms - f.window_start_ms,
            "n": hi - lo,
            "e": self.created_ms - f.window_start_ms,
        }
        if f.model_version is not None:
            body["m"] = f.model_version
        parts = (header.part, header.parts) if header else (0, 2)
        if parts != (0, 1):
            body["p"] = list(parts)
        entries, zero_mask = self.entries(lo, hi)
        if zero_mask:
            body["z"] = zero_mask
        body["c"] = entries
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    def _fits(self, lo: int, hi: int, budget: int, raw_budget: int) -> bool:
        if hi - lo > self.max_rows:
            return False
        raw, packed = self._size(lo, hi, budget)
        return raw <= raw_budget and packed <= budget

    def _size(self, lo: int, hi: int, budget: int | None = None) -> tuple[int, int]:
        """(body bytes, compressed bytes) of rows ``lo:hi``.  A body whose
        worst-case frame fits ``budget`` is not compressed to find out: the
        second figure is then that bound, which only says "fits"."""
        body = self.body(lo, hi)
        bound = _frame_bound(len(body))
        if budget is not None and bound <= budget:
            return len(body), bound
        return len(body), len(_compress(body, self.major))

    def split(self, n: int, budget: int) -> list[tuple[int, int]]:
        """Row ranges covering ``0:n`` whose compressed bodies fit ``budget``,
        whose bodies fit MAX_DECOMPRESSED_BYTES (both with slack) and that
        hold at most MAX_BATCH_ROWS rows."""
        raw_budget = MAX_DECOMPRESSED_BYTES - _HEADER_SLACK
        if n > 2 * _SAMPLE_ROWS:
            # Big windows: extrapolate from a prefix rather than encoding
            # all rows once only to learn that they must be split.
            raw, packed = (x * n / _SAMPLE_ROWS for x in self._size(0, _SAMPLE_ROWS))
            if max(packed / budget, raw / raw_budget) <= 0.9:
                raw, packed = self._size(0, n, budget)
        else:
            raw, packed = self._size(0, n, budget)
        over = max(packed / budget, raw / raw_budget)
        over = max(over, n / self.max_rows)
        if over <= 1:
            return [(0, n)]
        # Estimate the number of pieces, aiming 10% under the tightest of
        # the limits, then verify each piece and halve the ones still over.
        pieces = min(n, int(over / 0.9) + 1)
        bounds = np.linspace(0, n, pieces + 1).astype(int).tolist()
        ranges: list[tuple[int, int]] = []
        todo = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]
        while todo:
            lo, hi = todo.pop(0)
            if self._fits(lo, hi, budget, raw_budget):
                ranges.append((lo, hi))
            elif hi - lo == 1:
                raise OversizedBatchError(
                    f"one record does not fit in a {budget}-byte batch"
                )
            else:
                mid = (lo + hi) // 2
                todo[:0] = [(lo, mid), (mid, hi)]
        return ranges


def decode_batch(
    data: bytes, max_decompressed: int = MAX_DECOMPRESSED_BYTES
) -> DecodedBatch:
    """Decode one Kinesis record's data into its header and columns.

    Raises (all :class:`WireFormatError`):

    * :class:`UnknownVersionError` -- a major version other than 1 or 2;
    * :class:`OversizedBatchError` -- the frame declares more than
      ``max_decompressed`` bytes (checked before decompressing), or the
      header more than :data:`MAX_BATCH_ROWS` rows;
    * :class:`~edge_agent.wire.errors.TruncatedColumnsError` -- a column's
      data does not hold exactly the header's record count;
    * :class:`CorruptBatchError` -- anything else that is not a valid
      batch (bad magic, zstd or msgpack error, checksum mismatch, wrong
      header types, a required column missing).

    Both versions give the same columns, canonical dtypes and header
    fields; ``header.version`` says which one the batch was.
    """
    data = bytes(data)
    if len(data) < len(PREAMBLE) or data[:3] != MAGIC:
        raise CorruptBatchError(
            f"not a sampleflow batch: expected magic {MAGIC!r}, got {data[:3]!r}"
        )
    major = data[3]
    if major not in READ_MAJORS:
        raise UnknownVersionError(
            f"batch format major version {major}; this reader knows "
            f"{', '.join(map(str, READ_MAJORS))}"
        )
    frame = data[len(PREAMBLE) :]
    if major == 2:
        if frame[:4] == _ZSTD_MAGIC:
            raise CorruptBatchError(
                "version 2 frames leave out the zstd magic number; this one has it"
            )
        frame = _ZSTD_MAGIC + frame
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CorruptBatchError(f"not a zstd frame: {exc}") from exc
    if declared < 0:
        raise CorruptBatchError("zstd frame does not declare its decompressed size")
    if declared > max_decompressed:
        raise OversizedBatchError(
            f"batch declares {declared} decompressed bytes, over the "
            f"{max_decompressed} limit"
        )
    try:
        raw = _decompress(frame, major)
    except zstandard.ZstdError as exc:
        raise CorruptBatchError(f"zstd decompression failed: {exc}") from exc
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (
        ValueError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as exc:
        raise CorruptBatchError(f"msgpack body does not parse: {exc}") from exc
    if not isinstance(body, dict):
        raise CorruptBatchError("batch body is not a msgpack map")
    header = _read_header(body, major)
    entries = body.get("c")
    if not isinstance(entries, list):
        raise CorruptBatchError("batch has no column list ('c')")
    if header.record_count > MAX_BATCH_ROWS:
        # Before any column: a body of CONST or zero columns costs nothing
        # per row, so the count alone could ask for any allocation.
        raise OversizedBatchError(
            f"batch declares {header.record_count} rows, over the "
            f"{MAX_BATCH_ROWS} limit"
        )
    if major == 1:
        columns, skipped = decode_columns(entries, header.record_count)
    else:
        zero_mask = body.get("z", 0)
        if not isinstance(zero_mask, int) or isinstance(zero_mask, bool):
            raise CorruptBatchError(
                f"header field 'z' (zero columns) must be an integer bitmask, "
                f"got {zero_mask!r:.40}"
            )
        if zero_mask < 0:
            raise CorruptBatchError(f"header field 'z' is negative: {zero_mask}")
        columns, skipped = decode_columns_v2(entries, header.record_count, zero_mask)
    missing = REQUIRED_COLUMNS - columns.keys()
    if missing:
        raise CorruptBatchError(
            f"required columns missing: {', '.join(sorted(missing))}"
        )
    return DecodedBatch(header, columns, skipped)


def _read_header(body: dict[str, Any], major: int = 1) -> BatchHeader:
    def get(key: str, kind: type, what: str, default: Any = None) -> Any:
        value = body.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CorruptBatchError(
                f"header field {key!r} ({what}) has the wrong type: {value!r:.40}"
            )
        return value

    minor = get("v", int, "minor version")
    bid = get("i", bytes, "batch id")
    id_size = 16 if major == 1 else 10
    if len(bid) != id_size:
        raise CorruptBatchError(
            f"header field 'i' must be {id_size} bytes, got {len(bid)}"
        )
    count = get("n", int, "record count")
    if count < 0:
        raise CorruptBatchError(f"header field 'n' is negative: {count}")
    model = body.get("m")
    if model is not None and not isinstance(model, str):
        raise CorruptBatchError("header field 'm' (model) must be a string or nil")
    part = get("p", list, "part, parts", [0, 1])
    if len(part) != 2 or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in part
    ):
        raise CorruptBatchError(
            f"header field 'p' must be [part, parts], got {part!r:.40}"
        )
    start = get("w", int, "window start")
    created = start + get("e", int, "encoded at")
    if major == 2:  # the UUIDv7's 48-bit time is the encoding time
        bid = (created & ((1 << 48) - 1)).to_bytes(6, "big") + bid
    return BatchHeader(
        tenant_id=get("t", str, "tenant id"),
        relay_id=get("r", str, "relay id"),
        batch_id=uuid.UUID(bytes=bid),
        seq=get("s", int, "sequence number"),
        window_start_ms=start,
        window_end_ms=start + get("l", int, "window length"),
        record_count=count,
        model_version=model,
        part=part[0],
        parts=part[1],
        created_ms=created,
        version=(major, minor),
    )
