"""`sampleflow demo` end to end on a short slice, checked from the outside.

The demo runs as a user runs it: one command that starts the local stack,
replays two minutes of CTU-13 scenario 6 at 600x and stops the stack.  Its
report is then checked against figures this test computes itself:

* the true totals, from the binetflow files read with pandas (IP flows
  whose StartTime falls in the first two minutes);
* what went over the wire, from the demo's own pcap of every datagram,
  decoded by the independent ``netflow`` package: the flow records, the
  sampled packets, the announced rate;
* the engine's estimate, which must be the sampled packets times the rate
  (the sampling estimator worked out by hand) with a 95% interval of
  1.96 * sqrt(n * N * (N - 1)) around it, and must contain the truth.

The demo's arithmetic on the engine's windows, its time shift and its
reading of Spark's checkpoint are unit tested on hand-made inputs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import dpkt
import netflow
import pandas as pd
import pytest

from cloud.local.capture import choose_shift_ms
from cloud.local.results import micro_batches, totals_from_windows, tumbling
from tests.servers import MiniStack, free_port
from tests.test_local_stack import alive, free_udp_port

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "ctu13-scenario6"
MINUTES = 2
RATE = 100
#: The two-sided 95% normal quantile, from a published table.
Z95 = 1.959963984540054
#: Argus protocol names of non-IP frames (ARP, Novell IPX): not flows a
#: router's IP flow export could carry.
NON_IP = ("arp", "ipx/spx")


def truth_from_binetflow(minutes: float) -> dict[str, int]:
    """Flows, packets and bytes of the IP flows starting in the first
    ``minutes`` of the capture, straight from the CSV files."""
    files = sorted(DATA.glob("capture20110816_slice*.binetflow.gz"))
    assert len(files) == 26
    frames = []
    for path in files[:3]:  # about five minutes each: plenty for 2 minutes
        frames.append(
            pd.read_csv(path, usecols=["StartTime", "Proto", "TotPkts", "TotBytes"])
        )
    df = pd.concat(frames)
    start = pd.to_datetime(df["StartTime"], format="%Y/%m/%d %H:%M:%S.%f").dt.floor(
        "ms"
    )
    first = start.min()
    assert first == pd.Timestamp("2011-08-16 10:01:46.972")
    inside = (start - first < pd.Timedelta(minutes=minutes)) & ~df["Proto"].isin(NON_IP)
    assert set(df.loc[inside, "Proto"]) <= {
        "tcp", "udp", "icmp", "igmp", "rtp", "rtcp", "pim", "ipv6-icmp", "esp", "ipv6"
    }  # fmt: skip
    return {
        "flows": int(inside.sum()),
        "packets": int(df.loc[inside, "TotPkts"].sum()),
        "bytes": int(df.loc[inside, "TotBytes"].sum()),
    }


def decode_pcap(path: Path) -> dict[str, object]:
    """Data records, sampled packets and sampling options of the IPFIX
    datagrams in a pcap, with the netflow package."""
    templates: dict[str, dict[int, object]] = {"netflow": {}, "ipfix": {}}
    records = packets = octets = datagrams = 0
    options = []
    with path.open("rb") as handle:
        for _ts, frame in dpkt.pcap.Reader(handle):
            udp = dpkt.ethernet.Ethernet(frame).data.data
            datagrams += 1
            packet = netflow.parse_packet(bytes(udp.data), templates)
            for flow in packet.flows:
                data = flow.data
                if "samplingInterval" in data:
                    options.append(data["samplingInterval"])
                    continue
                records += 1
                packets += data["packetDeltaCount"]
                octets += data["octetDeltaCount"]
    return {
        "datagrams": datagrams,
        "records": records,
        "packets": packets,
        "bytes": octets,
        "rates": set(options),
    }


@pytest.mark.integration
@pytest.mark.slow
def test_demo_short_slice(tmp_path: Path) -> None:
    """Two minutes at 600x: the report's flows, true totals and estimate
    match figures computed independently, and no process is left."""
    ports = {
        "ministack-port": free_port(),
        "store-port": free_port(),
        "model-service-port": free_port(),
        "relay-port": free_udp_port(),
        "relay-metrics-port": free_port(),
    }
    flags = [f"--{k}={v}" for k, v in ports.items()]
    report_path = tmp_path / "report.json"
    pcap_path = tmp_path / "sent.pcap"
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "demo",
            "--minutes",
            str(MINUTES),
            "--speedup",
            "600",
            "--json",
            str(report_path),
            "--save-pcap",
            str(pcap_path),
            *flags,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    output = result.stdout[-4000:] + result.stderr[-4000:]
    print(output, f"\ndemo took {elapsed:.0f} s")

    truth = truth_from_binetflow(MINUTES)
    assert report["truth"] == {
        "argus_flows": truth["flows"],
        "packets": truth["packets"],
        "bytes": truth["bytes"],
    }

    wire = decode_pcap(pcap_path)
    sent = report["sent"]
    assert wire["rates"] == {RATE}
    assert sent["flow_records"] == wire["records"]
    assert sent["datagrams"] == wire["datagrams"]
    assert sent["sampled_packets"] == wire["packets"]
    assert sent["sampled_bytes"] == wire["bytes"]
    # Sampling keeps only a fraction of the flows, and never more records
    # than sampled packets.
    assert 0 < wire["records"] <= wire["packets"] < truth["packets"]

    # Everything sent made it through the relay, Kinesis and the engine.
    assert report["relay"]["records_decoded"] == wire["records"]
    assert report["relay"]["decode_errors"] == 0
    assert report["kinesis"]["flows"] == wire["records"]
    assert report["engine"]["counted_every_flow"] is True, output
    assert report["engine"]["flows_counted"] == wire["records"]

    estimate = report["estimate"]
    assert "the engine's network estimates" in estimate["source"]
    packets = estimate["packets"]
    n = wire["packets"]
    # T = n N; Var = n N (N - 1) summed over windows; 95% normal interval.
    assert packets["estimate"] == pytest.approx(n * RATE, rel=1e-12)
    half = Z95 * math.sqrt(n * RATE * (RATE - 1))
    assert packets["high"] == pytest.approx(n * RATE + half, rel=1e-9)
    assert packets["low"] == pytest.approx(n * RATE - half, rel=1e-9)
    assert packets["low"] <= truth["packets"] <= packets["high"]
    octets = estimate["bytes"]
    assert octets["estimate"] == pytest.approx(wire["bytes"] * RATE, rel=1e-12)
    assert octets["low"] <= truth["bytes"] <= octets["high"]

    # The demo stopped the stack it started.
    state_dir = tmp_path / ".sampleflow"
    assert not (state_dir / "stack.json").exists()
    logs = state_dir / "logs"
    assert {p.name for p in logs.glob("*.log")} >= {
        "ministack.log", "store.log", "model-service.log", "engine.log", "relay.log"
    }  # fmt: skip
    pids = report["stack"]["pids"]
    assert set(pids) == {"ministack", "store", "model-service", "engine", "relay"}
    assert report["stack"]["stopped_by_demo"] is True
    # Neither the parts nor anything in their process groups (the JVM,
    # Spark's Python workers) outlived the demo.
    assert [pid for pid in pids.values() if alive(pid)] == []
    assert processes_in_groups(set(pids.values())) == []


def processes_in_groups(groups: set[int]) -> list[int]:
    """Live processes whose process group is one of ``groups`` (/proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) in groups:
            out.append(int(entry.name))
    return out


def _window(start_s: int, packets: float, sd: float, sampled: float) -> dict:
    return {
        "tenant_id": "t",
        "window_start_ms": start_s * 1000,
        "window_end_ms": (start_s + 60) * 1000,
        "final": True,
        "confidence": 0.95,
        "packets": packets,
        "packets_high": packets + Z95 * sd,
        "sampled_packets": sampled,
        "bytes": 10 * packets,
        "bytes_high": 10 * packets + Z95 * 10 * sd,
        "sampled_bytes": 10 * sampled,
        "flows": 3,
        "unknown_rate_rows": 0,
    }


def test_totals_sum_the_tumbling_windows_and_add_variances() -> None:
    """Of 60 s windows sliding by 10 s, only those starting at a multiple of
    60 s are summed (each flow once); standard deviations add in squares."""
    windows = [
        _window(600, 1000.0, 30.0, 10.0),
        _window(610, 5000.0, 1.0, 1.0),  # overlaps: left out
        _window(660, 2000.0, 40.0, 20.0),
        _window(1200, 7000.0, 1.0, 1.0),  # after the range: left out
    ]
    chosen = tumbling(windows, 600_000, 719_999)
    assert [w["window_start_ms"] for w in chosen] == [600_000, 660_000]
    totals = totals_from_windows(chosen, "test")
    assert totals is not None
    assert totals["flows"] == 6
    half = Z95 * math.sqrt(30.0**2 + 40.0**2)  # = 1.96 * 50
    assert totals["packets"]["estimate"] == pytest.approx(3000.0)
    assert totals["packets"]["high"] == pytest.approx(3000.0 + half)
    assert totals["packets"]["low"] == pytest.approx(3000.0 - half)
    assert totals["bytes"]["high"] == pytest.approx(30000.0 + 10 * half)
    assert totals_from_windows([], "test") is None


def test_time_shift_keeps_window_boundaries_and_goes_forward() -> None:
    """The shift is a multiple of 300 s putting the first flow at most 300 s
    before now, and never earlier than 10 minutes after a previous replay."""
    first = 1_313_481_706_972  # 2011-08-16 08:01:46.972 UTC
    now = 1_796_000_000_000
    shift = choose_shift_ms(first, now, None)
    assert shift % 300_000 == 0
    assert now - 300_000 < first + shift <= now
    previous_end = now + 3_600_000
    later = choose_shift_ms(first, now, previous_end)
    assert later % 300_000 == 0
    assert previous_end + 600_000 <= first + later < previous_end + 900_000


def test_micro_batches_read_from_the_highest_batch_ids(tmp_path: Path) -> None:
    """Spark deletes old commit files: the count comes from the highest id;
    a started batch without its commit shows as running."""
    for name, ids in (("commits", range(150, 250)), ("offsets", range(151, 251))):
        folder = tmp_path / name
        folder.mkdir()
        for i in ids:
            (folder / str(i)).write_text("v1")
        (folder / f".{ids[-1]}.crc").write_text("")
    assert micro_batches(tmp_path) == (250, 251)
    assert micro_batches(tmp_path / "missing") == (0, 0)


def test_demo_names_the_part_of_a_running_stack_that_is_down(
    tmp_path: Path, ministack: MiniStack
) -> None:
    """A recorded local stack whose MiniStack still runs but whose other
    parts are gone (the relay killed, say): the demo does not use it; it
    exits 1 naming each part that is down and how to restart."""
    assert ministack.process is not None
    pid = ministack.process.pid
    # /proc/PID/stat field 22: start time in clock ticks (proc(5)).
    start_ticks = int(
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    )
    state_dir = tmp_path / "stack"
    state_dir.mkdir()
    (state_dir / "stack.json").write_text(
        json.dumps(
            {
                "state_dir": str(state_dir),
                "settings": {"ministack_port": ministack.port},
                "parts": [
                    {
                        "name": "ministack",
                        "pid": pid,
                        "start_ticks": start_ticks,
                        "ports": [],
                        "log": "",
                    }
                ],
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "demo", "--state-dir", str(state_dir)],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "using the running local stack" not in result.stdout
    assert "relay: not running" in result.stderr
    assert "ministack" not in result.stderr.split("not all of it:")[1].split(";")[0]
    assert "`sampleflow local down` then `sampleflow local up`" in result.stderr
    assert alive(pid)
