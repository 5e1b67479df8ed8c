"""Host-window features from sampled flow records, vectorised.

:func:`host_window_features` turns flow records (a :data:`FLOW_DTYPE` array,
or a mapping of the same column names to numpy arrays, as the cloud decodes
its batches) into one row per internal host per time window; the columns
are :data:`~edge_agent.features.spec.FEATURE_NAMES`.

A record counts for its source host (``out``) when the source address is
internal and for its destination host (``in``) when the destination is
internal; a record between two internal hosts counts for both.  A record is
put in the window holding its ``time_start`` (windows are aligned to the
UNIX epoch), which is right when exporters cut flows at an active timeout
no longer than the window.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.features import spec
from edge_agent.features.estimators import abundances, chao1, entropy_bits

#: Columns the extractor reads; a mapping input must carry all of them.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "time_start",
    "src_addr",
    "dst_addr",
    "dst_port",
    "protocol",
    "tcp_flags",
    "bytes",
    "packets",
    "sampling_rate",
)

#: Optional column: how many sampled records one (rolled-up) row stands for.
FLOW_COUNT_COLUMN = "flow_count"

_MASK64 = (1 << 64) - 1


class FeatureInputError(ValueError):
    """Raised when records lack a column or columns have bad shapes."""


class FeatureSpecError(ValueError):
    """Raised when rows of one feature spec version meet a model of another."""


@dataclass(frozen=True)
class InternalNetworks:
    """The internal networks, as 128-bit (high, low) network/mask pairs.

    IPv4 networks are stored IPv4-mapped, as addresses are in the records.
    """

    cidrs: tuple[str, ...]
    net_hi: np.ndarray
    net_lo: np.ndarray
    mask_hi: np.ndarray
    mask_lo: np.ndarray

    @classmethod
    def parse(cls, cidrs: Sequence[str]) -> InternalNetworks:
        """Parse CIDR strings (``"147.32.0.0/16"``, ``"2001:db8::/32"``).

        Raises ``ValueError`` naming the bad CIDR.  Host bits must be zero.
        """
        nets: list[tuple[int, int]] = []
        for text in cidrs:
            try:
                net = ipaddress.ip_network(text, strict=True)
            except ValueError as exc:
                raise ValueError(f"bad internal network {text!r}: {exc}") from exc
            if isinstance(net, ipaddress.IPv4Network):
                value = (0xFFFF << 32) | int(net.network_address)
                prefix = 96 + net.prefixlen
            else:
                value = int(net.network_address)
                prefix = net.prefixlen
            mask = ((1 << prefix) - 1) << (128 - prefix) if prefix else 0
            nets.append((value, mask))

        def u64(values: list[int]) -> np.ndarray:
            return np.array(values, dtype=np.uint64)

        return cls(
            cidrs=tuple(cidrs),
            net_hi=u64([v >> 64 for v, _ in nets]),
            net_lo=u64([v & _MASK64 for v, _ in nets]),
            mask_hi=u64([m >> 64 for _, m in nets]),
            mask_lo=u64([m & _MASK64 for _, m in nets]),
        )

    def contains(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Boolean mask: which (hi, lo) addresses lie in any network."""
        out = np.zeros(hi.shape, dtype=bool)
        for i in range(self.net_hi.size):  # a handful of networks, not records
            out |= ((hi & self.mask_hi[i]) == self.net_hi[i]) & (
                (lo & self.mask_lo[i]) == self.net_lo[i]
            )
        return out


@dataclass(frozen=True)
class HostWindows:
    """Feature rows: one per (window, internal host), sorted that way.

    ``values`` is ``(n, len(FEATURE_NAMES))`` float64 in the units of
    :mod:`~edge_agent.features.spec` (raw, before ``log1p`` and scaling).
    The record counters say what happened to the input.
    """

    host: np.ndarray  # V16, IPv4-mapped for IPv4
    window_start_ms: np.ndarray  # int64, ms since epoch
    values: np.ndarray
    window_s: int
    spec_version: int
    records_in: int  # input records
    records_unknown_rate: int  # sampling_rate 0: counted as 1
    records_external: int  # neither address internal: no row uses them

    def __len__(self) -> int:
        return int(self.host.shape[0])

    def column(self, name: str) -> np.ndarray:
        """Return one feature column by name."""
        return self.values[:, spec.feature_index((name,))[0]]


def address_halves(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a ``V16`` (or ``(n, 16)`` uint8) address column into two uint64.

    The halves are big-endian, so comparing (hi, lo) orders like the address.
    """
    raw = np.ascontiguousarray(column)
    if raw.dtype.kind == "V" and raw.dtype.itemsize == 16:
        raw = raw.reshape(-1).view(np.uint8).reshape(-1, 16)
    elif not (raw.dtype == np.uint8 and raw.ndim == 2 and raw.shape[1] == 16):
        raise FeatureInputError(
            f"address column must be V16 or (n, 16) uint8, got {raw.dtype} "
            f"with shape {raw.shape}"
        )
    halves = raw.view(">u8").reshape(-1, 2).astype(np.uint64)
    return halves[:, 0].copy(), halves[:, 1].copy()


def halves_to_v16(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Inverse of :func:`address_halves`: two uint64 arrays to ``V16``."""
    pair = np.empty((hi.size, 2), dtype=">u8")
    pair[:, 0] = hi
    pair[:, 1] = lo
    return pair.view(np.uint8).reshape(-1, 16).view("V16").reshape(-1)


def _columns(records: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names: Sequence[str]
    if isinstance(records, np.ndarray):
        names = records.dtype.names or ()
        cols = {n: records[n] for n in names}
    elif isinstance(records, Mapping):
        cols = {n: np.asarray(v) for n, v in records.items()}
    else:
        raise FeatureInputError(
            f"records must be a structured array or a column mapping, "
            f"got {type(records).__name__}"
        )
    missing = [n for n in REQUIRED_COLUMNS if n not in cols]
    if missing:
        raise FeatureInputError(f"records lack column(s): {', '.join(missing)}")
    n = len(cols["time_start"])
    for name in (*REQUIRED_COLUMNS, FLOW_COUNT_COLUMN):
        if name in cols and len(cols[name]) != n:
            raise FeatureInputError(
                f"column {name!r} has {len(cols[name])} rows, time_start has {n}"
            )
    return cols


def _group_ids(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Group rows by equal keys (first key primary).

    Returns ``(first, inverse)``: the row index of each group's first row in
    sorted order, and each row's group id.
    """
    n = keys[0].size
    order = np.lexsort(tuple(reversed(keys)))
    change = np.zeros(n, dtype=bool)
    if n:
        change[0] = True
    for k in keys:
        ks = k[order]
        change[1:] |= ks[1:] != ks[:-1]
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(change) - 1
    return order[change], inverse


def host_window_features(
    records: np.ndarray | Mapping[str, np.ndarray],
    internal_networks: Sequence[str] | InternalNetworks,
    window_s: int = spec.DEFAULT_WINDOW_S,
) -> HostWindows:
    """Compute the feature rows of every internal host in every window.

    ``records``: :data:`FLOW_DTYPE` records or a mapping with at least
    :data:`REQUIRED_COLUMNS` (plus optional ``flow_count``, default 1).
    ``internal_networks``: CIDRs whose hosts get rows.  ``window_s``: window
    length in seconds (> 0).  Raises :class:`FeatureInputError` on missing
    columns or mismatched lengths.
    """
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0 seconds, got {window_s}")
    nets = (
        internal_networks
        if isinstance(internal_networks, InternalNetworks)
        else InternalNetworks.parse(internal_networks)
    )
    cols = _columns(records)
    n_records = len(cols["time_start"])
    src_hi, src_lo = address_halves(cols["src_addr"])
    dst_hi, dst_lo = address_halves(cols["dst_addr"])
    src_int = nets.contains(src_hi, src_lo)
    dst_int = nets.contains(dst_hi, dst_lo)

    rate = cols["sampling_rate"].astype(np.float64)
    unknown_rate = rate == 0
    rate[unknown_rate] = 1.0
    if FLOW_COUNT_COLUMN in cols:
        flows = cols[FLOW_COUNT_COLUMN].astype(np.int64)
    else:
        flows = np.ones(n_records, dtype=np.int64)
    window_ms = int(window_s) * 1000
    window = cols["time_start"].astype(np.int64) // window_ms

    proto = cols["protocol"].astype(np.int64)
    flags = cols["tcp_flags"].astype(np.int64)
    dst_port = cols["dst_port"].astype(np.int64)
    tcp = proto == spec.PROTO_TCP
    tcp_udp = tcp | (proto == spec.PROTO_UDP)
    syn_no_ack = tcp & ((flags & spec.TCP_SYN) != 0) & ((flags & spec.TCP_ACK) == 0)
    rst = tcp & ((flags & spec.TCP_RST) != 0)
    pkts = cols["packets"].astype(np.float64) * rate
    octets = cols["bytes"].astype(np.float64) * rate

    # One "side" row per (record, internal end): out rows, then in rows.
    out_idx = np.flatnonzero(src_int)
    in_idx = np.flatnonzero(dst_int)
    n_out = out_idx.size
    side = np.concatenate([out_idx, in_idx])
    host_hi = np.concatenate([src_hi[out_idx], dst_hi[in_idx]])
    host_lo = np.concatenate([src_lo[out_idx], dst_lo[in_idx]])
    side_window = window[side]
    first, inverse = _group_ids([side_window, host_hi, host_lo])
    n_groups = first.size
    g_out = inverse[:n_out]
    g_in = inverse[n_out:]

    values = np.zeros((n_groups, len(spec.FEATURE_NAMES)), dtype=np.float64)

    def put(name: str, column: np.ndarray) -> None:
        values[:, spec.FEATURE_NAMES.index(name)] = column

    def out_sum(weights: np.ndarray) -> np.ndarray:
        return np.bincount(g_out, weights=weights[out_idx], minlength=n_groups)

    def in_sum(weights: np.ndarray) -> np.ndarray:
        return np.bincount(g_in, weights=weights[in_idx], minlength=n_groups)

    pkts_out = out_sum(pkts)
    put("pkts_out", pkts_out)
    put("pkts_in", in_sum(pkts))
    put("bytes_out", out_sum(octets))
    put("bytes_in", in_sum(octets))
    put("records_out", out_sum(flows.astype(np.float64)))
    put("records_in", in_sum(flows.astype(np.float64)))
    put("tcp_starts_out", out_sum(syn_no_ack * flows * rate))

    pair_group, abundance = abundances(
        g_out, [dst_hi[out_idx], dst_lo[out_idx]], flows[out_idx]
    )
    put("dst_addrs_out", chao1(pair_group, abundance, n_groups))
    put("dst_addr_entropy", entropy_bits(pair_group, abundance, n_groups))
    port_rows = tcp_udp[out_idx]
    pair_group, abundance = abundances(
        g_out[port_rows], [dst_port[out_idx][port_rows]], flows[out_idx][port_rows]
    )
    put("dst_ports_out", chao1(pair_group, abundance, n_groups))
    put("dst_port_entropy", entropy_bits(pair_group, abundance, n_groups))

    has_out = pkts_out > 0
    for name, ports, protocol_mask in (
        ("mail_share", spec.MAIL_PORTS, tcp),
        ("dns_share", spec.DNS_PORTS, tcp_udp),
        ("irc_share", spec.IRC_PORTS, tcp),
    ):
        to_port = protocol_mask & np.isin(dst_port, ports)
        share = np.zeros(n_groups)
        share[has_out] = out_sum(pkts * to_port)[has_out] / pkts_out[has_out]
        put(name, share)

    tcp_records = np.bincount(inverse, weights=(tcp * flows)[side], minlength=n_groups)
    failed = np.bincount(
        inverse, weights=((syn_no_ack | rst) * flows)[side], minlength=n_groups
    )
    failed_share = np.zeros(n_groups)
    has_tcp = tcp_records > 0
    failed_share[has_tcp] = failed[has_tcp] / tcp_records[has_tcp]
    put("failed_tcp_share", failed_share)

    return HostWindows(
        host=halves_to_v16(host_hi[first], host_lo[first]),
        window_start_ms=side_window[first] * window_ms,
        values=values,
        window_s=int(window_s),
        spec_version=spec.FEATURE_SPEC_VERSION,
        records_in=n_records,
        records_unknown_rate=int(unknown_rate.sum()),
        records_external=int((~src_int & ~dst_int).sum()),
    )
