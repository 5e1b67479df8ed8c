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
        wait_until(self.agent._connected.is_set, f"{self.config.thing_name} to connect")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.agent._wake.set()
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
