"""A durable, bounded, ordered on-disk queue of encoded batches.

Layout of a spool directory::

    <directory>/.lock                    flock held by the owning process
    <directory>/.seq-ceiling             every seq handed out is below it
    <directory>/00000000000000000042.sfb one file per pending batch, named by seq
    <directory>/.00000000000000000043.sfb.tmp   an append in progress
    <directory>/corrupt/                 files that failed verification
    <directory>/rejected/                batches the shipper can never send

Why one file per batch rather than segment files: a batch is the unit of
acknowledgement, so an ack is one ``unlink`` and there is no compaction,
no index and no partially acknowledged segment to reason about after a
crash.  The price is one file fsync plus one directory fsync per append
(a few ms on flash); the batch encoder emits at most a few batches per
second per exporter, far below that limit.

Durability contract of :meth:`Spool.append`: when it returns, the batch is
on stable storage.  It writes a temporary file, fsyncs it, renames it to
its final name and fsyncs the directory.  A crash or power loss before the
rename leaves a ``.tmp`` file, which the next start-up deletes (the append
never returned, so the batch was never accepted); after the rename the
file is complete.  Files damaged all the same (bad sectors, a file system
that lied about fsync, an operator's editor) fail the length or CRC-32
checks and are moved to ``corrupt/``, counted by reason, never crashing
the relay.

Acknowledged files are unlinked without a directory fsync of their own; a
power loss soon after an ack may bring the batch back, which only causes
a duplicate (the pipeline is at-least-once).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, get_args

import structlog

from edge_agent.spool import fileformat
from edge_agent.spool.errors import (
    DuplicateBatchError,
    SpoolClosedError,
    SpoolFullError,
    SpoolLockedError,
    SpoolOrderError,
    SpoolWriteError,
)

log = structlog.get_logger(__name__)

FullPolicy = Literal["drop_oldest", "reject_new"]
FULL_POLICIES: tuple[str, ...] = get_args(FullPolicy)

#: Longest partition key Kinesis accepts, in Unicode characters.
MAX_PARTITION_KEY_CHARS = 256
CORRUPT_DIR = "corrupt"
REJECTED_DIR = "rejected"
_LOCK_NAME = ".lock"
#: Holds one decimal number: no seq handed out so far reaches it.
_CEILING_NAME = ".seq-ceiling"
#: How far ahead the recorded ceiling runs (one write per this many seqs).
_CEILING_STEP = 1 << 20
_SUFFIX = ".sfb"
_TMP_SUFFIX = ".sfb.tmp"
_NAME_RE = re.compile(r"^(\d{20})\.sfb$")
#: Acknowledged files waiting for the background unlink; ack() blocks
#: beyond this, and at most this many acked batches can come back after a
#: crash (as duplicates).
_UNLINK_QUEUE = 4096


@dataclass(frozen=True)
class SpooledBatch:
    """One encoded batch as the spool stores it and the shipper sends it.

    ``seq`` orders replay (oldest first); ``partition_key`` is the
    exporter's key, 1 to 256 characters as Kinesis requires; ``payload``
    is opaque to the spool.
    """

    batch_id: str
    partition_key: str
    payload: bytes
    seq: int

    def __post_init__(self) -> None:
        if not isinstance(self.batch_id, str) or not self.batch_id:
            raise ValueError(f"batch_id must be a non-empty str, got {self.batch_id!r}")
        if not isinstance(self.partition_key, str) or not (
            1 <= len(self.partition_key) <= MAX_PARTITION_KEY_CHARS
        ):
            raise ValueError(
                "partition_key must be a str of 1 to "
                f"{MAX_PARTITION_KEY_CHARS} characters, got {self.partition_key!r}"
            )
        if not isinstance(self.payload, bytes):
            raise ValueError(
                f"payload must be bytes, got {type(self.payload).__name__}"
            )
        if not isinstance(self.seq, int) or self.seq < 0:
            raise ValueError(f"seq must be an int >= 0, got {self.seq!r}")


@dataclass(frozen=True)
class PendingBatch:
    """What the spool knows of a pending batch without reading its file."""

    batch_id: str
    partition_key: str
    seq: int
    payload_len: int  #: bytes


@dataclass(frozen=True)
class SpoolStats:
    """A snapshot of the spool's gauges and counters (counters since open)."""

    count: int  #: batches pending
    bytes: int  #: file bytes of the pending batches (what ``max_bytes`` bounds)
    max_bytes: int
    oldest_seq: int | None
    #: seconds since the oldest pending batch was accepted; None when empty
    oldest_age_s: float | None
    appended: int
    acked: int
    #: batches dropped to make room under ``drop_oldest``, and their bytes
    dropped_full: int
    dropped_full_bytes: int
    #: appends refused for lack of room (``SpoolFullError``)
    rejected_full: int
    write_errors: int
    #: files moved to ``corrupt/``, by reason (see ``SpoolFormatError``, plus
    #: ``bad_name``, ``duplicate_batch_id``, ``unreadable``)
    corrupt: dict[str, int]
    #: batches moved to ``rejected/`` by ``set_aside``, by reason
    rejected: dict[str, int]
    #: leftover temporary files of interrupted appends removed at start-up
    temp_removed: int
    #: old files deleted from ``corrupt/`` or ``rejected/`` to keep their bound
    quarantine_deleted: int
    #: start-ups that found ``.seq-ceiling`` unreadable (seqs then start at
    #: the highest pending seq or the clock)
    ceiling_unreadable: int = 0

    @property
    def corrupt_total(self) -> int:
        """All files set aside as corrupt."""
        return sum(self.corrupt.values())


@dataclass(slots=True)
class _Entry:
    seq: int
    batch_id: str
    partition_key: str
    size: int
    payload_len: int
    created_ns: int

    @property
    def name(self) -> str:
        return f"{self.seq:020d}{_SUFFIX}"


@dataclass
class _Counters:
    appended: int = 0
    acked: int = 0
    dropped_full: int = 0
    dropped_full_bytes: int = 0
    rejected_full: int = 0
    write_errors: int = 0
    temp_removed: int = 0
    quarantine_deleted: int = 0
    ceiling_unreadable: int = 0
    corrupt: collections.Counter[str] = field(default_factory=collections.Counter)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)


class Spool:
    """Batches on disk, oldest first, until the shipper acknowledges them.

    ``max_bytes`` bounds the file bytes of pending batches (file systems
    round each file up to their block size, so real use is somewhat
    higher).  When an append would exceed it, ``full_policy`` decides:
    ``"drop_oldest"`` deletes the oldest pending batches until the new one
    fits (counted in ``dropped_full``), ``"reject_new"`` refuses the new
    one with :class:`SpoolFullError`.  ``corrupt/`` and ``rejected/`` each
    keep at most ``max_quarantined`` files, the oldest deleted first.

    Thread-safe: the relay appends from one thread while the shipper reads
    and acknowledges from others.  Opening reads and verifies every
    pending file once, about one second per GiB on an SSD and longer on an
    SD card.  ``clock`` returns seconds since the epoch; tests pass a fake.
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int = 1 << 30,
        full_policy: str = "drop_oldest",
        *,
        max_quarantined: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if full_policy not in FULL_POLICIES:
            raise ValueError(
                f"full_policy must be one of {', '.join(FULL_POLICIES)}, "
                f"got {full_policy!r}"
            )
        if max_bytes < fileformat.OVERHEAD_BYTES + 2:
            raise ValueError(f"max_bytes must hold at least one batch, got {max_bytes}")
        if max_quarantined < 1:
            raise ValueError(f"max_quarantined must be >= 1, got {max_quarantined}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.full_policy = full_policy
        self.max_quarantined = max_quarantined
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._by_id: dict[str, int] = {}
        self._bytes = 0
        self._counters = _Counters()
        self._full_logged = False
        self._closed = False
        self._unlink_queue: queue.Queue[str | None] = queue.Queue(_UNLINK_QUEUE)
        self._reaper: threading.Thread | None = None

        self.directory.mkdir(parents=True, exist_ok=True)
        for sub in (CORRUPT_DIR, REJECTED_DIR):
            (self.directory / sub).mkdir(exist_ok=True)
        self._lock_fd = os.open(
            self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise SpoolLockedError(
                f"spool directory {self.directory} is in use by another process"
            ) from exc
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._recover()
            self._start_seqs()
        except BaseException:
            self.close()
            raise

    def _start_seqs(self) -> None:
        """Make the first seq handed out higher than any an earlier run used."""
        # Seqs stay increasing across restarts even when the spool was
        # empty and the clock was stepped back: every seq handed out is
        # below the ceiling recorded in the ``.seq-ceiling`` file, which
        # the next start begins above.  The start time in microseconds is a
        # second floor for a directory that lost that file.
        highest = next(reversed(self._entries)) if self._entries else 0
        self._last_seq = max(
            highest, self._read_ceiling(), int(self._clock() * 1_000_000)
        )
        self._issued_seq = self._last_seq
        self._ceiling = 0
        self._raise_ceiling(self._last_seq)

    # -- life cycle -------------------------------------------------------

    def close(self) -> None:
        """Release the directory lock; the spool cannot be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reaper, self._reaper = self._reaper, None
        if reaper is not None:
            self._unlink_queue.put(None)
            reaper.join()
        with self._lock:
            for fd in (getattr(self, "_dir_fd", None), self._lock_fd):
                if fd is not None:
                    os.close(fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the queue --------------------------------------------------------

    def next_seq(self) -> int:
        """Hand out a seq above every seq this spool has seen or handed out.

        Each call reserves its value, so batches may be built before they
        are appended; seqs never appended leave harmless gaps.
        """
        with self._lock:
            self._issued_seq = max(self._issued_seq, self._last_seq) + 1
            if self._issued_seq >= self._ceiling:
                self._raise_ceiling(self._issued_seq)
            return self._issued_seq

    def append(self, batch: SpooledBatch) -> None:
        """Write ``batch`` durably; when this returns the batch is accepted.

        Raises :class:`DuplicateBatchError` when the batch id is pending,
        :class:`SpoolOrderError` when ``batch.seq`` is not above every seq
        seen, :class:`SpoolFullError` when there is no room under the
        policy, :class:`SpoolWriteError` when the OS failed the write.
        """
        size = fileformat.file_size(
            batch.batch_id, batch.partition_key, len(batch.payload)
        )
        with self._lock:
            self._check_open()
            if batch.batch_id in self._by_id:
                raise DuplicateBatchError(
                    f"batch {batch.batch_id!r} is already spooled"
                )
            if batch.seq <= self._last_seq:
                raise SpoolOrderError(
                    f"batch {batch.batch_id!r} has seq {batch.seq}, which is not above "
                    f"the last seq {self._last_seq}; use Spool.next_seq()"
                )
            if size > self.max_bytes or (
                self.full_policy == "reject_new" and self._bytes + size > self.max_bytes
            ):
                self._counters.rejected_full += 1
                self._log_full()
                raise SpoolFullError(
                    f"batch {batch.batch_id!r} of {size} bytes does not fit: "
                    f"{self._bytes} of max_bytes={self.max_bytes} in use, "
                    f"full_policy={self.full_policy}"
                )
            while self._bytes + size > self.max_bytes:
                self._drop_oldest_locked()
            created_ns = int(self._clock() * 1e9)
            data = fileformat.encode(
                batch.batch_id,
                batch.partition_key,
                batch.payload,
                batch.seq,
                created_ns,
            )
            entry = _Entry(
                batch.seq,
                batch.batch_id,
                batch.partition_key,
                len(data),
                len(batch.payload),
                created_ns,
            )
            try:
                self._write_durably(entry.name, data)
            except OSError as exc:
                self._counters.write_errors += 1
                raise SpoolWriteError(
                    f"writing batch {batch.batch_id!r} to {self.directory} "
                    f"failed: {exc}"
                ) from exc
            self._entries[entry.seq] = entry
            self._by_id[entry.batch_id] = entry.seq
            self._bytes += entry.size
            self._last_seq = entry.seq
            self._counters.appended += 1
            if self._bytes <= self.max_bytes * 0.9:
                self._full_logged = False

    def pending(
        self,
        limit: int | None = None,
        *,
        max_bytes: int | None = None,
        exclude: Collection[str] = (),
    ) -> list[SpooledBatch]:
        """Return pending batches, oldest (lowest seq) first.

        At most ``limit`` batches; with ``max_bytes`` the longest run from
        the oldest whose payloads add up to at most that many bytes (which
        may be none).  Batches whose id is in ``exclude`` (in flight, say)
        are skipped and not counted.  A file that fails verification now
        is moved to ``corrupt/`` and left out.
        """
        with self._lock:
            self._check_open()
            picked: list[_Entry] = []
            total = 0
            for entry in self._entries.values():
                if limit is not None and len(picked) >= limit:
                    break
                if entry.batch_id in exclude:
                    continue
                if max_bytes is not None and total + entry.payload_len > max_bytes:
                    break
                picked.append(entry)
                total += entry.payload_len
        out: list[SpooledBatch] = []
        for entry in picked:
            batch = self._load(entry)
            if batch is not None:
                out.append(batch)
        return out

    def peek(
        self, limit: int | None = None, *, exclude: Collection[str] = ()
    ) -> list[PendingBatch]:
        """Like :meth:`pending` without reading files: ids, keys and sizes only.

        The shipper plans its calls on this and then :meth:`load` s only
        the batches it picked.
        """
        with self._lock:
            self._check_open()
            out: list[PendingBatch] = []
            for entry in self._entries.values():
                if limit is not None and len(out) >= limit:
                    break
                if entry.batch_id not in exclude:
                    out.append(
                        PendingBatch(
                            entry.batch_id,
                            entry.partition_key,
                            entry.seq,
                            entry.payload_len,
                        )
                    )
            return out

    def load(self, pending: PendingBatch) -> SpooledBatch | None:
        """Read and verify one batch listed by :meth:`peek`.

        Returns None when it is no longer pending, or when its file fails
        verification (it is then moved to ``corrupt/`` and counted).
        """
        with self._lock:
            self._check_open()
            entry = self._entries.get(pending.seq)
        if entry is None or entry.batch_id != pending.batch_id:
            return None
        return self._load(entry)

    def ack(self, batch_ids: Iterable[str]) -> int:
        """Delete acknowledged batches; returns how many were pending.

        Ids not pending (already acked, dropped or set aside) are ignored.
        """
        names: list[str] = []
        with self._lock:
            self._check_open()
            for batch_id in batch_ids:
                seq = self._by_id.pop(batch_id, None)
                if seq is None:
                    continue
                entry = self._entries.pop(seq)
                self._bytes -= entry.size
                names.append(entry.name)
            self._counters.acked += len(names)
        # A background thread unlinks: on file systems mounted with online
        # discard an unlink takes milliseconds, which would otherwise stall
        # the shipper between calls.  No directory fsync for the unlinks
        # (the next append's covers them): a crash or power loss before
        # they land only brings acked batches back, as duplicates.
        if names:
            self._start_reaper()
            for name in names:
                self._unlink_queue.put(name)
        return len(names)

    def set_aside(self, batch_id: str, reason: str) -> bool:
        """Move a pending batch the shipper can never send to ``rejected/``.

        ``reason`` is a short snake_case counter label.  Returns False when
        the batch was not pending.
        """
        with self._lock:
            self._check_open()
            seq = self._by_id.pop(batch_id, None)
            if seq is None:
                return False
            entry = self._entries.pop(seq)
            self._bytes -= entry.size
            self._counters.rejected[reason] += 1
            self._quarantine_locked(entry.name, REJECTED_DIR)
        log.warning("spool_set_aside", batch_id=batch_id, seq=seq, reason=reason)
        return True

    @property
    def stats(self) -> SpoolStats:
        """A consistent snapshot of gauges and counters."""
        with self._lock:
            oldest = next(iter(self._entries.values()), None)
            c = self._counters
            return SpoolStats(
                count=len(self._entries),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                oldest_seq=None if oldest is None else oldest.seq,
                oldest_age_s=(
                    None
                    if oldest is None
                    else max(0.0, self._clock() - oldest.created_ns / 1e9)
                ),
                appended=c.appended,
                acked=c.acked,
                dropped_full=c.dropped_full,
                dropped_full_bytes=c.dropped_full_bytes,
                rejected_full=c.rejected_full,
                write_errors=c.write_errors,
                corrupt=dict(c.corrupt),
                rejected=dict(c.rejected),
                temp_removed=c.temp_removed,
                quarantine_deleted=c.quarantine_deleted,
                ceiling_unreadable=c.ceiling_unreadable,
            )

    # -- internals ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolClosedError(f"spool {self.directory} is closed")

    def _recover(self) -> None:
        """Index the pending files, removing temporaries and setting aside damage."""
        named: list[tuple[int, str]] = []
        with os.scandir(self.directory) as it:
            for dirent in it:
                if dirent.name.endswith(_TMP_SUFFIX):
                    self._unlink(dirent.name)
                    self._counters.temp_removed += 1
                    continue
                match = _NAME_RE.match(dirent.name)
                if match is not None:
                    named.append((int(match.group(1)), dirent.name))
                elif dirent.name.endswith(_SUFFIX):
                    self._set_corrupt(dirent.name, "bad_name", "not a seq file name")
        named.sort()
        for seq, name in named:
            try:
                data = self._read(name)
                decoded = fileformat.decode(data)
            except fileformat.SpoolFormatError as exc:
                self._set_corrupt(name, exc.reason, str(exc))
                continue
            except OSError as exc:
                self._set_corrupt(name, "unreadable", str(exc))
                continue
            if decoded.seq != seq:
                self._set_corrupt(name, "bad_name", f"header seq is {decoded.seq}")
                continue
            if decoded.batch_id in self._by_id:
                self._set_corrupt(name, "duplicate_batch_id", decoded.batch_id)
                continue
            entry = _Entry(
                seq,
                decoded.batch_id,
                decoded.partition_key,
                len(data),
                len(decoded.payload),
                decoded.created_ns,
            )
            self._entries[seq] = entry
            self._by_id[entry.batch_id] = seq
            self._bytes += entry.size
        if self.full_policy == "drop_oldest":
            while self._bytes > self.max_bytes:
                self._drop_oldest_locked()
        os.fsync(self._dir_fd)
        log.info(
            "spool_opened",
            directory=str(self.directory),
            count=len(self._entries),
            bytes=self._bytes,
            corrupt=sum(self._counters.corrupt.values()),
            temp_removed=self._counters.temp_removed,
        )

    def _load(self, entry: _Entry) -> SpooledBatch | None:
        """Read and verify one pending file; None when it is gone or damaged."""
        try:
            decoded = fileformat.decode(self._read(entry.name))
        except FileNotFoundError:
            return None  # acknowledged or dropped since it was picked
        except fileformat.SpoolFormatError as exc:
            reason, detail = exc.reason, str(exc)
        except OSError as exc:
            reason, detail = "unreadable", str(exc)
        else:
            if decoded.seq == entry.seq and decoded.batch_id == entry.batch_id:
                return SpooledBatch(
                    decoded.batch_id,
                    decoded.partition_key,
                    decoded.payload,
                    decoded.seq,
                )
            reason, detail = "bad_name", "file changed since it was indexed"
        with self._lock:
            if self._entries.get(entry.seq) is not entry:
                return None
            del self._entries[entry.seq]
            del self._by_id[entry.batch_id]
            self._bytes -= entry.size
            self._set_corrupt(entry.name, reason, detail)
        return None

    def _drop_oldest_locked(self) -> None:
        _seq, entry = self._entries.popitem(last=False)
        del self._by_id[entry.batch_id]
        self._bytes -= entry.size
        self._unlink(entry.name)
        self._counters.dropped_full += 1
        self._counters.dropped_full_bytes += entry.size
        self._log_full()
        log.debug("spool_dropped", batch_id=entry.batch_id, seq=entry.seq)

    def _log_full(self) -> None:
        # Once per episode: a full spool under a long outage would otherwise
        # log every append.
        if not self._full_logged:
            self._full_logged = True
            log.warning(
                "spool_full",
                policy=self.full_policy,
                max_bytes=self.max_bytes,
                hint="raise max_bytes or restore the uplink",
            )

    def _set_corrupt(self, name: str, reason: str, detail: str) -> None:
        self._counters.corrupt[reason] += 1
        log.warning("spool_corrupt", file=name, reason=reason, detail=detail)
        self._quarantine_locked(name, CORRUPT_DIR)

    def _quarantine_locked(self, name: str, folder: str) -> None:
        target_dir = self.directory / folder
        target = target_dir / name
        n = 0
        while target.exists():
            n += 1
            target = target_dir / f"{name}.{n}"
        try:
            os.rename(self.directory / name, target)
        except FileNotFoundError:
            return
        kept = sorted(target_dir.iterdir(), key=lambda p: (p.stat().st_mtime, p.name))
        for old in kept[: max(0, len(kept) - self.max_quarantined)]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
            self._counters.quarantine_deleted += 1
            log.warning("spool_quarantine_trimmed", file=str(old))

    def _read(self, name: str) -> bytes:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir_fd)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _read_ceiling(self) -> int:
        """The recorded seq ceiling, 0 when absent or unreadable (counted)."""
        try:
            text = (self.directory / _CEILING_NAME).read_text(encoding="ascii")
            return max(0, int(text.strip()))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            self._counters.ceiling_unreadable += 1
            log.warning("spool_seq_ceiling_unreadable", error=str(exc))
            return 0

    def _raise_ceiling(self, seq: int) -> None:
        """Record durably that every seq handed out stays below a new ceiling.

        The ceiling moves :data:`_CEILING_STEP` ahead, so this costs one
        small fsynced write per that many batches.
        """
        ceiling = seq + _CEILING_STEP
        self._unlink(f".{_CEILING_NAME}.tmp")  # left by a crash mid-write
        try:
            self._write_durably(_CEILING_NAME, f"{ceiling}\n".encode("ascii"))
        except OSError as exc:
            raise SpoolWriteError(
                f"recording the seq ceiling in {self.directory} failed: {exc}"
            ) from exc
        self._ceiling = ceiling

    def _write_durably(self, name: str, data: bytes) -> None:
        tmp = f".{name}.tmp"
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            0o600,
            dir_fd=self._dir_fd,
        )
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._unlink(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except BaseException:
            self._unlink(tmp)
            raise
        os.fsync(self._dir_fd)

    def _start_reaper(self) -> None:
        with self._lock:
            if self._reaper is None and not self._closed:
                self._reaper = threading.Thread(
                    target=self._reap, name="spool-unlink", daemon=True
                )
                self._reaper.start()

    def _reap(self) -> None:
        while (name := self._unlink_queue.get()) is not None:
            self._unlink(name)

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._dir_fd)
