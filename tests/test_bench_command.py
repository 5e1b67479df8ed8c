"""Smoke test of ``sampleflow bench decode`` on a tiny copy of the captures.

Timings are not asserted (shared machines are noisy); the per-round
record counts are, against tshark's record counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from edge_agent.bench import command
from edge_agent.bench.decode import Replicas, load_inputs
from edge_agent.flows.decoder import FlowDecoder

#: One small capture per protocol.
TINY = {
    "NetFlow v5": "nf5-akvorado-router.pcap",
    "NetFlow v9": "w-pynetflow-softflowd-v9.pcap",
    "IPFIX (fixed-length)": "w-ipfix-mikrotik.pcap",
    "sFlow v5": "sflow-flow-samples-router-gateway.pcap",
}


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sampleflow")
    command.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.func(args))


def tshark_records(path: Path) -> int:
    with path.with_name(path.name + ".tshark.csv").open(newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def export_packets(path: Path) -> int:
    summary = json.loads(path.with_name(path.name + ".summary.json").read_text())
    return int(summary["export_packets"])


@pytest.fixture
def tiny_captures(captures_dir: Path, tmp_path: Path) -> Path:
    for name in TINY.values():
        for suffix in ("", ".summary.json", ".tshark.csv"):
            shutil.copy(captures_dir / (name + suffix), tmp_path / (name + suffix))
    return tmp_path


def test_bench_decode_prints_every_protocol(
    tiny_captures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One round per protocol holds exactly the capture's export packets
    and tshark record count; sFlow has no netflow-package column; every
    target is judged."""
    argv = ["bench", "decode", "--captures", str(tiny_captures)]
    argv += ["--seconds", "0.05", "--min-round-records", "1"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    for label, name in TINY.items():
        row = re.search(rf"^{re.escape(label)}\s+(\d+)\s+(\d+)\s+(\d+)\s", out, re.M)
        assert row is not None, label
        captures, datagrams, records = (int(g) for g in row.groups())
        assert captures == 1
        assert datagrams == export_packets(tiny_captures / name)
        assert records == tshark_records(tiny_captures / name)
        assert re.search(rf"^(PASS|FAIL) {re.escape(label)}: .*target", out, re.M)
    sflow_row = next(line for line in out.splitlines() if line.startswith("sFlow"))
    assert " n/a " in sflow_row
    # The three NetFlow/IPFIX rows are compared with the netflow package.
    assert len(re.findall(r"x the netflow package", out)) == 3


def test_bench_decode_without_captures_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing or empty captures folder exits 2 with a message."""
    assert run(["bench", "decode", "--captures", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run(["bench", "decode", "--captures", str(tmp_path)]) == 2
    assert "no .pcap or .pcapng files" in capsys.readouterr().err


def test_bench_wire_is_part_of_the_bench_command(
    tiny_captures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bench wire` comes with the bench command alone (no relay commands
    registered): one line per capture with tshark's record count, with and
    without the filter."""
    for extra in ([], ["--no-filter"]):
        argv = ["bench", "wire", "--captures", str(tiny_captures)]
        assert run([*argv, "--speed-records", "0", *extra]) == 0
        out = capsys.readouterr().out
        for name in TINY.values():
            [line] = [x for x in out.splitlines() if x.startswith(name[:42])]
            assert int(line.split()[1]) == tshark_records(tiny_captures / name)
        assert "as shipped vs raw export" in out


def test_bench_replicas_continue_each_export_stream(captures_dir: Path) -> None:
    """Replica i of a NetFlow v5 capture differs from the capture only in
    the header sequence number, moved on by i times the records of one pass
    (hand-summed header counts); the captures tshark finds no gap in give
    the decoder no gap over consecutive replicas."""
    inputs = load_inputs(captures_dir)
    freebsd = next(s for s in inputs["netflow_v5"] if s.capture.startswith("nf5-f"))
    counts = [struct.unpack_from(">H", d.payload, 2)[0] for d in freebsd.datagrams]
    replicas = Replicas([freebsd])
    for index in (1, 3):
        [replica] = replicas.replica(index)
        for original, moved in zip(freebsd.datagrams, replica.datagrams, strict=True):
            seq = struct.unpack_from(">I", original.payload, 16)[0]
            assert struct.unpack_from(">I", moved.payload, 16)[0] == (
                seq + index * sum(counts)
            )
            assert moved.payload[:16] == original.payload[:16]
            assert moved.payload[20:] == original.payload[20:]
    # (sFlow summaries list no sequence gaps; the v5 datagrams of the sFlow
    # counters capture have a summary of their own.)
    for protocol in ("netflow_v5", "netflow_v9", "ipfix"):
        for stream in inputs[protocol]:
            names = [f"{stream.capture}.netflow5-on-port-6343.summary.json"]
            names.append(f"{stream.capture}.summary.json")
            path = next(captures_dir / n for n in names if (captures_dir / n).exists())
            if json.loads(path.read_text())["sequence_gaps"]:
                continue
            decoder = FlowDecoder()
            replicas = Replicas([stream])
            for index in range(3):
                decoder.decode_many(replicas.replica(index)[0].datagrams)
            assert decoder.stats.totals().sequence_gaps == 0, stream.capture
