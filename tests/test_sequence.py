"""SequenceTracker.check_run: a run of one stream's exports at once.

The hand-computed case follows the module's rules (gap: counted lost;
late: takes back what its gap counted; restart: resynchronises).  The
property test holds check_run to check_stream called on each export in turn.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.flows.counters import ExporterCounters
from edge_agent.flows.sequence import SequenceTracker, StreamState

_WRAP = 1 << 32


def run(
    tracker: SequenceTracker, stream: StreamState, exports: list[tuple[int, int]]
) -> ExporterCounters:
    counters = ExporterCounters()
    seqs = np.array([s for s, _ in exports], dtype=np.int64)
    units = np.array([u for _, u in exports], dtype=np.int64)
    tracker.check_run(stream, seqs, units, counters)
    return counters


def test_gaps_late_and_restart_by_hand() -> None:
    tracker = SequenceTracker()
    stream = tracker.stream((b"\x00" * 16, 4739, 10, 0))
    stream.expected = 100
    restart = 1 << 31
    exports = [
        (100, 3),  # in order: next 103
        (103, 2),  # in order: next 105
        (110, 1),  # gap: 105..109 lost (5), next 111
        (105, 5),  # late, 6 behind: its 5 records were counted lost
        (111, 1),  # in order (the late one left 111 expected)
        (restart, 1),  # far ahead: a restart, next restart + 1
        (restart + 1, 4),  # in order: next restart + 5
        (restart + 10, 1),  # gap of 5, next restart + 11
        (restart + 11, 0),  # in order, no records: next stays
    ]
    counters = run(tracker, stream, exports)
    assert counters.sequence_gaps == 4  # gap, late, restart, gap
    assert counters.estimated_lost == 5 - 5 + 5
    assert stream.lost == 5  # only the gap after the restart
    assert stream.expected == restart + 11
    assert stream.last_seq == restart + 11


def test_two_late_exports_in_a_row_by_hand() -> None:
    """The second late export is 20 ahead of where the first one leads but
    20 behind the number still expected: late too, not a gap."""
    tracker = SequenceTracker()
    stream = tracker.stream((b"\x00" * 16, 4739, 10, 0))
    stream.expected = 1000
    stream.lost = 30  # a gap of 30 opened before
    exports = [(950, 10), (980, 10)] + [(1000 + 5 * k, 5) for k in range(8)]
    counters = run(tracker, stream, exports)
    assert counters.sequence_gaps == 2
    assert counters.estimated_lost == -20  # both take back 10
    assert stream.lost == 10
    assert stream.expected == 1040


def test_exports_that_step_short_of_their_units_by_hand() -> None:
    """Numbers 4 apart for 5 records each: late and gap by turns, each late
    one taking back the 3 the gap before it counted."""
    tracker = SequenceTracker()
    stream = tracker.stream((b"\x00" * 16, 4739, 10, 0))
    stream.expected = 13
    stream.lost = 3
    counters = run(tracker, stream, [(12 + 4 * k, 5) for k in range(8)])
    assert counters.sequence_gaps == 8  # four late, four gaps
    assert counters.estimated_lost == 0  # -3 +3 -3 +3 -3 +3 -3 +3
    assert stream.lost == 3
    assert stream.expected == 45
    assert stream.last_seq == 40


def test_a_new_stream_starts_at_its_first_export() -> None:
    tracker = SequenceTracker()
    stream = tracker.stream((b"\x00" * 16, 4739, 10, 0))
    exports = [(_WRAP - 4 + 2 * k, 2) for k in range(10)]  # wraps past 0
    counters = run(tracker, stream, exports)
    assert (counters.sequence_gaps, counters.estimated_lost) == (0, 0)
    assert stream.expected == (_WRAP - 4 + 20) % _WRAP


@st.composite
def exports(draw: st.DrawFn) -> tuple[int | None, int, list[tuple[int, int]]]:
    """(expected at start or None, lost at start, exports) from moves an
    exporter makes: in order, a small gap, a step back, a jump, a wrap, an
    earlier export arriving late (the stream then goes on where it was)."""
    start = draw(st.one_of(st.none(), st.integers(0, _WRAP - 1)))
    lost = draw(st.integers(0, 50)) if start is not None else 0
    seq = start if start is not None else draw(st.integers(0, _WRAP - 1))
    out = []
    for move, units, size in draw(
        st.lists(
            st.tuples(st.integers(0, 10), st.integers(0, 30), st.integers(1, 200)),
            min_size=1,
            max_size=60,
        )
    ):
        if move == 6:
            seq += size  # gap
        elif move == 7:
            seq -= size  # late or, far enough behind, a restart
        elif move == 8:
            seq += draw(st.integers(1 << 30, _WRAP - 1))  # restart
        elif move == 9:
            out.append(((seq - size) % _WRAP, units))  # a late one
            continue
        seq %= _WRAP
        out.append((seq, units))
        if move != 7:
            seq = (seq + units) % _WRAP
    return start, lost, out


@settings(max_examples=500, deadline=None)
@given(exports())
def test_same_as_one_by_one(
    case: tuple[int | None, int, list[tuple[int, int]]],
) -> None:
    start, lost, items = case
    key = (b"\x00" * 16, 4739, 10, 0)
    states = []
    counts = []
    for at_once in (False, True):
        tracker = SequenceTracker()
        stream = tracker.stream(key)
        stream.expected = start
        stream.lost = lost
        counters = ExporterCounters()
        if at_once:
            counters = run(tracker, stream, items)
        else:
            for seq, units in items:
                tracker.check_stream(stream, seq, units, counters)
        states.append((stream.expected, stream.lost, stream.last_seq))
        counts.append((counters.sequence_gaps, counters.estimated_lost))
    assert states[0] == states[1]
    assert counts[0] == counts[1]
