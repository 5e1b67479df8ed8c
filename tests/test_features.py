"""Host-window features, scaling and scoring, against hand computations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from edge_agent.features import (
    FEATURE_NAMES,
    FEATURE_SPEC_VERSION,
    FeatureInputError,
    FeatureScaler,
    FeatureSpecError,
    host_window_features,
)
from edge_agent.features.estimators import abundances, chao1, entropy_bits
from edge_agent.features.scoring import (
    THREAT_CLASSES,
    GlobalDetector,
    LossNormaliser,
    hysteresis,
    reconstruction_losses,
)
from edge_agent.flows.schema import address_bytes, address_text, empty_records

SYN, ACK, PSH, RST = 0x02, 0x10, 0x08, 0x04
A, B = "10.0.0.1", "10.0.0.2"


def make_records(rows: list[tuple]) -> np.ndarray:
    """Build FLOW_DTYPE records from (t_ms, src, dst, dport, proto, flags,
    packets, bytes, rate) tuples."""
    rec = empty_records(len(rows))
    for i, (t, src, dst, dport, proto, flags, pkts, octets, rate) in enumerate(rows):
        rec[i]["time_start"] = t
        rec[i]["time_end"] = t
        rec[i]["src_addr"] = address_bytes(src)
        rec[i]["dst_addr"] = address_bytes(dst)
        rec[i]["src_port"] = 40000 + i
        rec[i]["dst_port"] = dport
        rec[i]["protocol"] = proto
        rec[i]["tcp_flags"] = flags
        rec[i]["packets"] = pkts
        rec[i]["bytes"] = octets
        rec[i]["sampling_rate"] = rate
    return rec


#: The hand-built scenario: host A talks out; B only receives r6.
SCENARIO = [
    (1000, A, "192.0.2.1", 25, 6, SYN, 1, 60, 100),  # r1
    (2000, A, "192.0.2.2", 25, 6, SYN, 1, 60, 100),  # r2
    (3000, A, "192.0.2.1", 25, 6, ACK | PSH, 2, 1000, 100),  # r3
    (4000, A, "198.51.100.7", 53, 17, 0, 1, 80, 100),  # r4
    (5000, "192.0.2.1", A, 40001, 6, RST | ACK, 1, 54, 100),  # r5
    (6000, A, B, 443, 6, SYN, 1, 60, 0),  # r6: rate unknown -> 1
    (61000, A, "192.0.2.9", 6667, 6, ACK, 3, 300, 100),  # r7: next window
    (7000, "192.0.2.5", "198.51.100.1", 80, 6, ACK, 5, 500, 100),  # external
]


def row(windows, host: str, start_ms: int) -> dict[str, float]:
    hosts = [address_text(h) for h in windows.host]
    for i, (h, s) in enumerate(zip(hosts, windows.window_start_ms, strict=True)):
        if h == host and s == start_ms:
            return dict(zip(FEATURE_NAMES, windows.values[i], strict=True))
    raise AssertionError(f"no row for {host} at {start_ms}")


def test_hand_built_scenario_values() -> None:
    """Every feature of host A's first window matches the hand arithmetic."""
    w = host_window_features(make_records(SCENARIO), ["10.0.0.0/8"], window_s=60)
    a = row(w, A, 0)
    # Packets scaled by the rate: r1 100 + r2 100 + r3 2*100 + r4 100 + r6 1*1.
    assert a["pkts_out"] == 501
    assert a["pkts_in"] == 100  # r5
    assert a["bytes_out"] == 6000 + 6000 + 100000 + 8000 + 60
    assert a["bytes_in"] == 5400
    # Sampled records are not scaled: r1, r2, r3, r4, r6 out; r5 in.
    assert a["records_out"] == 5
    assert a["records_in"] == 1
    # SYN without ACK, scaled: r1 100 + r2 100 + r6 1.
    assert a["tcp_starts_out"] == 201
    # Destinations 192.0.2.1 x2, 192.0.2.2, 198.51.100.7, 10.0.0.2 x1:
    # S_obs 4, f1 3, f2 1 -> 4 + 3**2 / (2*1) = 8.5.
    assert a["dst_addrs_out"] == pytest.approx(8.5)
    # Ports 25 x3, 53 x1, 443 x1: S_obs 3, f1 2, f2 0 -> 3 + 2*1/2 = 4.
    assert a["dst_ports_out"] == pytest.approx(4.0)
    # Address counts 2,1,1,1 of 5: -(0.4 log2 0.4 + 3 * 0.2 log2 0.2).
    h_addr = -(0.4 * math.log2(0.4) + 3 * 0.2 * math.log2(0.2))
    assert a["dst_addr_entropy"] == pytest.approx(h_addr)
    assert a["dst_addr_entropy"] == pytest.approx(1.921928, abs=1e-6)
    # Port counts 3,1,1 of 5.
    h_port = -(0.6 * math.log2(0.6) + 2 * 0.2 * math.log2(0.2))
    assert a["dst_port_entropy"] == pytest.approx(h_port)
    # Scaled packets to port 25: 100 + 100 + 200 of 501; to 53: 100 of 501.
    assert a["mail_share"] == pytest.approx(400 / 501)
    assert a["dns_share"] == pytest.approx(100 / 501)
    assert a["irc_share"] == 0
    # TCP records of A: r1 r2 r3 r5 r6; SYN-no-ACK or RST: r1 r2 r5 r6.
    assert a["failed_tcp_share"] == pytest.approx(4 / 5)


def test_second_window_and_receiving_host() -> None:
    """A's next window and B's receive-only row are separate, correct rows."""
    w = host_window_features(make_records(SCENARIO), ["10.0.0.0/8"], window_s=60)
    assert len(w) == 3
    # Sorted by window, then address.
    assert [address_text(h) for h in w.host] == [A, B, A]
    assert list(w.window_start_ms) == [0, 0, 60000]
    a1 = row(w, A, 60000)
    assert a1["pkts_out"] == 300
    assert a1["bytes_out"] == 30000
    assert a1["irc_share"] == 1.0
    # One destination seen once: S_obs 1, f1 1, f2 0 -> 1 + 1*0/2 = 1.
    assert a1["dst_addrs_out"] == 1.0
    assert a1["dst_addr_entropy"] == 0.0
    assert a1["failed_tcp_share"] == 0.0
    b = row(w, B, 0)
    assert b["pkts_in"] == 1 and b["bytes_in"] == 60 and b["records_in"] == 1
    assert b["pkts_out"] == 0 and b["dst_addrs_out"] == 0
    assert b["failed_tcp_share"] == 1.0  # r6 is a SYN without ACK
    assert w.records_in == 8
    assert w.records_unknown_rate == 1
    assert w.records_external == 1
    assert w.spec_version == FEATURE_SPEC_VERSION


def test_column_mapping_and_flow_count() -> None:
    """A column mapping gives the same rows; flow_count weights record counts."""
    rec = make_records(SCENARIO)
    cols = {n: rec[n] for n in rec.dtype.names or ()}
    w1 = host_window_features(rec, ["10.0.0.0/8"])
    w2 = host_window_features(cols, ["10.0.0.0/8"])
    np.testing.assert_array_equal(w1.values, w2.values)
    # r1 stands for 3 merged SYN records: records_out 5 -> 7, starts
    # 201 -> 100*3 + 100 + 1 = 401, 192.0.2.1 seen 3+1 = 4 times so
    # f1 = 3 (192.0.2.2, 198.51.100.7, 10.0.0.2), f2 = 0: 4 + 3*2/2 = 7.
    cols["flow_count"] = np.array([3, 1, 1, 1, 1, 1, 1, 1])
    a = row(host_window_features(cols, ["10.0.0.0/8"]), A, 0)
    assert a["records_out"] == 7
    assert a["tcp_starts_out"] == 401
    assert a["dst_addrs_out"] == pytest.approx(7.0)


def test_ipv6_internal_network() -> None:
    """IPv6 hosts inside an IPv6 CIDR get rows; IPv4 ones outside do not."""
    rec = make_records(
        [
            (0, "2001:db8::5", "2001:4860::1", 443, 6, SYN, 1, 80, 10),
            (0, "10.0.0.1", "2001:4860::1", 443, 6, SYN, 1, 80, 10),
        ]
    )
    w = host_window_features(rec, ["2001:db8::/32"])
    assert [address_text(h) for h in w.host] == ["2001:db8::5"]
    assert w.values[0, FEATURE_NAMES.index("pkts_out")] == 10


def test_bad_input_errors() -> None:
    """Missing columns, length mismatches and bad CIDRs give clear errors."""
    rec = make_records(SCENARIO)
    cols = {n: rec[n] for n in rec.dtype.names or () if n != "tcp_flags"}
    with pytest.raises(FeatureInputError, match="tcp_flags"):
        host_window_features(cols, ["10.0.0.0/8"])
    cols = {n: rec[n] for n in rec.dtype.names or ()}
    cols["packets"] = cols["packets"][:3]
    with pytest.raises(FeatureInputError, match="packets"):
        host_window_features(cols, ["10.0.0.0/8"])
    with pytest.raises(ValueError, match=r"10\.0\.0\.1/8"):
        host_window_features(rec, ["10.0.0.1/8"])
    with pytest.raises(ValueError, match="window_s"):
        host_window_features(rec, ["10.0.0.0/8"], window_s=0)


def test_empty_input_gives_no_rows() -> None:
    """No records, no rows, and no error."""
    w = host_window_features(empty_records(0), ["10.0.0.0/8"])
    assert len(w) == 0 and w.values.shape == (0, len(FEATURE_NAMES))


def test_chao1_worked_example() -> None:
    """Chao1 on abundances 1,1,1,1,2,2,3,5,10 and on a no-doubleton sample.

    First: S_obs 9, f1 4, f2 2 -> 9 + 16 / 4 = 13.  Second (1,1,1,4):
    f2 = 0 -> bias-corrected 4 + 3 * 2 / 2 = 7.
    """
    ab = np.array([1, 1, 1, 1, 2, 2, 3, 5, 10, 1, 1, 1, 4])
    grp = np.array([0] * 9 + [1] * 4)
    assert list(chao1(grp, ab, 3)) == [13.0, 7.0, 0.0]


def test_abundances_and_entropy_by_hand() -> None:
    """Weighted abundances per (group, value); entropy of 1/2,1/4,1/4 is 1.5."""
    group = np.array([0, 0, 0, 1, 1])
    value = np.array([7, 9, 7, 7, 7])
    weight = np.array([1, 2, 1, 1, 1])
    g, a = abundances(group, [value], weight)
    assert list(g) == [0, 0, 1] and list(a) == [2, 2, 2]
    h = entropy_bits(np.array([0, 0, 0]), np.array([2, 1, 1]), 1)
    assert h[0] == pytest.approx(0.5 * 1 + 0.25 * 2 + 0.25 * 2)


def test_scaler_median_iqr_clip_and_spec_check() -> None:
    """log1p, then (x - median) / IQR, clipped; other spec versions refused."""
    values = np.zeros((5, len(FEATURE_NAMES)))
    pk = FEATURE_NAMES.index("pkts_out")
    ms = FEATURE_NAMES.index("mail_share")
    values[:, pk] = np.expm1([0.0, 1.0, 2.0, 3.0, 4.0])  # log1p -> 0..4
    values[:, ms] = [0, 0, 0, 0, 1.0]  # IQR 0 -> falls back to std
    w = host_window_features(make_records(SCENARIO[:1]), ["10.0.0.0/8"])
    w = dataclasses.replace(
        w,
        host=np.repeat(w.host, 5),
        window_start_ms=np.zeros(5, np.int64),
        values=values,
    )
    sc = FeatureScaler.fit(w, ("pkts_out", "mail_share"))
    # log1p values 0..4: median 2, quartiles 1 and 3 -> IQR 2.
    assert sc.median[0] == pytest.approx(2.0) and sc.scale[0] == pytest.approx(2.0)
    # mail: mean 0.2, std sqrt((4*0.04 + 0.64)/5) = 0.4.
    assert sc.scale[1] == pytest.approx(0.4)
    z = sc.transform(w)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, 0], [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_allclose(z[:, 1], [0, 0, 0, 0, 2.5])
    huge = dataclasses.replace(w, values=values * 0 + 1e30)
    assert sc.transform(huge)[0, 0] == 10.0  # clipped
    again = FeatureScaler.from_dict(sc.to_dict())
    np.testing.assert_array_equal(again.transform(w), z)
    other = dataclasses.replace(w, spec_version=FEATURE_SPEC_VERSION + 1)
    with pytest.raises(FeatureSpecError, match="spec version"):
        sc.transform(other)


def test_loss_normaliser_and_detector_by_hand() -> None:
    """z = (log(loss + eps) - mean) / std; score = sigmoid(z.w + b)."""
    x = np.array([[1.0, 0.0], [0.0, 0.0]])
    x_hat = np.array([[0.0, 0.0], [0.0, 2.0]])
    losses = reconstruction_losses(x, x_hat)
    # Squared errors, then their mean per row.
    np.testing.assert_allclose(losses, [[1.0, 0.0, 0.5], [0.0, 4.0, 2.0]])
    norm = LossNormaliser.fit(losses, ("mail_share", "pkts_out"))
    u = np.log(losses + 1e-4)
    np.testing.assert_allclose(norm.transform(losses), (u - u.mean(0)) / u.std(0))
    det = GlobalDetector(norm.inputs, np.array([2.0, 0.0, 1.0]), -1.0)
    z = np.array([[1.0, 5.0, 0.0], [-1.0, -1.0, -1.0]])
    np.testing.assert_allclose(
        det.score(z), [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(4.0))]
    )
    # Row 0: spam contribution 2*1 = 2 beats pkts_out (weight 0): "spam".
    # Row 1: every contribution <= 0: "none".
    assert [THREAT_CLASSES[c] for c in det.classify(z)] == ["spam", "none"]


def test_hysteresis_two_of_three() -> None:
    """Raised on the 2nd of 3 high windows, cleared after 3 quiet ones."""
    high = np.array([[1, 0, 1, 0, 0, 0, 0, 1, 0]], dtype=bool)
    clear = np.array([[1, 1, 1, 1, 0, 0, 0, 1, 0]], dtype=bool)
    active = hysteresis(high, clear, k=2, n=3)
    # w2: high at w0 and w2 (2 of 3) -> raised; w3 above clear -> stays;
    # w4..w6 below clear -> cleared at w6; w7 single high -> not raised.
    assert list(active[0].astype(int)) == [0, 0, 1, 1, 1, 1, 0, 0, 0]
