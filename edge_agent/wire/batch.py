"""Batch wire format version 1: one Kinesis record = one batch.

Layout of a record's data (see docs/wire-format.md for the full spec)::

    b"SFB" | major version (1 byte, = 1) | zstd frame of one msgpack map

The 4-byte preamble stays outside the compression so a reader rejects an
unknown major version (which may change the compression too) before it
decompresses anything.  The frame is compressed with the fixed v1
dictionary (:mod:`edge_agent.wire.dictionary`).  The msgpack map holds the
header fields under short keys and the columns under ``"c"`` (see
:mod:`edge_agent.wire.columns`).  The zstd frame declares its decompressed
size and carries a checksum; readers refuse frames over
:data:`MAX_DECOMPRESSED_BYTES` before allocating.

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
from edge_agent.wire.dictionary import zstd_dictionary
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
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
PREAMBLE = MAGIC + bytes([FORMAT_MAJOR])

#: Largest decompressed msgpack body a reader accepts (and a writer makes).
MAX_DECOMPRESSED_BYTES = 32 * 1024 * 1024

#: zstd level: 3 (the library default) compresses a batch of AGG rows to
#: within ~5% of level 19 at a small fraction of the CPU time, which
#: matters on a small ARM gateway.
ZSTD_LEVEL = 3

#: Bytes kept free under the record limit for the header fields that are
#: only known once the split is final (part numbers); they take < 10.
_HEADER_SLACK = 64

_DICTIONARY = zstd_dictionary()
# zstandard's (de)compressor objects must not be used by two threads at
# once; the relay encodes in a worker thread and readers may use many.
_local = threading.local()


def _compress(data: bytes) -> bytes:
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL,
            dict_data=_DICTIONARY,
            write_checksum=True,
            write_content_size=True,
            write_dict_id=False,
        )
    packed: bytes = compressor.compress(data)
    return packed


def _decompress(frame: bytes) -> bytes:
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor(
            dict_data=_DICTIONARY
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
) -> list[EncodedBatch]:
    """Encode AGG_DTYPE ``records`` as one or more batches.

    Each batch's data plus partition key fits in ``max_record_bytes`` (the
    Kinesis record limit by default) and its body in
    :data:`MAX_DECOMPRESSED_BYTES`: a window too large for one batch is
    split into consecutive row ranges (estimated from the encoded size of
    the whole, then each part verified and halved again if needed).
    Each batch takes its sequence number from ``next_seq()`` (the spool's
    ``Spool.next_seq``, which keeps seqs increasing across restarts), in
    batch order, once the split is final.  An empty ``records``
    gives no batch.  ``scores`` (float32, one per record) adds the
    optional ``score`` column.

    Raises :class:`WireFormatError` for a bad argument (dtype, partition
    key, score length) and :class:`OversizedBatchError` if a single record
    cannot fit (only with a tiny ``max_record_bytes``).
    """
    if records.dtype != AGG_DTYPE:
        raise WireFormatError(f"expected AGG_DTYPE records, got {records.dtype}")
    if not 1 <= len(partition_key) <= KINESIS_MAX_PARTITION_KEY_CHARS:
        raise WireFormatError(
            f"partition key must be 1 to {KINESIS_MAX_PARTITION_KEY_CHARS} "
            f"characters, got {len(partition_key)}"
        )
    n = int(records.shape[0])
    columns = {name: np.ascontiguousarray(records[name]) for name in AGG_COLUMNS}
    if scores is not None:
        columns["score"] = np.asarray(scores, dtype="<f4")
        if columns["score"].shape != (n,):
            raise WireFormatError(
                f"scores must hold one value per record ({n}), "
                f"got shape {columns['score'].shape}"
            )
    if n == 0:
        return []
    writer = _BodyWriter(
        fields, columns, time.time_ns() // 1_000_000 if now_ms is None else now_ms
    )
    budget = max_record_bytes - len(partition_key.encode()) - len(PREAMBLE)
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
        )
        data = PREAMBLE + _compress(writer.body(lo, hi, header))
        batch = EncodedBatch(header, partition_key, data)
        if batch.record_bytes > max_record_bytes:  # the slack makes this unreachable
            raise OversizedBatchError(
                f"batch of {hi - lo} records is {batch.record_bytes} bytes, "
                f"over {max_record_bytes}"
            )
        out.append(batch)
    return out


def _checked_seq(seq: int) -> int:
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise WireFormatError(f"next_seq() must return an int >= 0, got {seq!r}")
    return seq


class _BodyWriter:
    """Packs row ranges of one window's columns into msgpack bodies."""

    def __init__(
        self, fields: HeaderFields, columns: dict[str, np.ndarray], created_ms: int
    ) -> None:
        self.fields = fields
        self.columns = columns
        self.created_ms = created_ms

    def body(self, lo: int, hi: int, header: BatchHeader | None = None) -> bytes:
        """The msgpack body of rows ``lo:hi``; placeholder ids without header.

        Optional keys are left out at their default (``m`` None, ``p``
        [0, 1]): every byte counts in the many small batches of quiet
        exporters.
        """
        f = self.fields
        body: dict[str, Any] = {
            "v": FORMAT_MINOR,
            "t": f.tenant_id,
            "r": f.relay_id,
            "i": (header.batch_id if header else uuid.UUID(int=0)).bytes,
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
        cols = self.columns
        body["c"] = [
            encode_column(
                name,
                values[lo:hi],
                cols[DELTA_REFERENCES[name]][lo:hi]
                if name in DELTA_REFERENCES
                else None,
            )
            for name, values in cols.items()
        ]
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    def _size(self, lo: int, hi: int) -> tuple[int, int]:
        raw = self.body(lo, hi)
        return len(raw), len(_compress(raw))

    def split(self, n: int, budget: int) -> list[tuple[int, int]]:
        """Row ranges covering ``0:n`` whose compressed bodies fit ``budget``
        and whose bodies fit MAX_DECOMPRESSED_BYTES (both with slack)."""
        raw_budget = MAX_DECOMPRESSED_BYTES - _HEADER_SLACK
        raw, packed = self._size(0, n)
        if raw <= raw_budget and packed <= budget:
            return [(0, n)]
        # Estimate the number of pieces, aiming 10% under the tighter of the
        # two limits, then verify each piece and halve the ones still over.
        over = max(packed / budget, raw / raw_budget)
        pieces = min(n, int(over / 0.9) + 1)
        bounds = np.linspace(0, n, pieces + 1).astype(int).tolist()
        ranges: list[tuple[int, int]] = []
        todo = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]
        while todo:
            lo, hi = todo.pop(0)
            raw, packed = self._size(lo, hi)
            if raw <= raw_budget and packed <= budget:
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

    * :class:`UnknownVersionError` -- a major version other than 1;
    * :class:`OversizedBatchError` -- the frame declares more than
      ``max_decompressed`` bytes (checked before decompressing);
    * :class:`~edge_agent.wire.errors.TruncatedColumnsError` -- a column's
      data does not hold exactly the header's record count;
    * :class:`CorruptBatchError` -- anything else that is not a valid
      batch (bad magic, zstd or msgpack error, checksum mismatch, wrong
      header types, a required column missing).
    """
    data = bytes(data)
    if len(data) < len(PREAMBLE) or data[:3] != MAGIC:
        raise CorruptBatchError(
            f"not a sampleflow batch: expected magic {MAGIC!r}, got {data[:3]!r}"
        )
    major = data[3]
    if major != FORMAT_MAJOR:
        raise UnknownVersionError(
            f"batch format major version {major}; this reader knows {FORMAT_MAJOR}"
        )
    frame = data[len(PREAMBLE) :]
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
        raw = _decompress(frame)
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
    header = _read_header(body)
    entries = body.get("c")
    if not isinstance(entries, list):
        raise CorruptBatchError("batch has no column list ('c')")
    columns, skipped = decode_columns(entries, header.record_count)
    missing = REQUIRED_COLUMNS - columns.keys()
    if missing:
        raise CorruptBatchError(
            f"required columns missing: {', '.join(sorted(missing))}"
        )
    return DecodedBatch(header, columns, skipped)


def _read_header(body: dict[str, Any]) -> BatchHeader:
    def get(key: str, kind: type, what: str, default: Any = None) -> Any:
        value = body.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CorruptBatchError(
                f"header field {key!r} ({what}) has the wrong type: {value!r:.40}"
            )
        return value

    minor = get("v", int, "minor version")
    bid = get("i", bytes, "batch id")
    if len(bid) != 16:
        raise CorruptBatchError(f"header field 'i' must be 16 bytes, got {len(bid)}")
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
        created_ms=start + get("e", int, "encoded at"),
        version=(FORMAT_MAJOR, minor),
    )
