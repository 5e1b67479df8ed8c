"""Stream offsets for the Kinesis source: one position per shard.

A :class:`StreamOffset` is what Spark writes to the checkpoint's offset log
before each micro-batch and hands back to the source on restart, so it must
say exactly which records a batch holds.  Per shard it keeps either

* ``after``: the sequence number of the last record already part of a
  batch (the next read starts ``AFTER_SEQUENCE_NUMBER``), or
* ``start``: where to begin when nothing of the shard was read yet
  (``TRIM_HORIZON``, or ``AT_TIMESTAMP`` with ``ts_ms``; a ``LATEST`` start
  is pinned to the query's start time so a restart does not skip records),

plus ``drained``: the shard is closed (split or merged away) and every
record of it is part of a batch.  A child shard is read only once all its
parents are drained, so records of one partition key keep their order
across a reshard.

Sequence numbers are decimal strings (56 digits on AWS); they are compared
as integers, never as strings.  The JSON form is canonical (shards sorted,
fixed key order) because Spark decides "no new data" by comparing the JSON
of the start and end offsets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

#: Bumped when the JSON layout changes; older checkpoints are refused.
OFFSET_VERSION = 1

TRIM_HORIZON = "TRIM_HORIZON"
AT_TIMESTAMP = "AT_TIMESTAMP"
_STARTS = (TRIM_HORIZON, AT_TIMESTAMP)


class OffsetError(ValueError):
    """Raised when an offset from a checkpoint cannot be understood."""


def sequence_key(sequence_number: str) -> int:
    """Return the integer order of a Kinesis sequence number.

    Raises :class:`OffsetError` if it is not a decimal string.
    """
    if not sequence_number.isdigit():
        raise OffsetError(
            f"sequence number must be a decimal string, got {sequence_number!r}"
        )
    return int(sequence_number)


@dataclass(frozen=True)
class ShardPosition:
    """Where one shard stands; see the module docstring for the fields."""

    after: str | None = None
    start: str = TRIM_HORIZON
    ts_ms: int | None = None
    drained: bool = False

    def __post_init__(self) -> None:
        if self.after is not None:
            sequence_key(self.after)
        if self.start not in _STARTS:
            raise OffsetError(f"start must be one of {_STARTS}, got {self.start!r}")
        if self.start == AT_TIMESTAMP and self.ts_ms is None:
            raise OffsetError("an AT_TIMESTAMP start needs ts_ms")

    def advanced_to(self, sequence_number: str, *, drained: bool) -> ShardPosition:
        """Return the position after ``sequence_number`` (a later record)."""
        return replace(self, after=sequence_number, drained=drained)

    def includes(self, sequence_number: str) -> bool:
        """True if the record ``sequence_number`` is at or before here."""
        if self.after is None:
            return False
        return sequence_key(sequence_number) <= sequence_key(self.after)

    def to_json(self) -> dict[str, Any]:
        """The canonical JSON-ready form (only the fields that apply)."""
        out: dict[str, Any] = {}
        if self.after is not None:
            out["after"] = self.after
        else:
            out["start"] = self.start
            if self.start == AT_TIMESTAMP:
                out["ts_ms"] = self.ts_ms
        out["drained"] = self.drained
        return out

    @classmethod
    def from_json(cls, data: Any) -> ShardPosition:
        """Parse :meth:`to_json` output; raises :class:`OffsetError`."""
        if not isinstance(data, dict):
            raise OffsetError(f"shard position must be an object, got {data!r}")
        after = data.get("after")
        if after is not None and not isinstance(after, str):
            raise OffsetError(f"after must be a string, got {after!r}")
        ts_ms = data.get("ts_ms")
        if ts_ms is not None and not isinstance(ts_ms, int):
            raise OffsetError(f"ts_ms must be an integer, got {ts_ms!r}")
        return cls(
            after=after,
            start=str(data.get("start", TRIM_HORIZON)),
            ts_ms=ts_ms,
            drained=bool(data.get("drained", False)),
        )


@dataclass(frozen=True)
class StreamOffset:
    """The positions of every shard of one stream that the source tracks."""

    shards: dict[str, ShardPosition] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The canonical JSON-ready form handed to Spark."""
        return {
            "v": OFFSET_VERSION,
            "shards": {k: self.shards[k].to_json() for k in sorted(self.shards)},
        }

    def dumps(self) -> str:
        """The canonical JSON text (what Spark compares)."""
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: Any) -> StreamOffset:
        """Parse :meth:`to_json` output; raises :class:`OffsetError`."""
        if not isinstance(data, dict):
            raise OffsetError(f"stream offset must be an object, got {data!r}")
        version = data.get("v")
        if version != OFFSET_VERSION:
            raise OffsetError(
                f"offset version {version!r} is not supported "
                f"(this source writes {OFFSET_VERSION}); start from a new checkpoint"
            )
        shards = data.get("shards")
        if not isinstance(shards, dict):
            raise OffsetError(f"shards must be an object, got {shards!r}")
        return cls({str(k): ShardPosition.from_json(v) for k, v in shards.items()})

    def with_shard(self, shard_id: str, position: ShardPosition) -> StreamOffset:
        """Return a copy with one shard's position replaced."""
        shards = dict(self.shards)
        shards[shard_id] = position
        return StreamOffset(shards)
