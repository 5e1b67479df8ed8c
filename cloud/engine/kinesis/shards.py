"""Shard lineage: which shards exist, and which may be read now.

Kinesis reshards by closing a shard and opening children: a split gives two
children with the same ``ParentShardId``; a merge gives one child with a
``ParentShardId`` and an ``AdjacentParentShardId``.  Records for one
partition key go to the parent until the reshard and to a child after it,
so a child is read only once every parent is drained (see
:mod:`cloud.engine.kinesis.offsets`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cloud.engine.kinesis.offsets import ShardPosition, StreamOffset


@dataclass(frozen=True)
class ShardInfo:
    """One shard as ListShards describes it."""

    shard_id: str
    parents: tuple[str, ...] = ()
    #: set once the shard is closed; None while it is open.
    ending_sequence_number: str | None = None

    @classmethod
    def from_api(cls, shard: Mapping[str, Any]) -> ShardInfo:
        """Build from one element of a ListShards ``Shards`` list."""
        parents = tuple(
            str(shard[key])
            for key in ("ParentShardId", "AdjacentParentShardId")
            if shard.get(key)
        )
        seq_range = shard.get("SequenceNumberRange") or {}
        ending = seq_range.get("EndingSequenceNumber")
        return cls(
            shard_id=str(shard["ShardId"]),
            parents=parents,
            ending_sequence_number=str(ending) if ending else None,
        )


def track_new_shards(
    offset: StreamOffset,
    listing: Iterable[ShardInfo],
    first_position: ShardPosition,
) -> StreamOffset:
    """Add the listed shards that ``offset`` does not track yet.

    ``first_position`` applies to shards present when the query starts (an
    empty ``offset``).  A shard that appears later is a child of a reshard
    and is always read from its beginning (TRIM_HORIZON), whatever the
    query's starting position, so nothing written to it is skipped.
    """
    known = dict(offset.shards)
    start_of_query = not known
    for info in listing:
        if info.shard_id not in known:
            known[info.shard_id] = first_position if start_of_query else ShardPosition()
    return StreamOffset(known)


def forget_expired_shards(
    offset: StreamOffset, listing: Iterable[ShardInfo]
) -> tuple[StreamOffset, list[str]]:
    """Drop shards that left the listing (past the stream's retention).

    Returns the new offset and the ids of shards that vanished *before* they
    were drained: their unread records are lost (the caller counts them).
    Those are kept as drained so that their children do not wait forever.
    """
    listed = {info.shard_id for info in listing}
    shards: dict[str, ShardPosition] = {}
    lost: list[str] = []
    for shard_id, position in offset.shards.items():
        if shard_id in listed:
            shards[shard_id] = position
        elif not position.drained:
            lost.append(shard_id)
            shards[shard_id] = ShardPosition(
                after=position.after,
                start=position.start,
                ts_ms=position.ts_ms,
                drained=True,
            )
        # A drained shard that left the listing is simply forgotten; a child
        # whose parent is unknown treats it as drained.
    return StreamOffset(shards), lost


def readable_shards(
    offset: StreamOffset, lineage: Mapping[str, ShardInfo]
) -> list[str]:
    """Shards to read now: not drained, and every known parent drained.

    A parent that ``offset`` does not track (expired, or closed before a
    LATEST start was recorded) counts as drained.  Sorted by shard id so
    that plans are deterministic.
    """
    out: list[str] = []
    for shard_id in sorted(offset.shards):
        position = offset.shards[shard_id]
        if position.drained:
            continue
        info = lineage.get(shard_id)
        parents = info.parents if info is not None else ()
        if all(
            offset.shards[parent].drained
            for parent in parents
            if parent in offset.shards
        ):
            out.append(shard_id)
    return out
