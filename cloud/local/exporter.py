"""An IPFIX exporting process for :data:`FLOW_DTYPE` records (RFC 7011).

The demo replays CTU-13 flows into the relay as real flow exports, so the
relay runs exactly the code that runs on a customer's router traffic.
:class:`IpfixExporter` turns record arrays into IPFIX messages, one UDP
datagram each:

* one data template per address family, built from the columns the demo
  needs: ``flowStartMilliseconds`` (152), ``flowEndMilliseconds`` (153),
  source and destination address (8/12 or 27/28), ports (7, 11),
  ``icmpTypeCodeIPv4``/``IPv6`` (32/139), ``protocolIdentifier`` (4),
  ``ipClassOfService`` (5), ``tcpControlBits`` (6, 16 bits as RFC 7125
  says), ``octetDeltaCount`` (1) and ``packetDeltaCount`` (2), all 8-byte
  counters;
* an options template scoped by ``observationDomainId`` (149) whose one
  record announces the sampling rate as ``samplingInterval`` (34, 1-in-N)
  and ``samplingAlgorithm`` (35, 2 = random), the elements Cisco and
  Juniper exporters send, so the collector learns the rate from the wire;
* the templates and the options record in a message of their own at the
  first call and again every ``template_refresh_s`` seconds of export time,
  as an exporter over UDP must (RFC 7011 §8.4), so a collector that starts
  late or restarts learns them within one refresh interval;
* header sequence numbers counting every data record (options records
  included) sent before the message, modulo 2**32.

Encoding is vectorised: the records of one family are packed into one
big-endian structured array and cut into messages of at most
``max_message_bytes``; only the 16-byte headers are written per message.
ICMP records carry ``type * 256 + code`` in ``dst_port`` (the schema's
convention); they are exported in the ICMP type/code element with
destination port 0, as routers do.

Records an IPFIX message cannot carry are skipped and counted by reason
in :attr:`ExporterStats.skipped` (``bad_ip_version``, ``negative_time``),
never raised.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass, field

import numpy as np

from edge_agent.flows.schema import FLOW_DTYPE, V4_MAPPED_PREFIX

IPFIX_VERSION = 10
HEADER = struct.Struct(">HHIII")
SET_HEADER = struct.Struct(">HH")
TEMPLATE_SET_ID = 2
OPTIONS_TEMPLATE_SET_ID = 3
#: Template ids: data (IPv4), data (IPv6), sampling options.
TEMPLATE_V4 = 256
TEMPLATE_V6 = 257
TEMPLATE_OPTIONS = 258
#: samplingAlgorithm (IE 35) value for random sampling.
ALGORITHM_RANDOM = 2

_PROTO_ICMP = 1
_PROTO_ICMP6 = 58
_V4_PREFIX = np.frombuffer(V4_MAPPED_PREFIX, dtype=np.uint8)


def _layout(
    family: int,
) -> tuple[list[tuple[int, int]], np.dtype]:
    """(element id, length) pairs and the matching big-endian dtype."""
    addr_ies, addr_len = ((8, 12), 4) if family == 4 else ((27, 28), 16)
    icmp_ie = 32 if family == 4 else 139
    fields = [
        (152, 8, "time_start", ">u8"),
        (153, 8, "time_end", ">u8"),
        (addr_ies[0], addr_len, "src_addr", f"V{addr_len}"),
        (addr_ies[1], addr_len, "dst_addr", f"V{addr_len}"),
        (7, 2, "src_port", ">u2"),
        (11, 2, "dst_port", ">u2"),
        (icmp_ie, 2, "icmp", ">u2"),
        (4, 1, "protocol", "u1"),
        (5, 1, "tos", "u1"),
        (6, 2, "tcp_flags", ">u2"),
        (1, 8, "bytes", ">u8"),
        (2, 8, "packets", ">u8"),
    ]
    dtype = np.dtype([(name, kind) for _, _, name, kind in fields])
    assert dtype.itemsize == sum(length for _, length, _, _ in fields)
    return [(ie, length) for ie, length, _, _ in fields], dtype


FIELDS_V4, WIRE_V4 = _layout(4)
FIELDS_V6, WIRE_V6 = _layout(6)
#: Options record: observationDomainId (scope), samplingInterval,
#: samplingAlgorithm.
OPTIONS_FIELDS: tuple[tuple[int, int], ...] = ((149, 4), (34, 4), (35, 1))
OPTIONS_RECORD = struct.Struct(">IIB")


@dataclass(frozen=True)
class ExporterConfig:
    """How the exporter writes its messages.

    * ``observation_domain``: the IPFIX Observation Domain ID of every
      message.
    * ``sampling_rate``: the 1-in-N packet sampling rate announced in the
      options record (1 = unsampled); 0 announces nothing, and the
      collector then needs a configured rate.
    * ``template_refresh_s``: seconds of export time between two sendings
      of the templates and the options record (RFC 7011 suggests at most
      the collector's template lifetime; 30 s is a common router default).
    * ``max_message_bytes``: upper bound of one message (one datagram);
      1400 keeps the datagram unfragmented on a 1500-byte MTU path.
    """

    observation_domain: int = 1
    sampling_rate: int = 100
    template_refresh_s: int = 30
    max_message_bytes: int = 1400

    def __post_init__(self) -> None:
        if not 0 <= self.observation_domain <= 0xFFFFFFFF:
            raise ValueError(
                "observation_domain must be 0..4294967295, "
                f"got {self.observation_domain}"
            )
        if not 0 <= self.sampling_rate <= 0xFFFFFFFF:
            raise ValueError(
                f"sampling_rate must be 0..4294967295, got {self.sampling_rate}"
            )
        if self.template_refresh_s < 1:
            raise ValueError(
                f"template_refresh_s must be >= 1, got {self.template_refresh_s}"
            )
        smallest = HEADER.size + SET_HEADER.size + WIRE_V6.itemsize
        if not smallest <= self.max_message_bytes <= 65535:
            raise ValueError(
                f"max_message_bytes must be {smallest}..65535 (one IPv6 record "
                f"must fit), got {self.max_message_bytes}"
            )


@dataclass
class ExporterStats:
    """What an :class:`IpfixExporter` has written."""

    records: int = 0  # data records encoded (flows)
    messages: int = 0  # messages (datagrams) written, template messages included
    bytes: int = 0  # bytes of all messages
    template_messages: int = 0
    options_records: int = 0
    #: records not encoded, by reason (see the module docstring)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)


class IpfixExporter:
    """Encode FLOW_DTYPE records as IPFIX messages; see the module docstring.

    Stateful (sequence number, template timer): one exporter per simulated
    router.  Not thread-safe.
    """

    def __init__(self, config: ExporterConfig | None = None) -> None:
        self.config = config or ExporterConfig()
        self.stats = ExporterStats()
        #: data records sent so far, the next message's sequence number
        self.sequence = 0
        self._last_templates_s: int | None = None

    # -- public ---------------------------------------------------------------

    def encode(self, records: np.ndarray, export_time_s: int) -> list[bytes]:
        """Return the messages carrying ``records``, in sending order.

        ``export_time_s`` is the export time of the header (seconds since
        the epoch, UTC; the exporter's clock).  The list starts with a
        template message when one is due.  Records keep their order within
        each address family; IPv4 messages come before IPv6 ones.
        """
        if records.dtype != FLOW_DTYPE:
            raise TypeError(f"records must be FLOW_DTYPE, got {records.dtype}")
        if not 0 <= export_time_s <= 0xFFFFFFFF:
            raise ValueError(f"export_time_s must fit 32 bits, got {export_time_s}")
        out: list[bytes] = []
        if self._templates_due(export_time_s):
            out.append(self.template_message(export_time_s))
        valid = self._valid(records)
        version = records["ip_version"]
        for family, template_id, wire in (
            (4, TEMPLATE_V4, WIRE_V4),
            (6, TEMPLATE_V6, WIRE_V6),
        ):
            chosen = records[valid & (version == family)]
            if chosen.size:
                packed = _pack(chosen, wire, family)
                out.extend(self._data_messages(packed, template_id, export_time_s))
        return out

    def template_message(self, export_time_s: int) -> bytes:
        """A message with both data templates, the options template and the
        sampling options record (when a rate is configured); resets the
        refresh timer."""
        cfg = self.config
        templates = [
            _template_record(TEMPLATE_V4, FIELDS_V4),
            _template_record(TEMPLATE_V6, FIELDS_V6),
        ]
        sets = [_set(TEMPLATE_SET_ID, b"".join(templates))]
        options = 0
        if cfg.sampling_rate:
            sets.append(
                _set(
                    OPTIONS_TEMPLATE_SET_ID,
                    _options_template_record(TEMPLATE_OPTIONS, OPTIONS_FIELDS, 1),
                )
            )
            record = OPTIONS_RECORD.pack(
                cfg.observation_domain, cfg.sampling_rate, ALGORITHM_RANDOM
            )
            sets.append(_set(TEMPLATE_OPTIONS, record))
            options = 1
        body = b"".join(sets)
        message = self._header(len(body), export_time_s) + body
        self.sequence = (self.sequence + options) & 0xFFFFFFFF
        self._last_templates_s = export_time_s
        self.stats.template_messages += 1
        self.stats.options_records += options
        self.stats.messages += 1
        self.stats.bytes += len(message)
        return message

    # -- internals ------------------------------------------------------------

    def _templates_due(self, export_time_s: int) -> bool:
        last = self._last_templates_s
        return (
            last is None
            or export_time_s - last >= self.config.template_refresh_s
            or export_time_s < last  # the clock went back: be safe
        )

    def _valid(self, records: np.ndarray) -> np.ndarray:
        version = records["ip_version"]
        family_ok = (version == 4) | (version == 6)
        if family_ok.any():
            raw = np.ascontiguousarray(records["src_addr"]).view(np.uint8)
            src_mapped = (raw.reshape(-1, 16)[:, :12] == _V4_PREFIX).all(axis=1)
            raw = np.ascontiguousarray(records["dst_addr"]).view(np.uint8)
            dst_mapped = (raw.reshape(-1, 16)[:, :12] == _V4_PREFIX).all(axis=1)
            # An IPv4 record must hold IPv4-mapped addresses (else its
            # addresses would be cut to their last 4 bytes).
            family_ok &= (version == 6) | (src_mapped & dst_mapped)
        bad_family = ~family_ok
        negative = family_ok & ((records["time_start"] < 0) | (records["time_end"] < 0))
        skipped = self.stats.skipped
        if bad_family.any():
            skipped["bad_ip_version"] += int(np.count_nonzero(bad_family))
        if negative.any():
            skipped["negative_time"] += int(np.count_nonzero(negative))
        return family_ok & ~negative

    def _data_messages(
        self, packed: np.ndarray, template_id: int, export_time_s: int
    ) -> list[bytes]:
        width = packed.dtype.itemsize
        room = self.config.max_message_bytes - HEADER.size - SET_HEADER.size
        per_message = room // width
        n = int(packed.shape[0])
        raw = packed.tobytes()
        out = []
        for first in range(0, n, per_message):
            count = min(per_message, n - first)
            payload = raw[first * width : (first + count) * width]
            body = SET_HEADER.pack(template_id, SET_HEADER.size + len(payload)) + (
                payload
            )
            out.append(self._header(len(body), export_time_s) + body)
            self.sequence = (self.sequence + count) & 0xFFFFFFFF
            self.stats.messages += 1
            self.stats.bytes += HEADER.size + len(body)
        self.stats.records += n
        return out

    def _header(self, body_length: int, export_time_s: int) -> bytes:
        return HEADER.pack(
            IPFIX_VERSION,
            HEADER.size + body_length,
            export_time_s,
            self.sequence,
            self.config.observation_domain,
        )


def _pack(records: np.ndarray, wire: np.dtype, family: int) -> np.ndarray:
    """FLOW_DTYPE records -> the template's big-endian wire records."""
    out = np.zeros(records.shape[0], dtype=wire)
    out["time_start"] = records["time_start"]
    out["time_end"] = records["time_end"]
    if family == 4:
        for name in ("src_addr", "dst_addr"):
            raw = np.ascontiguousarray(records[name]).view(np.uint8).reshape(-1, 16)
            out[name] = np.ascontiguousarray(raw[:, 12:]).view("V4").reshape(-1)
    else:
        out["src_addr"] = records["src_addr"]
        out["dst_addr"] = records["dst_addr"]
    proto = records["protocol"]
    icmp = proto == (_PROTO_ICMP if family == 4 else _PROTO_ICMP6)
    out["src_port"] = np.where(icmp, 0, records["src_port"])
    out["dst_port"] = np.where(icmp, 0, records["dst_port"])
    out["icmp"] = np.where(icmp, records["dst_port"], 0)
    out["protocol"] = proto
    out["tos"] = records["tos"]
    out["tcp_flags"] = records["tcp_flags"]
    out["bytes"] = records["bytes"]
    out["packets"] = records["packets"]
    return out


def _set(set_id: int, body: bytes) -> bytes:
    return SET_HEADER.pack(set_id, SET_HEADER.size + len(body)) + body


def _template_record(
    template_id: int, fields: list[tuple[int, int]] | tuple[tuple[int, int], ...]
) -> bytes:
    head = SET_HEADER.pack(template_id, len(fields))
    return head + b"".join(SET_HEADER.pack(ie, length) for ie, length in fields)


def _options_template_record(
    template_id: int, fields: tuple[tuple[int, int], ...], scope_count: int
) -> bytes:
    head = struct.pack(">HHH", template_id, len(fields), scope_count)
    return head + b"".join(SET_HEADER.pack(ie, length) for ie, length in fields)
