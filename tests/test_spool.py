"""The durable spool: ordering, acknowledgement, bounds, damage, crashes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edge_agent.spool.spool as spool_module
from edge_agent.spool import (
    DuplicateBatchError,
    PendingBatch,
    Spool,
    SpooledBatch,
    SpoolFullError,
    SpoolLockedError,
    SpoolOrderError,
)

#: A spool file holds a 32-byte fixed header and two CRC-32s besides the
#: batch id, partition key and payload (the layout in fileformat's doc).
FILE_OVERHEAD = 32 + 4 + 4


def make_batch(
    spool: Spool, n: int, key: str = "exporter-a", size: int = 100
) -> SpooledBatch:
    """A batch with a recognisable id and random payload of ``size`` bytes."""
    payload = random.Random(n).randbytes(size)
    return SpooledBatch(f"batch-{n:04d}", key, payload, spool.next_seq())


def expected_size(batch: SpooledBatch) -> int:
    return (
        FILE_OVERHEAD
        + len(batch.batch_id.encode())
        + len(batch.partition_key.encode())
        + len(batch.payload)
    )


def batch_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.sfb"))


def test_pending_returns_appended_batches_oldest_first(tmp_path: Path) -> None:
    """pending() gives back exactly what was appended, in append (seq) order."""
    with Spool(tmp_path) as spool:
        keys = ["a", "b", "a", "c", "b"]
        batches = [make_batch(spool, i, key) for i, key in enumerate(keys)]
        for b in batches:
            spool.append(b)
        assert spool.pending() == batches
        assert [b.seq for b in batches] == sorted(b.seq for b in batches)


def test_accepted_batches_survive_reopening(tmp_path: Path) -> None:
    """A batch is on disk once append returns: a new Spool on the folder has it."""
    with Spool(tmp_path) as spool:
        batches = [make_batch(spool, i) for i in range(4)]
        for b in batches:
            spool.append(b)
    with Spool(tmp_path) as again:
        assert again.pending() == batches
        assert again.stats.count == 4
        assert again.stats.bytes == sum(expected_size(b) for b in batches)


def test_ack_removes_only_the_named_batches(tmp_path: Path) -> None:
    """ack() deletes the acknowledged files and nothing else, durably."""
    with Spool(tmp_path) as spool:
        batches = [make_batch(spool, i) for i in range(5)]
        for b in batches:
            spool.append(b)
        assert spool.ack([batches[1].batch_id, batches[3].batch_id, "never-seen"]) == 2
        assert spool.ack([batches[1].batch_id]) == 0
        left = [batches[0], batches[2], batches[4]]
        assert spool.pending() == left
        assert spool.stats.acked == 2
    assert len(batch_files(tmp_path)) == 3
    with Spool(tmp_path) as again:
        assert again.pending() == left


def test_file_sizes_match_the_documented_layout(tmp_path: Path) -> None:
    """Each file is 40 bytes plus id, key and payload; stats.bytes sums them."""
    with Spool(tmp_path) as spool:
        batches = [
            make_batch(spool, i, key="k" * (i + 1), size=10 * i) for i in range(3)
        ]
        for b in batches:
            spool.append(b)
        sizes = [f.stat().st_size for f in batch_files(tmp_path)]
        assert sizes == [expected_size(b) for b in batches]
        assert spool.stats.bytes == sum(sizes)


def test_seq_must_increase(tmp_path: Path) -> None:
    """A seq not above the last one is refused: replay order would be wrong."""
    with Spool(tmp_path) as spool:
        first = make_batch(spool, 1)
        spool.append(first)
        with pytest.raises(SpoolOrderError, match="next_seq"):
            spool.append(SpooledBatch("other", "k", b"x", first.seq))
        assert spool.stats.count == 1


def test_next_seq_keeps_increasing_across_restarts(tmp_path: Path) -> None:
    """After a restart, even with an empty spool, new seqs are above old ones."""
    with Spool(tmp_path) as spool:
        b = make_batch(spool, 1)
        spool.append(b)
        spool.ack([b.batch_id])
    with Spool(tmp_path) as again:
        assert again.next_seq() > b.seq


def test_duplicate_batch_id_is_refused(tmp_path: Path) -> None:
    """Two pending batches may not share a batch id (acks are by id)."""
    with Spool(tmp_path) as spool:
        spool.append(SpooledBatch("same", "k", b"1", spool.next_seq()))
        with pytest.raises(DuplicateBatchError):
            spool.append(SpooledBatch("same", "k", b"2", spool.next_seq()))


def test_a_second_spool_on_the_folder_is_refused(tmp_path: Path) -> None:
    """The directory lock keeps a second writer out until the first closes."""
    first = Spool(tmp_path)
    with pytest.raises(SpoolLockedError):
        Spool(tmp_path)
    first.close()
    Spool(tmp_path).close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_id": ""}, "batch_id"),
        ({"partition_key": ""}, "partition_key"),
        ({"partition_key": "k" * 257}, "partition_key"),
        ({"payload": "text"}, "payload must be bytes"),
        ({"seq": -1}, "seq"),
    ],
)
def test_invalid_batch_fields_are_refused(
    kwargs: dict[str, object], message: str
) -> None:
    """SpooledBatch checks its fields (Kinesis keys are 1 to 256 characters)."""
    fields: dict[str, object] = {
        "batch_id": "b",
        "partition_key": "k",
        "payload": b"x",
        "seq": 1,
    }
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SpooledBatch(**fields)  # type: ignore[arg-type]


def test_unknown_full_policy_names_the_choices(tmp_path: Path) -> None:
    """A bad full_policy is a ValueError listing the valid ones."""
    with pytest.raises(ValueError, match="drop_oldest, reject_new"):
        Spool(tmp_path, full_policy="drop_newest")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_files_are_set_aside_by_reason_at_start_up(tmp_path: Path) -> None:
    """Torn, truncated, bit-flipped and misnamed files go to corrupt/, counted."""
    with Spool(tmp_path) as spool:
        batches = [make_batch(spool, i) for i in range(8)]
        for b in batches:
            spool.append(b)
    files = batch_files(tmp_path)
    # 0: truncated by 10 bytes (a torn write)
    files[0].write_bytes(files[0].read_bytes()[:-10])
    # 1: one payload byte flipped (the payload ends 4 bytes before the end)
    _flip(files[1], -10)
    # 2: a byte of the batch id flipped (the id starts at offset 32)
    _flip(files[2], 33)
    # 3: the magic overwritten
    _flip(files[3], 0)
    # 4: empty, as a file system may leave a file after power loss
    files[4].write_bytes(b"")
    # 5: renamed so its name no longer matches the seq in its header
    files[5].rename(tmp_path / f"{batches[7].seq + 100:020d}.sfb")
    with Spool(tmp_path) as again:
        assert again.pending() == [batches[6], batches[7]]
        stats = again.stats
        assert stats.corrupt == {
            "length_mismatch": 1,
            "payload_checksum": 1,
            "header_checksum": 1,
            "bad_magic": 1,
            "too_short": 1,
            "bad_name": 1,
        }
        assert stats.corrupt_total == 6
        assert stats.count == 2
        assert stats.bytes == expected_size(batches[6]) + expected_size(batches[7])
    assert len(list((tmp_path / "corrupt").iterdir())) == 6


def test_damage_found_when_reading_is_set_aside(tmp_path: Path) -> None:
    """A file damaged while the relay runs is left out of pending() and counted."""
    with Spool(tmp_path) as spool:
        batches = [make_batch(spool, i) for i in range(3)]
        for b in batches:
            spool.append(b)
        _flip(batch_files(tmp_path)[1], -10)
        assert spool.pending() == [batches[0], batches[2]]
        assert spool.stats.corrupt == {"payload_checksum": 1}
        assert spool.stats.count == 2
        assert [p.name for p in (tmp_path / "corrupt").iterdir()] == [
            f"{batches[1].seq:020d}.sfb"
        ]


def test_interrupted_append_leftovers_are_removed(tmp_path: Path) -> None:
    """A .tmp file (an append that never returned) is deleted, not replayed."""
    with Spool(tmp_path) as spool:
        b = make_batch(spool, 1)
        spool.append(b)
    (tmp_path / f".{b.seq + 1:020d}.sfb.tmp").write_bytes(b"half a batch")
    with Spool(tmp_path) as again:
        assert again.pending() == [b]
        assert again.stats.temp_removed == 1
        assert again.stats.corrupt_total == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_drop_oldest_keeps_the_bound_and_counts(tmp_path: Path) -> None:
    """When full, the oldest batches are dropped for the new one, and counted."""
    size = FILE_OVERHEAD + len("batch-0000") + len("exporter-a") + 500
    with Spool(tmp_path, max_bytes=3 * size) as spool:
        batches = [make_batch(spool, i, size=500) for i in range(5)]
        for b in batches:
            spool.append(b)
        assert spool.pending() == batches[2:]
        stats = spool.stats
        assert stats.dropped_full == 2
        assert stats.dropped_full_bytes == 2 * size
        assert stats.bytes == 3 * size
        on_disk = sum(f.stat().st_size for f in batch_files(tmp_path))
        assert on_disk == 3 * size


def test_reject_new_refuses_and_counts(tmp_path: Path) -> None:
    """Under reject_new a full spool raises SpoolFullError and keeps its batches."""
    size = FILE_OVERHEAD + len("batch-0000") + len("exporter-a") + 500
    with Spool(tmp_path, max_bytes=2 * size, full_policy="reject_new") as spool:
        batches = [make_batch(spool, i, size=500) for i in range(2)]
        for b in batches:
            spool.append(b)
        with pytest.raises(SpoolFullError, match="reject_new"):
            spool.append(make_batch(spool, 2, size=500))
        assert spool.pending() == batches
        assert spool.stats.rejected_full == 1
        assert spool.stats.dropped_full == 0


def test_batch_larger_than_the_bound_is_refused(tmp_path: Path) -> None:
    """drop_oldest never empties the spool for a batch that cannot fit anyway."""
    with Spool(tmp_path, max_bytes=1000) as spool:
        small = make_batch(spool, 1, size=10)
        spool.append(small)
        with pytest.raises(SpoolFullError):
            spool.append(make_batch(spool, 2, size=2000))
        assert spool.pending() == [small]
        assert spool.stats.dropped_full == 0


def test_lowered_bound_drops_oldest_at_start_up(tmp_path: Path) -> None:
    """Reopening with a smaller max_bytes drops the oldest to fit, counted."""
    size = FILE_OVERHEAD + len("batch-0000") + len("exporter-a") + 100
    with Spool(tmp_path) as spool:
        batches = [make_batch(spool, i) for i in range(4)]
        for b in batches:
            spool.append(b)
    with Spool(tmp_path, max_bytes=2 * size) as again:
        assert again.pending() == batches[2:]
        assert again.stats.dropped_full == 2


def test_oldest_age_follows_the_clock(tmp_path: Path) -> None:
    """oldest_age_s is the time since the oldest pending batch was accepted."""
    now = [1_700_000_000.0]
    with Spool(tmp_path, clock=lambda: now[0]) as spool:
        assert spool.stats.oldest_age_s is None
        first = make_batch(spool, 1)
        spool.append(first)
        now[0] += 5.0
        spool.append(make_batch(spool, 2))
        now[0] += 7.5
        assert spool.stats.oldest_age_s == pytest.approx(12.5)
        spool.ack([first.batch_id])
        assert spool.stats.oldest_age_s == pytest.approx(7.5)


def test_pending_limit_bytes_and_exclude(tmp_path: Path) -> None:
    """pending() honours limit, a payload byte budget and excluded ids."""
    with Spool(tmp_path) as spool:
        batches = [make_batch(spool, i, size=100) for i in range(5)]
        for b in batches:
            spool.append(b)
        assert spool.pending(2) == batches[:2]
        assert spool.pending(max_bytes=250) == batches[:2]
        assert spool.pending(max_bytes=99) == []
        skip = {batches[0].batch_id, batches[2].batch_id}
        assert spool.pending(2, exclude=skip) == [batches[1], batches[3]]
        assert spool.peek(2, exclude=skip) == [
            PendingBatch(b.batch_id, b.partition_key, b.seq, 100)
            for b in (batches[1], batches[3])
        ]


def test_set_aside_moves_to_rejected(tmp_path: Path) -> None:
    """set_aside() takes a batch out of the queue into rejected/, counted."""
    with Spool(tmp_path) as spool:
        batches = [make_batch(spool, i) for i in range(2)]
        for b in batches:
            spool.append(b)
        assert spool.set_aside(batches[0].batch_id, "record_too_large")
        assert not spool.set_aside(batches[0].batch_id, "record_too_large")
        assert spool.pending() == [batches[1]]
        assert spool.stats.rejected == {"record_too_large": 1}
    assert len(list((tmp_path / "rejected").iterdir())) == 1


def test_quarantine_folders_are_bounded(tmp_path: Path) -> None:
    """corrupt/ keeps at most max_quarantined files; deletions are counted."""
    with Spool(tmp_path) as spool:
        for i in range(5):
            spool.append(make_batch(spool, i))
    for f in batch_files(tmp_path):
        f.write_bytes(b"junk")
    with Spool(tmp_path, max_quarantined=2) as again:
        assert again.stats.corrupt == {"too_short": 5}
        assert again.stats.quarantine_deleted == 3
    assert len(list((tmp_path / "corrupt").iterdir())) == 2


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 300), st.sampled_from("abc")),
        st.tuples(st.just("ack"), st.integers(0, 20), st.just("")),
        st.tuples(st.just("reopen"), st.just(0), st.just("")),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_spool_matches_a_simple_queue_model(ops: list[tuple[str, int, str]]) -> None:
    """Any mix of appends, acks and restarts behaves like a bounded FIFO."""
    max_bytes = 1500
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        spool = Spool(directory, max_bytes=max_bytes)
        model: list[SpooledBatch] = []
        dropped = 0
        n = 0
        try:
            for op, arg, key in ops:
                if op == "append":
                    n += 1
                    b = SpooledBatch(
                        f"b{n}", key, bytes([n % 256]) * arg, spool.next_seq()
                    )
                    while sum(map(expected_size, model)) + expected_size(b) > max_bytes:
                        model.pop(0)
                        dropped += 1
                    spool.append(b)
                    model.append(b)
                elif op == "ack" and model:
                    victim = model.pop(arg % len(model))
                    spool.ack([victim.batch_id])
                elif op == "reopen":
                    spool.close()
                    spool = Spool(directory, max_bytes=max_bytes)
                    dropped = 0
                assert spool.pending() == model
                assert spool.stats.dropped_full == dropped
                assert spool.stats.bytes == sum(map(expected_size, model))
        finally:
            spool.close()


_CRASH_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import structlog

    from edge_agent.spool import Spool, SpooledBatch

    # stdout carries the accepted ids only.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

    spool = Spool(Path(sys.argv[1]))
    run = sys.argv[2]
    i = 0
    while True:
        i += 1
        batch_id = f"{run}-{i}"
        payload = batch_id.encode() * 300
        spool.append(SpooledBatch(batch_id, "k", payload, spool.next_seq()))
        print(batch_id, flush=True)
    """
)


def test_kill_9_during_appends_loses_no_accepted_batch(tmp_path: Path) -> None:
    """SIGKILL at random points: every batch whose append returned is still there."""
    rng = random.Random(7)
    script = tmp_path / "writer.py"
    script.write_text(_CRASH_WRITER)
    spool_dir = tmp_path / "spool"
    accepted: list[str] = []
    for run in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(spool_dir), f"r{run}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        # Kill after a random number of accepted appends (counted, not timed).
        want = rng.randint(5, 60)
        for _ in range(want):
            line = proc.stdout.readline()
            assert line, "writer exited early"
            accepted.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)
        accepted.extend(line.strip() for line in proc.stdout)
        proc.stdout.close()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    with Spool(spool_dir) as spool:
        ids = [b.batch_id for b in spool.pending()]
        assert spool.stats.corrupt_total == 0
    assert set(accepted) <= set(ids)
    # Replay order is append order.
    assert [i for i in ids if i in set(accepted)] == accepted


def test_seqs_keep_rising_when_the_clock_steps_back(tmp_path: Path) -> None:
    """An empty spool reopened after the clock went back an hour still hands
    out seqs above every seq of the earlier run (the recorded ceiling)."""
    now = [1_700_000_000.0]
    with Spool(tmp_path, clock=lambda: now[0]) as spool:
        batches = [make_batch(spool, i) for i in range(3)]
        for b in batches:
            spool.append(b)
        spool.ack([b.batch_id for b in batches])
    last = batches[-1].seq
    now[0] -= 3600.0
    with Spool(tmp_path, clock=lambda: now[0]) as again:
        assert again.pending() == []
        after = make_batch(again, 9)
        assert after.seq > last
        again.append(after)
    # The ceiling file is a decimal number above every seq handed out.
    ceiling = int((tmp_path / ".seq-ceiling").read_text())
    assert ceiling > after.seq


def test_unreadable_seq_ceiling_is_counted_and_the_clock_floor_holds(
    tmp_path: Path,
) -> None:
    """A damaged ceiling file does not stop the spool: it is counted, and
    seqs start above the pending batches and the start time."""
    now = [1_700_000_000.0]
    with Spool(tmp_path, clock=lambda: now[0]) as spool:
        first = make_batch(spool, 1)
        spool.append(first)
    (tmp_path / ".seq-ceiling").write_bytes(b"\xff not a number")
    with Spool(tmp_path, clock=lambda: now[0]) as again:
        assert again.stats.ceiling_unreadable == 1
        assert again.pending() == [first]
        nxt = make_batch(again, 2)
        assert nxt.seq > first.seq
        assert nxt.seq > int(now[0] * 1_000_000)


def test_many_seqs_cross_the_ceiling_step(tmp_path: Path) -> None:
    """Handing out more seqs than one ceiling step moves the recorded ceiling
    ahead of them (checked after a restart with the clock stopped)."""
    step = spool_module._CEILING_STEP
    with Spool(tmp_path, clock=lambda: 1.0) as spool:
        start = spool.next_seq()
        for _ in range(step + 5):
            seq = spool.next_seq()
    assert seq == start + step + 5
    assert int((tmp_path / ".seq-ceiling").read_text()) > seq
    with Spool(tmp_path, clock=lambda: 1.0) as again:
        assert again.next_seq() > seq
