"""CTU-13 scenario 6 (botnet "Menti"): the Argus flow files and their labels.

The 26 time slices of ``capture20110816.binetflow`` are kept byte-identical
in ``data/ctu13-scenario6/`` (source and licence: ``data/NOTICE``), so
training and the demo run without ``../shared``.  :func:`dataset_dir` finds
them: an explicit path, then ``$SAMPLEFLOW_CTU13_DIR``, then the project
copy, then ``../shared/datasets/ctu13-scenario6``.

:func:`load_flows` parses the bidirectional Argus records into columns;
:func:`sampled_records` replays them as unidirectional, 1-in-N sampled
:data:`FLOW_DTYPE` records (see :mod:`cloud.training.thinning`).
"""

from __future__ import annotations

import collections
import csv
import gzip
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from cloud.training.thinning import sample_flows
from edge_agent.flows.schema import V4_MAPPED_PREFIX

log = structlog.get_logger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATASET_NAME = "ctu13-scenario6"
PROJECT_COPY = PROJECT_ROOT / "data" / DATASET_NAME
SHARED_COPY = PROJECT_ROOT.parent / "shared" / "datasets" / DATASET_NAME
ENV_DIR = "SAMPLEFLOW_CTU13_DIR"
FILE_GLOB = "capture20110816_slice*.binetflow.gz"
N_SLICES = 26

#: The infected Windows VM; every botnet-labelled flow comes from it.
INFECTED_HOST = "147.32.84.165"
#: The CTU university network.
INTERNAL_NETWORKS: tuple[str, ...] = ("147.32.0.0/16",)
#: StartTime is local time of Prague in August (CEST, UTC+2).
UTC_OFFSET_MS = 2 * 3600 * 1000

LABEL_BACKGROUND = 0
LABEL_NORMAL = 1
LABEL_BOTNET = 2

#: Argus protocol names and their IANA numbers; rtp/rtcp are UDP flows
#: that Argus recognised.  Any other name (arp, ipx/spx, llc, ...) is not
#: an IP flow and is skipped with a counter.
PROTOCOLS: dict[str, int] = {
    "icmp": 1,
    "igmp": 2,
    "tcp": 6,
    "udp": 17,
    "rtp": 17,
    "rtcp": 17,
    "gre": 47,
    "esp": 50,
    "ipv6": 41,
    "ipv6-icmp": 58,
    "pim": 103,
    "sctp": 132,
}

_PORT_PROTOCOLS = frozenset({1, 6, 17, 58})

#: Argus TCP state letters and the TCP flag bit each stands for.
_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20}
#: Flag byte per Argus half-state string, filled as states are seen.
_FLAG_BYTE: dict[str, int] = {}


class DatasetNotFoundError(FileNotFoundError):
    """Raised when no copy of the CTU-13 files can be found."""


@dataclass
class ArgusFlows:
    """Parsed bidirectional Argus flows (one entry per CSV line kept).

    Times are UTC milliseconds since the epoch; addresses are 16-byte
    IPv4-mapped; ``src_flags``/``dst_flags`` are the TCP flags Argus saw
    from each side (0 for non-TCP); ``label`` is one of ``LABEL_*``.
    """

    start_ms: np.ndarray
    dur_ms: np.ndarray
    proto: np.ndarray
    src_addr: np.ndarray
    src_port: np.ndarray
    dst_addr: np.ndarray
    dst_port: np.ndarray
    src_flags: np.ndarray
    dst_flags: np.ndarray
    tot_pkts: np.ndarray
    tot_bytes: np.ndarray
    src_bytes: np.ndarray
    label: np.ndarray
    slice_index: np.ndarray  # 0..25, time order
    #: lines not kept, by reason (non_ip, bad_address, bad_port, bad_number)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)

    def __len__(self) -> int:
        return int(self.start_ms.shape[0])


def dataset_dir(explicit: Path | None = None) -> Path:
    """Return the folder holding the CTU-13 slices (see module doc)."""
    candidates = []
    if explicit is not None:
        candidates.append(Path(explicit))
    elif os.environ.get(ENV_DIR):
        candidates.append(Path(os.environ[ENV_DIR]))
    else:
        candidates += [PROJECT_COPY, SHARED_COPY]
    for path in candidates:
        if len(list(path.glob(FILE_GLOB))) == N_SLICES:
            return path
    raise DatasetNotFoundError(
        f"no complete CTU-13 scenario 6 copy ({N_SLICES} files {FILE_GLOB}) in "
        + ", ".join(str(p) for p in candidates)
    )


def slice_files(directory: Path) -> list[Path]:
    """The slice files in time order."""
    return sorted(directory.glob(FILE_GLOB))


def _flag_byte(text: str) -> int:
    value = _FLAG_BYTE.get(text)
    if value is None:
        value = sum(_FLAG_BITS.get(c, 0) for c in text)
        _FLAG_BYTE[text] = value
    return value


def _address(text: str) -> bytes:
    if ":" in text:
        return socket.inet_pton(socket.AF_INET6, text)
    return V4_MAPPED_PREFIX + socket.inet_aton(text)


def _port(text: str) -> int:
    text = text.strip()
    if not text:
        return 0
    value = int(text, 16) if text.startswith("0x") else int(text)
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"port out of range: {text}")
    return value


def load_flows(
    directory: Path | None = None, slices: Sequence[int] | None = None
) -> ArgusFlows:
    """Parse the slices (indices 0..25 in time order; default all).

    Lines that are not IP flows or do not parse are skipped and counted in
    :attr:`ArgusFlows.skipped` by reason; parsing never stops on one.
    """
    files = slice_files(dataset_dir(directory))
    chosen = range(len(files)) if slices is None else slices
    skipped: collections.Counter[str] = collections.Counter()
    cols: dict[str, list] = {k: [] for k in _COLUMNS}
    for index in chosen:
        path = files[index]
        with gzip.open(path, "rt", newline="") as fh:
            reader = csv.reader(fh)
            next(reader, None)  # header
            for line in reader:
                _parse_line(line, index, cols, skipped)
    flows = _to_arrays(cols, skipped)
    log.info("ctu13_loaded", flows=len(flows), files=len(chosen), **dict(skipped))
    return flows


_COLUMNS = (
    "start",
    "dur",
    "proto",
    "src",
    "sport",
    "dst",
    "dport",
    "sflags",
    "dflags",
    "pkts",
    "bytes",
    "sbytes",
    "label",
    "slice",
)


def _parse_line(
    line: list[str],
    index: int,
    cols: dict[str, list],
    skipped: collections.Counter[str],
) -> None:
    if len(line) < 15:
        skipped["short_line"] += 1
        return
    proto = PROTOCOLS.get(line[2])
    if proto is None:
        skipped["non_ip"] += 1
        return
    try:
        src = _address(line[3])
        dst = _address(line[6])
    except OSError:
        skipped["bad_address"] += 1
        return
    sport = dport = 0
    if proto in _PORT_PROTOCOLS:  # others (esp: the SPI) carry no ports
        try:
            sport = _port(line[4])
            dport = _port(line[7])
        except ValueError:
            skipped["bad_port"] += 1
            return
    try:
        dur = float(line[1])
        pkts = int(line[11])
        octets = int(line[12])
        sbytes = int(line[13])
    except ValueError:
        skipped["bad_number"] += 1
        return
    if proto == 1:
        # Argus prints ICMP type and code as Sport = code << 8 | type
        # ("0x0103": unreachable, host; state URH) and the ICMP id as Dport;
        # the record schema wants type*256+code in dst_port.
        dport = ((sport & 0xFF) << 8) | (sport >> 8)
        sport = 0
    sflags = dflags = 0
    if proto == 6:
        state = line[8]
        left, _, right = state.partition("_")
        sflags, dflags = _flag_byte(left), _flag_byte(right)
    label = line[14]
    code = (
        LABEL_BOTNET
        if "Botnet" in label
        else LABEL_NORMAL
        if "Normal" in label
        else LABEL_BACKGROUND
    )
    cols["start"].append(line[0].replace("/", "-"))
    cols["dur"].append(dur)
    cols["proto"].append(proto)
    cols["src"].append(src)
    cols["sport"].append(sport)
    cols["dst"].append(dst)
    cols["dport"].append(dport)
    cols["sflags"].append(sflags)
    cols["dflags"].append(dflags)
    cols["pkts"].append(pkts)
    cols["bytes"].append(octets)
    cols["sbytes"].append(sbytes)
    cols["label"].append(code)
    cols["slice"].append(index)


def _to_arrays(cols: dict[str, list], skipped: collections.Counter[str]) -> ArgusFlows:
    start = np.array(cols["start"], dtype="datetime64[us]").astype(np.int64)
    return ArgusFlows(
        start_ms=start // 1000 - UTC_OFFSET_MS,
        dur_ms=np.rint(np.array(cols["dur"], dtype=np.float64) * 1000).astype(np.int64),
        proto=np.array(cols["proto"], dtype=np.uint8),
        src_addr=np.array(cols["src"], dtype="V16"),
        src_port=np.array(cols["sport"], dtype=np.uint16),
        dst_addr=np.array(cols["dst"], dtype="V16"),
        dst_port=np.array(cols["dport"], dtype=np.uint16),
        src_flags=np.array(cols["sflags"], dtype=np.uint8),
        dst_flags=np.array(cols["dflags"], dtype=np.uint8),
        tot_pkts=np.array(cols["pkts"], dtype=np.uint64),
        tot_bytes=np.array(cols["bytes"], dtype=np.uint64),
        src_bytes=np.array(cols["sbytes"], dtype=np.uint64),
        label=np.array(cols["label"], dtype=np.uint8),
        slice_index=np.array(cols["slice"], dtype=np.uint8),
        skipped=skipped,
    )


def sampled_records(
    rate: int,
    seed: int,
    directory: Path | None = None,
    slices: Sequence[int] | None = None,
    active_timeout_s: int = 60,
) -> tuple[np.ndarray, np.ndarray]:
    """Replay the capture as 1-in-``rate`` sampled unidirectional records.

    Returns ``(records, labels)``: :data:`FLOW_DTYPE` records in time order
    and the ``LABEL_*`` of the flow each came from.  Seeded: the same
    arguments give the same records.
    """
    flows = load_flows(directory, slices)
    return sample_flows(flows, rate, seed, active_timeout_s)
