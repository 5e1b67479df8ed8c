"""NetFlow v9 / IPFIX templates, the bounded template cache and held data.

Templates are keyed by (exporter address, exporter port, version, source id
or observation domain, template id): the same template id from two
exporters, two ports of one exporter, or two domains are different
templates.  A template that arrives again replaces the old one (exporters
restart and may redefine ids).

Data sets whose template is not known yet are *held* in a
:class:`PendingStore` and decoded when the template arrives.  The store is
bounded in data sets, bytes and age; whatever it drops is returned to the
caller to be counted (``pending_expired``), never dropped silently.  Held
data is counted in data sets, not records: how many records a set holds
is unknown until its template arrives.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence, ValuesView
from dataclasses import dataclass, field

from edge_agent.flows.fields import VARLEN, FieldSpec, Layout, compile_layout

#: (exporter address (16 bytes), exporter port, version, domain, template id)
TemplateKey = tuple[bytes, int, int, int, int]
#: (exporter address, exporter port, version, domain)
DomainKey = tuple[bytes, int, int, int]


@dataclass(eq=False, slots=True)
class Template:
    """A compiled data or options template.

    For a fixed-length template ``record_length`` is the record size and
    ``layout`` reads records in place.  For a template with variable-length
    fields, records are first copied into a projection that keeps only the
    fixed-length fields (``segments`` says how: a positive number is a run of
    fixed bytes, 0 a variable-length field), ``record_length`` is the
    smallest possible record and ``layout`` reads the projection.
    """

    key: TemplateKey
    fields: tuple[FieldSpec, ...]
    is_options: bool
    scope_count: int
    varlen: bool
    record_length: int
    layout: Layout
    segments: tuple[int, ...] = ()
    projected_length: int = 0
    #: the template record as sent (a re-send with the same bytes is a no-op)
    raw: bytes = b""
    #: batch group of this template's records: (layout, exporter, port, domain)
    group_key: tuple[Layout, bytes, int, int] | None = None
    #: fixed-length data template: its sets take the walkers' fast path
    fast: bool = False
    #: options templates: the last records read and what they announced,
    #: (bytes, system init time or None, init time invalid, ((sampler id,
    #: rate), ...)), so that the periodic re-send is not read again
    options_seen: tuple[bytes, int | None, bool, tuple[tuple[int, int], ...]] | None = (
        None
    )

    def __post_init__(self) -> None:
        self.group_key = (self.layout, self.key[0], self.key[1], self.key[3])
        self.fast = not self.varlen and not self.is_options and self.record_length > 0


class TemplateError(ValueError):
    """A template record that cannot be used; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def compile_template(
    key: TemplateKey,
    fields: Sequence[FieldSpec],
    *,
    is_options: bool = False,
    scope_count: int = 0,
    max_fields: int = 512,
    raw: bytes = b"",
) -> Template:
    """Check and compile a template; raise :class:`TemplateError` if unusable.

    Reasons: ``template_empty`` (no fields), ``template_too_many_fields``
    (more than ``max_fields``), ``template_zero_length_field`` (a field of
    length 0), ``template_record_too_long`` (a record could never fit in a
    datagram).
    """
    if not fields:
        raise TemplateError("template_empty", f"template {key[4]} has no fields")
    if len(fields) > max_fields:
        raise TemplateError(
            "template_too_many_fields",
            f"template {key[4]} has {len(fields)} fields, at most {max_fields}",
        )
    varlen = False
    fixed = 0
    segments: list[int] = []
    for spec in fields:
        if spec.length == 0:
            raise TemplateError(
                "template_zero_length_field",
                f"template {key[4]} field {spec.ie} has length 0",
            )
        if spec.length == VARLEN:
            varlen = True
            segments.append(0)
        else:
            fixed += spec.length
            if segments and segments[-1] > 0:
                segments[-1] += spec.length
            else:
                segments.append(spec.length)
    minimum = fixed + sum(1 for s in segments if s == 0)
    if minimum > 65535:
        raise TemplateError(
            "template_record_too_long", f"template {key[4]} records are {minimum} B"
        )
    if not varlen:
        return Template(
            key=key,
            fields=tuple(fields),
            is_options=is_options,
            scope_count=scope_count,
            varlen=False,
            record_length=fixed,
            layout=compile_layout(fields, fixed),
            raw=raw,
        )
    fixed_fields = [s for s in fields if s.length != VARLEN]
    return Template(
        key=key,
        fields=tuple(fields),
        is_options=is_options,
        scope_count=scope_count,
        varlen=True,
        record_length=minimum,
        layout=compile_layout(fixed_fields, fixed),
        segments=tuple(segments),
        projected_length=fixed,
        raw=raw,
    )


def split_varlen(
    template: Template, body: bytes | memoryview
) -> tuple[bytes, int, bool]:
    """Copy the fixed fields of each variable-length record into one buffer.

    Returns (projection, record count, overrun).  ``overrun`` is True when a
    length prefix points past the set; the partial record is dropped.
    Bytes after the last record that are shorter than the smallest record
    are set padding.
    """
    out = bytearray()
    count = 0
    pos = 0
    end = len(body)
    minimum = template.record_length
    segments = template.segments
    while end - pos >= minimum > 0:
        start = len(out)
        for seg in segments:
            if seg:
                if pos + seg > end:
                    del out[start:]
                    return bytes(out), count, True
                out += body[pos : pos + seg]
                pos += seg
            else:
                if pos >= end:
                    del out[start:]
                    return bytes(out), count, True
                length = body[pos]
                pos += 1
                if length == 255:
                    if pos + 2 > end:
                        del out[start:]
                        return bytes(out), count, True
                    length = (body[pos] << 8) | body[pos + 1]
                    pos += 2
                pos += length
                if pos > end:
                    del out[start:]
                    return bytes(out), count, True
        count += 1
    return bytes(out), count, False


class TemplateCache:
    """Templates by key, bounded per exporter and in exporters.

    ``put`` returns a reason string when it refuses a template:
    ``template_limit`` (the exporter already has ``max_per_exporter``
    templates) or ``template_exporter_limit`` (``max_exporters`` exporters
    already have templates).
    """

    def __init__(self, max_per_exporter: int, max_exporters: int) -> None:
        self.max_per_exporter = max_per_exporter
        self.max_exporters = max_exporters
        self.templates: dict[TemplateKey, Template] = {}
        #: the templates of each domain by template id (walkers look a
        #: datagram's domain up once, then each set by its id)
        self.by_domain: dict[DomainKey, dict[int, Template]] = {}
        self.per_exporter: collections.Counter[tuple[bytes, int]] = (
            collections.Counter()
        )
        #: bumped whenever a template is added, replaced or withdrawn: what
        #: was looked up at generation g holds while it is still g
        self.generation = 0

    def get(self, key: TemplateKey) -> Template | None:
        """Return the template for ``key``, or None."""
        return self.templates.get(key)

    def put(self, template: Template) -> str | None:
        """Add or replace a template; return a reject reason or None."""
        key = template.key
        exporter = (key[0], key[1])
        if key not in self.templates:
            count = self.per_exporter.get(exporter, 0)
            if count == 0 and len(self.per_exporter) >= self.max_exporters:
                return "template_exporter_limit"
            if count >= self.max_per_exporter:
                return "template_limit"
            self.per_exporter[exporter] = count + 1
        self.templates[key] = template
        self.generation += 1
        self.by_domain.setdefault(key[:4], {})[key[4]] = template
        return None

    def withdraw(self, key: TemplateKey) -> bool:
        """Forget one template; return whether it was known."""
        if self.templates.pop(key, None) is None:
            return False
        self.generation += 1
        exporter = (key[0], key[1])
        self.per_exporter[exporter] -= 1
        if self.per_exporter[exporter] <= 0:
            del self.per_exporter[exporter]
        ids = self.by_domain.get(key[:4])
        if ids is not None:
            ids.pop(key[4], None)
            if not ids:
                del self.by_domain[key[:4]]
        return True

    def withdraw_all(self, domain: DomainKey, options: bool) -> int:
        """Forget every data (or every options) template of a domain."""
        removed = 0
        for template_id in sorted(self.by_domain.get(domain, ())):
            key = (*domain, template_id)
            template = self.templates.get(key)
            if template is not None and template.is_options == options:
                self.withdraw(key)
                removed += 1
        return removed

    def count(self, exporter: bytes, port: int) -> int:
        """Number of templates currently known for one exporter."""
        return self.per_exporter.get((exporter, port), 0)


@dataclass(eq=False, slots=True)
class HeldSet:
    """A data set kept until its template arrives.

    ``context`` is what the datagram header said (unix seconds, sysUptime
    ms or -1, export time ms, IPFIX init time ms or -1); ``received_ms`` is
    when it arrived (for the age bound).
    """

    key: TemplateKey
    body: bytes
    context: tuple[int, int, int, int]
    received_ms: int
    ident: int = 0
    #: True while the set is in a store
    live: bool = True


@dataclass
class PendingStore:
    """Held data sets, bounded by count, bytes and age (oldest dropped first).

    Held sets are kept in arrival order in an ordered dict keyed by a serial
    number, so a release removes its sets in O(1) and the store never keeps
    more entries than live sets (:attr:`queue` iterates them, oldest first);
    ``by_key`` has the sets waiting for each template, oldest first.
    ``hold``, ``expire`` and ``release`` return the sets they take out so
    the caller can count them per exporter.
    """

    max_sets: int
    max_bytes: int
    max_age_ms: int
    _entries: collections.OrderedDict[int, HeldSet] = field(
        default_factory=collections.OrderedDict
    )
    by_key: dict[TemplateKey, collections.deque[HeldSet]] = field(default_factory=dict)
    sets: int = 0
    bytes: int = 0
    _serial: int = 0

    @property
    def queue(self) -> ValuesView[HeldSet]:
        """The held sets, oldest first (a live view)."""
        return self._entries.values()

    def oldest(self) -> HeldSet | None:
        """The set held longest, or None."""
        return next(iter(self._entries.values()), None)

    def _pop_oldest(self) -> HeldSet:
        _, held = self._entries.popitem(last=False)
        held.live = False
        waiting = self.by_key[held.key]
        # Global order is arrival order, so it is also the oldest of its key.
        waiting.popleft()
        if not waiting:
            del self.by_key[held.key]
        self.sets -= 1
        self.bytes -= len(held.body)
        return held

    def hold(self, held: HeldSet) -> list[HeldSet]:
        """Keep a set; return the sets dropped to make room (maybe itself)."""
        if len(held.body) > self.max_bytes or self.max_sets == 0:
            held.live = False
            return [held]
        dropped: list[HeldSet] = []
        while self._entries and (
            self.sets >= self.max_sets or self.bytes + len(held.body) > self.max_bytes
        ):
            dropped.append(self._pop_oldest())
        self._serial += 1
        held.ident = self._serial
        held.live = True
        self._entries[held.ident] = held
        self.by_key.setdefault(held.key, collections.deque()).append(held)
        self.sets += 1
        self.bytes += len(held.body)
        return dropped

    def release(self, key: TemplateKey) -> list[HeldSet]:
        """Take out every set waiting for ``key``, in arrival order."""
        waiting = self.by_key.pop(key, None)
        if not waiting:
            return []
        for held in waiting:
            del self._entries[held.ident]
            held.live = False
            self.sets -= 1
            self.bytes -= len(held.body)
        return list(waiting)

    def expire(self, now_ms: int) -> list[HeldSet]:
        """Take out every set older than ``max_age_ms`` at ``now_ms``."""
        dropped: list[HeldSet] = []
        limit = now_ms - self.max_age_ms
        while self._entries:
            held = next(iter(self._entries.values()))
            if held.received_ms >= limit:
                break
            dropped.append(self._pop_oldest())
        return dropped
