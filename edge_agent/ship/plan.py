"""Choosing which pending batches go into the next PutRecords call.

A pure function over spool metadata so its rules are tested on their
own: the record and call size limits, the in-flight byte budget and the
per-key ordering rule of :class:`~edge_agent.ship.config.ShipperConfig`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from edge_agent.spool import PendingBatch


def record_bytes(batch: PendingBatch) -> int:
    """Bytes a batch counts for against Kinesis limits (payload plus key)."""
    return batch.payload_len + len(batch.partition_key.encode("utf-8"))


@dataclass
class CallPlan:
    """The batches picked for one call, and those no call can ever carry."""

    batches: list[PendingBatch] = field(default_factory=list)
    #: record bytes of ``batches``
    call_bytes: int = 0
    #: payload bytes of ``batches`` (what the in-flight budget counts)
    payload_bytes: int = 0
    too_large: list[PendingBatch] = field(default_factory=list)


def plan_call(
    pending: Iterable[PendingBatch],
    *,
    blocked_keys: Iterable[str] = (),
    strict_key_order: bool,
    max_records: int,
    max_call_bytes: int,
    max_record_bytes: int,
    budget_bytes: int,
) -> CallPlan:
    """Pick batches for one call from ``pending`` (oldest first).

    ``blocked_keys`` are keys with a batch in flight.  With
    ``strict_key_order`` a key contributes at most one batch, and none at
    all once an older batch of it was passed over (it did not fit the
    call or the budget), so a key's batches first arrive in seq order.
    ``budget_bytes`` bounds the payload bytes picked.  Batches whose
    record exceeds ``max_record_bytes`` go to ``too_large``.
    """
    plan = CallPlan()
    blocked = set(blocked_keys) if strict_key_order else set()
    for batch in pending:
        if len(plan.batches) >= max_records:
            break
        size = record_bytes(batch)
        if size > max_record_bytes:
            plan.too_large.append(batch)
            continue
        key = batch.partition_key
        if key in blocked:
            continue
        if (
            plan.call_bytes + size > max_call_bytes
            or plan.payload_bytes + batch.payload_len > budget_bytes
        ):
            if strict_key_order:
                blocked.add(key)
            continue
        plan.batches.append(batch)
        plan.call_bytes += size
        plan.payload_bytes += batch.payload_len
        if strict_key_order:
            blocked.add(key)
    return plan
