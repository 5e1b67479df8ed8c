"""The UDP collector over real loopback sockets.

Datagrams are replayed from shared captures with a plain socket; expected
record counts and byte sums come from the captures' tshark CSVs.
"""

from __future__ import annotations

import asyncio
import csv
import ipaddress
import random
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import structlog

from edge_agent.collect.datagram import Datagram
from edge_agent.collect.pcap import read_capture
from edge_agent.collect.udp import CollectorConfig, CollectorError, UdpCollector
from edge_agent.flows.decoder import FlowDecoder
from edge_agent.flows.schema import FLOW_DTYPE

LOOPBACK = CollectorConfig(bind_addresses=("127.0.0.1",), ports=(0,))


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until ``predicate`` holds (loopback delivery is asynchronous)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def tshark_rows(captures_dir: Path, name: str) -> list[dict[str, str]]:
    with (captures_dir / f"{name}.tshark.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def send_all(payloads: list[bytes], address: tuple[str, int]) -> tuple[str, int]:
    """Send with a plain socket; returns the sender's (host, port)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((address[0], 0))
        for payload in payloads:
            sock.sendto(payload, address)
        host, port = sock.getsockname()[:2]
        return host, port


class DecodingSink:
    """A consumer that decodes each batch, as the relay does."""

    def __init__(self) -> None:
        self.decoder = FlowDecoder()
        self.parts: list[np.ndarray] = []
        self.batches: list[int] = []

    def __call__(self, batch: list[Datagram]) -> None:
        self.batches.append(len(batch))
        self.parts.append(self.decoder.decode_many(batch))

    @property
    def records(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, FLOW_DTYPE)


@pytest.mark.integration
def test_replayed_captures_are_received_and_decoded(captures_dir: Path) -> None:
    """Every replayed datagram is received; decoded records match the
    tshark record counts and byte sums of a NetFlow v5 and an IPFIX capture."""
    names = ["nf5-freebsd-ng_netflow.pcap", "w-ipfix-mikrotik.pcap"]
    payloads = {
        n: [d.payload for d in read_capture(captures_dir / n)[0]] for n in names
    }
    sink = DecodingSink()

    async def scenario() -> dict[str, tuple[str, int]]:
        collector = UdpCollector(LOOPBACK, sink)
        await collector.start()
        (address,) = collector.listening
        senders = {n: send_all(payloads[n], address) for n in names}
        total = sum(len(p) for p in payloads.values())
        await wait_for(lambda: collector.stats.totals().datagrams == total)
        await collector.stop()
        counters = collector.stats.ports[address[1]]
        assert counters.datagrams == counters.delivered == total
        assert counters.dropped == {}
        return senders

    senders = asyncio.run(scenario())
    records = sink.records
    assert records.dtype == FLOW_DTYPE
    for name in names:
        rows = tshark_rows(captures_dir, name)
        host, port = senders[name]
        mask = (records["exporter_port"] == port) & (
            records["exporter"]
            == np.frombuffer(
                b"\x00" * 10 + b"\xff\xff" + ipaddress.IPv4Address(host).packed,
                dtype="V16",
            )
        )
        assert int(mask.sum()) == len(rows)
        assert int(records["bytes"][mask].sum()) == sum(int(r["bytes"]) for r in rows)
    stats = sink.decoder.stats.totals()
    assert stats.datagrams == sum(len(p) for p in payloads.values())


@pytest.mark.integration
def test_ipv6_and_dual_stack_sockets(captures_dir: Path) -> None:
    """An IPv6 socket gives the sender's IPv6 address; a lone '::' socket
    is dual-stack and gives IPv4 senders as IPv4-mapped addresses."""
    (datagram,), _ = read_capture(captures_dir / "nf5-akvorado-router.pcap")
    received: list[Datagram] = []

    async def scenario() -> None:
        only_v6 = UdpCollector(
            CollectorConfig(bind_addresses=("::1",), ports=(0,)), received.extend
        )
        dual = UdpCollector(
            CollectorConfig(bind_addresses=("::",), ports=(0,)), received.extend
        )
        await only_v6.start()
        await dual.start()
        send_all([datagram.payload], ("::1", only_v6.listening[0][1]))
        send_all([datagram.payload], ("127.0.0.1", dual.listening[0][1]))
        await wait_for(lambda: len(received) == 2)
        await only_v6.stop()
        await dual.stop()

    asyncio.run(scenario())
    assert sorted(d.exporter for d in received) == sorted(
        [
            ipaddress.IPv6Address("::1").packed,
            b"\x00" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1]),
        ]
    )
    assert all(d.payload == datagram.payload for d in received)


@pytest.mark.integration
def test_queue_full_drops_are_counted() -> None:
    """With the consumer stuck, datagrams past the queue bound are dropped
    and counted as queue_full; the held ones are delivered after."""
    release = asyncio.Event()
    delivered: list[int] = []

    async def stuck_consumer(batch: list[Datagram]) -> None:
        await release.wait()
        delivered.append(len(batch))

    async def scenario() -> None:
        release.clear()
        config = CollectorConfig(
            bind_addresses=("127.0.0.1",),
            ports=(0,),
            batch_datagrams=1,
            max_queued_datagrams=10,
        )
        collector = UdpCollector(config, stuck_consumer)
        await collector.start()
        (address,) = collector.listening
        send_all([b"\x00\x05" + bytes(22)] * 50, address)
        await wait_for(lambda: collector.stats.totals().datagrams == 50)
        counters = collector.stats.ports[address[1]]
        assert counters.dropped == {"queue_full": 40}  # 50 sent - 10 bound
        assert collector.stats.queued_datagrams == 10
        release.set()
        await collector.stop()
        assert collector.stats.queued_datagrams == 0

    asyncio.run(scenario())
    assert sum(delivered) == 10


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kernel_socket_buffer_drops_are_counted() -> None:
    """Datagrams the kernel drops because the socket buffer is full (the
    event loop blocked while 2,000 datagrams arrive into a tiny buffer) are
    counted as socket_buffer_full: received + dropped == sent, exactly."""
    sent = 2000

    async def scenario() -> None:
        config = CollectorConfig(
            bind_addresses=("127.0.0.1",),
            ports=(0,),
            receive_buffer=4096,
            max_queued_datagrams=sent,
        )
        collector = UdpCollector(config, lambda batch: None)
        await collector.start()
        (address,) = collector.listening
        # The loop does not run while this sends: the kernel buffer fills.
        send_all([b"\x00\x05" + bytes(998)] * sent, address)
        await asyncio.sleep(0.2)
        await wait_for(lambda: collector.stats.totals().datagrams > 0)
        await collector.stop()
        counters = collector.stats.ports[address[1]]
        kernel = counters.dropped["socket_buffer_full"]
        assert kernel > 0
        assert counters.datagrams + kernel == sent
        assert set(counters.dropped) == {"socket_buffer_full"}

    asyncio.run(scenario())


@pytest.mark.integration
def test_queue_byte_bound() -> None:
    """The byte bound drops too: 1000-byte datagrams under a 65535-byte cap
    keep 65 (65 * 1000 <= 65535 < 66 * 1000)."""
    release = asyncio.Event()

    async def stuck_consumer(batch: list[Datagram]) -> None:
        await release.wait()

    async def scenario() -> None:
        config = CollectorConfig(
            bind_addresses=("127.0.0.1",),
            ports=(0,),
            batch_datagrams=4,
            max_queued_bytes=65535,
        )
        collector = UdpCollector(config, stuck_consumer)
        await collector.start()
        (address,) = collector.listening
        send_all([bytes(1000)] * 100, address)
        await wait_for(lambda: collector.stats.totals().datagrams == 100)
        assert collector.stats.totals().dropped == {"queue_full": 35}
        assert collector.stats.queued_bytes == 65000
        release.set()
        await collector.stop()

    asyncio.run(scenario())


@pytest.mark.integration
def test_garbage_is_counted_and_the_collector_keeps_going(captures_dir: Path) -> None:
    """Garbage datagrams are received, each counted as a decode error, and
    a real datagram sent afterwards is still decoded."""
    garbage = [
        b"",
        b"\x00",
        b"\xff" * 3,
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x00\x05" + b"\xff" * 10,  # v5 header cut short
        b"\x00\x09\x00\x01" + bytes(16) + b"\x01\x00\x00\x00",  # set length 0
        b"\x00\x0a\xff\xff" + bytes(12),  # IPFIX length beyond datagram
        b"\xde\xad" + random.Random(7).randbytes(1398),
        bytes(65507),  # the largest IPv4 UDP payload
    ]
    (real,), _ = read_capture(captures_dir / "nf5-akvorado-router.pcap")
    sink = DecodingSink()

    async def scenario() -> None:
        collector = UdpCollector(LOOPBACK, sink)
        await collector.start()
        (address,) = collector.listening
        send_all(garbage, address)
        await wait_for(lambda: collector.stats.totals().datagrams == len(garbage))
        send_all([real.payload], address)
        await wait_for(lambda: collector.stats.totals().datagrams == len(garbage) + 1)
        await collector.stop()
        assert collector.stats.consumer_errors == 0

    asyncio.run(scenario())
    totals = sink.decoder.stats.totals()
    assert totals.datagrams == len(garbage) + 1
    assert sum(totals.errors.values()) >= len(garbage)
    assert len(sink.records) == 29  # the real datagram (tshark: 29 records)


@pytest.mark.integration
def test_batches_respect_the_batch_size() -> None:
    """Batches hold at most batch_datagrams; partial batches are flushed."""
    batches: list[list[Datagram]] = []

    async def scenario() -> None:
        config = CollectorConfig(
            bind_addresses=("127.0.0.1",), ports=(0, 0), batch_datagrams=8
        )
        collector = UdpCollector(config, batches.append)
        await collector.start()
        first, second = collector.listening
        send_all([bytes([i]) for i in range(20)], first)
        send_all([bytes([i]) for i in range(3)], second)
        await wait_for(lambda: sum(len(b) for b in batches) == 23)
        assert {p: c.datagrams for p, c in collector.stats.ports.items()} == {
            first[1]: 20,
            second[1]: 3,
        }
        await collector.stop()

    asyncio.run(scenario())
    assert all(1 <= len(b) <= 8 for b in batches)


@pytest.mark.integration
def test_consumer_errors_are_counted_not_fatal() -> None:
    """A consumer that raises is counted; later batches still arrive."""
    seen: list[int] = []

    def flaky(batch: list[Datagram]) -> None:
        seen.append(len(batch))
        if len(seen) == 1:
            raise RuntimeError("boom")

    async def scenario() -> None:
        config = CollectorConfig(
            bind_addresses=("127.0.0.1",), ports=(0,), batch_datagrams=1
        )
        collector = UdpCollector(config, flaky)
        await collector.start()
        send_all([b"a", b"b", b"c"], collector.listening[0])
        await wait_for(lambda: len(seen) == 3)
        await collector.stop()
        assert collector.stats.consumer_errors == 1
        assert collector.stats.batches == 3

    asyncio.run(scenario())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_receive_buffer_cap_logs_one_warning() -> None:
    """Asking for more than net.core.rmem_max logs exactly one warning naming
    the sysctl (for two sockets); asking for less logs none."""
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())

    async def start_stop(receive_buffer: int) -> int:
        config = CollectorConfig(
            bind_addresses=("127.0.0.1",),
            ports=(0, 0),
            receive_buffer=receive_buffer,
        )
        collector = UdpCollector(config, lambda batch: None)
        await collector.start()
        await collector.stop()
        return collector.receive_buffer

    with structlog.testing.capture_logs() as logs:
        granted = asyncio.run(start_stop(rmem_max * 2))
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "receive_buffer_capped"
    assert warnings[0]["knob"] == "net.core.rmem_max"
    assert granted == rmem_max

    with structlog.testing.capture_logs() as logs:
        granted = asyncio.run(start_stop(rmem_max // 4))
    assert [e for e in logs if e["log_level"] == "warning"] == []
    assert granted == rmem_max // 4


@pytest.mark.integration
def test_port_in_use_raises_collector_error() -> None:
    """Binding a port already taken raises CollectorError naming the port."""

    async def scenario() -> None:
        first = UdpCollector(LOOPBACK, lambda batch: None)
        await first.start()
        port = first.listening[0][1]
        second = UdpCollector(
            CollectorConfig(bind_addresses=("127.0.0.1",), ports=(0, port)),
            lambda batch: None,
        )
        with pytest.raises(CollectorError, match=f"port {port}"):
            await second.start()
        assert second.listening == []
        await first.stop()

    asyncio.run(scenario())


def test_config_errors_name_the_key_and_value() -> None:
    """Bad configuration values are rejected with the key and the value."""
    with pytest.raises(ValueError, match=r"bind_addresses.*'localhost'"):
        CollectorConfig(bind_addresses=("localhost",))
    with pytest.raises(ValueError, match="ports: 70000"):
        CollectorConfig(ports=(70000,))
    with pytest.raises(ValueError, match="batch_datagrams must be >= 1, got 0"):
        CollectorConfig(batch_datagrams=0)
    with pytest.raises(ValueError, match="max_queued_bytes must be >= 65535"):
        CollectorConfig(max_queued_bytes=1000)


def test_stop_before_start_is_harmless() -> None:
    """stop() on a collector never started does nothing."""
    collector = UdpCollector(CollectorConfig(), lambda batch: None)
    asyncio.run(collector.stop())
    assert collector.listening == []
