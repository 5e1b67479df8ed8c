"""``sampleflow decode`` on shared captures, checked against tshark's CSV."""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from edge_agent.collect import decode_command

CLI = [sys.executable, "-m", "edge_agent.cli"]

LEADING_COLUMNS = [
    "exporter",
    "domain",
    "src_addr",
    "dst_addr",
    "src_port",
    "dst_port",
    "protocol",
    "bytes",
    "packets",
    "in_if",
    "out_if",
    "tcp_flags",
    "sampling_rate",
    "start",
    "end",
]


def main(argv: list[str]) -> int:
    """Run ``sampleflow decode`` in-process through its own parser.

    The full CLI also loads cloud entry points; the end-to-end test below
    goes through it.
    """
    parser = argparse.ArgumentParser(prog="sampleflow")
    decode_command.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.func(args))


def tshark_rows(captures_dir: Path, name: str) -> list[dict[str, str]]:
    with (captures_dir / f"{name}.tshark.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def decode_csv(
    capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[list[str], list[dict[str, str]], str]:
    """Run the command in-process; returns (header, rows, stderr)."""
    assert main(["decode", *args]) == 0
    out, err = capsys.readouterr()
    reader = csv.reader(io.StringIO(out))
    header = next(reader)
    rows = [dict(zip(header, row, strict=True)) for row in reader]
    return header, rows, err


def v5_time(row: dict[str, str], uptime_field: str) -> str:
    """README: absolute ms = unix_secs*1000 - (sysuptime_ms - value)."""
    ms = int(row["unix_secs"]) * 1000 - (
        int(row["sysuptime_ms"]) - int(row[uptime_field])
    )
    return f"{ms // 1000}.{ms % 1000:03d}"


def test_netflow_v5_lines_match_tshark(
    captures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every v5 record line matches tshark: keys, counters, interfaces,
    flags, engine domain and uptime-converted start/end."""
    name = "nf5-akvorado-router.pcap"
    header, rows, err = decode_csv(capsys, str(captures_dir / name), "--csv")
    assert header[: len(LEADING_COLUMNS)] == LEADING_COLUMNS
    expected = tshark_rows(captures_dir, name)
    assert len(rows) == len(expected) == 29
    for got, want in zip(rows, expected, strict=True):
        engine_type, engine_id = want["domain"].split("/")
        assert got["exporter"] == want["exporter"]
        assert got["domain"] == str(int(engine_type) << 8 | int(engine_id))
        for column in (
            "src_addr",
            "dst_addr",
            "src_port",
            "dst_port",
            "protocol",
            "bytes",
            "packets",
            "in_if",
            "out_if",
            "tcp_flags",
            "tos",
            "src_as",
            "dst_as",
            "next_hop",
            "src_mask",
            "dst_mask",
        ):
            assert got[column] == want[column], column
        assert got["start"] == v5_time(want, "first_uptime_ms")
        assert got["end"] == v5_time(want, "last_uptime_ms")
        assert got["exporter_port"] == want["exporter_port"]
        # The header's sampling interval is 0 here: the rate is unknown.
        assert got["sampling_rate"] == ""
        # NetFlow v5 records carry no VLAN, direction or sampler id.
        assert got["vlan"] == got["direction"] == got["sampler_id"] == ""
    assert "29 records" in err
    assert "errors: none" in err


def test_header_sampling_rate_matches_tshark(
    captures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A v5 header announcing 1-in-100 gives sampling_rate 100 on each line."""
    name = "nf5-header-sampling-100.pcap"
    _, rows, _ = decode_csv(capsys, str(captures_dir / name))
    expected = tshark_rows(captures_dir, name)
    assert [r["sampling_rate"] for r in rows] == [w["sampling_rate"] for w in expected]
    assert {r["sampling_rate"] for r in rows} == {"100"}


def test_ipfix_lines_match_tshark(
    captures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """IPFIX records from two observation domains match tshark, with
    flowStart/EndMilliseconds as seconds with three decimals."""
    name = "ipfix-cisco-two-domains.pcap"
    _, rows, err = decode_csv(capsys, str(captures_dir / name))
    expected = tshark_rows(captures_dir, name)
    assert len(rows) == len(expected) == 12

    def key(row: dict[str, str]) -> tuple[str, ...]:
        return tuple(row[c] for c in ("exporter_port", "domain", "src_addr", "start"))

    def seconds(text: str) -> str:
        return str(Decimal(text).quantize(Decimal("0.001")))

    for row in expected:
        want = {**row, "start": seconds(row["first_abs"])}
        (got,) = [r for r in rows if key(r) == key(want)]
        for column in (
            "exporter",
            "dst_addr",
            "src_port",
            "dst_port",
            "protocol",
            "bytes",
            "packets",
            "in_if",
            "out_if",
            "tcp_flags",
            "next_hop",
        ):
            assert got[column] == want[column], column
        assert got["end"] == seconds(want["last_abs"])
        assert got["export_proto"] == "ipfix"
    assert "12 records" in err


def test_sflow_absent_fields_are_empty(
    captures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sFlow samples without an extended gateway record have empty AS
    columns, as in tshark; the sampling rate comes from the sample."""
    name = "sflow-flow-samples-router-gateway.pcap"
    _, rows, _ = decode_csv(capsys, str(captures_dir / name))
    expected = tshark_rows(captures_dir, name)
    assert len(rows) == len(expected) == 5
    for got, want in zip(rows, expected, strict=True):
        assert got["src_addr"] == want["src_addr"]
        assert got["dst_addr"] == want["dst_addr"]
        assert got["in_if"] == want["input_if"]
        assert got["out_if"] == want["output_if"]
        assert got["sampling_rate"] == want["sampling_rate"]
        assert (got["src_as"] == "") == (want["src_as"] == "")


def test_json_lines_carry_the_same_values(
    captures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one object per record; absent fields are null."""
    path = str(captures_dir / "nf5-akvorado-router.pcap")
    assert main(["decode", path, "--json", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    objects = [json.loads(line) for line in out.splitlines()]
    expected = tshark_rows(captures_dir, "nf5-akvorado-router.pcap")
    assert len(objects) == 29
    assert [o["bytes"] for o in objects] == [int(w["bytes"]) for w in expected]
    assert [o["src_addr"] for o in objects] == [w["src_addr"] for w in expected]
    assert objects[0]["start"] == pytest.approx(
        float(v5_time(expected[0], "first_uptime_ms"))
    )
    assert objects[0]["vlan"] is None
    assert objects[0]["sampling_rate"] is None


def test_sampling_options(
    captures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--sampling-rate fills unknown rates; --sampling-override wins."""
    path = str(captures_dir / "nf5-akvorado-router.pcap")
    _, rows, _ = decode_csv(capsys, path, "--sampling-rate", "100")
    assert {r["sampling_rate"] for r in rows} == {"100"}
    _, rows, _ = decode_csv(
        capsys,
        path,
        "--sampling-rate",
        "100",
        "--sampling-override",
        "10.19.144.41=512",
    )
    assert {r["sampling_rate"] for r in rows} == {"512"}


def test_port_filter_and_summary(
    captures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--port keeps only datagrams to that port; the summary says why the
    others were skipped."""
    path = str(captures_dir / "ipfix-cisco-srv6-with-bmp.pcap")
    header, rows, err = decode_csv(capsys, path, "--port", "2055")
    assert rows == []
    assert header[:2] == ["exporter", "domain"]
    assert "port_filter=583" in err
    assert "not_udp=23" in err


def test_sets_whose_template_never_comes_are_counted(
    captures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Data sets held for a template that never arrives are expired at the
    end of the capture and reported (tshark: 6 undecodable sets)."""
    name = "w-nf9-iptnetflow-reduced-size.pcap"
    info = json.loads((captures_dir / f"{name}.summary.json").read_text())
    _, rows, err = decode_csv(capsys, str(captures_dir / name))
    assert len(rows) == len(tshark_rows(captures_dir, name))
    sets = info["undecodable_sets_two_pass"]
    assert f"{sets} held, 0 decoded later, {sets} expired" in err


def test_bad_input_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing or non-pcap file exits 2 with one error line, no traceback."""
    assert main(["decode", str(tmp_path / "missing.pcap")]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("sampleflow decode: error: cannot open capture")
    text_file = tmp_path / "flows.csv"
    text_file.write_text("not,a,capture\n")
    assert main(["decode", str(text_file)]) == 2
    _, err = capsys.readouterr()
    assert "not a pcap or pcapng capture" in err
    assert "Traceback" not in err


def test_bad_options_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed --sampling-override and --port values are argparse errors."""
    for args in (
        ["--sampling-override", "192.0.2.1"],
        ["--sampling-override", "nothost=10"],
        ["--sampling-override", "192.0.2.1=0"],
        ["--port", "70000"],
        ["--sampling-rate", "-1"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(["decode", "x.pcap", *args])
        assert exc.value.code == 2
        assert "error" in capsys.readouterr().err


def test_console_entry_point_end_to_end(captures_dir: Path, tmp_path: Path) -> None:
    """The real process: CSV on stdout, summary on stderr, exit 2 on error."""
    done = subprocess.run(
        [*CLI, "decode", str(captures_dir / "w-ipfix-mikrotik.pcap"), "--csv"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 + len(tshark_rows(captures_dir, "w-ipfix-mikrotik.pcap"))
    assert "records" in done.stderr
    done = subprocess.run(
        [*CLI, "decode", str(tmp_path / "no.pcap")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "cannot open capture" in done.stderr
