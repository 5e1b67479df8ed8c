"""How small can a batch get?  ``python -m cloud.bench.wire_floor``.

Issue 3 asks the relay to ship at least 10x fewer bytes per input flow
record than the raw export and 3x fewer than gzip'd JSON lines.  This
script measures how far from those targets the *information* in what the
relay ships is, on the same records ``sampleflow bench wire-ctu13`` ships
(CTU-13 scenario 6 sampled 1:100 and exported as IPFIX, through decode,
aggregation, filter and encoder; every batch is decoded back with
:func:`~edge_agent.wire.decode_batch`, so the rows measured are exactly
the rows shipped, scores included).  Every figure is divided by the
**input** flow records (decoded, before aggregation).

(a) Entropy.  Each shipped column is coded by an adaptive model (the
    PPM "method C" estimator: a value seen ``c`` times in ``t`` earlier
    rows of its context, with ``d`` distinct values there, costs
    ``-log2(c / (t + d))`` bits; a new one costs the escape ``-log2(d /
    (t + d))`` plus its cost in the next, coarser context, and finally
    its spelling in plain bits).  The code lengths are those an
    arithmetic coder driven by the model reaches within a few bytes, and
    the model's cost (learning the values) is included, unlike a static
    order-0 entropy, which is printed beside it for reference.  Contexts
    are the obvious ones (destination port given protocol, destination
    given source, score given the host's window) and the 5-tuple's last
    row (its end time, packets and bytes: long flows cut by the active
    timeout and clients that repeat themselves), so the rows are coded in
    time order.  Variants:

    * stream: the model sees the whole replay (any coder with
      whole-dataset context, e.g. one that keeps state across records);
    * batch: reset at every batch, a value new to the batch coded by a
      static model of this very replay (a free prior: optimistic, no
      dictionary can know the future's addresses and times);
    * prior: the same with the static model of another replay (seed 7,
      the one the version 2 dictionary was trained on: other sampled
      records of the same network; what a dictionary could carry).

    Rows of a batch carry no order, so ``log2(n! / prod(m_i!))`` bits a
    batch (``m_i`` the multiplicities of equal rows) are credited once:
    a coder may pick any order, which is worth exactly that.  (A row
    coded from its 5-tuple's last row in the same batch must follow it,
    which takes about a bit off the credit for each such row; not
    counted: the floor errs low.)

(b) Whole-replay compression.  All shipped rows at once, as one version
    2 body (sorted by address, version 2 column specs) and as one byte
    string per column (each compressed alone), plus a column giving each
    row's window (mostly derivable from its end time), compressed with
    lzma (preset 9 | EXTREME), zstd (level 22, long window, with and
    without the version 2 dictionary) and bz2 (9).  These are sizes
    reached, so they bound the floor from above; (a) estimates it from
    below for coders of that model family.  No batch header, partition
    key or batch id is counted in (a) or (b): the floor is that of the
    rows alone.

(c) Several windows a Kinesis record: the non-express rows of k
    consecutive windows as one version 2 body plus a window column, at
    version 2's levels and at zstd 19 (a format change, sketched and
    measured).

The known shortcoming of (a): an entropy estimate under one model family
is not a proof that no other model does better; it is what the
dependencies modelled are worth, measured (each context added so far
took something off the stream figure).
"""

from __future__ import annotations

import argparse
import bz2
import itertools
import lzma
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import msgpack
import numpy as np
import zstandard

from edge_agent.aggregate import Aggregator
from edge_agent.collect.datagram import Datagram
from edge_agent.filter import RelayFilter
from edge_agent.flows.decoder import FlowDecoder
from edge_agent.relay.bench import TARGET_VS_GZIP_JSON, TARGET_VS_RAW
from edge_agent.relay.encode import WindowEncoder
from edge_agent.wire import decode_batch
from edge_agent.wire.batch import _compress as compress_v2
from edge_agent.wire.columns_v2 import encode_columns_v2, sort_rows
from edge_agent.wire.dictionary import zstd_dictionary_v2

_TENANT = "tenant-0001"
_RELAY = "relay-0001"


@dataclass
class Shipped:
    """The rows of every batch shipped, concatenated in shipping order."""

    input_records: int
    export_bytes: int  # UDP payloads of the export
    shipped_bytes: int  # batch data + partition keys, as shipped
    batches: int
    columns: dict[str, np.ndarray]  # all rows of all batches
    batch: np.ndarray  # int64: the batch index of each row
    window_start: np.ndarray  # int64 ms: the window of each row's batch
    window_ms: int
    rows_per_batch: list[int] = field(default_factory=list)
    express: list[bool] = field(default_factory=list)  # per batch
    batch_bytes: list[int] = field(default_factory=list)  # per batch, shipped
    model_version: str | None = None


def ship(
    datagrams: Sequence[Datagram],
    window_ms: int,
    lateness_ms: int,
    relay_filter: RelayFilter | None,
) -> Shipped:
    """Run the relay's path as ``edge_agent.relay.bench.measure_datagrams``
    does (decode, aggregate, filter, encode) and read every batch back."""
    decoder = FlowDecoder()
    aggregator = Aggregator(window_ms=window_ms, lateness_ms=lateness_ms)
    windows = []
    inputs = 0
    for datagram in datagrams:
        records = decoder.decode_many([datagram])
        inputs += int(records.shape[0])
        windows += aggregator.add(records, datagram.received_ms)
        windows += aggregator.advance(datagram.received_ms)
    windows += aggregator.flush()
    encoder = WindowEncoder(_TENANT, _RELAY, "exporter", relay_filter)
    seq = itertools.count(1).__next__
    parts: dict[str, list[np.ndarray]] = {}
    batch_of: list[np.ndarray] = []
    start_of: list[np.ndarray] = []
    sizes: list[int] = []
    express: list[bool] = []
    batch_bytes: list[int] = []
    model: str | None = None
    shipped = 0
    for window in windows:
        for group in encoder.encode(window, seq):
            if group.error is not None:
                raise RuntimeError(f"encoder: {group.error}")
            for batch in group.batches:
                shipped += batch.record_bytes
                express.append(group.express)
                batch_bytes.append(batch.record_bytes)
                decoded = decode_batch(batch.data)
                model = decoded.header.model_version or model
                n = decoded.header.record_count
                for name, values in decoded.columns.items():
                    parts.setdefault(name, []).append(values)
                batch_of.append(np.full(n, len(sizes), dtype=np.int64))
                start_of.append(
                    np.full(n, decoded.header.window_start_ms, dtype=np.int64)
                )
                sizes.append(n)
    lengths = {name: sum(p.shape[0] for p in v) for name, v in parts.items()}
    total = sum(sizes)
    if any(v != total for v in lengths.values()):
        # score is optional per batch: a batch without it would misalign
        raise RuntimeError(f"columns of unequal length across batches: {lengths}")
    return Shipped(
        input_records=inputs,
        export_bytes=sum(len(d.payload) for d in datagrams),
        shipped_bytes=shipped,
        batches=len(sizes),
        columns={name: np.concatenate(v) for name, v in parts.items()},
        batch=np.concatenate(batch_of),
        window_start=np.concatenate(start_of),
        window_ms=window_ms,
        rows_per_batch=sizes,
        express=express,
        batch_bytes=batch_bytes,
        model_version=model,
    )


# --- (a) adaptive code lengths --------------------------------------------


def codes(*arrays: np.ndarray) -> np.ndarray:
    """Dense int64 ids of the rows' value tuples (equal tuples, equal id)."""
    ids = np.zeros(arrays[0].shape[0], dtype=np.int64)
    for values in arrays:
        flat = np.ascontiguousarray(values)
        if flat.dtype.kind in {"V", "f"}:
            flat = flat.view(
                f"S{flat.dtype.itemsize}"
                if flat.dtype.kind == "V"
                else f"<u{flat.dtype.itemsize}"
            )
        _, inverse = np.unique(flat, return_inverse=True)
        inverse = inverse.reshape(-1).astype(np.int64)
        # Pair with what is there so far and compact again.
        _, ids = np.unique(
            ids * (int(inverse.max()) + 1) + inverse, return_inverse=True
        )
        ids = ids.reshape(-1).astype(np.int64)
    return ids


def _prior_counts(group: np.ndarray) -> np.ndarray:
    """For each row, how many earlier rows share its ``group`` id."""
    order = np.argsort(group, kind="stable")
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    run = np.repeat(starts, np.diff(np.r_[starts, group.shape[0]]))
    out = np.empty_like(group)
    out[order] = np.arange(group.shape[0]) - run
    return out


def level_bits(context: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bits, escaped) per row of one PPM-C level: ``bits`` is the cost of
    the row's value in its context when seen before, else the escape's
    cost (``escaped`` True: the value must be coded by the next level)."""
    t = _prior_counts(context)
    pair = codes(context, value)
    c = _prior_counts(pair)
    first = (c == 0).astype(np.int64)
    # distinct values seen before in the row's context
    order = np.argsort(context, kind="stable")
    d_sorted = np.cumsum(first[order]) - first[order]
    ctx_sorted = context[order]
    starts = np.flatnonzero(np.r_[True, ctx_sorted[1:] != ctx_sorted[:-1]])
    base = np.repeat(d_sorted[starts], np.diff(np.r_[starts, context.shape[0]]))
    d = np.empty_like(context)
    d[order] = d_sorted - base
    escaped = c == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = np.where(
            escaped,
            np.where(t == 0, 0.0, -np.log2(np.maximum(d, 1) / (t + d))),
            -np.log2(c / (t + d)),
        )
    return bits, escaped


def chain_bits(
    contexts: Sequence[np.ndarray], value: np.ndarray, spell: np.ndarray
) -> float:
    """Total bits of ``value`` under the chain of ``contexts`` (finest
    first), a value new to the last one costing ``spell`` bits (per row)."""
    vid = codes(value)
    todo = np.ones(value.shape[0], dtype=bool)
    total = 0.0
    for context in contexts:
        bits, escaped = level_bits(context, vid)
        total += float(bits[todo].sum())
        todo &= escaped
    return total + float(spell[todo].sum())


def static_code_bits(value: np.ndarray) -> np.ndarray:
    """Per row, ``-log2`` of its value's frequency over all rows: the code
    a static model trained on this very data gives (its cost not counted)."""
    ids = codes(value)
    counts = np.bincount(ids).astype(np.float64)
    return -np.log2(counts[ids] / ids.shape[0])


def static_entropy_bits(value: np.ndarray) -> float:
    """n times the empirical order-0 entropy (no model cost)."""
    return float(static_code_bits(value).sum())


def prior_code_bits(
    value: np.ndarray, prior: np.ndarray, spell: np.ndarray
) -> np.ndarray:
    """Per row, the bits of a static model fitted to ``prior`` (another
    replay's values: what a dictionary shipped with the format could
    know): a value seen there ``k`` times out of ``N`` with ``D`` distinct
    costs ``-log2(k / (N + D))``, another the escape ``-log2(D / (N + D))``
    plus ``spell``."""
    table, counts = np.unique(prior, return_counts=True)
    total = float(prior.shape[0] + table.shape[0])
    if table.shape[0] == 0:
        return spell.astype(np.float64)
    at = np.minimum(np.searchsorted(table, value), table.shape[0] - 1)
    found = table[at] == value
    seen = -np.log2(counts[at] / total)
    escape = -np.log2(table.shape[0] / total) + spell
    return np.where(found, seen, escape)


def _gamma_bits(values: np.ndarray) -> np.ndarray:
    """Elias gamma length of v + 1 (a universal code for any integer >= 0)."""
    v = values.astype(np.float64) + 1.0
    return 2.0 * np.floor(np.log2(v)) + 1.0


def _signed_gamma_bits(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.int64)
    return _gamma_bits(np.where(v >= 0, 2 * v, -2 * v - 1))


@dataclass(frozen=True)
class ColumnFloor:
    """One column's cost, bits in total over the rows."""

    name: str
    model: str  # the context chain, readable
    distinct: int
    static_bits: float  # empirical order-0 entropy x n
    stream_bits: float  # adaptive, whole replay in time order
    batch_bits: float  # adaptive, reset at each batch, free static prior
    prior_bits: float = math.nan  # the same with another replay's prior


def _earlier_row(key: np.ndarray) -> np.ndarray:
    """For each row, the index of the last earlier row with the same key
    (rows in coding order), or -1."""
    order = np.argsort(key, kind="stable")
    same = np.r_[False, key[order][1:] == key[order][:-1]]
    earlier = np.full(key.shape[0], -1, dtype=np.int64)
    earlier[order[same]] = order[np.flatnonzero(same) - 1]
    return earlier


def _time_floor(  # noqa: PLR0917 - the columns it reads
    col: dict[str, np.ndarray],
    src: np.ndarray,
    dst: np.ndarray,
    batch: np.ndarray,
    window_start: np.ndarray,
    plain_bits: float,
    prior: dict[str, np.ndarray] | None,
    values_out: dict[str, np.ndarray],
) -> ColumnFloor:
    """The end time of rows in time order.  A row whose 5-tuple came
    before (the decoder knows: it has the 5-tuple already) codes its
    start as the gap after that row's end, given the gap before it (a
    periodic client repeats it); another codes its end in the window in
    plain bits.  Per batch, only an earlier row of the same batch counts,
    and the fallbacks are static codes of the whole replay (the free
    prior)."""
    key = codes(src, dst, col["src_port"], col["dst_port"], col["protocol"])
    earlier = _earlier_row(key)
    seen = earlier >= 0
    at = np.maximum(earlier, 0)
    gap = np.where(seen, col["time_start"] - col["time_end"][at], 0)
    twice = seen & (earlier[at] >= 0)
    gap_before = np.where(twice, gap[at], np.iinfo(np.int64).min)
    offset = col["time_end"] - window_start
    # whole replay in time order
    h = seen
    stream = chain_bits(
        [codes(gap_before[h]), np.zeros(int(h.sum()), dtype=np.int64)],
        gap[h],
        _signed_gamma_bits(gap[h]),
    ) + plain_bits * float((~h).sum())
    # per batch
    h = seen & (batch[at] == batch)
    values_out["time_end:gap"] = gap[h]
    values_out["time_end"] = offset[~h]
    per_batch = chain_bits([codes(batch[h])], gap[h], static_code_bits(gap)[h]) + float(
        static_code_bits(offset)[~h].sum()
    )
    with_prior = math.nan
    if prior is not None:
        gap_bits = prior_code_bits(
            gap[h], prior["time_end:gap"], _signed_gamma_bits(gap[h])
        )
        end_bits = prior_code_bits(
            offset[~h], prior["time_end"], np.full(int((~h).sum()), plain_bits)
        )
        with_prior = chain_bits([codes(batch[h])], gap[h], gap_bits) + float(
            end_bits.sum()
        )
    return ColumnFloor(
        "time_end",
        "gap after the 5-tuple's last end | gap before; end",
        int(codes(offset).max()) + 1,
        static_entropy_bits(offset),
        stream,
        per_batch,
        with_prior,
    )


def column_floors(
    s: Shipped, prior: dict[str, np.ndarray] | None = None
) -> tuple[list[ColumnFloor], float, dict[str, np.ndarray]]:
    """Every shipped column's cost, the order credit in bits, and the
    values each column's last fallback codes (``prior`` for another
    replay: its per-batch figure then also uses them as a dictionary)."""
    values_out: dict[str, np.ndarray] = {}
    c = s.columns
    n = s.batch.shape[0]
    # Time order of the replay (the model's learning order): by end time.
    order = np.lexsort((c["time_start"], c["time_end"]))
    col = {name: values[order] for name, values in c.items()}
    batch = s.batch[order]
    wstart = s.window_start[order]
    everyone = np.zeros(n, dtype=np.int64)
    b = codes(batch)

    def ipv4_number(name: str) -> np.ndarray:
        raw = np.ascontiguousarray(col[name]).view(np.uint8).reshape(n, 16)
        return raw[:, 12:].copy().view(">u4").reshape(n).astype(np.int64)

    src, dst = ipv4_number("src_addr"), ipv4_number("dst_addr")
    src16, dst16 = src >> 16, dst >> 16
    spell_addr = np.full(n, 16.0)  # low 16 bits plain after a /16 level
    window_len = float(s.window_ms)
    rows: list[ColumnFloor] = []

    def add(
        name: str,
        model: str,
        value: np.ndarray,
        contexts: Callable[[np.ndarray], list[np.ndarray]],
        spell: np.ndarray,
        *,
        alternative: Callable[[np.ndarray], list[np.ndarray]] | None = None,
    ) -> None:
        """One column; with an ``alternative`` chain, each variant takes
        the better of the two (one bit a batch would say which: left out)."""
        value = value.astype(np.int64)
        values_out[name] = value
        chains = [contexts] if alternative is None else [contexts, alternative]

        def best(scope: np.ndarray, fallback: np.ndarray) -> float:
            return min(chain_bits(ch(scope), value, fallback) for ch in chains)

        stream = best(everyone, spell)
        per_batch = best(b, static_code_bits(value))
        with_prior = math.nan
        if prior is not None:
            with_prior = best(b, prior_code_bits(value, prior[name], spell))
        rows.append(
            ColumnFloor(
                name,
                model,
                int(codes(value).max()) + 1,
                static_entropy_bits(value),
                stream,
                per_batch,
                with_prior,
            )
        )

    def with_(scope: np.ndarray, *parts: np.ndarray) -> np.ndarray:
        return codes(scope, *parts)

    # Addresses: the address in its context, else in its scope; a new one
    # is coded as its /16 (adaptive over the new ones), then 16 plain bits.
    def addr_bits(
        value: np.ndarray,
        prefix: np.ndarray,
        scope: np.ndarray,
        extra: list[list[np.ndarray]],
        fallback: np.ndarray | None,
    ) -> float:
        vid = codes(value)
        todo = np.ones(n, dtype=bool)
        total = 0.0
        for context in [*(with_(scope, *e) for e in extra), scope]:
            bits, escaped = level_bits(context, vid)
            total += float(bits[todo].sum())
            todo &= escaped
        if fallback is not None:  # a static code per address
            return total + float(fallback[todo].sum())
        # new addresses: their /16 (adaptive over the new ones, in scope),
        # then the low 16 bits plain
        sub_scope = scope[todo]
        pbits, pesc = level_bits(sub_scope, codes(prefix[todo]))
        total += float(pbits.sum()) + 16.0 * float(pesc.sum())
        return total + float(spell_addr[todo].sum())

    def address_row(
        name: str,
        model: str,
        value: np.ndarray,
        prefix: np.ndarray,
        extra: list[list[np.ndarray]],
    ) -> None:
        values_out[name] = value
        values_out[name + ":/16"] = prefix
        with_prior = math.nan
        if prior is not None:
            spell = prior_code_bits(prefix, prior[name + ":/16"], spell_addr) + 16.0
            fallback = prior_code_bits(value, prior[name], spell)
            with_prior = addr_bits(value, prefix, b, extra, fallback)
        rows.append(
            ColumnFloor(
                name,
                model,
                int(codes(value).max()) + 1,
                static_entropy_bits(value),
                addr_bits(value, prefix, everyone, extra, None),
                addr_bits(value, prefix, b, extra, static_code_bits(value)),
                with_prior,
            )
        )

    address_row("src_addr", "address, its /16, 16 bits", src, src16, [])
    address_row("dst_addr", "address | src, address, its /16", dst, dst16, [[src]])

    end_offset = col["time_end"] - wstart
    duration = col["time_end"] - col["time_start"]
    span = float(max(1, int(end_offset.max()) - int(end_offset.min()) + 1))
    proto = col["protocol"]
    plain = math.log2(max(span, window_len))
    rows.append(_time_floor(col, src, dst, batch, wstart, plain, prior, values_out))
    add(
        "time_start",
        "duration | protocol, duration, gamma",
        duration,
        lambda scope: [with_(scope, proto), scope],
        _gamma_bits(duration),
    )
    add(
        "src_port",
        "port | src, dst, proto; | proto; 16 bits",
        col["src_port"],
        lambda scope: [with_(scope, src, dst, proto), with_(scope, proto), scope],
        np.full(n, 16.0),
    )
    add(
        "dst_port",
        "port | src, dst, proto; | dst, proto; | proto",
        col["dst_port"],
        lambda scope: [
            with_(scope, src, dst, proto),
            with_(scope, dst, proto),
            with_(scope, proto),
            scope,
        ],
        np.full(n, 16.0),
    )
    add("protocol", "order 0, 8 bits", proto, lambda scope: [scope], np.full(n, 8.0))
    packets = col["packets"].astype(np.int64)
    # The same 5-tuple's last row (a long flow cut by the active timeout, a
    # client repeating itself): per batch only if it is in the same batch.
    earlier = _earlier_row(codes(src, dst, col["src_port"], col["dst_port"], proto))
    at = np.maximum(earlier, 0)

    def before(values: np.ndarray, scope: np.ndarray) -> np.ndarray:
        known = (earlier >= 0) & (scope[at] == scope)
        return np.where(known, values[at], -1)

    add(
        "packets",
        "packets | the 5-tuple's last packets, proto; | proto",
        packets,
        lambda scope: [
            with_(scope, before(packets, scope), proto),
            with_(scope, proto),
            scope,
        ],
        _gamma_bits(packets),
        alternative=lambda scope: [with_(scope, proto), scope],
    )
    size = col["bytes"].astype(np.int64)
    dst_port = col["dst_port"]
    add(
        "bytes",
        "bytes | packets, last bytes; packets, proto, dport, dst...",
        size,
        lambda scope: [
            with_(scope, packets, before(size, scope)),
            with_(scope, packets, proto, dst_port, dst),
            with_(scope, packets, proto, dst_port),
            with_(scope, packets, proto),
            with_(scope, packets),
            scope,
        ],
        _gamma_bits(size),
        alternative=lambda scope: [
            with_(scope, packets, proto, dst_port, dst),
            with_(scope, packets, proto, dst_port),
            with_(scope, packets, proto),
            with_(scope, packets),
            scope,
        ],
    )
    flows = col["flow_count"]
    add(
        "flow_count", "order 0, gamma", flows, lambda scope: [scope], _gamma_bits(flows)
    )
    flags = col["tcp_flags"]
    add(
        "tcp_flags",
        "flags | protocol, packets; | protocol; 16 bits",
        flags,
        lambda scope: [with_(scope, proto, packets), with_(scope, proto), scope],
        np.full(n, 16.0),
    )
    if "score" in col:
        score = np.ascontiguousarray(col["score"]).view("<u4")
        # A row's score is its internal host's window score: given the
        # batch (window) and either end it repeats.
        add(
            "score",
            "score | src; | dst; order 0; 32 bits",
            score,
            lambda scope: [with_(b, src), with_(b, dst), scope],
            np.full(n, 32.0),
        )
    for name in (
        "exporter",
        "sampling_rate",
        "in_if",
        "out_if",
        "present",
        "tos",
        "export_proto",
        "ip_version",
        "direction",
    ):
        value = col[name]
        bits = 8.0 * value.dtype.itemsize
        if value.dtype.kind == "V":  # comparable across replays: 8 low bytes
            value = np.ascontiguousarray(value).view("<u8").reshape(n, 2)[:, 1]
        add(name, "order 0", value, lambda scope: [scope], np.full(n, bits))
    # The window a row belongs to, given its end time: mostly the obvious one.
    slot = (wstart - (col["time_end"] // s.window_ms) * s.window_ms) // s.window_ms
    add(
        "(window)",
        "window - floor(end / l), order 0, gamma",
        slot,
        lambda scope: [scope],
        _signed_gamma_bits(slot),
    )
    # Order credit: log2(n! / prod(m_i!)) per batch.
    credit = 0.0
    whole = codes(b, *(col[name] for name in sorted(col)))
    for _, members in itertools.groupby(np.sort(whole)):
        m = sum(1 for _ in members)
        credit -= math.lgamma(m + 1) / math.log(2)
    for count in s.rows_per_batch:
        credit += math.lgamma(count + 1) / math.log(2)
    return rows, credit, values_out


# --- (b) whole-replay compression -----------------------------------------


def _compressors() -> dict[str, Callable[[bytes], int]]:
    dictionary = zstandard.ZstdCompressionDict(zstd_dictionary_v2().as_bytes())

    def zstd22(data: bytes, dict_data: zstandard.ZstdCompressionDict | None) -> int:
        params = zstandard.ZstdCompressionParameters.from_level(
            22, source_size=len(data), enable_ldm=True, window_log=27
        )
        return len(
            zstandard.ZstdCompressor(
                compression_params=params, dict_data=dict_data
            ).compress(data)
        )

    return {
        "lzma 9e": lambda d: len(lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)),
        "zstd 22 long": lambda d: zstd22(d, None),
        "zstd 22 long+dict": lambda d: zstd22(d, dictionary),
        "bz2 9": lambda d: len(bz2.compress(d, 9)),
    }


def _transforms(s: Shipped) -> dict[str, list[bytes]]:
    """Byte strings to compress, by name: each transform's pieces (their
    compressed sizes add up)."""
    c = s.columns
    n = s.batch.shape[0]
    slot = (s.window_start - (c["time_end"] // s.window_ms) * s.window_ms) // (
        s.window_ms
    )
    order = sort_rows(c["src_addr"], c["dst_addr"])
    by_address = {name: np.take(v, order) for name, v in c.items()}
    by_time = np.lexsort((c["time_start"], c["time_end"]))
    by_end = {name: np.take(v, by_time) for name, v in c.items()}
    out: dict[str, list[bytes]] = {}
    for label, cols, slots in (
        ("v2 body, rows by address", by_address, slot[order]),
        ("v2 body, rows by end time", by_end, slot[by_time]),
    ):
        entries, zero = encode_columns_v2(cols)
        body = {"n": n, "z": zero, "c": entries, "slot": slots.astype("<i1").tobytes()}
        out[label] = [msgpack.packb(body, use_bin_type=True)]
        pieces = [msgpack.packb(entry, use_bin_type=True) for entry in entries]
        pieces.append(slots.astype("<i1").tobytes())
        out[label.replace("v2 body", "v2 columns apart")] = pieces
    return out


def whole_sizes(s: Shipped) -> list[tuple[str, str, int]]:
    """(transform, compressor, bytes) for every pair."""
    results = []
    compressors = _compressors()
    for label, pieces in _transforms(s).items():
        for name, compress in compressors.items():
            results.append((label, name, sum(compress(p) for p in pieces)))
    return results


# --- several windows a record --------------------------------------------


def _zstd_v2(level: int) -> Callable[[bytes], bytes]:
    """A version 2 frame (dictionary, checksum, size, no magic) at ``level``."""
    compressor = zstandard.ZstdCompressor(
        level=level,
        dict_data=zstd_dictionary_v2(),
        write_checksum=True,
        write_content_size=True,
        write_dict_id=False,
    )
    return lambda data: compressor.compress(data)[4:]


def multi_window_bytes(s: Shipped, windows: int, level: int | None = None) -> int:
    """Bytes shipped if the rows of ``windows`` consecutive windows (of one
    exporter) travelled in one record: the express batches as shipped
    (they must leave at once), the other rows of each run of windows as
    one version 2 body, rows sorted by address, with the rows' window as
    an extra column (window index minus the one its end time gives: mostly
    0), under the version 2 header, levels and dictionary, plus the
    partition key.  ``level``: a zstd level for every body instead of
    version 2's levels by size.  A sketch of a format change, measured: no
    reader knows the extra column."""
    compress = compress_v2 if level is None else _zstd_v2(level)
    total = sum(b for b, e in zip(s.batch_bytes, s.express, strict=True) if e)
    express_batch = np.asarray(s.express)[s.batch]
    keep = ~express_batch
    cols = {name: v[keep] for name, v in s.columns.items()}
    wstart = s.window_start[keep]
    slot_of = wstart // s.window_ms
    group = slot_of // windows
    key_len = 12  # the partition key: 12 base64 characters
    for g in np.unique(group):
        rows = group == g
        part = {name: v[rows] for name, v in cols.items()}
        order = sort_rows(part["src_addr"], part["dst_addr"])
        part = {name: np.take(v, order) for name, v in part.items()}
        slots = slot_of[rows][order]
        derived = part["time_end"] // s.window_ms
        residual = (slots - derived).astype(np.int64)
        entries, zero = encode_columns_v2(part)
        start = int(g) * windows * s.window_ms
        body: dict[str, object] = {
            "v": 0,
            "t": _TENANT,
            "r": _RELAY,
            "i": bytes(10),
            "s": 123456,
            "w": start,
            "l": windows * s.window_ms,
            "n": int(rows.sum()),
            "e": windows * s.window_ms + 31_000,
        }
        if s.model_version is not None:
            body["m"] = s.model_version
        if zero:
            body["z"] = zero
        if np.any(residual):  # as a FOR spec of its own width
            lo = int(residual.min())
            width = max(1, ((int(residual.max()) - lo).bit_length() + 7) // 8)
            wide = (residual - lo).astype("<u8").view(np.uint8).reshape(-1, 8)
            planes = np.ascontiguousarray(wide[:, :width].T).tobytes()
            entries.append([33, 2, planes, width, lo])
        body["c"] = entries
        packed = msgpack.packb(body, use_bin_type=True)
        total += 4 + len(compress(packed)) + key_len
    return total


# --- report ---------------------------------------------------------------


def print_floor(  # noqa: PLR0917 - one table, its six inputs
    s: Shipped,
    floors: list[ColumnFloor],
    credit: float,
    whole: list[tuple[str, str, int]],
    gzip_json_bytes: int,
    stream: TextIO,
) -> None:
    """The tables: per column, the sums, whole-replay sizes, the targets."""
    n_in = s.input_records
    rows = s.batch.shape[0]
    raw_per = s.export_bytes / n_in
    json_per = gzip_json_bytes / n_in
    need_raw = raw_per / TARGET_VS_RAW
    need_json = json_per / TARGET_VS_GZIP_JSON
    print(
        f"{n_in:,} input records, {rows:,} rows shipped in {s.batches:,} batches "
        f"({rows / s.batches:.0f} rows a batch), {s.window_ms / 1000:g} s windows",
        file=stream,
    )
    print(
        f"raw export {raw_per:.2f} B/rec, gzip'd JSON {json_per:.2f} B/rec, "
        f"shipped (v2) {s.shipped_bytes / n_in:.2f} B/rec; targets: "
        f"{need_raw:.2f} (10x raw), {need_json:.2f} (3x JSON) B/rec\n",
        file=stream,
    )
    print("(a) bytes per input record, by column", file=stream)
    head = (
        f"{'column':<14} {'model':<46} {'distinct':>8} {'order0':>7} "
        f"{'stream':>7} {'batch':>7} {'prior':>7}"
    )
    print(head, file=stream)
    print("-" * len(head), file=stream)
    per = 8.0 * n_in
    for f in sorted(floors, key=lambda f: -f.batch_bits):
        print(
            f"{f.name:<14} {f.model[:46]:<46} {f.distinct:>8,} "
            f"{f.static_bits / per:>7.3f} {f.stream_bits / per:>7.3f} "
            f"{f.batch_bits / per:>7.3f} {f.prior_bits / per:>7.3f}",
            file=stream,
        )
    static = sum(f.static_bits for f in floors) / per
    prior_sum = sum(f.prior_bits for f in floors) / per
    stream_sum = sum(f.stream_bits for f in floors) / per
    batch_sum = sum(f.batch_bits for f in floors) / per
    print("-" * len(head), file=stream)
    print(
        f"{'sum':<14} {'':<46} {'':>8} {static:>7.3f} {stream_sum:>7.3f} "
        f"{batch_sum:>7.3f} {prior_sum:>7.3f}",
        file=stream,
    )
    c = credit / per
    print(
        f"{'order credit':<14} {'log2(n!/prod m!) per batch':<46} {'':>8} "
        f"{-c:>7.3f} {-c:>7.3f} {-c:>7.3f} {-c:>7.3f}",
        file=stream,
    )
    print(
        f"{'floor (a)':<14} {'':<46} {'':>8} {static - c:>7.3f} "
        f"{stream_sum - c:>7.3f} {batch_sum - c:>7.3f} {prior_sum - c:>7.3f}",
        file=stream,
    )
    print(
        "order0: static empirical entropy (no model cost, optimistic); stream: "
        "adaptive model over the whole replay in time order; batch: the model "
        "reset at every batch, new values coded by a static model of this very "
        "replay (a free prior: optimistic); prior: the same with the static "
        "model of another replay (a dictionary could carry it).\n",
        file=stream,
    )
    print("(b) all shipped rows at once, compressed", file=stream)
    head = (
        f"{'transform':<34} {'compressor':<18} {'bytes':>10} {'B/rec':>7} "
        f"{'raw/this':>8} {'json/this':>9}"
    )
    print(head, file=stream)
    print("-" * len(head), file=stream)
    for label, name, size in whole:
        print(
            f"{label:<34} {name:<18} {size:>10,} {size / n_in:>7.3f} "
            f"{s.export_bytes / size:>7.1f}x {gzip_json_bytes / size:>8.1f}x",
            file=stream,
        )
    best = min(whole, key=lambda w: w[2])
    floor_stream = (stream_sum - c) * n_in
    floor_batch = (batch_sum - c) * n_in
    floor_prior = (prior_sum - c) * n_in
    print(file=stream)
    summary: tuple[tuple[str, float], ...] = (
        ("as shipped (v2, per batch)", s.shipped_bytes),
        ("floor (a), per batch, another replay's prior", floor_prior),
        ("floor (a), per batch, free prior", floor_batch),
        ("floor (a), whole-replay model", floor_stream),
        (f"best whole-replay: {best[0]}, {best[1]}", best[2]),
    )
    for label, amount in summary:
        ratio_raw = s.export_bytes / amount
        ratio_json = gzip_json_bytes / amount
        print(
            f"{label:<58} {amount / n_in:6.2f} B/rec  {ratio_raw:5.1f}x raw "
            f"({'meets' if ratio_raw >= TARGET_VS_RAW else 'misses'} 10x)  "
            f"{ratio_json:4.1f}x JSON "
            f"({'meets' if ratio_json >= TARGET_VS_GZIP_JSON else 'misses'} 3x)",
            file=stream,
        )


def print_multi_window(
    s: Shipped,
    sizes: list[tuple[int, int, int]],
    gzip_json_bytes: int,
    stream: TextIO,
) -> None:
    """Bytes per input record with several windows in one record."""
    n_in = s.input_records
    print(
        "\n(c) several windows in one Kinesis record (express rows apart)", file=stream
    )
    head = (
        f"{'windows a record':<18} {'latency':>8} {'v2 B/rec':>8} {'raw/this':>8} "
        f"{'json/this':>9} {'zstd19 B/rec':>12} {'raw/this':>8} {'json/this':>9}"
    )
    print(head, file=stream)
    print("-" * len(head), file=stream)
    for windows, size, size19 in sizes:
        print(
            f"{windows:<18} {windows * s.window_ms / 1000:>7g}s "
            f"{size / n_in:>8.2f} {s.export_bytes / size:>7.1f}x "
            f"{gzip_json_bytes / size:>8.1f}x {size19 / n_in:>12.2f} "
            f"{s.export_bytes / size19:>7.1f}x {gzip_json_bytes / size19:>8.1f}x",
            file=stream,
        )
    print(
        "v2: version 2's zstd levels by body size (3 above 8 KiB); zstd19: level "
        "19 for every body, same dictionary.",
        file=stream,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: the CTU-13 replay, measured as described above."""
    from cloud.bench.wire_ctu13 import ctu13_datagrams  # noqa: PLC0415
    from cloud.training import ctu13  # noqa: PLC0415
    from edge_agent.relay.bench import (  # noqa: PLC0415
        default_filter,
        measure_datagrams,
    )

    parser = argparse.ArgumentParser(
        prog="python -m cloud.bench.wire_floor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument(
        "--prior-seed",
        type=int,
        default=7,
        help="the replay whose statistics are the per-batch prior (default 7, "
        "the one the version 2 dictionary was trained on)",
    )
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--lateness-s", type=float, default=30.0)
    parser.add_argument(
        "--slices",
        type=str,
        default=None,
        help="CTU-13 slices, comma-separated (default all)",
    )
    parser.add_argument(
        "--windows",
        type=int,
        nargs="+",
        default=[1, 3, 6, 30, 90],
        help="windows a record for (c) (default 1 3 6 30 90)",
    )
    args = parser.parse_args(argv)
    slices = [int(x) for x in args.slices.split(",")] if args.slices else None
    replay = ctu13_datagrams(args.rate, args.seed, slices)
    window_ms = round(args.window_s * 1000)
    lateness_ms = round(args.lateness_s * 1000)
    internal = ctu13.INTERNAL_NETWORKS
    shipped = ship(replay.datagrams, window_ms, lateness_ms, default_filter(internal))
    # The bench's own figures for the same replay: the peers, and a check
    # that the batches read back here are the ones it ships.
    bench = measure_datagrams(
        "floor", replay.datagrams, window_ms, lateness_ms, default_filter(internal)
    )
    if (bench.shipped_bytes, bench.batches) != (shipped.shipped_bytes, shipped.batches):
        print(
            f"note: bench shipped {bench.shipped_bytes} bytes in {bench.batches} "
            f"batches, this run {shipped.shipped_bytes} in {shipped.batches} "
            "(batch ids and times differ run to run)",
            file=sys.stderr,
        )
    other = ctu13_datagrams(args.rate, args.prior_seed, slices)
    _, _, prior = column_floors(
        ship(other.datagrams, window_ms, lateness_ms, default_filter(internal))
    )
    floors, credit, _ = column_floors(shipped, prior)
    whole = whole_sizes(shipped)
    print(
        f"CTU-13 scenario 6 at 1:{args.rate} (seed {args.seed}), "
        f"{len(replay.datagrams):,} IPFIX datagrams"
    )
    print_floor(shipped, floors, credit, whole, bench.gzip_json_bytes, sys.stdout)
    multi = [
        (k, multi_window_bytes(shipped, k), multi_window_bytes(shipped, k, 19))
        for k in args.windows
    ]
    print_multi_window(shipped, multi, bench.gzip_json_bytes, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
