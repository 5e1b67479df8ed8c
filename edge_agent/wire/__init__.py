"""Batch wire format (version 2; version 1 still read), shared by the relay
and the cloud.

The relay calls :func:`encode_batches`; the cloud calls
:func:`decode_batch`, which reads both versions into the same columns.
The specification is docs/wire-format.md.
"""

from edge_agent.wire.batch import (
    FORMAT_MAJOR,
    FORMAT_MINOR,
    MAX_BATCH_ROWS,
    MAX_DECOMPRESSED_BYTES,
    READ_MAJORS,
    BatchHeader,
    DecodedBatch,
    EncodedBatch,
    HeaderFields,
    decode_batch,
    encode_batches,
    new_batch_id,
)
from edge_agent.wire.columns import COLUMNS, REQUIRED_COLUMNS, Encoding
from edge_agent.wire.errors import (
    CorruptBatchError,
    OversizedBatchError,
    TruncatedColumnsError,
    UnknownVersionError,
    WireFormatError,
)
from edge_agent.wire.limits import (
    KINESIS_MAX_BYTES_PER_PUT,
    KINESIS_MAX_PARTITION_KEY_CHARS,
    KINESIS_MAX_RECORD_BYTES,
    KINESIS_MAX_RECORDS_PER_PUT,
)

__all__ = [
    "COLUMNS",
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "KINESIS_MAX_BYTES_PER_PUT",
    "KINESIS_MAX_PARTITION_KEY_CHARS",
    "KINESIS_MAX_RECORDS_PER_PUT",
    "KINESIS_MAX_RECORD_BYTES",
    "MAX_BATCH_ROWS",
    "MAX_DECOMPRESSED_BYTES",
    "READ_MAJORS",
    "REQUIRED_COLUMNS",
    "BatchHeader",
    "CorruptBatchError",
    "DecodedBatch",
    "EncodedBatch",
    "Encoding",
    "HeaderFields",
    "OversizedBatchError",
    "TruncatedColumnsError",
    "UnknownVersionError",
    "WireFormatError",
    "decode_batch",
    "encode_batches",
    "new_batch_id",
]
