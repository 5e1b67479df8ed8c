"""IPFIX (RFC 7011) message walking.

A datagram usually holds one message; some exporters send several back to
back, and each is decoded (its own header, sequence number and domain).
Message lengths are checked strictly against the datagram: a message
claiming more bytes than arrived is rejected
(``message_length_beyond_datagram``), bytes after the last message that
do not start another are ignored (``datagram_longer_than_message``).
Enterprise-specific fields are skipped by their length; variable-length
fields use the 1-byte or 3-byte (255 + u16) length prefix.  A template
record with field count 0 withdraws its template; template id 2 (set 2)
or 3 (set 3) with count 0 withdraws every data or options template of the
domain.

Error reasons beyond those of :mod:`edge_agent.flows.netflow_v9`:
``message_length_too_small``, ``message_length_beyond_datagram``,
``datagram_longer_than_message``, ``set_beyond_message``,
``options_template_no_scope``, ``withdrawal_unknown_template``.
"""

from __future__ import annotations

import struct

import numpy as np

from edge_agent.flows.counters import ExporterCounters
from edge_agent.flows.fields import FieldSpec, RecordBatch
from edge_agent.flows.netflow_v9 import (
    NO_TEMPLATES,
    SET_HEADER,
    Export,
    RunTables,
    TemplatedDecoder,
)
from edge_agent.flows.plans import BulkCall
from edge_agent.flows.schema import ExportProtocol
from edge_agent.flows.templates import Template, TemplateKey

IPFIX_HEADER = struct.Struct(">HHIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_VERSION = b"\x00\x0a"


class IpfixDecoder(TemplatedDecoder):
    """Walk IPFIX messages."""

    PROTO = ExportProtocol.IPFIX
    SEQ_OFFSET = 8

    def _sequences(self, i: int, j: int, call: BulkCall, tables: RunTables) -> None:
        """Each stream's datagrams of ``i:j`` through
        :meth:`SequenceTracker.check_run`, streams in order of first
        appearance (streams are independent; each keeps its order)."""
        tracker = self.sequences
        seqs = tables.seq_array
        units = tables.unit_array
        keys = tables.stream_keys
        owners = tables.stream_counters
        if tables.switches[j - 1] == tables.switches[i]:
            number = int(tables.stream[i])
            tracker.check_run(
                tracker.stream(keys[number]), seqs[i:j], units[i:j], owners[number]
            )
            return
        stream = tables.stream[i:j]
        present, first = np.unique(stream, return_index=True)
        order = present[np.argsort(first)].tolist()
        if len(tracker.streams) + len(order) > tracker.max_streams:
            # New streams could push out ones of this run: one by one, in
            # arrival order, as the walks would.
            check = tracker.check
            for k, number in enumerate(stream.tolist(), i):
                check(keys[number], int(seqs[k]), int(units[k]), owners[number])
            return
        for number in order:
            where = np.flatnonzero(stream == number) + i
            tracker.check_run(
                tracker.stream(keys[number]), seqs[where], units[where], owners[number]
            )

    def walk(  # noqa: PLR0917 - once per datagram: positional is cheaper
        self,
        payload: bytes,
        exporter: bytes,
        port: int,
        received_ms: int,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        """Decode one IPFIX datagram (the version is already checked)."""
        size = len(payload)
        plan_key = (exporter, port, size)
        plan = self.plans.get(plan_key)
        while plan is not None:
            # A layout seen before: length, export time, sequence, then what
            # the plan must find (domain, every set id and length).
            values = plan.unpack(payload)
            if values[3:] != plan.sig:
                plan = plan.next
                continue
            if (
                values[0] == size
                and (
                    plan.generation == self.templates.generation
                    or self._holds(plan, plan_key)
                )
                and (not plan.resends or plan.resent(payload))
            ):
                if plan.options_before:
                    self._announce(plan.options_before, payload, counters, batch)
                # SequenceTracker.check's in-order case in line.
                seq = values[2]
                stream = self.sequences.streams.get(plan.domain_key)
                if stream is not None and stream.expected == seq:
                    stream.expected = (seq + plan.sequence_units) & 0xFFFFFFFF
                    stream.last_seq = seq
                else:
                    self.sequences.check(
                        plan.domain_key, seq, plan.sequence_units, counters
                    )
                payloads = plan.payloads
                if (
                    payloads
                    and plan.rate_generation == self.sampling.generation
                    and plan.context_generation == self.init_generation
                ):
                    # _queue's usual case in line: more of a plan already
                    # queued, rate and init time unchanged.
                    planned = plan.records
                    counters.records += planned
                    counters.templates_received += plan.templates_received
                    payloads.append(payload)
                    plan.starts.append(batch.total)
                    batch.total += planned
                else:
                    self._queue(plan, payload, counters, batch)
                if plan.options_after:
                    self._announce(plan.options_after, payload, counters, batch)
                return
            break
        if size < 16:
            counters.errors["truncated_header"] += 1
            return
        _, length, export_time, seq, domain = IPFIX_HEADER.unpack_from(payload)
        if length < 16:
            counters.errors["message_length_too_small"] += 1
            return
        if length > size:
            counters.errors["message_length_beyond_datagram"] += 1
            return
        if length < size:
            if size - length >= 16 and payload[length : length + 2] == _VERSION:
                self._walk_messages(
                    payload, exporter, port, received_ms, counters, batch
                )
                return
            counters.errors["datagram_longer_than_message"] += 1
            size = length
        header = (export_time, -1, export_time * 1000, -1)
        # Built only when a set leaves the fast path.
        export: Export | None = None
        domain_key = (exporter, port, 10, domain)
        by_id = self.templates.by_domain.get(domain_key) or NO_TEMPLATES
        unpack_set = SET_HEADER.unpack_from
        add = batch.add
        context: tuple[int, int, int, int, int] | None = None
        pos = 16
        records: int | None = 0
        # What a plan of this layout needs (None once a set leaves the
        # fast paths): (offset, length, set id, template, records) per set
        # and the template sets as (body offset, bytes, set id).
        sets: list[tuple[int, int, int, Template | None, int]] | None = (
            [] if length == len(payload) else None
        )
        resends: list[tuple[int, bytes, int]] = []
        while size - pos >= 4:
            set_id, set_length = unpack_set(payload, pos)
            if set_length < 4:
                counters.errors["set_too_short"] += 1
                sets = None
                break
            if set_length > size - pos:
                counters.errors["set_beyond_message"] += 1
                sets = None
                break
            if set_id >= 256:
                template = by_id.get(set_id)
                count: int | None
                if template is not None and template.fast:
                    width = template.record_length
                    count = (set_length - 4) // width
                    if count:
                        if context is None:
                            rate = self.sampling.lookup(exporter, domain, 0)
                            init = self.init_times.get((exporter, port, domain), -1)
                            context = (export_time, -1, export_time * 1000, init, rate)
                        assert template.group_key is not None
                        add(
                            template.group_key,
                            ExportProtocol.IPFIX,
                            payload[pos + 4 : pos + 4 + count * width],
                            count,
                            context,
                        )
                        counters.records += count
                    if sets is not None:
                        sets.append((pos, set_length, set_id, template, count))
                else:
                    if (
                        sets is not None
                        and template is not None
                        and template.is_options
                        and not template.varlen
                        and template.record_length
                    ):
                        count = (set_length - 4) // template.record_length
                        sets.append((pos, set_length, set_id, template, count))
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
                    body = memoryview(payload)[pos + 4 : pos + set_length]
                    count = self.data_set((*domain_key, set_id), body, export)
                    context = None  # options data may have changed the rate
                if count is None or records is None:
                    records = None
                else:
                    records += count
            elif set_id in (2, 3):
                set_key = (*domain_key, set_id)
                raw = payload[pos + 4 : pos + set_length]
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
                    body = memoryview(payload)[pos + 4 : pos + set_length]
                    keys = self._templates(body, set_id == 3, export)
                    self.remember_set(
                        set_key, raw, keys, counters.errors.total() == errors
                    )
                    by_id = self.templates.by_domain.get(domain_key) or NO_TEMPLATES
                    context = None
                if sets is not None:
                    sets.append((pos, set_length, set_id, None, 0))
                    resends.append((pos + 4, raw, set_id))
            else:
                counters.errors["reserved_set_id"] += 1
                sets = None
            pos += set_length
        if pos < size:
            counters.errors["trailing_bytes"] += 1
            sets = None
        self.sequences.check(domain_key, seq, records, counters)
        if sets:
            self._remember_plan(exporter, port, domain, size, sets, resends, payload)

    def _walk_messages(  # noqa: PLR0917 - same arguments as walk
        self,
        payload: bytes,
        exporter: bytes,
        port: int,
        received_ms: int,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        """Decode a datagram of several messages, one after the other."""
        size = len(payload)
        offset = 0
        while offset < size:
            left = size - offset
            if left < 16 or payload[offset : offset + 2] != _VERSION:
                counters.errors["datagram_longer_than_message"] += 1
                return
            (length,) = _U16.unpack_from(payload, offset + 2)
            if length < 16:
                counters.errors["message_length_too_small"] += 1
                return
            if length > left:
                counters.errors["message_length_beyond_datagram"] += 1
                return
            # Each message on its own is what walk() takes (and plans key).
            self.walk(
                payload[offset : offset + length],
                exporter,
                port,
                received_ms,
                counters,
                batch,
            )
            offset += length

    def _templates(
        self, body: memoryview, options: bool, export: Export
    ) -> list[TemplateKey] | None:
        """Read a template set; return the keys of the templates it holds
        (None when it also withdrew templates)."""
        counters = export.counters
        exporter = export.exporter
        port = export.port
        pos = 0
        size = len(body)
        domain_key = (exporter, port, 10, export.domain)
        keys: list[TemplateKey] | None = []
        while size - pos >= 4:
            template_id, count = SET_HEADER.unpack_from(body, pos)
            if count and template_id >= 256:
                key = (*domain_key, template_id)
                old = self.templates.get(key)
                if old is not None and body[pos : pos + len(old.raw)] == old.raw:
                    # The periodic re-send of a known template.
                    counters.templates_received += 1
                    pos += len(old.raw)
                    if keys is not None:
                        keys.append(key)
                    continue
            start = pos
            pos += 4
            if count == 0:
                if template_id == (3 if options else 2):
                    keys = None  # a withdrawal: not a re-send to skip
                    removed = self.templates.withdraw_all(domain_key, options)
                    counters.templates_withdrawn += removed
                    counters.templates = self.templates.count(exporter, port)
                elif template_id >= 256:
                    keys = None
                    self.withdraw((*domain_key, template_id), counters)
                elif any(body[pos - 4 :]):
                    counters.errors["template_id_reserved"] += 1
                    return keys
                else:
                    return keys  # padding
                continue
            if template_id < 256:
                counters.errors["template_id_reserved"] += 1
                return keys
            scope_count = 0
            if options:
                if size - pos < 2:
                    counters.errors["template_truncated"] += 1
                    return keys
                (scope_count,) = _U16.unpack_from(body, pos)
                pos += 2
                if scope_count == 0 or scope_count > count:
                    counters.errors["options_template_no_scope"] += 1
                    return keys
            if count > self.max_template_fields:
                counters.errors["template_too_many_fields"] += 1
                return keys
            specs: list[FieldSpec] = []
            for _ in range(count):
                if size - pos < 4:
                    counters.errors["template_truncated"] += 1
                    return keys
                element, field_length = SET_HEADER.unpack_from(body, pos)
                pos += 4
                pen = 0
                if element & 0x8000:
                    if size - pos < 4:
                        counters.errors["template_truncated"] += 1
                        return keys
                    (pen,) = _U32.unpack_from(body, pos)
                    pos += 4
                    element &= 0x7FFF
                specs.append(FieldSpec(element, field_length, pen))
            counters.templates_received += 1
            if keys is not None:
                keys.append((*domain_key, template_id))
            self.learn(
                (*domain_key, template_id),
                specs,
                export,
                is_options=options,
                scope_count=scope_count,
                raw=bytes(body[start:pos]),
            )
        return keys
