"""The benchmark's peer: a bare asyncio-dgram receive loop that only counts.

It binds a UDP socket with the relay's receive buffer, counts datagrams
and bytes until told to stop, and reports them with its CPU time and the
kernel's drop count for its socket.  It is what any asyncio collector
costs before it does anything with a datagram, so the relay's figures are
read against it (same core, same sender, same run).
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

import asyncio_dgram


def udp_socket_drops(port: int, pid: int | str = "self") -> int | None:
    """Datagrams the kernel dropped for the UDP socket bound to ``port``
    (the ``drops`` column of ``/proc/PID/net/udp``); None if not found."""
    try:
        with open(f"/proc/{pid}/net/udp") as fh:
            lines = fh.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            return int(fields[-1])
    return None


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _count(stream: Any, counts: dict[str, int]) -> None:
    while True:
        try:
            payload, _ = await stream.recv()
        except asyncio_dgram.TransportClosed:
            return
        counts["datagrams"] += 1
        counts["bytes"] += len(payload)


def run_peer(
    *, port: int, rcvbuf: int, core: int | None, stop: Event, conn: Connection
) -> None:
    """Process entry point: bind, say ready on ``conn``, count until
    ``stop``, send the figures on ``conn``."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", port))
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    conn.send({"ready": True, "rcvbuf": granted})
    counts = {"datagrams": 0, "bytes": 0}
    drops: int | None = None

    cpu_start = 0.0

    async def main() -> None:
        nonlocal drops, cpu_start
        stream = await asyncio_dgram.from_socket(sock)
        cpu_start = _cpu_s()
        task = asyncio.create_task(_count(stream, counts))
        while not stop.is_set():
            await asyncio.sleep(0.02)
        # Read while the socket is still open.
        drops = udp_socket_drops(port)
        stream.close()
        await task

    asyncio.run(main())
    result: dict[str, Any] = {
        **counts,
        "kernel_drops": drops,
        # From ready to stopped: start-up (interpreter, imports) left out.
        "cpu_s": _cpu_s() - cpu_start,
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    conn.send(result)
    conn.close()
