"""The unit every flow input hands to the decoder: one UDP datagram.

Both inputs (the UDP collector and the pcap reader) produce
:class:`Datagram` values, and both feed them to the same decode path
(``FlowDecoder.decode`` / ``decode_many``), so an offline replay of a
capture exercises exactly the code that runs on live traffic.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from edge_agent.flows.schema import V4_MAPPED_PREFIX

#: Largest UDP payload accepted (bytes); the UDP length field is 16 bits.
MAX_DATAGRAM = 65535


class Datagram(NamedTuple):
    """One flow export datagram as received.

    It is a plain tuple ``(payload, exporter, exporter_port, received_ms)``,
    the shape ``FlowDecoder.decode_many`` takes.
    """

    payload: bytes
    #: exporter address, 16 bytes (IPv4-mapped for IPv4), as in FLOW_DTYPE
    exporter: bytes
    #: exporter UDP source port
    exporter_port: int
    #: receive (or capture) time, ms since the UNIX epoch, UTC
    received_ms: int


def packed_address(host: str) -> bytes:
    """Turn a socket-level host string into the 16-byte column form.

    Faster than :func:`edge_agent.flows.schema.address_bytes` (no
    ``ipaddress`` object) because it runs once per received datagram.  An
    IPv6 scope suffix (``fe80::1%eth0``) is dropped.  Raises ``OSError``
    for a string that is not an address.
    """
    if ":" not in host:
        return V4_MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, host)
    scope = host.find("%")
    if scope >= 0:
        host = host[:scope]
    return socket.inet_pton(socket.AF_INET6, host)
