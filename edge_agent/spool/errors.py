"""Exceptions raised by the spool, each named for the state it reports."""

from __future__ import annotations


class SpoolError(Exception):
    """Base class of every error the spool raises on purpose."""


class SpoolLockedError(SpoolError):
    """Raised when another process (or Spool object) holds the spool directory.

    Two writers on one directory would hand out clashing sequence numbers,
    so the spool takes an exclusive ``flock`` on ``<directory>/.lock`` and
    keeps it until :meth:`Spool.close`.  The lock dies with its process,
    so a crashed relay never leaves it stuck.
    """


class SpoolClosedError(SpoolError):
    """Raised when a closed spool is used."""


class SpoolFullError(SpoolError):
    """Raised by ``append`` when a batch cannot be accepted for lack of room.

    Under ``full_policy="reject_new"`` this is raised whenever the batch
    would take the spool over ``max_bytes``; under ``"drop_oldest"`` only
    when the batch alone is larger than ``max_bytes``.  Either way the
    batch was not accepted and ``SpoolStats.rejected_full`` counted it.
    """


class SpoolOrderError(SpoolError, ValueError):
    """Raised by ``append`` when a batch's seq is not above every seq handed out.

    Replay order is seq order, so a batch may only be appended with a seq
    above the highest one the spool has seen (use ``Spool.next_seq()``).
    """


class DuplicateBatchError(SpoolError, ValueError):
    """Raised by ``append`` when a batch with the same batch id is pending."""


class SpoolWriteError(SpoolError):
    """Raised by ``append`` when the operating system failed the write.

    The usual cause is a full file system (``ENOSPC``) below ``max_bytes``;
    the original :class:`OSError` is the ``__cause__``.  The batch was not
    accepted and ``SpoolStats.write_errors`` counted it.
    """
