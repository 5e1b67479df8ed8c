"""The operator's ``sampleflow models keygen|push|status|cancel|rollback``.

Integration tests run the command line against MiniStack (S3 and the AWS
IoT control plane over HTTP, the session's server from tests/servers.py).
Where a test needs a relay's answer it plays the device through the real
``iot-jobs-data`` HTTP API.  Expected values are computed in the tests
(hashlib digests, signatures checked with ``cryptography``, the rollout
dictionaries written out by hand from the AWS API reference).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import stat
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from cloud.operator.ops import job_id_for
from cloud.operator.rollout import RolloutSettings, RolloutSettingsError
from edge_agent.cli import main as sampleflow
from tests.servers import DUMMY_AWS_ENV, MiniStack

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "relay-ctu13s6-r100-w300.tflite"
MANIFEST = ROOT / "models" / "relay-ctu13s6-r100-w300.manifest.json"
REGION = "us-east-1"
ROLE_ARN = "arn:aws:iam::000000000000:role/sampleflow-presign"


def run(*args: str) -> tuple[int, str, str]:
    """``sampleflow ARGS`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sampleflow(list(args))
    return code, out.getvalue(), err.getvalue()


def client(server: MiniStack, service: str) -> Any:
    return boto3.session.Session(
        aws_access_key_id=DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
    ).client(service, endpoint_url=server.endpoint_url)


# -- pure logic ------------------------------------------------------------------


def test_job_ids_fit_the_aws_pattern() -> None:
    """Job ids stay within [a-zA-Z0-9_-]{1,64} even for long names and dots."""
    job_id = job_id_for("relay-" + "x" * 80, "1.2.3+build.7", now=0)
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", job_id)
    assert job_id.startswith("sfmodel-relay-xxx")
    assert "-19700101T000000-" in job_id


def test_rollout_settings_map_to_the_create_job_shapes() -> None:
    """Constant and exponential rates, abort and timeout become the CreateJob
    members of the AWS API reference, written out here by hand."""
    settings = RolloutSettings(
        max_per_minute=50,
        base_per_minute=2,
        increment_factor=1.5,
        step_things=3,
        step_on="notified",
        abort_percent=25,
        abort_min_executed=4,
        abort_on="ALL",
        timeout_minutes=30,
    )
    assert settings.create_job_arguments() == {
        "jobExecutionsRolloutConfig": {
            "maximumPerMinute": 50,
            "exponentialRate": {
                "baseRatePerMinute": 2,
                "incrementFactor": 1.5,
                "rateIncreaseCriteria": {"numberOfNotifiedThings": 3},
            },
        },
        "abortConfig": {
            "criteriaList": [
                {
                    "failureType": "ALL",
                    "action": "CANCEL",
                    "thresholdPercentage": 25.0,
                    "minNumberOfExecutedThings": 4,
                }
            ]
        },
        "timeoutConfig": {"inProgressTimeoutInMinutes": 30},
    }
    assert RolloutSettings().create_job_arguments() == {}


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_per_minute": 0}, "max_per_minute"),
        ({"base_per_minute": 2}, "base_per_minute"),
        (
            {"base_per_minute": 2, "increment_factor": 9.0, "step_things": 1},
            "increment_factor",
        ),
        ({"abort_percent": 120}, "abort_percent"),
        ({"abort_on": "SOMETIMES"}, "abort_on"),
        ({"timeout_minutes": 0}, "timeout_minutes"),
    ],
)
def test_rollout_settings_name_the_bad_key(kwargs: dict[str, Any], key: str) -> None:
    """Out-of-range rollout settings raise an error naming the setting."""
    with pytest.raises(RolloutSettingsError) as info:
        RolloutSettings(**kwargs)
    assert info.value.key == key
    assert key in str(info.value)


def test_keygen_writes_a_private_key_only_the_owner_reads(tmp_path: Path) -> None:
    """keygen writes PEM files whose pair signs and verifies, the private one
    mode 0600, prints the key id (sha256 of the raw public key, 16 hex), and
    refuses to overwrite an existing key."""
    private, public = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    code, out, _ = run(
        "models", "keygen", "--private", str(private), "--public", str(public)
    )
    assert code == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    pub = serialization.load_pem_public_key(public.read_bytes())
    assert isinstance(pub, Ed25519PublicKey)
    assert isinstance(key, Ed25519PrivateKey)
    pub.verify(key.sign(b"abc"), b"abc")
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert hashlib.sha256(raw).hexdigest()[:16] in out
    before = private.read_bytes()
    code, _, err = run(
        "models", "keygen", "--private", str(private), "--public", str(public)
    )
    assert code == 1 and "refusing to overwrite" in err
    assert private.read_bytes() == before


def test_keygen_into_a_missing_folder_writes_nothing(tmp_path: Path) -> None:
    """keygen whose public key's folder does not exist exits 1 naming that
    folder, and leaves no private key behind (no half pair)."""
    private = tmp_path / "k.pem"
    code, _, err = run(
        "models",
        "keygen",
        "--private",
        str(private),
        "--public",
        str(tmp_path / "missing" / "k.pub.pem"),
    )
    assert code == 1
    assert err.startswith("sampleflow models keygen: error: ")
    assert f"folder {tmp_path / 'missing'} does not exist" in err
    assert not private.exists()


def test_push_names_a_missing_model_before_the_presign_role(tmp_path: Path) -> None:
    """push of a model file that does not exist, without --presign-role-arn,
    names the missing file (not the role) and exits 1."""
    missing = tmp_path / "none.tflite"
    code, _, err = run(
        "models",
        "push",
        str(missing),
        str(MANIFEST),
        "--group",
        "g",
        "--bucket",
        "b",
        "--key",
        str(tmp_path / "k.pem"),
        "--endpoint-url",
        "http://127.0.0.1:1",
    )
    assert code == 1
    assert f"no model file {missing}" in err
    assert "presign" not in err


@pytest.mark.parametrize(
    "action", [["status", "j"], ["cancel", "j"], ["rollback", "--group", "g"]]
)
def test_unreachable_endpoint_is_one_line_naming_the_url(
    action: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """status, cancel and rollback against a closed port (127.0.0.1:1) exit
    1 with one line naming the endpoint URL, no traceback."""
    for name, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    code, _, err = run(
        "models", *action, "--endpoint-url", "http://127.0.0.1:1", "--region", REGION
    )
    assert code == 1
    assert err.startswith(f"sampleflow models {action[0]}: error: ")
    assert "http://127.0.0.1:1/" in err
    assert "Traceback" not in err and err.count("\n") == 1


# -- against MiniStack ----------------------------------------------------------


@pytest.fixture
def setup(ministack: MiniStack, tmp_path: Path) -> dict[str, Any]:
    """A bucket, a thing group with two things, a signing key pair."""
    tag = uuid.uuid4().hex[:8]
    iot, s3 = client(ministack, "iot"), client(ministack, "s3")
    bucket, group = f"models-{tag}", f"tenant-{tag}"
    s3.create_bucket(Bucket=bucket)
    arn = iot.create_thing_group(thingGroupName=group)["thingGroupArn"]
    things = [f"relay-{tag}-{i}" for i in (1, 2)]
    for thing in things:
        iot.create_thing(thingName=thing)
        iot.add_thing_to_thing_group(thingGroupName=group, thingName=thing)
    private, public = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    assert (
        run("models", "keygen", "--private", str(private), "--public", str(public))[0]
        == 0
    )
    return {
        "iot": iot,
        "s3": s3,
        "jobs_data": client(ministack, "iot-jobs-data"),
        "bucket": bucket,
        "group": group,
        "group_arn": arn,
        "things": things,
        "private": private,
        "public": public,
        "aws": ["--endpoint-url", ministack.endpoint_url, "--region", REGION],
    }


def push(
    s: dict[str, Any], model: Path, manifest: Path, *extra: str
) -> tuple[int, str, str]:
    return run(
        "models",
        "push",
        str(model),
        str(manifest),
        "--group",
        s["group"],
        "--bucket",
        s["bucket"],
        "--key",
        str(s["private"]),
        "--presign-role-arn",
        ROLE_ARN,
        *extra,
        *s["aws"],
    )


@pytest.mark.integration
def test_push_uploads_signs_and_creates_the_job(setup: dict[str, Any]) -> None:
    """push stores the exact model and manifest bytes in S3, signs the
    manifest bytes (the signature verifies with the public key), and creates
    a job for the thing group whose document and rollout settings are the
    ones asked for."""
    s = setup
    code, out, err = push(
        s,
        MODEL,
        MANIFEST,
        "--max-per-minute",
        "7",
        "--abort-percent",
        "25",
        "--abort-min",
        "4",
        "--abort-on",
        "ALL",
        "--timeout-minutes",
        "30",
        "--url-expiry",
        "900",
    )
    assert code == 0, err
    job_id = out.strip().splitlines()[-1]
    manifest_bytes, model_bytes = MANIFEST.read_bytes(), MODEL.read_bytes()
    meta = json.loads(manifest_bytes)
    base = f"models/{meta['name']}/{meta['version']}/{meta['sha256'][:12]}"
    get = s["s3"].get_object
    assert (
        get(Bucket=s["bucket"], Key=f"{base}/{MODEL.name}")["Body"].read()
        == model_bytes
    )
    assert get(Bucket=s["bucket"], Key=f"{base}/manifest.json")["Body"].read() == (
        manifest_bytes
    )
    doc = json.loads(s["iot"].get_job_document(jobId=job_id)["document"])
    pub = serialization.load_pem_public_key(s["public"].read_bytes())
    assert isinstance(pub, Ed25519PublicKey)
    pub.verify(base64.b64decode(doc["signature"]), manifest_bytes)
    sig_file = get(Bucket=s["bucket"], Key=f"{base}/manifest.json.sig")["Body"].read()
    assert sig_file.decode().strip() == doc["signature"]
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    url = f"https://s3.{REGION}.amazonaws.com/{s['bucket']}/{base}"
    assert doc == {
        "operation": "sampleflow.install-model",
        "format": 1,
        "model": meta["name"],
        "version": meta["version"],
        "sha256": hashlib.sha256(model_bytes).hexdigest(),
        "size": len(model_bytes),
        "manifest": {
            "sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "size": len(manifest_bytes),
        },
        "signature": doc["signature"],
        "key_id": hashlib.sha256(raw).hexdigest()[:16],
        "download": {
            "model": {"url": f"${{aws:iot:s3-presigned-url:{url}/{MODEL.name}}}"},
            "manifest": {"url": f"${{aws:iot:s3-presigned-url:{url}/manifest.json}}"},
        },
    }
    job = s["iot"].describe_job(jobId=job_id)["job"]
    assert job["targets"] == [s["group_arn"]]
    assert job["targetSelection"] == "SNAPSHOT"
    assert job["presignedUrlConfig"] == {"roleArn": ROLE_ARN, "expiresInSec": 900}
    assert job["jobExecutionsRolloutConfig"] == {"maximumPerMinute": 7}
    assert job["abortConfig"] == {
        "criteriaList": [
            {
                "failureType": "ALL",
                "action": "CANCEL",
                "thresholdPercentage": 25.0,
                "minNumberOfExecutedThings": 4,
            }
        ]
    }
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 30}


@pytest.mark.integration
def test_push_s3_direct_names_bucket_and_key(setup: dict[str, Any]) -> None:
    """--s3-direct puts bucket and key in the document and asks for no
    presigned URLs; --continuous makes the job follow group membership."""
    code, out, err = push(setup, MODEL, MANIFEST, "--s3-direct", "--continuous")
    assert code == 0, err
    job_id = out.strip().splitlines()[-1]
    doc = json.loads(setup["iot"].get_job_document(jobId=job_id)["document"])
    assert doc["download"]["model"]["s3"]["bucket"] == setup["bucket"]
    assert doc["download"]["model"]["s3"]["key"].endswith(f"/{MODEL.name}")
    job = setup["iot"].describe_job(jobId=job_id)["job"]
    assert job["targetSelection"] == "CONTINUOUS"
    assert not job.get("presignedUrlConfig")


@pytest.mark.integration
def test_push_refuses_a_model_that_is_not_the_manifests(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    """A model file whose bytes differ from what its manifest says is refused
    with a message naming both digests, and no job is created."""
    other = tmp_path / MODEL.name
    other.write_bytes(MODEL.read_bytes()[:-1] + b"\x00")
    before = {j["jobId"] for j in setup["iot"].list_jobs()["jobs"]}
    code, _, err = push(setup, other, MANIFEST)
    assert code == 1
    assert "the manifest says" in err and "sha256" in err
    assert {j["jobId"] for j in setup["iot"].list_jobs()["jobs"]} == before


@pytest.mark.integration
def test_push_to_a_missing_group_is_a_clear_error(setup: dict[str, Any]) -> None:
    """A thing group that does not exist is named in the error."""
    code, _, err = run(
        "models",
        "push",
        str(MODEL),
        str(MANIFEST),
        "--group",
        "no-such-group",
        "--bucket",
        setup["bucket"],
        "--key",
        str(setup["private"]),
        "--presign-role-arn",
        ROLE_ARN,
        *setup["aws"],
    )
    assert code == 1 and "no-such-group" in err


@pytest.mark.integration
def test_status_lists_each_relays_state_and_reported_version(
    setup: dict[str, Any],
) -> None:
    """status shows, per relay, the execution state and the version the relay
    reported in statusDetails; here one relay (played through the
    iot-jobs-data API) succeeded and the other is still queued."""
    s = setup
    code, out, _ = push(s, MODEL, MANIFEST)
    job_id = out.strip().splitlines()[-1]
    first, second = s["things"]
    started = s["jobs_data"].start_next_pending_job_execution(thingName=first)
    assert started["execution"]["jobId"] == job_id
    s["jobs_data"].update_job_execution(
        jobId=job_id,
        thingName=first,
        status="SUCCEEDED",
        statusDetails={"running_version": "1.0.0", "running_model": "m"},
    )
    code, out, _ = run("models", "status", job_id, "--json", *s["aws"])
    assert code == 0
    status = json.loads(out[out.index("{") :])
    rows = {e["thing"]: e for e in status["executions"]}
    assert rows[first]["status"] == "SUCCEEDED"
    assert rows[first]["running_version"] == "1.0.0"
    assert rows[second]["status"] == "QUEUED"
    assert "running_version" not in rows[second]
    code, text, _ = run("models", "status", job_id, *s["aws"])
    assert code == 0
    line = next(ln for ln in text.splitlines() if first in ln)
    assert line.split()[1:3] == ["SUCCEEDED", "1.0.0"]


@pytest.mark.integration
def test_cancel_stops_queued_executions(setup: dict[str, Any]) -> None:
    """cancel turns the job CANCELED and its queued executions CANCELED; an
    IN_PROGRESS one only goes with --force."""
    s = setup
    _, out, _ = push(s, MODEL, MANIFEST)
    job_id = out.strip().splitlines()[-1]
    first, second = s["things"]
    s["jobs_data"].start_next_pending_job_execution(thingName=first)
    code, _, err = run("models", "cancel", job_id, "--comment", "bad idea", *s["aws"])
    assert code == 0, err
    assert s["iot"].describe_job(jobId=job_id)["job"]["status"] == "CANCELED"
    describe = s["iot"].describe_job_execution
    assert describe(jobId=job_id, thingName=second)["execution"]["status"] == "CANCELED"
    assert (
        describe(jobId=job_id, thingName=first)["execution"]["status"] == "IN_PROGRESS"
    )

    _, out, _ = push(s, MODEL, MANIFEST)
    job2 = out.strip().splitlines()[-1]
    s["jobs_data"].start_next_pending_job_execution(thingName=second)
    code, _, _ = run("models", "cancel", job2, "--force", *s["aws"])
    assert code == 0
    assert describe(jobId=job2, thingName=second)["execution"]["status"] == "CANCELED"


@pytest.mark.integration
def test_rollback_needs_an_earlier_installed_version(setup: dict[str, Any]) -> None:
    """With only one version ever pushed (and none succeeded) rollback says
    there is nothing to go back to; --to-version of an unknown version too."""
    s = setup
    push(s, MODEL, MANIFEST)
    code, _, err = run("models", "rollback", "--group", s["group"], *s["aws"])
    assert code == 1 and "no earlier model job" in err
    code, _, err = run(
        "models", "rollback", "--group", s["group"], "--to-version", "0.0.1", *s["aws"]
    )
    assert code == 1 and "0.0.1" in err
