"""kill -9 of the real relay while it ships: nothing accepted is lost.

``sampleflow relay run`` runs as a subprocess, fed real capture datagrams
over UDP by a sender thread, shipping to MiniStack through the fault proxy
(some PutRecords answered with per-record failures).  A batch is accepted
once the relay has logged ``batch_spooled`` for it (the spool's append had
returned).  The test SIGKILLs the relay at random points several times and
restarts it on the same spool; once, between two runs, it tears a spool
file (truncated, as a power loss could leave it).  A last run drains the
spool and is stopped with SIGTERM.  Then the stream is read back with the
cloud's decode_batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edge_agent.relay.commands import read_metrics
from edge_agent.wire import decode_batch
from tests.faultproxy import PTEE, Action, FailRecords, FaultProxy, Pass
from tests.reference import read_datagrams
from tests.servers import MiniStack, create_stream, kinesis_client, read_all_records

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: capture -> the loopback address it is sent from (one exporter each)
CAPTURES = {
    "nf9-fortigate-data-before-template.pcap": "127.0.0.21",
    "w-ipfix-mikrotik.pcap": "127.0.0.22",
    "nf5-freebsd-ng_netflow.pcap": "127.0.0.23",
    "w-pynetflow-softflowd-v9.pcap": "127.0.0.24",
}
KILLS = 6
RELAY_RUN = [sys.executable, "-m", "edge_agent.cli", "relay", "run"]


def _faults(n: int) -> Action:
    # Some partial failures so kills also land between a failure and its retry.
    return FailRecords((None, PTEE)) if random.Random(n).random() < 0.2 else Pass()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Sender(threading.Thread):
    """Sends the captures' datagrams to the relay's port in a loop, from
    one socket per exporter, until stopped (errors while the relay is down
    are expected and ignored: those datagrams were never accepted)."""

    def __init__(self, captures_dir: Path, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.streams = []
        for name, source in CAPTURES.items():
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((source, 0))
            payloads = [d.payload for d in read_datagrams(captures_dir / name)]
            self.streams.append((sock, payloads))

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for sock, payloads in self.streams:
                    for payload in payloads:
                        with contextlib.suppress(OSError):
                            sock.sendto(payload, ("127.0.0.1", self.port))
                time.sleep(0.005)
        finally:
            for sock, _ in self.streams:
                sock.close()


class Relay:
    """One `sampleflow relay run` subprocess and what its log said."""

    def __init__(self, config: Path, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAMPLEFLOW_")}
        self.proc = subprocess.Popen(
            [*RELAY_RUN, "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=PROJECT_ROOT,
            env=env,
        )
        self.log = log_path.open("w")
        self.events: list[dict[str, Any]] = []

    def next_event(self) -> dict[str, Any] | None:
        """The next JSON log event (None at the end of the log)."""
        assert self.proc.stderr is not None
        while True:
            line = self.proc.stderr.readline()
            if not line:
                return None
            self.log.write(line)
            if line.startswith("{"):
                event: dict[str, Any] = json.loads(line)
                self.events.append(event)
                return event

    def wait_for(self, name: str) -> dict[str, Any]:
        while True:
            event = self.next_event()
            assert event is not None, f"relay exited before {name}: {self.tail()}"
            if event["event"] == name:
                return event

    def rest(self) -> None:
        """Read the log to its end (the process has exited or will)."""
        while self.next_event() is not None:
            pass
        self.log.close()
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    def tail(self) -> str:
        self.log.flush()
        return "\n".join(json.dumps(e) for e in self.events[-15:])

    def metrics(self, port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            return read_metrics(r.read().decode())


def accepted(events: list[dict[str, Any]]) -> dict[str, int]:
    """batch id -> seq of every batch_spooled event."""
    return {
        e["batch_id"]: int(e["seq"]) for e in events if e["event"] == "batch_spooled"
    }


def write_config(tmp_path: Path, port: int, endpoint: str, stream: str) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(
        f"""
        [relay]
        tenant_id = "acme"
        relay_id = "edge-crash"
        state_dir = "{tmp_path / "state"}"
        log_level = "debug"
        log_format = "json"
        [collector]
        listen_addresses = ["127.0.0.1"]
        ports = [{port}]
        rcvbuf_bytes = 1048576
        [aggregate]
        window_s = 0.2
        lateness_s = 0
        [kinesis]
        stream_name = "{stream}"
        endpoint_url = "{endpoint}"
        region = "us-east-1"
        [metrics]
        port = 0
        """
    )
    return config


def tear_one_spool_file(spool_dir: Path, seqs: dict[int, str]) -> str | None:
    """Truncate the newest pending spool file to half; its batch id."""
    files = sorted(spool_dir.glob("*.sfb"))
    if not files:
        return None
    victim = files[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return seqs[int(victim.stem)]


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_of_relay_run_loses_no_accepted_batch(
    ministack: MiniStack, captures_dir: Path, tmp_path: Path
) -> None:
    """Six SIGKILLs of `relay run` at random points, one torn spool file;
    afterwards every accepted batch but the torn one is in the stream, the
    torn file is set aside and counted, and per partition key the first
    arrival of each batch follows its seq."""
    rng = random.Random(2024)
    stream = "crash-relay"
    client = kinesis_client(ministack.endpoint_url)
    try:
        create_stream(client, stream, 2)
    finally:
        client.close()
    port = free_udp_port()
    spool_dir = tmp_path / "state" / "spool"
    accepted_ids: dict[str, int] = {}
    torn: str | None = None
    torn_reported: list[int] = []
    sender = Sender(captures_dir, port)
    sender.start()
    try:
        with FaultProxy(ministack.endpoint_url, _faults) as proxy:
            config = write_config(tmp_path, port, proxy.endpoint_url, stream)
            for run in range(KILLS):
                relay = Relay(config, tmp_path / f"relay-{run}.log")
                opened = relay.wait_for("spool_opened")
                if run == 3:
                    torn_reported.append(int(opened["corrupt"]))
                # The kill point: after a random number of accepted batches,
                # so it falls anywhere in encode, append, PutRecords or ack.
                target = rng.randint(5, 60)
                spooled = 0
                while spooled < target:
                    event = relay.next_event()
                    assert event is not None, f"relay {run} exited: {relay.tail()}"
                    spooled += event["event"] == "batch_spooled"
                relay.proc.send_signal(signal.SIGKILL)
                relay.rest()
                assert relay.proc.wait(30) == -signal.SIGKILL
                accepted_ids.update(accepted(relay.events))
                if run == 2:
                    by_seq = {seq: bid for bid, seq in accepted_ids.items()}
                    torn = tear_one_spool_file(spool_dir, by_seq)
                    assert torn is not None, "nothing pending to tear"
            sender.stop.set()
            sender.join(10)
            final = Relay(config, tmp_path / "relay-final.log")
            started = final.wait_for("relay_started")
            metrics_port = int(started["metrics"].rsplit(":", 1)[1])
            reader = threading.Thread(target=final.rest, daemon=True)
            reader.start()
            deadline = time.monotonic() + 120
            while True:
                m = final.metrics(metrics_port)
                pending = sum(v for _, v in m["sampleflow_relay_spool_batches"])
                if pending == 0:
                    break
                assert time.monotonic() < deadline, "the spool never drained"
                time.sleep(0.1)
            final.proc.send_signal(signal.SIGTERM)
            assert final.proc.wait(60) == 0
            reader.join(10)
            accepted_ids.update(accepted(final.events))
    finally:
        sender.stop.set()

    assert torn_reported == [1], "the torn file was not set aside at start-up"
    assert len(list((spool_dir / "corrupt").iterdir())) == 1
    client = kinesis_client(ministack.endpoint_url)
    try:
        records = read_all_records(client, stream)
    finally:
        client.close()
    arrived: dict[str, int] = {}
    first_arrivals: dict[str, list[int]] = {}
    for record in records:
        header = decode_batch(record["Data"]).header
        assert (header.tenant_id, header.relay_id) == ("acme", "edge-crash")
        batch_id = str(header.batch_id)
        if batch_id not in arrived:
            first_arrivals.setdefault(record["PartitionKey"], []).append(header.seq)
        arrived[batch_id] = arrived.get(batch_id, 0) + 1
    assert len(accepted_ids) > KILLS * 5
    required = set(accepted_ids) - {torn}
    missing = sorted(required - set(arrived))
    assert not missing, f"{len(missing)} accepted batches lost: {missing[:10]}"
    for key, seqs in first_arrivals.items():
        assert seqs == sorted(seqs), key
