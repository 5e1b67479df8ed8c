"""Live input: receive flow export datagrams on UDP sockets.

:class:`UdpCollector` listens on one or more UDP ports (NetFlow, IPFIX and
sFlow all arrive the same way; the decoder tells the protocol from the
datagram itself) and hands the datagrams, in batches, to a consumer
callable, typically one that runs ``FlowDecoder.decode_many``.

Memory is bounded: datagrams waiting for the consumer (the batch being
filled plus the batches queued) are capped both in count and in bytes.  A
datagram that would exceed either bound is dropped and counted under
``queue_full`` for its port.  The other buffer is the kernel's socket
receive buffer: the collector asks for a large one (``receive_buffer``)
so bursts and consumer pauses are absorbed there; if the kernel grants
less, one warning names the sysctl to raise (``net.core.rmem_max``).
Datagrams the kernel dropped because that buffer was full are read from
``/proc/net/udp`` and ``/proc/net/udp6`` (the socket's ``drops`` column)
about once a second and counted under ``socket_buffer_full``; on systems
without those files they are not seen.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncio_dgram
import structlog

from edge_agent.collect.datagram import MAX_DATAGRAM, Datagram, packed_address

log = structlog.get_logger(__name__)

#: A consumer receives each batch of datagrams, in arrival order.  It may be
#: a plain function or a coroutine function; a plain one runs in the event
#: loop and blocks receiving while it runs (the kernel buffer absorbs that).
BatchConsumer = Callable[[list[Datagram]], Awaitable[None] | None]

DEFAULT_PORTS: tuple[int, ...] = (2055, 4739, 6343)


class CollectorError(Exception):
    """Raised by :meth:`UdpCollector.start` when a socket cannot be bound."""


@dataclass(frozen=True)
class CollectorConfig:
    """Configuration of the UDP collector.

    Every ``bind_addresses`` entry is combined with every ``ports`` entry
    (one socket each).  Port 0 asks the kernel for a free port (tests).  An
    IPv6 address gets a dual-stack socket (IPv4 exporters appear as
    IPv4-mapped addresses) unless an IPv4 address is listed too, in which
    case the IPv6 socket is IPv6-only so both can bind the same port.
    """

    bind_addresses: tuple[str, ...] = ("0.0.0.0",)
    ports: tuple[int, ...] = DEFAULT_PORTS
    #: SO_RCVBUF requested per socket, bytes.  32 MiB holds about 0.5 s of a
    #: 500 Mbit/s export burst; a guess, raise it if the kernel drops.
    receive_buffer: int = 32 * 1024 * 1024
    #: datagrams per batch handed to the consumer.  The decoder's fixed
    #: numpy cost is paid per batch: on the shared captures 1024 took 29%
    #: fewer instructions per IPFIX record than 256 (bench decode --batch);
    #: a batch fills in a few ms at rates where that matters, and
    #: ``batch_interval`` bounds the wait below them
    batch_datagrams: int = 1024
    #: a partial batch is handed over after this long, seconds
    batch_interval: float = 0.05
    #: bound on datagrams waiting for (or held by) the consumer
    max_queued_datagrams: int = 65536
    #: bound on payload bytes waiting for (or held by) the consumer
    max_queued_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.bind_addresses:
            raise ValueError("collector bind_addresses must list at least one")
        for address in self.bind_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(
                    f"collector bind_addresses: {address!r} is not an IPv4 or "
                    "IPv6 address"
                ) from None
        if not self.ports:
            raise ValueError("collector ports must list at least one port")
        for port in self.ports:
            if not 0 <= port <= 65535:
                raise ValueError(f"collector ports: {port} is not in 0..65535")
        _require_positive("receive_buffer", self.receive_buffer)
        _require_positive("batch_datagrams", self.batch_datagrams)
        _require_positive("max_queued_datagrams", self.max_queued_datagrams)
        if self.max_queued_bytes < MAX_DATAGRAM:
            raise ValueError(
                f"collector max_queued_bytes must be >= {MAX_DATAGRAM}, "
                f"got {self.max_queued_bytes}"
            )
        if not self.batch_interval > 0:
            raise ValueError(
                f"collector batch_interval must be > 0 seconds, "
                f"got {self.batch_interval}"
            )


def _require_positive(key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"collector {key} must be >= 1, got {value}")


@dataclass
class PortCounters:
    """Counters of one listening UDP port (summed over address families)."""

    datagrams: int = 0  # received from the socket(s)
    bytes: int = 0  # payload bytes received
    delivered: int = 0  # datagrams handed to the consumer
    #: datagrams dropped before the consumer, by reason: ``queue_full``
    #: (consumer too slow, bound reached), ``oversize`` (over 65535 bytes),
    #: ``bad_source`` (source address not IPv4/IPv6), ``socket_buffer_full``
    #: (dropped by the kernel: the socket's receive buffer was full; Linux)
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    #: errors the socket reported (ICMP errors, ...)
    receive_errors: int = 0


@dataclass
class CollectorStats:
    """Counters of a :class:`UdpCollector`; read them, do not write them."""

    #: by bound local port
    ports: dict[int, PortCounters] = field(default_factory=dict)
    batches: int = 0  # batches handed to the consumer
    consumer_errors: int = 0  # batches on which the consumer raised
    queued_datagrams: int = 0  # gauge: datagrams waiting or held now
    queued_bytes: int = 0  # gauge: payload bytes waiting or held now

    def totals(self) -> PortCounters:
        """Sum of the per-port counters."""
        total = PortCounters()
        for counters in self.ports.values():
            total.datagrams += counters.datagrams
            total.bytes += counters.bytes
            total.delivered += counters.delivered
            total.dropped.update(counters.dropped)
            total.receive_errors += counters.receive_errors
        return total


class _LogSampler:
    """Let one event through per ``interval`` seconds; count the rest.

    Keeps a flood of bad packets from flooding the log.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def allow(self, event: str) -> int | None:
        """Return the number suppressed since the last one, or None to skip."""
        now = time.monotonic()
        if now < self._next.get(event, 0.0):
            self._suppressed[event] += 1
            return None
        self._next[event] = now + self.interval
        return self._suppressed.pop(event, 0)


@dataclass
class _Listener:
    """One bound socket."""

    address: str
    port: int
    stream: asyncio_dgram.DatagramStream
    counters: PortCounters
    #: the socket's inode (its key in /proc/net/udp*)
    inode: int = 0
    #: datagrams the kernel dropped on this socket, as last read
    kernel_drops: int = 0


#: Where Linux lists UDP sockets with their drop counts.
PROC_NET_UDP: tuple[str, ...] = ("/proc/net/udp", "/proc/net/udp6")
#: Seconds between two reads of the kernel's drop counts.
KERNEL_DROPS_INTERVAL_S = 1.0


def kernel_udp_drops(paths: tuple[str, ...] = PROC_NET_UDP) -> dict[int, int]:
    """Datagrams dropped per UDP socket inode, from Linux's /proc tables.

    Each line after the header ends with ``... inode ref pointer drops``;
    a missing or unreadable file contributes nothing.
    """
    drops: dict[int, int] = {}
    for path in paths:
        try:
            with open(path, encoding="ascii") as table:
                lines = table.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 13:
                continue
            try:
                drops[int(parts[9])] = int(parts[-1])
            except ValueError:
                continue
    return drops


class UdpCollector:
    """Receive flow export datagrams and hand them to ``consumer`` in batches.

    The constructor only stores its arguments; :meth:`start` binds the
    sockets and starts the tasks, :meth:`stop` closes the sockets, hands
    the datagrams already received to the consumer and waits for it.
    ``listening`` gives the bound (address, port) pairs once started.
    """

    def __init__(self, config: CollectorConfig, consumer: BatchConsumer) -> None:
        self.config = config
        self.consumer = consumer
        self.stats = CollectorStats()
        self.listening: list[tuple[str, int]] = []
        #: SO_RCVBUF the kernel granted, bytes (smallest over the sockets)
        self.receive_buffer = 0
        self._listeners: list[_Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._consumer_task: asyncio.Task[None] | None = None
        self._batch: list[Datagram] = []
        self._ready: collections.deque[list[Datagram]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._started = False
        self._sampler = _LogSampler()

    async def start(self) -> None:
        """Bind every socket and start receiving.

        Raises :class:`CollectorError` if any socket cannot be bound (the
        ones already bound are closed again).
        """
        if self._started:
            raise RuntimeError("collector already started")
        self._started = True
        self._wakeup = asyncio.Event()
        has_ipv4 = any(":" not in a for a in self.config.bind_addresses)
        capped: list[int] = []
        try:
            for address in self.config.bind_addresses:
                for port in self.config.ports:
                    sock = self._open_socket(address, port, has_ipv4, capped)
                    stream = await asyncio_dgram.from_socket(sock)
                    host, bound_port = sock.getsockname()[:2]
                    counters = self.stats.ports.setdefault(bound_port, PortCounters())
                    inode = os.fstat(sock.fileno()).st_ino
                    self._listeners.append(
                        _Listener(host, bound_port, stream, counters, inode)
                    )
                    self.listening.append((host, bound_port))
        except BaseException:
            for listener in self._listeners:
                listener.stream.close()
            self._listeners.clear()
            self.listening.clear()
            raise
        if capped:
            log.warning(
                "receive_buffer_capped",
                requested=self.config.receive_buffer,
                granted=min(capped),
                knob="net.core.rmem_max",
            )
        for listener in self._listeners:
            self._tasks.append(asyncio.create_task(self._receive(listener)))
        self._tasks.append(asyncio.create_task(self._flush_periodically()))
        self._consumer_task = asyncio.create_task(self._consume())
        log.info(
            "collector_started",
            listen=[f"{host}:{port}" for host, port in self.listening],
            receive_buffer=self.receive_buffer,
        )

    def _open_socket(
        self, address: str, port: int, has_ipv4: bool, capped: list[int]
    ) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(
                    socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if has_ipv4 else 0
                )
            requested = self.config.receive_buffer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, requested)
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            # Linux reports twice what it grants (bookkeeping overhead).
            if sys.platform.startswith("linux"):
                granted //= 2
            if granted < requested:
                capped.append(granted)
            if not self.receive_buffer or granted < self.receive_buffer:
                self.receive_buffer = granted
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            raise CollectorError(
                f"cannot listen on UDP {address} port {port}: {exc.strerror or exc}"
            ) from exc
        return sock

    async def stop(self) -> None:
        """Close the sockets, deliver what was received, stop the consumer.

        Safe to call more than once, and before :meth:`start`.
        """
        if self._stopping or not self._started:
            return
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self.refresh_kernel_drops()  # the sockets' last counts, while open
        for listener in self._listeners:
            listener.stream.close()
        self._hand_over()
        self._wakeup.set()
        if self._consumer_task is not None:
            await self._consumer_task
            self._consumer_task = None
        totals = self.stats.totals()
        log.info(
            "collector_stopped",
            datagrams=totals.datagrams,
            delivered=totals.delivered,
            dropped=sum(totals.dropped.values()),
        )

    async def _receive(self, listener: _Listener) -> None:
        """Receive loop of one socket.

        ``recv`` returns without yielding to the event loop while datagrams
        are waiting, so this loop drains asyncio-dgram's internal queue as
        fast as the transport fills it.  That queue itself is unbounded; it
        holds at most what the transport reads in one event-loop pass.
        """
        counters = listener.counters
        config = self.config
        stats = self.stats
        while True:
            try:
                payload, source = await listener.stream.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError as exc:
                counters.receive_errors += 1
                suppressed = self._sampler.allow("receive_error")
                if suppressed is not None:
                    log.warning(
                        "receive_error",
                        port=listener.port,
                        error=str(exc),
                        suppressed=suppressed,
                    )
                continue
            size = len(payload)
            counters.datagrams += 1
            counters.bytes += size
            if size > MAX_DATAGRAM:
                counters.dropped["oversize"] += 1
                continue
            if (
                stats.queued_datagrams >= config.max_queued_datagrams
                or stats.queued_bytes + size > config.max_queued_bytes
            ):
                counters.dropped["queue_full"] += 1
                continue
            try:
                if not isinstance(source, tuple):
                    raise TypeError(source)
                exporter = packed_address(source[0])
                exporter_port = int(source[1])
            except (OSError, TypeError, IndexError):
                counters.dropped["bad_source"] += 1
                continue
            stats.queued_datagrams += 1
            stats.queued_bytes += size
            counters.delivered += 1
            self._batch.append(
                Datagram(payload, exporter, exporter_port, time.time_ns() // 1_000_000)
            )
            if len(self._batch) >= config.batch_datagrams:
                self._hand_over()

    def _hand_over(self) -> None:
        """Queue the batch being filled for the consumer."""
        if self._batch:
            self._ready.append(self._batch)
            self._batch = []
            self._wakeup.set()

    async def _flush_periodically(self) -> None:
        """Hand over partial batches so quiet exporters see low latency;
        read the kernel's drop counts about once a second."""
        next_drops = time.monotonic() + KERNEL_DROPS_INTERVAL_S
        while True:
            await asyncio.sleep(self.config.batch_interval)
            self._hand_over()
            if time.monotonic() >= next_drops:
                next_drops = time.monotonic() + KERNEL_DROPS_INTERVAL_S
                self.refresh_kernel_drops()

    def refresh_kernel_drops(self) -> None:
        """Count datagrams the kernel dropped on our sockets since they opened
        (``dropped["socket_buffer_full"]`` per port); warn, rate-limited,
        when the count grows."""
        table = kernel_udp_drops()
        if not table:
            return
        per_port: dict[int, int] = collections.defaultdict(int)
        grown = False
        for listener in self._listeners:
            now = table.get(listener.inode, listener.kernel_drops)
            grown = grown or now > listener.kernel_drops
            listener.kernel_drops = now
            per_port[listener.port] += now
        for port, total in per_port.items():
            if total:
                self.stats.ports[port].dropped["socket_buffer_full"] = total
        if grown:
            suppressed = self._sampler.allow("socket_buffer_full")
            if suppressed is not None:
                log.warning(
                    "socket_buffer_full",
                    dropped={p: t for p, t in per_port.items() if t},
                    receive_buffer=self.receive_buffer,
                    hint="the consumer cannot keep up or the buffer is small: "
                    "raise the receive buffer (relay setting "
                    "collector.rcvbuf_bytes) and net.core.rmem_max",
                    suppressed=suppressed,
                )

    async def _consume(self) -> None:
        """Run the consumer on each queued batch until stopped and drained."""
        while True:
            if not self._ready:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._ready.popleft()
            try:
                result = self.consumer(batch)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self.stats.consumer_errors += 1
                suppressed = self._sampler.allow("consumer_error")
                if suppressed is not None:
                    log.error(
                        "consumer_error",
                        error=repr(exc),
                        datagrams=len(batch),
                        suppressed=suppressed,
                    )
            finally:
                self.stats.batches += 1
                self.stats.queued_datagrams -= len(batch)
                self.stats.queued_bytes -= sum(len(d.payload) for d in batch)
