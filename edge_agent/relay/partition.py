"""Kinesis partition keys for the relay's batches.

Kinesis maps a partition key (MD5) to a shard and keeps the records of one
key in order.  Schemes (setting ``kinesis.partition``):

``exporter`` (default)
    one key per (tenant, relay, exporter address): the batches of one
    exporter stay in order on one shard; exporters spread over shards.
    Tenant and relay are part of the key so the same private exporter
    address behind many relays does not pile onto one shard.
``relay``
    one key per (tenant, relay): every batch of the relay on one shard,
    in order.
``random``
    a random key per window and exporter: batches spread evenly over the
    shards, with no ordering.

Keys are opaque: 12 URL-safe base64 characters of a BLAKE2b hash (72 bits)
of the identity, not the identity itself.  Kinesis counts the key against
the 1 MiB record limit and bills it, and the batch header already names
the tenant and relay (and the rows the exporter), so a readable key would
only cost bytes on every record.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Literal, get_args

from edge_agent.flows.schema import address_text

PartitionScheme = Literal["exporter", "relay", "random"]
PARTITION_SCHEMES: tuple[str, ...] = get_args(PartitionScheme)


def _opaque(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def partition_key(scheme: str, tenant_id: str, relay_id: str, exporter: bytes) -> str:
    """Return the partition key of a batch of ``exporter`` (16 bytes).

    Raises ValueError for an unknown scheme.
    """
    if scheme == "exporter":
        identity = f"{tenant_id}/{relay_id}/{address_text(exporter)}"
    elif scheme == "relay":
        identity = f"{tenant_id}/{relay_id}"
    elif scheme == "random":
        return _opaque(os.urandom(9))
    else:
        raise ValueError(
            f"partition scheme must be one of {', '.join(PARTITION_SCHEMES)}, "
            f"got {scheme!r}"
        )
    return _opaque(hashlib.blake2b(identity.encode(), digest_size=9).digest())
