"""Measure sFlow decode throughput on one core, from memory.

Loads every sFlow v5 datagram of the shared captures (``sflow-*.pcap`` and
``w-goflow2-sflow.pcap``), replicates them in memory and decodes them in a
loop with one :class:`SflowDecoder`.  Prints flow samples per second for the
datagrams that carry flow samples, and datagrams per second for the whole
mix (counter-sample datagrams included).  Rates are per second of this
process's CPU time, best of ``--rounds`` rounds, so a busy shared machine
disturbs the figure less.

    python scripts/bench_sflow.py [--shared PATH] [--seconds 1.0] [--rounds 5]
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

import dpkt

from edge_agent.flows.counters import ExporterCounters
from edge_agent.flows.sampling import SamplingTable
from edge_agent.flows.schema import address_bytes
from edge_agent.flows.sflow import SflowDecoder

Datagram = tuple[bytes, bytes, int]


def load_datagrams(captures: Path) -> list[Datagram]:
    """Return (payload, exporter, port) of every sFlow datagram found."""
    paths = [*sorted(captures.glob("sflow-*.pcap")), captures / "w-goflow2-sflow.pcap"]
    out: list[Datagram] = []
    for path in paths:
        with path.open("rb") as handle:
            for _ts, frame in dpkt.pcap.Reader(handle):
                ip = dpkt.ethernet.Ethernet(frame).data
                if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6):
                    continue
                udp = ip.data
                if not isinstance(udp, dpkt.udp.UDP):
                    continue
                payload = bytes(udp.data)
                if payload[:4] != b"\x00\x00\x00\x05":
                    continue
                family = socket.AF_INET if len(ip.src) == 4 else socket.AF_INET6
                exporter = address_bytes(socket.inet_ntop(family, ip.src))
                out.append((payload, exporter, udp.sport))
    return out


def measure(
    datagrams: list[Datagram], seconds: float, rounds: int
) -> tuple[float, float]:
    """Best (flow samples/s, datagrams/s) over ``rounds`` runs of ``seconds``."""
    best_samples = best_datagrams = 0.0
    for _ in range(rounds):
        decoder = SflowDecoder(SamplingTable())
        counters = ExporterCounters()
        decode = decoder.decode
        samples = count = 0
        # CPU time of this process: on a shared machine the wall clock also
        # counts the time other processes held the core.
        start = time.process_time()
        deadline = start + seconds
        while time.process_time() < deadline:
            for payload, exporter, port in datagrams:
                samples += len(decode(payload, exporter, port, 0, counters))
            count += len(datagrams)
            decoder.counter_samples.clear()
        elapsed = time.process_time() - start
        best_samples = max(best_samples, samples / elapsed)
        best_datagrams = max(best_datagrams, count / elapsed)
    return best_samples, best_datagrams


def main() -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_shared = Path(__file__).resolve().parents[1].parent / "shared"
    parser.add_argument("--shared", type=Path, default=default_shared)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    datagrams = load_datagrams(args.shared / "captures")
    if not datagrams:
        print(f"no sFlow datagrams under {args.shared / 'captures'}", file=sys.stderr)
        return 1
    probe = SflowDecoder(SamplingTable())
    flow_datagrams = [
        d
        for d in datagrams
        if len(probe.decode(d[0], d[1], d[2], 0, ExporterCounters()))
    ]
    per_datagram = sum(
        len(probe.decode(d[0], d[1], d[2], 0, ExporterCounters()))
        for d in flow_datagrams
    ) / len(flow_datagrams)
    samples, flow_rate = measure(flow_datagrams, args.seconds, args.rounds)
    full = [
        d for d in flow_datagrams if len(probe.decode(*d, 0, ExporterCounters())) >= 5
    ]
    full_samples, _ = measure(full, args.seconds, args.rounds)
    _, mix_rate = measure(datagrams, args.seconds, args.rounds)
    print(
        f"flow datagrams: {len(flow_datagrams)} distinct, "
        f"{per_datagram:.1f} flow samples each"
    )
    print(f"  {samples:,.0f} flow samples/s ({flow_rate:,.0f} datagrams/s)")
    print(f"full datagrams only (5 flow samples each): {len(full)} distinct")
    print(f"  {full_samples:,.0f} flow samples/s")
    print(f"all datagrams (counters included): {len(datagrams)} distinct")
    print(f"  {mix_rate:,.0f} datagrams/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
