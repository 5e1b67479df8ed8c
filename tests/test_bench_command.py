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
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog

from edge_agent.bench import command
from edge_agent.bench.decode import Replicas, counted_log_events, load_inputs
from edge_agent.flows.decoder import FlowDecoder
from edge_agent.logs import configure_logging

if TYPE_CHECKING:
    from cloud.bench.relay import RelayResult

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
    """With one-datagram batches, one round per protocol holds exactly the
    capture's export packets and tshark record count; sFlow has no
    netflow-package column; every target is judged.  With 5-datagram
    batches a round replays each capture until it fills them: ceil(5 / k)
    passes of a k-datagram capture."""
    argv = ["bench", "decode", "--captures", str(tiny_captures)]
    argv += ["--seconds", "0.05", "--min-round-records", "1"]
    assert run([*argv, "--batch", "5"]) == 0
    out = capsys.readouterr().out
    for label, name in TINY.items():
        row = re.search(rf"^{re.escape(label)}\s+\d+\s+(\d+)\s", out, re.M)
        assert row is not None, label
        packets = export_packets(tiny_captures / name)
        assert int(row.group(1)) == -(-5 // packets) * packets, label
    argv += ["--batch", "1"]
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


def test_bench_decode_names_unusable_captures(
    tiny_captures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file for --captures, a folder of files that are no captures (exit
    2 naming them), and an unreadable file beside real ones (named in the
    report, the others measured)."""
    real = tiny_captures / TINY["NetFlow v5"]
    assert run(["bench", "decode", "--captures", str(real)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "text.pcap").write_text("not a capture\n")
    (junk / "empty.pcap").write_bytes(b"")
    assert run(["bench", "decode", "--captures", str(junk), "--check"]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 capture files" in err
    assert "text.pcap:" in err and "empty.pcap:" in err
    (tiny_captures / "text.pcap").write_text("not a capture\n")
    argv = ["bench", "decode", "--captures", str(tiny_captures), "--no-compare"]
    argv += ["--seconds", "0.05", "--min-round-records", "1", "--batch", "1"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "skipped (unreadable): text.pcap:" in out
    assert re.search(r"^(PASS|FAIL) NetFlow v5: ", out, re.M)


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
    (hand-summed header counts), and in its receive time: i ms after the
    capture's last datagram; the captures tshark finds no gap in give the
    decoder no gap over consecutive replicas."""
    inputs = load_inputs(captures_dir)
    freebsd = next(s for s in inputs["netflow_v5"] if s.capture.startswith("nf5-f"))
    counts = [struct.unpack_from(">H", d.payload, 2)[0] for d in freebsd.datagrams]
    replicas = Replicas([freebsd])
    last_ms = max(d.received_ms for d in freebsd.datagrams)
    for index in (1, 3):
        [replica] = replicas.replica(index)
        for original, moved in zip(freebsd.datagrams, replica.datagrams, strict=True):
            seq = struct.unpack_from(">I", original.payload, 16)[0]
            assert struct.unpack_from(">I", moved.payload, 16)[0] == (
                seq + index * sum(counts)
            )
            assert moved.payload[:16] == original.payload[:16]
            assert moved.payload[20:] == original.payload[20:]
            assert moved.received_ms == last_ms + index
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


def test_verdicts_map_to_the_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --check every verdict list exits 0; with it, any FAIL exits 1
    with one stderr line counting the failures, and all PASS (or none)
    exits 0 silently."""
    for verdicts in ([], [True], [True, False], [False, False]):
        assert command.verdicts_exit_code("bench x", verdicts, check=False) == 0
    assert capsys.readouterr().err == ""
    assert command.verdicts_exit_code("bench x", [], check=True) == 0
    assert command.verdicts_exit_code("bench x", [True, True], check=True) == 0
    assert capsys.readouterr().err == ""
    assert command.verdicts_exit_code("bench x", [True, False], check=True) == 1
    assert capsys.readouterr().err == "bench x: --check: 1 target(s) FAIL\n"
    assert command.verdicts_exit_code("bench x", iter([False] * 3), check=True) == 1
    assert capsys.readouterr().err == "bench x: --check: 3 target(s) FAIL\n"


def test_bench_decode_check_exits_1_exactly_when_a_line_fails(
    tiny_captures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bench decode --check` exits 1 when the report holds a FAIL line and
    0 when every target line reads PASS (the verdicts themselves are
    timings, so either may occur; without --check the exit is 0, see
    test_bench_decode_prints_every_protocol)."""
    argv = ["bench", "decode", "--captures", str(tiny_captures), "--check"]
    argv += ["--seconds", "0.05", "--min-round-records", "1"]
    code = run(argv)
    captured = capsys.readouterr()
    lines = re.findall(r"^(PASS|FAIL) ", captured.out, re.M)
    # Four rate targets and three netflow-package ratios.
    assert len(lines) == 7
    failed = lines.count("FAIL")
    assert code == (1 if failed else 0)
    if failed:
        assert f"--check: {failed} target(s) FAIL" in captured.err
    else:
        assert captured.err == ""


def _relay_result(rss_mb: float) -> RelayResult:
    from cloud.bench.relay import RelayResult  # noqa: PLC0415 - cloud side

    # 2,500,000 records in 10 s of sending: 250,000 records/s, nothing lost.
    return RelayResult(
        sent={"seconds": 10.0, "datagrams": 100_000, "records": 2_500_000},
        rate=250_000.0,
        received=100_000,
        decoded_datagrams=100_000,
        records=2_500_000,
        kernel_drops=0,
        queue_full=0,
        decode_errors={},
        estimated_lost=0,
        other_drops={},
        decode_s=10.5,
        acked_s=12.0,
        cpu_s=5.0,
        peak_rss_kb=int(rss_mb * 1024),
        rcvbuf=1 << 20,
        batches_shipped=10,
        bytes_shipped=1_000_000,
        rows_out=50_000,
        express_rows=0,
        filter_model="none",
        passthrough={},
        stream_records=2_500_000,
        stream_batches=10,
    )


def test_bench_relay_check_follows_its_printed_verdicts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`bench relay` takes --check; its report returns the verdicts it
    prints: 250,000 records/s without loss passes the 200,000 target, a
    peak RSS of 100 MB passes and one of 200 MB fails the 150 MB target,
    and --check turns only the failing report into exit 1."""
    from cloud.bench import relay  # noqa: PLC0415 - cloud side

    parser = argparse.ArgumentParser(prog="sampleflow")
    command.register(parser.add_subparsers())
    assert parser.parse_args(["bench", "relay", "--check"]).check is True
    assert parser.parse_args(["bench", "relay"]).check is False
    for rss_mb, expected in ((100.0, [True, True]), (200.0, [True, False])):
        verdicts = relay.print_report(_relay_result(rss_mb), None, sys.stdout)
        out = capsys.readouterr().out
        printed = re.findall(r"^(PASS|FAIL) ", out, re.M)
        assert [ok for _, ok in verdicts] == expected
        assert printed == ["PASS" if ok else "FAIL" for ok in expected]
        code = command.verdicts_exit_code(
            "sampleflow bench relay", [ok for _, ok in verdicts], check=True
        )
        assert code == (0 if all(expected) else 1)


def test_bench_decode_no_compare_says_so(
    tiny_captures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --no-compare the report says the comparison was left out (not
    that the netflow package is missing) and judges no ratio."""
    argv = ["bench", "decode", "--captures", str(tiny_captures), "--no-compare"]
    argv += ["--seconds", "0.05", "--min-round-records", "1", "--batch", "1"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "netflow: n/a (--no-compare)" in out
    assert "not installed" not in out
    assert "x the netflow package" not in out
    skipped = re.findall(
        r"^SKIP (.+): ratio to the netflow package not measured \(--no-compare\)$",
        out,
        re.M,
    )
    assert sorted(skipped) == ["IPFIX (fixed-length)", "NetFlow v5", "NetFlow v9"]
    # --batch 1: each capture once per round (one pass fills one batch).
    assert len(re.findall(r"a round replays each capture 1 times", out)) == 4


def test_decoder_log_events_are_counted_not_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Inside counted_log_events a decoder warning is counted by name and
    not written; an error is still written; outside, logging is as before."""
    configure_logging("info", "console")
    log = structlog.get_logger("edge_agent.flows.test")
    with counted_log_events() as events:
        log.warning("pending_full", held_sets=1)
        log.warning("pending_full", held_sets=2)
        log.info("template_withdrawn")
        log.error("decoder_bug")
    assert events == {"pending_full": 2, "template_withdrawn": 1}
    err = capsys.readouterr().err
    assert "decoder_bug" in err and "pending_full" not in err
    log.warning("after")
    assert "after" in capsys.readouterr().err
