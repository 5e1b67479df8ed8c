"""Model updates inside ``sampleflow relay run``: the ``[modelsync]`` section.

Settings tests read the section back through the relay's own loader and
``relay check-config``.  The integration tests run the real relay as a
subprocess (``python -m edge_agent.cli relay run``) with its jobs agent
in-process, against one MiniStack serving Kinesis, S3, IAM, the IoT
control plane and IoT Jobs over mutual-TLS MQTT; the operator acts with
``sampleflow models push`` and boto3.  Flow exports are real captures sent
over UDP; what must come out is counted from their tshark reference
decodes, and job outcomes and rollout settings are read back from the IoT
control plane, never from the relay's code.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from prometheus_client import CollectorRegistry, generate_latest

from cloud.operator.keys import generate_keypair
from edge_agent.cli import main as cli_main
from edge_agent.filter import RelayFilter
from edge_agent.flows.schema import address_bytes
from edge_agent.relay.commands import print_status, read_metrics
from edge_agent.relay.config import ConfigError, load_settings
from edge_agent.relay.metrics import ModelSyncCollector
from edge_agent.wire import decode_batch
from tests import test_model_rollout as rollout
from tests.reference import read_datagrams
from tests.servers import create_stream, free_port, kinesis_client, read_all_records

ROOT = Path(__file__).resolve().parents[1]
#: The module-scoped MiniStack (IoT over mTLS, S3, IAM; Kinesis runs too)
#: and the fleet helpers (thing groups, certificates, signing keys) of the
#: standalone agent's rollout tests.
iot_server = rollout.iot_server
fleet = rollout.fleet
#: captures whose tshark totals equal a correct decode, one loopback
#: address each (exporter = sender address); two have private hosts
CAPTURES = {
    "nf5-freebsd-ng_netflow.pcap": "127.0.0.31",
    "nf9-cisco-reordered-sequence.pcap": "127.0.0.32",
    "nf9-fortigate-data-before-template.pcap": "127.0.0.33",
    "w-ipfix-mikrotik.pcap": "127.0.0.34",
    "w-pynetflow-softflowd-v9.pcap": "127.0.0.35",
}
V1 = rollout.V1
RELAY_RUN = [sys.executable, "-m", "edge_agent.cli", "relay", "run"]


# -- settings ------------------------------------------------------------------


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BASE = """
[relay]
tenant_id = "acme"
relay_id = "edge-7"
state_dir = "{state}"
"""
SECTION = """
[modelsync]
endpoint = "abc123-ats.iot.eu-west-1.amazonaws.com"
cert_path = "certs/relay.pem.crt"
key_path = "certs/relay.private.key"
ca_path = "/etc/sampleflow/AmazonRootCA1.pem"
public_keys = ["keys/model-signing.pub.pem"]
"""


def test_modelsync_section_takes_its_defaults_from_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A minimal [modelsync] enables the agent with the thing named after the
    relay id, models under <state_dir>/models, the filter's canary rows and
    internal networks, relative paths from the working folder, and AWS's
    MQTT port; the standalone agent's defaults for the rest."""
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    path = write_toml(tmp_path / "r.toml", BASE.format(state=state) + SECTION)
    settings = load_settings(path, {})
    m = settings.modelsync
    assert m is not None
    assert m.thing_name == "edge-7"
    assert m.endpoint == "abc123-ats.iot.eu-west-1.amazonaws.com"
    assert m.port == 8883
    assert m.cert_path == tmp_path / "certs" / "relay.pem.crt"
    assert m.ca_path == Path("/etc/sampleflow/AmazonRootCA1.pem")
    assert m.public_keys == (tmp_path / "keys" / "model-signing.pub.pem",)
    assert m.models_dir == state / "models"
    assert m.canary_rows_path == state / "canary-rows.npz"
    assert m.internal_networks == (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    )
    assert m.poll_interval_s == 300.0
    assert settings.sources["modelsync.thing_name"] == "default (relay.relay_id)"
    assert settings.sources["modelsync.endpoint"] == f"file {path}"


def test_no_modelsync_section_means_no_agent(tmp_path: Path) -> None:
    """Without the section (or with enabled = false) no agent is configured."""
    base = BASE.format(state=tmp_path)
    assert load_settings(write_toml(tmp_path / "a.toml", base), {}).modelsync is None
    off = base + SECTION + "enabled = false\n"
    assert load_settings(write_toml(tmp_path / "b.toml", off), {}).modelsync is None


def test_environment_overrides_and_enables_modelsync(tmp_path: Path) -> None:
    """SAMPLEFLOW_MODELSYNC_* variables win over the file, lists split on
    commas, and variables alone are enough to configure the agent."""
    path = write_toml(tmp_path / "r.toml", BASE.format(state=tmp_path) + SECTION)
    settings = load_settings(
        path,
        {"SAMPLEFLOW_MODELSYNC_PORT": "443", "SAMPLEFLOW_MODELSYNC_THING_NAME": "t1"},
    )
    assert settings.modelsync is not None
    assert (settings.modelsync.port, settings.modelsync.thing_name) == (443, "t1")
    assert settings.sources["modelsync.port"] == "env SAMPLEFLOW_MODELSYNC_PORT"
    env = {
        "SAMPLEFLOW_MODELSYNC_ENDPOINT": "h.example",
        "SAMPLEFLOW_MODELSYNC_CERT_PATH": "/c.pem",
        "SAMPLEFLOW_MODELSYNC_KEY_PATH": "/k.pem",
        "SAMPLEFLOW_MODELSYNC_CA_PATH": "/ca.pem",
        "SAMPLEFLOW_MODELSYNC_PUBLIC_KEYS": "/a.pub, /b.pub",
    }
    only_env = load_settings(
        write_toml(tmp_path / "e.toml", BASE.format(state=tmp_path)), env
    )
    assert only_env.modelsync is not None
    assert only_env.modelsync.public_keys == (Path("/a.pub"), Path("/b.pub"))


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        ("port = 0\n", {}, "modelsync.port=0 (from file {path}): must be 1..65535"),
        (
            "port = 'x'\n",
            {},
            "modelsync.port='x' (from file {path}): must be an integer",
        ),
        (
            "",
            {"SAMPLEFLOW_MODELSYNC_ENDPOINT": ""},
            "modelsync.endpoint='' (from env SAMPLEFLOW_MODELSYNC_ENDPOINT): "
            "must not be empty",
        ),
        (
            "colour = 'red'\n",
            {},
            "modelsync.colour='red' (from file {path}): unknown key; [modelsync] "
            "has enabled, thing_name, endpoint,",
        ),
        (
            "reconnect_min_s = 30\nreconnect_max_s = 10\n",
            {},
            "modelsync.reconnect_min_s=30 (from file {path}): must be >= 1 and <= "
            "reconnect_max_s (10)",
        ),
        (
            "canary_max_alert_share = 0.0\n",
            {},
            "modelsync.canary_max_alert_share=0.0 (from file {path}): must be in "
            "(0, 1]",
        ),
        (
            "internal_networks = ['10.0.0.0/8']\n",
            {},
            "modelsync.internal_networks=['10.0.0.0/8'] (from file {path}): set by "
            "the relay: [filter] internal_networks applies",
        ),
        (
            "",
            {"SAMPLEFLOW_RELAY_RELAY_ID": "edge.7"},
            "modelsync.thing_name='edge.7' (from default (relay.relay_id)): must "
            "match [a-zA-Z0-9:_-]{{1,128}}",
        ),
        (
            "",
            {"SAMPLEFLOW_FILTER_ENABLED": "false"},
            "modelsync.enabled=True (from default ([modelsync] is configured)): "
            "needs filter.enabled = true",
        ),
        (
            "secret_access_key = 'x'\n",
            {},
            "modelsync.secret_access_key='***' (from file {path}): credentials are "
            "not settings",
        ),
    ],
    ids=[
        "port-range",
        "port-type",
        "endpoint-empty",
        "unknown-key",
        "backoff-order",
        "alert-share",
        "networks-from-filter",
        "thing-name",
        "filter-off",
        "credential",
    ],
)
def test_bad_modelsync_settings_name_key_value_source_and_rule(
    tmp_path: Path, extra: str, env: dict[str, str], message: str
) -> None:
    """Each bad [modelsync] setting stops loading with a ConfigError whose
    message names the key, the value, where it came from and the rule."""
    path = write_toml(
        tmp_path / "r.toml", BASE.format(state=tmp_path) + SECTION + extra
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env)
    assert str(info.value).startswith(message.format(path=path)), str(info.value)


def test_a_required_modelsync_key_left_out_is_named(tmp_path: Path) -> None:
    """A modelsync variable alone configures the agent, so the keys it cannot
    do without (the broker endpoint first) are named as required."""
    path = write_toml(tmp_path / "r.toml", BASE.format(state=tmp_path))
    with pytest.raises(ConfigError) as info:
        load_settings(path, {"SAMPLEFLOW_MODELSYNC_PORT": "8883"})
    assert str(info.value) == "modelsync.endpoint=None (from default): is required"


def test_check_config_prints_the_effective_modelsync_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`relay check-config` lists every modelsync setting with its source,
    the relay-derived ones included; without the section it says updates
    are off."""
    path = write_toml(tmp_path / "r.toml", BASE.format(state=tmp_path) + SECTION)
    assert cli_main(["relay", "check-config", str(path)]) == 0
    out = capsys.readouterr().out
    section = out[out.index("[modelsync]") :]
    assert "enabled = true  # default ([modelsync] is configured)" in section
    assert 'thing_name = "edge-7"  # default (relay.relay_id)' in section
    assert f'models_dir = "{tmp_path / "models"}"' in section
    assert f'endpoint = "abc123-ats.iot.eu-west-1.amazonaws.com"  # file {path}' in (
        section
    )
    assert "port = 8883  # default" in section
    assert "reconnect_max_s = 60  # default" in section
    assert "# s3_region is not set  # default" in section
    assert "# internal_networks = [" in section
    # What it prints is a config file giving the same settings.
    again = write_toml(tmp_path / "again.toml", out)
    assert load_settings(again, {}).modelsync == load_settings(path, {}).modelsync
    bare = write_toml(tmp_path / "bare.toml", BASE.format(state=tmp_path))
    assert cli_main(["relay", "check-config", str(bare)]) == 0
    out = capsys.readouterr().out
    assert out[out.index("[modelsync]") :].startswith(
        "[modelsync]\nenabled = false  # default: no model updates"
    )


def test_relay_run_refuses_an_unreadable_trusted_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`relay run` whose modelsync.public_keys names a missing file exits 2
    before binding anything, naming the section and the file."""
    path = write_toml(tmp_path / "r.toml", BASE.format(state=tmp_path) + SECTION)
    missing = Path.cwd() / "keys" / "model-signing.pub.pem"
    assert cli_main(["relay", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        "sampleflow relay run: configuration error: [modelsync]: cannot read "
        f"public key {missing}"
    ) in err


def test_status_prints_the_update_counters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's counters go out on /metrics as sampleflow_relay_modelsync_*
    and `relay status` prints them: jobs by outcome with failure reasons,
    downloads, broker reconnects; `model updates off` without the agent."""
    from edge_agent.modelsync.service import ModelSyncService  # noqa: PLC0415

    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    path = write_toml(
        tmp_path / "r.toml",
        BASE.format(state=tmp_path)
        + SECTION.replace("keys/model-signing.pub.pem", str(tmp_path / "k.pub")),
    )
    settings = load_settings(path, {})
    assert settings.modelsync is not None
    service = ModelSyncService(settings.modelsync, RelayFilter(["10.0.0.0/8"]))
    c = service.counters
    c.jobs_started, c.jobs_succeeded, c.jobs_failed = 5, 2, 3
    c.failures.update({"bad_signature": 2, "non_finite_output": 1})
    c.downloads, c.downloaded_bytes, c.reconnects = 4, 12345, 1
    registry = CollectorRegistry()
    registry.register(ModelSyncCollector(service))
    metrics = read_metrics(generate_latest(registry).decode())
    assert metrics["sampleflow_relay_modelsync_jobs_failed_total"] == [
        ({"reason": "bad_signature"}, 2.0),
        ({"reason": "non_finite_output"}, 1.0),
    ]
    assert metrics["sampleflow_relay_modelsync_connected"] == [({}, 0.0)]
    out = Capture()
    print_status(metrics, out)  # type: ignore[arg-type]
    assert (
        "model updates                agent stopped as edge-7 to "
        "abc123-ats.iot.eu-west-1.amazonaws.com:8883"
    ) in out.text
    assert "  update model               none installed" in out.text
    assert (
        "  update jobs                5 taken, 2 succeeded, 3 failed "
        "(bad_signature 2, non_finite_output 1)"
    ) in out.text
    assert "  update downloads           4 files, 12345 bytes" in out.text
    assert "  broker                     1 reconnects, 0 failed connects" in out.text
    out = Capture()
    print_status({}, out)  # type: ignore[arg-type]
    assert "model updates                off" in out.text


def test_empty_models_folder_is_provisioned_with_the_configured_model(
    tmp_path: Path,
) -> None:
    """A relay taking updates for the first time installs its configured
    model (the shipped v1) as the store's first version and scores with it;
    once the store has a current model that one wins over the configured
    model; a configured model whose bytes are not its manifest's is not
    provisioned (the store stays empty)."""
    from edge_agent.modelsync import store as st  # noqa: PLC0415
    from edge_agent.modelsync.service import ModelSyncService  # noqa: PLC0415

    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    path = write_toml(
        tmp_path / "r.toml",
        BASE.format(state=tmp_path / "state")
        + SECTION.replace("keys/model-signing.pub.pem", str(tmp_path / "k.pub")),
    )
    config = load_settings(path, {}).modelsync
    assert config is not None
    service = ModelSyncService(config, RelayFilter(["10.0.0.0/8"]))
    current = service.load_current(rollout.GOOD_MANIFEST)
    v1_entry = st.entry_name(V1["name"], V1["version"], V1["sha256"])
    assert current is not None and current.entry == v1_entry
    models = tmp_path / "state" / "models"
    assert (models / "current").read_text().strip() == v1_entry
    assert (models / "versions" / v1_entry / rollout.GOOD_MODEL.name).read_bytes() == (
        rollout.GOOD_MODEL.read_bytes()
    )
    assert service.filter.model is not None
    assert service.filter.model.version == rollout.version_of(V1)
    assert list((models / "tmp").iterdir()) == []

    v2_model, v2_manifest = rollout.write_model(
        tmp_path / "v2", rollout.GOOD_MODEL.read_bytes(), version="1.1.0"
    )
    again = ModelSyncService(config, RelayFilter(["10.0.0.0/8"]))
    current = again.load_current(v2_manifest)
    assert current is not None and current.entry == v1_entry
    assert again.filter.model is not None
    assert again.filter.model.version == rollout.version_of(V1)

    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "v2", bad)
    (bad / v2_model.name).write_bytes(rollout.GOOD_MODEL.read_bytes()[:-1] + b"x")
    fresh = dataclasses.replace(config, models_dir=tmp_path / "fresh")
    empty = ModelSyncService(fresh, RelayFilter(["10.0.0.0/8"]))
    assert empty.load_current(bad / "manifest.json") is None
    assert not (tmp_path / "fresh" / "current").exists()
    assert empty.filter.model is None


class Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


# -- the real relay with its agent -------------------------------------------------


def per_pass(captures_dir: Path) -> dict[bytes, tuple[int, int]]:
    """exporter address -> (records, bytes) of one pass over the captures,
    from the tshark reference decodes."""
    out = {}
    for name, source in CAPTURES.items():
        with (captures_dir / f"{name}.tshark.csv").open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("bytes")]
        out[address_bytes(source)] = (
            len(rows),
            sum(int(r["bytes"].split("|")[0]) for r in rows),
        )
    return out


class Sender(threading.Thread):
    """Sends whole passes over the captures (one socket per exporter, 1 ms
    between datagrams) until stopped; :attr:`passes` counts finished ones."""

    def __init__(self, captures_dir: Path, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop_event = threading.Event()
        self.passes = 0
        self.streams = [
            (source, [d.payload for d in read_datagrams(captures_dir / name)])
            for name, source in CAPTURES.items()
        ]

    def run(self) -> None:
        socks = {}
        try:
            for source, _ in self.streams:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((source, 0))
                socks[source] = sock
            while not self.stop_event.is_set():
                for source, payloads in self.streams:
                    for payload in payloads:
                        socks[source].sendto(payload, ("127.0.0.1", self.port))
                        time.sleep(0.001)
                self.passes += 1
                time.sleep(0.05)
        finally:
            for sock in socks.values():
                sock.close()

    def finish(self) -> int:
        """Stop after the pass in flight; the number of passes sent."""
        self.stop_event.set()
        self.join(60)
        assert not self.is_alive()
        return self.passes


class RelayRun:
    """One `sampleflow relay run` subprocess; its JSON log read in a thread."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAMPLEFLOW_")}
        self.log_path = config.parent / "relay.log"
        self.proc = subprocess.Popen(
            [*RELAY_RUN, "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        started = rollout.wait_until(
            lambda: self.event("relay_started") or self.proc.poll() is not None,
            "relay_started",
            60.0,
        )
        assert self.proc.poll() is None, self.tail()
        assert isinstance(started, dict)
        self.udp_port = int(started["listen"][0].rsplit(":", 1)[1])
        self.metrics_port = int(started["metrics"].rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.log_path.open("a") as log:
            for line in self.proc.stderr:
                log.write(line)
                log.flush()
                if line.startswith("{"):
                    self.events.append(json.loads(line))

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in list(self.events) if e["event"] == name), None)

    def tail(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return read_metrics(r.read().decode())

    def value(self, name: str) -> float:
        return sum(v for _, v in self.metrics().get("sampleflow_relay_" + name, []))

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def stream(iot_server: rollout.IotServer) -> str:
    """One Kinesis stream on the IoT MiniStack for the relays of this module."""
    client = kinesis_client(iot_server.endpoint_url)
    try:
        create_stream(client, "sf-relay-modelsync")
    finally:
        client.close()
    return "sf-relay-modelsync"


def relay_config(
    fleet: rollout.Fleet, thing: str, groups: tuple[str, ...], stream: str, **ms: Any
) -> Path:
    """Register ``thing`` (its own certificate, v1 installed in its models
    folder) and write a relay TOML with [modelsync] for it; ``ms`` overrides
    modelsync keys.  The canary rows file the relay's filter rewrites is
    seeded with real CTU-13 feature rows, as a relay running for a while
    would have it."""
    agent = json.loads(fleet.relay(thing, groups).read_text())
    home = fleet.root / thing
    state = home / "state"
    state.mkdir()
    shutil.copyfile(rollout.CANARY_ROWS, state / "canary-rows.npz")
    modelsync = {
        "thing_name": thing,
        "endpoint": "127.0.0.1",
        "port": fleet.server.mqtt_port,
        "cert_path": str(home / agent["cert_path"]),
        "key_path": str(home / agent["key_path"]),
        "ca_path": agent["ca_path"],
        "models_dir": str(home / "models"),
        "public_keys": agent["public_keys"],
        "reconnect_min_s": 1,
        "reconnect_max_s": 2,
        "download_chunk_bytes": 1024,
        **ms,
    }
    lines = [f"{k} = {json.dumps(v)}" for k, v in modelsync.items()]
    path = home / "relay.toml"
    path.write_text(
        f"""
[relay]
tenant_id = "acme"
relay_id = "{thing}"
state_dir = "{state}"
log_level = "info"
[collector]
listen_addresses = ["127.0.0.1"]
ports = [0]
rcvbuf_bytes = 4194304
[aggregate]
window_s = 0.5
lateness_s = 0
[kinesis]
stream_name = "{stream}"
endpoint_url = "{fleet.server.endpoint_url}"
region = "us-east-1"
[metrics]
port = 0
[modelsync]
"""
        + "\n".join(lines)
        + "\n"
    )
    return path


@pytest.fixture
def running(request: pytest.FixtureRequest) -> Iterator[list[RelayRun]]:
    """Relays a test started; each is stopped at the end whatever happens."""
    relays: list[RelayRun] = []
    yield relays
    for relay in relays:
        relay.stop()


def batches_of(fleet: rollout.Fleet, stream: str, relay_id: str) -> list[Any]:
    """Every batch of ``relay_id`` in the stream, decoded, in shard order."""
    client = kinesis_client(fleet.server.endpoint_url)
    try:
        records = read_all_records(client, stream)
    finally:
        client.close()
    batches = [decode_batch(r["Data"]) for r in records]
    return [b for b in batches if b.header.relay_id == relay_id]


def settle_and_stop(relay: RelayRun, records: int) -> None:
    """Wait until the relay took ``records`` and shipped everything (no open
    window, empty spool), then SIGTERM it; it must exit 0."""
    rollout.wait_until(
        lambda: relay.value("records_in_total") >= records, "all records in", 120.0
    )

    def drained() -> bool:
        m = relay.metrics()

        def v(name: str) -> float:
            return sum(x for _, x in m.get("sampleflow_relay_" + name, []))

        return (
            v("aggregator_held_rows") == 0
            and v("encode_queue_windows") == 0
            and v("spool_batches") == 0
            and v("batches_shipped_total") == v("batches_spooled_total")
        )

    rollout.wait_until(drained, "the relay to ship everything", 120.0)
    assert relay.stop() == 0, relay.tail()


def job_sizes(fleet: rollout.Fleet, job: str) -> int:
    """Bytes a relay downloads for a job: model plus manifest, per the job
    document read back from the IoT control plane."""
    doc = json.loads(fleet.iot.get_job_document(jobId=job)["document"])
    return int(doc["size"]) + int(doc["manifest"]["size"])


@pytest.mark.integration
def test_pushed_model_swaps_into_the_running_relay_without_losing_a_record(
    fleet: rollout.Fleet,
    stream: str,
    captures_dir: Path,
    tmp_path: Path,
    running: list[RelayRun],
) -> None:
    """`relay run` with [modelsync] keeps taking flows over UDP while
    `models push` rolls v2 out: the execution ends SUCCEEDED with 1.1.0,
    /metrics and `relay status` show the new version and the counters, the
    shipped batches are scored with v1 before and v2 after the swap, and
    every record sent (tshark count x passes) is in Kinesis, per exporter,
    with its bytes."""
    thing = "run-good-1"
    config = relay_config(fleet, thing, ("grp-run-good",), stream)
    relay = RelayRun(config)
    running.append(relay)
    rollout.wait_until(
        lambda: relay.value("modelsync_connected") == 1, "the agent to connect"
    )
    before = relay.metrics()
    assert before["sampleflow_relay_modelsync_model_info"] == [
        ({"model": V1["name"], "version": "1.0.0"}, 1.0)
    ]
    assert before["sampleflow_relay_filter_model_info"] == [
        ({"version": rollout.version_of(V1)}, 1.0)
    ]
    sender = Sender(captures_dir, relay.udp_port)
    sender.start()
    try:
        rollout.wait_until(lambda: sender.passes >= 2, "two passes sent")
        rollout.wait_until(
            lambda: relay.value("batches_shipped_total") > 0, "v1 batches shipped"
        )
        model, manifest = rollout.write_model(
            tmp_path / "v2", rollout.GOOD_MODEL.read_bytes(), version="1.1.0"
        )
        v2 = json.loads(manifest.read_text())
        job = fleet.push(model, manifest, "grp-run-good")
        execution = fleet.wait_status(job, thing, {"SUCCEEDED", "FAILED"})
        passes_at_swap = sender.passes
        rollout.wait_until(
            lambda: sender.passes >= passes_at_swap + 2, "two passes after the swap"
        )
    finally:
        passes = sender.finish()
    assert execution["status"] == "SUCCEEDED", execution
    assert execution["statusDetails"]["detailsMap"]["running_version"] == "1.1.0"

    metrics = relay.metrics()
    assert metrics["sampleflow_relay_modelsync_model_info"] == [
        ({"model": V1["name"], "version": "1.1.0"}, 1.0)
    ]
    assert metrics["sampleflow_relay_filter_model_info"] == [
        ({"version": rollout.version_of(v2)}, 1.0)
    ]
    for name, want in (
        ("jobs_started_total", 1),
        ("jobs_succeeded_total", 1),
        ("downloads_total", 2),
        ("download_bytes_total", job_sizes(fleet, job)),
        ("connected", 1),
        ("update_in_progress", 0),
    ):
        assert metrics["sampleflow_relay_modelsync_" + name] == [({}, float(want))]
    assert not metrics.get("sampleflow_relay_modelsync_jobs_failed_total")
    out = Capture()
    print_status(metrics, out)  # type: ignore[arg-type]
    assert f"  update model               {V1['name']} 1.1.0" in out.text
    assert "  update jobs                1 taken, 1 succeeded, 0 failed" in out.text

    expected = per_pass(captures_dir)
    records_sent = passes * sum(r for r, _ in expected.values())
    settle_and_stop(relay, records_sent)
    batches = batches_of(fleet, stream, thing)
    got: dict[bytes, list[int]] = collections.defaultdict(lambda: [0, 0])
    versions = []
    for batch in batches:
        exporter = batch.columns["exporter"].tolist()[0]
        got[exporter][0] += int(batch.columns["flow_count"].sum())
        got[exporter][1] += int(batch.columns["bytes"].sum())
        versions.append(batch.header.model_version)
    assert {k: tuple(v) for k, v in got.items()} == {
        k: (passes * r, passes * b) for k, (r, b) in expected.items()
    }
    # Every batch scored, by v1 until the swap and by v2 from then on.
    first_v2 = versions.index(rollout.version_of(v2))
    assert set(versions[:first_v2]) == {rollout.version_of(V1)}
    assert set(versions[first_v2:]) == {rollout.version_of(v2)}
    assert first_v2 > 0
    assert rollout.current_version(config.parent / "relay.json") == "1.1.0"


@pytest.mark.integration
def test_bad_model_fails_in_the_running_relay_which_keeps_scoring_with_v1(
    fleet: rollout.Fleet,
    stream: str,
    captures_dir: Path,
    running: list[RelayRun],
) -> None:
    """A signed model whose outputs are NaN, pushed to a running relay: the
    execution is FAILED (non_finite_output, running_version 1.0.0), the
    failure is counted by reason on /metrics, and batches shipped after it
    are still scored with v1, none passed through."""
    thing = "run-bad-1"
    relay = RelayRun(relay_config(fleet, thing, ("grp-run-bad",), stream))
    running.append(relay)
    rollout.wait_until(
        lambda: relay.value("modelsync_connected") == 1, "the agent to connect"
    )
    nan_manifest = rollout.NAN_DIR / "nan-model.manifest.json"
    nan_model = rollout.NAN_DIR / json.loads(nan_manifest.read_text())["model_file"]
    job = fleet.push(nan_model, nan_manifest, "grp-run-bad")
    execution = fleet.wait_status(job, thing, {"SUCCEEDED", "FAILED"})
    details = execution["statusDetails"]["detailsMap"]
    assert execution["status"] == "FAILED", details
    assert details["reason"] == "non_finite_output"
    assert details["running_version"] == "1.0.0"
    metrics = relay.metrics()
    assert metrics["sampleflow_relay_modelsync_jobs_failed_total"] == [
        ({"reason": "non_finite_output"}, 1.0)
    ]
    assert metrics["sampleflow_relay_modelsync_jobs_succeeded_total"] == [({}, 0.0)]
    assert metrics["sampleflow_relay_filter_model_info"] == [
        ({"version": rollout.version_of(V1)}, 1.0)
    ]
    sender = Sender(captures_dir, relay.udp_port)
    sender.start()
    try:
        rollout.wait_until(lambda: sender.passes >= 2, "two passes after the failure")
    finally:
        passes = sender.finish()
    records_sent = passes * sum(r for r, _ in per_pass(captures_dir).values())
    settle_and_stop(relay, records_sent)
    batches = batches_of(fleet, stream, thing)
    assert sum(int(b.columns["flow_count"].sum()) for b in batches) == records_sent
    assert {b.header.model_version for b in batches} == {rollout.version_of(V1)}
    scores = np.concatenate([b.columns["score"] for b in batches])
    assert np.isfinite(scores).any()
    assert np.all(scores[np.isfinite(scores)] <= 1.0)
    assert rollout.current_version(relay_json(fleet, thing)) == "1.0.0"


def relay_json(fleet: rollout.Fleet, thing: str) -> Path:
    return fleet.root / thing / "relay.json"


@pytest.mark.integration
@pytest.mark.slow
def test_exponential_rollout_reaches_every_running_relay(
    fleet: rollout.Fleet, stream: str, tmp_path: Path, running: list[RelayRun]
) -> None:
    """`models push --exponential 1:2:1 --max-per-minute 10` to three running
    relays: DescribeJob returns exactly that rollout config, the first batch
    notifies one relay, the rate doubles once it succeeded (the next batch,
    a minute later, takes the other two), and the job COMPLETES with every
    relay running 1.1.0."""
    group = "grp-run-expo"
    things = [f"run-expo-{i}" for i in (1, 2, 3)]
    for thing in things:
        relay = RelayRun(relay_config(fleet, thing, (group,), stream))
        running.append(relay)
    rollout.wait_until(
        lambda: all(r.value("modelsync_connected") == 1 for r in running),
        "the agents to connect",
    )
    model, manifest = rollout.write_model(
        tmp_path / "v2", rollout.GOOD_MODEL.read_bytes(), version="1.1.0"
    )
    job = fleet.cli(
        "push",
        str(model),
        str(manifest),
        "--group",
        group,
        "--bucket",
        rollout.BUCKET,
        "--key",
        str(fleet.private_key),
        "--presign-role-arn",
        fleet.role_arn,
        "--exponential",
        "1:2:1",
        "--max-per-minute",
        "10",
    ).splitlines()[-1]
    described = fleet.iot.describe_job(jobId=job)["job"]
    assert described["jobExecutionsRolloutConfig"] == {
        "maximumPerMinute": 10,
        "exponentialRate": {
            "baseRatePerMinute": 1,
            "incrementFactor": 2.0,
            "rateIncreaseCriteria": {"numberOfSucceededThings": 1},
        },
    }

    def executions() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = fleet.iot.list_job_executions_for_job(jobId=job)[
            "executionSummaries"
        ]
        return found

    first = executions()
    assert len(first) == 1, first
    first_thing = first[0]["thingArn"].rsplit("/", 1)[1]
    assert (
        fleet.wait_status(job, first_thing, {"SUCCEEDED", "FAILED"})["status"]
        == "SUCCEEDED"
    )

    def finished(thing: str) -> dict[str, Any] | None:
        if not any(e["thingArn"].endswith("/" + thing) for e in executions()):
            return None  # not released yet
        execution = fleet.execution(job, thing)
        return execution if execution["status"] in ("SUCCEEDED", "FAILED") else None

    for thing in things:
        execution = rollout.wait_until(
            lambda: finished(thing),  # noqa: B023 - waited for within the loop
            f"{thing} to finish",
            150.0,
        )
        assert execution["status"] == "SUCCEEDED", execution
        assert execution["statusDetails"]["detailsMap"]["running_version"] == "1.1.0"
    assert rollout.wait_until(
        lambda: fleet.iot.describe_job(jobId=job)["job"]["status"] == "COMPLETED",
        "the job to complete",
    )
    # The second batch took both remaining relays at once: the rate had
    # doubled from 1 to 2 a minute once the first relay succeeded.
    queued = sorted(e["jobExecutionSummary"]["queuedAt"] for e in executions())
    assert len(queued) == 3
    assert queued[0] < queued[1] == queued[2]
    for relay in running:
        assert relay.metrics()["sampleflow_relay_modelsync_model_info"] == [
            ({"model": V1["name"], "version": "1.1.0"}, 1.0)
        ]


@pytest.mark.integration
def test_relay_keeps_relaying_while_the_broker_is_unreachable(
    fleet: rollout.Fleet,
    stream: str,
    captures_dir: Path,
    running: list[RelayRun],
) -> None:
    """With [modelsync] pointing at a port nobody listens on, `relay run`
    starts, retries the broker with backoff (failed connects counted, not
    connected) and ships every record sent, scored with its installed v1;
    SIGTERM still stops it cleanly."""
    thing = "run-offline-1"
    relay = RelayRun(
        relay_config(fleet, thing, ("grp-run-offline",), stream, port=free_port())
    )
    running.append(relay)
    sender = Sender(captures_dir, relay.udp_port)
    sender.start()
    try:
        rollout.wait_until(lambda: sender.passes >= 2, "two passes sent")
        rollout.wait_until(
            lambda: relay.value("modelsync_connect_failures_total") >= 2,
            "two failed connects",
        )
    finally:
        passes = sender.finish()
    assert relay.value("modelsync_connected") == 0
    assert relay.value("modelsync_agent_running") == 1
    records_sent = passes * sum(r for r, _ in per_pass(captures_dir).values())
    settle_and_stop(relay, records_sent)
    batches = batches_of(fleet, stream, thing)
    assert sum(int(b.columns["flow_count"].sum()) for b in batches) == records_sent
    assert {b.header.model_version for b in batches} == {rollout.version_of(V1)}


class StallingModelServer:
    """HTTP server for one model file that sends its first kilobyte and then
    stalls (a link gone quiet mid-download) until :meth:`open_up`."""

    def __init__(self, body: bytes) -> None:
        import http.server  # noqa: PLC0415

        self.body = body
        self.requested = threading.Event()
        self.opened = threading.Event()
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                if outer.opened.is_set():
                    self.wfile.write(outer.body)
                    return
                self.wfile.write(outer.body[:1024])
                self.wfile.flush()
                outer.requested.set()
                outer.release.wait(120)  # the client is killed meanwhile

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/model"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def open_up(self) -> None:
        self.opened.set()
        self.release.set()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.integration
def test_relay_run_killed_mid_download_finishes_the_update_after_restart(
    fleet: rollout.Fleet,
    stream: str,
    tmp_path: Path,
    running: list[RelayRun],
) -> None:
    """`relay run` SIGKILLed while the model download hangs half-way keeps
    v1 as current with the update recorded as downloading and the execution
    IN_PROGRESS; started again, it resumes the same execution (attempt 2),
    installs v2 and reports SUCCEEDED, v1 kept as previous, no state file or
    partial download left, the resume counted on /metrics."""
    thing = "run-kill-1"
    group = fleet.group("grp-run-kill")
    config = relay_config(fleet, thing, (group,), stream)
    models = config.parent / "models"
    model, manifest = rollout.write_model(
        tmp_path / "v2", rollout.GOOD_MODEL.read_bytes(), version="1.1.0"
    )
    # A signed document from a push to an empty group, with the model to be
    # fetched from the stalling server instead of S3.
    staged = fleet.push(model, manifest, fleet.group("grp-run-kill-staging"))
    doc = json.loads(fleet.iot.get_job_document(jobId=staged)["document"])
    fleet.cli("cancel", staged)
    server = StallingModelServer(model.read_bytes())
    try:
        doc["download"]["model"] = {"url": server.url}
        job = f"sfmodel-run-kill-{time.monotonic_ns() % 10**9}"
        relay = RelayRun(config)
        running.append(relay)
        rollout.wait_until(
            lambda: relay.value("modelsync_connected") == 1, "the agent to connect"
        )
        fleet.iot.create_job(
            jobId=job,
            targets=[
                fleet.iot.describe_thing_group(thingGroupName=group)["thingGroupArn"]
            ],
            document=json.dumps(doc),
            presignedUrlConfig={"roleArn": fleet.role_arn, "expiresInSec": 600},
        )
        rollout.wait_until(server.requested.is_set, "the model download to start")
        relay.proc.send_signal(signal.SIGKILL)
        relay.stop()
        state = json.loads((models / "state.json").read_text())
        assert (state["job_id"], state["phase"]) == (job, "downloading")
        assert rollout.current_version(config.parent / "relay.json") == "1.0.0"
        assert fleet.execution(job, thing)["status"] == "IN_PROGRESS"

        server.open_up()
        relay = RelayRun(config)
        running.append(relay)
        execution = fleet.wait_status(job, thing, {"SUCCEEDED", "FAILED"})
    finally:
        server.close()
    details = execution["statusDetails"]["detailsMap"]
    assert execution["status"] == "SUCCEEDED", details
    assert (details["running_version"], details["attempts"]) == ("1.1.0", "2")
    assert rollout.current_version(config.parent / "relay.json") == "1.1.0"
    v1_entry = rollout.st.entry_name(V1["name"], V1["version"], V1["sha256"])
    assert (models / "previous").read_text().strip() == v1_entry
    rollout.wait_until(
        lambda: not (models / "state.json").exists(), "the update to be forgotten"
    )
    assert list((models / "tmp").iterdir()) == []
    metrics = relay.metrics()
    assert metrics["sampleflow_relay_modelsync_jobs_resumed_total"] == [({}, 1.0)]
    assert metrics["sampleflow_relay_modelsync_model_info"] == [
        ({"model": V1["name"], "version": "1.1.0"}, 1.0)
    ]
    v2 = json.loads(manifest.read_text())
    assert metrics["sampleflow_relay_filter_model_info"] == [
        ({"version": rollout.version_of(v2)}, 1.0)
    ]


@pytest.mark.parametrize(
    ("broken", "setting"),
    [("relay.pem.crt", "modelsync.cert_path"), ("relay.key", "modelsync.key_path")],
)
def test_relay_run_refuses_tls_files_that_are_not_pem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], broken: str, setting: str
) -> None:
    """`relay run` whose certificate or key file holds no PEM exits 2 with one
    line naming the setting and the file (not an awscrt traceback later)."""
    certs = tmp_path / "certs"
    certs.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "edge-7")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2026, 1, 1))
        .not_valid_after(datetime.datetime(2036, 1, 1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (certs / "relay.pem.crt").write_bytes(pem)
    (certs / "ca.pem").write_bytes(pem)
    (certs / "relay.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (certs / broken).write_text("placeholder, not PEM\n")
    signing = ed25519.Ed25519PrivateKey.generate().public_key()
    (certs / "signing.pub.pem").write_bytes(
        signing.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    section = f"""
[modelsync]
endpoint = "abc123-ats.iot.eu-west-1.amazonaws.com"
cert_path = "{certs / "relay.pem.crt"}"
key_path = "{certs / "relay.key"}"
ca_path = "{certs / "ca.pem"}"
public_keys = ["{certs / "signing.pub.pem"}"]
"""
    path = write_toml(tmp_path / "r.toml", BASE.format(state=tmp_path) + section)
    assert cli_main(["relay", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("sampleflow relay run"))
    assert f"{setting}='{certs / broken}': not a PEM" in line
    assert "Traceback" not in err
