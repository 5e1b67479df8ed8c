"""Kinesis records → window sums and flow rows, inside Spark tasks.

One Kinesis record is one relay batch (:mod:`edge_agent.wire`).  Two
``mapInArrow`` functions read the source's rows:

:func:`summarize_partition` yields :data:`SUMMARY_SCHEMA` rows of three
kinds (column ``kind``):

* :data:`KIND_BATCH` -- one per valid record: its header, for duplicate
  detection (a relay delivers a batch at least once), and the record's
  data itself (``payload``, still compressed: ~10 bytes a flow against 93
  decoded) for the driver, which decodes the accepted ones again
  (:func:`payload_flows`) for per-host features and network statistics;
* :data:`KIND_WINDOW` -- per valid record and event-time window its flows
  fall in: the summed estimator statistics of
  :func:`cloud.engine.estimates.row_statistics` (the driver adds up those
  of the records it accepts, so flows never leave the executors);
* :data:`KIND_INVALID` -- one per record that does not decode, with its
  shard, sequence number, error class and message.  Nothing raises: a bad
  record never stops the stream.

:func:`flows_partition` yields the flow rows (:data:`FLOW_SCHEMA`) of the
records the driver accepted, for consumers of individual flows (scoring).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import structlog
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import (
    BinaryType,
    ByteType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from cloud.engine.estimates import STAT_FIELDS, row_statistics
from cloud.engine.windows import sum_by_window
from edge_agent.wire import DecodedBatch, WireFormatError, decode_batch

log = structlog.get_logger(__name__)

KIND_BATCH = 1
KIND_INVALID = 2
KIND_WINDOW = 3

#: Flow columns of the wire format and their Spark types.  Spark has no
#: unsigned types: u8 counters become long (a value over 2^63 - 1 makes the
#: record invalid, ``counter_overflow``), u4 long, u2 and u1 int.
FLOW_FIELDS: tuple[tuple[str, Any], ...] = (
    ("time_start", LongType()),  # ms since the epoch, UTC
    ("time_end", LongType()),
    ("exporter", BinaryType()),  # 16 bytes, IPv4-mapped for IPv4
    ("src_addr", BinaryType()),
    ("dst_addr", BinaryType()),
    ("sampling_rate", LongType()),  # 1-in-N; 0 = unknown
    ("in_if", LongType()),
    ("out_if", LongType()),
    ("present", LongType()),
    ("src_port", IntegerType()),
    ("dst_port", IntegerType()),
    ("protocol", IntegerType()),
    ("tos", IntegerType()),
    ("export_proto", IntegerType()),
    ("ip_version", IntegerType()),
    ("direction", IntegerType()),
    ("bytes", LongType()),  # sampled, as exported
    ("packets", LongType()),
    ("flow_count", LongType()),
    ("tcp_flags", IntegerType()),
)
_ADDRESS_COLUMNS = frozenset({"exporter", "src_addr", "dst_addr"})
_U64_COLUMNS = ("bytes", "packets")
_INT64_MAX = np.iinfo(np.int64).max

_HEADER_FIELDS = [
    StructField("tenant_id", StringType(), True),
    StructField("relay_id", StringType(), True),
    StructField("batch_id", StringType(), True),
    StructField("relay_seq", LongType(), True),
]

SUMMARY_SCHEMA = StructType(
    [
        StructField("kind", ByteType(), False),
        StructField("shard_id", StringType(), False),
        StructField("sequence_number", StringType(), False),
        *_HEADER_FIELDS,
        # batch rows: the relay's aggregation window and row count
        StructField("window_start_ms", LongType(), True),
        StructField("window_end_ms", LongType(), True),
        StructField("record_count", LongType(), True),
        StructField("skipped_columns", IntegerType(), True),
        StructField("created_ms", LongType(), True),
        StructField("payload", BinaryType(), True),
        # invalid rows
        StructField("error_kind", StringType(), True),
        StructField("error", StringType(), True),
        # window rows: the engine's event-time window of the sums
        StructField("w_start_ms", LongType(), True),
        StructField("w_end_ms", LongType(), True),
        StructField("w_max_time_ms", LongType(), True),
        StructField("w_flows", DoubleType(), True),
        *(StructField(f"st_{name}", DoubleType(), True) for name in STAT_FIELDS),
    ]
)
"""What :func:`summarize_partition` yields; see the module docstring."""

FLOW_SCHEMA = StructType(
    [
        StructField("shard_id", StringType(), False),
        StructField("sequence_number", StringType(), False),
        *_HEADER_FIELDS,
        *(StructField(name, kind, True) for name, kind in FLOW_FIELDS),
        StructField("score", FloatType(), True),
    ]
)
"""What :func:`flows_partition` yields: flows with their batch's header."""

#: The flow columns the driver needs (features, network statistics, tenant
#: state), packed: 93 bytes a row.  Units as in FLOW_DTYPE.
PAYLOAD_DTYPE = np.dtype(
    [
        ("time_start", "<i8"),  # ms since the epoch, UTC
        ("time_end", "<i8"),
        ("exporter", "V16"),  # IPv4-mapped for IPv4
        ("src_addr", "V16"),
        ("dst_addr", "V16"),
        ("sampling_rate", "<u4"),  # 1-in-N; 0 = unknown
        ("flow_count", "<u4"),
        ("bytes", "<u8"),  # sampled, as exported
        ("packets", "<u8"),
        ("dst_port", "<u2"),
        ("tcp_flags", "<u2"),
        ("protocol", "u1"),
    ]
)


def payload_of(batch: DecodedBatch) -> bytes:
    """The batch's flows as :data:`PAYLOAD_DTYPE` bytes."""
    out = np.empty(batch.header.record_count, dtype=PAYLOAD_DTYPE)
    for name in PAYLOAD_DTYPE.names or ():
        out[name] = batch.columns[name]
    return out.tobytes()


def unpack_payload(data: bytes) -> np.ndarray:
    """Inverse of :func:`payload_of` (a read-only view of ``data``)."""
    return np.frombuffer(data, dtype=PAYLOAD_DTYPE)


def payload_flows(data: bytes) -> np.ndarray:
    """The :data:`PAYLOAD_DTYPE` flows of a record the executors found
    valid (decoding it again costs ~0.3 µs a flow)."""
    return np.frombuffer(payload_of(decode_batch(data)), dtype=PAYLOAD_DTYPE)


_SUMMARY_ARROW = to_arrow_schema(SUMMARY_SCHEMA, timezone="UTC")
_FLOW_ARROW = to_arrow_schema(FLOW_SCHEMA, timezone="UTC")


def _counter_overflow(batch: DecodedBatch) -> bool:
    return any(bool(np.any(batch.columns[name] > _INT64_MAX)) for name in _U64_COLUMNS)


def _column(name: str, values: np.ndarray, field: pa.Field) -> pa.Array:
    if name in _ADDRESS_COLUMNS:
        raw = np.ascontiguousarray(values).tobytes()
        fixed = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(16), len(values), [None, pa.py_buffer(raw)]
        )
        return fixed.cast(field.type)
    return pa.array(values.astype(field.type.to_pandas_dtype(), copy=False))


def _rows_batch(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    arrays = [pa.array([r.get(f.name) for r in rows], f.type) for f in schema]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _decode(shard: str, seq: str, data: bytes) -> tuple[dict[str, Any], Any]:
    """Decode one record: (batch or invalid row, DecodedBatch or None)."""
    where = {"shard_id": shard, "sequence_number": seq}
    try:
        batch = decode_batch(data)
    except WireFormatError as exc:
        return {
            "kind": KIND_INVALID,
            "error_kind": type(exc).__name__,
            "error": str(exc),
            **where,
        }, None
    except Exception as exc:  # a decoder bug must not stop the stream
        log.error("wire_decoder_bug", error=repr(exc), **where)
        return {
            "kind": KIND_INVALID,
            "error_kind": f"decoder_bug:{type(exc).__name__}",
            "error": repr(exc),
            **where,
        }, None
    if _counter_overflow(batch):
        return {
            "kind": KIND_INVALID,
            "error_kind": "counter_overflow",
            "error": "a byte or packet counter is over 2^63 - 1",
            **where,
        }, None
    h = batch.header
    return {
        "kind": KIND_BATCH,
        **where,
        "tenant_id": h.tenant_id,
        "relay_id": h.relay_id,
        "batch_id": str(h.batch_id),
        "relay_seq": h.seq,
        "window_start_ms": h.window_start_ms,
        "window_end_ms": h.window_end_ms,
        "record_count": h.record_count,
        "skipped_columns": len(batch.skipped_columns),
        "created_ms": h.created_ms,
    }, batch


def _window_rows(
    header: dict[str, Any], batch: DecodedBatch, size_ms: int, slide_ms: int
) -> list[dict[str, Any]]:
    cols = batch.columns
    values = row_statistics(cols["packets"], cols["bytes"], cols["sampling_rate"])
    values["flows"] = cols["flow_count"]
    starts, max_time, sums = sum_by_window(cols["time_end"], values, size_ms, slide_ms)
    keep = {k: header[k] for k in ("shard_id", "sequence_number", "tenant_id")}
    keep.update(relay_id=header["relay_id"], batch_id=header["batch_id"])
    return [
        {
            **keep,
            "kind": KIND_WINDOW,
            "w_start_ms": int(starts[i]),
            "w_end_ms": int(starts[i]) + size_ms,
            "w_max_time_ms": int(max_time[i]),
            "w_flows": float(sums["flows"][i]),
            **{f"st_{name}": float(sums[name][i]) for name in STAT_FIELDS},
        }
        for i in range(len(starts))
    ]


def summarize_records(
    rows: pa.RecordBatch, size_ms: int, slide_ms: int
) -> pa.RecordBatch:
    """Batch, window and invalid rows (:data:`SUMMARY_SCHEMA`) of one Arrow
    batch of source rows, windows ``size_ms`` long every ``slide_ms``."""
    out: list[dict[str, Any]] = []
    for shard, seq, data in zip(
        rows.column("shard_id").to_pylist(),
        rows.column("sequence_number").to_pylist(),
        rows.column("data").to_pylist(),
        strict=True,
    ):
        meta, batch = _decode(shard, seq, data)
        if batch is not None:
            meta = {**meta, "payload": data}
        out.append(meta)
        if batch is not None and batch.header.record_count:
            out.extend(_window_rows(meta, batch, size_ms, slide_ms))
    return _rows_batch(out, _SUMMARY_ARROW)


def summarize_partition(
    batches: Iterator[pa.RecordBatch], size_ms: int, slide_ms: int
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` function (bind the window with functools.partial)."""
    for rows in batches:
        if rows.num_rows:
            yield summarize_records(rows, size_ms, slide_ms)


def _flow_batch(header: dict[str, Any], batch: DecodedBatch) -> pa.RecordBatch:
    """The flow rows of one decoded batch, the header repeated on each."""
    count = batch.header.record_count
    fields = {f.name: f for f in _FLOW_ARROW}
    cols = {
        name: _column(name, batch.columns[name], fields[name])
        for name, _ in FLOW_FIELDS
    }
    score = batch.columns.get("score")
    if score is not None:
        cols["score"] = pa.array(score.astype(np.float32, copy=False))
    repeat = pa.array(np.zeros(count, dtype=np.int32))
    arrays = []
    for f in _FLOW_ARROW:
        if f.name in cols:
            arrays.append(cols[f.name])
        elif f.name in header:
            arrays.append(pa.array([header[f.name]], f.type).take(repeat))
        else:
            arrays.append(pa.nulls(count, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=_FLOW_ARROW)


def flows_partition(
    batches: Iterator[pa.RecordBatch], accepted: frozenset[tuple[str, str]]
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` function: the flows of the records whose
    (shard, sequence number) is in ``accepted`` (bind it with partial)."""
    for rows in batches:
        for shard, seq, data in zip(
            rows.column("shard_id").to_pylist(),
            rows.column("sequence_number").to_pylist(),
            rows.column("data").to_pylist(),
            strict=True,
        ):
            if (shard, seq) not in accepted:
                continue
            meta, batch = _decode(shard, seq, data)
            if batch is not None and batch.header.record_count:
                yield _flow_batch(meta, batch)
