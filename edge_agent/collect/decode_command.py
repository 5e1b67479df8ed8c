"""``sampleflow decode``: decode a capture of flow exports to CSV or JSON lines.

The capture is read with :class:`~edge_agent.collect.pcap.CaptureReader`
and decoded by :class:`~edge_agent.flows.decoder.FlowDecoder`, the same
decode path as the live relay.  One output line per flow record; a summary
(datagrams, records, errors by reason) goes to stderr.

Columns, in order: exporter, domain, src_addr, dst_addr, src_port,
dst_port, protocol, bytes, packets, in_if, out_if, tcp_flags,
sampling_rate, start, end, then exporter_port, export_proto, ip_version,
tos, src_as, dst_as, next_hop, src_mask, dst_mask, direction, vlan,
sampler_id.  Addresses are in the usual text form, start/end are UNIX
seconds with millisecond precision (JSON: numbers).  A field the export did not carry
(its ``present`` bit is clear) is empty in CSV and null in JSON; so is a
sampling rate of 0 (unknown).
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

import numpy as np

from edge_agent.collect.datagram import Datagram
from edge_agent.collect.pcap import CaptureError, CaptureReader, CaptureStats
from edge_agent.flows.decoder import DecoderConfig, FlowDecoder
from edge_agent.flows.schema import Direction, ExportProtocol, Field, address_text

#: Datagrams handed to ``decode_many`` at a time.
_CHUNK = 512

# (column, FLOW_DTYPE field, presence bit or None if always known, kind)
_COLUMNS: tuple[tuple[str, str, Field | None, str], ...] = (
    ("exporter", "exporter", None, "address"),
    ("domain", "domain", None, "int"),
    ("src_addr", "src_addr", Field.SRC_ADDR, "address"),
    ("dst_addr", "dst_addr", Field.DST_ADDR, "address"),
    ("src_port", "src_port", Field.SRC_PORT, "int"),
    ("dst_port", "dst_port", Field.DST_PORT, "int"),
    ("protocol", "protocol", Field.PROTOCOL, "int"),
    ("bytes", "bytes", Field.BYTES, "int"),
    ("packets", "packets", Field.PACKETS, "int"),
    ("in_if", "in_if", Field.IN_IF, "int"),
    ("out_if", "out_if", Field.OUT_IF, "int"),
    ("tcp_flags", "tcp_flags", Field.TCP_FLAGS, "int"),
    ("sampling_rate", "sampling_rate", None, "rate"),
    ("start", "time_start", Field.TIME_START, "time"),
    ("end", "time_end", Field.TIME_END, "time"),
    ("exporter_port", "exporter_port", None, "int"),
    ("export_proto", "export_proto", None, "proto"),
    ("ip_version", "ip_version", None, "rate"),
    ("tos", "tos", Field.TOS, "int"),
    ("src_as", "src_as", Field.SRC_AS, "int"),
    ("dst_as", "dst_as", Field.DST_AS, "int"),
    ("next_hop", "next_hop", Field.NEXT_HOP, "address"),
    ("src_mask", "src_mask", Field.SRC_MASK, "int"),
    ("dst_mask", "dst_mask", Field.DST_MASK, "int"),
    ("direction", "direction", Field.DIRECTION, "direction"),
    ("vlan", "vlan", Field.VLAN, "int"),
    ("sampler_id", "sampler_id", Field.SAMPLER_ID, "int"),
)

#: Output column names, in order.
COLUMNS: tuple[str, ...] = tuple(c[0] for c in _COLUMNS)

_PROTO_NAMES = {p.value: p.name.lower() for p in ExportProtocol}
_DIRECTION_NAMES = {d.value: d.name.lower() for d in Direction}


def format_ms(ms: int) -> str:
    """Milliseconds since the epoch as UNIX seconds with 3 decimals."""
    sign = "-" if ms < 0 else ""
    seconds, millis = divmod(abs(ms), 1000)
    return f"{sign}{seconds}.{millis:03d}"


class _AddressText:
    """address_text with a cache: exporters and hosts repeat a lot."""

    def __init__(self, limit: int = 65536) -> None:
        self.limit = limit
        self.cache: dict[bytes, str] = {}

    def __call__(self, raw: bytes) -> str:
        text = self.cache.get(raw)
        if text is None:
            if len(self.cache) >= self.limit:
                self.cache.clear()
            text = address_text(raw)
            self.cache[raw] = text
        return text


def record_columns(
    records: np.ndarray, addresses: _AddressText, json_times: bool = False
) -> list[list[Any]]:
    """Format ``records`` column by column; None marks an absent value.

    Times are text (``1680626679.123``), or with ``json_times`` floats of
    seconds (the shortest float text of ms/1000 has the same 3 decimals).
    """
    present = records["present"]
    columns: list[list[Any]] = []
    for _, name, bit, kind in _COLUMNS:
        values = records[name]
        formatter: Callable[[Any], Any] | None
        raw: list[Any]
        if kind == "address":
            formatter = addresses
            raw = [bytes(v) for v in values.tolist()]
        else:
            raw = values.tolist()
            formatter = {
                "int": None,
                "rate": lambda v: v or None,
                "time": (lambda v: v / 1000) if json_times else format_ms,
                "proto": lambda v: _PROTO_NAMES.get(v, str(v)),
                "direction": lambda v: _DIRECTION_NAMES.get(v, str(v)),
            }[kind]
        if formatter is not None:
            raw = [formatter(v) for v in raw]
        if bit is not None:
            mask = ((present & np.uint32(bit)) != 0).tolist()
            raw = [v if m else None for v, m in zip(raw, mask, strict=True)]
        columns.append(raw)
    return columns


class CsvOutput:
    """Write records as CSV with a header line."""

    def __init__(self, stream: TextIO) -> None:
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow(COLUMNS)
        self.addresses = _AddressText()

    def write(self, records: np.ndarray) -> None:
        if len(records):
            columns = record_columns(records, self.addresses)
            self.writer.writerows(
                ["" if v is None else v for v in row]
                for row in zip(*columns, strict=True)
            )


class JsonOutput:
    """Write records as JSON lines (absent values are null)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.addresses = _AddressText()

    def write(self, records: np.ndarray) -> None:
        if len(records):
            columns = record_columns(records, self.addresses, json_times=True)
            for row in zip(*columns, strict=True):
                self.stream.write(json.dumps(dict(zip(COLUMNS, row, strict=True))))
                self.stream.write("\n")


def _sampling_override(text: str) -> tuple[str, int]:
    """argparse type for ``ADDR=N``."""
    address, sep, rate_text = text.partition("=")
    try:
        if not sep:
            raise ValueError
        address = str(ipaddress.ip_address(address.strip()))
        rate = int(rate_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ADDRESS=RATE (e.g. 192.0.2.1=1000), got {text!r}"
        ) from None
    if rate < 1:
        raise argparse.ArgumentTypeError(
            f"sampling override rate must be >= 1, got {rate} in {text!r}"
        )
    return address, rate


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = _non_negative(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``decode`` subcommand."""
    parser = subparsers.add_parser(
        "decode",
        help="decode a pcap/pcapng capture of flow exports",
        description=(
            "Decode the NetFlow v5/v9, IPFIX and sFlow v5 exports in a pcap or "
            "pcapng file; print one line per flow record and a summary on "
            "stderr."
        ),
    )
    parser.add_argument("capture", metavar="FILE", help="pcap or pcapng file")
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--csv", action="store_const", dest="format", const="csv", help="CSV (default)"
    )
    output.add_argument(
        "--json", action="store_const", dest="format", const="json", help="JSON lines"
    )
    parser.set_defaults(format="csv")
    parser.add_argument(
        "--port",
        type=_port,
        action="append",
        metavar="PORT",
        help="only decode datagrams sent to this UDP port (repeatable)",
    )
    parser.add_argument(
        "--sampling-rate",
        type=_non_negative,
        default=0,
        metavar="N",
        help="1-in-N rate for exporters that announce none (default 0: unknown)",
    )
    parser.add_argument(
        "--sampling-override",
        type=_sampling_override,
        action="append",
        default=[],
        metavar="ADDR=N",
        help="force the rate of one exporter address (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no summary on stderr")
    parser.set_defaults(func=run)


def _chunks(datagrams: Iterable[Datagram], size: int) -> Iterator[list[Datagram]]:
    iterator = iter(datagrams)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def decode_capture(
    reader: CaptureReader,
    decoder: FlowDecoder,
    write: Callable[[np.ndarray], None],
) -> None:
    """Decode every datagram of ``reader`` and pass the records to ``write``.

    Records still held for a template that never came are expired at the
    end (``expire_pending`` with the far future), so the decoder's
    ``pending_expired`` counter accounts for them.
    """
    for chunk in _chunks(reader, _CHUNK):
        write(decoder.decode_many(chunk))
    decoder.expire_pending(2**62)


def run(args: argparse.Namespace) -> int:
    """Run ``sampleflow decode``; returns the exit code."""
    try:
        config = DecoderConfig(
            default_sampling_rate=args.sampling_rate,
            sampling_overrides=dict(args.sampling_override),
        )
    except ValueError as exc:
        print(f"sampleflow decode: error: {exc}", file=sys.stderr)
        return 2
    try:
        reader = CaptureReader(args.capture, ports=args.port)
    except CaptureError as exc:
        print(f"sampleflow decode: error: {exc}", file=sys.stderr)
        return 2
    decoder = FlowDecoder(config)
    out: CsvOutput | JsonOutput = (
        CsvOutput(sys.stdout) if args.format == "csv" else JsonOutput(sys.stdout)
    )
    try:
        with reader:
            decode_capture(reader, decoder, out.write)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of our output went away (``| head``): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    if not args.quiet:
        print_summary(args.capture, reader.format, reader.stats, decoder, sys.stderr)
    return 0


def print_summary(
    path: str,
    file_format: str,
    capture: CaptureStats,
    decoder: FlowDecoder,
    stream: TextIO,
) -> None:
    """Write the human summary of a decode run."""
    totals = decoder.stats.totals()
    skipped = _reasons(capture.skipped)
    print(
        f"capture {path} ({file_format}): {capture.frames} frames, "
        f"{capture.datagrams} UDP datagrams, skipped: {skipped}",
        file=stream,
    )
    print(
        f"decoded: {totals.datagrams} datagrams, {totals.records} records, "
        f"{len(decoder.stats.by_exporter)} exporters; "
        f"errors: {_reasons(totals.errors)}",
        file=stream,
    )
    print(
        f"templates: {totals.templates_received} received; data sets before "
        f"their template: {totals.pending_held} held, {totals.pending_decoded} "
        f"decoded later, {totals.pending_expired} expired; "
        f"sequence gaps: {totals.sequence_gaps}",
        file=stream,
    )
    for (address, port), counters in sorted(decoder.stats.by_exporter.items()):
        name = f"{address_text(address)}:{port}" if address else "(overflow)"
        print(
            f"  exporter {name}: {counters.datagrams} datagrams, "
            f"{counters.records} records, errors: {_reasons(counters.errors)}",
            file=stream,
        )


def _reasons(counter: dict[str, int]) -> str:
    if not counter:
        return "none"
    return " ".join(f"{reason}={count}" for reason, count in sorted(counter.items()))
