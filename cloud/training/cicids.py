"""CIC-IDS2017 ("improved" labels, random per-class samples) as a second network.

The files (``BENIGN_5000.csv.gz``, ``Botnet_736.csv.gz``, ...; source,
licence and citation in ``../shared/datasets/README.md``) hold
CICFlowMeter flows: bidirectional, unsampled, one class per file.
:func:`dataset_dir` finds them: an explicit path, then
``$SAMPLEFLOW_CICIDS_DIR``, then ``../shared/datasets/cicids2017-improved-sample``.
Nothing at run time needs them; they are for evaluation only.

:func:`load_flows` parses every file into :class:`CicFlows`;
:func:`directional_flows` turns each flow into the unidirectional unsampled
records a router would export (the forward and the backward direction),
which :mod:`cloud.training.thinning` then samples exactly as it samples
CTU-13.  Mapping, per direction:

* addresses and ports as given; ICMP: ``dst_port = type * 256 + code`` on
  the forward record, 0 on the backward one (taken to be replies);
* ``packets``: ``Total Fwd Packet`` / ``Total Bwd packets``;
* ``bytes``: the IP bytes a NetFlow exporter counts, estimated as payload
  (``Total Length of Fwd Packet``) plus transport headers (``Fwd Header
  Length``) plus 20 bytes of IPv4 header per packet (40 for IPv6):
  CICFlowMeter counts neither the IP header nor link framing;
* times: ``Timestamp`` read as UTC (the dataset README calls it "about
  UTC"; only window alignment depends on it), end = start +
  ``Flow Duration`` (µs);
* TCP flags: CICFlowMeter counts FIN/SYN/ACK over both directions and
  RST/PSH/URG per direction.  The forward side (first packet seen) gets SYN
  when there is one SYN, the backward side too when there are two (the
  SYN-ACK); the backward side gets ACK when any ACK was seen, the forward
  side when there were more ACKs than backward packets; one FIN goes to
  the forward side, two to both.  This is a model of who sent what, not a
  record of it; CWR and ECE are dropped.

Host windows and labels for one attack class (:func:`label_windows`): the
*principal* host of an attack flow is its internal source, or its internal
destination when the source is outside (the attackers of most classes sit
behind 172.16.0.1, outside 192.168.10.0/24).  A principal host's window
holding a sampled attack record is positive; windows holding attack records
only in another role (the hosts a scan probed) and the principal hosts'
other windows during the class's attack span are left out (-1); the rest
is normal.  Normal windows are split by hour into train (scaler,
auto-encoder), validation (loss statistics) and test (metrics):
:func:`split_of_windows`.

The files are random samples per class (up to 5,000 flows each), not a
continuous capture: host windows are much sparser than on the real network
(5,000 of 1.58 M benign flows over five days) and the attack windows are
thinned by a different factor per class, so per-day rates and base rates
measured here say nothing about the real network.
"""

from __future__ import annotations

import collections
import csv
import gzip
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from cloud.training.metrics import onset_ms
from cloud.training.thinning import DirectionalFlows
from edge_agent.features import HostWindows, InternalNetworks, host_window_features
from edge_agent.features.extract import address_halves
from edge_agent.features.spec import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from edge_agent.flows.schema import V4_MAPPED_PREFIX, Direction, Field, empty_records

log = structlog.get_logger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATASET_NAME = "cicids2017-improved-sample"
SHARED_COPY = PROJECT_ROOT.parent / "shared" / "datasets" / DATASET_NAME
ENV_DIR = "SAMPLEFLOW_CICIDS_DIR"
FILE_GLOB = "*.csv.gz"
BENIGN = "BENIGN"

#: The CIC-IDS2017 victim network (the testbed's internal LAN).
INTERNAL_NETWORKS: tuple[str, ...] = ("192.168.10.0/24",)

TCP_PSH = 0x08
TCP_URG = 0x20
IPV4_HEADER_BYTES = 20
IPV6_HEADER_BYTES = 40

#: Split of normal windows by hour: train, validation, test shares.
SPLIT_SHARES = (0.6, 0.2, 0.2)

_GOLDEN_64 = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd
TRAIN, VALIDATION, TEST = 0, 1, 2

#: CSV columns the loader reads (exact header names of the files).
COLUMNS: tuple[str, ...] = (
    "id",
    "Src IP",
    "Src Port",
    "Dst IP",
    "Dst Port",
    "Protocol",
    "Timestamp",
    "Flow Duration",
    "Total Fwd Packet",
    "Total Bwd packets",
    "Total Length of Fwd Packet",
    "Total Length of Bwd Packet",
    "Fwd Header Length",
    "Bwd Header Length",
    "FIN Flag Count",
    "SYN Flag Count",
    "ACK Flag Count",
    "Fwd RST Flags",
    "Bwd RST Flags",
    "Fwd PSH Flags",
    "Bwd PSH Flags",
    "Fwd URG Flags",
    "Bwd URG Flags",
    "ICMP Code",
    "ICMP Type",
    "Label",
)

_INT_COLUMNS = COLUMNS[7:25]  # Flow Duration .. ICMP Type (Protocol/ports apart)

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


class DatasetNotFoundError(FileNotFoundError):
    """Raised when no copy of the CIC-IDS2017 sample can be found."""


class CicFormatError(ValueError):
    """Raised when a file lacks a column the loader needs."""


@dataclass
class CicFlows:
    """Parsed CICFlowMeter flows, one entry per CSV row kept.

    ``start_ms``: UTC ms since the epoch; ``duration_us`` as in the file;
    addresses 16-byte (IPv4-mapped); ``ints`` holds the other numeric
    columns by their CSV name; ``label``: index into ``classes``
    (``classes[0]`` is ``"BENIGN"``); ``row_id``: the CSV ``id`` column.
    """

    row_id: np.ndarray
    start_ms: np.ndarray
    src_addr: np.ndarray
    dst_addr: np.ndarray
    src_port: np.ndarray
    dst_port: np.ndarray
    protocol: np.ndarray
    ip_version: np.ndarray
    ints: dict[str, np.ndarray]
    label: np.ndarray
    classes: tuple[str, ...]
    #: rows not kept, by reason (bad_address, bad_number, negative_count,
    #: short_row)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)

    def __len__(self) -> int:
        return int(self.start_ms.shape[0])

    def class_index(self, name: str) -> int:
        """Index of a class name; ``ValueError`` naming the valid ones."""
        if name not in self.classes:
            raise ValueError(
                f"unknown class {name!r}; classes: {', '.join(self.classes)}"
            )
        return self.classes.index(name)


def dataset_dir(explicit: Path | None = None) -> Path:
    """Return the folder holding the CSV files (see module doc)."""
    if explicit is not None:
        candidates = [Path(explicit)]
    elif os.environ.get(ENV_DIR):
        candidates = [Path(os.environ[ENV_DIR])]
    else:
        candidates = [SHARED_COPY]
    for path in candidates:
        if any(path.glob(FILE_GLOB)):
            return path
    raise DatasetNotFoundError(
        f"no CIC-IDS2017 sample ({FILE_GLOB}) in "
        + ", ".join(str(p) for p in candidates)
    )


def _address(text: str) -> tuple[bytes, int]:
    if ":" in text:
        return socket.inet_pton(socket.AF_INET6, text), 6
    return V4_MAPPED_PREFIX + socket.inet_aton(text), 4


def load_flows(directory: Path | None = None) -> CicFlows:
    """Parse every ``*.csv.gz`` of the folder (BENIGN first, then by name).

    Rows that do not parse are skipped and counted in
    :attr:`CicFlows.skipped` by reason; a file without a needed column
    raises :class:`CicFormatError`.
    """
    files = sorted(dataset_dir(directory).glob(FILE_GLOB))
    classes: list[str] = [BENIGN]
    skipped: collections.Counter[str] = collections.Counter()
    cols: dict[str, list] = collections.defaultdict(list)
    for path in files:
        with gzip.open(path, "rt", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None) or []
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise CicFormatError(f"{path.name} lacks column(s) {missing}")
            index = [header.index(c) for c in COLUMNS]
            width = max(index) + 1
            for line in reader:
                if len(line) < width:
                    skipped["short_row"] += 1
                    continue
                _parse_row([line[i] for i in index], cols, classes, skipped)
    flows = _to_arrays(cols, classes, skipped)
    log.info("cicids_loaded", flows=len(flows), files=len(files), **dict(skipped))
    return flows


def _parse_row(
    row: list[str],
    cols: dict[str, list],
    classes: list[str],
    skipped: collections.Counter[str],
) -> None:
    try:
        src, version = _address(row[1])
        dst, dst_version = _address(row[3])
    except OSError:
        skipped["bad_address"] += 1
        return
    if version != dst_version:
        skipped["bad_address"] += 1
        return
    try:
        ints = [int(row[0]), int(row[2]), int(row[4]), int(row[5])]
        ints += [int(float(v)) for v in row[7:25]]
        start = np.datetime64(row[6].replace(" ", "T"), "us")
    except ValueError:
        skipped["bad_number"] += 1
        return
    sport, dport, proto = ints[1], ints[2], ints[3]
    counts = ints[4:]  # the last two, ICMP code and type, are -1 if not ICMP
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF and 0 <= proto <= 255):
        skipped["bad_number"] += 1
        return
    if min(counts[:-2]) < 0:
        # CICFlowMeter overflows some sums on long flows (one benign row
        # has header lengths of -26296 and -13848): no byte count to trust.
        skipped["negative_count"] += 1
        return
    label = row[25].strip()
    if label not in classes:
        classes.append(label)
    cols["id"].append(ints[0])
    cols["start"].append(start)
    cols["src"].append(src)
    cols["dst"].append(dst)
    cols["sport"].append(sport)
    cols["dport"].append(dport)
    cols["proto"].append(proto)
    cols["version"].append(version)
    cols["ints"].append(counts)
    cols["label"].append(classes.index(label))


def _to_arrays(
    cols: dict[str, list], classes: list[str], skipped: collections.Counter[str]
) -> CicFlows:
    ints = np.array(cols["ints"], dtype=np.int64).reshape(-1, len(_INT_COLUMNS))
    start = np.array(cols["start"], dtype="datetime64[us]").astype(np.int64)
    return CicFlows(
        row_id=np.array(cols["id"], dtype=np.int64),
        start_ms=start // 1000,
        src_addr=np.array(cols["src"], dtype="V16"),
        dst_addr=np.array(cols["dst"], dtype="V16"),
        src_port=np.array(cols["sport"], dtype=np.uint16),
        dst_port=np.array(cols["dport"], dtype=np.uint16),
        protocol=np.array(cols["proto"], dtype=np.uint8),
        ip_version=np.array(cols["version"], dtype=np.uint8),
        ints={name: ints[:, i] for i, name in enumerate(_INT_COLUMNS)},
        label=np.array(cols["label"], dtype=np.int64),
        classes=tuple(classes),
        skipped=skipped,
    )


def direction_flags(flows: CicFlows) -> tuple[np.ndarray, np.ndarray]:
    """TCP flag bytes of the forward and backward side (see module doc)."""
    c = flows.ints
    tcp = flows.protocol == 6
    bwd_pkts = c["Total Bwd packets"]
    syn, ack, fin = c["SYN Flag Count"], c["ACK Flag Count"], c["FIN Flag Count"]
    has_bwd = bwd_pkts > 0
    bwd_ack = has_bwd & (ack > 0)
    fwd_ack = ack > np.where(bwd_ack, bwd_pkts, 0)

    def bit(mask: np.ndarray, value: int) -> np.ndarray:
        return np.where(mask, value, 0)

    fwd = (
        bit(syn >= 1, TCP_SYN)
        | bit(fwd_ack, TCP_ACK)
        | bit(fin >= 1, TCP_FIN)
        | bit(c["Fwd RST Flags"] > 0, TCP_RST)
        | bit(c["Fwd PSH Flags"] > 0, TCP_PSH)
        | bit(c["Fwd URG Flags"] > 0, TCP_URG)
    )
    bwd = (
        bit(has_bwd & (syn >= 2), TCP_SYN)
        | bit(bwd_ack, TCP_ACK)
        | bit(has_bwd & (fin >= 2), TCP_FIN)
        | bit(c["Bwd RST Flags"] > 0, TCP_RST)
        | bit(c["Bwd PSH Flags"] > 0, TCP_PSH)
        | bit(c["Bwd URG Flags"] > 0, TCP_URG)
    )
    return np.where(tcp, fwd, 0), np.where(tcp, bwd, 0)


def directional_flows(flows: CicFlows) -> DirectionalFlows:
    """Forward and backward unsampled records in time order.

    ``label`` of the result is the index of the flow each record came from
    (into ``flows``), so that class and principal host can be looked up
    after thinning.  Directions without packets give no record.
    """
    c = flows.ints
    fwd_flags, bwd_flags = direction_flags(flows)
    ip_header = np.where(flows.ip_version == 6, IPV6_HEADER_BYTES, IPV4_HEADER_BYTES)
    icmp = flows.protocol == 1
    icmp_port = (
        np.clip(c["ICMP Type"], 0, 255) * 256 + np.clip(c["ICMP Code"], 0, 255)
    ).astype(np.uint16)
    end_ms = flows.start_ms + c["Flow Duration"] // 1000

    def build(forward: bool) -> tuple[np.ndarray, np.ndarray]:
        side = "Fwd" if forward else "Bwd"
        pkts = c["Total Fwd Packet"] if forward else c["Total Bwd packets"]
        payload = c[f"Total Length of {side} Packet"]
        rec = empty_records(len(flows))
        rec["time_start"] = flows.start_ms
        rec["time_end"] = end_ms
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
        rec["src_port"] = np.where(icmp, 0, pa)
        rec["dst_port"] = np.where(icmp, icmp_port if forward else 0, pb)
        rec["protocol"] = flows.protocol
        rec["ip_version"] = flows.ip_version
        flags = fwd_flags if forward else bwd_flags
        rec["tcp_flags"] = flags
        rec["packets"] = pkts
        rec["bytes"] = payload + c[f"{side} Header Length"] + ip_header * pkts
        rec["sampling_rate"] = 1
        rec["direction"] = Direction.UNKNOWN
        rec["present"] = _PRESENT
        has_ack = (flags & TCP_ACK) != 0
        has_syn = (flags & TCP_SYN) != 0
        first_ack = has_ack & ~has_syn if forward else has_ack
        return rec, first_ack

    fwd, fwd_ack = build(True)
    bwd, bwd_ack = build(False)
    records = np.concatenate([fwd, bwd])
    first_ack = np.concatenate([fwd_ack, bwd_ack])
    index = np.arange(len(flows), dtype=np.int64)
    label = np.concatenate([index, index])
    keep = records["packets"] > 0
    order = np.argsort(records["time_start"][keep], kind="stable")
    return DirectionalFlows(
        records=records[keep][order],
        first_has_ack=first_ack[keep][order],
        label=label[keep][order],
    )


def principal_hosts(flows: CicFlows) -> np.ndarray:
    """Per flow, the principal internal host (``V16``; see module doc).

    Zero bytes when neither end is internal.
    """
    nets = InternalNetworks.parse(INTERNAL_NETWORKS)
    src_int = nets.contains(*address_halves(flows.src_addr))
    dst_int = nets.contains(*address_halves(flows.dst_addr))
    out = np.zeros(len(flows), dtype="V16")
    out[dst_int] = flows.dst_addr[dst_int]
    out[src_int] = flows.src_addr[src_int]
    return out


@dataclass(frozen=True)
class ClassWindows:
    """Host windows of BENIGN plus one class, for one thinning realisation.

    ``label``: 1 / 0 / -1 (module doc); ``target``: principal-host windows
    in the attack span (whose first alert times the detection); ``split``:
    TRAIN / VALIDATION / TEST of each window's hour.
    """

    windows: HostWindows
    label: np.ndarray
    target: np.ndarray
    split: np.ndarray
    class_name: str
    seed: int
    first_attack_ms: int  # first flow of the class in the file (unsampled)
    last_attack_ms: int  # last flow end of the class (unsampled)
    #: the attack's onset (:func:`cloud.training.metrics.onset_ms`): its
    #: first flow followed within 5 min by >= 1% of its flows.
    onset_ms: int


def split_of_windows(window_start_ms: np.ndarray) -> np.ndarray:
    """TRAIN / VALIDATION / TEST per window, by the UTC hour it falls in.

    Each hour since the epoch gets a fixed pseudo-random position in [0, 1)
    (Fibonacci hashing: the hour times 2**64 / golden ratio, modulo 2**64);
    below 0.6 is train, below 0.8 validation, the rest test.  Consecutive
    hours spread evenly, so the shares come out close to 60/20/20 over a
    few days, and every window of an hour lands in the same split.
    """
    hour = np.asarray(window_start_ms, np.int64) // 3_600_000
    with np.errstate(over="ignore"):
        mixed = hour.astype(np.uint64) * np.uint64(_GOLDEN_64)
    position = (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    train_end = SPLIT_SHARES[0]
    val_end = train_end + SPLIT_SHARES[1]
    return np.where(
        position < train_end, TRAIN, np.where(position < val_end, VALIDATION, TEST)
    ).astype(np.int8)


def label_windows(
    windows: HostWindows,
    records: np.ndarray,
    record_flow: np.ndarray,
    flows: CicFlows,
    class_index: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(label, target)`` of each window for one class (see module doc)."""
    window_ms = windows.window_s * 1000
    principal = principal_hosts(flows)
    is_attack = flows.label[record_flow] == class_index
    attack_rec = records[is_attack]
    attack_flow = record_flow[is_attack]
    rec_window = attack_rec["time_start"] // window_ms * window_ms

    def keys(host: np.ndarray, start: np.ndarray) -> np.ndarray:
        hi, lo = address_halves(host)
        return np.stack([hi, lo, start.astype(np.uint64)], axis=1)

    def member(table: np.ndarray) -> np.ndarray:
        if table.size == 0:
            return np.zeros(len(windows), dtype=bool)
        mine = keys(windows.host, windows.window_start_ms)
        both = np.concatenate([np.unique(table, axis=0), mine])
        _, inverse = np.unique(both, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        return np.isin(inverse[-len(windows) :], inverse[: -len(windows)])

    p = principal[attack_flow]
    positive = member(keys(p, rec_window))
    ends = np.concatenate(
        [
            keys(attack_rec["src_addr"], rec_window),
            keys(attack_rec["dst_addr"], rec_window),
        ]
    )
    involved = member(ends)
    cls = flows.label == class_index
    span_lo = int(flows.start_ms[cls].min())
    span_hi = int(
        (flows.start_ms[cls] + flows.ints["Flow Duration"][cls] // 1000).max()
    )
    hosts = np.unique(principal[cls])
    is_principal = np.isin(windows.host, hosts)
    start = windows.window_start_ms
    in_span = (start + window_ms > span_lo) & (start <= span_hi)
    label = np.zeros(len(windows), dtype=np.int8)
    label[involved | (is_principal & in_span)] = -1
    label[positive] = 1
    return label, is_principal & in_span


def class_windows(
    records: np.ndarray,
    record_flow: np.ndarray,
    flows: CicFlows,
    class_name: str,
    *,
    window_s: int,
    seed: int,
) -> ClassWindows:
    """Windows of BENIGN plus ``class_name`` records (already sampled)."""
    index = flows.class_index(class_name)
    keep = np.isin(flows.label[record_flow], [0, index])
    rec, rec_flow = records[keep], record_flow[keep]
    windows = host_window_features(rec, INTERNAL_NETWORKS, window_s)
    if index == 0:
        label = np.zeros(len(windows), dtype=np.int8)
        target = np.zeros(len(windows), dtype=bool)
        first = last = onset = 0
    else:
        label, target = label_windows(windows, rec, rec_flow, flows, index)
        cls = flows.label == index
        first = int(flows.start_ms[cls].min())
        last = int(
            (flows.start_ms[cls] + flows.ints["Flow Duration"][cls] // 1000).max()
        )
        onset = int(onset_ms(flows.start_ms[cls]))
    return ClassWindows(
        windows=windows,
        label=label,
        target=target,
        split=split_of_windows(windows.window_start_ms),
        class_name=class_name,
        seed=seed,
        first_attack_ms=first,
        last_attack_ms=last,
        onset_ms=onset,
    )
