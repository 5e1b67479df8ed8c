"""``sampleflow bench wire``: bytes shipped per flow record, and speeds.

Each capture is replayed through the relay's own path: decode, aggregate
(windows and lateness as configured, watermark = capture time), filter and
encode (:class:`~edge_agent.relay.encode.WindowEncoder` with the default
``[filter]`` settings: the shipped model, private ranges internal; one
batch or more per window and exporter, express rows apart).  Three sizes
are set against what the relay ships (data plus partition key):

* the raw export: the UDP payload bytes of the capture (templates and
  options included: a collector receives them all);
* gzip'd JSON lines of the decoded records, one gzip stream per exporter
  per window of receive time (what a relay shipping JSON would send), plus
  the same partition key per record;
* the same JSON lines gzipped as one stream per capture, the kindest case
  for gzip (no per-batch restart).

A fourth column, "1 batch", encodes all of a capture's aggregated rows in
one batch: what a record costs once the fixed cost of a batch (header,
column descriptors, zstd frame: ~150 bytes) is spread over many rows, as
it is on a busy exporter.  Most shared captures hold a handful of records
per 10 s window, so the as-shipped figure is dominated by that fixed cost.
A fifth, "v1", is the same batches written in wire format version 1 in
the same run (the encoder called twice on every group), for comparison.

Speeds (records/s of aggregation, rows/s of encode and decode, the encoder
in both format versions) are measured on the decoded records of every
capture tiled to ``speed_records``, with source ports spread so that there
are about a tenth as many keys as records, all in one 10 s window.
"""

from __future__ import annotations

import gzip
import itertools
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from edge_agent.aggregate import (
    AggregatedWindow,
    Aggregator,
    reduce_rows,
    to_aggregate_rows,
)
from edge_agent.collect.datagram import Datagram
from edge_agent.collect.pcap import read_capture
from edge_agent.filter import RelayFilter
from edge_agent.filter.model import default_model_manifest
from edge_agent.flows.decoder import FlowDecoder
from edge_agent.flows.schema import FLOW_COLUMNS, FLOW_DTYPE, address_text
from edge_agent.relay.config import FilterSettings
from edge_agent.relay.encode import WindowEncoder
from edge_agent.relay.partition import partition_key
from edge_agent.wire import EncodedBatch, HeaderFields, decode_batch, encode_batches

_TENANT = "tenant-0001"
_RELAY = "relay-0001"
_ADDRESS_COLUMNS = frozenset({"exporter", "src_addr", "dst_addr", "next_hop"})
TARGET_VS_RAW = 10.0
TARGET_VS_GZIP_JSON = 3.0


class BenchError(Exception):
    """The benchmark cannot run (no captures, nothing decoded)."""


@dataclass(frozen=True)
class CaptureResult:
    """Sizes for one capture, bytes."""

    name: str
    records: int  # decoded flow records
    rows: int  # aggregated rows shipped
    batches: int
    export_bytes: int  # UDP payloads of the capture
    shipped_bytes: int  # batch data + partition keys
    gzip_json_bytes: int  # JSON lines gzipped per batch
    gzip_json_stream_bytes: int  # JSON lines gzipped as one stream
    one_batch_bytes: int  # all rows in one batch
    #: read back from the batches shipped: flow records, bytes, packets
    #: (equal to the decoded records' when nothing was lost)
    shipped_flows: int = 0
    shipped_octets: int = 0
    shipped_packets: int = 0
    decoded_octets: int = 0  # bytes of the decoded records
    decoded_packets: int = 0
    shipped_v1_bytes: int = 0  # the same batches in wire format version 1


@dataclass(frozen=True)
class SpeedResult:
    """Throughput on one core, median of the rounds."""

    records: int
    rows: int
    aggregate_records_per_s: float
    encode_rows_per_s: float
    decode_rows_per_s: float
    encode_v1_rows_per_s: float = 0.0  # the version 1 encoder, same rows


def _json_lines(records: np.ndarray) -> bytes:
    names = [n for n in FLOW_COLUMNS if n in (records.dtype.names or ())]
    lines = []
    for rec in records:
        obj = {}
        for name in names:
            value = rec[name]
            obj[name] = (
                address_text(bytes(value)) if name in _ADDRESS_COLUMNS else int(value)
            )
        lines.append(json.dumps(obj, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode()


def default_filter(internal_networks: Sequence[str] = ()) -> RelayFilter:
    """A filter as ``relay run`` makes it with the default ``[filter]``
    (plus ``internal_networks``, as ``filter.internal_networks``)."""
    settings = FilterSettings(internal_networks=tuple(internal_networks))
    return RelayFilter(
        settings.networks,
        default_model_manifest(),
        alert_threshold=settings.threshold,
        history_rows=settings.history_rows,
    )


def measure_capture(
    path: Path,
    window_ms: int = 10_000,
    lateness_ms: int = 30_000,
    relay_filter: RelayFilter | None = None,
) -> CaptureResult:
    """Replay one capture through decode, aggregate, filter (None: off) and
    encode; measure."""
    datagrams, _ = read_capture(path)
    return measure_datagrams(path.name, datagrams, window_ms, lateness_ms, relay_filter)


def measure_datagrams(
    name: str,
    datagrams: Sequence[Datagram],
    window_ms: int = 10_000,
    lateness_ms: int = 30_000,
    relay_filter: RelayFilter | None = None,
) -> CaptureResult:
    """:func:`measure_capture` on datagrams in hand (``received_ms`` is the
    watermark, as a capture's timestamps are)."""
    decoder = FlowDecoder()
    aggregator = Aggregator(window_ms=window_ms, lateness_ms=lateness_ms)
    inputs: list[np.ndarray] = []
    received: list[np.ndarray] = []
    windows: list[AggregatedWindow] = []
    for datagram in datagrams:
        records = decoder.decode_many([datagram])
        inputs.append(records)
        received.append(np.full(records.shape[0], datagram.received_ms))
        windows += aggregator.add(records, datagram.received_ms)
        windows += aggregator.advance(datagram.received_ms)
    windows += aggregator.flush()
    records = np.concatenate(inputs) if inputs else np.zeros(0, dtype=FLOW_DTYPE)
    seq = itertools.count(1).__next__
    shipped = batches = rows = 0
    back = np.zeros(3, dtype=np.uint64)  # flows, bytes, packets read back
    v1_bytes = [0]

    def encode_both(
        records: np.ndarray, fields: HeaderFields, *args: Any, **kwargs: Any
    ) -> list[EncodedBatch]:
        v1 = encode_batches(records, fields, *args, **{**kwargs, "format_major": 1})
        v1_bytes[0] += sum(b.record_bytes for b in v1)
        return encode_batches(records, fields, *args, **kwargs)

    encoder = WindowEncoder(
        _TENANT, _RELAY, "exporter", relay_filter, encode=encode_both
    )
    for window in windows:
        for group in encoder.encode(window, seq):
            if group.error is not None:
                raise BenchError(f"{name}: {group.error}")
            shipped += sum(b.record_bytes for b in group.batches)
            batches += len(group.batches)
            rows += group.rows
            for batch in group.batches:
                columns = decode_batch(batch.data).columns
                for i, column in enumerate(("flow_count", "bytes", "packets")):
                    back[i] += columns[column].sum(dtype=np.uint64)
    # The JSON baseline ships what arrived per exporter every window_ms of
    # receive time, one gzip stream each.
    gzip_json = 0
    if records.shape[0]:
        slot = np.concatenate(received) // window_ms
        for s in np.unique(slot):
            for exporter, part in _by_exporter(records[slot == s]):
                key = partition_key("exporter", _TENANT, _RELAY, exporter)
                gzip_json += len(gzip.compress(_json_lines(part))) + len(key)
    all_rows = reduce_rows(to_aggregate_rows(records))
    one_batch = sum(
        b.record_bytes
        for b in encode_batches(
            all_rows,
            HeaderFields(_TENANT, _RELAY, 0, window_ms),
            seq,
            partition_key("exporter", _TENANT, _RELAY, bytes(16)),
        )
    )
    stream = len(gzip.compress(_json_lines(records))) if records.shape[0] else 0
    return CaptureResult(
        name=name,
        records=int(records.shape[0]),
        rows=rows,
        batches=batches,
        export_bytes=sum(len(d.payload) for d in datagrams),
        shipped_bytes=shipped,
        gzip_json_bytes=gzip_json,
        gzip_json_stream_bytes=stream,
        one_batch_bytes=one_batch,
        shipped_flows=int(back[0]),
        shipped_octets=int(back[1]),
        shipped_packets=int(back[2]),
        decoded_octets=int(records["bytes"].sum(dtype=np.uint64)),
        decoded_packets=int(records["packets"].sum(dtype=np.uint64)),
        shipped_v1_bytes=v1_bytes[0],
    )


def _by_exporter(rows: np.ndarray) -> Iterator[tuple[bytes, np.ndarray]]:
    for exporter in np.unique(rows["exporter"]):
        yield bytes(exporter), rows[rows["exporter"] == exporter]


def _median_rate(count: int, seconds: list[float]) -> float:
    return count / sorted(seconds)[len(seconds) // 2]


def measure_speed(
    records: np.ndarray, speed_records: int = 1_000_000, rounds: int = 3
) -> SpeedResult:
    """Aggregation, encode and decode throughput on tiled real records."""
    if records.shape[0] == 0:
        raise BenchError("no decoded records to measure speed on")
    reps = -(-speed_records // records.shape[0])
    big = np.tile(records, reps)[:speed_records].copy()
    rng = np.random.default_rng(1)
    # Source ports spread so that about one record in ten has a key of its
    # own (the real records bring their addresses, ports and exporters).
    spread = max(1, speed_records // (10 * records.shape[0]))
    big["src_port"] = big["src_port"] + rng.integers(0, spread, speed_records)
    big["time_end"] = 1_700_000_000_000 + rng.integers(0, 10_000, speed_records)
    big["time_start"] = big["time_end"]
    agg_times = []
    rows = np.zeros(0)
    for _ in range(rounds):
        aggregator = Aggregator(max_keys=speed_records, lateness_ms=0)
        started = time.process_time()
        for lo in range(0, speed_records, 65_536):
            aggregator.add(big[lo : lo + 65_536], 1_700_000_009_999)
        windows = aggregator.flush()
        agg_times.append(time.process_time() - started)
        rows = np.concatenate([w.records for w in windows])
    fields = HeaderFields(_TENANT, _RELAY, 0, 10_000)
    seq = itertools.count(1).__next__
    enc_times, enc_v1_times, dec_times = [], [], []
    batches = []
    for _ in range(rounds):
        started = time.process_time()
        encode_batches(rows, fields, seq, "k", format_major=1)
        enc_v1_times.append(time.process_time() - started)
        started = time.process_time()
        batches = encode_batches(rows, fields, seq, "k")
        enc_times.append(time.process_time() - started)
        started = time.process_time()
        for batch in batches:
            decode_batch(batch.data)
        dec_times.append(time.process_time() - started)
    return SpeedResult(
        records=speed_records,
        rows=int(rows.shape[0]),
        aggregate_records_per_s=_median_rate(speed_records, agg_times),
        encode_rows_per_s=_median_rate(int(rows.shape[0]), enc_times),
        decode_rows_per_s=_median_rate(int(rows.shape[0]), dec_times),
        encode_v1_rows_per_s=_median_rate(int(rows.shape[0]), enc_v1_times),
    )


def run_benchmark(
    captures: Path,
    window_ms: int = 10_000,
    lateness_ms: int = 30_000,
    speed_records: int = 1_000_000,
    *,
    use_filter: bool = True,
) -> tuple[list[CaptureResult], SpeedResult | None]:
    """Measure every ``*.pcap`` in ``captures`` (and the speeds, unless
    ``speed_records`` is 0), with the default filter or none."""
    paths = sorted(captures.glob("*.pcap"))
    if not paths:
        raise BenchError(f"no .pcap files in {captures}")
    results = [
        measure_capture(
            p, window_ms, lateness_ms, default_filter() if use_filter else None
        )
        for p in paths
    ]
    results = [r for r in results if r.records]
    if not results:
        raise BenchError(f"no flow records decoded from {captures}")
    speed = None
    if speed_records:
        decoder = FlowDecoder()
        parts = [decoder.decode_many(read_capture(p)[0]) for p in paths]
        speed = measure_speed(np.concatenate(parts), speed_records)
    return results, speed


def _ratio(numerator: int, denominator: int) -> str:
    return f"{numerator / denominator:.1f}x" if denominator else "n/a"


def print_report(
    results: Sequence[CaptureResult], speed: SpeedResult | None, stream: TextIO
) -> None:
    """Print the per-capture table, the totals with targets, and speeds."""
    header = (
        f"{'capture':<42} {'recs':>5} {'rows':>5} {'btch':>4} "
        f"{'ship B/r':>8} {'raw B/r':>7} {'gzj B/r':>7} {'1btch B/r':>9} "
        f"{'raw/ship':>8} {'gzj/ship':>8} {'v1 B/r':>7}"
    )
    print(header, file=stream)
    print("-" * len(header), file=stream)
    for r in results:
        n = r.records
        print(
            f"{r.name[:42]:<42} {n:>5} {r.rows:>5} {r.batches:>4} "
            f"{r.shipped_bytes / n:>8.1f} {r.export_bytes / n:>7.1f} "
            f"{r.gzip_json_bytes / n:>7.1f} {r.one_batch_bytes / n:>9.1f} "
            f"{_ratio(r.export_bytes, r.shipped_bytes):>8} "
            f"{_ratio(r.gzip_json_bytes, r.shipped_bytes):>8} "
            f"{r.shipped_v1_bytes / n:>7.1f}",
            file=stream,
        )
    total = {
        f: sum(getattr(r, f) for r in results)
        for f in (
            "records",
            "rows",
            "batches",
            "export_bytes",
            "shipped_bytes",
            "gzip_json_bytes",
            "gzip_json_stream_bytes",
            "one_batch_bytes",
            "shipped_v1_bytes",
        )
    }
    n = total["records"]
    print("-" * len(header), file=stream)
    print(
        f"{'all captures':<42} {n:>5} {total['rows']:>5} {total['batches']:>4} "
        f"{total['shipped_bytes'] / n:>8.1f} {total['export_bytes'] / n:>7.1f} "
        f"{total['gzip_json_bytes'] / n:>7.1f} {total['one_batch_bytes'] / n:>9.1f} "
        f"{_ratio(total['export_bytes'], total['shipped_bytes']):>8} "
        f"{_ratio(total['gzip_json_bytes'], total['shipped_bytes']):>8} "
        f"{total['shipped_v1_bytes'] / n:>7.1f}",
        file=stream,
    )
    print(file=stream)
    print(
        "B/r: bytes per decoded flow record. ship: batch data + partition key "
        "as shipped (one batch per window and exporter); raw: UDP payloads of "
        "the capture; gzj: JSON lines of the decoded records gzipped per "
        "exporter and window, + partition key; 1btch: all of a capture's rows "
        "in one batch; v1: as shipped in wire format version 1; rates in CPU "
        "time.",
        file=stream,
    )
    lines = [
        ("as shipped vs raw export", total["export_bytes"], total["shipped_bytes"],
         TARGET_VS_RAW),
        ("as shipped vs gzip'd JSON per batch", total["gzip_json_bytes"],
         total["shipped_bytes"], TARGET_VS_GZIP_JSON),
        ("as shipped vs gzip'd JSON, one stream", total["gzip_json_stream_bytes"],
         total["shipped_bytes"], TARGET_VS_GZIP_JSON),
        ("1 batch vs raw export", total["export_bytes"], total["one_batch_bytes"],
         TARGET_VS_RAW),
        ("1 batch vs gzip'd JSON, one stream", total["gzip_json_stream_bytes"],
         total["one_batch_bytes"], TARGET_VS_GZIP_JSON),
        ("version 1 as shipped vs raw export", total["export_bytes"],
         total["shipped_v1_bytes"], TARGET_VS_RAW),
        ("version 1 vs gzip'd JSON per batch", total["gzip_json_bytes"],
         total["shipped_v1_bytes"], TARGET_VS_GZIP_JSON),
    ]  # fmt: skip
    for label, theirs, ours, target in lines:
        ratio = theirs / ours if ours else 0.0
        verdict = "meets" if ratio >= target else "MISSES"
        print(
            f"{label:<40} {theirs / n:6.1f} / {ours / n:5.1f} B/r = {ratio:5.1f}x  "
            f"({verdict} the {target:.0f}x target)",
            file=stream,
        )
    if speed is not None:
        print(file=stream)
        print(
            f"aggregation: {speed.aggregate_records_per_s / 1e6:.2f} M records/s "
            f"({speed.records} records -> {speed.rows} rows); encode: "
            f"{speed.encode_rows_per_s / 1e6:.2f} M rows/s (version 1: "
            f"{speed.encode_v1_rows_per_s / 1e6:.2f}); decode: "
            f"{speed.decode_rows_per_s / 1e6:.2f} M rows/s (one core, median)",
            file=stream,
        )
