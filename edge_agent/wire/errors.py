"""Exceptions of the batch wire format; all derive from WireFormatError."""

from __future__ import annotations


class WireFormatError(ValueError):
    """A batch cannot be encoded or decoded; the message says why."""


class UnknownVersionError(WireFormatError):
    """The batch has a major format version this reader does not know.

    Readers reject unknown major versions outright (a new major version may
    change anything); a newer minor version of a known major is read.
    """


class CorruptBatchError(WireFormatError):
    """The bytes are not a valid batch: bad magic, a zstd or msgpack error,
    a header field of the wrong type, an unknown column encoding, a required
    column missing."""


class TruncatedColumnsError(CorruptBatchError):
    """A column holds fewer or more bytes than the record count implies."""


class OversizedBatchError(WireFormatError):
    """A batch is over a size bound: on decode, its declared decompressed
    size exceeds the reader's limit (a decompression bomb is refused before
    anything is allocated); on encode, one record alone cannot fit."""
