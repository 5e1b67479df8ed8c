"""Per-exporter decode counters: everything that moves gets a counter.

A :class:`DecodeStats` is owned by one decoder.  Decoders call
:meth:`DecodeStats.exporter` once per datagram and bump plain integer
attributes on the returned :class:`ExporterCounters`; the relay's metrics
module reads them (it never writes).  Error reasons are short stable
snake_case strings (``truncated_header``, ``unknown_version``, ...), each one
documented where it is raised.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class ExporterCounters:
    """Counters for one exporter (address, UDP port)."""

    datagrams: int = 0
    bytes: int = 0
    records: int = 0
    #: decode errors by reason; a datagram or set that is rejected bumps one.
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    #: records received out of sequence order or missing, per the header
    #: sequence numbers (v5/v9/IPFIX/sFlow), summed over domains.
    sequence_gaps: int = 0
    #: estimated records (v5/IPFIX) or datagrams (v9/sFlow) lost per the
    #: sequence numbers.
    estimated_lost: int = 0
    templates: int = 0  # templates currently known for this exporter
    templates_received: int = 0
    templates_withdrawn: int = 0
    #: data SETS held because their template had not arrived yet (a set's
    #: record count is unknown until its template comes)
    pending_held: int = 0
    pending_decoded: int = 0  # held sets decoded once the template came
    pending_expired: int = 0  # held sets dropped by age/count/byte bounds
    options_records: int = 0
    counter_samples: int = 0  # sFlow counter samples seen
    drop_notifications: int = 0  # sFlow discarded-packet samples seen


class DecodeStats:
    """A registry of :class:`ExporterCounters`, keyed by (address, port).

    The number of exporters tracked is bounded (``max_exporters``); past
    the bound, further exporters share one overflow entry keyed
    ``(b"", 0)`` so a flood of spoofed sources cannot grow memory.
    """

    OVERFLOW_KEY: tuple[bytes, int] = (b"", 0)

    def __init__(self, max_exporters: int = 4096) -> None:
        if max_exporters < 1:
            raise ValueError(f"max_exporters must be >= 1, got {max_exporters}")
        self.max_exporters = max_exporters
        self.by_exporter: dict[tuple[bytes, int], ExporterCounters] = {}

    def exporter(self, address: bytes, port: int) -> ExporterCounters:
        """Return the counters of one exporter, creating them if needed."""
        key = (address, port)
        counters = self.by_exporter.get(key)
        if counters is None:
            if len(self.by_exporter) >= self.max_exporters:
                key = self.OVERFLOW_KEY
                counters = self.by_exporter.get(key)
                if counters is not None:
                    return counters
            counters = ExporterCounters()
            self.by_exporter[key] = counters
        return counters

    def totals(self) -> ExporterCounters:
        """Sum over all exporters (errors summed per reason)."""
        total = ExporterCounters()
        for c in self.by_exporter.values():
            total.datagrams += c.datagrams
            total.bytes += c.bytes
            total.records += c.records
            total.errors.update(c.errors)
            total.sequence_gaps += c.sequence_gaps
            total.estimated_lost += c.estimated_lost
            total.templates += c.templates
            total.templates_received += c.templates_received
            total.templates_withdrawn += c.templates_withdrawn
            total.pending_held += c.pending_held
            total.pending_decoded += c.pending_decoded
            total.pending_expired += c.pending_expired
            total.options_records += c.options_records
            total.counter_samples += c.counter_samples
            total.drop_notifications += c.drop_notifications
        return total
