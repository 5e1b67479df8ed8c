"""Replaying unsampled bidirectional flows as if a router had sampled them.

Three steps, all vectorised:

1. :func:`split_directions`.  Routers export unidirectional records, so each
   bidirectional Argus flow becomes a source->destination record with
   ``SrcBytes`` and a reverse one with ``TotBytes - SrcBytes``.  The files
   carry only the total packet count, so the packets of each direction are
   estimated from its share of the bytes, bounded by what frame sizes allow
   (42..1514 bytes per frame; each side that sent bytes sent >= 1 packet).
   A direction with no bytes gets no record.
2. :func:`thin`.  Packet sampling at 1:N: ``k ~ Binomial(packets, 1/N)``
   with a seeded numpy ``Generator``; records with ``k = 0`` are dropped,
   bytes are scaled by ``k / packets`` and ``sampling_rate`` is set to N.
   TCP flags are re-derived from which packets were drawn, because a
   sampled record only shows the flags of its sampled packets: the SYN is
   the first packet, FIN/RST the last; the first packet is drawn with
   probability ``k/n`` and the last, given that, with ``(k - first)/(n-1)``.
   A direction with flags but no ACK (unanswered SYNs) carries its SYN on
   every packet.  This is a model of the packet order, not a record of it.
3. :func:`cut_active_timeout`.  Exporters cut long flows at an active
   timeout; a record longer than the timeout is cut into
   ``ceil(duration / timeout)`` pieces with its packets spread evenly (and
   bytes in proportion, totals conserved exactly).  SYN stays with the first
   piece that has packets, FIN/RST with the last.

At N = 1 every packet is drawn: step 2 returns its input (flags included)
whatever the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.features.spec import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from edge_agent.flows.schema import Direction, Field, empty_records

if TYPE_CHECKING:  # ctu13 imports this module
    from cloud.training.ctu13 import ArgusFlows

MIN_FRAME_BYTES = 42  # Ethernet + IPv4 + ICMP/UDP header, no payload
MAX_FRAME_BYTES = 1514  # Ethernet MTU frame without FCS
DEFAULT_ACTIVE_TIMEOUT_S = 60

_PRESENT = int(
    Field.TIME_START
    | Field.TIME_END
    | Field.SRC_ADDR
    | Field.DST_ADDR
    | Field.SRC_PORT
    | Field.DST_PORT
    | Field.PROTOCOL
    | Field.TCP_FLAGS
    | Field.BYTES
    | Field.PACKETS
)


@dataclass
class DirectionalFlows:
    """Unsampled unidirectional records with what thinning needs to know."""

    records: np.ndarray  # FLOW_DTYPE, sampling_rate 1
    first_has_ack: np.ndarray  # bool: the first packet carries ACK
    label: np.ndarray  # uint8, the flow's label (ctu13.LABEL_*)


def estimate_src_packets(
    tot_pkts: np.ndarray, src_bytes: np.ndarray, dst_bytes: np.ndarray
) -> np.ndarray:
    """Packets sent by the source, from its share of the bytes (see module)."""
    n = tot_pkts.astype(np.int64)
    sb = src_bytes.astype(np.int64)
    db = dst_bytes.astype(np.int64)
    total = np.maximum(sb + db, 1)
    est = np.rint(n * (sb / total)).astype(np.int64)
    lo = np.maximum.reduce(
        [np.ones_like(n), -(-sb // MAX_FRAME_BYTES), n - db // MIN_FRAME_BYTES]
    )
    hi = np.minimum.reduce([n - 1, sb // MIN_FRAME_BYTES, n + (db // -MAX_FRAME_BYTES)])
    feasible = lo <= hi
    bounded = np.where(feasible, np.clip(est, lo, np.maximum(hi, lo)), est)
    both = np.clip(bounded, 1, np.maximum(n - 1, 1))
    out = np.where(db == 0, n, np.where(sb == 0, 0, both))
    # One packet cannot go both ways: give it to the side with more bytes.
    return np.where((n < 2) & (sb > 0) & (db > 0), np.where(sb >= db, n, 0), out)


def split_directions(flows: ArgusFlows) -> DirectionalFlows:
    """Turn bidirectional flows into unidirectional unsampled records."""
    tot_bytes = flows.tot_bytes.astype(np.int64)
    src_bytes = np.minimum(flows.src_bytes.astype(np.int64), tot_bytes)
    dst_bytes = tot_bytes - src_bytes
    src_pkts = estimate_src_packets(flows.tot_pkts, src_bytes, dst_bytes)
    dst_pkts = flows.tot_pkts.astype(np.int64) - src_pkts

    def build(forward: bool) -> tuple[np.ndarray, np.ndarray]:
        rec = empty_records(len(flows))
        rec["time_start"] = flows.start_ms
        rec["time_end"] = flows.start_ms + flows.dur_ms
        a, b = (
            (flows.src_addr, flows.dst_addr)
            if forward
            else (flows.dst_addr, flows.src_addr)
        )
        rec["src_addr"], rec["dst_addr"] = a, b
        pa, pb = (
            (flows.src_port, flows.dst_port)
            if forward
            else (flows.dst_port, flows.src_port)
        )
        icmp = flows.proto == 1
        # The reverse of an ICMP flow is taken to be echo replies (type 0):
        # Argus does not say what came back.
        rec["src_port"] = np.where(icmp, 0, pa)
        rec["dst_port"] = np.where(icmp, flows.dst_port if forward else 0, pb)
        rec["protocol"] = flows.proto
        is_v4 = (
            np.ascontiguousarray(a).view(np.uint8).reshape(-1, 16)[:, 10:12] == 0xFF
        ).all(axis=1)
        rec["ip_version"] = np.where(is_v4, 4, 6)
        flags = flows.src_flags if forward else flows.dst_flags
        rec["tcp_flags"] = flags
        rec["packets"] = src_pkts if forward else dst_pkts
        rec["bytes"] = src_bytes if forward else dst_bytes
        rec["sampling_rate"] = 1
        rec["direction"] = Direction.UNKNOWN
        rec["present"] = _PRESENT
        has_ack = (flags & TCP_ACK) != 0
        has_syn = (flags & TCP_SYN) != 0
        # The initiator's SYN has no ACK; the responder's SYN-ACK has one.
        first_ack = has_ack & ~has_syn if forward else has_ack
        return rec, first_ack

    fwd, fwd_ack = build(True)
    rev, rev_ack = build(False)
    records = np.concatenate([fwd, rev])
    first_ack = np.concatenate([fwd_ack, rev_ack])
    label = np.concatenate([flows.label, flows.label])
    keep = records["packets"] > 0
    order = np.argsort(records["time_start"][keep], kind="stable")
    return DirectionalFlows(
        records=records[keep][order],
        first_has_ack=first_ack[keep][order],
        label=label[keep][order],
    )


def thin(
    flows: DirectionalFlows, rate: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample 1-in-``rate`` packets; returns ``(records, labels)``.

    ``rate`` >= 1.  Records whose every packet was missed are dropped.
    """
    if rate < 1:
        raise ValueError(f"sampling rate must be >= 1, got {rate}")
    rec = flows.records
    n = rec["packets"].astype(np.int64)
    k = rng.binomial(n, 1.0 / rate) if rate > 1 else n.copy()
    u_first = rng.random(n.size)
    u_last = rng.random(n.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        first = u_first < k / np.maximum(n, 1)
        later = (k - first) / np.maximum(n - 1, 1)
    last = np.where(n > 1, u_last < later, first)
    middle = k - first - np.where(n > 1, last, False)
    flags = rec["tcp_flags"].astype(np.int64)
    has = {bit: (flags & bit) != 0 for bit in (TCP_SYN, TCP_ACK, TCP_FIN, TCP_RST)}
    syn_everywhere = has[TCP_SYN] & ~has[TCP_ACK]
    drawn = k > 0
    keep_syn = has[TCP_SYN] & (first | (syn_everywhere & drawn))
    keep_ack = has[TCP_ACK] & ((middle > 0) | last | (first & flows.first_has_ack))
    keep_end = last  # FIN and RST ride on the last packet
    other = flags & ~(TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST)
    keep_other = (middle > 0) | last
    new_flags = (
        np.where(keep_syn, TCP_SYN, 0)
        | np.where(keep_ack, TCP_ACK, 0)
        | np.where(keep_end, flags & (TCP_FIN | TCP_RST), 0)
        | np.where(keep_other, other, 0)
    )
    out = rec[drawn].copy()
    kd = k[drawn]
    out["packets"] = kd
    out["bytes"] = np.rint(rec["bytes"][drawn] * (kd / n[drawn])).astype(np.uint64)
    out["tcp_flags"] = new_flags[drawn]
    out["sampling_rate"] = rate
    if rate == 1:
        out["tcp_flags"] = rec["tcp_flags"]  # every packet drawn: nothing lost
    return out, flows.label[drawn]


def cut_active_timeout(
    records: np.ndarray,
    labels: np.ndarray,
    timeout_s: int = DEFAULT_ACTIVE_TIMEOUT_S,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut records longer than ``timeout_s`` (see module doc)."""
    timeout_ms = int(timeout_s) * 1000
    dur = np.maximum(records["time_end"] - records["time_start"], 0)
    pieces = np.maximum(-(-dur // timeout_ms), 1).astype(np.int64)
    k = records["packets"].astype(np.int64)
    # Pieces with no packets are never built: at most min(k, pieces) each.
    row = np.repeat(np.arange(records.size), pieces)
    offsets = np.arange(row.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    m = pieces[row]
    kr = k[row]
    cum_hi = (offsets + 1) * kr // m
    cum_lo = offsets * kr // m
    pk = cum_hi - cum_lo
    keep = pk > 0
    row, offsets, cum_hi, cum_lo, pk = (
        a[keep] for a in (row, offsets, cum_hi, cum_lo, pk)
    )
    octets = records["bytes"].astype(np.int64)[row]
    kk = k[row]
    out = records[row].copy()
    out["packets"] = pk
    out["bytes"] = cum_hi * octets // kk - cum_lo * octets // kk
    start = records["time_start"][row] + offsets * timeout_ms
    out["time_start"] = start
    out["time_end"] = np.minimum(start + timeout_ms, records["time_end"][row])
    is_first = cum_lo == 0
    is_last = cum_hi == kk
    flags = out["tcp_flags"].astype(np.int64)
    flags = np.where(is_first, flags, flags & ~TCP_SYN)
    flags = np.where(is_last, flags, flags & ~(TCP_FIN | TCP_RST))
    out["tcp_flags"] = flags
    order = np.argsort(out["time_start"], kind="stable")
    return out[order], labels[row][order]


def sample_flows(
    flows: ArgusFlows,
    rate: int,
    seed: int,
    active_timeout_s: int = DEFAULT_ACTIVE_TIMEOUT_S,
) -> tuple[np.ndarray, np.ndarray]:
    """Split, thin at 1:``rate`` with ``seed``, cut at the active timeout."""
    rng = np.random.default_rng(seed)
    records, labels = thin(split_directions(flows), rate, rng)
    return cut_active_timeout(records, labels, active_timeout_s)
