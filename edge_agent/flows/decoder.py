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
a batch of about a thousand datagrams is the sweet spot.  A batch of 32
datagrams or more is first classified in one numpy pass (version and
exporter socket of every datagram): consecutive NetFlow v5 datagrams are
then queued in bulk (:meth:`NetflowV5Decoder.queue_many`), and a run of
v9 (or IPFIX) datagrams is handed to its decoder's ``walk_many``, whatever
their sockets, so no Python code runs per regular v5 datagram.  v9/IPFIX
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
from edge_agent.flows.netflow_v5 import V5_HEADER_UNIT, V5_UNIT, NetflowV5Decoder
from edge_agent.flows.netflow_v9 import NetflowV9Decoder, Sockets
from edge_agent.flows.sampling import SamplingTable
from edge_agent.flows.schema import V4_MAPPED_PREFIX, address_bytes
from edge_agent.flows.sequence import SequenceTracker
from edge_agent.flows.sflow import CounterRecord, SflowDecoder
from edge_agent.flows.templates import PendingStore, TemplateCache

log = structlog.get_logger(__name__)

_SFLOW_V5 = b"\x00\x00\x00\x05"
#: Log at most one ``decoder_bug`` event per this many occurrences.
_BUG_LOG_EVERY = 1000
#: Batches of fewer datagrams are decoded one by one: the pre-pass costs
#: a few dozen numpy calls whatever the batch size (measured: 16 one-record
#: v5 datagrams are faster one by one, 32 faster through the pre-pass).
_PREPASS_MIN = 32
#: Consecutive v5 datagrams handed to the v5 decoder in one call from this
#: many (fewer are cheaper one by one; a guess from the same measurement,
#: the pre-pass being paid already).
_V5_RUN_MIN = 16
#: Batches with fewer datagrams per exporter socket on average are decoded
#: one by one (measured on 256 datagrams of 30 records: 32 to 100 exporters
#: were 7-15% slower through the pre-pass, 8 exporters as fast).
_DATAGRAMS_PER_SOCKET = 16
#: Leading bytes of the versions the pre-pass hands over in bulk.
_BULK_VERSIONS = frozenset({b"\x00\x05", b"\x00\x09", b"\x00\x0a"})
#: Kind of a datagram the pre-pass leaves to the per-datagram path.
_OTHER = -1
#: Offsets of the header bytes the pre-pass gathers from each datagram.
_HEAD_BYTES = np.arange(24, dtype=np.int64)
_PAD = bytes(24)


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
        The records come in arrival order, and every counter, sequence and
        sampling state ends as if the datagrams were decoded one by one.
        One known exception: when the sequence tracker is full (65,536
        streams) and a new stream in the batch pushes out the stream of a
        v5 run queued before it, the run still follows its stream to the
        end of the batch (one by one it would start afresh).
        """
        items = datagrams if isinstance(datagrams, list) else list(datagrams)
        batch = RecordBatch()
        self._v5.bind(batch)
        self._v9.bind(batch)
        self._ipfix.bind(batch)

        def settle_deferred() -> None:
            # An sFlow rate about to change the table: records of other
            # protocols already in the batch take the rates known now.
            if batch.deferred:
                self._settle(batch)

        self.sflow.before_rate_change = settle_deferred
        try:
            if len(items) < _PREPASS_MIN or not self._decode_classified(items, batch):
                self._decode_each(items, 0, len(items), batch)
        finally:
            self.sflow.before_rate_change = None
        records = batch.build(self.sampling.lookup, self.sampling.override)
        stats = self.stats
        for address, port, count in batch.failures:
            counters = stats.exporter(address, port)
            counters.errors["decoder_bug"] += 1
            counters.records -= count
        return records

    def _decode_classified(
        self, items: list[tuple[bytes, bytes, int, int]], batch: RecordBatch
    ) -> bool:
        """Decode a batch through a classifying pre-pass; False if it cannot.

        One pass over the batch tells each datagram's version (from the
        joined bytes) and exporter socket.  Then, in arrival order, runs of
        consecutive NetFlow v5 datagrams go to the v5 decoder in one call,
        runs of v9 or IPFIX datagrams to its ``walk_many`` (both for any
        sockets), and everything else datagram by datagram.  False
        (nothing decoded yet) when a batch has nothing to gain or an
        exporter address that needs the per-datagram path's error
        handling.
        """
        n = len(items)
        try:
            if (
                items[0][0][:2] not in _BULK_VERSIONS
                and items[-1][0][:2] not in _BULK_VERSIONS
            ):
                # Most likely nothing for the bulk paths (an sFlow batch):
                # not worth joining the batch to find out.
                return False
        except TypeError:  # an unhashable payload (bytearray): one by one
            return False
        payloads, exporters, ports, received = zip(*items, strict=True)
        if set(map(type, payloads)) != {bytes}:
            # bytearray or memoryview payloads: the bulk paths key and
            # compare by bytes; one by one takes any of them.
            return False
        try:
            sockets = self._sockets(exporters, ports, n)
        except TypeError:  # an unhashable exporter (bytearray): one by one
            return False
        if sockets is None:
            return False
        ids, keys, counters = sockets
        try:
            sizes, whole, kinds = _classify(payloads, n)
        except Exception:  # a bug: the batch goes one by one
            self._bugs += 1
            if self._bugs % _BUG_LOG_EVERY == 1:
                log.exception("decoder_bug", stage="prepass", bugs=self._bugs)
            return False
        if whole is not None:
            joined, heads, header, total = whole
            self._queue_v5(
                payloads,
                header,
                sizes,
                ids,
                max(received),
                keys,
                counters,
                batch,
                (joined, heads, total),
            )
            return True
        if kinds is None:
            # Nothing to hand over in bulk (sFlow, NetFlow v1).
            self._decode_each(items, 0, n, batch)
            return True
        kind, head, data, offsets = kinds
        # A run ends where the kind changes.
        change = np.ones(n, dtype=bool)
        change[1:] = kind[1:] != kind[:-1]
        bounds = np.flatnonzero(change).tolist()
        bounds.append(n)
        run_kinds = kind[change].tolist()
        done = 0
        for first, end, what in zip(bounds, bounds[1:], run_kinds, strict=False):
            length = end - first
            if what == 5 and length >= _V5_RUN_MIN:
                if done < first:
                    self._decode_each(items, done, first, batch)
                part = sizes[first:end]
                self._queue_v5(
                    payloads[first:end],
                    np.frombuffer(head[first:end], dtype=V5_HEADER_UNIT),
                    part,
                    None if ids is None else ids[first:end],
                    max(received[first:end]),
                    keys,
                    counters,
                    batch,
                    None,
                )
                done = end
            elif what in {9, 10} and length >= 2:
                if done < first:
                    self._decode_each(items, done, first, batch)
                    done = first
                span = received[first:end]
                if not self._quiet_pending(span[0], min(span), max(span)):
                    continue  # decoded one by one with what follows
                walk_many = self._v9.walk_many if what == 9 else self._ipfix.walk_many
                walk_many(
                    list(payloads[first:end]),
                    list(span),
                    _count_sockets(ids, keys, counters, sizes, first, end),
                    batch,
                    (data, sizes[first:end], offsets[first:end]),
                )
                done = end
        if done < n:
            self._decode_each(items, done, n, batch)
        return True

    def _sockets(
        self, exporters: tuple[bytes, ...], ports: tuple[int, ...], n: int
    ) -> (
        tuple[np.ndarray | None, list[tuple[bytes, int]], list[ExporterCounters]] | None
    ):
        """Number the exporter sockets of a batch in order of appearance.

        Returns (socket number per datagram, or None when there is one
        socket; (16-byte address, port) per number; counters per number),
        or None if an address is neither 4 nor 16 bytes or the batch has
        fewer than ``_DATAGRAMS_PER_SOCKET`` datagrams per socket (bulk
        queueing has little to add up then: one by one is as fast).  A
        socket seen as IPv4 and as IPv4-mapped gets one number.  Counters are created in
        order of appearance, as the per-datagram path would.
        """
        known = self.stats.by_exporter
        exporter_stats = self.stats.exporter
        if exporters.count(exporters[0]) == n and ports.count(ports[0]) == n:
            exporter, port = exporters[0], ports[0]
            address: bytes | None = exporter
            if type(exporter) is not bytes or len(exporter) != 16:
                address = normalise_exporter(exporter)
                hash(exporter)  # unhashable: the caller goes one by one
            if address is None:
                return None
            key = (address, port)
            return None, [key], [known.get(key) or exporter_stats(*key)]
        raw = list(zip(exporters, ports, strict=True))
        numbers: dict[tuple[bytes, int], int] = dict.fromkeys(raw, 0)
        if len(numbers) * _DATAGRAMS_PER_SOCKET > n:
            return None
        keys: list[tuple[bytes, int]] = []
        canonical: dict[tuple[bytes, int], int] = {}
        for exporter, port in numbers:
            address = exporter
            if type(exporter) is not bytes or len(exporter) != 16:
                address = normalise_exporter(exporter)
            if address is None:
                return None
            key = (address, port)
            number = canonical.get(key)
            if number is None:
                number = canonical[key] = len(keys)
                keys.append(key)
            numbers[exporter, port] = number
        counters = [known.get(key) or exporter_stats(*key) for key in keys]
        if len(keys) == 1:
            return None, keys, counters
        ids = np.fromiter(map(numbers.__getitem__, raw), np.int64, n)
        return ids, keys, counters

    def _quiet_pending(self, first_ms: int, low_ms: int, high_ms: int) -> bool:
        """Whether the per-datagram expiry checks can be skipped for a run
        of datagrams received at ``first_ms`` (the first), between
        ``low_ms`` and ``high_ms``: the first one's check is made now, and
        no set held before or during the run would expire after it."""
        pending = self.pending
        limit = high_ms - pending.max_age_ms
        if low_ms < limit:
            return False
        if pending.sets:
            head = pending.oldest()
            if head is not None and head.received_ms < first_ms - pending.max_age_ms:
                self._expire(first_ms)
            head = pending.oldest()
            if head is not None and head.received_ms < limit:
                return False
        return True

    def _queue_v5(  # noqa: PLR0917 - one call per run of v5 datagrams
        self,
        payloads: tuple[bytes, ...],
        header: np.ndarray,
        sizes: np.ndarray,
        ids: np.ndarray | None,
        latest_ms: int,
        keys: list[tuple[bytes, int]],
        counters: list[ExporterCounters],
        batch: RecordBatch,
        joined: tuple[np.ndarray, np.ndarray, int] | None,
    ) -> None:
        """Count a run of v5 datagrams per socket and queue it.

        ``joined`` is (the whole batch as 24-byte units, each datagram's
        first unit, total bytes) when the run is the whole batch.
        """
        pending = self.pending
        if pending.sets:
            # v5 neither holds nor releases sets: expiring once at the
            # run's latest time is what a check per datagram would do.
            oldest = pending.oldest()
            if (
                oldest is not None
                and oldest.received_ms < latest_ms - pending.max_age_ms
            ):
                self._expire(latest_ms)
        if ids is None:
            count = counters[0]
            count.datagrams += len(payloads)
            count.bytes += joined[2] if joined is not None else int(sizes.sum())
        else:
            seen = np.bincount(ids, minlength=len(keys))
            octets = np.bincount(ids, weights=sizes, minlength=len(keys))
            for number in np.flatnonzero(seen).tolist():
                count = counters[number]
                count.datagrams += int(seen[number])
                count.bytes += int(octets[number])
        self._v5.queue_many(
            payloads,
            header,
            sizes,
            ids,
            keys,
            counters,
            batch,
            None if joined is None else joined[:2],
        )

    def _decode_each(
        self,
        items: list[tuple[bytes, bytes, int, int]],
        start: int,
        stop: int,
        batch: RecordBatch,
    ) -> None:
        """Decode ``items[start:stop]`` datagram by datagram, in order."""
        stats = self.stats
        known = stats.by_exporter
        pending = self.pending
        v5_queue = self._v5.queue
        v5_runs = self._v5.runs
        sampling = self.sampling
        sflow_decode = self.sflow.decode_packed
        v9_walk = self._v9.walk
        ipfix_walk = self._ipfix.walk
        part = items if start == 0 and stop == len(items) else items[start:stop]
        for payload, exporter, port, received_ms in part:
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


def _count_sockets(  # noqa: PLR0917 - _decode_classified's own helper
    ids: np.ndarray | None,
    keys: list[tuple[bytes, int]],
    counters: list[ExporterCounters],
    sizes: np.ndarray,
    first: int,
    end: int,
) -> Sockets:
    """Count the datagrams ``first:end`` and their bytes to their sockets
    and describe those sockets for ``walk_many``."""
    part = None if ids is None else ids[first:end]
    if part is None or not np.count_nonzero(part != part[0]):
        number = 0 if part is None else int(part[0])
        count = counters[number]
        count.datagrams += end - first
        count.bytes += int(sizes[first:end].sum())
        return Sockets([keys[number]], [count])
    datagrams = np.bincount(part, minlength=len(keys)).tolist()
    volume = np.bincount(part, weights=sizes[first:end], minlength=len(keys))
    for number in np.flatnonzero(datagrams).tolist():
        counters[number].datagrams += datagrams[number]
        counters[number].bytes += int(volume[number])
    return Sockets(keys, counters, part)


def _classify(
    payloads: tuple[bytes, ...], n: int
) -> tuple[
    np.ndarray,
    tuple[np.ndarray, np.ndarray, np.ndarray, int] | None,
    tuple[np.ndarray, np.ndarray, bytes, np.ndarray] | None,
]:
    """The pre-pass's look at a batch: (sizes, whole, kinds).

    ``whole`` is (the batch as 24-byte units, each datagram's first unit,
    the headers as V5_HEADER_UNIT, total bytes) when every datagram is a
    v5 one of a whole number of units; else ``kinds`` is (each datagram's
    kind: 5, 9, 10 or _OTHER; its first 24 bytes when any is v5, else the
    padded bytes unread; the joined batch, padded; each datagram's offset
    in it), or None when no datagram is of a kind handed over in bulk.
    """
    sizes = np.fromiter(map(len, payloads), np.int64, n)
    # Padded so that the gathers stay in bounds after a short last datagram.
    data = b"".join((*payloads, _PAD))
    total = len(data) - len(_PAD)
    units = sizes // 24
    if not np.count_nonzero((units * 24 != sizes) | (units == 0)):
        # Every datagram a whole number of 24-byte units, as regular v5
        # datagrams are: the headers are one gather of units.
        joined = np.frombuffer(data, dtype=V5_UNIT, count=total // 24)
        heads = np.cumsum(units) - units
        header = np.frombuffer(joined[heads], dtype=V5_HEADER_UNIT)
        if not np.count_nonzero(header["version"] != 5):
            return sizes, (joined, heads, header, total), None
    padded = np.frombuffer(data, dtype=np.uint8)
    offsets = np.cumsum(sizes) - sizes
    word = padded[offsets].astype(np.int64) << 8 | padded[offsets + 1]
    kind = np.where((sizes >= 2) & (word <= 10), word, _OTHER).astype(np.int8)
    kind[(kind == 5) & (sizes < 24)] = _OTHER
    kind[(kind != 5) & (kind != 9) & (kind != 10)] = _OTHER
    if not np.count_nonzero(kind != _OTHER):
        return sizes, None, None
    # The first 24 bytes of every datagram (v5 runs read them).
    head = padded[offsets[:, None] + _HEAD_BYTES] if np.any(kind == 5) else padded
    return sizes, None, (kind, head, data, offsets)
