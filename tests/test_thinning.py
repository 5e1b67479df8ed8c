"""The CTU-13 loader and the sampling replay (binomial thinning)."""

from __future__ import annotations

import datetime
import hashlib

import numpy as np
import pytest

from cloud.training import ctu13
from cloud.training.thinning import (
    DirectionalFlows,
    cut_active_timeout,
    estimate_src_packets,
    split_directions,
    thin,
)
from edge_agent.features import host_window_features
from edge_agent.flows.schema import address_bytes, address_text, empty_records
from tests.conftest import require_shared

SYN, ACK, PSH, FIN, RST = 0x02, 0x10, 0x08, 0x01, 0x04


def directional(n: int, packets: int, octets: int, flags: int, first_ack: bool):
    rec = empty_records(n)
    rec["src_addr"] = address_bytes("147.32.84.165")
    rec["dst_addr"] = address_bytes("192.0.2.1")
    rec["protocol"] = 6
    rec["dst_port"] = 25
    rec["packets"] = packets
    rec["bytes"] = octets
    rec["tcp_flags"] = flags
    rec["sampling_rate"] = 1
    return DirectionalFlows(
        records=rec,
        first_has_ack=np.full(n, first_ack),
        label=np.zeros(n, dtype=np.uint8),
    )


@pytest.fixture(scope="module")
def flows() -> ctu13.ArgusFlows:
    """All of CTU-13 scenario 6 from the project's own copy."""
    return ctu13.load_flows(ctu13.PROJECT_COPY)


def test_loader_counts_match_the_dataset_readme(flows: ctu13.ArgusFlows) -> None:
    """558,919 lines, 4,630 botnet and 7,494 normal flows, ~38.8 M packets.

    Numbers from shared/datasets/README.md; the lines the loader skips are
    exactly the non-IP ones (arp, ipx/spx, udt) and are counted.
    """
    assert len(flows) + sum(flows.skipped.values()) == 558_919
    assert set(flows.skipped) == {"non_ip"}
    assert flows.skipped["non_ip"] == 195 + 5 + 1  # arp, ipx/spx, udt
    labels = np.bincount(flows.label, minlength=3)
    assert labels[ctu13.LABEL_BOTNET] == 4_630
    # 7,494 normal lines, of which 5 are arp (grep of the files): 7,489 IP.
    assert labels[ctu13.LABEL_NORMAL] == 7_494 - 5
    assert abs(int(flows.tot_pkts.sum()) - 38_800_000) < 50_000
    infected = np.frombuffer(address_bytes(ctu13.INFECTED_HOST), "V16")[0]
    bot = flows.label == ctu13.LABEL_BOTNET
    assert np.all(flows.src_addr[bot] == infected)


def test_loader_parses_the_first_line(flows: ctu13.ArgusFlows) -> None:
    """The first record of slice 01_1, field by field.

    ``2011/08/16 10:01:46.972101,3599.986572,tcp,88.176.79.163,49213,<?>,
    147.32.84.172,18250,A_PA,0,0,414671,415389446,10150692,flow=Background``
    """
    cest = datetime.timezone(datetime.timedelta(hours=2))
    t = datetime.datetime(2011, 8, 16, 10, 1, 46, 972101, tzinfo=cest)
    assert flows.start_ms[0] == int(t.timestamp() * 1000)
    assert flows.dur_ms[0] == 3599987  # 3599.986572 s, rounded to ms
    assert flows.proto[0] == 6
    assert address_text(flows.src_addr[0]) == "88.176.79.163"
    assert address_text(flows.dst_addr[0]) == "147.32.84.172"
    assert (flows.src_port[0], flows.dst_port[0]) == (49213, 18250)
    assert flows.src_flags[0] == ACK  # "A"
    assert flows.dst_flags[0] == PSH | ACK  # "PA"
    assert (flows.tot_pkts[0], flows.tot_bytes[0], flows.src_bytes[0]) == (
        414671,
        415389446,
        10150692,
    )
    assert flows.label[0] == ctu13.LABEL_BACKGROUND


def test_loader_icmp_type_and_code(flows: ctu13.ArgusFlows) -> None:
    """Argus ICMP Sport 0x0103 (state URH: unreachable, host) -> 3*256+1."""
    first_icmp = np.flatnonzero(flows.proto == 1)[0]
    # 2011/08/16 10:01:47.881681,...,icmp,94.0.247.147,0x0103,->,...,URH
    assert address_text(flows.src_addr[first_icmp]) == "94.0.247.147"
    assert flows.dst_port[first_icmp] == 3 * 256 + 1
    assert flows.src_port[first_icmp] == 0


def test_project_copy_is_identical_to_shared() -> None:
    """data/ctu13-scenario6 holds byte-identical copies of the shared files."""
    shared = require_shared("datasets", "ctu13-scenario6")
    ours = ctu13.slice_files(ctu13.PROJECT_COPY)
    assert len(ours) == 26
    for path in ours:
        other = shared / path.name
        assert (
            hashlib.sha256(path.read_bytes()).digest()
            == hashlib.sha256(other.read_bytes()).digest()
        )


def test_dataset_dir_error_names_the_places(tmp_path) -> None:
    """A folder without the slices gives an error naming where it looked."""
    with pytest.raises(ctu13.DatasetNotFoundError, match=str(tmp_path)):
        ctu13.dataset_dir(tmp_path)


def test_direction_packet_estimates_by_hand() -> None:
    """Packets per direction from the byte share, within frame-size bounds."""
    n = np.array([3, 2, 10, 1, 4])
    sb = np.array([186, 174, 10000, 60, 0])
    db = np.array([0, 62, 100, 50, 240])
    # 1: no reverse bytes -> all 3.  2: rint(2*174/236 = 1.47) = 1.
    # 3: rint(10*10000/10100 = 9.9) = 10, but the reverse sent 100 bytes so
    #    it sent >= 1 packet -> 9.  4: one packet, more bytes from src -> 1.
    # 5: no source bytes -> 0.
    assert list(estimate_src_packets(n, sb, db)) == [3, 1, 9, 1, 0]


def test_split_directions_conserves_totals(flows: ctu13.ArgusFlows) -> None:
    """Splitting keeps every packet and byte of the capture."""
    d = split_directions(flows)
    assert int(d.records["packets"].sum()) == int(flows.tot_pkts.sum())
    assert int(d.records["bytes"].sum()) == int(flows.tot_bytes.sum())
    assert np.all(d.records["sampling_rate"] == 1)


def test_thin_at_one_in_one_is_identity() -> None:
    """At 1:1 every packet is drawn: records come back unchanged."""
    d = directional(50, 7, 700, SYN | ACK | PSH | FIN, first_ack=False)
    out, labels = thin(d, 1, np.random.default_rng(123))
    np.testing.assert_array_equal(out, d.records)
    assert labels.size == 50


def test_thin_is_seeded_and_binomial() -> None:
    """Same seed, same records; total drawn packets within 5 sd of n/N."""
    d = directional(20000, 10, 1000, ACK | PSH, first_ack=True)
    a, _ = thin(d, 100, np.random.default_rng(7))
    b, _ = thin(d, 100, np.random.default_rng(7))
    c, _ = thin(d, 100, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Binomial(200000, 1/100): mean 2000, sd sqrt(200000*0.01*0.99) = 44.5.
    assert abs(int(a["packets"].sum()) - 2000) < 5 * 44.5
    assert np.all(a["packets"] > 0)  # k = 0 dropped
    assert np.all(a["sampling_rate"] == 100)
    # Bytes scale by k/n: 1000 * k / 10 = 100 per drawn packet.
    np.testing.assert_array_equal(a["bytes"], a["packets"] * 100)


def test_thinned_syns_match_the_packet_model() -> None:
    """SYN-without-ACK records appear as often as the packet model says.

    20000 initiator flows of 10 packets (SYN first, then ACK) at 1:10: a
    record is SYN-only when the SYN is drawn and none of the 9 others is:
    p (1-p)^9 = 0.1 * 0.9**9 = 0.03874, so 774.9 expected (sd
    sqrt(774.9 * 0.9613) = 27.3).  This is the known low bias of the
    tcp_starts_out feature on established flows.  A k=1 record is either
    the SYN (no ACK) or a later packet (ACK, no SYN).
    """
    d = directional(20000, 10, 1000, SYN | ACK | PSH, first_ack=False)
    out, _ = thin(d, 10, np.random.default_rng(1))
    flags = out["tcp_flags"].astype(int)
    syn_only = ((flags & SYN) != 0) & ((flags & ACK) == 0)
    assert abs(int(syn_only.sum()) - 20000 * 0.1 * 0.9**9) < 5 * 27.3
    # Any SYN (with or without ACK): drawn first packet, p = 0.1 -> 2000
    # (sd sqrt(20000 * 0.1 * 0.9) = 42.4).
    assert abs(int(((flags & SYN) != 0).sum()) - 2000) < 5 * 42.4
    one = out["packets"] == 1
    assert not np.any(one & ((flags & SYN) != 0) & ((flags & ACK) != 0))
    assert np.all((flags & ~(SYN | ACK | PSH)) == 0)  # never invents flags


def test_unanswered_syns_keep_syn_on_every_packet() -> None:
    """An 'S_' flow (retransmitted SYNs, no ACK) stays SYN-only when drawn."""
    d = directional(5000, 3, 186, SYN, first_ack=False)
    out, _ = thin(d, 2, np.random.default_rng(3))
    assert np.all(out["tcp_flags"] == SYN)


def test_active_timeout_cut_by_hand() -> None:
    """150 s, 7 packets, 700 bytes, S|A|F -> pieces of 2, 2, 3 packets.

    Packets floor((i+1)*7/3) - floor(i*7/3) = 2, 2, 3; bytes in proportion
    200, 200, 300; SYN on the first piece, FIN on the last.  2 packets over
    300 s (5 pieces): floor((i+1)*2/5) = 0,0,1,1,2 -> pieces 2 and 4.
    """
    rec = empty_records(2)
    rec["time_start"] = [0, 1_000_000]
    rec["time_end"] = [150_000, 1_300_000]
    rec["packets"] = [7, 2]
    rec["bytes"] = [700, 100]
    rec["tcp_flags"] = [SYN | ACK | FIN, ACK]
    out, labels = cut_active_timeout(rec, np.array([1, 2], np.uint8), 60)
    assert list(out["packets"]) == [2, 2, 3, 1, 1]
    assert list(out["bytes"]) == [200, 200, 300, 50, 50]
    assert list(out["time_start"]) == [0, 60_000, 120_000, 1_120_000, 1_240_000]
    assert list(out["time_end"]) == [60_000, 120_000, 150_000, 1_180_000, 1_300_000]
    assert list(out["tcp_flags"]) == [SYN | ACK, ACK, ACK | FIN, ACK, ACK]
    assert list(labels) == [1, 1, 1, 2, 2]


def test_replay_at_1_in_100_estimates_volume(flows: ctu13.ArgusFlows) -> None:
    """At 1:100, scaled packets sum to the capture's packets within 1%."""
    records, labels = ctu13.sample_flows(flows, 100, seed=5)
    scaled = int((records["packets"] * records["sampling_rate"]).sum())
    # Binomial: relative sd sqrt(0.99 / (38.8e6 * 0.01)) = 0.16%.
    assert abs(scaled / int(flows.tot_pkts.sum()) - 1) < 0.01
    assert labels.size == records.size
    w = host_window_features(records, ctu13.INTERNAL_NETWORKS, 300)
    assert len(w) > 0 and w.records_in == records.size
