"""Offline input: the UDP datagrams of a pcap or pcapng capture.

:class:`CaptureReader` walks a capture file of flow exports and yields one
:class:`~edge_agent.collect.datagram.Datagram` per UDP datagram, the same
tuples the UDP collector produces, so ``sampleflow decode`` and the tests
run the live decode path on recorded traffic.

Files are read with dpkt: classic pcap (micro- and nanosecond, either byte
order) and pcapng (every section and interface, each with its own link type
and timestamp resolution).  Link types: Ethernet (with 802.1Q/QinQ tags),
Linux cooked SLL and SLL2, raw IP (DLT_RAW, LINKTYPE_IPV4/IPV6) and BSD
loopback.  Frames that carry no usable UDP datagram are skipped and counted
by reason in :attr:`CaptureReader.stats`:

``not_ip``
    the link layer carries something other than IPv4/IPv6 (ARP, LLDP, ...).
``not_udp``
    an IP packet of another protocol (a BMP session over TCP, ICMP, ...).
``ip_fragment``
    an IPv4 fragment (MF set or non-zero offset) or an IPv6 packet with a
    Fragment header.  Fragments are not reassembled: exporters keep
    datagrams under the path MTU, and one that was split is lost here.
``truncated``
    the frame holds fewer bytes than its UDP length says (snap length).
``malformed``
    a link, IP or UDP header that does not parse (UDP length under 8, ...).
``port_filter``
    the UDP destination port is not in the reader's port filter.
``unsupported_linktype``
    a pcapng interface whose link type is not one of the above.
``truncated_file``
    the file ends inside a record or block; reading stops there.
"""

from __future__ import annotations

import collections
import os
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import dpkt

from edge_agent.collect.datagram import Datagram
from edge_agent.flows.schema import V4_MAPPED_PREFIX

# Link types (https://www.tcpdump.org/linktypes.html).  DLT_RAW has three
# numbers in the wild: 101 in files, 12 or 14 from some BSDs.
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_RAW_BSD = (12, 14)
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

SUPPORTED_LINKTYPES: frozenset[int] = frozenset(
    {
        LINKTYPE_NULL,
        LINKTYPE_ETHERNET,
        LINKTYPE_RAW,
        *LINKTYPE_RAW_BSD,
        LINKTYPE_LOOP,
        LINKTYPE_LINUX_SLL,
        LINKTYPE_IPV4,
        LINKTYPE_IPV6,
        LINKTYPE_LINUX_SLL2,
    }
)

_PCAP_MAGIC_US = 0xA1B2C3D4
_PCAP_MAGIC_NS = 0xA1B23C4D
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_IDB = 0x00000001
_PCAPNG_PB = 0x00000002
_PCAPNG_SPB = 0x00000003
_PCAPNG_EPB = 0x00000006
_PCAPNG_BOM = 0x1A2B3C4D
_BOM_LE = struct.pack("<I", _PCAPNG_BOM)
_BOM_BE = struct.pack(">I", _PCAPNG_BOM)
_IP_PROTO_UDP = 17
_IP6_FRAGMENT_HEADER = 44

# dpkt raises its own errors for short or inconsistent headers, and a few
# plain ones (struct.error from a short unpack, IndexError, ValueError).
_PARSE_ERRORS = (dpkt.Error, struct.error, IndexError, ValueError)


class CaptureError(Exception):
    """Raised when a capture cannot be read at all.

    The file is missing or unreadable, is neither pcap nor pcapng, or is a
    classic pcap of a link type this reader does not decode.  The message
    names the file and the reason.
    """


@dataclass
class CaptureStats:
    """What a :class:`CaptureReader` read and skipped."""

    frames: int = 0  # link-layer frames read from the file
    datagrams: int = 0  # UDP datagrams yielded
    bytes: int = 0  # UDP payload bytes yielded
    #: frames not yielded, by reason (see the module docstring)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class _Interface:
    """A capture interface: its link type and timestamp units."""

    linktype: int
    #: timestamp units per second (10**6 for microseconds)
    units_per_second: int = 1_000_000
    #: seconds added to every timestamp (pcapng if_tsoffset)
    offset_seconds: int = 0


class CaptureReader:
    """Iterate the UDP datagrams of one pcap or pcapng file.

    The constructor opens the file and checks its header, raising
    :class:`CaptureError` for anything that is not a readable capture, so a
    command can report a bad file before it prints anything.  Iterating
    yields :class:`Datagram` tuples in file order; ``received_ms`` is the
    capture timestamp in milliseconds (truncated).  ``ports``, if given,
    keeps only datagrams sent to those UDP destination ports.  A reader is
    iterable once; use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        ports: Collection[int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.ports: frozenset[int] | None = (
            frozenset(ports) if ports is not None else None
        )
        self.stats = CaptureStats()
        self.format = ""
        try:
            self._file: BinaryIO = self.path.open("rb")
        except OSError as exc:
            raise CaptureError(
                f"cannot open capture {self.path}: {exc.strerror or exc}"
            ) from exc
        try:
            self._check_header()
        except BaseException:
            self._file.close()
            raise

    def _check_header(self) -> None:
        head = self._file.read(24)
        if len(head) >= 4:
            magic_be = struct.unpack(">I", head[:4])[0]
            magic_le = struct.unpack("<I", head[:4])[0]
            if magic_be == _PCAPNG_SHB:
                bom = head[8:12]
                if bom not in (_BOM_LE, _BOM_BE):
                    raise CaptureError(
                        f"{self.path} is not a readable pcapng capture "
                        "(bad byte-order magic in the section header)"
                    )
                self.format = "pcapng"
                self._file.seek(0)
                return
            for endian, magic in ((">", magic_be), ("<", magic_le)):
                if magic in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS) and len(head) == 24:
                    self.format = "pcap"
                    self._endian = endian
                    units = 1_000_000 if magic == _PCAP_MAGIC_US else 1_000_000_000
                    linktype = struct.unpack(endian + "I", head[20:24])[0] & 0xFFFF
                    if linktype not in SUPPORTED_LINKTYPES:
                        raise CaptureError(
                            f"capture {self.path} has link type {linktype}, "
                            "which is not supported; supported link types: "
                            f"{sorted(SUPPORTED_LINKTYPES)}"
                        )
                    self._pcap_interface = _Interface(linktype, units)
                    return
        raise CaptureError(
            f"{self.path} is not a pcap or pcapng capture (bad magic number)"
        )

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[Datagram]:
        frames = self._pcap_frames() if self.format == "pcap" else self._ng_frames()
        for interface, timestamp, frame in frames:
            self.stats.frames += 1
            datagram = self._datagram(interface, timestamp, frame)
            if datagram is not None:
                self.stats.datagrams += 1
                self.stats.bytes += len(datagram.payload)
                yield datagram

    def _pcap_frames(self) -> Iterator[tuple[_Interface, int, bytes]]:
        """Yield (interface, timestamp in units, frame) of a classic pcap."""
        interface = self._pcap_interface
        record = struct.Struct(self._endian + "IIII")
        read = self._file.read
        while True:
            head = read(16)
            if not head:
                return
            if len(head) < 16:
                self.stats.skipped["truncated_file"] += 1
                return
            seconds, fraction, caplen, _wirelen = record.unpack(head)
            frame = read(caplen)
            if len(frame) < caplen:
                self.stats.skipped["truncated_file"] += 1
                return
            yield interface, seconds * interface.units_per_second + fraction, frame

    def _ng_frames(self) -> Iterator[tuple[_Interface, int, bytes]]:
        """Yield (interface, timestamp in units, frame) of a pcapng file."""
        read = self._file.read
        little = True
        interfaces: list[_Interface | None] = []
        while True:
            head = read(8)
            if not head:
                return
            if len(head) < 8:
                self.stats.skipped["truncated_file"] += 1
                return
            block_type = struct.unpack("<I", head[:4])[0]
            if block_type == _PCAPNG_SHB:
                bom = read(4)
                if len(bom) < 4:
                    self.stats.skipped["truncated_file"] += 1
                    return
                little = struct.unpack("<I", bom)[0] == _PCAPNG_BOM
                head += bom
                interfaces = []  # interface ids restart in every section
            endian = "<" if little else ">"
            block_type, length = struct.unpack(endian + "II", head[:8])
            if length < 12 or length % 4 or length < len(head):
                self.stats.skipped["truncated_file"] += 1
                return
            body = read(length - len(head))
            if len(body) < length - len(head):
                self.stats.skipped["truncated_file"] += 1
                return
            block = head + body
            if block_type == _PCAPNG_IDB:
                interfaces.append(self._ng_interface(block, little))
            elif block_type in (_PCAPNG_EPB, _PCAPNG_PB, _PCAPNG_SPB):
                packet = self._ng_packet(block_type, block, little, interfaces)
                if packet is not None:
                    yield packet
            # Other blocks (name resolution, statistics, ...) carry no frames.

    def _ng_interface(self, block: bytes, little: bool) -> _Interface | None:
        """Parse an Interface Description Block; None if undecodable."""
        idb_class = (
            dpkt.pcapng.InterfaceDescriptionBlockLE
            if little
            else dpkt.pcapng.InterfaceDescriptionBlock
        )
        try:
            idb = idb_class(block)
        except _PARSE_ERRORS:
            return None
        interface = _Interface(idb.linktype)
        for option in idb.opts:
            if option.code == dpkt.pcapng.PCAPNG_OPT_IF_TSRESOL and option.data:
                resolution = option.data[0]
                base = 2 if resolution & 0x80 else 10
                interface.units_per_second = base ** (resolution & 0x7F)
            elif (
                option.code == dpkt.pcapng.PCAPNG_OPT_IF_TSOFFSET
                and len(option.data) == 8
            ):
                interface.offset_seconds = struct.unpack(
                    "<q" if little else ">q", option.data
                )[0]
        return interface

    def _ng_packet(
        self,
        block_type: int,
        block: bytes,
        little: bool,
        interfaces: list[_Interface | None],
    ) -> tuple[_Interface, int, bytes] | None:
        """Parse a packet block into (interface, timestamp, frame)."""
        endian = "<" if little else ">"
        if block_type == _PCAPNG_SPB:
            # A Simple Packet Block has no timestamp and is always interface 0.
            wire_length = struct.unpack(endian + "I", block[8:12])[0]
            interface_id, timestamp = 0, 0
            frame = block[12 : 12 + min(wire_length, len(block) - 16)]
        else:
            if block_type == _PCAPNG_EPB:
                interface_id, high, low, caplen = struct.unpack(
                    endian + "IIII", block[8:24]
                )
            else:  # obsolete Packet Block: 16-bit interface id and drops
                interface_id, _drops, high, low, caplen = struct.unpack(
                    endian + "HHIII", block[8:24]
                )
            if 28 + caplen + 4 > len(block):
                self.stats.frames += 1
                self.stats.skipped["malformed"] += 1
                return None
            timestamp = (high << 32) | low
            frame = block[28 : 28 + caplen]
        interface = interfaces[interface_id] if interface_id < len(interfaces) else None
        if interface is None or interface.linktype not in SUPPORTED_LINKTYPES:
            self.stats.frames += 1
            self.stats.skipped["unsupported_linktype"] += 1
            return None
        return interface, timestamp, frame

    def _datagram(
        self, interface: _Interface, timestamp: int, frame: bytes
    ) -> Datagram | None:
        """Return the UDP datagram a frame carries, or count why not."""
        skipped = self.stats.skipped
        try:
            network = _network_layer(interface.linktype, frame)
        except _PARSE_ERRORS:
            skipped["malformed"] += 1
            return None
        if isinstance(network, dpkt.ip.IP):
            if network.mf or network.offset:
                skipped["ip_fragment"] += 1
                return None
            exporter = V4_MAPPED_PREFIX + network.src
        elif isinstance(network, dpkt.ip6.IP6):
            if _IP6_FRAGMENT_HEADER in network.extension_hdrs:
                skipped["ip_fragment"] += 1
                return None
            exporter = network.src
        else:
            skipped["not_ip"] += 1
            return None
        udp = network.data
        if not isinstance(udp, dpkt.udp.UDP):
            # dpkt leaves the payload as bytes when the UDP header is short.
            skipped["truncated" if network.p == _IP_PROTO_UDP else "not_udp"] += 1
            return None
        if udp.ulen < 8:
            skipped["malformed"] += 1
            return None
        payload = udp.data
        size = udp.ulen - 8
        if len(payload) < size:
            skipped["truncated"] += 1
            return None
        if self.ports is not None and udp.dport not in self.ports:
            skipped["port_filter"] += 1
            return None
        # Ethernet pads short frames; the UDP length says where data ends.
        if len(payload) > size:
            payload = payload[:size]
        received_ms = (
            timestamp * 1000 // interface.units_per_second
            + interface.offset_seconds * 1000
        )
        return Datagram(bytes(payload), exporter, udp.sport, received_ms)


def _network_layer(linktype: int, frame: bytes) -> object:
    """Decode the link layer; return the dpkt IP/IP6 packet or other data."""
    if linktype == LINKTYPE_ETHERNET:
        return dpkt.ethernet.Ethernet(frame).data
    if linktype == LINKTYPE_LINUX_SLL:
        return dpkt.sll.SLL(frame).data
    if linktype == LINKTYPE_LINUX_SLL2:
        return dpkt.sll2.SLL2(frame).data
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        return dpkt.loopback.Loopback(frame).data
    if linktype == LINKTYPE_IPV4:
        return dpkt.ip.IP(frame)
    if linktype == LINKTYPE_IPV6:
        return dpkt.ip6.IP6(frame)
    # Raw IP: the version nibble tells the family.
    version = frame[0] >> 4 if frame else 0
    if version == 4:
        return dpkt.ip.IP(frame)
    if version == 6:
        return dpkt.ip6.IP6(frame)
    return None


def read_capture(
    path: str | os.PathLike[str], ports: Collection[int] | None = None
) -> tuple[list[Datagram], CaptureStats]:
    """Read a whole capture into memory; returns its datagrams and stats."""
    with CaptureReader(path, ports) as reader:
        datagrams = list(reader)
    return datagrams, reader.stats
