"""Export sequence numbers: gaps, late packets and exporter restarts.

Each stream (exporter address, port, version, domain) has an expected next
sequence number.  NetFlow v5 and IPFIX count records, NetFlow v9 counts
datagrams (RFC 3954), though some v9 exporters count records: a stream
whose numbers advance by the previous datagram's record count three times
(with no in-order datagram of several records in between) is switched to
counting records, and the gaps those jumps had counted are taken back.

Sequence numbers are u32 and wrap.  A number ahead of the expected one is
a gap (the difference is counted as lost); one slightly behind is a late
(reordered) packet that fills part of an earlier gap; one far behind or far
ahead is an exporter restart, which resynchronises without counting loss.
"""

from __future__ import annotations

import numpy as np

from edge_agent.flows.counters import ExporterCounters

_MASK = 0xFFFFFFFF
#: Forward jumps this large are restarts, not loss (a guess: no real link
#: loses a billion records between two datagrams of one stream).
_MAX_GAP = 1 << 30
#: Jumps by the record count that switch a v9 stream to counting records.
_RECORD_VOTES = 3
#: A packet this many datagrams' worth behind is late, not a restart.
_REORDER_DATAGRAMS = 64
#: check_run takes shorter runs one by one (numpy costs more there).
_RUN_VECTOR = 8

#: (exporter address, exporter port, version, domain)
StreamKey = tuple[bytes, int, int, int]


class StreamState:
    __slots__ = (
        "by_records",
        "expected",
        "last_records",
        "last_seq",
        "lost",
        "vote_gaps",
        "vote_lost",
        "votes",
    )

    def __init__(self) -> None:
        self.expected: int | None = None
        self.lost = 0
        self.last_seq = 0
        self.last_records = -1
        self.by_records = False
        self.votes = 0  # jumps that matched "counts records"
        self.vote_gaps = 0  # gaps and loss those jumps counted
        self.vote_lost = 0


class SequenceTracker:
    """Per-stream sequence state, bounded in streams (oldest forgotten)."""

    def __init__(self, max_streams: int = 65536) -> None:
        self.max_streams = max_streams
        self.streams: dict[StreamKey, StreamState] = {}

    def stream(self, key: StreamKey) -> StreamState:
        """The state of one stream, created (and the oldest forgotten) if new.

        A caller may hold it across datagrams and account them later with
        :meth:`check_stream`, in order.  A stream forgotten meanwhile (more
        than ``max_streams`` streams) is then followed to the end of what
        the caller holds instead of restarting at once.
        """
        return self._stream(key)

    def _stream(self, key: StreamKey) -> StreamState:
        stream = self.streams.get(key)
        if stream is None:
            if len(self.streams) >= self.max_streams:
                # dicts keep insertion order: drop the oldest stream.
                del self.streams[next(iter(self.streams))]
            stream = StreamState()
            self.streams[key] = stream
        return stream

    def check(
        self,
        key: StreamKey,
        seq: int,
        units: int | None,
        counters: ExporterCounters,
    ) -> None:
        """Account one export whose header says ``seq``.

        ``units`` is what this export adds to the sequence (records for
        v5/IPFIX, 1 for v9) or None when unknown (IPFIX sets whose template
        is not known yet): then the next export is not checked.
        """
        stream = self.streams.get(key)
        if stream is not None and stream.expected == seq and units is not None:
            stream.expected = (seq + units) & _MASK  # in order: the usual case
            stream.last_seq = seq
            return
        self._advance(stream or self._stream(key), seq, units, counters)

    def check_stream(
        self, stream: StreamState, seq: int, units: int, counters: ExporterCounters
    ) -> None:
        """:meth:`check` on a stream from :meth:`stream`."""
        if stream.expected == seq:
            stream.expected = (seq + units) & _MASK
            stream.last_seq = seq
            return
        self._advance(stream, seq, units, counters)

    def check_run(
        self,
        stream: StreamState,
        seqs: np.ndarray,
        units: np.ndarray,
        counters: ExporterCounters,
    ) -> None:
        """:meth:`check_stream` on each export of one stream in turn, in
        a few numpy passes (v5 and IPFIX: ``units`` are known, int64).

        Each export is compared with the number the one before it leads to
        expect.  Stretches that hold only in-order exports and gaps (the
        usual kinds) are counted at once, and so are late exports and
        restarts; otherwise (a late export after a late one) an export far
        from its expected number is checked on its own, and so is the one
        after it until the expected number is again the previous export's
        number plus its units.
        """
        n = len(seqs)
        if n < _RUN_VECTOR:
            for seq, unit in zip(seqs.tolist(), units.tolist(), strict=True):
                self.check_stream(stream, seq, unit, counters)
            return
        start = stream.expected
        pos = 0
        if start is None:
            # A new stream: its first export only sets the expected number.
            self.check_stream(stream, int(seqs[0]), int(units[0]), counters)
            pos = 1
        nexts = (seqs + units) & _MASK
        expected = np.empty(n, dtype=np.int64)
        expected[0] = seqs[0] if start is None else start
        expected[1:] = nexts[:-1]
        ahead = (seqs - expected) & _MASK
        far = ahead >= _MAX_GAP
        if not np.count_nonzero(far):
            # Only in-order exports and gaps: the usual case.
            gaps = int(np.count_nonzero(ahead))
            if gaps:
                lost = int(ahead.sum())
                counters.sequence_gaps += gaps
                counters.estimated_lost += lost
                stream.lost += lost
            stream.expected = int(nexts[-1])
            stream.last_seq = int(seqs[-1])
            return
        if self._late_and_restarts(stream, seqs, units, expected, ahead, far, counters):
            return
        self._one_by_one_at_far(stream, seqs, units, nexts, ahead, far, pos, counters)

    @staticmethod
    def _late_and_restarts(  # noqa: PLR0917 - check_run's own helper
        stream: StreamState,
        seqs: np.ndarray,
        units: np.ndarray,
        expected: np.ndarray,
        ahead: np.ndarray,
        far: np.ndarray,
        counters: ExporterCounters,
    ) -> bool:
        """check_run when no two late exports come in a row (False, nothing
        done, when some do).

        A late export leaves the expected number as it was, so the export
        after it is compared with that number instead.  Compared with the
        number the one before leads to, a run of exports can each look
        late where every other one is (an exporter that counts a few
        records fewer than it sends, or one reordered datagram): the first
        of such a run is late, the next is not, and so on.  That guess is
        checked against every export's own expected number; then only the
        late exports' take-back depends on the loss counted so far: it is
        walked in Python, once per late export or restart.
        """
        n = len(seqs)
        window = _REORDER_DATAGRAMS * np.maximum(units, 1)
        late = far & ((expected - seqs) & _MASK <= window)
        if np.count_nonzero(late[:-1]):
            first = late.copy()
            first[1:] &= ~late[:-1]
            where = np.arange(n)
            since = where - np.maximum.accumulate(np.where(first, where, 0))
            late &= since % 2 == 0
            again = expected.copy()
            again[1:] = np.where(late[:-1], expected[:-1], expected[1:])
            ahead = (seqs - again) & _MASK
            far = ahead >= _MAX_GAP
            if not np.array_equal(late, far & ((again - seqs) & _MASK <= window)):
                return False
        forward = np.where(far, 0, ahead)
        lost_to = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(forward, out=lost_to[1:])
        lost_at = lost_to.tolist()
        unit_list = units.tolist()
        lost = stream.lost
        taken_back = 0
        at = 0
        for event, is_late in zip(
            np.flatnonzero(far).tolist(), late[far].tolist(), strict=True
        ):
            lost += lost_at[event] - lost_at[at]
            if is_late:
                # It was counted lost when its gap opened.
                found = min(unit_list[event], lost)
                lost -= found
                taken_back += found
            else:
                lost = 0  # a restart
            at = event + 1
        stream.lost = lost + lost_at[n] - lost_at[at]
        counters.sequence_gaps += int(np.count_nonzero(ahead))
        counters.estimated_lost += lost_at[n] - taken_back
        last = n - 1
        # A late last one keeps what it was expected at (the one before it
        # is not late: that is where the one before it leads).
        stream.expected = int(
            expected[last] if late[last] else (seqs[last] + units[last]) & _MASK
        )
        stream.last_seq = int(seqs[last])
        return True

    def _one_by_one_at_far(  # noqa: PLR0917 - check_run's own helper
        self,
        stream: StreamState,
        seqs: np.ndarray,
        units: np.ndarray,
        nexts: np.ndarray,
        ahead: np.ndarray,
        far: np.ndarray,
        pos: int,
        counters: ExporterCounters,
    ) -> None:
        """check_run's general case: stretches between far exports at once,
        far exports (and those after them, until the expected number is the
        usual one again) through check_stream."""
        n = len(seqs)
        # Running counts of gaps and loss up to each index (a stretch
        # never holds a far export: those are checked on their own).
        gaps_to = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(ahead != 0, out=gaps_to[1:])
        lost_to = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(ahead, out=lost_to[1:])
        gaps_at = gaps_to.tolist()
        lost_at = lost_to.tolist()
        far_at = np.flatnonzero(far).tolist()
        seq_list = seqs.tolist()
        unit_list = units.tolist()
        next_list = nexts.tolist()
        hit = 0  # index into far_at
        while pos < n:
            while hit < len(far_at) and far_at[hit] < pos:
                hit += 1
            end = far_at[hit] if hit < len(far_at) else n
            if end > pos:
                # pos:end: in order or gaps, each expected where the one
                # before leads (stream.expected is expected[pos]).
                gaps = gaps_at[end] - gaps_at[pos]
                if gaps:
                    lost = lost_at[end] - lost_at[pos]
                    counters.sequence_gaps += gaps
                    counters.estimated_lost += lost
                    stream.lost += lost
                stream.expected = next_list[end - 1]
                stream.last_seq = seq_list[end - 1]
                pos = end
            # One by one until the expected number is the usual one again.
            while pos < n:
                self.check_stream(stream, seq_list[pos], unit_list[pos], counters)
                pos += 1
                if stream.expected == next_list[pos - 1]:
                    break

    def check_v9(
        self, key: StreamKey, seq: int, records: int, counters: ExporterCounters
    ) -> None:
        """Like :meth:`check` for NetFlow v9 (one datagram, ``records`` records).

        Records are the unit once the stream showed it counts them.
        """
        stream = self.streams.get(key)
        if stream is not None and stream.expected == seq:
            if stream.last_records > 1:
                # A datagram counted as one: RFC behaviour.
                stream.votes = stream.vote_gaps = stream.vote_lost = 0
            stream.expected = (seq + (records if stream.by_records else 1)) & _MASK
            stream.last_seq = seq
            stream.last_records = records
            return
        if stream is None:
            stream = self._stream(key)
        if (
            not stream.by_records
            and stream.expected is not None
            and stream.last_records > 1
            and (seq - stream.last_seq) & _MASK == stream.last_records
        ):
            stream.votes += 1
            if stream.votes >= _RECORD_VOTES:
                stream.by_records = True
                stream.expected = seq
                counters.sequence_gaps -= stream.vote_gaps
                counters.estimated_lost -= stream.vote_lost
                stream.lost = max(0, stream.lost - stream.vote_lost)
            else:
                before = (counters.sequence_gaps, counters.estimated_lost)
                stream.last_records = records
                self._advance(stream, seq, 1, counters)
                stream.vote_gaps += counters.sequence_gaps - before[0]
                stream.vote_lost += counters.estimated_lost - before[1]
                return
        units = records if stream.by_records else 1
        stream.last_records = records
        self._advance(stream, seq, units, counters)

    @staticmethod
    def _advance(
        stream: StreamState, seq: int, units: int | None, counters: ExporterCounters
    ) -> None:
        expected = stream.expected
        stream.last_seq = seq
        if expected is None:
            stream.expected = None if units is None else (seq + units) & _MASK
            return
        ahead = (seq - expected) & _MASK
        if ahead == 0:
            stream.expected = None if units is None else (seq + units) & _MASK
            return
        counters.sequence_gaps += 1
        if ahead < _MAX_GAP:
            counters.estimated_lost += ahead
            stream.lost += ahead
            stream.expected = None if units is None else (seq + units) & _MASK
            return
        behind = (expected - seq) & _MASK
        window = _REORDER_DATAGRAMS * max(units or 1, 1)
        if behind <= window:
            # A late packet: it was counted lost when the gap opened.
            found = min(units or 0, stream.lost)
            stream.lost -= found
            counters.estimated_lost -= found
            return
        # Restart (or a stream we cannot follow): resynchronise.
        stream.lost = 0
        stream.expected = None if units is None else (seq + units) & _MASK
