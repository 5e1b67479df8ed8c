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

Speed: the datagrams of one exporter socket that share the header's last
four bytes (engine type, engine id, sampling) are queued as a *run* while
a batch is read, paying a few Python operations each; when the batch
settles, a run's headers and records are read with numpy in one pass
(sequence numbers checked as one vector, records cut out of the joined
datagrams as 24-byte units).  What must happen in arrival order happens
when a datagram arrives: sampling announcements (a new header tail starts
a new run), the rate lookup (redone only when the sampling table changed)
and the reservation of the records' output positions.

:meth:`NetflowV5Decoder.queue_many` takes a run of consecutive v5
datagrams from the front door's pre-pass with their headers already read
as one array: when no datagram changes its socket's header tail or
announces a new interval, only each socket's first datagram is queued as
above and the others join its run in bulk, with positions reserved in
arrival order; a run that is the whole batch keeps the batch's joined
bytes, so reading it joins nothing again.  Runs of many exporters
interleaved gain little: each exporter's records are still read and
built as a group of its own.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence

import numpy as np
import structlog

from edge_agent.flows.counters import ExporterCounters
from edge_agent.flows.fields import (
    FieldSpec,
    PreparedGroup,
    RecordBatch,
    compile_layout,
)
from edge_agent.flows.sampling import SamplingTable
from edge_agent.flows.schema import ExportProtocol
from edge_agent.flows.sequence import SequenceTracker, StreamState

log = structlog.get_logger(__name__)

V5_HEADER = struct.Struct(">HHIIIIBBH")
#: The v5 header with engine type and id read as one word (the domain).
_V5_HEADER_DOMAIN = struct.Struct(">HHIIIIHH")
#: The header fields a run reads as a vector, one 24-byte unit each.
_V5_HEADER_DTYPE = np.dtype(
    {
        "names": ["uptime", "secs", "seq"],
        "formats": [">u4", ">u4", ">u4"],
        "offsets": [4, 8, 16],
        "itemsize": 24,
    }
)
#: A v5 datagram's header as one 24-byte unit (``tail``: engine type,
#: engine id and sampling, the bytes a run shares).
V5_HEADER_UNIT = np.dtype(
    {
        "names": ["version", "count", "uptime", "secs", "seq", "tail"],
        "formats": [">u2", ">u2", ">u4", ">u4", ">u4", ">u4"],
        "offsets": [0, 2, 4, 8, 16, 20],
        "itemsize": 24,
    }
)
#: A regular v5 datagram is a whole number of these: a header is one, a
#: record two.
V5_UNIT = np.dtype("V24")
_UNIT = V5_UNIT
_MASK = 0xFFFFFFFF
#: Runs shorter than this are read datagram by datagram: the vector pass
#: costs a few dozen numpy calls whatever its length.
_VECTOR_RUN = 12
_NO_INIT = np.array(-1, dtype=np.int64)
#: Log at most one ``decoder_bug`` event per this many occurrences.
_BUG_LOG_EVERY = 1000
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


class _Block:
    """What :meth:`NetflowV5Decoder.queue_many` already knows of a run that
    is exactly the datagrams it was given: the datagrams joined as 24-byte
    units, the index of each one's header unit, the headers, the record
    counts and the number of datagrams."""

    __slots__ = ("counts", "header", "heads", "size", "units")

    def __init__(
        self,
        units: np.ndarray,
        heads: np.ndarray,
        header: np.ndarray,
        counts: np.ndarray,
        size: int,
    ) -> None:
        self.units = units
        self.heads = heads
        self.header = header
        self.counts = counts
        self.size = size


class _Run:
    """Queued v5 datagrams of one exporter socket with one header tail.

    ``marks`` lists (index of the first datagram, rate) each time the rate
    looked up for the run changed; ``regular`` is False once a datagram's
    size is not 24 + 48 x its header count.
    """

    __slots__ = (
        "block",
        "counters",
        "domain",
        "exporter",
        "generation",
        "marks",
        "payloads",
        "port",
        "rate",
        "regular",
        "starts",
        "stream",
        "tail",
    )

    def __init__(
        self,
        *,
        exporter: bytes,
        port: int,
        domain: int,
        tail: bytes | None,
        counters: ExporterCounters,
        stream: StreamState,
        rate: int,
        generation: int,
    ) -> None:
        self.exporter = exporter
        self.port = port
        self.domain = domain
        self.tail = tail
        self.counters = counters
        self.stream = stream
        self.rate = rate
        self.generation = generation
        self.marks: list[tuple[int, int]] = [(0, rate)]
        self.payloads: list[bytes] = []
        self.starts: list[int] = []
        self.regular = True
        #: set when the run is exactly one queue_many call's datagrams
        self.block: _Block | None = None


class NetflowV5Decoder:
    """Walk v1/v5 headers and queue their records on a :class:`RecordBatch`.

    Error reasons: ``truncated_header`` (shorter than the header),
    ``count_exceeds_datagram`` (the header count promises more records
    than the bytes hold: the records that fit are decoded),
    ``datagram_longer_than_count`` (bytes after the counted records:
    ignored).

    Use: :meth:`bind` a batch, :meth:`queue` each v1/v5 datagram, and the
    batch reads the queued runs when it settles.
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
        #: runs of the bound batch, by (exporter, port)
        #: (the front door reads it for the batch's hot path: a run is
        #: taken out or the dict emptied, never replaced, while bound)
        self.runs: dict[tuple[bytes, int], _Run] = {}
        self._batch: RecordBatch | None = None
        self._bugs = 0

    def bind(self, batch: RecordBatch) -> None:
        """Queue into ``batch`` from now on (runs of an earlier batch that
        was never built are dropped with it)."""
        self.runs = {}
        self._batch = batch
        batch.on_settle(self._flush)

    def queue(
        self,
        payload: bytes,
        key: tuple[bytes, int],
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        """Queue one v5 datagram from ``key`` = (exporter, port).

        The version is already checked; ``batch`` is the bound one.
        """
        run = self.runs.get(key)
        if run is None or run.tail != payload[20:24]:
            self._start(payload, key, counters, batch)
            return
        # The hot path: same socket, same engine and sampling as the last
        # datagram of the run.
        size = len(payload)
        count = payload[2] << 8 | payload[3]
        if count * 48 + 24 != size:
            count = self._irregular(run, size, count)
        if run.generation != self.sampling.generation:
            self._lookup(run)
        run.payloads.append(payload)
        run.starts.append(batch.total)
        batch.total += count
        counters.records += count

    def queue_many(  # noqa: PLR0917 - one call per run of v5 datagrams
        self,
        payloads: Sequence[bytes],
        header: np.ndarray,
        sizes: np.ndarray,
        ids: np.ndarray | None,
        keys: Sequence[tuple[bytes, int]],
        counters: Sequence[ExporterCounters],
        batch: RecordBatch,
        joined: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Queue consecutive v5 datagrams of one or more sockets.

        The same effect as :meth:`queue` on each in order.  ``header`` is
        each datagram's first 24 bytes as :data:`V5_HEADER_UNIT` (every
        datagram has at least 24), ``sizes`` their lengths, ``ids`` their
        socket numbers (None: all socket 0): socket ``i`` is ``keys[i]`` =
        (exporter, port) with ``counters[i]``, whose datagrams and bytes
        are already counted.  ``joined`` is (the datagrams joined, as
        24-byte units; each one's first unit) if the caller has it.

        When every datagram is regular (24 + 48 x count bytes), keeps its
        socket's header tail through the call, and nothing in it announces
        a new sampling interval, only each socket's first datagram goes
        through :meth:`queue`; the others join its run in bulk, at output
        positions reserved in arrival order.  Otherwise each is queued in
        turn.
        """
        try:
            plan = self._plan(header, sizes, ids, keys)
        except Exception:  # a bug: each datagram in turn, as queue() does
            self._log_bug(keys[0][1])
            plan = None
        if plan is None:
            self._queue_each(payloads, ids, keys, counters, batch)
            return
        groups, counts = plan
        n = len(payloads)
        if len(groups) > 1:
            joined = None
        base = batch.total
        ends = np.cumsum(counts)
        starts = (ends - counts + base).tolist()
        counts_list = counts.tolist() if len(groups) > 1 else []
        runs = self.runs
        for number, members in groups:
            key = keys[number]
            count = counters[number]
            first = members[0]
            self._queue_at(payloads[first], key, count, batch, starts[first])
            run = runs.get(key)
            if len(members) == 1:
                continue
            if run is None or run.tail != payloads[first][20:24]:
                # Not expected (the checks above rule it out): one by one.
                for i in members[1:]:
                    self._queue_at(payloads[i], key, count, batch, starts[i])
                continue
            if type(members) is range:
                if joined is not None and len(run.payloads) == 1:
                    # The run is exactly these datagrams: its read can
                    # reuse the joined units and headers.
                    run.block = _Block(joined[0], joined[1], header, counts, n)
                run.payloads += payloads[1:]
                run.starts += starts[1:]
                count.records += int(ends[-1] - ends[0])
            else:
                rest = members[1:]
                run.payloads += [payloads[i] for i in rest]
                run.starts += [starts[i] for i in rest]
                count.records += sum([counts_list[i] for i in rest])
        batch.total = base + int(ends[-1])

    def _plan(
        self,
        header: np.ndarray,
        sizes: np.ndarray,
        ids: np.ndarray | None,
        keys: Sequence[tuple[bytes, int]],
    ) -> tuple[list[tuple[int, range | list[int]]], np.ndarray] | None:
        """Group :meth:`queue_many`'s datagrams by socket, in order of each
        socket's first datagram, with their record counts; None when they
        must be queued one by one (see there)."""
        counts = header["count"].astype(np.int64)
        n = len(sizes)
        tails = header["tail"]
        groups: list[tuple[int, range | list[int]]]
        if ids is None or not np.count_nonzero(ids != ids[0]):
            groups = [(0 if ids is None else int(ids[0]), range(n))]
            irregular = (counts * RECORD_LENGTH + 24 != sizes) | (tails != tails[0])
            if np.count_nonzero(irregular):
                return None
        else:
            if np.count_nonzero(counts * RECORD_LENGTH + 24 != sizes):
                return None
            order = np.argsort(ids, kind="stable")
            ordered = ids[order]
            firsts = np.flatnonzero(np.diff(ordered, prepend=-1))
            spans = np.diff(firsts, append=n)
            if np.count_nonzero(tails[order] != np.repeat(tails[order[firsts]], spans)):
                return None
            index = order.tolist()
            numbers = ordered[firsts].tolist()
            bounds = [*firsts.tolist(), n]
            groups = [
                (number, index[a:b])
                for number, (a, b) in zip(
                    numbers, itertools.pairwise(bounds), strict=True
                )
            ]
            # Each socket in order of its first datagram, as queue() would
            # meet them (streams and counters are created in that order).
            groups.sort(key=lambda group: group[1][0])
        announced = self._announced
        tails_list = tails.tolist()
        for number, members in groups:
            tail = tails_list[members[0]]
            interval = tail & 0x3FFF
            if interval and announced.get((keys[number][0], tail >> 16)) != interval:
                # An announcement may change other runs and the rates they
                # look up: everything in arrival order.
                return None
        return groups, counts

    def _queue_at(
        self,
        payload: bytes,
        key: tuple[bytes, int],
        counters: ExporterCounters,
        batch: RecordBatch,
        start: int,
    ) -> None:
        """:meth:`queue` one datagram at the output position reserved for it.

        If it raises (a bug), its reserved records are given up as lost
        (counted ``decoder_bug`` when the batch is built) so the output
        has no hole.
        """
        batch.total = start
        try:
            self.queue(payload, key, counters, batch)
        except Exception:
            count = payload[2] << 8 | payload[3]
            counters.records += count
            batch.lost(key[0], key[1], [count], [start])
            self._log_bug(key[1])

    def _queue_each(
        self,
        payloads: Sequence[bytes],
        ids: np.ndarray | None,
        keys: Sequence[tuple[bytes, int]],
        counters: Sequence[ExporterCounters],
        batch: RecordBatch,
    ) -> None:
        """:meth:`queue` each datagram in turn (one that raises, a bug, is
        counted ``decoder_bug`` and the next one queued)."""
        queue = self.queue
        numbers = [0] * len(payloads) if ids is None else ids.tolist()
        for payload, number in zip(payloads, numbers, strict=True):
            try:
                queue(payload, keys[number], counters[number], batch)
            except Exception:
                counters[number].errors["decoder_bug"] += 1
                self._log_bug(keys[number][1])

    def _log_bug(self, port: int) -> None:
        """Log a datagram whose queueing raised, at most once per 1000."""
        self._bugs += 1
        if self._bugs % _BUG_LOG_EVERY == 1:
            log.exception("decoder_bug", exporter_port=port, bugs=self._bugs)

    def _start(
        self,
        payload: bytes,
        key: tuple[bytes, int],
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        """Start a run with a datagram whose header tail is new."""
        old = self.runs.pop(key, None)
        if old is not None:
            # Its sequence numbers come before this datagram's.
            self._flush_run(old, batch)
        exporter, port = key
        size = len(payload)
        if size < 24:
            counters.errors["truncated_header"] += 1
            return
        domain, sampling = _V5_HEADER_DOMAIN.unpack_from(payload)[6:]
        interval = sampling & 0x3FFF
        tail: bytes | None = payload[20:24]
        if interval:
            announced = (exporter, domain)
            if self._announced.get(announced) != interval:
                if len(self._announced) < self.sampling.max_entries:
                    self._announced[announced] = interval
                else:
                    # Every datagram announces again: no run.
                    tail = None
                for other in self.runs.values():
                    if other.domain == domain and other.exporter == exporter:
                        # Another port of this exporter announced its own
                        # interval: its next datagram announces again.
                        other.tail = None
                if batch.deferred and self.sampling.changes(
                    exporter, domain, 0, interval
                ):
                    self.settle(batch)
                self.sampling.announce(exporter, domain, 0, interval)
        rate = self.sampling.lookup(exporter, domain, 0)
        run = _Run(
            exporter=exporter,
            port=port,
            domain=domain,
            tail=tail,
            counters=counters,
            stream=self.sequences.stream((exporter, port, 5, domain)),
            rate=rate,
            generation=self.sampling.generation,
        )
        self.runs[key] = run
        count = payload[2] << 8 | payload[3]
        if count * 48 + 24 != size:
            count = self._irregular(run, size, count)
        run.payloads.append(payload)
        run.starts.append(batch.total)
        batch.total += count
        counters.records += count

    def _irregular(self, run: _Run, size: int, count: int) -> int:
        """Count what is wrong with a datagram's size; return its records."""
        run.regular = False
        fit = (size - 24) // RECORD_LENGTH
        if count > fit:
            run.counters.errors["count_exceeds_datagram"] += 1
            return fit
        if count < fit:
            run.counters.errors["datagram_longer_than_count"] += 1
        return count

    def _lookup(self, run: _Run) -> None:
        """The sampling table changed: look the run's rate up again."""
        run.generation = self.sampling.generation
        rate = self.sampling.lookup(run.exporter, run.domain, 0)
        if rate != run.rate:
            run.rate = rate
            run.marks.append((len(run.payloads), rate))

    def _flush(self) -> None:
        """Read every queued run into the bound batch (it is settling)."""
        if not self.runs:
            return
        # Emptied in place: the front door holds the dict for its batch.
        runs = list(self.runs.values())
        self.runs.clear()
        batch = self._batch
        assert batch is not None
        for run in runs:
            self._flush_run(run, batch)

    def _flush_run(self, run: _Run, batch: RecordBatch) -> None:
        try:
            if run.regular and len(run.payloads) >= _VECTOR_RUN:
                self._read_vector(run, batch)
            else:
                self._read_each(run, batch)
        except Exception:
            # A bug, not bad input: the run's records are dropped, counted.
            run.counters.errors["decoder_bug"] += 1
            counts = [
                min(p[2] << 8 | p[3], (len(p) - 24) // RECORD_LENGTH)
                for p in run.payloads
            ]
            run.counters.records -= sum(counts)
            batch.lost(run.exporter, run.port, counts, run.starts)

    def _rates(self, run: _Run) -> list[int]:
        """The rate of each datagram of a run."""
        rates: list[int] = []
        marks = run.marks
        for (first, rate), (end, _) in zip(
            marks, [*marks[1:], (len(run.payloads), 0)], strict=True
        ):
            rates += [rate] * (end - first)
        return rates

    def _read_each(self, run: _Run, batch: RecordBatch) -> None:
        """Read a short or irregular run datagram by datagram."""
        check = self.sequences.check_stream
        stream = run.stream
        counters = run.counters
        key = (V5_LAYOUT, run.exporter, run.port, run.domain)
        rates = self._rates(run) if len(run.marks) > 1 else None
        rate = run.marks[0][1]
        unpack = V5_HEADER.unpack_from
        for i, (payload, start) in enumerate(
            zip(run.payloads, run.starts, strict=True)
        ):
            _, count, uptime, secs, _, seq, _, _, _ = unpack(payload)
            count = min(count, (len(payload) - 24) // RECORD_LENGTH)
            check(stream, seq, count, counters)
            if count:
                batch.add_at(
                    key,
                    ExportProtocol.NETFLOW_V5,
                    payload[24 : 24 + count * RECORD_LENGTH],
                    count,
                    (
                        secs,
                        uptime,
                        secs * 1000,
                        -1,
                        rate if rates is None else rates[i],
                    ),
                    start=start,
                )

    def _read_vector(self, run: _Run, batch: RecordBatch) -> None:
        """Read a regular run (every datagram 24 + 48 x count bytes) in one
        numpy pass: the joined datagrams are a sequence of 24-byte units, a
        header one unit and a record two."""
        payloads = run.payloads
        n = len(payloads)
        block = run.block
        if block is not None and block.size == n:
            units, heads, header, counts = (
                block.units,
                block.heads,
                block.header,
                block.counts,
            )
        else:
            units = np.frombuffer(b"".join(payloads), dtype=_UNIT)
            sizes = np.fromiter(map(len, payloads), np.int64, n) // 24
            heads = np.cumsum(sizes) - sizes
            counts = (sizes - 1) >> 1
            # frombuffer, not .view(): numpy checks a structured view in
            # Python.
            header = np.frombuffer(units[heads], dtype=_V5_HEADER_DTYPE)
        seqs = header["seq"].astype(np.int64)
        stream = run.stream
        chained = not np.count_nonzero(seqs[1:] != ((seqs[:-1] + counts[:-1]) & _MASK))
        if chained and stream.expected == int(seqs[0]):
            stream.expected = int(seqs[-1] + counts[-1]) & _MASK
            stream.last_seq = int(seqs[-1])
        else:
            self.sequences.check_run(
                stream, seqs, counts.astype(np.int64, copy=False), run.counters
            )
        body = np.ones(units.shape[0], dtype=bool)
        body[heads] = False
        records = np.frombuffer(units[body], dtype=V5_LAYOUT.dtype)
        secs = np.repeat(header["secs"].astype(np.int64), counts)
        if len(run.marks) == 1:
            rate = np.array(run.marks[0][1], dtype=np.int64)
        else:
            rate = np.repeat(np.array(self._rates(run), dtype=np.int64), counts)
        places = self._placement(run, counts, records.shape[0])
        batch.add_prepared(
            PreparedGroup(
                layout=V5_LAYOUT,
                exporter=run.exporter,
                port=run.port,
                domain=run.domain,
                proto=ExportProtocol.NETFLOW_V5,
                view=records,
                columns=[
                    secs,
                    np.repeat(header["uptime"].astype(np.int64), counts),
                    secs * 1000,
                    _NO_INIT,
                    rate,
                ],
                counts=places[0],
                starts=places[1],
            )
        )

    @staticmethod
    def _placement(
        run: _Run, counts: np.ndarray, total: int
    ) -> tuple[list[int] | np.ndarray, list[int]]:
        """The output runs of a run's records: one when its datagrams' places
        follow one another (the common case: building then needs no list of
        positions), else one per datagram."""
        starts = run.starts
        # Places are reserved in order without overlap, so a span equal to
        # the records before the last datagram means no gap anywhere.
        if starts[-1] - starts[0] == total - int(counts[-1]):
            return [total], [starts[0]]
        return counts, starts

    def walk_v1(
        self,
        payload: bytes,
        exporter: bytes,
        port: int,
        counters: ExporterCounters,
        batch: RecordBatch,
    ) -> None:
        """Decode one v1 datagram (the version is already checked)."""
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
