"""Smoke test of ``sampleflow bench relay``: a few seconds at a low rate.

No timing is asserted.  The counts are, against independent sources: the
records the relay decoded equal those of the datagrams sent, counted from
the captures' tshark decodes (read here); the stream read back holds them
all; at this rate nothing is lost anywhere.
"""

from __future__ import annotations

import collections
import csv
import json
import os
from pathlib import Path

import pytest

from cloud.bench.streams import DEFAULT_CAPTURES, load_stream
from edge_agent.cli import main as cli_main
from tests.reference import read_datagrams


def tshark_records_per_datagram(path: Path) -> list[int]:
    """Flow records (options data records left out) of each UDP datagram of
    a capture, in order, from its tshark CSV and summary (which names the
    options templates) and an independent pcap reader."""
    summary = json.loads(path.with_name(path.name + ".summary.json").read_text())
    options = {
        str(t["template_id"])
        for t in summary["templates"]
        if t["kind"].startswith("Options")
    }
    per_frame: collections.Counter[int] = collections.Counter()
    with path.with_name(path.name + ".tshark.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["set_id"] not in options:
                per_frame[int(row["frame"])] += 1
    return [per_frame[d.frame] for d in read_datagrams(path)]


def test_stream_rewriting_keeps_the_decoder_in_sequence(captures_dir: Path) -> None:
    """Every default capture replays three loops with rewritten headers and
    no sequence gap (load_stream checks it); its steady-state records per
    datagram are tshark's."""
    for name in DEFAULT_CAPTURES:
        stream = load_stream(captures_dir / name)
        assert stream.records == tshark_records_per_datagram(captures_dir / name)


@pytest.mark.integration
@pytest.mark.slow
def test_bench_relay_smoke(captures_dir: Path, tmp_path: Path) -> None:
    """Two seconds at 5,000 records/s: exit 0; datagrams sent = received =
    decoded by the relay and by the peer; the records decoded are those of
    the datagrams sent per tshark, and the stream's flow counts sum to them;
    the batches counted shipped are those in the stream; no loss anywhere;
    a peak RSS is read."""
    out = tmp_path / "bench.json"
    argv = ["bench", "relay", "--rate", "5000", "--seconds", "2"]
    argv += ["--captures", str(captures_dir), "--json", str(out)]
    argv += ["--workdir", str(tmp_path / "work")]
    assert cli_main(argv) == 0
    figures = json.loads(out.read_text())
    relay, peer = figures["relay"], figures["peer"]
    sent = relay["sent"]
    expected = 0
    for name, count in sent["per_stream"].items():
        per_datagram = tshark_records_per_datagram(captures_dir / name)
        loops, rest = divmod(count, len(per_datagram))
        expected += loops * sum(per_datagram) + sum(per_datagram[:rest])
    assert sent["records"] == expected
    assert relay["received"] == relay["decoded_datagrams"] == sent["datagrams"]
    assert relay["records"] == expected
    assert relay["stream_records"] == expected
    assert relay["kernel_drops"] == 0 and relay["queue_full"] == 0
    assert relay["estimated_lost"] == 0 and relay["relay_loss"] == 0
    assert relay["decode_errors"] == {} and relay["other_drops"] == {}
    assert relay["peak_rss_kb"] > 0
    # every batch in the stream was counted as shipped before the report
    assert relay["batches_shipped"] == relay["stream_batches"] > 0
    assert peer["received"] == peer["sent"]["datagrams"]


def test_bench_relay_refuses_a_core_it_may_not_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A --relay-core or --sender-core outside this process's CPU set exits 2
    with a message naming the allowed cores (it was a traceback from the
    peer process)."""
    allowed = sorted(os.sched_getaffinity(0))
    outside = max(allowed) + 1
    for option in ("--relay-core", "--sender-core"):
        assert cli_main(["bench", "relay", option, str(outside), "--seconds", "1"]) == 2
        err = capsys.readouterr().err
        assert f"{option} {outside} is not a core" in err
        assert ", ".join(map(str, allowed)) in err
