"""Real capture payloads replayed as endless export streams, for benchmarks.

An :class:`ExportStream` holds the UDP payloads of one capture of a
NetFlow v5, NetFlow v9 or IPFIX exporter and plays them in a loop as that
exporter would keep exporting: each payload's header gets the next
sequence number of its stream and the current export time, the rest of the
bytes (templates, records) are the capture's own.  So a collector sees no
sequence gap, no restart, and flow times near now (v5 and v9 flow times are
relative to the header's export time; IPFIX absolute flow times stay those
of the capture, which the relay windows by receive time and counts as
late).

Sequence units are those of the protocols, as the relay's decoder checks
them: NetFlow v5 counts flow records (the header count), NetFlow v9
export packets (RFC 3954), IPFIX data records of every data set, options
data included (RFC 7011).  :func:`load_stream` measures them with the
relay's own decoder, then :meth:`ExportStream.check` replays three loops
through a fresh decoder and refuses a stream in which it sees a gap.

``records`` per payload is what the decoder gets from it in steady state
(second loop: templates known).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.collect.datagram import Datagram
from edge_agent.collect.pcap import read_capture
from edge_agent.flows.decoder import FlowDecoder

#: Captures replayed by default: real exporters of each protocol with many
#: records per datagram and clean sequence numbers.
DEFAULT_CAPTURES: tuple[str, ...] = (
    "nf5-freebsd-ng_netflow.pcap",
    "w-nf5-mikrotik.pcap",
    "w-nf5-juniper-mx80.pcap",
    "nf9-nprobe-many-templates.pcap",
    "nf9-fortigate-data-before-template.pcap",
    "nf9-cisco-asa-nsel.pcap",
    "w-ipfix-openbsd-pflow.pcap",
    "w-ipfix-mikrotik.pcap",
    "w-pynetflow-softflowd-ipfix.pcap",
)

_V5 = struct.Struct(">HHIIIIBBH")  # version, count, uptime, secs, nsecs, seq, ...
_V9 = struct.Struct(">HHIIII")  # version, count, uptime, secs, seq, source id
_IPFIX = struct.Struct(">HHIII")  # version, length, export time, seq, domain
_OFFSETS = {5: (8, 16), 9: (8, 12), 10: (4, 8)}  # version: (time, seq) offsets


class StreamError(ValueError):
    """A capture cannot be replayed as a stream (says which and why)."""


@dataclass
class ExportStream:
    """One capture's payloads, replayed in a loop; see the module doc.

    ``units[i]``: what payload ``i`` adds to its domain's sequence number;
    ``records[i]``: flow records the decoder gets from it.  Not thread-safe:
    one sender owns it.
    """

    name: str
    version: int
    payloads: list[bytes]
    domains: list[int]
    units: list[int]
    records: list[int]
    _next: int = 0
    _seq: dict[int, int] = field(default_factory=dict)

    @property
    def records_per_loop(self) -> int:
        """Flow records in one pass over the capture (steady state)."""
        return sum(self.records)

    def next_payload(self, export_time_s: int) -> tuple[bytes, int]:
        """The next payload, rewritten, and its flow record count."""
        i = self._next
        self._next = (i + 1) % len(self.payloads)
        data = bytearray(self.payloads[i])
        domain = self.domains[i]
        seq = self._seq.get(domain, 0)
        self._seq[domain] = (seq + self.units[i]) & 0xFFFFFFFF
        time_at, seq_at = _OFFSETS[self.version]
        struct.pack_into(">I", data, time_at, export_time_s & 0xFFFFFFFF)
        struct.pack_into(">I", data, seq_at, seq)
        return bytes(data), self.records[i]

    def check(self, loops: int = 3) -> None:
        """Replay ``loops`` loops through a fresh decoder (on a copy);
        raise :class:`StreamError` on a decode error or a sequence gap."""
        probe = ExportStream(
            self.name, self.version, self.payloads, self.domains, self.units,
            self.records,
        )  # fmt: skip
        decoder = FlowDecoder()
        address = bytes(10) + b"\xff\xff\x7f\x00\x00\x01"
        for n in range(loops * len(self.payloads)):
            payload, _ = probe.next_payload(1_700_000_000 + n)
            decoder.decode_many([Datagram(payload, address, 9999, n)])
        totals = decoder.stats.totals()
        if totals.errors or totals.sequence_gaps or totals.estimated_lost:
            raise StreamError(
                f"{self.name}: replayed {loops} loops, the decoder saw errors "
                f"{dict(totals.errors)}, {totals.sequence_gaps} sequence gaps"
            )


def _version(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else -1


def load_stream(path: Path) -> ExportStream:
    """An :class:`ExportStream` of one capture of a single exporter.

    Raises :class:`StreamError` for a capture mixing versions or
    exporters, of sFlow or NetFlow v1, or that fails :meth:`check`.
    """
    datagrams, _ = read_capture(path)
    if not datagrams:
        raise StreamError(f"{path.name}: no UDP datagrams")
    versions = {_version(d.payload) for d in datagrams}
    if len(versions) != 1 or not versions <= set(_OFFSETS):
        raise StreamError(
            f"{path.name}: export versions {sorted(versions)}; a stream is one "
            "of NetFlow v5 (5), v9 (9) or IPFIX (10)"
        )
    if len({(d.exporter, d.exporter_port) for d in datagrams}) != 1:
        raise StreamError(f"{path.name}: more than one exporter")
    version = versions.pop()
    payloads = [d.payload for d in datagrams]
    domains = [_domain(version, p) for p in payloads]
    decoder = FlowDecoder()
    first_pass = _per_payload(decoder, datagrams)
    steady = _per_payload(decoder, datagrams)
    if version == 5:
        units = [_V5.unpack_from(p)[1] for p in payloads]
    elif version == 9:
        units = [1] * len(payloads)
    else:
        units = [records + options for records, options in steady]
    del first_pass
    stream = ExportStream(
        path.name, version, payloads, domains, units, [r for r, _ in steady]
    )
    stream.check()
    return stream


def load_streams(
    captures: Path, names: Sequence[str] = DEFAULT_CAPTURES
) -> list[ExportStream]:
    """Streams of ``names`` in the folder ``captures``."""
    missing = [n for n in names if not (captures / n).is_file()]
    if missing:
        raise StreamError(f"captures missing in {captures}: {', '.join(missing)}")
    return [load_stream(captures / name) for name in names]


def _domain(version: int, payload: bytes) -> int:
    if version == 5:
        return _V5.unpack_from(payload)[6] << 8 | _V5.unpack_from(payload)[7]
    if version == 9:
        return int(_V9.unpack_from(payload)[5])
    return int(_IPFIX.unpack_from(payload)[4])


def _per_payload(
    decoder: FlowDecoder, datagrams: list[Datagram]
) -> list[tuple[int, int]]:
    """(flow records, options records) the decoder counts per datagram."""
    out = []
    for d in datagrams:
        before = decoder.stats.totals()
        decoder.decode_many([d])
        after = decoder.stats.totals()
        out.append(
            (
                after.records - before.records,
                after.options_records - before.options_records,
            )
        )
    return out
