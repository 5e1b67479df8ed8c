"""The on-disk format of one spooled batch (one file per batch).

A spool file is, in this order (integers little-endian)::

    offset  size  field
    0       4     magic b"SFSB" (sampleflow spool batch)
    4       1     format version, 1
    5       1     flags, 0 (reserved)
    6       2     length of the batch id in bytes (UTF-8)
    8       2     length of the partition key in bytes (UTF-8)
    10      2     reserved, 0
    12      4     payload length in bytes
    16      8     seq (the replay order)
    24      8     time the batch was accepted, ns since the UNIX epoch
    32      I     batch id, then partition key (I = the two lengths)
    32+I    4     CRC-32 (zlib) of bytes 0 .. 32+I
    36+I    P     payload
    36+I+P  4     CRC-32 (zlib) of the payload

so a file is exactly :data:`OVERHEAD_BYTES` plus the id, key and payload
lengths.  The header has its own checksum so a damaged payload is told
apart from a damaged header in the counters; a truncated or extended file
fails the length check before any checksum is computed.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"SFSB"
VERSION = 1
_FIXED = struct.Struct("<4sBBHHHIQQ")
_CRC = struct.Struct("<I")
#: Bytes a file holds beyond its batch id, partition key and payload.
OVERHEAD_BYTES = _FIXED.size + 2 * _CRC.size
_MAX_U16 = 0xFFFF
_MAX_U32 = 0xFFFFFFFF
_MAX_U64 = 0xFFFFFFFFFFFFFFFF


class SpoolFormatError(ValueError):
    """Raised when spool file bytes are not a valid batch.

    ``reason`` is a short stable snake_case string used as the counter
    label: ``too_short``, ``bad_magic``, ``bad_version``,
    ``length_mismatch``, ``header_checksum``, ``payload_checksum``,
    ``bad_text`` or ``invalid_fields``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class DecodedFile:
    """The fields of one spool file."""

    batch_id: str
    partition_key: str
    payload: bytes
    seq: int
    created_ns: int


def file_size(batch_id: str, partition_key: str, payload_len: int) -> int:
    """Return the size in bytes of the file that would hold this batch."""
    return (
        OVERHEAD_BYTES
        + len(batch_id.encode("utf-8"))
        + len(partition_key.encode("utf-8"))
        + payload_len
    )


def encode(
    batch_id: str, partition_key: str, payload: bytes, seq: int, created_ns: int
) -> bytes:
    """Return the file bytes for one batch.

    Raises :class:`ValueError` when a field does not fit its width (id or
    key over 65535 UTF-8 bytes, payload over 4 GiB - 1, seq or time outside
    an unsigned 64-bit integer).
    """
    bid = batch_id.encode("utf-8")
    key = partition_key.encode("utf-8")
    if len(bid) > _MAX_U16 or len(key) > _MAX_U16:
        raise ValueError(
            f"batch id and partition key must be <= {_MAX_U16} UTF-8 bytes, "
            f"got {len(bid)} and {len(key)}"
        )
    if len(payload) > _MAX_U32:
        raise ValueError(f"payload must be <= {_MAX_U32} bytes, got {len(payload)}")
    if not 0 <= seq <= _MAX_U64 or not 0 <= created_ns <= _MAX_U64:
        raise ValueError(f"seq and time must fit in 64 bits, got {seq}, {created_ns}")
    head = (
        _FIXED.pack(
            MAGIC, VERSION, 0, len(bid), len(key), 0, len(payload), seq, created_ns
        )
        + bid
        + key
    )
    return b"".join(
        (
            head,
            _CRC.pack(zlib.crc32(head)),
            payload,
            _CRC.pack(zlib.crc32(payload)),
        )
    )


def decode(data: bytes) -> DecodedFile:
    """Parse and verify the bytes of one spool file.

    Raises :class:`SpoolFormatError` naming what is wrong.
    """
    if len(data) < OVERHEAD_BYTES:
        raise SpoolFormatError(
            "too_short", f"{len(data)} bytes, a file has at least {OVERHEAD_BYTES}"
        )
    magic, version, _flags, id_len, key_len, _res, payload_len, seq, created_ns = (
        _FIXED.unpack_from(data)
    )
    if magic != MAGIC:
        raise SpoolFormatError("bad_magic", f"magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise SpoolFormatError("bad_version", f"version {version}, expected {VERSION}")
    expected = OVERHEAD_BYTES + id_len + key_len + payload_len
    if len(data) != expected:
        raise SpoolFormatError(
            "length_mismatch", f"{len(data)} bytes, the header says {expected}"
        )
    head_end = _FIXED.size + id_len + key_len
    (head_crc,) = _CRC.unpack_from(data, head_end)
    if zlib.crc32(memoryview(data)[:head_end]) != head_crc:
        raise SpoolFormatError("header_checksum", "header CRC-32 does not match")
    payload_start = head_end + _CRC.size
    payload = data[payload_start : payload_start + payload_len]
    (payload_crc,) = _CRC.unpack_from(data, payload_start + payload_len)
    if zlib.crc32(payload) != payload_crc:
        raise SpoolFormatError("payload_checksum", "payload CRC-32 does not match")
    try:
        batch_id = data[_FIXED.size : _FIXED.size + id_len].decode("utf-8")
        partition_key = data[_FIXED.size + id_len : head_end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpoolFormatError("bad_text", str(exc)) from exc
    return DecodedFile(batch_id, partition_key, payload, seq, created_ns)
