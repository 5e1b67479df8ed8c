"""Loaders for the shared captures and their tshark reference decodes.

Generic on purpose (NetFlow, IPFIX and sFlow tests use it): read the UDP
datagrams of a capture with dpkt, independently of the project's own pcap
reader, and read the ``.tshark.csv`` / ``.summary.json`` files as plain
dicts.  Nothing here decodes flow exports.
"""

from __future__ import annotations

import csv
import datetime as dt
import ipaddress
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import dpkt

V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


@dataclass(frozen=True)
class CapturedDatagram:
    """One UDP datagram of a capture; ``frame`` is 1-based like tshark's."""

    frame: int
    payload: bytes
    src: bytes  # 16 bytes, IPv4-mapped for IPv4
    src_port: int
    dst_port: int
    time_ms: int


def _ip_of_frame(linktype: int, buf: bytes) -> Any:
    if linktype == dpkt.pcap.DLT_EN10MB:
        eth = dpkt.ethernet.Ethernet(buf)
        return eth.data
    if linktype in (dpkt.pcap.DLT_LINUX_SLL,):
        return dpkt.sll.SLL(buf).data
    if linktype in (dpkt.pcap.DLT_RAW, 101, 12, 14):
        version = buf[0] >> 4
        return dpkt.ip.IP(buf) if version == 4 else dpkt.ip6.IP6(buf)
    if linktype == dpkt.pcap.DLT_NULL:
        return dpkt.loopback.Loopback(buf).data
    raise ValueError(f"unsupported link type {linktype}")


def read_datagrams(path: Path) -> list[CapturedDatagram]:
    """Every UDP datagram over IPv4/IPv6 in ``path``; other frames skipped."""
    out: list[CapturedDatagram] = []
    with path.open("rb") as fh:
        reader = dpkt.pcap.UniversalReader(fh)
        linktype = reader.datalink()
        for frame, (ts, buf) in enumerate(reader, start=1):
            try:
                ip = _ip_of_frame(linktype, buf)
            except (dpkt.UnpackError, IndexError):
                continue
            if isinstance(ip, dpkt.ip.IP):
                src = V4_MAPPED_PREFIX + bytes(ip.src)
            elif isinstance(ip, dpkt.ip6.IP6):
                src = bytes(ip.src)
            else:
                continue
            udp = ip.data
            if not isinstance(udp, dpkt.udp.UDP):
                continue
            out.append(
                CapturedDatagram(
                    frame=frame,
                    payload=bytes(udp.data),
                    src=src,
                    src_port=udp.sport,
                    dst_port=udp.dport,
                    time_ms=int(Decimal(str(ts)) * 1000),
                )
            )
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a tshark CSV as dicts of strings (empty string = absent)."""
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def read_summary(path: Path) -> dict[str, Any]:
    """The ``.summary.json`` of a capture."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def other(row: dict[str, str]) -> dict[str, str]:
    """The ``other`` column of a row as a dict (tshark field -> text)."""
    text = row.get("other") or ""
    return json.loads(text) if text else {}


def address16(text: str) -> bytes:
    """An address in the 16-byte form (IPv4-mapped for IPv4)."""
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv4Address):
        return V4_MAPPED_PREFIX + addr.packed
    return addr.packed


def is_zero_address(text: str) -> bool:
    """True for an empty, 0.0.0.0 or :: address."""
    return not text or int(ipaddress.ip_address(text)) == 0


def epoch_ms(seconds_text: str) -> int:
    """tshark's epoch seconds with decimals -> whole milliseconds (floor)."""
    return int((Decimal(seconds_text) * 1000).to_integral_value(rounding="ROUND_FLOOR"))


_TSHARK_DATE = re.compile(
    r"^(?P<mon>\w{3})\s+(?P<day>\d+), (?P<year>\d{4}) "
    r"(?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)(?:\.(?P<frac>\d+))? UTC$"
)


def tshark_date_ms(text: str) -> int:
    """tshark's displayed UTC date ("Dec  6, 2017 06:48:15.187000000 UTC")
    -> epoch milliseconds."""
    match = _TSHARK_DATE.match(text.strip())
    if match is None:
        raise ValueError(f"not a tshark UTC date: {text!r}")
    month = dt.datetime.strptime(match["mon"], "%b").month
    when = dt.datetime(
        int(match["year"]),
        month,
        int(match["day"]),
        int(match["h"]),
        int(match["m"]),
        int(match["s"]),
        tzinfo=dt.UTC,
    )
    frac = (match["frac"] or "0").ljust(3, "0")[:3]
    return int(when.timestamp()) * 1000 + int(frac)
