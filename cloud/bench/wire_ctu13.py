"""``sampleflow bench wire-ctu13``: bytes shipped per record on a real network.

``sampleflow bench wire`` measures the shared captures, a few records per
batch.  This is the same measurement on two hours of one real network:
CTU-13 scenario 6 (:mod:`cloud.training.ctu13`), replayed as a router
sampling 1 packet in ``rate`` would (binomial thinning, 60 s active
timeout), exported as IPFIX by the demo's exporter
(:class:`cloud.local.exporter.IpfixExporter`: records leave in the second
their flow ends, templates and the sampling options record every 30 s),
and the resulting datagrams run through the relay's own path (decode,
10 s windows with 30 s lateness, the filter with the CTU network
147.32.0.0/16 internal, encode) by
:func:`edge_agent.relay.bench.measure_datagrams` (cloud.bench.commands).

"Raw" is the IPFIX export itself (UDP payloads, templates included); the
JSON baseline gzips the decoded records as JSON lines, one stream per
exporter and window of receive time, as the shared-captures bench does;
"v1" is the same batches in wire format version 1, in the same run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from cloud.local.exporter import ExporterConfig, IpfixExporter
from cloud.training import ctu13
from edge_agent.collect.datagram import Datagram
from edge_agent.flows.schema import address_bytes
from edge_agent.relay.bench import TARGET_VS_GZIP_JSON, TARGET_VS_RAW, CaptureResult

#: The address the replayed router exports from (the demo's).
EXPORTER = "127.0.0.6"
IPFIX_PORT = 4739


@dataclass(frozen=True)
class Ctu13Replay:
    """The IPFIX datagrams of a replay and what went into them."""

    datagrams: list[Datagram]
    records: int  # sampled records handed to the exporter
    exported: int  # data records the exporter wrote
    template_messages: int


def ctu13_datagrams(
    rate: int = 100, seed: int = 6, slices: Sequence[int] | None = None
) -> Ctu13Replay:
    """CTU-13 sampled at 1:``rate``, exported as IPFIX second by second of
    flow end; each datagram received at its export time."""
    records, _ = ctu13.sampled_records(rate, seed, slices=slices)
    records = records[np.argsort(records["time_end"], kind="stable")]
    exporter = IpfixExporter(ExporterConfig(sampling_rate=rate))
    address = address_bytes(EXPORTER)
    second = records["time_end"] // 1000
    bounds = np.flatnonzero(np.diff(second)) + 1
    datagrams = []
    for chunk in np.split(records, bounds):
        if not chunk.size:
            continue
        export_s = int(chunk["time_end"][-1] // 1000)
        for message in exporter.encode(chunk, export_s):
            datagrams.append(Datagram(message, address, IPFIX_PORT, export_s * 1000))
    return Ctu13Replay(
        datagrams=datagrams,
        records=int(records.size),
        exported=int(exporter.stats.records),
        template_messages=int(exporter.stats.template_messages),
    )


def print_wire_report(results: Sequence[CaptureResult], stream: TextIO) -> None:
    """One line per window length, the read-back check, the targets."""
    header = (
        f"{'':<14} {'recs':>8} {'rows':>8} {'btch':>6} {'ship B/r':>8} "
        f"{'raw B/r':>8} {'gzj B/r':>8} {'gzj1 B/r':>8} {'raw/ship':>8} "
        f"{'gzj/ship':>8} {'gzj1/ship':>9} {'v1 B/r':>7}"
    )
    print(header, file=stream)
    print("-" * len(header), file=stream)
    for r in results:
        n = r.records
        print(
            f"{r.name:<14} {n:>8,} {r.rows:>8,} {r.batches:>6,} "
            f"{r.shipped_bytes / n:>8.2f} {r.export_bytes / n:>8.2f} "
            f"{r.gzip_json_bytes / n:>8.2f} {r.gzip_json_stream_bytes / n:>8.2f} "
            f"{r.export_bytes / r.shipped_bytes:>7.1f}x "
            f"{r.gzip_json_bytes / r.shipped_bytes:>7.1f}x "
            f"{r.gzip_json_stream_bytes / r.shipped_bytes:>8.1f}x "
            f"{r.shipped_v1_bytes / n:>7.2f}",
            file=stream,
        )
    print(
        "\nB/r: bytes per decoded flow record.  ship: batch data + partition "
        "key; raw: the IPFIX datagrams (templates and options included); gzj: "
        "JSON lines of the decoded records gzipped per window and exporter, "
        "+ partition key; gzj1: the same as one gzip stream; v1: as shipped in "
        "wire format version 1.",
        file=stream,
    )
    for r in results:
        conserved = (r.shipped_flows, r.shipped_octets, r.shipped_packets) == (
            r.records,
            r.decoded_octets,
            r.decoded_packets,
        )
        print(
            f"{r.name}: batches read back hold {r.shipped_flows:,} records, "
            f"{r.shipped_octets:,} bytes, {r.shipped_packets:,} packets "
            f"({'equal to' if conserved else 'DIFFERENT FROM'} the decoded ones)",
            file=stream,
        )
        for label, ratio, target in (
            ("vs raw IPFIX", r.export_bytes / r.shipped_bytes, TARGET_VS_RAW),
            (
                "vs gzip'd JSON per batch",
                r.gzip_json_bytes / r.shipped_bytes,
                TARGET_VS_GZIP_JSON,
            ),
            ("version 1 vs raw IPFIX", r.export_bytes / r.shipped_v1_bytes,
             TARGET_VS_RAW),
            ("version 1 vs gzip'd JSON per batch",
             r.gzip_json_bytes / r.shipped_v1_bytes, TARGET_VS_GZIP_JSON),
        ):  # fmt: skip
            verdict = "meets" if ratio >= target else "MISSES"
            print(
                f"  {label}: {ratio:.1f}x ({verdict} the {target:.0f}x target)",
                file=stream,
            )
