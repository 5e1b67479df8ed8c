"""The feature specification: names, order, transforms and its version.

One row is one internal host in one time window.  Every model records the
:data:`FEATURE_SPEC_VERSION` it was trained on; bump it whenever a feature's
meaning, order or units change, so that old models refuse new rows instead of
scoring them wrongly.

Features (``out`` = records whose source is the host, ``in`` = records whose
destination is the host; "scaled" = multiplied by the record's 1-in-N
sampling rate, an unknown rate 0 counting as 1):

==  ==================  ==========================================================
 0  pkts_out            scaled packets sent
 1  pkts_in             scaled packets received
 2  bytes_out           scaled bytes sent
 3  bytes_in            scaled bytes received
 4  records_out         sampled records sent (not scaled: flows do not scale 1/p)
 5  records_in          sampled records received (not scaled)
 6  tcp_starts_out      TCP records sent with SYN and without ACK, scaled:
                        estimated connection attempts the host initiated
                        (see the note below on its bias)
 7  dst_addrs_out       distinct destination addresses, Chao1-corrected
 8  dst_ports_out       distinct TCP/UDP destination ports, Chao1-corrected
 9  dst_addr_entropy    entropy (bits) of destination addresses over records
10  dst_port_entropy    entropy (bits) of TCP/UDP destination ports over records
11  mail_share          share of scaled packets sent to TCP 25/465/587
12  dns_share           share of scaled packets sent to TCP/UDP 53
13  irc_share           share of scaled packets sent to TCP 6660-6669/6697
14  failed_tcp_share    share of the host's TCP records (in or out) that are a
                        SYN without ACK or carry RST
==  ==================  ==========================================================

Counts (0-8) are passed through ``log1p`` before scaling; entropies and
shares are not.

``tcp_starts_out`` is unbiased for unanswered attempts (every packet of
such a flow is a SYN) but biased low for established flows: a sampled SYN
is only "without ACK" when no later packet of its flow was sampled into the
same record, probability ``(1 - 1/N)**(n-1)`` for an n-packet flow at 1:N
(and 0 for unsampled full-flow records).  Models are trained per network
at that network's rate, so they learn the level that rate gives.
"""

from __future__ import annotations

#: Bump when any feature's meaning, order or units change.
FEATURE_SPEC_VERSION = 1

FEATURE_NAMES: tuple[str, ...] = (
    "pkts_out",
    "pkts_in",
    "bytes_out",
    "bytes_in",
    "records_out",
    "records_in",
    "tcp_starts_out",
    "dst_addrs_out",
    "dst_ports_out",
    "dst_addr_entropy",
    "dst_port_entropy",
    "mail_share",
    "dns_share",
    "irc_share",
    "failed_tcp_share",
)

#: Features that are counts and get ``log1p`` before robust scaling.
LOG1P_FEATURES: frozenset[str] = frozenset(FEATURE_NAMES[:9])

#: The 12 features the relay's tiny model uses.  Left out, because they add
#: the least for the relay's job (flagging hosts for full detail):
#: ``records_in`` (follows ``pkts_in``), ``dst_port_entropy`` (follows
#: ``dst_ports_out``) and ``irc_share`` (rare; the cloud model keeps it).
RELAY_FEATURES: tuple[str, ...] = (
    "pkts_out",
    "pkts_in",
    "bytes_out",
    "bytes_in",
    "records_out",
    "tcp_starts_out",
    "dst_addrs_out",
    "dst_ports_out",
    "dst_addr_entropy",
    "mail_share",
    "dns_share",
    "failed_tcp_share",
)

#: Destination ports counted as mail (SMTP, SMTPS, submission), TCP.
MAIL_PORTS: tuple[int, ...] = (25, 465, 587)
#: Destination port counted as DNS, TCP or UDP.
DNS_PORTS: tuple[int, ...] = (53,)
#: Destination ports counted as IRC, TCP.
IRC_PORTS: tuple[int, ...] = (*range(6660, 6670), 6697)

#: TCP flag bits (low byte of the ``tcp_flags`` column).
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

PROTO_TCP = 6
PROTO_UDP = 17

#: Default window length in seconds.  At 1:1000 sampling use 300 s: a
#: minute holds too few sampled packets per host.
DEFAULT_WINDOW_S = 60


def feature_index(names: tuple[str, ...]) -> list[int]:
    """Return the column indices of ``names`` in :data:`FEATURE_NAMES`.

    Raises ``ValueError`` naming the first unknown feature.
    """
    out = []
    for name in names:
        if name not in FEATURE_NAMES:
            raise ValueError(
                f"unknown feature {name!r}; valid features: {', '.join(FEATURE_NAMES)}"
            )
        out.append(FEATURE_NAMES.index(name))
    return out
