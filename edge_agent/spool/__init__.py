"""The relay's durable spool: encoded batches on disk until Kinesis has them.

See :mod:`edge_agent.spool.spool` for the durability contract and
:mod:`edge_agent.spool.fileformat` for the file layout.
"""

from edge_agent.spool.errors import (
    DuplicateBatchError,
    SpoolClosedError,
    SpoolError,
    SpoolFullError,
    SpoolLockedError,
    SpoolOrderError,
    SpoolWriteError,
)
from edge_agent.spool.fileformat import SpoolFormatError
from edge_agent.spool.spool import (
    FULL_POLICIES,
    MAX_PARTITION_KEY_CHARS,
    PendingBatch,
    Spool,
    SpooledBatch,
    SpoolStats,
)

__all__ = [
    "FULL_POLICIES",
    "MAX_PARTITION_KEY_CHARS",
    "DuplicateBatchError",
    "PendingBatch",
    "Spool",
    "SpoolClosedError",
    "SpoolError",
    "SpoolFormatError",
    "SpoolFullError",
    "SpoolLockedError",
    "SpoolOrderError",
    "SpoolStats",
    "SpoolWriteError",
    "SpooledBatch",
]
