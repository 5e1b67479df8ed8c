"""Smoke test of ``sampleflow bench wire-ctu13`` on one CTU-13 slice.

Sizes are not asserted (they are what is measured); the counts are, against
the ``netflow`` package's decode of the same IPFIX datagrams: the records,
bytes and packets decoded, and those read back from the batches shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import netflow
import pytest

from cloud.bench.wire_ctu13 import ctu13_datagrams
from edge_agent.cli import main as cli_main


def test_bench_wire_ctu13_counts_match_an_independent_decoder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Slice 20 at 1:100, 10 s and 300 s windows: every record, byte and
    packet the netflow package decodes from the export is decoded by the
    relay and comes back out of its batches; raw bytes are the datagrams'."""
    out = tmp_path / "w.json"
    argv = ["bench", "wire-ctu13", "--slices", "20", "--json", str(out)]
    assert cli_main([*argv, "--window-s", "10", "--window-s", "300"]) == 0
    printed = capsys.readouterr().out
    assert "vs raw IPFIX" in printed and "vs gzip'd JSON per batch" in printed
    figures = json.loads(out.read_text())

    replay = ctu13_datagrams(100, 6, [20])
    templates: dict[str, dict[int, object]] = {"netflow": {}, "ipfix": {}}
    flows = octets = packets = 0
    for datagram in replay.datagrams:
        for flow in netflow.parse_packet(datagram.payload, templates).flows:
            data = dict(flow.data)
            if "samplingInterval" in data:  # the options record
                continue
            flows += 1
            octets += int(data["octetDeltaCount"])
            packets += int(data["packetDeltaCount"])
    assert figures["exported"] == flows
    raw = sum(len(d.payload) for d in replay.datagrams)
    assert len(figures["results"]) == 2
    for result in figures["results"]:
        assert result["records"] == flows
        assert (result["decoded_octets"], result["decoded_packets"]) == (
            octets,
            packets,
        )
        assert (
            result["shipped_flows"],
            result["shipped_octets"],
            result["shipped_packets"],
        ) == (flows, octets, packets)
        assert result["export_bytes"] == raw
        assert result["batches"] > 0
