"""Model rollouts end to end: operator -> AWS IoT Jobs -> relays, on real servers.

MiniStack (a separate process) serves S3, IAM, the IoT control plane and
the IoT Jobs MQTT protocol on its mutual-TLS MQTT port.  Every relay is its
own IoT thing with its own certificate (CreateKeysAndCertificate) and runs
the unmodified awsiotsdk connection code of :mod:`edge_agent.modelsync`,
either in this process (a thread, to watch its filter score) or as a
``python -m edge_agent.modelsync run`` subprocess (to SIGKILL it).
Operators act through the ``sampleflow models`` command line.

Expected outcomes come from the test's own construction of each case (the
bytes it corrupted, the key it signed with) and are read back from the
server (DescribeJobExecution) and the relay's disk, never from the code
under test.  The good model is the shipped relay model
(models/relay-ctu13s6-r100-w300); "v2" is the same network under a new
version number.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.training import ctu13
from cloud.training.thinning import sample_flows
from edge_agent.cli import main as sampleflow
from edge_agent.filter import RelayFilter
from edge_agent.modelsync import store as st
from edge_agent.modelsync.agent import JobsAgent
from edge_agent.modelsync.config import ModelSyncConfig
from edge_agent.modelsync.installer import CanaryPolicy, FilterInstaller, rows_from_npz
from edge_agent.modelsync.runner import UpdateRunner
from edge_agent.modelsync.verify import trusted_keys
from tests.servers import DUMMY_AWS_ENV, MiniStack, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
GOOD_MODEL = MODELS / "relay-ctu13s6-r100-w300.tflite"
GOOD_MANIFEST = MODELS / "relay-ctu13s6-r100-w300.manifest.json"
NAN_DIR = ROOT / "tests" / "data" / "nan-model"
CANARY_ROWS = ROOT / "tests" / "data" / "modelsync" / "canary_rows.npz"
REGION = "us-east-1"
BUCKET = "sampleflow-models"
WAIT_S = 90.0


# -- servers and fleet ------------------------------------------------------------


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """Poll ``check`` until it returns a truthy value; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclasses.dataclass
class IotServer:
    """MiniStack with its mutual-TLS MQTT listener."""

    stack: MiniStack
    mqtt_port: int

    @property
    def endpoint_url(self) -> str:
        return self.stack.endpoint_url

    def client(self, service: str) -> Any:
        return boto3.session.Session(
            aws_access_key_id=DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
        ).client(service, endpoint_url=self.endpoint_url)


@pytest.fixture(scope="module")
def iot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IotServer]:
    """A MiniStack process with IoT over MQTT on a free mTLS port."""
    stack = MiniStack(tmp_path_factory.mktemp("ministack-iot"))
    mqtt_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in DUMMY_AWS_ENV.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(stack.workdir / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(stack.workdir / "no-creds"))
        mp.setenv("IOT_MTLS_PORT", str(mqtt_port))
        stack.start(services=("iot", "s3", "iam"))
        try:
            wait_until(
                lambda: _health(stack).get("iot_mtls") == "listening",
                "the MQTT listener",
                30.0,
            )
            yield IotServer(stack, mqtt_port)
        finally:
            stack.stop()


def _health(stack: MiniStack) -> dict[str, Any]:
    url = f"{stack.endpoint_url}/_ministack/health"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: dict[str, Any] = json.loads(resp.read())
        return body


@dataclasses.dataclass
class Fleet:
    """Thing groups, signing keys, the S3 bucket and the presign role."""

    server: IotServer
    root: Path
    private_key: Path
    public_key: Path
    role_arn: str
    iot: Any
    s3: Any
    ca_path: Path

    def group(self, name: str) -> str:
        with contextlib.suppress(self.iot.exceptions.ResourceAlreadyExistsException):
            self.iot.create_thing_group(thingGroupName=name)
        return name

    def relay(self, name: str, groups: tuple[str, ...], **config: Any) -> Path:
        """Register a thing with its own certificate; write its config; seed v1."""
        self.iot.create_thing(thingName=name)
        keys = self.iot.create_keys_and_certificate(setAsActive=True)
        self.iot.attach_thing_principal(
            thingName=name, principal=keys["certificateArn"]
        )
        for group in groups:
            self.iot.add_thing_to_thing_group(
                thingGroupName=self.group(group), thingName=name
            )
        home = self.root / name
        home.mkdir()
        (home / "cert.pem").write_text(keys["certificatePem"])
        (home / "key.pem").write_text(keys["keyPair"]["PrivateKey"])
        settings = {
            "thing_name": name,
            "endpoint": "127.0.0.1",
            "port": self.server.mqtt_port,
            "cert_path": "cert.pem",
            "key_path": "key.pem",
            "ca_path": str(self.ca_path),
            "models_dir": "models",
            "public_keys": [str(self.public_key)],
            "canary_rows_path": str(CANARY_ROWS),
            "reconnect_min_s": 1,
            "reconnect_max_s": 2,
            "request_timeout_s": 10,
            "download_chunk_bytes": 1024,
            "internal_networks": list(ctu13.INTERNAL_NETWORKS),
            **config,
        }
        path = home / "relay.json"
        path.write_text(json.dumps(settings))
        run_module(
            [
                "install-local",
                "--config",
                str(path),
                str(GOOD_MODEL),
                str(GOOD_MANIFEST),
            ]
        )
        return path

    def push(self, model: Path, manifest: Path, group: str, *extra: str) -> str:
        """``sampleflow models push``; returns the job id it printed."""
        return self.cli(
            "push",
            str(model),
            str(manifest),
            "--group",
            group,
            "--bucket",
            BUCKET,
            "--key",
            str(self.private_key),
            "--presign-role-arn",
            self.role_arn,
            "--max-per-minute",
            "100",
            *extra,
        ).splitlines()[-1]

    def cli(self, *args: str) -> str:
        """Run ``sampleflow models ARGS`` in-process; returns its stdout."""
        out = _Capture()
        aws = (
            []
            if args[0] == "keygen"
            else ["--endpoint-url", self.server.endpoint_url, "--region", REGION]
        )
        with contextlib.redirect_stdout(out):
            code = sampleflow(["models", *args, *aws])
        assert code == 0, f"sampleflow models {args[0]} exited {code}: {out.text}"
        return out.text

    def execution(self, job_id: str, thing: str) -> dict[str, Any]:
        execution: dict[str, Any] = self.iot.describe_job_execution(
            jobId=job_id, thingName=thing
        )["execution"]
        return execution

    def wait_status(self, job_id: str, thing: str, wanted: set[str]) -> dict[str, Any]:
        """Wait until the thing's execution is in one of ``wanted``."""
        return wait_until(
            lambda: (e := self.execution(job_id, thing))["status"] in wanted and e,
            f"{thing}'s execution of {job_id} to reach {wanted}",
        )


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def run_module(args: list[str]) -> None:
    """``python -m edge_agent.modelsync ARGS`` in-process; must exit 0."""
    from edge_agent.modelsync.__main__ import main  # noqa: PLC0415

    assert main(args) == 0


@pytest.fixture(scope="module")
def fleet(iot_server: IotServer, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    root = tmp_path_factory.mktemp("fleet")
    iot, s3, iam = (iot_server.client(s) for s in ("iot", "s3", "iam"))
    s3.create_bucket(Bucket=BUCKET)
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "iot.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    role = iam.create_role(
        RoleName="sampleflow-presign", AssumeRolePolicyDocument=json.dumps(trust)
    )
    ca = root / "ca.pem"
    with urllib.request.urlopen(
        f"{iot_server.endpoint_url}/_ministack/iot/ca.pem"
    ) as r:
        ca.write_bytes(r.read())
    fleet = Fleet(
        server=iot_server,
        root=root,
        private_key=root / "signing.pem",
        public_key=root / "signing.pub.pem",
        role_arn=role["Role"]["Arn"],
        iot=iot,
        s3=s3,
        ca_path=ca,
    )
    fleet.cli(
        "keygen", "--private", str(fleet.private_key), "--public", str(fleet.public_key)
    )
    return fleet


# -- relays ---------------------------------------------------------------------


class RelayThread:
    """A relay agent in this process, with the real filter it swaps models in."""

    def __init__(self, config_path: Path) -> None:
        self.config = ModelSyncConfig.load(config_path)
        self.filter = RelayFilter(self.config.internal_networks)
        installer = FilterInstaller(
            self.filter,
            lambda: rows_from_npz(CANARY_ROWS),
            CanaryPolicy(min_rows=20),
        )
        self.store = st.ModelStore(self.config.models_dir)
        self.runner = UpdateRunner(
            self.config, self.store, installer, trusted_keys(self.config.public_keys)
        )
        self.agent = JobsAgent(self.config, self.runner, poll_interval_s=5.0)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop_event,))

    def __enter__(self) -> RelayThread:
        self.thread.start()
        wait_until(lambda: self.agent.connected, f"{self.config.thing_name} to connect")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.agent.wake()
        self.thread.join(30)
        assert not self.thread.is_alive()

    def scored_version(self, records: np.ndarray) -> str | None:
        """The model version the filter scores a batch of real records with."""
        result = self.filter.process(records)
        assert result.passthrough_reason is None, result.passthrough_reason
        assert result.host_scores.size > 0
        assert np.isfinite(result.host_scores["score"]).all()
        return result.model_version


class RelayProcess:
    """A relay agent as ``python -m edge_agent.modelsync run`` (killable)."""

    def __init__(self, config_path: Path, pause_at: str | None = None) -> None:
        env = dict(os.environ)
        env.pop("SAMPLEFLOW_MODELSYNC_PAUSE_AT", None)
        if pause_at:
            env["SAMPLEFLOW_MODELSYNC_PAUSE_AT"] = pause_at
        self.log = config_path.parent / "agent.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edge_agent.modelsync",
                    "run",
                    "--config",
                    str(config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def real_records() -> np.ndarray:
    """Sampled flow records of one real CTU-13 slice (1:100, seed 3)."""
    flows = ctu13.load_flows(ROOT / "data" / "ctu13-scenario6", slices=[6])
    records, _ = sample_flows(flows, 100, 3)
    return records


def version_of(manifest: dict[str, Any]) -> str:
    """The filter's version string, computed here from the manifest."""
    return f"{manifest['name']}:{manifest['version']}:{manifest['sha256'][:12]}"


V1 = json.loads(GOOD_MANIFEST.read_text())


def write_model(dest: Path, model_bytes: bytes, **changes: Any) -> tuple[Path, Path]:
    """A model file and a manifest for it (the v1 manifest with ``changes``)."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = {**V1, **changes}
    model = dest / manifest["model_file"]
    model.write_bytes(model_bytes)
    manifest["sha256"] = hashlib.sha256(model_bytes).hexdigest()
    manifest["bytes"] = len(model_bytes)
    path = dest / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return model, path


def current_version(config_path: Path) -> str:
    """The version the relay's ``current`` pointer names, read from disk."""
    models = config_path.parent / "models"
    entry = (models / "current").read_text().strip()
    manifest = json.loads((models / "versions" / entry / "manifest.json").read_text())
    return str(manifest["version"])


# -- a good rollout ---------------------------------------------------------------


def test_good_model_rolls_out_to_every_relay_of_the_group(
    fleet: Fleet, tmp_path: Path, real_records: np.ndarray
) -> None:
    """Three relays in two tenants' groups and the all-relays group each install
    v2 from a push to all-relays, report SUCCEEDED with version 1.1.0, score
    with it, and keep v1 on disk as ``previous``."""
    configs = [
        fleet.relay("good-a1", ("tenant-a", "good-all")),
        fleet.relay("good-a2", ("tenant-a", "good-all")),
        fleet.relay("good-b1", ("tenant-b", "good-all")),
    ]
    model, manifest = write_model(
        tmp_path / "v2", GOOD_MODEL.read_bytes(), version="1.1.0"
    )
    v2 = json.loads(manifest.read_text())
    with contextlib.ExitStack() as stack:
        relays = [stack.enter_context(RelayThread(c)) for c in configs]
        for relay in relays:
            assert relay.scored_version(real_records) == version_of(V1)
        job = fleet.push(model, manifest, "good-all")
        for relay in relays:
            execution = fleet.wait_status(
                job, relay.config.thing_name, {"SUCCEEDED", "FAILED"}
            )
            assert execution["status"] == "SUCCEEDED", execution
            details = execution["statusDetails"]["detailsMap"]
            assert details["running_version"] == "1.1.0"
            assert relay.scored_version(real_records) == version_of(v2)
        text = fleet.cli("status", job, "--json")
        status = json.loads(text[text.index("{") :])
    assert status["status"] == "COMPLETED"
    assert sorted(e["thing"] for e in status["executions"]) == [
        "good-a1",
        "good-a2",
        "good-b1",
    ]
    assert {e["status"] for e in status["executions"]} == {"SUCCEEDED"}
    assert {e["running_version"] for e in status["executions"]} == {"1.1.0"}
    for config in configs:
        models = config.parent / "models"
        assert current_version(config) == "1.1.0"
        previous = (models / "previous").read_text().strip()
        assert (
            json.loads((models / "versions" / previous / "manifest.json").read_text())[
                "version"
            ]
            == "1.0.0"
        )
        assert not (models / "state.json").exists()
        assert list((models / "tmp").iterdir()) == []


# -- bad models are refused -------------------------------------------------------


@pytest.fixture(scope="module")
def bad_fleet(fleet: Fleet) -> Iterator[list[RelayThread]]:
    """Two running relays in group ``bad-all``, both on v1."""
    configs = [fleet.relay(f"bad-{i}", ("bad-all",)) for i in (1, 2)]
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(RelayThread(c)) for c in configs]


def _sign(key_path: Path, data: bytes) -> str:
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    return base64.b64encode(key.sign(data)).decode()


def _staged(fleet: Fleet, model: Path, manifest: Path) -> dict[str, Any]:
    """Push to a group with no relays and return the job document (so a case
    can tamper with it before any relay sees it)."""
    job = fleet.push(model, manifest, fleet.group("bad-staging"))
    doc: dict[str, Any] = json.loads(fleet.iot.get_job_document(jobId=job)["document"])
    fleet.cli("cancel", job)
    return doc


def _job_for_bad_all(fleet: Fleet, doc: dict[str, Any], name: str) -> str:
    job_id = f"sfmodel-case-{name}-{time.monotonic_ns() % 10**9}"
    fleet.iot.create_job(
        jobId=job_id,
        targets=[
            fleet.iot.describe_thing_group(thingGroupName="bad-all")["thingGroupArn"]
        ],
        document=json.dumps(doc),
        presignedUrlConfig={"roleArn": fleet.role_arn, "expiresInSec": 600},
    )
    return job_id


def _key_of(url: str) -> str:
    # ${aws:iot:s3-presigned-url:https://s3.REGION.amazonaws.com/BUCKET/KEY}
    return url.rstrip("}").split(f"/{BUCKET}/", 1)[1]


def case_corrupt_file(fleet: Fleet, tmp: Path) -> tuple[str, str]:
    """A truncated .tflite, signed as if it were fine: the interpreter refuses."""
    model, manifest = write_model(tmp, GOOD_MODEL.read_bytes()[:1500], version="9.0.1")
    return fleet.push(model, manifest, "bad-all"), "load_failed"


def case_wrong_hash(fleet: Fleet, tmp: Path) -> tuple[str, str]:
    """The S3 object is replaced by other bytes of the same size."""
    model, manifest = write_model(tmp, GOOD_MODEL.read_bytes(), version="9.0.2")
    doc = _staged(fleet, model, manifest)
    flipped = bytearray(GOOD_MODEL.read_bytes())
    flipped[-100] ^= 0xFF
    key = _key_of(doc["download"]["model"]["url"])
    fleet.s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(flipped))
    return _job_for_bad_all(fleet, doc, "hash"), "sha256_mismatch"


def case_bad_signature(fleet: Fleet, tmp: Path) -> tuple[str, str]:
    """A manifest changed after signing (alert threshold raised, same size);
    the document's unsigned manifest digest is updated to match."""
    model, manifest = write_model(tmp, GOOD_MODEL.read_bytes(), version="9.0.3")
    doc = _staged(fleet, model, manifest)
    key = _key_of(doc["download"]["manifest"]["url"])
    text = fleet.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    forged = text.replace(b'"alert": 0.', b'"alert": 9.', 1)
    assert forged != text and len(forged) == len(text)
    fleet.s3.put_object(Bucket=BUCKET, Key=key, Body=forged)
    doc["manifest"]["sha256"] = hashlib.sha256(forged).hexdigest()
    return _job_for_bad_all(fleet, doc, "sig"), "bad_signature"


def case_untrusted_key(fleet: Fleet, tmp: Path) -> tuple[str, str]:
    """Signed by a key the relays do not hold."""
    model, manifest = write_model(tmp, GOOD_MODEL.read_bytes(), version="9.0.4")
    other = tmp / "other.pem"
    fleet.cli("keygen", "--private", str(other), "--public", str(tmp / "other.pub"))
    job = fleet.cli(
        "push",
        str(model),
        str(manifest),
        "--group",
        "bad-all",
        "--bucket",
        BUCKET,
        "--key",
        str(other),
        "--presign-role-arn",
        fleet.role_arn,
    ).splitlines()[-1]
    return job, "untrusted_key"


def case_other_feature_spec(fleet: Fleet, tmp: Path) -> tuple[str, str]:
    """A correctly signed model trained on feature spec 2."""
    model, manifest = write_model(
        tmp, GOOD_MODEL.read_bytes(), version="9.0.5", feature_spec_version=2
    )
    return fleet.push(model, manifest, "bad-all"), "spec_mismatch"


def case_nan_model(fleet: Fleet, tmp: Path) -> tuple[str, str]:
    """A correctly signed model whose every output is NaN."""
    nan = json.loads((NAN_DIR / "nan-model.manifest.json").read_text())
    return (
        fleet.push(
            NAN_DIR / nan["model_file"], NAN_DIR / "nan-model.manifest.json", "bad-all"
        ),
        "non_finite_output",
    )


@pytest.mark.parametrize(
    "case",
    [
        case_corrupt_file,
        case_wrong_hash,
        case_bad_signature,
        case_untrusted_key,
        case_other_feature_spec,
        case_nan_model,
    ],
    ids=lambda c: c.__name__[5:],
)
def test_bad_model_fails_the_execution_and_v1_keeps_scoring(
    fleet: Fleet,
    bad_fleet: list[RelayThread],
    tmp_path: Path,
    real_records: np.ndarray,
    case: Callable[[Fleet, Path], tuple[str, str]],
) -> None:
    """Each broken model is refused by every relay: execution FAILED with the
    reason of the defect and the running version 1.0.0 in statusDetails,
    nothing installed, and the filter still scoring with v1."""
    job, reason = case(fleet, tmp_path)
    for relay in bad_fleet:
        thing = relay.config.thing_name
        execution = fleet.wait_status(job, thing, {"SUCCEEDED", "FAILED"})
        details = execution["statusDetails"]["detailsMap"]
        assert execution["status"] == "FAILED", details
        assert details["reason"] == reason, details
        assert details["running_version"] == "1.0.0"
        assert relay.scored_version(real_records) == version_of(V1)
        assert current_version(relay.config.models_dir.parent / "relay.json") == "1.0.0"
        assert [p.name for p in (relay.config.models_dir / "versions").iterdir()] == [
            st.entry_name(V1["name"], V1["version"], V1["sha256"])
        ]
        assert relay.runner.counters.failures[reason] >= 1


# -- a relay killed mid-update ------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "runs_after_kill"),
    [("download", "1.0.0"), ("before-pointer", "1.0.0"), ("after-pointer", "1.1.0")],
)
def test_relay_killed_mid_update_recovers_consistently(
    fleet: Fleet, tmp_path: Path, point: str, runs_after_kill: str
) -> None:
    """A relay process SIGKILLed half-way through a download, after the new
    version was verified and renamed in, or after ``current`` moved, always
    has an intact model on disk (v1, or v2 once the pointer moved); restarted,
    it finishes the same execution: SUCCEEDED, v2 current, v1 kept as
    previous, no state file and no partial download left."""
    thing = f"kill-{point}"
    config = fleet.relay(thing, (f"grp-{thing}",))
    models = config.parent / "models"
    model, manifest = write_model(
        tmp_path / "v2", GOOD_MODEL.read_bytes(), version="1.1.0"
    )
    relay = RelayProcess(config, pause_at=point)
    try:
        job = fleet.push(model, manifest, f"grp-{thing}")
        wait_until(
            (models / f"paused-at-{point}").exists, f"the relay to pause at {point}"
        )
        relay.kill()
    finally:
        relay.stop()
    state = json.loads((models / "state.json").read_text())
    assert state["job_id"] == job
    assert current_version(config) == runs_after_kill
    if point == "download":
        partial = [f for d in (models / "tmp").iterdir() for f in d.iterdir()]
        model_parts = [f for f in partial if f.suffix == ".tflite"]
        assert (
            model_parts
            and 0 < model_parts[0].stat().st_size < GOOD_MODEL.stat().st_size
        )
    assert fleet.execution(job, thing)["status"] == "IN_PROGRESS"

    relay = RelayProcess(config)
    try:
        execution = fleet.wait_status(job, thing, {"SUCCEEDED", "FAILED"})
    finally:
        relay.stop()
    details = execution["statusDetails"]["detailsMap"]
    assert execution["status"] == "SUCCEEDED", details
    assert details["running_version"] == "1.1.0"
    assert details["attempts"] == ("2" if point == "download" else "1")
    assert current_version(config) == "1.1.0"
    previous = (models / "previous").read_text().strip()
    assert previous == st.entry_name(V1["name"], V1["version"], V1["sha256"])
    assert (models / "versions" / previous / GOOD_MODEL.name).read_bytes() == (
        GOOD_MODEL.read_bytes()
    )
    assert not (models / "state.json").exists()
    assert list((models / "tmp").iterdir()) == []


def test_job_canceled_while_relay_was_down_puts_the_old_model_back(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A relay killed right after moving ``current`` to v2, whose job is then
    force-canceled by the operator, returns to v1 when it restarts, so what
    runs matches the CANCELED execution."""
    thing = "kill-then-cancel"
    config = fleet.relay(thing, ("grp-kill-then-cancel",))
    models = config.parent / "models"
    model, manifest = write_model(
        tmp_path / "v2", GOOD_MODEL.read_bytes(), version="1.1.0"
    )
    relay = RelayProcess(config, pause_at="after-pointer")
    try:
        job = fleet.push(model, manifest, "grp-kill-then-cancel")
        wait_until((models / "paused-at-after-pointer").exists, "the relay to pause")
        relay.kill()
    finally:
        relay.stop()
    assert current_version(config) == "1.1.0"
    fleet.cli("cancel", job, "--force")
    assert fleet.execution(job, thing)["status"] == "CANCELED"
    relay = RelayProcess(config)
    try:
        wait_until(lambda: not (models / "state.json").exists(), "the relay to settle")
    finally:
        relay.stop()
    assert current_version(config) == "1.0.0"
    assert fleet.execution(job, thing)["status"] == "CANCELED"


# -- abort threshold, offline relays, rollback ----------------------------------------


def test_abort_threshold_stops_a_bad_rollout(
    fleet: Fleet, real_records: np.ndarray
) -> None:
    """With abort at 50% FAILED after 2 finished executions, the NaN model
    fails on the two relays online; the job is canceled by its abortConfig,
    the third relay's queued execution is CANCELED and, once it comes online,
    it never starts the job and keeps scoring with v1."""
    configs = [fleet.relay(f"abort-{i}", ("abort-all",)) for i in (1, 2, 3)]
    nan_manifest = NAN_DIR / "nan-model.manifest.json"
    nan_model = NAN_DIR / json.loads(nan_manifest.read_text())["model_file"]
    with RelayThread(configs[0]) as r1, RelayThread(configs[1]) as r2:
        job = fleet.push(
            nan_model,
            nan_manifest,
            "abort-all",
            "--abort-percent",
            "50",
            "--abort-min",
            "2",
        )
        for relay in (r1, r2):
            execution = fleet.wait_status(
                job, relay.config.thing_name, {"FAILED", "SUCCEEDED"}
            )
            assert execution["status"] == "FAILED"
    described = wait_until(
        lambda: (
            (j := fleet.iot.describe_job(jobId=job)["job"])["status"] == "CANCELED"
            and j
        ),
        "the abort to cancel the job",
    )
    assert described["reasonCode"] == "ABORT_CANCEL"
    assert fleet.execution(job, "abort-3")["status"] == "CANCELED"
    with RelayThread(configs[2]) as r3:
        wait_until(lambda: r3.agent.idle_cycles >= 1, "abort-3 to ask for work")
        assert r3.agent.cycles == 0
        assert r3.scored_version(real_records) == version_of(V1)
    assert fleet.execution(job, "abort-3")["status"] == "CANCELED"
    assert current_version(configs[2]) == "1.0.0"


class TcpProxy:
    """A TCP forwarder to the broker that can go down and come back up.

    Down: the listening socket and every forwarded connection are closed,
    so the relay sees its connection drop and reconnects are refused.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def come_up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def go_down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            # shutdown wakes the thread blocked in accept(); close alone
            # would leave the port bound until it returns.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by go_down
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_update_published_while_relay_is_offline_is_taken_on_reconnect(
    fleet: Fleet, tmp_path: Path, real_records: np.ndarray
) -> None:
    """The broker link drops; a job created meanwhile stays QUEUED; when the
    link is back the relay reconnects on its own (backoff 1-2 s), takes the
    missed job and installs v2."""
    proxy = TcpProxy(fleet.server.mqtt_port)
    proxy.come_up()
    config = fleet.relay("offline-1", ("grp-offline",), port=proxy.port)
    model, manifest = write_model(
        tmp_path / "v2", GOOD_MODEL.read_bytes(), version="1.1.0"
    )
    try:
        with RelayThread(config) as relay:
            proxy.go_down()
            wait_until(lambda: not relay.agent.connected, "the relay to notice")
            job = fleet.push(model, manifest, "grp-offline")
            assert fleet.execution(job, "offline-1")["status"] == "QUEUED"
            assert relay.scored_version(real_records) == version_of(V1)
            proxy.come_up()
            execution = fleet.wait_status(job, "offline-1", {"SUCCEEDED", "FAILED"})
            assert execution["status"] == "SUCCEEDED"
            assert relay.agent.counters.reconnects >= 1
            v2 = json.loads(manifest.read_text())
            assert relay.scored_version(real_records) == version_of(v2)
    finally:
        proxy.go_down()


def test_rollback_reinstalls_the_previous_version_from_disk(
    fleet: Fleet, tmp_path: Path, real_records: np.ndarray
) -> None:
    """After v1 then v2 were rolled out through jobs, ``models rollback``
    cancels nothing finished, creates a job with v1's document, and the relay
    goes back to v1 (the folder it kept), reporting version 1.0.0."""
    config = fleet.relay("rb-1", ("grp-rb",))
    model, manifest = write_model(
        tmp_path / "v2", GOOD_MODEL.read_bytes(), version="1.1.0"
    )
    with RelayThread(config) as relay:
        job1 = fleet.push(GOOD_MODEL, GOOD_MANIFEST, "grp-rb")
        assert fleet.wait_status(job1, "rb-1", {"SUCCEEDED", "FAILED"})["status"] == (
            "SUCCEEDED"
        )
        job2 = fleet.push(model, manifest, "grp-rb")
        assert fleet.wait_status(job2, "rb-1", {"SUCCEEDED", "FAILED"})["status"] == (
            "SUCCEEDED"
        )
        assert current_version(config) == "1.1.0"
        line = fleet.cli("rollback", "--group", "grp-rb").splitlines()[-1]
        job3, version = line.split()[0], line.split()[-1].rstrip(")")
        assert version == "1.0.0"
        doc1 = json.loads(fleet.iot.get_job_document(jobId=job1)["document"])
        doc3 = json.loads(fleet.iot.get_job_document(jobId=job3)["document"])
        assert doc3 == doc1
        execution = fleet.wait_status(job3, "rb-1", {"SUCCEEDED", "FAILED"})
        assert execution["status"] == "SUCCEEDED"
        assert execution["statusDetails"]["detailsMap"]["running_version"] == "1.0.0"
        assert current_version(config) == "1.0.0"
        assert relay.scored_version(real_records) == version_of(V1)


@pytest.mark.slow
def test_per_relay_timeout_times_out_a_stuck_install(
    fleet: Fleet, tmp_path: Path
) -> None:
    """With --timeout-minutes 1, a relay stuck mid-download (and then killed)
    has its execution TIMED_OUT by the server; restarted, the relay settles
    the timed-out job and keeps running v1."""
    thing = "timeout-1"
    config = fleet.relay(thing, ("grp-timeout",))
    models = config.parent / "models"
    model, manifest = write_model(
        tmp_path / "v2", GOOD_MODEL.read_bytes(), version="1.1.0"
    )
    relay = RelayProcess(config, pause_at="download")
    try:
        job = fleet.push(model, manifest, "grp-timeout", "--timeout-minutes", "1")
        wait_until((models / "paused-at-download").exists, "the relay to stall")
        # The server turns IN_PROGRESS into TIMED_OUT after the minute.
        fleet.wait_status(job, thing, {"TIMED_OUT"})
        relay.kill()
    finally:
        relay.stop()
    relay = RelayProcess(config)
    try:
        wait_until(lambda: not (models / "state.json").exists(), "the relay to settle")
    finally:
        relay.stop()
    assert current_version(config) == "1.0.0"
    assert fleet.execution(job, thing)["status"] == "TIMED_OUT"


def test_restart_after_an_accepted_report_keeps_the_new_model(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A relay that stopped after its SUCCEEDED report was accepted but before
    it forgot the update (its state file still says installed) learns on
    restart that the job succeeded (the device plane only says "terminal";
    the rejected re-report carries the status) and keeps v2."""
    config = fleet.relay("reported-1", ("grp-reported",))
    models = config.parent / "models"
    model, manifest = write_model(
        tmp_path / "v2", GOOD_MODEL.read_bytes(), version="1.1.0"
    )
    with RelayThread(config) as relay:
        job = fleet.push(model, manifest, "grp-reported")
        assert fleet.wait_status(job, "reported-1", {"SUCCEEDED", "FAILED"})[
            "status"
        ] == ("SUCCEEDED")
        target = relay.store.current_entry()
        previous = relay.store.previous_entry()
    state = st.UpdateState(job, 1, st.INSTALLED, target=target, previous=previous)
    st.ModelStore(models).write_state(state)
    with RelayThread(config) as relay:
        wait_until(lambda: not (models / "state.json").exists(), "the relay to settle")
        assert relay.runner.counters.rolled_back == 0
    assert current_version(config) == "1.1.0"
    assert fleet.execution(job, "reported-1")["status"] == "SUCCEEDED"


def test_a_job_that_is_not_a_model_install_is_rejected(
    fleet: Fleet, bad_fleet: list[RelayThread]
) -> None:
    """A job document of another kind is REJECTED (reason not_a_model_job)
    instead of blocking the relay's queue."""
    job_id = f"other-{time.monotonic_ns() % 10**9}"
    fleet.iot.create_job(
        jobId=job_id,
        targets=[
            fleet.iot.describe_thing_group(thingGroupName="bad-all")["thingGroupArn"]
        ],
        document=json.dumps({"operation": "reboot"}),
    )
    for relay in bad_fleet:
        execution = fleet.wait_status(
            job_id, relay.config.thing_name, {"REJECTED", "FAILED"}
        )
        assert execution["status"] == "REJECTED"
        assert execution["statusDetails"]["detailsMap"]["reason"] == "not_a_model_job"
        assert current_version(relay.config.models_dir.parent / "relay.json") == "1.0.0"
