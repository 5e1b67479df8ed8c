"""The benchmark's exporter side: a process sending streams at a record rate.

:func:`send_streams` takes its turn over the :class:`ExportStream`\\ s, one
payload each in turn, each stream from its own socket on its own loopback
address (127.0.0.<10 + i>, so the relay sees one exporter per stream), and
paces on flow records: after ``t`` seconds it has sent ``rate * t``
records, in bursts of at most :data:`BURST_S` of them between two looks at
the clock.  It runs for ``seconds`` and returns what it sent, per stream.

It runs in a process of its own (:func:`run_sender`, for
``multiprocessing``), pinned to a core apart from the relay's, so sending
never takes CPU from what is measured.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from cloud.bench.streams import ExportStream

#: Seconds of records sent in one burst at most.
BURST_S = 0.002


@dataclass
class SendResult:
    """What a sender sent.  Times are seconds (monotonic clock)."""

    datagrams: int = 0
    bytes: int = 0
    records: int = 0  # flow records in the datagrams sent (steady state)
    seconds: float = 0.0  # from the first datagram to the last
    #: per stream name: datagrams sent
    per_stream: dict[str, int] = field(default_factory=dict)
    #: datagrams not sent, by errno name
    send_errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "datagrams": self.datagrams,
            "bytes": self.bytes,
            "records": self.records,
            "seconds": self.seconds,
            "per_stream": dict(self.per_stream),
            "send_errors": dict(self.send_errors),
        }


def source_address(index: int) -> str:
    """The loopback address stream ``index`` sends from."""
    return f"127.0.0.{10 + index}"


def send_streams(
    streams: list[ExportStream],
    target: tuple[str, int],
    rate: float,
    seconds: float,
) -> SendResult:
    """Send ``rate`` flow records/s for ``seconds`` (see the module doc)."""
    if rate <= 0 or seconds <= 0:
        raise ValueError(f"rate and seconds must be > 0, got {rate}, {seconds}")
    sockets = []
    for i in range(len(streams)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source_address(i), 0))
        sockets.append(sock)
    result = SendResult(per_stream={s.name: 0 for s in streams})
    start = time.monotonic()
    last = start
    turn = 0
    burst = max(1.0, rate * BURST_S)
    try:
        while True:
            now = time.monotonic()
            elapsed = now - start
            if elapsed >= seconds:
                break
            due = rate * elapsed - result.records
            if due <= 0:
                time.sleep(min(BURST_S, -due / rate))
                continue
            export_time = int(time.time())
            sent_now = 0.0
            while sent_now < min(due, burst):
                stream = streams[turn]
                payload, records = stream.next_payload(export_time)
                try:
                    sockets[turn].sendto(payload, target)
                except OSError as exc:
                    result.send_errors[errno.errorcode.get(exc.errno or 0, "?")] += 1
                else:
                    result.datagrams += 1
                    result.bytes += len(payload)
                    result.records += records
                    result.per_stream[stream.name] += 1
                    sent_now += records
                turn = (turn + 1) % len(streams)
            last = time.monotonic()
    finally:
        for sock in sockets:
            sock.close()
    result.seconds = last - start
    return result


def run_sender(
    *,
    streams: list[ExportStream],
    target: tuple[str, int],
    rate: float,
    seconds: float,
    core: int | None,
    conn: Connection,
) -> None:
    """Process entry point: pin to ``core``, send, report on ``conn``."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    conn.send(send_streams(streams, target, rate, seconds).to_json())
    conn.close()
