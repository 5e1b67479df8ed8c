"""The wired relay: real captures over real UDP, through decode, aggregation,
encoding and the spool, to a real local Kinesis (MiniStack), read back and
decoded with the cloud's decode_batch.

Expected totals come from the captures' tshark reference decodes (bytes and
packets summed from the CSVs), never from the relay.
"""

from __future__ import annotations

import asyncio
import collections
import csv
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from edge_agent.aggregate import AGG_DTYPE, AggregatedWindow, FlushReason
from edge_agent.cli import main as cli_main
from edge_agent.features import FEATURE_NAMES
from edge_agent.flows.schema import address_bytes, address_text
from edge_agent.modelsync.installer import rows_from_npz
from edge_agent.relay.commands import print_status, read_metrics
from edge_agent.relay.config import (
    MIN_SPOOL_BYTES,
    ConfigError,
    Settings,
    load_settings,
)
from edge_agent.relay.partition import partition_key
from edge_agent.relay.pipeline import RelayPipeline, split_by_exporter
from edge_agent.spool import Spool
from edge_agent.wire import decode_batch
from tests.reference import read_datagrams
from tests.servers import MiniStack, kinesis_client, read_all_records

#: captures whose tshark totals equal a correct decode, one loopback
#: address each so their rows stay apart (exporter = sender address)
CAPTURES = {
    "nf5-freebsd-ng_netflow.pcap": "127.0.0.11",
    "nf9-cisco-reordered-sequence.pcap": "127.0.0.12",
    "nf9-fortigate-data-before-template.pcap": "127.0.0.13",
    "w-ipfix-mikrotik.pcap": "127.0.0.14",
    "w-pynetflow-softflowd-v9.pcap": "127.0.0.15",
}


#: The private ranges the relay's filter counts as internal by default,
#: written out here rather than read from the relay.
PRIVATE = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
]
RELAY_MODEL = "relay-ctu13s6-r100-w300:"
DEFAULT_MODEL = (
    Path(__file__).resolve().parents[1]
    / "models"
    / "relay-ctu13s6-r100-w300.manifest.json"
)
NAN_MODEL = (
    Path(__file__).resolve().parent / "data" / "nan-model" / "nan-model.manifest.json"
)


def is_private(raw: bytes) -> bool:
    """Whether a 16-byte address column value lies in a private range."""
    ip = ipaddress.ip_address(address_text(raw))
    return any(ip.version == n.version and ip in n for n in PRIVATE)


def tshark_rows(path: Path) -> list[dict[str, str]]:
    """The flow records of a tshark CSV (options records left out)."""
    with path.open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("bytes")]


def tshark_totals(path: Path) -> tuple[int, int, int]:
    """(records, bytes, packets) of a capture per its tshark CSV."""
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("bytes")]
    return (
        len(rows),
        sum(int(r["bytes"].split("|")[0]) for r in rows),
        sum(int(r["packets"].split("|")[0]) for r in rows),
    )


def relay_settings(tmp_path: Path, **env: str) -> Settings:
    """Settings for a test relay: loopback ports picked by the kernel,
    1 s windows without lateness, a spool under tmp_path."""
    base = {
        "SAMPLEFLOW_RELAY_TENANT_ID": "acme",
        "SAMPLEFLOW_RELAY_RELAY_ID": "edge-1",
        "SAMPLEFLOW_RELAY_STATE_DIR": str(tmp_path / "state"),
        "SAMPLEFLOW_COLLECTOR_LISTEN_ADDRESSES": "127.0.0.1",
        "SAMPLEFLOW_COLLECTOR_PORTS": "0",
        "SAMPLEFLOW_COLLECTOR_RCVBUF_BYTES": str(4 * 1024 * 1024),
        "SAMPLEFLOW_AGGREGATE_WINDOW_S": "1",
        "SAMPLEFLOW_AGGREGATE_LATENESS_S": "0",
        "SAMPLEFLOW_KINESIS_REGION": "us-east-1",
        "SAMPLEFLOW_METRICS_PORT": "0",
    }
    base.update(env)
    return load_settings(None, base)


async def wait_for(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll ``check`` every 20 ms; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.02)


async def send_captures(captures_dir: Path, port: int) -> None:
    """Send every capture's datagrams from its own loopback address."""
    for name, source in CAPTURES.items():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            for datagram in read_datagrams(captures_dir / name):
                sock.sendto(datagram.payload, ("127.0.0.1", port))
                await asyncio.sleep(0.001)  # a gentle exporter


def http_get(url: str) -> tuple[int, bytes]:
    """GET a URL; returns (status, body), also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


@pytest.mark.integration
def test_captures_reach_kinesis_with_totals_intact(
    captures_dir: Path,
    ministack: MiniStack,
    kinesis_stream: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Five real captures sent over UDP come out of Kinesis as batches that
    decode_batch reads, with every exporter's bytes, packets and record
    count equal to the tshark decode; ids unique, seqs increasing per
    partition key; /metrics, /healthz and `relay status` report the flow."""
    expected = {
        address_bytes(source): tshark_totals(captures_dir / f"{name}.tshark.csv")
        for name, source in CAPTURES.items()
    }
    settings = relay_settings(
        tmp_path,
        SAMPLEFLOW_KINESIS_STREAM_NAME=kinesis_stream,
        SAMPLEFLOW_KINESIS_ENDPOINT_URL=ministack.endpoint_url,
    )
    pipeline = RelayPipeline(settings, tick_s=0.05, drain_s=30.0)
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        await pipeline.start()
        try:
            port = pipeline.collector.listening[0][1]
            await send_captures(captures_dir, port)
            total = sum(e[0] for e in expected.values())
            await wait_for(lambda: pipeline.aggregator.stats.records_in >= total)
            assert pipeline.shipper is not None
            shipper = pipeline.shipper
            await wait_for(lambda: shipper.stats.batches_shipped > 0)
            assert pipeline.metrics is not None
            base = f"http://127.0.0.1:{pipeline.metrics.port}"
            seen["metrics"] = await asyncio.to_thread(http_get, base + "/metrics")
            seen["healthz"] = await asyncio.to_thread(http_get, base + "/healthz")
            seen["status_rc"] = await asyncio.to_thread(
                cli_main, ["relay", "status", "--url", base]
            )
        finally:
            await pipeline.stop()

    run(scenario)

    status, body = seen["healthz"]
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    status, text = seen["metrics"]
    assert status == 200
    metrics = read_metrics(text.decode())
    total_records = sum(e[0] for e in expected.values())
    decoded = sum(v for _, v in metrics["sampleflow_relay_exporter_records_total"])
    assert decoded == total_records
    sent = sum(len(read_datagrams(captures_dir / name)) for name in CAPTURES)
    assert sum(v for _, v in metrics["sampleflow_relay_datagrams_total"]) == sent
    assert metrics["sampleflow_relay_records_in_total"][0][1] == total_records
    exporters = {
        labels["exporter"]
        for labels, _ in metrics["sampleflow_relay_exporter_records_total"]
    }
    assert {e.rsplit(":", 1)[0] for e in exporters} == set(CAPTURES.values())
    assert seen["status_rc"] == 0
    printed = capsys.readouterr().out
    assert "acme/edge-1" in printed
    assert f"records decoded              {total_records}" in printed

    client = kinesis_client(ministack.endpoint_url)
    try:
        records = read_all_records(client, kinesis_stream)
    finally:
        client.close()
    assert records
    got: dict[bytes, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    ids = set()
    last_seq: dict[str, int] = {}
    scored = 0
    for record in records:
        batch = decode_batch(record["Data"])
        h = batch.header
        assert (h.tenant_id, h.relay_id) == ("acme", "edge-1")
        # The filter scored every batch: model version in the header, one
        # score per row, finite exactly where an end is a private host.
        assert h.model_version is not None
        assert h.model_version.startswith(RELAY_MODEL)
        score = batch.columns["score"]
        internal = np.array(
            [
                is_private(bytes(s)) or is_private(bytes(d))
                for s, d in zip(
                    batch.columns["src_addr"], batch.columns["dst_addr"], strict=True
                )
            ],
            dtype=bool,
        )
        assert np.array_equal(np.isfinite(score), internal)
        assert np.all((score[internal] >= 0) & (score[internal] <= 1))
        scored += int(internal.sum())
        assert h.batch_id not in ids
        ids.add(h.batch_id)
        key = record["PartitionKey"]
        assert h.seq > last_seq.get(key, -1)
        last_seq[key] = h.seq
        exporters = set(batch.columns["exporter"].tolist())
        assert len(exporters) == 1  # one exporter per batch
        exporter = exporters.pop()
        assert key == partition_key("exporter", "acme", "edge-1", exporter)
        totals = got[exporter]
        totals[0] += int(batch.columns["flow_count"].sum())
        totals[1] += int(batch.columns["bytes"].sum())
        totals[2] += int(batch.columns["packets"].sum())
    assert {k: tuple(v) for k, v in got.items()} == expected
    assert scored > 0  # two of the captures have private hosts
    assert sum(v for _, v in metrics["sampleflow_relay_filter_windows_total"]) > 0
    assert not metrics.get("sampleflow_relay_filter_passthrough_total")


def spool_scenario(
    captures_dir: Path, settings: Settings, names: dict[str, str]
) -> RelayPipeline:
    """Send ``names`` (capture: source address) to a pipeline whose Kinesis
    is out of reach, stop it (every window goes to the spool), return it."""
    pipeline = RelayPipeline(settings, tick_s=0.05, drain_s=0.1)
    total = sum(len(tshark_rows(captures_dir / f"{n}.tshark.csv")) for n in names)

    async def scenario() -> None:
        await pipeline.start()
        try:
            port = pipeline.collector.listening[0][1]
            for name, source in names.items():
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind((source, 0))
                    for datagram in read_datagrams(captures_dir / name):
                        sock.sendto(datagram.payload, ("127.0.0.1", port))
            await wait_for(lambda: pipeline.aggregator.stats.records_in >= total)
        finally:
            await pipeline.stop()

    run(scenario)
    return pipeline


def unreachable_settings(tmp_path: Path, **env: str) -> Settings:
    """Test relay settings with Kinesis out of reach and no metrics port."""
    return relay_settings(
        tmp_path,
        SAMPLEFLOW_AGGREGATE_WINDOW_S="3600",
        SAMPLEFLOW_KINESIS_ENDPOINT_URL="http://127.0.0.1:9",
        SAMPLEFLOW_METRICS_ENABLED="false",
        **env,
    )


def test_flagged_hosts_are_spooled_first_in_full_detail(
    captures_dir: Path, tmp_path: Path
) -> None:
    """With the alert threshold at 0 every private host is flagged: per
    exporter its rows come first (lower seq) with the 5-tuples of the tshark
    decode; the other rows are rolled up (no ephemeral source port towards
    a well-known port is left); totals equal tshark's."""
    names = {
        "nf9-fortigate-data-before-template.pcap": "127.0.0.13",
        "w-ipfix-mikrotik.pcap": "127.0.0.14",
        "nf5-freebsd-ng_netflow.pcap": "127.0.0.11",
    }
    settings = unreachable_settings(tmp_path, SAMPLEFLOW_FILTER_THRESHOLD="0")
    pipeline = spool_scenario(captures_dir, settings, names)
    with Spool(settings.spool_dir) as spool:
        batches = [decode_batch(b.payload) for b in spool.pending()]
    by_exporter: dict[bytes, list[Any]] = collections.defaultdict(list)
    for b in batches:
        [exporter] = set(b.columns["exporter"].tolist())
        by_exporter[exporter].append(b)
    for name, source in names.items():
        rows = tshark_rows(captures_dir / f"{name}.tshark.csv")
        mine = sorted(by_exporter[address_bytes(source)], key=lambda b: b.header.seq)
        flags: dict[int, list[bool]] = collections.defaultdict(list)
        express_tuples, octets, flows = set(), 0, 0
        for b in mine:
            c = b.columns
            ends = [
                is_private(bytes(s)) or is_private(bytes(d))
                for s, d in zip(c["src_addr"], c["dst_addr"], strict=True)
            ]
            assert len(set(ends)) == 1  # a batch is all express or all not
            flags[b.header.window_start_ms].append(ends[0])
            for i in range(b.header.record_count):
                t = (
                    address_text(bytes(c["src_addr"][i])),
                    address_text(bytes(c["dst_addr"][i])),
                    int(c["src_port"][i]),
                    int(c["dst_port"][i]),
                    int(c["protocol"][i]),
                )
                if ends[0]:
                    # tshark leaves ICMP ports empty: compare TCP/UDP ports only.
                    express_tuples.add(t if t[4] in (6, 17) else (t[0], t[1], t[4]))
                else:
                    ephemeral = t[4] in (6, 17) and t[2] > 1023 and t[3] <= 1023
                    assert not ephemeral, t
            octets += int(c["bytes"].sum())
            flows += int(c["flow_count"].sum())
        # In each window express batches come first: True..., then False...
        for window_flags in flags.values():
            assert window_flags == sorted(window_flags, reverse=True)
        internal_rows = [
            r
            for r in rows
            if any(
                is_private(address_bytes(r[k]))
                for k in ("src_addr", "dst_addr")
                if r[k]
            )
        ]
        expected_tuples = set()
        for r in internal_rows:
            src = str(ipaddress.ip_address(r["src_addr"]))
            dst = str(ipaddress.ip_address(r["dst_addr"]))
            proto = int(r["protocol"])
            expected_tuples.add(
                (src, dst, int(r["src_port"]), int(r["dst_port"]), proto)
                if proto in (6, 17)
                else (src, dst, proto)
            )
        assert express_tuples == expected_tuples
        assert (flows, octets) == (
            len(rows),
            sum(int(r["bytes"].split("|")[0]) for r in rows),
        )
    assert pipeline.encode_stats.express_rows > 0
    # The canary rows for edge_agent.modelsync, written at stop: the recent
    # host windows of the shipped model (15 features, its 300 s windows).
    manifest = json.loads(DEFAULT_MODEL.read_text())
    rows = rows_from_npz(settings.canary_rows_path)
    assert rows is not None and len(rows) > 0
    assert rows.values.shape[1] == len(FEATURE_NAMES)
    assert (rows.spec_version, rows.window_s) == (
        manifest["feature_spec_version"],
        manifest["window_s"],
    )


@pytest.mark.parametrize(
    ("model", "reason"),
    [(NAN_MODEL, "non_finite_output"), (Path("missing.json"), "model_load_failed")],
    ids=["nan-model", "missing-model"],
)
def test_unusable_model_passes_rows_through_counted(
    captures_dir: Path, tmp_path: Path, model: Path, reason: str
) -> None:
    """A model giving NaN, or none at all: batches carry no score and no
    model version, totals equal tshark's, the reason is counted."""
    name = "nf9-fortigate-data-before-template.pcap"
    settings = unreachable_settings(
        tmp_path,
        SAMPLEFLOW_FILTER_MODEL=str(tmp_path / model)
        if not model.is_absolute()
        else str(model),
    )
    pipeline = spool_scenario(captures_dir, settings, {name: "127.0.0.13"})
    with Spool(settings.spool_dir) as spool:
        batches = [decode_batch(b.payload) for b in spool.pending()]
    assert batches
    for b in batches:
        assert b.header.model_version is None
        assert "score" not in b.columns
    records, octets, packets = tshark_totals(captures_dir / f"{name}.tshark.csv")
    assert sum(int(b.columns["flow_count"].sum()) for b in batches) == records
    assert sum(int(b.columns["bytes"].sum()) for b in batches) == octets
    assert sum(int(b.columns["packets"].sum()) for b in batches) == packets
    assert pipeline.filter is not None
    assert pipeline.filter.counters.passthrough_batches[reason] >= 1
    metrics = read_metrics(generate_latest(pipeline.registry).decode())
    passthrough = dict(
        (labels["reason"], value)
        for labels, value in metrics["sampleflow_relay_filter_passthrough_total"]
    )
    assert passthrough[reason] >= 1


def test_filter_disabled_ships_unscored_rows(
    captures_dir: Path, tmp_path: Path
) -> None:
    """filter.enabled = false: no score column, no roll-up (ephemeral client
    ports kept), totals equal tshark's."""
    name = "nf5-freebsd-ng_netflow.pcap"
    settings = unreachable_settings(tmp_path, SAMPLEFLOW_FILTER_ENABLED="false")
    pipeline = spool_scenario(captures_dir, settings, {name: "127.0.0.11"})
    assert pipeline.filter is None
    with Spool(settings.spool_dir) as spool:
        batches = [decode_batch(b.payload) for b in spool.pending()]
    assert all("score" not in b.columns for b in batches)
    ports = {int(p) for b in batches for p in b.columns["src_port"]}
    rows = tshark_rows(captures_dir / f"{name}.tshark.csv")
    assert ports == {int(r["src_port"]) for r in rows}
    assert sum(int(b.columns["flow_count"].sum()) for b in batches) == len(rows)


def test_stop_spools_open_windows_when_kinesis_is_unreachable(
    captures_dir: Path, tmp_path: Path
) -> None:
    """With Kinesis out of reach, stopping flushes every open window into the
    spool: the spooled batches hold all records, per the tshark totals."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens here once closed
    settings = relay_settings(
        tmp_path,
        SAMPLEFLOW_AGGREGATE_WINDOW_S="3600",
        SAMPLEFLOW_KINESIS_ENDPOINT_URL=f"http://127.0.0.1:{dead}",
        SAMPLEFLOW_METRICS_ENABLED="false",
    )
    pipeline = RelayPipeline(settings, tick_s=0.05, drain_s=0.1)
    name = "nf5-freebsd-ng_netflow.pcap"
    records, octets, packets = tshark_totals(captures_dir / f"{name}.tshark.csv")

    async def scenario() -> None:
        await pipeline.start()
        try:
            port = pipeline.collector.listening[0][1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for datagram in read_datagrams(captures_dir / name):
                    sock.sendto(datagram.payload, ("127.0.0.1", port))
            await wait_for(lambda: pipeline.aggregator.stats.records_in >= records)
            assert pipeline.aggregator.open_windows >= 1
        finally:
            await pipeline.stop()

    run(scenario)
    with Spool(settings.spool_dir) as spool:
        batches = [decode_batch(b.payload) for b in spool.pending()]
    assert batches
    assert sum(int(b.columns["flow_count"].sum()) for b in batches) == records
    assert sum(int(b.columns["bytes"].sum()) for b in batches) == octets
    assert sum(int(b.columns["packets"].sum()) for b in batches) == packets


def test_full_spool_with_reject_new_counts_the_drop(tmp_path: Path) -> None:
    """A window that does not fit a reject_new spool is dropped and counted by
    reason (batches and rows), not raised."""
    settings = relay_settings(
        tmp_path,
        SAMPLEFLOW_SPOOL_MAX_BYTES=str(MIN_SPOOL_BYTES),
        SAMPLEFLOW_SPOOL_FULL_POLICY="reject_new",
        # Synthetic rows repeat keys, which the filter would roll up.
        SAMPLEFLOW_FILTER_ENABLED="false",
        SAMPLEFLOW_KINESIS_ENDPOINT_URL="http://127.0.0.1:9",
        SAMPLEFLOW_METRICS_ENABLED="false",
    )
    pipeline = RelayPipeline(settings)
    rng = np.random.default_rng(5)
    # Random ports and byte counts hardly compress: 400,000 rows take
    # several full-size batches, more than the smallest spool holds.
    rows = np.zeros(400_000, dtype=AGG_DTYPE)
    rows["exporter"] = np.void(address_bytes("192.0.2.1"))
    rows["src_port"] = rng.integers(0, 65536, rows.shape[0])
    rows["bytes"] = rng.integers(0, 2**40, rows.shape[0])
    rows["flow_count"] = 1
    window = AggregatedWindow(0, 10_000, rows, FlushReason.CLOSED)

    async def scenario() -> None:
        await pipeline.start()
        try:
            await asyncio.to_thread(pipeline.encode_window, window)
        finally:
            await pipeline.stop()

    run(scenario)
    e = pipeline.encode_stats
    assert e.dropped["spool_full"] >= 1
    assert e.spooled_rows + e.dropped_rows["spool_full"] == 400_000


def test_split_by_exporter_keeps_runs() -> None:
    """Rows ordered by exporter split into one run per exporter, in order."""
    rows = np.zeros(5, dtype=AGG_DTYPE)
    addresses = ["192.0.2.1", "192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::1"]
    rows["exporter"] = [np.void(address_bytes(a)) for a in addresses]
    rows["bytes"] = [1, 2, 3, 4, 5]
    parts = split_by_exporter(rows)
    assert [(e, rows["bytes"][lo:hi].tolist()) for e, lo, hi in parts] == [
        (address_bytes("192.0.2.1"), [1, 2]),
        (address_bytes("192.0.2.2"), [3]),
        (address_bytes("2001:db8::1"), [4, 5]),
    ]
    assert split_by_exporter(rows[:0]) == []


def test_status_prints_drops_and_exporters() -> None:
    """`relay status` turns metrics text into lines a person reads."""
    text = "\n".join(
        [
            "# TYPE sampleflow_relay_dropped_total counter",
            'sampleflow_relay_dropped_total{stage="collector",reason="queue_full"} 7',
            'sampleflow_relay_dropped_total{stage="spool",reason="drop_oldest"} 0',
            "# TYPE sampleflow_relay_exporter_records_total counter",
            'sampleflow_relay_exporter_records_total{exporter="192.0.2.1:2055"} 42',
            "# TYPE sampleflow_relay_seconds_since_ship gauge",
            "sampleflow_relay_seconds_since_ship -1",
            "",
        ]
    )
    out = io.StringIO()
    print_status(read_metrics(text), out)
    printed = out.getvalue()
    assert "collector/queue_full" in printed
    assert "drop_oldest" not in printed  # zero counts are not drops
    assert "192.0.2.1:2055" in printed
    assert "last shipped                 never" in printed


def test_status_reports_an_unreachable_endpoint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No relay listening: exit 1 with the URL in the message."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli_main(["relay", "status", "--url", f"http://127.0.0.1:{port}"]) == 1
    assert f"127.0.0.1:{port}/metrics" in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["-1", "0", "soon"])
def test_status_refuses_a_timeout_that_is_not_positive(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--timeout must be seconds > 0: a usage error (exit 2), not a
    traceback (-1) or a socket error (0)."""
    with pytest.raises(SystemExit) as info:
        cli_main(["relay", "status", "--timeout", timeout])
    assert info.value.code == 2
    assert "argument --timeout" in capsys.readouterr().err


def test_relay_run_command_stops_cleanly_on_sigterm(
    captures_dir: Path, tmp_path: Path
) -> None:
    """`sampleflow relay run` logs one JSON line per lifecycle event, takes
    datagrams on the port it logs, and on SIGTERM exits 0 with every record
    spooled (Kinesis unreachable here), per the tshark totals."""
    name = "w-pynetflow-softflowd-v9.pcap"
    records, octets, _ = tshark_totals(captures_dir / f"{name}.tshark.csv")
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
        [relay]
        tenant_id = "acme"
        relay_id = "edge-9"
        state_dir = "{tmp_path / "state"}"
        [collector]
        listen_addresses = ["127.0.0.1"]
        ports = [0]
        rcvbuf_bytes = 1048576
        [kinesis]
        endpoint_url = "http://127.0.0.1:9"
        region = "us-east-1"
        [metrics]
        port = 0
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMPLEFLOW_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "relay",
            "run",
            "--config",
            str(config),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    events = []
    try:
        while True:
            line = proc.stderr.readline()
            assert line, f"relay exited early: {proc.wait()}"
            event = json.loads(line)
            events.append(event)
            if event["event"] == "relay_started":
                break
        port = int(event["listen"][0].rsplit(":", 1)[1])
        metrics_port = int(event["metrics"].rsplit(":", 1)[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for datagram in read_datagrams(captures_dir / name):
                sock.sendto(datagram.payload, ("127.0.0.1", port))
        deadline = time.monotonic() + 30
        while True:
            _, text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
            seen = read_metrics(text.decode()).get(
                "sampleflow_relay_records_in_total", []
            )
            if seen and seen[0][1] >= records:
                break
            assert time.monotonic() < deadline, "records never reached the relay"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    events += [json.loads(x) for x in rest.splitlines() if x.startswith("{")]
    names = [e["event"] for e in events]
    for lifecycle in (
        "relay_starting",
        "relay_started",
        "relay_stopping",
        "relay_stopped",
    ):
        assert lifecycle in names
    stopped = next(e for e in events if e["event"] == "relay_stopped")
    assert stopped["records"] == records
    with Spool(tmp_path / "state" / "spool") as spool:
        batches = [decode_batch(b.payload) for b in spool.pending()]
    assert sum(int(b.columns["flow_count"].sum()) for b in batches) == records
    assert sum(int(b.columns["bytes"].sum()) for b in batches) == octets
    assert {b.header.relay_id for b in batches} == {"edge-9"}


def test_health_is_false_before_start(tmp_path: Path) -> None:
    """/healthz's verdict: not healthy until the pipeline has started."""
    pipeline = RelayPipeline(relay_settings(tmp_path))
    healthy, details = pipeline.health()
    assert healthy is False
    assert details["listening"] == []


@pytest.mark.parametrize("major", [1, 2])
def test_relay_writes_the_configured_wire_format(tmp_path: Path, major: int) -> None:
    """relay.wire_format chooses the version written: each batch starts with
    the preamble 'SFB' + that version byte (docs/wire-format.md) and reads
    back to the same rows."""
    settings = relay_settings(
        tmp_path,
        SAMPLEFLOW_RELAY_WIRE_FORMAT=str(major),
        SAMPLEFLOW_FILTER_ENABLED="false",
        SAMPLEFLOW_METRICS_ENABLED="false",
    )
    pipeline = RelayPipeline(settings)
    rows = np.zeros(3, dtype=AGG_DTYPE)
    rows["exporter"] = np.void(address_bytes("192.0.2.1"))
    rows["src_port"] = [53, 80, 443]
    rows["bytes"] = [100, 2000, 30000]
    rows["flow_count"] = 1
    window = AggregatedWindow(0, 10_000, rows, FlushReason.CLOSED)
    seqs = iter(range(1, 100))
    groups = list(pipeline.window_encoder.encode(window, lambda: next(seqs)))
    batches = [b for g in groups for b in g.batches]
    assert batches
    assert all(b.data[:4] == b"SFB" + bytes([major]) for b in batches)
    decoded = [decode_batch(b.data) for b in batches]
    assert sorted(int(p) for d in decoded for p in d.columns["src_port"]) == [
        53,
        80,
        443,
    ]
    assert sum(int(b) for d in decoded for b in d.columns["bytes"]) == 32100


def test_unknown_wire_format_is_refused() -> None:
    """A wire format no reader knows stops loading, naming key and choices."""
    with pytest.raises(ConfigError, match=r"relay.wire_format=3 .*must be one of 1, 2"):
        load_settings(None, {"SAMPLEFLOW_RELAY_WIRE_FORMAT": "3"})
