"""NetFlow v9 (RFC 3954) and the template machinery it shares with IPFIX.

A datagram is walked flowset by flowset using each flowset's length; the
header Count is not trusted (one real exporter writes a Count smaller than
the number of records).  Zero bytes after the last flowset (exporters that
pad datagrams to a fixed size) are not a flowset.

Error reasons counted here (``ExporterCounters.errors``):

* ``truncated_header``: shorter than the 20-byte header.
* ``set_too_short``: a flowset length below 4.
* ``set_beyond_datagram``: a flowset longer than what is left.
* ``trailing_bytes``: non-zero bytes after the last flowset.
* ``reserved_set_id``: flowset id 2-255 (skipped by length).
* ``template_truncated`` / ``template_id_reserved`` /
  ``options_template_bad_length``: a template record that cannot be read.
* ``template_empty``, ``template_too_many_fields``,
  ``template_zero_length_field``, ``template_record_too_long``: see
  :func:`~edge_agent.flows.templates.compile_template`.
* ``template_limit``, ``template_exporter_limit``: the template cache is
  full (template flood).
* ``field_length_unsupported``: a known element with a width its column
  cannot take (the field is skipped, the rest of the record decoded).
* ``record_overrun``: a variable-length field runs past its set.
* ``system_init_time_invalid``: an options record's
  systemInitTimeMilliseconds is 0 or beyond year 2500 (ignored).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog

from edge_agent.flows import fields as ie
from edge_agent.flows.counters import DecodeStats, ExporterCounters
from edge_agent.flows.fields import FieldSpec, RecordBatch, record_rates, sampler_ids
from edge_agent.flows.plans import (
    CHAIN,
    MAX_PLANS,
    BulkCall,
    BulkQueue,
    DatagramPlan,
    byte_rows,
    flush_plan,
    make_plan,
    match_rows,
)
from edge_agent.flows.sampling import SamplingTable
from edge_agent.flows.schema import ExportProtocol, address_text
from edge_agent.flows.sequence import SequenceTracker
from edge_agent.flows.templates import (
    HeldSet,
    PendingStore,
    Template,
    TemplateCache,
    TemplateError,
    TemplateKey,
    compile_template,
    split_varlen,
)

#: walk_many walks fewer datagrams than this one by one: the bulk path's
#: fixed cost (a few dozen numpy calls) is about that of a hundred walks
#: of planned datagrams.
_BULK_MIN = 128
#: Datagrams of a size must come this often in a walk_many call to be
#: matched in bulk (a matrix pass costs about as much as a few walks).
_MATCH_MIN = 4
#: Consecutive matching datagrams shorter than this are walked one by one.
_RUN_MIN = 4
#: walk_many matches again at most this often per call when plans change.
_MAX_REMATCH = 4
#: Log at most one ``decoder_bug`` event per this many occurrences.
_BUG_LOG_EVERY = 1000
#: Bound of the set of degraded modes logged once.
_MAX_WARNED = 1024
#: Bound of the systemInitTime table (one entry per exporter domain).
_MAX_INIT_TIMES = 65536
#: Times beyond this (year ~2500, in ms) are not a clock value.
_MAX_TIME_MS = 1 << 44
#: Bound of the table of template sets known to be periodic re-sends.
_MAX_TEMPLATE_SETS = 65536
#: (exporter, port, version, domain, set id) of a template set
SetKey = tuple[bytes, int, int, int, int]
#: What a domain without templates has (shared, never written).
NO_TEMPLATES: dict[int, Template] = {}

log = structlog.get_logger(__name__)

V9_HEADER = struct.Struct(">HHIIII")
SET_HEADER = struct.Struct(">HH")
FIELD = struct.Struct(">HH")
V9_OPTIONS_HEADER = struct.Struct(">HHH")

#: Header context of a datagram: (unix secs, sysUptime ms or -1, export
#: time ms, IPFIX systemInitTime ms or -1).
Context = tuple[int, int, int, int]


_MASK32 = 0xFFFFFFFF


def _running(flags: np.ndarray) -> np.ndarray:
    """``out[k]``: the sum of ``flags[:k]`` (how many are set), int64."""
    out = np.zeros(len(flags) + 1, dtype=np.int64)
    np.cumsum(flags, out=out[1:])
    return out


def _running_list(flags: np.ndarray) -> list[int]:
    """:func:`_running` as a list (for bisect)."""
    values: list[int] = _running(flags).tolist()
    return values


class Sockets:
    """The exporter sockets of one walk_many call.

    Datagram ``k`` came from ``keys[ids[k]]`` (16-byte address, port) and is
    counted in ``counters[ids[k]]``; ``ids`` is None when every datagram
    came from ``keys[0]``.
    """

    __slots__ = ("counters", "id_list", "ids", "keys")

    def __init__(
        self,
        keys: list[tuple[bytes, int]],
        counters: list[ExporterCounters],
        ids: np.ndarray | None = None,
    ) -> None:
        self.keys = keys
        self.counters = counters
        self.ids = ids
        self.id_list: list[int] | None = None if ids is None else ids.tolist()

    def of(self, k: int) -> tuple[bytes, int, ExporterCounters]:
        """(address, port, counters) of datagram ``k``."""
        number = 0 if self.id_list is None else self.id_list[k]
        address, port = self.keys[number]
        return address, port, self.counters[number]


class RunTables:
    """walk_many's per-datagram values (TemplatedDecoder._tables): int64
    arrays, and lists where the v9 sequence walk bisects them.

    A running count ``r`` answers "how many in ``i:j``" as ``r[j] - r[i]``.
    Those over links between neighbours (``off_by_*``, ``switches``) count
    link ``k-1 -> k`` from ``r[k]`` on, so the links inside a run ``i:j``
    are all clean when ``r[j - 1] == r[i]``.
    """

    __slots__ = (
        "announcers",
        "off_by_one",
        "off_by_units",
        "plans",
        "records",
        "seq_array",
        "seqs",
        "several",
        "stream",
        "stream_counters",
        "stream_keys",
        "switches",
        "unit_array",
        "units",
    )

    plans: list[DatagramPlan]
    #: header sequence number and sequence units of each datagram (int64)
    seq_array: np.ndarray
    unit_array: np.ndarray
    #: each datagram's stream (index into ``stream_keys``; -1: no plan)
    stream: np.ndarray
    stream_keys: list[tuple[bytes, int, int, int]]
    #: the counters of each stream's socket
    stream_counters: list[ExporterCounters]
    #: v9 only: ``seq_array`` and ``unit_array`` as lists
    seqs: list[int]
    units: list[int]
    #: running records
    records: np.ndarray
    #: candidates whose plans read options records
    announcers: list[int]
    #: running count of links where the number does not go up by one / by
    #: the units of the datagram before
    off_by_one: list[int]
    off_by_units: list[int]
    #: running count of datagrams of more than one unit
    several: list[int]
    #: running count of links between different streams
    switches: np.ndarray


class Export:
    """What the sets of one datagram share while it is walked."""

    __slots__ = (
        "batch",
        "context",
        "counters",
        "domain",
        "exporter",
        "port",
        "received_ms",
    )

    def __init__(
        self,
        exporter: bytes,
        port: int,
        domain: int,
        received_ms: int,
        context: Context,
        *,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        self.exporter = exporter
        self.port = port
        self.domain = domain
        self.received_ms = received_ms
        self.context = context
        self.counters = counters
        self.batch = batch


class TemplatedDecoder:
    """Template learning, held data and data-set decoding for v9 and IPFIX."""

    PROTO: ExportProtocol = ExportProtocol.NETFLOW_V9
    #: where the header sequence number is
    SEQ_OFFSET = 12

    def __init__(
        self,
        *,
        templates: TemplateCache,
        pending: PendingStore,
        sampling: SamplingTable,
        sequences: SequenceTracker,
        stats: DecodeStats,
        settle: Callable[[RecordBatch], None],
        max_template_fields: int,
        plans: bool = True,
    ) -> None:
        self.templates = templates
        self.pending = pending
        self.sampling = sampling
        self.sequences = sequences
        self.stats = stats
        self.settle = settle
        self.max_template_fields = max_template_fields
        #: systemInitTimeMilliseconds announced in options data, per
        #: (exporter, port, domain); bounded like the template cache.
        self.init_times: dict[tuple[bytes, int, int], int] = {}
        #: degraded modes already logged (bounded)
        self._warned: set[tuple[str, bytes, int]] = set()
        #: template sets read without counting anything wrong, by (set key,
        #: bytes): the templates they defined (a re-send of the same bytes
        #: while those templates are still current changes nothing but
        #: ``templates_received``); bounded, then starts afresh
        self._template_sets: dict[
            tuple[SetKey, bytes], tuple[tuple[TemplateKey, Template], ...]
        ] = {}
        #: bumped whenever ``init_times`` changes (plans look it up again)
        self.init_generation = 0
        #: datagram layouts seen before, by (exporter, port, size)
        self.plans: dict[tuple[bytes, int, int], DatagramPlan] = {}
        #: the last layout the general walk read cleanly, by the same key
        self._candidates: dict[tuple[bytes, int, int], tuple[Any, ...]] = {}
        #: plans with datagrams queued in the bound batch, with the
        #: counters of their exporter
        self._queued: list[tuple[DatagramPlan, ExporterCounters]] = []
        self._batch: RecordBatch | None = None
        self._planning = plans
        #: datagrams whose walk raised (see walk_many)
        self._bugs = 0
        #: bumped whenever ``plans`` changes (walk_many matches again)
        self._plans_version = 0
        #: datagrams accounted in bulk by walk_many, read at settle
        self._bulk: list[BulkQueue] = []
        #: the datagram walk_many is at (for its bug path)
        self._progress = 0

    # -- batches (walk_many) -----------------------------------------------

    def walk(  # noqa: PLR0917 - once per datagram: positional is cheaper
        self,
        payload: bytes,
        exporter: bytes,
        port: int,
        received_ms: int,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        """Decode one datagram (the protocol subclasses walk it)."""
        raise NotImplementedError

    def walk_many(
        self,
        payloads: list[bytes],
        received: list[int],
        sockets: Sockets,
        batch: RecordBatch,
        joined: tuple[bytes, np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Decode datagrams of one or more exporter sockets, in arrival order.

        The same records, counters, sequence state, templates, held data and
        sampling as :meth:`walk` on each ``(payload, received ms)`` in turn,
        from its socket in ``sockets`` (16-byte address form); the caller
        has already counted datagrams and bytes.  A datagram whose walk
        raises (a bug, not bad input) is counted as ``decoder_bug`` and the
        next one is walked.

        Datagrams whose socket and size repeat among them are matched
        against their plans all at once (one byte matrix per socket and
        size); a run of consecutive datagrams that match is accounted in
        bulk (sequence numbers, record positions, counters) and its records
        are read when the batch settles.  The others are walked one by one,
        in their place.  Sockets may interleave: each keeps its own plans,
        templates and streams, and what the walks change is changed in
        arrival order.

        ``joined`` is (bytes holding every payload, their sizes, their
        offsets in those bytes) when the caller has them already.
        """
        if len(payloads) < _BULK_MIN or not self.plans:
            self._walk_each(payloads, received, 0, sockets, batch)
            return
        self._progress = 0
        try:
            self._walk_bulk(payloads, received, sockets, batch, joined)
        except Exception:
            # A bug in the bulk accounting: the datagram in hand is lost
            # (counted), the rest are walked one by one.
            _, port, counters = sockets.of(self._progress)
            self._bug(counters, port)
            self._walk_each(payloads, received, self._progress + 1, sockets, batch)

    def _walk_each(  # noqa: PLR0917 - walk_many's own helper
        self,
        payloads: list[bytes],
        received: list[int],
        first: int,
        sockets: Sockets,
        batch: RecordBatch,
        end: int | None = None,
    ) -> None:
        """Walk ``payloads[first:end]`` one by one."""
        walk = self.walk
        keys = sockets.keys
        every = sockets.counters
        part = payloads[first:end]
        numbers = (
            [0] * len(part) if sockets.id_list is None else sockets.id_list[first:end]
        )
        for payload, received_ms, number in zip(
            part, received[first:end], numbers, strict=True
        ):
            exporter, port = keys[number]
            try:
                walk(payload, exporter, port, received_ms, every[number], batch)
            except Exception:
                self._bug(every[number], port)

    def _match(  # noqa: PLR0917 - walk_many's own helper
        self,
        data: bytes,
        sizes: np.ndarray,
        offsets: np.ndarray,
        first: int,
        sockets: Sockets,
        call: BulkCall,
    ) -> None:
        """Match datagrams ``first:`` against the plans of their socket and
        size (see :class:`~edge_agent.flows.plans.BulkCall`).  Sizes that
        come fewer than ``_MATCH_MIN`` times on a socket are left to the
        walk."""
        tail = sizes[first:]
        ids = sockets.ids
        if ids is None:
            shape = tail
            span = 0
        else:
            # One number per (socket, size).
            span = int(tail.max()) + 1 if len(tail) else 1
            shape = ids[first:] * span + tail
        values, counts = np.unique(shape, return_counts=True)
        plans = self.plans
        keys = sockets.keys
        candidates = call.candidates
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            if count < _MATCH_MIN:
                continue
            number, size = divmod(value, span) if span else (0, value)
            exporter, port = keys[number]
            plan = plans.get((exporter, port, size))
            if plan is None:
                continue
            where = np.flatnonzero(shape == value) + first
            matrix = byte_rows(data, offsets[where], size)
            for chosen, rows in match_rows(plan, matrix):
                picked = where[rows]
                call.taken[picked] = len(candidates)
                call.local[picked] = rows
                candidates.append((chosen, matrix))
                call.owners.append(sockets.counters[number])

    def _tables(self, call: BulkCall, seqs: np.ndarray) -> RunTables:
        """Per-datagram values and running counts for :meth:`_walk_bulk`
        (index -1, no candidate, reads the zero entry at the end)."""
        plans = [plan for plan, _ in call.candidates]
        # Streams numbered in order of first candidate, with their socket's
        # counters.
        streams: dict[tuple[bytes, int, int, int], int] = {}
        owners: list[ExporterCounters] = []
        stream_of = []
        for plan, owner in zip(plans, call.owners, strict=True):
            number = streams.setdefault(plan.domain_key, len(streams))
            if number == len(owners):
                owners.append(owner)
            stream_of.append(number)
        taken = call.taken
        units = np.array([p.sequence_units for p in plans] + [0], np.int64)[taken]
        records = np.array([p.records for p in plans] + [0], np.int64)[taken]
        stream = np.array([*stream_of, -1], np.int64)[taken]
        np.cumsum(records, out=call.before[1:])
        tables = RunTables()
        tables.plans = plans
        tables.seq_array = seqs
        tables.unit_array = units
        tables.stream = stream
        tables.stream_keys = list(streams)
        tables.stream_counters = owners
        tables.records = call.before
        tables.announcers = [q for q, p in enumerate(plans) if p.options]
        if self.PROTO == ExportProtocol.NETFLOW_V9:
            # The v9 walk's stretches (IPFIX's check_run needs none).
            steps = seqs[1:] - seqs[:-1]
            tables.seqs = seqs.tolist()
            tables.units = units.tolist()
            tables.off_by_units = _running_list((steps - units[:-1]) & _MASK32 != 0)
            # Only v9 streams may count datagrams (by one) and vote on it.
            tables.off_by_one = _running_list((steps - 1) & _MASK32 != 0)
            tables.several = _running_list(units > 1)
        tables.switches = _running(stream[1:] != stream[:-1])
        return tables

    def _walk_bulk(
        self,
        payloads: list[bytes],
        received: list[int],
        sockets: Sockets,
        batch: RecordBatch,
        joined: tuple[bytes, np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """walk_many's bulk path (see there); ``_progress`` follows it."""
        n = len(payloads)
        if joined is None:
            sizes = np.fromiter(map(len, payloads), np.int64, n)
            data = b"".join(payloads)
            offsets = np.cumsum(sizes) - sizes
        else:
            data, sizes, offsets = joined
        call = BulkCall(self.PROTO, n, data, offsets)
        self._match(data, sizes, offsets, 0, sockets, call)
        if not call.candidates:
            self._walk_each(payloads, received, 0, sockets, batch)
            return
        # Header sequence numbers, read at any byte offset (clipped: rows
        # too short for one never match a plan).
        numbers = np.ndarray(
            buffer=data, dtype=">u4", shape=(len(data) - 3,), strides=(1,)
        )
        seqs = numbers[np.minimum(offsets + self.SEQ_OFFSET, len(data) - 4)].astype(
            np.int64
        )
        tables = self._tables(call, seqs)
        walk = self.walk
        version = self._plans_version
        rematches = 0
        queue: BulkQueue | None = None
        missing = np.flatnonzero(call.taken < 0).tolist()
        miss = 0  # index into missing
        i = 0
        while i < n:
            self._progress = i
            while miss < len(missing) and missing[miss] < i:
                miss += 1
            j = missing[miss] if miss < len(missing) else n
            walked = j
            # A datagram whose options records would change the sampling
            # table (or init time) is walked: the run stops before it.
            stop = self._announcing(i, j, call, tables) if j - i >= _RUN_MIN else j
            if stop - i >= _RUN_MIN:
                if queue is None or not queue.live:
                    queue = BulkQueue(call)
                    self._bulk.append(queue)
                if not self._run(i, stop, call, tables, queue, batch):
                    walked = i  # a plan is gone: match again from here
                elif stop < j:
                    self._walk_each(payloads, received, stop, sockets, batch, stop + 1)
                    walked = stop + 1
            elif stop < j:
                self._walk_each(payloads, received, i, sockets, batch, stop + 1)
                walked = stop + 1
            else:
                self._walk_each(payloads, received, i, sockets, batch, j)
            if walked == j and j < n:
                self._progress = j
                exporter, port, counters = sockets.of(j)
                try:
                    walk(payloads[j], exporter, port, received[j], counters, batch)
                except Exception:
                    self._bug(counters, port)
                walked = j + 1
            i = walked
            if self._plans_version != version:
                # Plans came or went: match what is left again (a few times
                # per call at most; then it is walked).
                version = self._plans_version
                call.taken[i:] = -1
                if rematches < _MAX_REMATCH:
                    rematches += 1
                    self._match(data, sizes, offsets, i, sockets, call)
                tables = self._tables(call, seqs)
                missing = np.flatnonzero(call.taken < 0).tolist()
                miss = 0

    def _run(  # noqa: PLR0917 - walk_many's own helper
        self,
        i: int,
        j: int,
        call: BulkCall,
        tables: RunTables,
        queue: BulkQueue,
        batch: RecordBatch,
    ) -> bool:
        """Account datagrams ``i:j``, which all matched a plan, as their
        walks would; False (nothing done) if a plan no longer holds."""
        plans = tables.plans
        if len(plans) > 1:
            times = np.bincount(call.taken[i:j], minlength=len(plans))
            chosen: list[int] = np.flatnonzero(times).tolist()
            datagrams: list[int] = times[chosen].tolist()
        else:
            chosen, datagrams = [0], [j - i]
        generation = self.templates.generation
        for q in chosen:
            plan = plans[q]
            if plan.generation != generation and not self._holds(
                plan, (plan.exporter, plan.port, plan.size)
            ):
                return False
        sampling = self.sampling.generation
        init = self.init_generation
        for q in chosen:
            plan = plans[q]
            if plan.rate_generation != sampling or plan.context_generation != init:
                before = (plan.rate, plan.init)
                self._look_up(plan)
                if plan.payloads and (plan.rate, plan.init) != before:
                    # walk() queued some of this plan's datagrams: theirs
                    # is the old rate.
                    plan.marks.append((len(plan.payloads), plan.rate, plan.init))
            if plan.deferred:
                batch.deferred = True
            queue.mark(q, i, plan.rate, plan.init)
        self._sequences(i, j, call, tables)
        records = tables.records
        total = int(records[j] - records[i])
        call.base[i:j] = batch.total - records[i]
        batch.total += total
        # Each candidate's datagrams counted to its socket (options records
        # here announce only what the table holds already).
        for q, many in zip(chosen, datagrams, strict=True):
            plan = plans[q]
            counters = call.owners[q]
            counters.records += many * plan.records
            counters.templates_received += many * plan.templates_received
            counters.options_records += many * plan.options_records
        queue.runs.append((i, j))
        return True

    def _announcing(self, i: int, j: int, call: BulkCall, tables: RunTables) -> int:
        """The first datagram of ``i:j`` whose options records would change
        what the decoder knows (a rate, an init time), or ``j``."""
        if not tables.announcers:
            return j
        changing = [q for q in tables.announcers if not self._repeats(tables.plans[q])]
        if not changing:
            return j
        hits = np.flatnonzero(np.isin(call.taken[i:j], changing))
        return i + int(hits[0]) if len(hits) else j

    def _repeats(self, plan: DatagramPlan) -> bool:
        """Whether the plan's options records announce only what the
        sampling table and init times hold now (reading them again would
        change nothing but the options record counter)."""
        now = (self.sampling.generation, self.init_generation)
        if plan.noop_at == now:
            return plan.noop
        if plan.effects is None:
            plan.effects = [
                (template.key, _read_options(template, raw, count))
                for (template, _, count), raw in zip(
                    plan.options, plan.option_bytes, strict=True
                )
            ]
        noop = True
        changes = self.sampling.changes
        for (exporter, port, _, domain, _), seen in plan.effects:
            _, init, invalid, announced = seen
            if invalid or (
                init is not None
                and self.init_times.get((exporter, port, domain)) != init
            ):
                noop = False
                break
            if any(changes(exporter, domain, sid, rate) for sid, rate in announced):
                noop = False
                break
        plan.noop_at = now
        plan.noop = noop
        return noop

    def _sequences(self, i: int, j: int, call: BulkCall, tables: RunTables) -> None:
        """Account the header sequence numbers of datagrams ``i:j``, which
        all matched a plan, as their walks would (the protocol's rules;
        each stream's in ``tables.stream_counters``)."""
        raise NotImplementedError

    def _bug(self, counters: ExporterCounters, port: int) -> None:
        """Count (and now and then log) a datagram whose walk raised."""
        counters.errors["decoder_bug"] += 1
        self._bugs += 1
        if self._bugs % _BUG_LOG_EVERY == 1:
            log.exception("decoder_bug", exporter_port=port, bugs=self._bugs)

    # -- plans --------------------------------------------------------------

    def bind(self, batch: RecordBatch) -> None:
        """Queue planned datagrams into ``batch`` from now on (datagrams
        queued for an earlier batch that was never built are dropped with
        it)."""
        for plan, _ in self._queued:
            plan.clear()
        self._queued = []
        for queue in self._bulk:
            queue.live = False
        self._bulk = []
        self._batch = batch
        batch.on_settle(self._flush)

    def _flush(self) -> None:
        """Read every plan's queued datagrams into the bound batch."""
        queued = self._queued
        bulk = self._bulk
        if not queued and not bulk:
            return
        self._queued = []
        self._bulk = []
        batch = self._batch
        assert batch is not None
        for plan, counters in queued:
            flush_plan(plan, self.PROTO, batch, counters)
        for queue in bulk:
            queue.read(batch)

    def _holds(self, plan: DatagramPlan, key: tuple[bytes, int, int]) -> bool:
        """The template cache changed since the plan was checked: whether
        the plan still holds (if not, the plans of its key are forgotten)."""
        if plan.current(self.templates.templates):
            plan.generation = self.templates.generation
            return True
        self.plans.pop(key, None)
        self._plans_version += 1
        return False

    def _queue(
        self,
        plan: DatagramPlan,
        payload: bytes,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        """Queue a datagram that matched its plan (the sequence number is
        already accounted)."""
        records = plan.records
        counters.records += records
        counters.templates_received += plan.templates_received
        payloads = plan.payloads
        if not payloads:
            if plan.rate_generation != self.sampling.generation or (
                plan.context_generation != self.init_generation
            ):
                self._look_up(plan)
            plan.marks.append((0, plan.rate, plan.init))
            self._queued.append((plan, counters))
            if plan.deferred:
                batch.deferred = True
        elif plan.rate_generation != self.sampling.generation or (
            plan.context_generation != self.init_generation
        ):
            before = (plan.rate, plan.init)
            self._look_up(plan)
            if (plan.rate, plan.init) != before:
                plan.marks.append((len(payloads), plan.rate, plan.init))
        payloads.append(payload)
        plan.starts.append(batch.total)
        batch.total += records

    def _announce(
        self,
        steps: tuple[tuple[Template, int, int], ...],
        payload: bytes,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        """Read a planned datagram's options sets as the general walk does."""
        for template, offset, count in steps:
            width = template.record_length
            counters.options_records += count
            self._options(
                template,
                payload[offset : offset + count * width],
                count,
                width,
                counters,
                batch,
            )

    def _look_up(self, plan: DatagramPlan) -> None:
        """The rate (and IPFIX init time) of the plan's data, as now."""
        plan.rate_generation = self.sampling.generation
        plan.context_generation = self.init_generation
        plan.rate = self.sampling.lookup(plan.exporter, plan.domain, 0)
        if self.PROTO == ExportProtocol.IPFIX:
            plan.init = self.init_times.get((plan.exporter, plan.port, plan.domain), -1)

    def _remember_plan(  # noqa: PLR0917 - once per datagram of a new layout
        self,
        exporter: bytes,
        port: int,
        domain: int,
        size: int,
        sets: list[tuple[int, int, int, Template | None, int]],
        resends: list[tuple[int, bytes, int]],
        payload: bytes,
    ) -> None:
        """Make a plan from a datagram the general walk read cleanly.

        ``sets`` are (offset, length, set id, template or None, records);
        ``resends`` the template sets as (body offset, body bytes, set id):
        each must be one the decoder remembered as read cleanly, with its
        templates still current, or no plan is made.
        """
        if not self._planning:
            return
        key = (exporter, port, size)
        # A layout is planned the second time it comes among the last few
        # of its key: a one-off layout costs only this check.
        shape = (domain, *(item[:3] for item in sets))
        seen_shapes = self._candidates.get(key)
        if seen_shapes is None or shape not in seen_shapes:
            if len(self._candidates) >= MAX_PLANS:
                self._candidates.clear()
            self._candidates[key] = (shape, *(seen_shapes or ())[: CHAIN - 1])
            return
        self._candidates[key] = tuple(s for s in seen_shapes if s != shape)
        version = 9 if self.PROTO == ExportProtocol.NETFLOW_V9 else 10
        defined: list[tuple[int, bytes, tuple[tuple[TemplateKey, Template], ...]]] = []
        current = self.templates.templates.get
        for offset, raw, set_id in resends:
            seen = self._template_sets.get(
                ((exporter, port, version, domain, set_id), raw)
            )
            if seen is None or any(current(k) is not t for k, t in seen):
                return
            defined.append((offset, raw, seen))
        if len(self.plans) >= MAX_PLANS:
            self.plans.clear()
            self._plans_version += 1
        plan = make_plan(
            proto=self.PROTO,
            exporter=exporter,
            port=port,
            domain=domain,
            size=size,
            sets=sets,
            resends=defined,
            generation=self.templates.generation,
            payload=payload,
        )
        if plan is None:
            return
        # Layouts of one size share the key: a short chain, newest first.
        plan.next = self.plans.get(key)
        self.plans[key] = plan
        self._plans_version += 1
        depth = 1
        link = plan
        while link.next is not None:
            if depth == CHAIN:
                link.next = None
                break
            link = link.next
            depth += 1

    # -- templates ----------------------------------------------------------

    def learn(
        self,
        key: TemplateKey,
        fields: list[FieldSpec],
        export: Export,
        *,
        is_options: bool,
        scope_count: int,
        raw: bytes,
    ) -> None:
        """Add (or replace) a template and decode data held for it."""
        counters = export.counters
        try:
            template = compile_template(
                key,
                fields,
                is_options=is_options,
                scope_count=scope_count,
                max_fields=self.max_template_fields,
                raw=raw,
            )
        except TemplateError as err:
            counters.errors[err.reason] += 1
            return
        reason = self.templates.put(template)
        if reason is not None:
            counters.errors[reason] += 1
            self._warn_once(
                reason,
                key[:2],
                "template_cache_full",
                exporter=address_text(key[0]),
                exporter_port=key[1],
                reason=reason,
                knob="max_templates_per_exporter / max_exporters",
            )
            return
        if template.layout.unusable:
            counters.errors["field_length_unsupported"] += template.layout.unusable
        counters.templates = self.templates.count(key[0], key[1])
        for held in self.pending.release(key):
            counters.pending_decoded += 1
            self.decode_set(template, held.body, held.context, export)

    def known(self, key: TemplateKey, raw: bytes | memoryview) -> bool:
        """Whether ``raw`` is the periodic re-send of the template at ``key``."""
        old = self.templates.get(key)
        return old is not None and old.raw == raw

    def withdraw(self, key: TemplateKey, counters: ExporterCounters) -> None:
        """Forget a template (IPFIX withdrawal)."""
        if self.templates.withdraw(key):
            counters.templates_withdrawn += 1
        else:
            counters.errors["withdrawal_unknown_template"] += 1
        counters.templates = self.templates.count(key[0], key[1])

    def resent(self, key: SetKey, body: bytes, counters: ExporterCounters) -> bool:
        """Whether a template set is the re-send of one read before; if so
        its templates are counted as received and nothing else happens."""
        seen = self._template_sets.get((key, body))
        if seen is None:
            return False
        current = self.templates.templates.get
        for template_key, template in seen:
            if current(template_key) is not template:
                return False
        counters.templates_received += len(seen)
        return True

    def remember_set(
        self,
        key: SetKey,
        body: bytes,
        keys: list[TemplateKey] | None,
        clean: bool,
    ) -> None:
        """Note a template set just read: ``keys`` are the templates it
        defined (None: it also withdrew some), ``clean`` whether reading it
        counted no error."""
        if not clean or keys is None or len(set(keys)) != len(keys):
            return
        current = self.templates.templates.get
        defined = []
        for template_key in keys:
            template = current(template_key)
            if template is None:
                return
            defined.append((template_key, template))
        if len(self._template_sets) >= _MAX_TEMPLATE_SETS:
            self._template_sets.clear()
        self._template_sets[(key, body)] = tuple(defined)

    # -- data ---------------------------------------------------------------

    def data_set(
        self, key: TemplateKey, body: memoryview, export: Export
    ) -> int | None:
        """Decode or hold one data set; return its record count (None: held)."""
        template = self.templates.get(key)
        if template is not None:
            return self.decode_set(template, body, export.context, export)
        export.counters.pending_held += 1
        held = HeldSet(key, bytes(body), export.context, export.received_ms)
        dropped_sets = self.pending.hold(held)
        for dropped in dropped_sets:
            self.stats.exporter(dropped.key[0], dropped.key[1]).pending_expired += 1
        if dropped_sets:
            self._warn_once(
                "pending_full",
                (b"", 0),
                "pending_full",
                held_sets=self.pending.sets,
                held_bytes=self.pending.bytes,
                knob="pending_max_records / pending_max_bytes",
            )
        return None

    def _warn_once(
        self, kind: str, key: tuple[bytes, int], event: str, **fields: Any
    ) -> None:
        """Log a degraded mode at warning once per (kind, exporter)."""
        marker = (kind, *key)
        if marker in self._warned or len(self._warned) >= _MAX_WARNED:
            return
        self._warned.add(marker)
        log.warning(event, **fields)

    def decode_set(
        self,
        template: Template,
        body: bytes | memoryview,
        context: Context,
        export: Export,
    ) -> int:
        """Queue (data) or consume (options) the records of one set.

        ``context`` is the header context of the datagram the set came in
        (an earlier one for held data).
        """
        counters = export.counters
        batch = export.batch
        region: bytes | memoryview
        if template.varlen:
            region, count, overrun = split_varlen(template, body)
            if overrun:
                counters.errors["record_overrun"] += 1
            width = template.projected_length
        else:
            width = template.record_length
            count = len(body) // width
            region = body[: count * width]
        if not count:
            return 0
        exporter, port, _, domain, _ = template.key
        if template.is_options:
            counters.options_records += count
            self._options(template, region, count, width, counters, batch)
            return count
        init_ms = context[3]
        if init_ms < 0 and self.PROTO == ExportProtocol.IPFIX:
            init_ms = self.init_times.get((exporter, port, domain), -1)
        rate = self.sampling.lookup(exporter, domain, 0)
        if width == 0:
            # Only variable-length fields: nothing of the schema is carried,
            # but the records are still flows.
            region = b"\x00" * count
        batch.add(
            (template.layout, exporter, port, domain),
            self.PROTO,
            region,
            count,
            (context[0], context[1], context[2], init_ms, rate),
        )
        counters.records += count
        return count

    def _options(  # noqa: PLR0917 - the data path's own helper
        self,
        template: Template,
        region: bytes | memoryview,
        count: int,
        width: int,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        """Learn sampling rates and system init time from options records.

        The records are read with numpy once per distinct content: a
        periodic re-send of the same bytes repeats what they announced.
        """
        if not width:
            return
        raw = bytes(region)
        seen = template.options_seen
        if seen is None or seen[0] != raw:
            seen = _read_options(template, raw, count)
            template.options_seen = seen
        _, init, invalid, announced = seen
        exporter, port, _, domain, _ = template.key
        if invalid:
            counters.errors["system_init_time_invalid"] += 1
        elif init is not None:
            key = (exporter, port, domain)
            if key in self.init_times or len(self.init_times) < _MAX_INIT_TIMES:
                if self.init_times.get(key) != init:
                    self.init_generation += 1
                self.init_times[key] = init
        for sid, rate in announced:
            if batch.deferred and self.sampling.changes(exporter, domain, sid, rate):
                self.settle(batch)
            self.sampling.announce(exporter, domain, sid, rate)


def _read_options(
    template: Template, raw: bytes, count: int
) -> tuple[bytes, int | None, bool, tuple[tuple[int, int], ...]]:
    """What options records announce: (their bytes, system init time ms or
    None, whether that time is invalid, ((sampler id, rate), ...) in record
    order for the records that carry a rate)."""
    fields = template.layout.fields
    view = np.frombuffer(raw, dtype=template.layout.dtype, count=count)
    init: int | None = None
    invalid = False
    if ie.SYSTEM_INIT_MILLISECONDS in fields:
        name, width = fields[ie.SYSTEM_INIT_MILLISECONDS]
        value = int(ie.uint_column(view, name, width)[-1])
        if 0 < value < _MAX_TIME_MS:
            init = value
        else:
            invalid = True
    rates = record_rates(view, fields)
    if rates is None:
        return raw, init, invalid, ()
    sids = sampler_ids(view, fields)
    announced = tuple(
        (int(sids[i]) if sids is not None else 0, int(rates[i]))
        for i in np.flatnonzero(rates)
    )
    return raw, init, invalid, announced


class NetflowV9Decoder(TemplatedDecoder):
    """Walk NetFlow v9 datagrams."""

    PROTO = ExportProtocol.NETFLOW_V9

    def _sequences(self, i: int, j: int, call: BulkCall, tables: RunTables) -> None:
        keys = tables.stream_keys
        owners = tables.stream_counters
        if tables.switches[j - 1] == tables.switches[i]:
            number = int(tables.stream[i])
            self._sequence_run(keys[number], i, j, tables, owners[number])
        else:
            # Several streams (domains) in the run: each datagram on its
            # own (streams are independent; each keeps its order).
            for k, number in enumerate(tables.stream[i:j].tolist(), i):
                self._sequence_run(keys[number], k, k + 1, tables, owners[number])

    def _sequence_run(
        self,
        key: tuple[bytes, int, int, int],
        i: int,
        j: int,
        tables: RunTables,
        counters: ExporterCounters,
    ) -> None:
        """Account the sequence numbers of datagrams ``i:j`` of one stream
        as :meth:`SequenceTracker.check_v9` does one by one: stretches
        without a break in the numbering at once (a bisect on the running
        count of breaks), the others one by one."""
        seqs = tables.seqs
        units = tables.units
        streams = self.sequences.streams
        several = tables.several
        check = self.sequences.check_v9
        k = i
        while k < j:
            stream = streams.get(key)
            if stream is not None and stream.expected == seqs[k]:
                off = tables.off_by_units if stream.by_records else tables.off_by_one
                end = bisect_right(off, off[k], k, j)
                if stream.last_records > 1 or several[end - 1] != several[k]:
                    # An in-order datagram after one of several records:
                    # RFC behaviour, so the record-counting votes are void.
                    stream.votes = stream.vote_gaps = stream.vote_lost = 0
                last = units[end - 1]
                stream.expected = (
                    seqs[end - 1] + (last if stream.by_records else 1)
                ) & _MASK32
                stream.last_seq = seqs[end - 1]
                stream.last_records = last
                k = end
            else:
                check(key, seqs[k], units[k], counters)
                k += 1

    def walk(  # noqa: PLR0917 - once per datagram: positional is cheaper
        self,
        payload: bytes,
        exporter: bytes,
        port: int,
        received_ms: int,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        """Decode one v9 datagram (the version is already checked)."""
        size = len(payload)
        plan_key = (exporter, port, size)
        plan = self.plans.get(plan_key)
        while plan is not None:
            # A layout seen before: uptime, secs, sequence, then what the
            # plan must find (source id, every set id and length).
            values = plan.unpack(payload)
            if values[3:] != plan.sig:
                plan = plan.next
                continue
            if (
                plan.generation == self.templates.generation
                or self._holds(plan, plan_key)
            ) and (not plan.resends or plan.resent(payload)):
                if plan.options_before:
                    self._announce(plan.options_before, payload, counters, batch)
                # SequenceTracker.check_v9's in-order case in line.
                seq = values[2]
                units = plan.sequence_units
                stream = self.sequences.streams.get(plan.domain_key)
                if stream is not None and stream.expected == seq:
                    if stream.last_records > 1:
                        stream.votes = stream.vote_gaps = stream.vote_lost = 0
                    step = units if stream.by_records else 1
                    stream.expected = (seq + step) & 0xFFFFFFFF
                    stream.last_seq = seq
                    stream.last_records = units
                else:
                    self.sequences.check_v9(plan.domain_key, seq, units, counters)
                payloads = plan.payloads
                if (
                    payloads
                    and plan.rate_generation == self.sampling.generation
                    and plan.context_generation == self.init_generation
                ):
                    # _queue's usual case in line: more of a plan already
                    # queued, rate and init time unchanged.
                    records = plan.records
                    counters.records += records
                    counters.templates_received += plan.templates_received
                    payloads.append(payload)
                    plan.starts.append(batch.total)
                    batch.total += records
                else:
                    self._queue(plan, payload, counters, batch)
                if plan.options_after:
                    self._announce(plan.options_after, payload, counters, batch)
                return
            break
        if size < 20:
            counters.errors["truncated_header"] += 1
            return
        _, _count, uptime, secs, seq, domain = V9_HEADER.unpack_from(payload)
        header = (secs, uptime, secs * 1000, -1)
        # Built only when a set leaves the fast path.
        export: Export | None = None
        domain_key = (exporter, port, 9, domain)
        by_id = self.templates.by_domain.get(domain_key) or NO_TEMPLATES
        unpack_set = SET_HEADER.unpack_from
        add = batch.add
        context: tuple[int, int, int, int, int] | None = None
        pos = 20
        records = 0
        templates_before = counters.templates_received
        # What a plan of this layout needs (None once a set leaves the
        # fast paths): (offset, length, set id, template, records) per set
        # and the template sets as (body offset, bytes, set id).
        sets: list[tuple[int, int, int, Template | None, int]] | None = []
        resends: list[tuple[int, bytes, int]] = []
        while size - pos >= 4:
            set_id, length = unpack_set(payload, pos)
            if length < 4:
                sets = None
                if not any(payload[pos:]):
                    pos = size  # zero fill up to a fixed datagram size
                    break
                counters.errors["set_too_short"] += 1
                break
            if length > size - pos:
                counters.errors["set_beyond_datagram"] += 1
                sets = None
                break
            if set_id >= 256:
                template = by_id.get(set_id)
                if template is not None and template.fast:
                    # Fast path: a fixed-length data template.
                    width = template.record_length
                    count = (length - 4) // width
                    if count:
                        if context is None:
                            rate = self.sampling.lookup(exporter, domain, 0)
                            context = (*header, rate)
                        assert template.group_key is not None
                        add(
                            template.group_key,
                            ExportProtocol.NETFLOW_V9,
                            payload[pos + 4 : pos + 4 + count * width],
                            count,
                            context,
                        )
                        records += count
                        counters.records += count
                    if sets is not None:
                        sets.append((pos, length, set_id, template, count))
                else:
                    if (
                        sets is not None
                        and template is not None
                        and template.is_options
                        and not template.varlen
                        and template.record_length
                    ):
                        count = (length - 4) // template.record_length
                        sets.append((pos, length, set_id, template, count))
                    else:
                        sets = None
                    if export is None:
                        export = Export(
                            exporter,
                            port,
                            domain,
                            received_ms,
                            header,
                            counters=counters,
                            batch=batch,
                        )
                    body = memoryview(payload)[pos + 4 : pos + length]
                    records += self.data_set((*domain_key, set_id), body, export) or 0
                    context = None  # options data may have changed the rate
            elif set_id in (0, 1):
                set_key = (*domain_key, set_id)
                raw = payload[pos + 4 : pos + length]
                if not self.resent(set_key, raw, counters):
                    if export is None:
                        export = Export(
                            exporter,
                            port,
                            domain,
                            received_ms,
                            header,
                            counters=counters,
                            batch=batch,
                        )
                    errors = counters.errors.total()
                    body = memoryview(payload)[pos + 4 : pos + length]
                    if set_id == 0:
                        keys = self._templates(body, export)
                    else:
                        keys = self._options_templates(body, export)
                    self.remember_set(
                        set_key, raw, keys, counters.errors.total() == errors
                    )
                    by_id = self.templates.by_domain.get(domain_key) or NO_TEMPLATES
                    context = None
                if sets is not None:
                    sets.append((pos, length, set_id, None, 0))
                    resends.append((pos + 4, raw, set_id))
            else:
                counters.errors["reserved_set_id"] += 1
                sets = None
            pos += length
        if pos < size:
            sets = None
            if any(payload[pos:]):
                counters.errors["trailing_bytes"] += 1
        # Exporters that number records count template records too.
        records += counters.templates_received - templates_before
        self.sequences.check_v9(domain_key, seq, records, counters)
        if sets:
            self._remember_plan(exporter, port, domain, size, sets, resends, payload)

    def _templates(self, body: memoryview, export: Export) -> list[TemplateKey]:
        """Read a template set; return the keys of the templates it holds."""
        counters = export.counters
        pos = 0
        size = len(body)
        keys: list[TemplateKey] = []
        while size - pos >= 4:
            template_id, count = FIELD.unpack_from(body, pos)
            if template_id < 256:
                if not any(body[pos:]):
                    return keys  # padding
                counters.errors["template_id_reserved"] += 1
                return keys
            if count * 4 > size - pos - 4:
                counters.errors["template_truncated"] += 1
                return keys
            key = (export.exporter, export.port, 9, export.domain, template_id)
            keys.append(key)
            raw = body[pos : pos + 4 + count * 4]
            counters.templates_received += 1
            if self.known(key, raw):
                pos += 4 + count * 4
                continue
            pos += 4
            specs = [
                FieldSpec(t, n)
                for t, n in FIELD.iter_unpack(body[pos : pos + count * 4])
            ]
            pos += count * 4
            self.learn(
                key, specs, export, is_options=False, scope_count=0, raw=bytes(raw)
            )
        return keys

    def _options_templates(self, body: memoryview, export: Export) -> list[TemplateKey]:
        """Read an options template set; return the keys of its templates."""
        counters = export.counters
        pos = 0
        size = len(body)
        keys: list[TemplateKey] = []
        while size - pos >= 6:
            template_id, scope_len, option_len = V9_OPTIONS_HEADER.unpack_from(
                body, pos
            )
            if template_id < 256:
                if not any(body[pos:]):
                    return keys
                counters.errors["template_id_reserved"] += 1
                return keys
            if scope_len % 4 or option_len % 4:
                counters.errors["options_template_bad_length"] += 1
                return keys
            if scope_len + option_len > size - pos - 6:
                counters.errors["template_truncated"] += 1
                return keys
            key = (export.exporter, export.port, 9, export.domain, template_id)
            keys.append(key)
            raw = body[pos : pos + 6 + scope_len + option_len]
            counters.templates_received += 1
            if self.known(key, raw):
                pos += 6 + scope_len + option_len
                continue
            pos += 6
            scope = [
                FieldSpec(t, n, scope=True)
                for t, n in FIELD.iter_unpack(body[pos : pos + scope_len])
            ]
            pos += scope_len
            options = [
                FieldSpec(t, n)
                for t, n in FIELD.iter_unpack(body[pos : pos + option_len])
            ]
            pos += option_len
            self.learn(
                key,
                scope + options,
                export,
                is_options=True,
                scope_count=len(scope),
                raw=bytes(raw),
            )
        return keys
