"""Reading the relay batches off the stream, as a second consumer.

:class:`StreamReader` takes one iterator per shard when it opens (``LATEST``:
only what is put from then on), reads with ``GetRecords`` and decodes each
record with the wire format's own reader (:func:`edge_agent.wire.
decode_batch`).  It counts everything it saw, and separately the batches
of one exporter (the relay ships one exporter per batch), so the demo can
tell its own flows from those of a capture replayed alongside:
batches, bytes, rows and flows, and undecodable records by error class.
The rows' sampled packets, bytes and rates are kept for an estimate
computed from the stream itself.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import botocore.exceptions
import numpy as np

from edge_agent.wire import WireFormatError, decode_batch


@dataclass
class StreamCounts:
    """Batches read and what they held."""

    batches: int = 0  # Kinesis records (one relay batch each)
    bytes: int = 0  # their data bytes
    rows: int = 0  # aggregated rows
    flows: int = 0  # flow records the rows stand for (sum of flow_count)


@dataclass
class ReaderStats:
    """What a :class:`StreamReader` read: all of it, and one exporter's."""

    total: StreamCounts = field(default_factory=StreamCounts)
    exporter: StreamCounts = field(default_factory=StreamCounts)
    #: undecodable records by error class
    invalid: collections.Counter[str] = field(default_factory=collections.Counter)
    #: failed Kinesis calls by error code (the next poll tries again)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


class StreamReader:
    """Read every relay batch put on ``stream_name`` after :meth:`open`.

    ``exporter`` (16 bytes) is the exporter counted on its own.  Not
    thread-safe; one thread polls.
    """

    def __init__(self, client: Any, stream_name: str, exporter: bytes) -> None:
        self.client = client
        self.stream_name = stream_name
        self.exporter = np.frombuffer(exporter, np.uint8)
        self.stats = ReaderStats()
        #: the exporter's rows: sampled packets, bytes, rate (one array each
        #: per batch)
        self.packets: list[np.ndarray] = []
        self.octets: list[np.ndarray] = []
        self.rates: list[np.ndarray] = []
        self._iterators: dict[str, str | None] = {}

    def open(self, position: str = "LATEST") -> None:
        """Take one iterator per shard (``LATEST``: only what comes next)."""
        shards = self.client.list_shards(StreamName=self.stream_name)["Shards"]
        for shard in shards:
            self._iterators[shard["ShardId"]] = self.client.get_shard_iterator(
                StreamName=self.stream_name,
                ShardId=shard["ShardId"],
                ShardIteratorType=position,
            )["ShardIterator"]

    def poll(self) -> int:
        """One ``GetRecords`` per shard; returns the batches decoded.  A failed
        call is counted in ``stats.errors`` and tried again next time."""
        decoded = 0
        for shard_id, iterator in list(self._iterators.items()):
            if iterator is None:
                continue
            try:
                page = self.client.get_records(ShardIterator=iterator, Limit=10000)
            except botocore.exceptions.ClientError as exc:
                self.stats.errors[exc.response.get("Error", {}).get("Code", "?")] += 1
                continue
            except botocore.exceptions.BotoCoreError as exc:
                self.stats.errors[type(exc).__name__] += 1
                continue
            self._iterators[shard_id] = page.get("NextShardIterator")
            for record in page["Records"]:
                data = bytes(record["Data"])
                try:
                    batch = decode_batch(data)
                except WireFormatError as exc:
                    self.stats.invalid[type(exc).__name__] += 1
                    continue
                decoded += 1
                cols = batch.columns
                flows = int(cols["flow_count"].sum(dtype=np.uint64))
                _count(self.stats.total, len(data), batch.header.record_count, flows)
                exporters = np.ascontiguousarray(cols["exporter"]).view(np.uint8)
                if exporters.size and np.array_equal(exporters[:16], self.exporter):
                    _count(
                        self.stats.exporter, len(data), batch.header.record_count, flows
                    )
                    self.packets.append(cols["packets"])
                    self.octets.append(cols["bytes"])
                    self.rates.append(cols["sampling_rate"])
        return decoded

    def exporter_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exporter's rows so far: (packets, bytes, sampling_rate)."""

        def join(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, np.uint64)

        return join(self.packets), join(self.octets), join(self.rates)


def _count(counts: StreamCounts, size: int, rows: int, flows: int) -> None:
    counts.batches += 1
    counts.bytes += size
    counts.rows += rows
    counts.flows += flows
