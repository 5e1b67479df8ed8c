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
from pathlib import Path

import pytest

from edge_agent.bench import command

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
