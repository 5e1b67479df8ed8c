"""Datagram plans: v9/IPFIX datagrams of a layout seen before, read in bulk.

A steady exporter sends the same few datagram layouts over and over: the
same sets (ids and lengths) at the same offsets, for templates that do not
change, with the periodic template re-sends byte for byte equal.  Walking
such a datagram set by set costs microseconds of Python each time.  A
:class:`DatagramPlan` remembers one layout, keyed by (exporter, port,
datagram size): a datagram that matches it is checked with one struct call
(every set header and the domain), the bytes of its template re-sends are
compared in place, its sequence number is accounted at once (arrival order
matters there), and the datagram itself is only queued.  When the batch
settles, the queued datagrams of a plan are read together: joined into one
``(datagrams, size)`` byte matrix, each template's records gathered from
their fixed columns and handed to the batch as one prepared group.

A plan is made only from a datagram whose walk took nothing but the fast
paths: fixed-length data templates already known, template sets read
without an error (or re-sent), fixed-length options data before or after
all the data sets (read at once, in arrival order, as the general walk
reads it).  walk_many accounts such a datagram in bulk too while the
fields its options records announce (rates, sampler ids, init time) are
the plan's bytes and announce what the decoder holds already; the first
that would change something is walked.  Held data, withdrawals, padding
and errors leave the datagram to the general walk.  A plan holds
while the template cache's generation is unchanged, or while every
template it names is still the one it was made with; the sampling rate
(and IPFIX's systemInitTime) is looked up again when its table changed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from itertools import chain
from typing import Any

import numpy as np
import structlog

from edge_agent.flows.counters import ExporterCounters
from edge_agent.flows.fields import (
    ANNOUNCING_ELEMENTS,
    SAMPLER_ID,
    SELECTOR_ID,
    PreparedGroup,
    RecordBatch,
)
from edge_agent.flows.schema import ExportProtocol
from edge_agent.flows.templates import Template, TemplateKey

log = structlog.get_logger(__name__)

#: Plans kept per decoder; past the bound the table starts afresh.
MAX_PLANS = 4096
#: Most plans (layouts) kept per (exporter, port, datagram size).
CHAIN = 4
#: Plans with fewer queued datagrams than this are read datagram by
#: datagram (the matrix pass costs a few dozen numpy calls whatever its
#: size).  12 instead made no difference beyond noise (1%) for v9 and cost
#: 1-2% more instructions for IPFIX on the shared captures.
VECTOR_MIN = 32

_MINUS_ONE = np.array(-1, dtype=np.int64)

#: One data set of a plan: (template, offset of its first record, records,
#: position of its first record among the datagram's records)
DataStep = tuple[Template, int, int, int]


class PlanGroup:
    """The data sets of one template in a plan and how to gather them."""

    __slots__ = (
        "columns",
        "offsets",
        "positions",
        "prefixes",
        "records",
        "set_counts",
        "sets",
        "template",
    )

    def __init__(self, template: Template) -> None:
        self.template = template
        #: (offset of the first record, records) per set, in datagram order
        self.sets: list[tuple[int, int]] = []
        #: each set's first record among the datagram's records
        self.prefixes: list[int] = []
        #: records of this template per datagram
        self.records = 0
        #: byte columns of the records in a datagram (built on first use)
        self.columns: slice | np.ndarray | None = None
        self.set_counts: np.ndarray | None = None
        #: each record's byte offset in the datagram and position among
        #: the datagram's records (built on first use)
        self.offsets: np.ndarray | None = None
        self.positions: np.ndarray | None = None

    def record_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(byte offset in the datagram, position among its records) of
        every record of this group, in datagram order."""
        if self.offsets is None or self.positions is None:
            width = self.template.record_length
            offsets: list[int] = []
            positions: list[int] = []
            for (offset, count), prefix in zip(self.sets, self.prefixes, strict=True):
                offsets += range(offset, offset + count * width, width)
                positions += range(prefix, prefix + count)
            self.offsets = np.array(offsets, dtype=np.int64)
            self.positions = np.array(positions, dtype=np.int64)
        return self.offsets, self.positions

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The records of every datagram row, in order, as layout elements."""
        if self.columns is None:
            width = self.template.record_length
            if len(self.sets) == 1:
                offset, count = self.sets[0]
                self.columns = slice(offset, offset + count * width)
            else:
                self.columns = np.concatenate(
                    [np.arange(o, o + c * width) for o, c in self.sets]
                )
            self.set_counts = np.array([c for _, c in self.sets], dtype=np.int64)
        picked = np.ascontiguousarray(rows[:, self.columns])
        # frombuffer, not .view(): numpy checks a structured view in Python.
        return np.frombuffer(picked, dtype=self.template.layout.dtype)


class DatagramPlan:
    """One remembered datagram layout of an exporter socket (see module doc).

    ``unpack`` reads the header fields then every set header; ``sig`` is
    what it must return from index ``tail`` on (domain, then set id and
    length per set).  ``resends`` are (offset, bytes) of template set
    bodies that must be equal; ``templates`` every (key, template) the
    plan relies on, current as of template ``generation``.
    """

    __slots__ = (
        "checks",
        "context_generation",
        "deferred",
        "domain",
        "domain_key",
        "effects",
        "exporter",
        "generation",
        "groups",
        "init",
        "marks",
        "next",
        "noop",
        "noop_at",
        "option_bytes",
        "option_columns",
        "option_values",
        "options",
        "options_after",
        "options_before",
        "options_records",
        "payloads",
        "port",
        "rate",
        "rate_generation",
        "records",
        "resends",
        "sequence_units",
        "sig",
        "sig_columns",
        "sig_values",
        "size",
        "starts",
        "steps",
        "templates",
        "templates_received",
        "unpack",
    )

    unpack: Callable[[bytes], tuple[Any, ...]]

    def __init__(
        self,
        *,
        exporter: bytes,
        port: int,
        domain: int,
        domain_key: tuple[bytes, int, int, int],
        size: int,
        unpack: Callable[[bytes], tuple[Any, ...]],
        sig: tuple[int, ...],
        steps: list[DataStep],
        resends: tuple[tuple[int, bytes], ...],
        templates: tuple[tuple[TemplateKey, Template], ...],
        templates_received: int,
        generation: int,
        sequence_units: int,
        options_before: tuple[tuple[Template, int, int], ...] = (),
        options_after: tuple[tuple[Template, int, int], ...] = (),
        sig_bytes: tuple[tuple[int, bytes], ...] = (),
        option_bytes: tuple[bytes, ...] = (),
    ) -> None:
        self.exporter = exporter
        self.port = port
        self.domain = domain
        self.domain_key = domain_key
        self.size = size
        self.unpack = unpack
        self.sig = sig
        self.steps = steps
        self.resends = resends
        self.templates = templates
        self.templates_received = templates_received
        self.generation = generation
        self.sequence_units = sequence_units
        #: options sets (template, offset, records) read before / after the
        #: data is queued, as the general walk reads them
        self.options_before = options_before
        self.options_after = options_after
        #: every options set, before then after, with the bytes of its
        #: records in the datagram the plan was made from
        self.options = options_before + options_after
        self.option_bytes = option_bytes
        self.options_records = sum(step[2] for step in self.options)
        #: what those records announce (the decoder reads it on first
        #: need), and whether announcing it again would change nothing, as
        #: of (sampling generation, init generation) ``noop_at``
        self.effects: Any = None
        self.noop = False
        self.noop_at: tuple[int, int] | None = None
        self.records = sum(step[2] for step in steps)
        groups: dict[int, PlanGroup] = {}
        for template, offset, count, prefix in steps:
            group = groups.get(id(template))
            if group is None:
                group = groups[id(template)] = PlanGroup(template)
            group.sets.append((offset, count))
            group.prefixes.append(prefix)
            group.records += count
        self.groups = list(groups.values())
        self.deferred = any(
            SAMPLER_ID in g.template.layout.fields
            or SELECTOR_ID in g.template.layout.fields
            for g in self.groups
        )
        #: the rate and init time of queued datagrams from here on, and the
        #: (sampling, init) generations they were looked up at
        self.rate = 0
        self.init = -1
        self.rate_generation = -1
        self.context_generation = -1
        #: queued datagrams of the bound batch: payloads, first record
        #: positions, and (first index, rate, init) each time those changed
        self.payloads: list[bytes] = []
        self.starts: list[int] = []
        self.marks: list[tuple[int, int, int]] = []
        #: the next plan of the same key (another layout of that size)
        self.next: DatagramPlan | None = None
        #: what :func:`match_rows` compares: the byte columns that ``sig``
        #: reads and their values, and the template re-sends as (first
        #: column, end column, bytes)
        self.sig_columns = np.array(
            [at + i for at, raw in sig_bytes for i in range(len(raw))], dtype=np.intp
        )
        self.sig_values = np.frombuffer(b"".join(raw for _, raw in sig_bytes), np.uint8)
        self.checks = tuple(
            (offset, offset + len(raw), np.frombuffer(raw, np.uint8))
            for offset, raw in resends
        )
        #: the bytes of the options records that the decoder reads (rates,
        #: sampler ids, init time) must be the remembered ones too (a
        #: datagram that announces something else is walked); other options
        #: fields, such as an exporter's running totals, may differ
        columns: list[int] = []
        values = bytearray()
        for (template, offset, count), raw in zip(
            self.options, option_bytes, strict=True
        ):
            width = template.record_length
            dtype_fields: Any = template.layout.dtype.fields or {}
            for ie, (name, length) in template.layout.fields.items():
                if ie in ANNOUNCING_ELEMENTS:
                    at = dtype_fields[name][1]
                    for first in range(at, count * width, width):
                        columns += range(offset + first, offset + first + length)
                        values += raw[first : first + length]
        self.option_columns = np.array(columns, dtype=np.intp)
        self.option_values = np.frombuffer(bytes(values), np.uint8)

    def current(self, templates: dict[TemplateKey, Template]) -> bool:
        """Whether every template the plan relies on is still the same."""
        get = templates.get
        return all(get(key) is template for key, template in self.templates)

    def resent(self, payload: bytes) -> bool:
        """Whether the template set bodies are the remembered bytes."""
        # A loop: a generator costs more.
        for offset, raw in self.resends:  # noqa: SIM110
            if not payload.startswith(raw, offset):
                return False
        return True

    def clear(self) -> None:
        """Forget the queued datagrams."""
        self.payloads = []
        self.starts = []
        self.marks = []


def make_plan(
    *,
    proto: ExportProtocol,
    exporter: bytes,
    port: int,
    domain: int,
    size: int,
    sets: list[tuple[int, int, int, Template | None, int]],
    resends: list[tuple[int, bytes, tuple[tuple[TemplateKey, Template], ...]]],
    generation: int,
    payload: bytes = b"",
) -> DatagramPlan | None:
    """A plan for a datagram whose walk took only the fast paths (None if
    its options sets come between data sets).

    ``sets`` lists every set as (offset, length, set id, template of a data
    set or None, records); ``resends`` the template sets as (body offset,
    body bytes, the (key, template) pairs they define); ``payload`` is the
    datagram (its options records are remembered).
    """
    sig_bytes: list[tuple[int, bytes]]
    if proto == ExportProtocol.NETFLOW_V9:
        # uptime, secs, sequence, source id; sets from byte 20
        fmt = [">4xIIII"]
        cursor = 20
        version = 9
        sig_bytes = [(16, struct.pack(">I", domain))]
    else:
        # length, export time, sequence, domain; sets from byte 16
        fmt = [">2xHIII"]
        cursor = 16
        version = 10
        # the message length is the datagram's: one message
        sig_bytes = [(2, struct.pack(">H", size)), (12, struct.pack(">I", domain))]
    sig: list[int] = [domain]
    steps: list[DataStep] = []
    before: list[tuple[Template, int, int]] = []
    after: list[tuple[Template, int, int]] = []
    prefix = 0
    options_records = 0
    for offset, length, set_id, template, count in sets:
        if offset > cursor:
            fmt.append(f"{offset - cursor}x")
        fmt.append("HH")
        cursor = offset + 4
        sig += (set_id, length)
        sig_bytes.append((offset, struct.pack(">HH", set_id, length)))
        if template is None or not count:
            continue
        if template.is_options:
            # Announcements apply to the data after them: a plan reads its
            # data with one rate, so options sets must come before or
            # after all of it.
            (after if steps else before).append((template, offset + 4, count))
            options_records += count
        elif after:
            return None
        else:
            steps.append((template, offset + 4, count, prefix))
            prefix += count
    relied: dict[TemplateKey, Template] = {}
    received = 0
    for _, _, defined in resends:
        received += len(defined)
        relied.update(defined)
    for used in [step[0] for step in steps] + [step[0] for step in before + after]:
        relied[used.key] = used
    records = prefix
    return DatagramPlan(
        exporter=exporter,
        port=port,
        domain=domain,
        domain_key=(exporter, port, version, domain),
        size=size,
        unpack=struct.Struct("".join(fmt)).unpack_from,
        sig=tuple(sig),
        steps=steps,
        resends=tuple((offset, raw) for offset, raw, _ in resends),
        templates=tuple(relied.items()),
        templates_received=received,
        generation=generation,
        # v9 exporters that number records count template records too
        sequence_units=records + options_records + received
        if proto == ExportProtocol.NETFLOW_V9
        else records + options_records,
        options_before=tuple(before),
        options_after=tuple(after),
        sig_bytes=tuple(sig_bytes),
        option_bytes=tuple(
            bytes(payload[offset : offset + count * template.record_length])
            for template, offset, count in before + after
        ),
    )


_V9_HEAD = struct.Struct(">4xII")
_IPFIX_HEAD = struct.Struct(">4xI")


def flush_plan(
    plan: DatagramPlan,
    proto: ExportProtocol,
    batch: RecordBatch,
    counters: ExporterCounters,
) -> None:
    """Hand a plan's queued datagrams to ``batch`` (it is settling) and
    forget them.  A failure (a bug) drops their records, counted."""
    try:
        if len(plan.payloads) >= VECTOR_MIN:
            _read_vector(plan, proto, batch)
        else:
            _read_each(plan, proto, batch)
    except Exception:
        counters.errors["decoder_bug"] += 1
        n = len(plan.payloads)
        counters.records -= plan.records * n
        for _, _, count, prefix in plan.steps:
            batch.lost(
                plan.exporter,
                plan.port,
                [count] * n,
                [start + prefix for start in plan.starts],
            )
    plan.clear()


def _per_datagram(plan: DatagramPlan) -> list[tuple[int, int]]:
    """(rate, init) of each queued datagram, from the plan's marks."""
    out: list[tuple[int, int]] = []
    marks = plan.marks
    for (first, rate, init), (end, _, _) in zip(
        marks, [*marks[1:], (len(plan.payloads), 0, 0)], strict=True
    ):
        out += [(rate, init)] * (end - first)
    return out


def _read_each(plan: DatagramPlan, proto: ExportProtocol, batch: RecordBatch) -> None:
    """A few datagrams: their sets go the way the general walk sends them."""
    v9 = proto == ExportProtocol.NETFLOW_V9
    contexts = _per_datagram(plan)
    add_at = batch.add_at
    for payload, start, (rate, init) in zip(
        plan.payloads, plan.starts, contexts, strict=True
    ):
        if v9:
            uptime, secs = _V9_HEAD.unpack_from(payload)
            context = (secs, uptime, secs * 1000, -1, rate)
        else:
            (secs,) = _IPFIX_HEAD.unpack_from(payload)
            context = (secs, -1, secs * 1000, init, rate)
        for template, offset, count, prefix in plan.steps:
            assert template.group_key is not None
            add_at(
                template.group_key,
                proto,
                payload[offset : offset + count * template.record_length],
                count,
                context,
                start=start + prefix,
            )


def _read_vector(plan: DatagramPlan, proto: ExportProtocol, batch: RecordBatch) -> None:
    """Many datagrams: one byte matrix, each template gathered at once."""
    payloads = plan.payloads
    n = len(payloads)
    rows = np.frombuffer(b"".join(payloads), dtype=np.uint8).reshape(n, plan.size)
    rates: np.ndarray
    inits: np.ndarray
    if len(plan.marks) == 1:
        _, rate, init = plan.marks[0]
        rates = np.array(rate, dtype=np.int64)
        inits = np.array(init, dtype=np.int64)
    else:
        table = np.fromiter(
            chain.from_iterable(_per_datagram(plan)), np.int64, 2 * n
        ).reshape(n, 2)
        rates, inits = table[:, 0], table[:, 1]
    read_rows(
        plan, proto, batch, rows, np.array(plan.starts, dtype=np.int64), rates, inits
    )


def read_rows(  # noqa: PLR0917 - one call per plan and batch
    plan: DatagramPlan,
    proto: ExportProtocol,
    batch: RecordBatch,
    rows: np.ndarray,
    starts: np.ndarray,
    rates: np.ndarray,
    inits: np.ndarray,
) -> None:
    """Hand the records of datagrams of ``plan`` to ``batch``.

    ``rows`` is an ``(n, plan.size)`` uint8 matrix of the datagrams,
    ``starts`` the batch position of each one's first record; ``rates``
    and ``inits`` are 0-d (all alike) or one value per datagram.
    """
    n = rows.shape[0]
    head = np.ascontiguousarray(rows[:, 4:12]).view(">u4")
    uptime: np.ndarray | None
    if proto == ExportProtocol.NETFLOW_V9:
        uptime = head[:, 0].astype(np.int64)
        secs = head[:, 1].astype(np.int64)
    else:
        uptime = None
        secs = head[:, 0].astype(np.int64)
    for group in plan.groups:
        view = group.gather(rows)
        k = group.records
        rep_secs = np.repeat(secs, k)
        columns = [
            rep_secs,
            _MINUS_ONE if uptime is None else np.repeat(uptime, k),
            rep_secs * 1000,
            inits if inits.ndim == 0 else np.repeat(inits, k),
            rates if rates.ndim == 0 else np.repeat(rates, k),
        ]
        if proto == ExportProtocol.NETFLOW_V9:
            columns[3] = _MINUS_ONE
        if len(group.sets) == 1:
            counts: np.ndarray = np.full(n, k, dtype=np.int64)
            firsts = starts + group.prefixes[0]
        else:
            assert group.set_counts is not None
            counts = np.tile(group.set_counts, n)
            firsts = (
                starts[:, None] + np.array(group.prefixes, dtype=np.int64)[None, :]
            ).reshape(-1)
        template = group.template
        batch.add_prepared(
            PreparedGroup(
                layout=template.layout,
                exporter=plan.exporter,
                port=plan.port,
                domain=plan.domain,
                proto=proto,
                view=view,
                columns=columns,
                counts=counts,
                starts=firsts,
            )
        )


# -- many datagrams at once (walk_many) ---------------------------------------


def byte_rows(data: bytes, offsets: np.ndarray, size: int) -> np.ndarray:
    """The datagrams of ``size`` bytes at ``offsets`` in ``data`` as an
    ``(n, size)`` uint8 matrix (a copy)."""
    # One item of `size` bytes at every byte offset (overlapping): fancy
    # indexing then copies each datagram whole.
    every = np.ndarray(
        buffer=data, dtype=f"V{size}", shape=(len(data) - size + 1,), strides=(1,)
    )
    return np.frombuffer(every[offsets], dtype=np.uint8).reshape(-1, size)


def match_rows(
    plan: DatagramPlan | None, rows: np.ndarray
) -> list[tuple[DatagramPlan, np.ndarray]]:
    """Which rows of a byte matrix (datagrams of one size) take which plan
    of a chain, as the walkers choose: the first plan whose signature a row
    has.  Rows whose template re-sends or options records differ from the
    plan's bytes are left out (the walkers read them).

    Returns (plan, row indices) for each plan that some rows take.
    """
    out: list[tuple[DatagramPlan, np.ndarray]] = []
    left: np.ndarray | None = None  # None: every row
    while plan is not None:
        if left is None:
            hit = (rows[:, plan.sig_columns] == plan.sig_values).all(axis=1)
            taken = np.flatnonzero(hit)
        else:
            hit = (rows[left[:, None], plan.sig_columns] == plan.sig_values).all(axis=1)
            taken = left[hit]
        if len(taken):
            for first, end, raw in plan.checks:
                taken = taken[(rows[taken, first:end] == raw).all(axis=1)]
            if len(plan.option_columns) and len(taken):
                same = rows[taken[:, None], plan.option_columns] == plan.option_values
                taken = taken[same.all(axis=1)]
            if len(taken):
                out.append((plan, taken))
            left = np.flatnonzero(~hit) if left is None else left[~hit]
            if not len(left):
                break
        plan = plan.next
    return out


_read_failures = 0


def _log_read_failure(proto: ExportProtocol) -> None:
    """Log a failed template-wise read, at most once per 1000."""
    global _read_failures  # noqa: PLW0603 - a process-wide log sampler
    _read_failures += 1
    if _read_failures % 1000 == 1:
        log.exception("bulk_read_failed", proto=str(proto), failures=_read_failures)


class BulkCall:
    """What one walk_many call knows of its datagrams (shared by the
    :class:`BulkQueue` values that hold its runs until the batch settles).

    ``candidates`` are (plan, byte matrix of the datagrams of its socket
    and size), ``owners`` the counters of each one's socket; datagram ``i``
    matched candidate ``taken[i]`` (-1: none) at row ``local[i]`` of its
    matrix.  ``before[i]`` is how many records the
    matched datagrams before ``i`` hold (the call's own numbering) and
    ``base[i]`` what turns that into a batch position.
    """

    __slots__ = (
        "base",
        "before",
        "candidates",
        "data",
        "local",
        "n",
        "offsets",
        "owners",
        "proto",
        "taken",
    )

    def __init__(
        self,
        proto: ExportProtocol,
        n: int,
        data: bytes = b"",
        offsets: np.ndarray | None = None,
    ) -> None:
        self.proto = proto
        self.n = n
        #: bytes holding every datagram of the call, and each one's offset
        self.data = data
        self.offsets = np.zeros(n, dtype=np.int64) if offsets is None else offsets
        self.candidates: list[tuple[DatagramPlan, np.ndarray]] = []
        self.owners: list[ExporterCounters] = []
        self.taken = np.full(n, -1, dtype=np.intp)
        self.local = np.zeros(n, dtype=np.intp)
        self.before = np.zeros(n + 1, dtype=np.int64)
        self.base = np.zeros(n, dtype=np.int64)


class BulkQueue:
    """Runs of planned datagrams of one walk_many call, accounted already
    and read when the batch settles; with, per candidate, (first datagram,
    rate, init) each time those changed."""

    __slots__ = ("call", "live", "marks", "runs")

    def __init__(self, call: BulkCall) -> None:
        self.call = call
        #: False once read (or dropped with its batch): take a new one
        self.live = True
        self.runs: list[tuple[int, int]] = []
        self.marks: dict[int, list[tuple[int, int, int]]] = {}

    def mark(self, candidate: int, first: int, rate: int, init: int) -> None:
        """Candidate ``candidate``'s datagrams from ``first`` on have this
        rate and init time."""
        marks = self.marks.get(candidate)
        if marks is None:
            self.marks[candidate] = [(first, rate, init)]
        elif marks[-1][1] != rate or marks[-1][2] != init:
            marks.append((first, rate, init))

    def read(self, batch: RecordBatch) -> None:
        """Hand every queued record to ``batch`` (it is settling).  A
        failure (a bug) drops the records of that plan, counted.

        Each template's records are gathered at once across every plan of
        the call that holds it (one group per template, straight from the
        call's joined bytes); if that fails (a bug), plan by plan.
        """
        self.live = False
        call = self.call
        if not self.runs:
            return
        mask = np.zeros(call.n, dtype=bool)
        for first, end in self.runs:
            mask[first:end] = True
        queued = np.flatnonzero(mask)
        # Per template: every candidate holding it.
        holders: dict[int, list[tuple[int, PlanGroup]]] = {}
        for candidate in self.marks:
            plan = call.candidates[candidate][0]
            for group in plan.groups:
                holders.setdefault(id(group.template), []).append((candidate, group))
        if len(call.data) and any(len(parts) > 1 for parts in holders.values()):
            # Several plans share a template: one group for it is cheaper
            # than one per plan joined later (a plan's own group is
            # cheapest read from its matrix).
            try:
                prepared = self._by_template(queued, holders)
            except Exception:
                _log_read_failure(call.proto)
            else:
                for part in prepared:
                    batch.add_prepared(part)
                self.runs = []
                self.marks = {}
                return
        self._by_plan(batch, queued)

    def _by_template(
        self, queued: np.ndarray, holders: dict[int, list[tuple[int, PlanGroup]]]
    ) -> list[PreparedGroup]:
        """One prepared group per template of the queued datagrams
        (``holders``: the candidates and plan groups of each template)."""
        call = self.call
        taken = call.taken[queued]
        starts = call.before[queued] + call.base[queued]
        offsets = call.offsets[queued]
        words = np.ndarray(
            buffer=call.data, dtype=">u4", shape=(len(call.data) - 3,), strides=(1,)
        )
        v9 = call.proto == ExportProtocol.NETFLOW_V9
        if v9:
            uptime: np.ndarray = words[offsets + 4].astype(np.int64)
            secs = words[offsets + 8].astype(np.int64)
        else:
            uptime = _MINUS_ONE
            secs = words[offsets + 4].astype(np.int64)
        rates, inits = self._contexts(queued, taken)
        out: list[PreparedGroup] = []
        candidates = len(call.candidates)
        for parts in holders.values():
            template = parts[0][1].template
            # Records of the template per candidate, and where each
            # candidate's record table starts in the joined tables.
            per = np.zeros(candidates + 1, dtype=np.int64)
            first = np.zeros(candidates + 1, dtype=np.int64)
            tables = [group.record_table() for _, group in parts]
            at = 0
            for (candidate, group), _ in zip(parts, tables, strict=True):
                per[candidate] = group.records
                first[candidate] = at
                at += group.records
            record_offsets = np.concatenate([t[0] for t in tables])
            record_positions = np.concatenate([t[1] for t in tables])
            k = per[taken]
            total = int(k.sum())
            if not total:
                continue
            # Index of each record in the joined tables.
            before = np.cumsum(k) - k
            index = np.repeat(first[taken] - before, k) + np.arange(total)
            byte_at = np.repeat(offsets, k) + record_offsets[index]
            width = template.record_length
            every = np.ndarray(
                buffer=call.data,
                dtype=f"V{width}",
                shape=(len(call.data) - width + 1,),
                strides=(1,),
            )
            view = np.frombuffer(every[byte_at], dtype=template.layout.dtype)
            rep_secs = np.repeat(secs, k)
            columns = [
                rep_secs,
                uptime if uptime.ndim == 0 else np.repeat(uptime, k),
                rep_secs * 1000,
                _MINUS_ONE
                if v9
                else (inits if inits.ndim == 0 else np.repeat(inits, k)),
                rates if rates.ndim == 0 else np.repeat(rates, k),
            ]
            plan = call.candidates[parts[0][0]][0]
            out.append(
                PreparedGroup(
                    layout=template.layout,
                    exporter=plan.exporter,
                    port=plan.port,
                    domain=template.key[3],
                    proto=call.proto,
                    view=view,
                    columns=columns,
                    counts=np.ones(total, dtype=np.int64),
                    starts=np.repeat(starts, k) + record_positions[index],
                )
            )
        return out

    def _contexts(
        self, queued: np.ndarray, taken: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rate, init) of the queued datagrams: 0-d when alike, else one
        value per datagram."""
        marks = self.marks
        values = {m[1:] for ms in marks.values() for m in ms}
        if len(values) == 1:
            rate, init = next(iter(values))
            return np.array(rate, dtype=np.int64), np.array(init, dtype=np.int64)
        rates = np.zeros(len(queued), dtype=np.int64)
        inits = np.zeros(len(queued), dtype=np.int64)
        for candidate, ms in marks.items():
            where = np.flatnonzero(taken == candidate)
            at = np.searchsorted([m[0] for m in ms], queued[where], side="right") - 1
            rates[where] = np.array([m[1] for m in ms], dtype=np.int64)[at]
            inits[where] = np.array([m[2] for m in ms], dtype=np.int64)[at]
        return rates, inits

    def _by_plan(self, batch: RecordBatch, queued: np.ndarray) -> None:
        """:meth:`read` plan by plan, each from its byte matrix."""
        call = self.call
        several = len(self.marks) > 1
        for candidate, marks in self.marks.items():
            plan, matrix = call.candidates[candidate]
            if not plan.records:
                continue
            rows = queued[call.taken[queued] == candidate] if several else queued
            starts = call.before[rows] + call.base[rows]
            try:
                # Rows are matched in order, each once: as many as the
                # matrix holds is the matrix itself.
                taken = (
                    matrix if len(rows) == matrix.shape[0] else matrix[call.local[rows]]
                )
                if len(marks) == 1:
                    rates = np.array(marks[0][1], dtype=np.int64)
                    inits = np.array(marks[0][2], dtype=np.int64)
                else:
                    at = np.searchsorted([m[0] for m in marks], rows, side="right") - 1
                    rates = np.array([m[1] for m in marks], dtype=np.int64)[at]
                    inits = np.array([m[2] for m in marks], dtype=np.int64)[at]
                read_rows(plan, call.proto, batch, taken, starts, rates, inits)
            except Exception:
                counters = call.owners[candidate]
                counters.errors["decoder_bug"] += 1
                counters.records -= plan.records * len(rows)
                for _, _, count, prefix in plan.steps:
                    batch.lost(
                        plan.exporter,
                        plan.port,
                        np.full(len(rows), count, dtype=np.int64),
                        starts + prefix,
                    )
        self.runs = []
        self.marks = {}
