"""NetFlow v1 and v5: fixed 48-byte records after a fixed header.

The records are described as a fixed "template" of IPFIX element ids so
that the shared vector builder reads them: a whole datagram (or, through
the batch, many datagrams) is one ``np.frombuffer`` over a structured
dtype, never a field at a time in Python.

v5 header (24 bytes): version, count, sysUptime ms, unix secs, unix nsecs,
flow sequence (counts records), engine type, engine id, sampling (top 2
bits mode, low 14 bits interval).  v1 header (16 bytes): version, count,
sysUptime, unix secs, unix nsecs.  The domain of a v5 record is
``engine_type << 8 | engine_id``; v1 has none (0).

The header's sampling interval is the rate whatever the mode bits say
(Juniper MX sends mode 0 with interval 1000); an interval of 0 announces
nothing.  Times follow the export header: abs = unix_secs*1000 -
(sysUptime - value); unix_nsecs is not used (ms precision is kept by the
uptime difference, the usual collector convention).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from edge_agent.flows.counters import ExporterCounters
from edge_agent.flows.fields import FieldSpec, RecordBatch, compile_layout
from edge_agent.flows.sampling import SamplingTable
from edge_agent.flows.schema import ExportProtocol
from edge_agent.flows.sequence import SequenceTracker

V5_HEADER = struct.Struct(">HHIIIIBBH")
V1_HEADER = struct.Struct(">HHIII")
RECORD_LENGTH = 48
#: Most records a v5 datagram may carry (Cisco's limit; larger counts are
#: still decoded if the bytes are there).
V5_MAX_COUNT = 30

_PAD = 0  # element 0 is reserved: never mapped, so a pad is skipped

V5_FIELDS = (
    FieldSpec(8, 4),  # srcaddr
    FieldSpec(12, 4),  # dstaddr
    FieldSpec(15, 4),  # nexthop
    FieldSpec(10, 2),  # input
    FieldSpec(14, 2),  # output
    FieldSpec(2, 4),  # dPkts
    FieldSpec(1, 4),  # dOctets
    FieldSpec(22, 4),  # first (sysUptime ms)
    FieldSpec(21, 4),  # last
    FieldSpec(7, 2),  # srcport
    FieldSpec(11, 2),  # dstport
    FieldSpec(_PAD, 1),
    FieldSpec(6, 1),  # tcp_flags
    FieldSpec(4, 1),  # prot
    FieldSpec(5, 1),  # tos
    FieldSpec(16, 2),  # src_as
    FieldSpec(17, 2),  # dst_as
    FieldSpec(9, 1),  # src_mask
    FieldSpec(13, 1),  # dst_mask
    FieldSpec(_PAD, 2),
)

V1_FIELDS = (
    FieldSpec(8, 4),
    FieldSpec(12, 4),
    FieldSpec(15, 4),
    FieldSpec(10, 2),
    FieldSpec(14, 2),
    FieldSpec(2, 4),
    FieldSpec(1, 4),
    FieldSpec(22, 4),
    FieldSpec(21, 4),
    FieldSpec(7, 2),
    FieldSpec(11, 2),
    FieldSpec(_PAD, 2),
    FieldSpec(4, 1),  # prot
    FieldSpec(5, 1),  # tos
    FieldSpec(6, 1),  # flags
    FieldSpec(_PAD, 7),  # tcp_retx_cnt, tcp_retx_secs, tcp_misseq_cnt, reserved
)

V5_LAYOUT = compile_layout(V5_FIELDS, RECORD_LENGTH)
V1_LAYOUT = compile_layout(V1_FIELDS, RECORD_LENGTH)


class NetflowV5Decoder:
    """Walk v1/v5 headers and queue their records on a :class:`RecordBatch`.

    Error reasons: ``truncated_header`` (shorter than the header),
    ``count_exceeds_datagram`` (the header count promises more records
    than the bytes hold: the records that fit are decoded),
    ``datagram_longer_than_count`` (bytes after the counted records:
    ignored).
    """

    def __init__(
        self,
        sampling: SamplingTable,
        sequences: SequenceTracker,
        settle: Callable[[RecordBatch], None],
    ) -> None:
        self.sampling = sampling
        self.sequences = sequences
        self.settle = settle
        # Last header interval seen per (exporter, domain): announcing only
        # changes keeps the per-datagram cost low.
        self._announced: dict[tuple[bytes, int], int] = {}

    def walk(
        self,
        payload: bytes,
        exporter: bytes,
        port: int,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        """Decode one v1 or v5 datagram (the version is already checked)."""
        size = len(payload)
        if payload[1] == 1:
            self._walk_v1(payload, exporter, port, counters, batch)
            return
        if size < 24:
            counters.errors["truncated_header"] += 1
            return
        _, count, uptime, secs, _nsecs, seq, engine_type, engine_id, sampling = (
            V5_HEADER.unpack_from(payload)
        )
        fit = (size - 24) // RECORD_LENGTH
        if count > fit:
            counters.errors["count_exceeds_datagram"] += 1
            count = fit
        elif count < fit:
            counters.errors["datagram_longer_than_count"] += 1
        domain = engine_type << 8 | engine_id
        interval = sampling & 0x3FFF
        if interval:
            key = (exporter, domain)
            if self._announced.get(key) != interval:
                if len(self._announced) < self.sampling.max_entries:
                    self._announced[key] = interval
                if batch.deferred and self.sampling.changes(
                    exporter, domain, 0, interval
                ):
                    self.settle(batch)
                self.sampling.announce(exporter, domain, 0, interval)
        rate = self.sampling.lookup(exporter, domain, 0)
        self.sequences.check((exporter, port, 5, domain), seq, count, counters)
        if count:
            batch.add(
                (V5_LAYOUT, exporter, port, domain),
                ExportProtocol.NETFLOW_V5,
                payload[24 : 24 + count * RECORD_LENGTH],
                count,
                (secs, uptime, secs * 1000, -1, rate),
            )
            counters.records += count

    def _walk_v1(
        self,
        payload: bytes,
        exporter: bytes,
        port: int,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        size = len(payload)
        if size < 16:
            counters.errors["truncated_header"] += 1
            return
        _, count, uptime, secs, _nsecs = V1_HEADER.unpack_from(payload)
        fit = (size - 16) // RECORD_LENGTH
        if count > fit:
            counters.errors["count_exceeds_datagram"] += 1
            count = fit
        elif count < fit:
            counters.errors["datagram_longer_than_count"] += 1
        rate = self.sampling.lookup(exporter, 0, 0)
        if count:
            batch.add(
                (V1_LAYOUT, exporter, port, 0),
                ExportProtocol.NETFLOW_V1,
                payload[16 : 16 + count * RECORD_LENGTH],
                count,
                (secs, uptime, secs * 1000, -1, rate),
            )
            counters.records += count
