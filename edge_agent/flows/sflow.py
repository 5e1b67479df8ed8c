"""sFlow v5 decoding: flow samples to FLOW_DTYPE records, counters kept aside.

One datagram (sFlow v5, sflow.org/sflow_version_5.txt) holds samples; each
sample holds records, and every sample and record starts with an
``enterprise << 12 | format`` word and a byte length, so anything unknown is
skipped by its length.  What is decoded:

* flow samples (enterprise 0, format 1) and expanded flow samples (format 3)
  become one record each (one sampled packet): raw packet header records
  (format 1, parsed by :mod:`edge_agent.flows.packet_headers`), sampled
  IPv4 / IPv6 records (3, 4), extended switch (1001), router (1002) and
  gateway (1003) records fill the columns;
* counter samples (2) and expanded counter samples (4) are kept as counters
  in :attr:`SflowDecoder.counter_samples`, one :class:`CounterRecord` per
  counter record (generic interface, Ethernet and VLAN counters decoded,
  every other format kept as raw bytes);
* drop notifications (format 5, "discarded packet" samples) are kept in
  :attr:`SflowDecoder.drop_notifications`; they are not sampled traffic, so
  they never become flow records.

Column conventions for a flow sample:

* ``bytes`` is the sampled frame's ``frame_length``: its length on the wire
  at the sampled layer, FCS included for Ethernet (sFlow's own definition,
  the number sFlow analysers scale by the sampling rate).  ``stripped`` is
  not subtracted: it says how many bytes were cut *before the header
  snapshot* (usually the 4-byte FCS), not bytes absent from the packet.  An
  Ethernet frame is therefore about 18 bytes larger than the IPv4 total
  length a NetFlow exporter reports for the same packet.  A sample with only
  a sampled IPv4/IPv6 record reports that record's (IP) length.
* ``packets`` is 1; ``time_start`` = ``time_end`` = the receive time.
* ``domain`` is the sub-agent id, ``sampler_id`` the data source id
  ``(source_id_type << 24) | source_id_index`` (expanded samples: the same
  formula truncated to 32 bits, exact for source type 0, the usual ifIndex
  source).
* ``in_if`` / ``out_if`` are set only for interface format 0 with a non-zero
  value; 0x3FFFFFFF (the device itself) is kept as is.  Output format 1
  (packet discarded, value = reason) and 2 (several interfaces, value =
  count) leave ``out_if`` unknown.
* ``vlan`` is the extended switch record's source VLAN when it gives one
  (1-4095), else the outermost 802.1Q tag of the raw header.
* ``dst_as`` is the last AS of the gateway record's destination AS path;
  with an empty path it is left unknown.  ``next_hop`` and the masks come
  from the extended router record.
* ``direction`` is unknown: a flow sample does not say whether it was taken
  at ingress or egress.

Hostile input never raises: a malformed part is counted in
``counters.errors`` under a reason (documented on :class:`SflowDecoder`) and
what was valid before it is kept.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from edge_agent.flows.counters import ExporterCounters
from edge_agent.flows.packet_headers import (
    NOTHING,
    PORT_PROTOCOLS,
    PROTO_TCP,
    FieldsTuple,
    PacketFields,
    parse_packet_tuple,
)
from edge_agent.flows.sampling import SamplingTable
from edge_agent.flows.schema import (
    FLOW_DTYPE,
    RECORD_STRUCT,
    V4_MAPPED_PREFIX,
    Direction,
    ExportProtocol,
    Field,
    address_text,
)
from edge_agent.flows.sequence import SequenceTracker

#: Default bound of :attr:`SflowDecoder.counter_samples`.
COUNTER_SAMPLES_MAXLEN = 10_000
#: Default bound of :attr:`SflowDecoder.drop_notifications`.
DROP_NOTIFICATIONS_MAXLEN = 10_000
#: Agent streams whose datagram sequence is tracked; the oldest is forgotten.
MAX_TRACKED_AGENTS = 65_536

#: Interface value meaning "the device itself" (sFlow v5, section 5.2).
INTERFACE_INTERNAL = 0x3FFFFFFF

_ZERO16 = bytes(16)
_NO_OTHER: list[tuple[int, int, bytes]] = []  # shared, never appended to
_V4 = V4_MAPPED_PREFIX

_U32 = struct.Struct("!I")
_U32X2 = struct.Struct("!II")
_U32X6 = struct.Struct("!6I")
_DATAGRAM_V4 = struct.Struct("!4sIIII")  # agent, sub agent, seq, uptime, samples
_DATAGRAM_V6 = struct.Struct("!16sIIII")
_DATAGRAM_NONE = struct.Struct("!IIII")
#: Sample format and length, then a flow sample's eight fixed words.
_SAMPLE_AND_FLOW = struct.Struct("!10I")
_NO_WORDS = (0,) * 10
_EXPANDED_FLOW_SAMPLE = struct.Struct("!IIIIIIIIIII")
_COUNTER_SAMPLE = struct.Struct("!III")
_EXPANDED_COUNTER_SAMPLE = struct.Struct("!IIII")
_DROP_SAMPLE = struct.Struct("!IIIIIIII")
_SAMPLED_IPV4 = struct.Struct("!II4s4sIIII")
_SAMPLED_IPV6 = struct.Struct("!II16s16sIIII")
_MASKS = struct.Struct("!II")
_GATEWAY_AS = struct.Struct("!IIII")  # router AS, src AS, src peer AS, segments

_GENERIC_IF = struct.Struct("!IIQIIQIIIIIIQIIIIII")
_GENERIC_IF_NAMES = (
    "if_index",
    "if_type",
    "if_speed",
    "if_direction",
    "if_status",
    "if_in_octets",
    "if_in_ucast_pkts",
    "if_in_multicast_pkts",
    "if_in_broadcast_pkts",
    "if_in_discards",
    "if_in_errors",
    "if_in_unknown_protos",
    "if_out_octets",
    "if_out_ucast_pkts",
    "if_out_multicast_pkts",
    "if_out_broadcast_pkts",
    "if_out_discards",
    "if_out_errors",
    "if_promiscuous_mode",
)
_ETHERNET_IF = struct.Struct("!13I")
_ETHERNET_IF_NAMES = (
    "dot3_stats_alignment_errors",
    "dot3_stats_fcs_errors",
    "dot3_stats_single_collision_frames",
    "dot3_stats_multiple_collision_frames",
    "dot3_stats_sqe_test_errors",
    "dot3_stats_deferred_transmissions",
    "dot3_stats_late_collisions",
    "dot3_stats_excessive_collisions",
    "dot3_stats_internal_mac_transmit_errors",
    "dot3_stats_carrier_sense_errors",
    "dot3_stats_frame_too_longs",
    "dot3_stats_internal_mac_receive_errors",
    "dot3_stats_symbol_errors",
)
_VLAN_COUNTERS = struct.Struct("!IQIIII")
_VLAN_COUNTERS_NAMES = (
    "vlan_id",
    "octets",
    "ucast_pkts",
    "multicast_pkts",
    "broadcast_pkts",
    "discards",
)
#: Counter records decoded into named values, by their data format word
#: (enterprise << 12 | format; all three are enterprise 0).
#: How a counter record is read: its struct and the names of its values.
CounterLayout = tuple[struct.Struct, tuple[str, ...]]

_COUNTER_LAYOUTS: dict[int, CounterLayout] = {
    1: (_GENERIC_IF, _GENERIC_IF_NAMES),
    2: (_ETHERNET_IF, _ETHERNET_IF_NAMES),
    5: (_VLAN_COUNTERS, _VLAN_COUNTERS_NAMES),
}
_new_tuple = tuple.__new__
#: Datagram layouts of counter-only datagrams remembered (see
#: :class:`_CounterShape`); past the bound the table starts afresh.
MAX_COUNTER_SHAPES = 4096


class _CounterShape(NamedTuple):
    """The layout of a clean datagram of counter samples only.

    Every word the walk branched on (address type, sample count, sample
    formats and lengths, record counts, record formats and lengths) is read
    by ``check`` in one call; when a datagram of the same agent and size
    gives the same ``words``, its walk would take the same path, so its
    records are cut at the remembered offsets.  ``dynamic`` reads each
    sample's sequence number and source id (type, index when expanded).
    ``samples`` holds per sample: expanded?, and per record (data start,
    data end, enterprise, format, value layout or None).
    """

    check: struct.Struct
    words: tuple[int, ...]
    dynamic: struct.Struct
    samples: tuple[
        tuple[
            bool,
            tuple[
                tuple[int, int, int, int, tuple[struct.Struct, tuple[str, ...]] | None],
                ...,
            ],
        ],
        ...,
    ]
    records: int
    skipped: int


def _gather(offsets: list[int], size: int) -> struct.Struct:
    """A struct reading the u32 at each of ``offsets`` (ascending)."""
    parts = []
    at = 0
    for offset in offsets:
        parts.append(f"{offset - at}xI" if offset > at else "I")
        at = offset + 4
    return struct.Struct("!" + "".join(parts))


def _counter_shape(buf: bytes, off: int, size: int) -> _CounterShape | None:
    """The layout of a datagram (samples from ``off``) if it holds counter
    samples only and the walk would count nothing wrong in it, else None."""
    checks = [4, off - 4]  # address type, sample count
    dynamic: list[int] = []
    (sample_count,) = _U32.unpack_from(buf, off - 4)
    if sample_count > (size - off) >> 3:
        return None
    samples = []
    records_total = skipped = 0
    for _ in range(sample_count):
        if off + 8 > size:
            return None
        sample_format, length = _U32X2.unpack_from(buf, off)
        checks += [off, off + 4]
        off += 8
        end = off + length
        if end > size or sample_format not in {2, 4}:
            return None
        expanded = sample_format == 4
        head = 16 if expanded else 12
        if off + head > end:
            return None
        dynamic += [off, off + 4, off + 8] if expanded else [off, off + 4]
        checks.append(off + head - 4)
        (record_count,) = _U32.unpack_from(buf, off + head - 4)
        q = off + head
        if record_count > (end - q) >> 3:
            return None
        records = []
        for _ in range(record_count):
            if q + 8 > end:
                return None
            record_format, record_length = _U32X2.unpack_from(buf, q)
            checks += [q, q + 4]
            q += 8
            record_end = q + record_length
            if record_end > end:
                return None
            layout = _COUNTER_LAYOUTS.get(record_format)
            if layout is None:
                skipped += 1
            elif record_length < layout[0].size:
                return None
            records.append(
                (q, record_end, record_format >> 12, record_format & 0xFFF, layout)
            )
            q = (record_end + 3) & ~3
        records_total += len(records)
        samples.append((expanded, tuple(records)))
        off = (end + 3) & ~3
    if off < size:
        return None  # trailing bytes
    check = _gather(checks, size)
    return _CounterShape(
        check=check,
        words=check.unpack_from(buf),
        dynamic=_gather(dynamic, size),
        samples=tuple(samples),
        records=records_total,
        skipped=skipped,
    )


class CounterValues(Mapping[str, int]):
    """The named counters of one counter record, read from its bytes on
    first use (most counter records are queued and dropped unread, and a
    dict of 19 values costs more than the rest of the record).

    A read-only mapping; it compares equal to a dict of the same items.
    """

    __slots__ = ("_data", "_layout", "_values")

    def __init__(self, layout: tuple[struct.Struct, tuple[str, ...]], data: bytes):
        self._layout = layout
        self._data = data
        self._values: dict[str, int] | None = None

    def _decoded(self) -> dict[str, int]:
        values = self._values
        if values is None:
            layout_struct, names = self._layout
            values = dict(
                zip(names, layout_struct.unpack_from(self._data), strict=True)
            )
            self._values = values
        return values

    def __getitem__(self, name: str) -> int:
        return self._decoded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout[1])

    def __len__(self) -> int:
        return len(self._layout[1])

    def __repr__(self) -> str:
        return repr(self._decoded())


#: The values of a counter record whose format is not decoded (shared,
#: read-only).
NO_VALUES: Mapping[str, int] = MappingProxyType({})

_EXPECTED_COLUMNS = (
    "time_start",
    "time_end",
    "exporter",
    "exporter_port",
    "export_proto",
    "ip_version",
    "domain",
    "src_addr",
    "dst_addr",
    "next_hop",
    "src_port",
    "dst_port",
    "protocol",
    "tos",
    "src_mask",
    "dst_mask",
    "tcp_flags",
    "direction",
    "_pad",
    "vlan",
    "bytes",
    "packets",
    "in_if",
    "out_if",
    "src_as",
    "dst_as",
    "sampler_id",
    "sampling_rate",
    "present",
)


def _no_records() -> np.ndarray:
    """A fresh, writable, empty FLOW_DTYPE array (cheaper than np.zeros)."""
    return np.frombuffer(bytearray(), dtype=FLOW_DTYPE)


def _record_struct() -> struct.Struct:
    """The record packer, after checking the column order the packing
    call below is written in."""
    if FLOW_DTYPE.names != _EXPECTED_COLUMNS:
        raise RuntimeError("FLOW_DTYPE changed: update the sFlow record packer")
    return RECORD_STRUCT


_RECORD = _record_struct()

_ALWAYS_PRESENT = int(
    Field.TIME_START | Field.TIME_END | Field.PACKETS | Field.SAMPLER_ID
)
_BYTES = int(Field.BYTES)
_IN_IF = int(Field.IN_IF)
_OUT_IF = int(Field.OUT_IF)
_VLAN = int(Field.VLAN)
_ROUTER = int(Field.NEXT_HOP | Field.SRC_MASK | Field.DST_MASK)
_SRC_AS = int(Field.SRC_AS)
_DST_AS = int(Field.DST_AS)
_SAMPLED_IP = int(Field.SRC_ADDR | Field.DST_ADDR | Field.PROTOCOL | Field.TOS)
_PORTS = int(Field.SRC_PORT | Field.DST_PORT)
_TCP_FLAGS = int(Field.TCP_FLAGS)
_SFLOW = int(ExportProtocol.SFLOW_V5)
#: Sample formats whose records describe one packet: flow, expanded flow,
#: discarded packet.
_PACKET_SAMPLES = frozenset({1, 3, 5})
_UNKNOWN_DIRECTION = int(Direction.UNKNOWN)


class CounterRecord(NamedTuple):
    """One counter record of an sFlow counter sample, kept as counters.

    :attr:`values` holds the decoded counters of generic interface (format
    1), Ethernet (2) and VLAN (5) records, named after the sFlow v5
    structure fields in snake case (``if_in_octets``,
    ``dot3_stats_fcs_errors``...; generic ``if_status`` bit 0 is admin up,
    bit 1 oper up): a read-only mapping (:class:`CounterValues`) read from
    ``data`` when used.  It is empty for other formats, whose bytes are in
    ``data``.  ``counter_layout`` is how ``data`` is read (None: not
    decoded); most records are dropped unread, so no mapping is made for
    them.
    """

    exporter: bytes  # UDP source, 16-byte column form
    exporter_port: int
    agent: bytes  # agent address, 16-byte column form (zeros if unknown)
    sub_agent: int
    datagram_sequence: int
    uptime_ms: int  # agent uptime at export, milliseconds
    received_ms: int  # receive time, ms since the epoch
    sample_sequence: int
    source_id_type: int
    source_id_index: int
    enterprise: int
    format: int
    counter_layout: CounterLayout | None
    data: bytes

    @property
    def values(self) -> Mapping[str, int]:
        """The decoded counters by name (empty if the format is not decoded)."""
        layout = self.counter_layout
        return NO_VALUES if layout is None else CounterValues(layout, self.data)

    @property
    def agent_text(self) -> str:
        """The agent address as text."""
        return address_text(self.agent)


class DropNotification(NamedTuple):
    """One sFlow discarded-packet sample (enterprise 0, format 5).

    ``packet`` holds the flow keys of the discarded packet's header when a
    raw packet header record was carried; ``records`` every record as
    ``(enterprise, format, bytes)`` (egress queue, ACL, function, ...).
    """

    exporter: bytes
    exporter_port: int
    agent: bytes
    sub_agent: int
    received_ms: int
    sample_sequence: int
    source_id_type: int
    source_id_index: int
    drops: int  # discards lost before this one was sampled
    input_if: int  # 0 = unknown
    output_if: int  # 0 = unknown
    reason: int  # drop reason code (sFlow drops extension)
    frame_length: int  # 0 when no raw header was carried
    packet: PacketFields
    records: tuple[tuple[int, int, bytes], ...]


class _Datagram(NamedTuple):
    """The datagram header fields that counter and drop records repeat."""

    exporter: bytes
    exporter_port: int
    agent: bytes
    sub_agent: int
    sequence: int
    uptime_ms: int
    received_ms: int


class SflowDecoder:
    """Decode sFlow v5 datagrams into flow records and counter records.

    One instance serves every exporter; it holds the per-agent sequence
    state and the bounded queues of counter records and drop notifications.
    Error reasons bumped in ``counters.errors``:

    * ``sflow_truncated``: the datagram ends inside its header or a sample;
      samples before it are kept.
    * ``sflow_bad_version``: version word is not 5.
    * ``sflow_bad_address_type``: agent address type is not 0, 1 or 2.
    * ``sflow_too_many_samples``: the header's sample count cannot fit in
      the datagram (only the samples present are read).
    * ``sflow_too_many_records``: same for a sample's record count.
    * ``sflow_bad_length``: a record, or a sample's fixed part, is longer
      than what holds it, shorter than its format needs, or malformed inside
      (unknown address type, prefix mask above 128, AS path running past
      the record); the record is skipped (the rest of the sample too when
      it overruns).
    * ``sflow_unknown_sample``: a sample of another enterprise or format,
      skipped by its length.
    * ``sflow_trailing_bytes``: bytes after the last announced sample (the
      samples are kept; some exporters pad datagrams).

    Record formats this decoder does not use are skipped by length and
    counted in :attr:`records_skipped`, not as errors.
    """

    def __init__(
        self,
        sampling: SamplingTable,
        counter_samples_maxlen: int = COUNTER_SAMPLES_MAXLEN,
        drop_notifications_maxlen: int = DROP_NOTIFICATIONS_MAXLEN,
    ) -> None:
        if counter_samples_maxlen < 1:
            raise ValueError(
                f"counter_samples_maxlen must be >= 1, got {counter_samples_maxlen}"
            )
        if drop_notifications_maxlen < 1:
            raise ValueError(
                "drop_notifications_maxlen must be >= 1, got "
                f"{drop_notifications_maxlen}"
            )
        self.sampling = sampling
        #: Called before an announced rate changes a lookup of the table:
        #: the caller settles records of other protocols that would look it
        #: up later (see FlowDecoder.decode_many); None: nothing to settle.
        self.before_rate_change: Callable[[], None] | None = None
        #: Counter samples kept as counters: one :class:`CounterRecord` per
        #: counter record, oldest first; a consumer pops from the left.  When
        #: full the oldest is discarded and :attr:`counter_samples_overflow`
        #: counts it.
        self.counter_samples: collections.deque[CounterRecord] = collections.deque(
            maxlen=counter_samples_maxlen
        )
        self.counter_samples_overflow = 0
        #: Drop notifications, same policy as :attr:`counter_samples`.
        self.drop_notifications: collections.deque[DropNotification] = (
            collections.deque(maxlen=drop_notifications_maxlen)
        )
        #: Drop notifications decoded.  Counted per decoder, not per
        #: exporter: ExporterCounters has no field for them.
        self.drop_notifications_seen = 0
        self.drop_notifications_overflow = 0
        #: Flow and counter records skipped because their format is not used.
        self.records_skipped = 0
        #: Datagram sequence state per (exporter, agent, sub-agent).
        self.sequences = SequenceTracker(MAX_TRACKED_AGENTS)
        #: Counter-only datagram layouts by (agent, sub-agent, size): a
        #: layout, None (seen once) or False (not one to remember).
        self._shapes: dict[tuple[bytes, int, int], _CounterShape | bool | None] = {}

    def decode(
        self,
        payload: bytes,
        exporter: bytes,
        exporter_port: int,
        received_ms: int,
        counters: ExporterCounters,
    ) -> np.ndarray:
        """Return the flow samples of one datagram as FLOW_DTYPE records.

        See :meth:`decode_packed` for the arguments and counters.
        """
        parts = self.decode_packed(
            payload, exporter, exporter_port, received_ms, counters
        )
        if not parts:
            return _no_records()
        return np.frombuffer(bytearray().join(parts), dtype=FLOW_DTYPE)

    def decode_packed(
        self,
        payload: bytes,
        exporter: bytes,
        exporter_port: int,
        received_ms: int,
        counters: ExporterCounters,
    ) -> list[bytes]:
        """The flow samples of one datagram, each packed as one FLOW_DTYPE
        record (:data:`~edge_agent.flows.schema.RECORD_STRUCT`).

        ``exporter`` is the UDP source address in the 16-byte column form,
        ``received_ms`` the receive time in ms since the epoch.  Bumps
        ``counters.records`` (flow records returned), ``counter_samples``,
        ``sequence_gaps``, ``estimated_lost`` (datagrams) and ``errors``;
        ``datagrams`` and ``bytes`` are the caller's to count.  Never raises
        on any payload.
        """
        buf = payload
        size = len(buf)
        errors = counters.errors
        if size < 8:
            errors["sflow_truncated"] += 1
            return []
        version, address_type = _U32X2.unpack_from(buf, 0)
        if version != 5:
            errors["sflow_bad_version"] += 1
            return []
        if address_type == 1:
            if size < 28:
                errors["sflow_truncated"] += 1
                return []
            agent4, sub_agent, sequence, uptime, sample_count = (
                _DATAGRAM_V4.unpack_from(buf, 8)
            )
            agent = _V4 + agent4
            off = 28
        elif address_type == 2:
            if size < 40:
                errors["sflow_truncated"] += 1
                return []
            agent, sub_agent, sequence, uptime, sample_count = _DATAGRAM_V6.unpack_from(
                buf, 8
            )
            off = 40
        elif address_type == 0:
            if size < 24:
                errors["sflow_truncated"] += 1
                return []
            sub_agent, sequence, uptime, sample_count = _DATAGRAM_NONE.unpack_from(
                buf, 8
            )
            agent = _ZERO16
            off = 24
        else:
            errors["sflow_bad_address_type"] += 1
            return []

        # One stream per agent and sub-agent behind each exporter socket;
        # the sequence counts datagrams.
        self.sequences.check(
            (exporter + agent, exporter_port, _SFLOW, sub_agent), sequence, 1, counters
        )

        # Agents send the same counter datagram every interval: a known
        # layout skips the walk.
        shape_key = (agent, sub_agent, size)
        shape = self._shapes.get(shape_key)
        if isinstance(shape, _CounterShape) and shape.check.unpack_from(buf) == (
            shape.words
        ):
            self._counter_records(
                shape,
                buf,
                (
                    exporter,
                    exporter_port,
                    agent,
                    sub_agent,
                    sequence,
                    uptime,
                    received_ms,
                ),
                counters,
            )
            return []
        if shape is None:
            self._remember(shape_key, buf, off, size)

        fitting = (size - off) >> 3
        if sample_count > fitting:
            errors["sflow_too_many_samples"] += 1
            sample_count = fitting

        sampling = self.sampling
        override = sampling.overrides.get(exporter)
        pack = _RECORD.pack
        unpack_words = _U32X6.unpack_from
        unpack_pair = _U32X2.unpack_from
        unpack_sample = _SAMPLE_AND_FLOW.unpack_from
        parts: list[bytes] = []
        context: _Datagram | None = None
        last_sampler = last_rate = -1

        for _ in range(sample_count):
            # The sample header and a flow sample's fixed part in one call
            # when they fit (they are only used when the sample is whole).
            if off + 40 <= size:
                words = unpack_sample(buf, off)
                sample_format = words[0]
                length = words[1]
            elif off + 8 <= size:
                sample_format, length = unpack_pair(buf, off)
                words = _NO_WORDS
            else:
                errors["sflow_truncated"] += 1
                break
            off += 8
            sample_end = off + length
            if sample_end > size:
                errors["sflow_truncated"] += 1
                off = size
                break
            if sample_format in _PACKET_SAMPLES:
                # Flow (1), expanded flow (3) and discarded packet (5)
                # samples share the flow record walk below.
                if sample_format == 1:
                    if length < 32:
                        errors["sflow_bad_length"] += 1
                        off = (sample_end + 3) & ~3
                        continue
                    (
                        _format,
                        _length,
                        sample_sequence,
                        sampler_id,
                        rate,
                        _pool,
                        drops,
                        input_if,
                        output_if,
                        record_count,
                    ) = words
                    input_format = input_if >> 30
                    input_if &= 0x3FFFFFFF
                    output_format = output_if >> 30
                    output_if &= 0x3FFFFFFF
                    q = off + 32
                elif sample_format == 3:
                    if length < 44:
                        errors["sflow_bad_length"] += 1
                        off = (sample_end + 3) & ~3
                        continue
                    (
                        sample_sequence,
                        source_type,
                        source_index,
                        rate,
                        _pool,
                        drops,
                        input_format,
                        input_if,
                        output_format,
                        output_if,
                        record_count,
                    ) = _EXPANDED_FLOW_SAMPLE.unpack_from(buf, off)
                    sampler_id = ((source_type << 24) | source_index) & 0xFFFFFFFF
                    q = off + 44
                else:
                    if length < 32:
                        errors["sflow_bad_length"] += 1
                        off = (sample_end + 3) & ~3
                        continue
                    (
                        sample_sequence,
                        source_type,
                        source_index,
                        drops,
                        input_if,
                        output_if,
                        rate,  # the drop reason
                        record_count,
                    ) = _DROP_SAMPLE.unpack_from(buf, off)
                    sampler_id = ((source_type << 24) | source_index) & 0xFFFFFFFF
                    input_format = output_format = 0
                    q = off + 32

                # --- the flow records of this sample ---
                if record_count > (sample_end - q) >> 3:
                    errors["sflow_too_many_records"] += 1
                    record_count = (sample_end - q) >> 3
                packet = sampled = NOTHING
                frame_length = sampled_length = 0
                present = _ALWAYS_PRESENT
                vlan = 0
                next_hop = _ZERO16
                src_mask = dst_mask = src_as = dst_as = 0
                # Records kept raw for drop notifications only.
                other: list[tuple[int, int, bytes]] = (
                    [] if sample_format == 5 else _NO_OTHER
                )
                for _record in range(record_count):
                    # The record header and the first four words of its body
                    # in one call; each format checks its length before using
                    # the words.
                    if q + 24 <= sample_end:
                        record_format, record_length, w0, w1, w2, w3 = unpack_words(
                            buf, q
                        )
                    elif q + 8 <= sample_end:
                        record_format, record_length = unpack_pair(buf, q)
                        w0 = w1 = w2 = w3 = 0
                    else:
                        errors["sflow_bad_length"] += 1
                        break
                    q += 8
                    record_end = q + record_length
                    if record_end > sample_end:
                        errors["sflow_bad_length"] += 1
                        break
                    if record_format == 1:
                        # w0..w3: header protocol, frame length, stripped,
                        # header length.
                        if record_length >= 16 and 16 + w3 <= record_length:
                            packet = parse_packet_tuple(buf, q + 16, q + 16 + w3, w0)
                            frame_length = w1
                            present |= _BYTES
                        else:
                            errors["sflow_bad_length"] += 1
                    elif record_format == 1001:
                        # w0: source VLAN (then priority, destination VLAN,
                        # priority).
                        if record_length < 16:
                            errors["sflow_bad_length"] += 1
                        elif 0 < w0 < 4096:
                            vlan = w0
                    elif record_format == 1002:
                        if w0 == 1 and record_length >= 16 and w2 <= 128 and w3 <= 128:
                            # IPv4 next hop (w1), source and destination masks.
                            next_hop = _V4 + buf[q + 4 : q + 8]
                            src_mask = w2
                            dst_mask = w3
                            present |= _ROUTER
                        else:
                            router = _router(buf, q, record_end)
                            if router is None:
                                errors["sflow_bad_length"] += 1
                            else:
                                next_hop, src_mask, dst_mask = router
                                present |= _ROUTER
                    elif record_format == 1003:
                        gateway = _gateway(buf, q, record_end)
                        if gateway is None:
                            errors["sflow_bad_length"] += 1
                        else:
                            src_as, path_last = gateway
                            present |= _SRC_AS
                            if path_last is not None:
                                dst_as = path_last
                                present |= _DST_AS
                    elif record_format in {3, 4}:
                        fields = _sampled_ip(buf, q, record_length, record_format)
                        if fields is None:
                            errors["sflow_bad_length"] += 1
                        else:
                            sampled, sampled_length = fields
                    else:
                        self.records_skipped += 1
                        if sample_format == 5:
                            other.append(
                                (
                                    record_format >> 12,
                                    record_format & 0xFFF,
                                    buf[q:record_end],
                                )
                            )
                    q = (record_end + 3) & ~3
                if sampled[9] and not packet[9] & _SAMPLED_IP:
                    # No usable raw header: the sampled IPv4/IPv6 record.
                    packet = sampled
                    if not present & _BYTES:
                        frame_length = sampled_length
                        present |= _BYTES
                (
                    ip_version,
                    src_addr,
                    dst_addr,
                    protocol,
                    src_port,
                    dst_port,
                    tcp_flags,
                    tos,
                    header_vlan,
                    packet_present,
                ) = packet
                present |= packet_present
                if vlan:
                    present |= _VLAN
                else:
                    vlan = header_vlan

                if sample_format == 5:
                    counters.drop_notifications += 1
                    if context is None:
                        context = _Datagram(
                            exporter,
                            exporter_port,
                            agent,
                            sub_agent,
                            sequence,
                            uptime,
                            received_ms,
                        )
                    self._store_drop(
                        context,
                        (sample_sequence, source_type, source_index, drops),
                        (input_if, output_if, rate),
                        frame_length=frame_length if present & _BYTES else 0,
                        packet=PacketFields._make(packet),
                        other=other,
                    )
                    off = (sample_end + 3) & ~3
                    continue

                if override is not None:
                    effective_rate = override
                elif rate:
                    # Announce once per run of samples from one sampler.
                    if sampler_id != last_sampler or rate != last_rate:
                        last_sampler = sampler_id
                        last_rate = rate
                        if self.before_rate_change is not None and sampling.changes(
                            exporter, sub_agent, sampler_id, rate
                        ):
                            self.before_rate_change()
                        sampling.announce(exporter, sub_agent, sampler_id, rate)
                    effective_rate = rate
                else:
                    effective_rate = sampling.lookup(exporter, sub_agent, sampler_id)

                if input_format == 0 and input_if:
                    present |= _IN_IF
                else:
                    input_if = 0
                if output_format == 0 and output_if:
                    present |= _OUT_IF
                else:
                    output_if = 0
                parts.append(
                    pack(
                        received_ms,
                        received_ms,
                        exporter,
                        exporter_port,
                        _SFLOW,
                        ip_version,
                        sub_agent,
                        src_addr,
                        dst_addr,
                        next_hop,
                        src_port,
                        dst_port,
                        protocol,
                        tos,
                        src_mask,
                        dst_mask,
                        tcp_flags,
                        _UNKNOWN_DIRECTION,
                        0,
                        vlan,
                        frame_length,
                        1,
                        input_if,
                        output_if,
                        src_as,
                        dst_as,
                        sampler_id,
                        effective_rate,
                        present,
                    )
                )
            elif sample_format in {2, 4}:
                if context is None:
                    context = _Datagram(
                        exporter,
                        exporter_port,
                        agent,
                        sub_agent,
                        sequence,
                        uptime,
                        received_ms,
                    )
                self._counter_sample(
                    context,
                    buf,
                    off,
                    sample_end,
                    expanded=sample_format == 4,
                    counters=counters,
                )
            else:
                errors["sflow_unknown_sample"] += 1
            off = (sample_end + 3) & ~3
        else:
            if off < size:
                errors["sflow_trailing_bytes"] += 1

        counters.records += len(parts)
        return parts

    def _remember(
        self, key: tuple[bytes, int, int], buf: bytes, off: int, size: int
    ) -> None:
        """Note a datagram layout: learnt the second time it is seen."""
        shapes = self._shapes
        if key not in shapes:
            if len(shapes) >= MAX_COUNTER_SHAPES:
                shapes.clear()
            shapes[key] = None
            return
        shapes[key] = _counter_shape(buf, off, size) or False

    def _counter_records(
        self,
        shape: _CounterShape,
        buf: bytes,
        context: tuple[bytes, int, bytes, int, int, int, int],
        counters: ExporterCounters,
    ) -> None:
        """Queue the counter records of a datagram of a known layout (what
        :meth:`_counter_sample` would queue for each of its samples)."""
        queue = self.counter_samples
        append = queue.append
        room = (queue.maxlen or 0) - len(queue)
        new = _new_tuple
        dynamic = shape.dynamic.unpack_from(buf)
        i = 0
        for expanded, records in shape.samples:
            if expanded:
                shared = (*context, *dynamic[i : i + 3])
                i += 3
            else:
                source = dynamic[i + 1]
                shared = (*context, dynamic[i], source >> 24, source & 0xFFFFFF)
                i += 2
            for q, end, enterprise, fmt, layout in records:
                data = buf[q:end]
                append(new(CounterRecord, (*shared, enterprise, fmt, layout, data)))
        counters.counter_samples += len(shape.samples)
        self.records_skipped += shape.skipped
        if shape.records > room:
            self.counter_samples_overflow += shape.records - max(room, 0)

    def _counter_sample(
        self,
        context: _Datagram,
        buf: bytes,
        off: int,
        end: int,
        *,
        expanded: bool,
        counters: ExporterCounters,
    ) -> None:
        """Decode one (expanded) counter sample into :attr:`counter_samples`."""
        errors = counters.errors
        if expanded:
            if off + 16 > end:
                errors["sflow_bad_length"] += 1
                return
            sequence, source_type, source_index, record_count = (
                _EXPANDED_COUNTER_SAMPLE.unpack_from(buf, off)
            )
            q = off + 16
        else:
            if off + 12 > end:
                errors["sflow_bad_length"] += 1
                return
            sequence, source_id, record_count = _COUNTER_SAMPLE.unpack_from(buf, off)
            source_type = source_id >> 24
            source_index = source_id & 0xFFFFFF
            q = off + 12
        counters.counter_samples += 1
        fitting = (end - q) >> 3
        if record_count > fitting:
            errors["sflow_too_many_records"] += 1
            record_count = fitting
        queue = self.counter_samples
        append = queue.append
        maxlen = queue.maxlen
        unpack_pair = _U32X2.unpack_from
        layouts = _COUNTER_LAYOUTS
        # The fields every record of this sample shares, in CounterRecord
        # order, then per record: enterprise, format, counter layout, data.
        shared = (*context, sequence, source_type, source_index)
        for _ in range(record_count):
            if q + 8 > end:
                errors["sflow_bad_length"] += 1
                return
            record_format, record_length = unpack_pair(buf, q)
            q += 8
            record_end = q + record_length
            if record_end > end:
                errors["sflow_bad_length"] += 1
                return
            data = buf[q:record_end]
            layout = layouts.get(record_format)
            if layout is not None:
                if record_length < layout[0].size:
                    errors["sflow_bad_length"] += 1
                    layout = None
            else:
                self.records_skipped += 1
            if len(queue) == maxlen:
                self.counter_samples_overflow += 1
            append(
                _new_tuple(
                    CounterRecord,
                    (*shared, record_format >> 12, record_format & 0xFFF, layout, data),
                )
            )
            q = (record_end + 3) & ~3

    def _store_drop(
        self,
        context: _Datagram,
        sample: tuple[int, int, int, int],
        interfaces: tuple[int, int, int],
        *,
        frame_length: int,
        packet: PacketFields,
        other: list[tuple[int, int, bytes]],
    ) -> None:
        """Queue one discarded-packet sample in :attr:`drop_notifications`.

        ``sample`` is (sequence, source type, source index, drops) and
        ``interfaces`` (input, output, reason).
        """
        sequence, source_type, source_index, drops = sample
        input_if, output_if, reason = interfaces
        self.drop_notifications_seen += 1
        queue = self.drop_notifications
        if len(queue) == queue.maxlen:
            self.drop_notifications_overflow += 1
        queue.append(
            DropNotification(
                exporter=context.exporter,
                exporter_port=context.exporter_port,
                agent=context.agent,
                sub_agent=context.sub_agent,
                received_ms=context.received_ms,
                sample_sequence=sequence,
                source_id_type=source_type,
                source_id_index=source_index,
                drops=drops,
                input_if=input_if,
                output_if=output_if,
                reason=reason,
                frame_length=frame_length,
                packet=packet,
                records=tuple(other),
            )
        )


def _address(buf: bytes, q: int, end: int) -> tuple[bytes, int] | None:
    """Read an sFlow address (type word, then 4 or 16 bytes) at ``q``.

    Returns the address in column form and the offset after it, or None when
    it does not fit before ``end`` or the type is unknown.
    """
    if q + 4 > end:
        return None
    address_type = _U32.unpack_from(buf, q)[0]
    if address_type == 1:
        if q + 8 > end:
            return None
        return _V4 + buf[q + 4 : q + 8], q + 8
    if address_type == 2:
        if q + 20 > end:
            return None
        return buf[q + 4 : q + 20], q + 20
    if address_type == 0:
        return _ZERO16, q + 4
    return None


def _router(buf: bytes, q: int, end: int) -> tuple[bytes, int, int] | None:
    """Read an extended router record: (next hop, source mask, dest mask)."""
    parsed = _address(buf, q, end)
    if parsed is None or parsed[1] + 8 > end:
        return None
    src_mask, dst_mask = _MASKS.unpack_from(buf, parsed[1])
    if src_mask > 128 or dst_mask > 128:
        return None
    return parsed[0], src_mask, dst_mask


def _gateway(buf: bytes, q: int, end: int) -> tuple[int, int | None] | None:
    """Read an extended gateway record: (source AS, last AS of the path).

    The last AS is None for an empty destination AS path; None overall when
    the record is malformed.
    """
    parsed = _address(buf, q, end)
    if parsed is None:
        return None
    q = parsed[1]
    if q + 16 > end:
        return None
    _router_as, src_as, _src_peer_as, segments = _GATEWAY_AS.unpack_from(buf, q)
    q += 16
    if segments > (end - q) >> 3:
        return None
    last: int | None = None
    for _ in range(segments):
        _segment_type, count = _U32X2.unpack_from(buf, q)
        q += 8
        if q + 4 * count > end:
            return None
        if count:
            last = _U32.unpack_from(buf, q + 4 * (count - 1))[0]
        q += 4 * count
    # Communities and local preference follow; nothing here uses them.
    return src_as, last


def _sampled_ip(
    buf: bytes, q: int, length: int, record_format: int
) -> tuple[FieldsTuple, int] | None:
    """Read a sampled IPv4 (format 3) or IPv6 (format 4) record."""
    if record_format == 3:
        if length < _SAMPLED_IPV4.size:
            return None
        ip_length, protocol, src, dst, src_port, dst_port, tcp_flags, tos = (
            _SAMPLED_IPV4.unpack_from(buf, q)
        )
        src = _V4 + src
        dst = _V4 + dst
        version = 4
    else:
        if length < _SAMPLED_IPV6.size:
            return None
        ip_length, protocol, src, dst, src_port, dst_port, tcp_flags, tos = (
            _SAMPLED_IPV6.unpack_from(buf, q)
        )
        version = 6
    protocol &= 0xFF
    present = _SAMPLED_IP
    if protocol in PORT_PROTOCOLS:
        present |= _PORTS
        src_port &= 0xFFFF
        dst_port &= 0xFFFF
    else:
        src_port = dst_port = 0
    if protocol == PROTO_TCP:
        present |= _TCP_FLAGS
        tcp_flags &= 0xFFF
    else:
        tcp_flags = 0
    fields: FieldsTuple = (
        version,
        src,
        dst,
        protocol,
        src_port,
        dst_port,
        tcp_flags,
        tos & 0xFF,
        0,
        present,
    )
    return fields, ip_length


class DatagramDecode(NamedTuple):
    """Everything one datagram gave (see :func:`decode_datagram`)."""

    flows: np.ndarray
    counter_samples: list[CounterRecord]
    drop_notifications: list[DropNotification]
    counters: ExporterCounters


def decode_datagram(
    payload: bytes,
    exporter: bytes = _ZERO16,
    exporter_port: int = 0,
    received_ms: int = 0,
    sampling: SamplingTable | None = None,
) -> DatagramDecode:
    """Decode one datagram with a fresh decoder and fresh counters.

    For tests and tools; a collector keeps one :class:`SflowDecoder` so that
    sequence tracking and the sampling table span datagrams.
    """
    decoder = SflowDecoder(sampling if sampling is not None else SamplingTable())
    counters = ExporterCounters()
    flows = decoder.decode(payload, exporter, exporter_port, received_ms, counters)
    return DatagramDecode(
        flows,
        list(decoder.counter_samples),
        list(decoder.drop_notifications),
        counters,
    )
