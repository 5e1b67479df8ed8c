"""The decoder front door: one datagram (or many) in, flow records out.

:class:`FlowDecoder` recognises the export protocol from the datagram
itself: the first four bytes ``00 00 00 05`` are sFlow v5, otherwise the
leading u16 is the NetFlow/IPFIX version (1, 5, 9 or 10).  It owns the
state the protocols need across datagrams (templates, held data, sampling
rates, sequence numbers) and the per-exporter counters.

It never raises on bad input: every rejected datagram, set or template
bumps a stable reason in ``stats.exporter(address, port).errors`` and the
records that could be decoded are returned.  Reasons raised here:
``empty_datagram``, ``unknown_version``, ``bad_exporter_address`` (the
address is neither 4 nor 16 bytes), ``decoder_bug`` (an unexpected
exception, logged: please report it).  The protocol modules document
their own.

Performance: :meth:`FlowDecoder.decode_many` reads the records of one
template (or NetFlow v5) across the datagrams of a batch in one numpy pass;
a batch of about a thousand datagrams is the sweet spot.  v9/IPFIX
datagrams of a layout their exporter repeats skip the set walk
(:mod:`edge_agent.flows.plans`).  A lone
:meth:`FlowDecoder.decode` call pays the fixed numpy cost (tens of
microseconds) for one datagram: collectors should batch.

Not thread-safe: use one decoder per collector task.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from edge_agent.flows.counters import DecodeStats, ExporterCounters
from edge_agent.flows.fields import RecordBatch
from edge_agent.flows.ipfix import IpfixDecoder
from edge_agent.flows.netflow_v5 import NetflowV5Decoder
from edge_agent.flows.netflow_v9 import NetflowV9Decoder
from edge_agent.flows.sampling import SamplingTable
from edge_agent.flows.schema import V4_MAPPED_PREFIX, address_bytes
from edge_agent.flows.sequence import SequenceTracker
from edge_agent.flows.sflow import CounterRecord, SflowDecoder
from edge_agent.flows.templates import PendingStore, TemplateCache

log = structlog.get_logger(__name__)

_SFLOW_V5 = b"\x00\x00\x00\x05"
#: Log at most one ``decoder_bug`` event per this many occurrences.
_BUG_LOG_EVERY = 1000


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder settings; every bound has a default sized for one relay.

    * ``default_sampling_rate``: 1-in-N rate for records whose exporter
      announced none (0 = unknown).
    * ``sampling_overrides``: exporter address text -> rate; wins over
      anything announced.
    * ``pending_max_records``: data sets held while their template is
      unknown (a set holds one or more records; how many is unknown until
      the template arrives).  ``pending_max_bytes`` bounds their bytes and
      ``pending_max_age_ms`` their age.  Past a bound the oldest set is
      dropped and counted in ``pending_expired``.  The defaults hold about
      a minute of a busy exporter's data: templates are usually re-sent
      every 20-60 s.
    * ``max_templates_per_exporter``: templates per (address, port) across
      domains; more are refused (``template_limit``).
    * ``max_template_fields``: fields per template; more are refused.
    * ``max_exporters``: exporters with counters/templates; past it,
      counters share one overflow entry and templates are refused.
    * ``datagram_plans``: remember the v9/IPFIX datagram layouts an
      exporter repeats and read such datagrams in bulk
      (:mod:`edge_agent.flows.plans`); off, every datagram is walked set by
      set.  The output and counters are the same either way.
    """

    default_sampling_rate: int = 0
    sampling_overrides: Mapping[str, int] = field(default_factory=dict)
    pending_max_records: int = 4096
    pending_max_bytes: int = 8 * 1024 * 1024
    pending_max_age_ms: int = 120_000
    max_templates_per_exporter: int = 1024
    max_template_fields: int = 512
    max_exporters: int = 4096
    datagram_plans: bool = True

    def __post_init__(self) -> None:
        _positive("default_sampling_rate", self.default_sampling_rate, 0)
        _positive("pending_max_records", self.pending_max_records, 0)
        _positive("pending_max_bytes", self.pending_max_bytes, 0)
        _positive("pending_max_age_ms", self.pending_max_age_ms, 0)
        _positive("max_templates_per_exporter", self.max_templates_per_exporter)
        _positive("max_template_fields", self.max_template_fields)
        _positive("max_exporters", self.max_exporters)
        for address, rate in self.sampling_overrides.items():
            try:
                address_bytes(address)
            except ValueError as err:
                raise ValueError(
                    f"sampling_overrides key must be an IPv4/IPv6 address, "
                    f"got {address!r}"
                ) from err
            _positive(f"sampling_overrides[{address!r}]", rate)


def normalise_exporter(address: bytes) -> bytes | None:
    """Return the 16-byte column form of an exporter address, or None.

    A 4-byte IPv4 address becomes IPv4-mapped; a 16-byte address (IPv6, or
    IPv4-mapped from a dual-stack socket) is kept, so one exporter seen over
    either socket family keys the same templates.
    """
    if len(address) == 16:
        return bytes(address)
    if len(address) == 4:
        return V4_MAPPED_PREFIX + bytes(address)
    return None


class FlowDecoder:
    """Decode NetFlow v1/v5/v9, IPFIX and sFlow v5 datagrams to FLOW_DTYPE.

    ``stats`` holds per-exporter counters, ``sampling`` the learnt rates.
    """

    def __init__(self, config: DecoderConfig | None = None) -> None:
        self.config = config or DecoderConfig()
        cfg = self.config
        self.stats = DecodeStats(cfg.max_exporters)
        self.sampling = SamplingTable(cfg.default_sampling_rate, cfg.sampling_overrides)
        self.templates = TemplateCache(
            cfg.max_templates_per_exporter, cfg.max_exporters
        )
        self.pending = PendingStore(
            cfg.pending_max_records, cfg.pending_max_bytes, cfg.pending_max_age_ms
        )
        self.sequences = SequenceTracker()
        self._v5 = NetflowV5Decoder(self.sampling, self.sequences, self._settle)
        shared: dict[str, Any] = {
            "templates": self.templates,
            "pending": self.pending,
            "sampling": self.sampling,
            "sequences": self.sequences,
            "stats": self.stats,
            "settle": self._settle,
            "max_template_fields": cfg.max_template_fields,
            "plans": cfg.datagram_plans,
        }
        self._v9 = NetflowV9Decoder(**shared)
        self._ipfix = IpfixDecoder(**shared)
        #: the sFlow decoder (counter samples, drop notifications)
        self.sflow = SflowDecoder(self.sampling)
        self._bugs = 0

    @property
    def counter_samples(self) -> collections.deque[CounterRecord]:
        """sFlow counter records kept by the sFlow decoder (pass-through):
        a bounded deque, oldest first; consumers pop from the left."""
        return self.sflow.counter_samples

    def _settle(self, batch: RecordBatch) -> None:
        batch.settle(self.sampling.lookup, self.sampling.override)

    def decode(
        self, payload: bytes, exporter: bytes, exporter_port: int, received_ms: int
    ) -> np.ndarray:
        """Decode one datagram from ``exporter`` (4 or 16 bytes) and port.

        ``received_ms`` is the receive time (UTC ms), used for the age of
        held data and sFlow record times.  Returns FLOW_DTYPE records,
        including held records that a template in this datagram released.
        """
        return self.decode_many(((payload, exporter, exporter_port, received_ms),))

    def decode_many(
        self, datagrams: Iterable[tuple[bytes, bytes, int, int]]
    ) -> np.ndarray:
        """Decode datagrams in order; same records as :meth:`decode` on each.

        Records of the same template (or NetFlow v5) across datagrams are
        read in one numpy pass, which is much faster than one call each.
        """
        batch = RecordBatch()
        self._v5.bind(batch)
        self._v9.bind(batch)
        self._ipfix.bind(batch)
        stats = self.stats
        known = stats.by_exporter
        pending = self.pending
        v5_queue = self._v5.queue
        v5_runs = self._v5.runs
        sampling = self.sampling
        sflow_decode = self.sflow.decode_packed
        v9_walk = self._v9.walk
        ipfix_walk = self._ipfix.walk
        for payload, exporter, port, received_ms in datagrams:
            address: bytes | None = exporter
            if type(exporter) is not bytes or len(exporter) != 16:
                address = normalise_exporter(exporter)
            if address is None:
                stats.exporter(bytes(exporter), port).errors[
                    "bad_exporter_address"
                ] += 1
                continue
            key = (address, port)
            counters = known.get(key) or stats.exporter(address, port)
            size = len(payload)
            counters.datagrams += 1
            counters.bytes += size
            if pending.sets:
                head = pending.oldest()
                if (
                    head is not None
                    and head.received_ms < received_ms - pending.max_age_ms
                ):
                    self._expire(received_ms)
            try:
                # The common versions first, without a call layer.
                version = payload[:2]
                if version == b"\x00\x05":
                    # NetFlow v5's own hot path (NetflowV5Decoder.queue) in
                    # line: a datagram that carries on its socket's run
                    # with regular size and an unchanged sampling table.
                    run = v5_runs.get(key)
                    if (
                        run is not None
                        and run.tail == payload[20:24]
                        and run.generation == sampling.generation
                    ):
                        count = payload[2] << 8 | payload[3]
                        if count * 48 + 24 == size:
                            run.payloads.append(payload)
                            run.starts.append(batch.total)
                            batch.total += count
                            counters.records += count
                            continue
                    v5_queue(payload, key, counters, batch)
                elif version == b"\x00\x0a":
                    ipfix_walk(payload, address, port, received_ms, counters, batch)
                elif version == b"\x00\x09":
                    v9_walk(payload, address, port, received_ms, counters, batch)
                elif version == b"\x00\x00" and payload[2:4] == b"\x00\x05":
                    parts = sflow_decode(payload, address, port, received_ms, counters)
                    if parts:
                        batch.add_packed(parts)
                else:
                    self._dispatch(
                        payload,
                        address,
                        port,
                        received_ms,
                        counters=counters,
                        batch=batch,
                    )
            except Exception:
                counters.errors["decoder_bug"] += 1
                self._bugs += 1
                if self._bugs % _BUG_LOG_EVERY == 1:
                    log.exception("decoder_bug", exporter_port=port, bugs=self._bugs)
        records = batch.build(self.sampling.lookup, self.sampling.override)
        for address, port, count in batch.failures:
            counters = stats.exporter(address, port)
            counters.errors["decoder_bug"] += 1
            counters.records -= count
        return records

    def _dispatch(
        self,
        payload: bytes,
        exporter: bytes,
        port: int,
        received_ms: int,
        *,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        if len(payload) < 2:
            counters.errors[
                "empty_datagram" if not payload else "truncated_header"
            ] += 1
            return
        if payload[:4] == _SFLOW_V5:
            parts = self.sflow.decode_packed(
                payload, exporter, port, received_ms, counters
            )
            if parts:
                batch.add_packed(parts)
            return
        version = payload[0] << 8 | payload[1]
        if version == 1:
            self._v5.walk_v1(payload, exporter, port, counters, batch)
        elif version == 5:
            self._v5.queue(payload, (exporter, port), counters, batch)
        elif version == 9:
            self._v9.walk(payload, exporter, port, received_ms, counters, batch)
        elif version == 10:
            self._ipfix.walk(payload, exporter, port, received_ms, counters, batch)
        else:
            counters.errors["unknown_version"] += 1

    def _expire(self, now_ms: int) -> int:
        dropped = self.pending.expire(now_ms)
        for held in dropped:
            self.stats.exporter(held.key[0], held.key[1]).pending_expired += 1
        return len(dropped)

    def expire_pending(self, now_ms: int) -> int:
        """Drop held data older than ``pending_max_age_ms``; return sets dropped.

        Each dropped set is counted in its exporter's ``pending_expired``.
        """
        return self._expire(now_ms)
