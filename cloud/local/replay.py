"""Sending flow exports to a collector over UDP, faster than real time.

:class:`RecordReplay` plays :data:`FLOW_DTYPE` records as a router would
export them: each record leaves when its flow ends (``time_end``), through
an :class:`~cloud.local.exporter.IpfixExporter`, with the exporter's clock
running ``speedup`` times faster than the wall clock.  :class:`PcapReplay`
sends the UDP payloads of a capture of flow exports at their capture
times, sped up the same way, one sending socket per original exporter
(address, port) so that the collector keeps their templates apart.

Both pace themselves in small ticks and bound their burst rate
(``max_datagrams_per_s``), because a collector's receive buffer is finite
and a datagram dropped on loopback is lost without trace.  Send failures
(``ENOBUFS``, a refused port) are counted by errno name in
:attr:`ReplayStats.send_errors`, never raised.  Every datagram sent can be
written to a pcap file as well (:class:`PcapWriter`), to inspect the
exports with other tools.
"""

from __future__ import annotations

import collections
import errno
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import dpkt
import numpy as np

from cloud.local.exporter import IpfixExporter
from edge_agent.collect.datagram import Datagram
from edge_agent.collect.pcap import CaptureReader

#: Seconds between two pacing steps.
TICK_S = 0.02
#: Largest gap kept between two datagrams of a capture, seconds of wall
#: time after the speed-up (captures can hold hours of silence).
MAX_PCAP_GAP_S = 1.0
#: Distinct exporters of a capture that get their own socket; the rest
#: share the last one (counted in ``ReplayStats.shared_socket``).
MAX_PCAP_SOCKETS = 256


@dataclass
class ReplayStats:
    """What a replay sent (read from other threads: plain counters)."""

    records: int = 0  # flow records exported (RecordReplay)
    datagrams: int = 0
    bytes: int = 0  # UDP payload bytes
    shared_socket: int = 0  # datagrams of exporters past MAX_PCAP_SOCKETS
    #: datagrams that could not be sent, by errno name
    send_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    done: bool = False


class PcapWriter:
    """Writes sent datagrams as Ethernet/IPv4/UDP frames to a pcap file.

    Source: the sending socket's address and port; destination: the
    collector.  Thread-safe (one lock); close it when done.
    """

    def __init__(self, path: Path, target: tuple[str, int]) -> None:
        self.path = path
        self._handle: BinaryIO = path.open("wb")
        self._writer = dpkt.pcap.Writer(self._handle, linktype=dpkt.pcap.DLT_EN10MB)
        self._dst = socket.inet_aton(target[0])
        self._dport = target[1]
        self._lock = threading.Lock()

    def write(self, payload: bytes, source: tuple[str, int], ts: float) -> None:
        """Write one datagram sent from ``source`` (address, port) at ``ts``
        (seconds since the epoch)."""
        udp = dpkt.udp.UDP(sport=source[1], dport=self._dport, data=payload)
        udp.ulen = len(udp)
        ip = dpkt.ip.IP(
            src=socket.inet_aton(source[0]),
            dst=self._dst,
            p=dpkt.ip.IP_PROTO_UDP,
            data=udp,
        )
        ip.len = len(ip)
        frame = dpkt.ethernet.Ethernet(
            dst=b"\x02\x00\x00\x00\x00\x02",
            src=b"\x02\x00\x00\x00\x00\x01",
            type=dpkt.ethernet.ETH_TYPE_IP,
            data=ip,
        )
        with self._lock:
            self._writer.writepkt(bytes(frame), ts=ts)

    def close(self) -> None:
        """Flush and close the file."""
        with self._lock:
            self._handle.close()


def _udp_socket(address: str = "127.0.0.1") -> socket.socket:
    """A sending socket bound to ``address`` (any 127.0.0.0/8 address works
    on Linux loopback, so each replay is its own exporter)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    sock.bind((address, 0))
    return sock


class _Pacer:
    """Sends datagrams on one or more sockets, at most ``rate`` per second."""

    def __init__(
        self,
        target: tuple[str, int],
        stats: ReplayStats,
        max_datagrams_per_s: float,
        pcap: PcapWriter | None,
    ) -> None:
        self.target = target
        self.stats = stats
        self.min_gap_s = 1.0 / max_datagrams_per_s
        self.pcap = pcap
        self._next_free = time.monotonic()

    def send(self, sock: socket.socket, payload: bytes) -> None:
        now = time.monotonic()
        if now < self._next_free:
            time.sleep(self._next_free - now)
            now = self._next_free
        self._next_free = max(now, self._next_free) + self.min_gap_s
        try:
            sock.sendto(payload, self.target)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "OSError")
            self.stats.send_errors[name] += 1
            return
        self.stats.datagrams += 1
        self.stats.bytes += len(payload)
        if self.pcap is not None:
            self.pcap.write(payload, sock.getsockname(), time.time())


class RecordReplay:
    """Export records over UDP as they end, ``speedup`` times real time.

    ``records`` must be sorted by ``time_end`` (ms); the replay's clock
    starts at the first record's end.  The exports leave from
    ``source_address`` (a loopback address) and a free port.  :meth:`run`
    blocks until every record is sent or ``stop`` is set; :attr:`stats`
    can be read meanwhile from another thread.
    """

    def __init__(
        self,
        records: np.ndarray,
        target: tuple[str, int],
        exporter: IpfixExporter,
        speedup: float,
        *,
        max_datagrams_per_s: float = 20_000.0,
        pcap: PcapWriter | None = None,
        source_address: str = "127.0.0.1",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        ends = records["time_end"]
        if ends.size > 1 and np.any(ends[1:] < ends[:-1]):
            raise ValueError("records must be sorted by time_end")
        self.records = records
        self.exporter = exporter
        self.speedup = speedup
        self.stats = ReplayStats()
        self._pacer = _Pacer(target, self.stats, max_datagrams_per_s, pcap)
        self._clock = clock
        self._socket = _udp_socket(source_address)
        self.source_address = source_address
        #: the UDP port the exports leave from (with the address, the
        #: exporter's identity at the collector)
        self.source_port: int = self._socket.getsockname()[1]

    @property
    def duration_s(self) -> float:
        """Wall seconds the replay takes at its speed-up."""
        ends = self.records["time_end"]
        if ends.size == 0:
            return 0.0
        return float(ends[-1] - ends[0]) / 1000.0 / self.speedup

    def run(self, stop: threading.Event) -> None:
        """Send everything (or until ``stop``); closes the socket."""
        ends = self.records["time_end"]
        try:
            if ends.size == 0:
                return
            first_ms = int(ends[0])
            started = self._clock()
            sent = 0
            while sent < ends.size and not stop.is_set():
                virtual_ms = first_ms + (self._clock() - started) * self.speedup * 1000
                upto = int(np.searchsorted(ends, virtual_ms, side="right"))
                if upto > sent:
                    chunk = self.records[sent:upto]
                    export_s = int(virtual_ms // 1000)
                    for message in self.exporter.encode(chunk, export_s):
                        self._pacer.send(self._socket, message)
                    self.stats.records += int(chunk.shape[0])
                    sent = upto
                if sent < ends.size:
                    stop.wait(TICK_S)
        finally:
            self._socket.close()
            self.stats.done = True


class PcapReplay:
    """Send a capture's flow-export datagrams at its capture times, sped up.

    Gaps longer than :data:`MAX_PCAP_GAP_S` (after the speed-up) are cut
    to that.  The capture is read as it is sent; :class:`CaptureError` from
    opening it is raised by the constructor.
    """

    def __init__(
        self,
        path: Path,
        target: tuple[str, int],
        speedup: float,
        *,
        max_datagrams_per_s: float = 20_000.0,
        pcap: PcapWriter | None = None,
    ) -> None:
        if speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        self.path = path
        self.reader = CaptureReader(path)
        self.speedup = speedup
        self.stats = ReplayStats()
        self._pacer = _Pacer(target, self.stats, max_datagrams_per_s, pcap)
        self._sockets: dict[tuple[bytes, int], socket.socket] = {}
        #: the local UDP ports used so far, one per original exporter
        self.source_ports: list[int] = []

    def _socket_for(self, datagram: Datagram) -> socket.socket:
        key = (datagram.exporter, datagram.exporter_port)
        sock = self._sockets.get(key)
        if sock is None:
            if len(self._sockets) >= MAX_PCAP_SOCKETS:
                self.stats.shared_socket += 1
                return next(reversed(self._sockets.values()))
            sock = self._sockets[key] = _udp_socket()
            self.source_ports.append(sock.getsockname()[1])
        return sock

    def run(self, stop: threading.Event) -> None:
        """Send every datagram (or until ``stop``); closes the sockets."""
        previous_ms: int | None = None
        try:
            with self.reader:
                for datagram in self.reader:
                    if stop.is_set():
                        break
                    if previous_ms is not None:
                        gap = (datagram.received_ms - previous_ms) / 1000 / self.speedup
                        if gap > 0 and stop.wait(min(gap, MAX_PCAP_GAP_S)):
                            break
                    previous_ms = datagram.received_ms
                    self._pacer.send(self._socket_for(datagram), datagram.payload)
        finally:
            for sock in self._sockets.values():
                sock.close()
            self.stats.done = True
