"""The relay's install path without a broker: documents, keys, store, runner.

Downloads go over real sockets to a loopback HTTP server (and to
MiniStack's S3 for the ``s3`` source); models are the shipped relay model
and the NaN test model, loaded by the real filter.  Job documents and
signatures are built here by hand with ``cryptography``, not by the
operator code, and expected outcomes follow from how each case was built.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.training import ctu13
from edge_agent.filter import RelayFilter
from edge_agent.modelsync import store as st
from edge_agent.modelsync.config import ModelSyncConfig, ModelSyncConfigError
from edge_agent.modelsync.document import parse_document
from edge_agent.modelsync.errors import ModelRejectedError
from edge_agent.modelsync.installer import (
    CanaryPolicy,
    FilterInstaller,
    load_fresh,
    rows_from_npz,
    run_canary,
)
from edge_agent.modelsync.runner import FAILED, SUCCEEDED, UpdateRunner
from edge_agent.modelsync.verify import key_id, trusted_keys, verify_signature
from tests.servers import DUMMY_AWS_ENV, MiniStack

ROOT = Path(__file__).resolve().parents[1]
GOOD_MODEL = ROOT / "models" / "relay-ctu13s6-r100-w300.tflite"
GOOD_MANIFEST = ROOT / "models" / "relay-ctu13s6-r100-w300.manifest.json"
NAN_MANIFEST = ROOT / "tests" / "data" / "nan-model" / "nan-model.manifest.json"
CANARY_ROWS = ROOT / "tests" / "data" / "modelsync" / "canary_rows.npz"
V1 = json.loads(GOOD_MANIFEST.read_text())


# -- helpers ---------------------------------------------------------------------


@dataclasses.dataclass
class Signer:
    key: Ed25519PrivateKey
    public_path: Path

    @property
    def key_id(self) -> str:
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return hashlib.sha256(raw).hexdigest()[:16]

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.key.sign(data)).decode()


def make_signer(path: Path) -> Signer:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Signer(key, path)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return make_signer(tmp_path / "trusted.pub.pem")


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server for a folder: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def publish(
    web: tuple[Path, str],
    signer: Signer,
    model_bytes: bytes,
    name: str = "v2",
    **manifest_changes: Any,
) -> dict[str, Any]:
    """Serve a model + manifest over HTTP; return a signed job document."""
    root, base = web
    manifest = {**V1, **manifest_changes}
    manifest["sha256"] = hashlib.sha256(model_bytes).hexdigest()
    manifest["bytes"] = len(model_bytes)
    manifest_bytes = json.dumps(manifest).encode()
    (root / f"{name}.tflite").write_bytes(model_bytes)
    (root / f"{name}.json").write_bytes(manifest_bytes)
    return {
        "operation": "sampleflow.install-model",
        "format": 1,
        "model": manifest["name"],
        "version": manifest["version"],
        "sha256": manifest["sha256"],
        "size": manifest["bytes"],
        "manifest": {
            "sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "size": len(manifest_bytes),
        },
        "signature": signer.sign(manifest_bytes),
        "key_id": signer.key_id,
        "download": {
            "model": {"url": f"{base}/{name}.tflite"},
            "manifest": {"url": f"{base}/{name}.json"},
        },
    }


@dataclasses.dataclass
class Relay:
    config: ModelSyncConfig
    store: st.ModelStore
    filter: RelayFilter
    runner: UpdateRunner


def make_relay(tmp_path: Path, signer: Signer, **config: Any) -> Relay:
    """A relay's store seeded with v1 (as install-local does), and a runner."""
    settings = {
        "thing_name": "relay-test",
        "endpoint": "127.0.0.1",
        "cert_path": "c.pem",
        "key_path": "k.pem",
        "ca_path": "ca.pem",
        "models_dir": "models",
        "public_keys": [str(signer.public_path)],
        **config,
    }
    cfg = ModelSyncConfig.from_mapping(settings, base_dir=tmp_path)
    store = st.ModelStore(cfg.models_dir)
    staged = store.new_tmp()
    (staged / GOOD_MODEL.name).write_bytes(GOOD_MODEL.read_bytes())
    (staged / st.MANIFEST_FILE).write_bytes(GOOD_MANIFEST.read_bytes())
    v1 = st.entry_name(V1["name"], V1["version"], V1["sha256"])
    store.commit(staged, v1)
    store.set_current(v1)
    relay_filter = RelayFilter(ctu13.INTERNAL_NETWORKS)
    installer = FilterInstaller(relay_filter, lambda: rows_from_npz(CANARY_ROWS))
    runner = UpdateRunner(cfg, store, installer, trusted_keys(cfg.public_keys))
    runner.start()
    return Relay(cfg, store, relay_filter, runner)


def filter_version(manifest: dict[str, Any]) -> str:
    return f"{manifest['name']}:{manifest['version']}:{manifest['sha256'][:12]}"


# -- documents, config, keys -------------------------------------------------------


def test_document_round_trips_and_bad_ones_name_the_key(
    web: tuple[Path, str], signer: Signer
) -> None:
    """A well-formed document parses back to the same dict; a bad size, a bad
    digest, a missing download and an unreplaced presigned-URL placeholder
    are bad_document errors naming what is wrong."""
    doc = publish(web, signer, GOOD_MODEL.read_bytes())
    assert parse_document(doc).to_dict() == doc
    cases: list[tuple[dict[str, Any], str]] = [
        ({"size": 0}, "size"),
        ({"sha256": "xyz"}, "sha256"),
        ({"download": {"model": {}, "manifest": {}}}, "download.model"),
        ({"format": 2}, "format"),
        (
            {
                "download": {
                    "model": {"url": "${aws:iot:s3-presigned-url:https://s3/x/y}"},
                    "manifest": doc["download"]["manifest"],
                }
            },
            "presignedUrlConfig",
        ),
    ]
    for change, word in cases:
        with pytest.raises(ModelRejectedError) as info:
            parse_document({**doc, **change})
        assert info.value.reason == "bad_document"
        assert word in info.value.detail


def test_config_resolves_paths_and_names_bad_keys(tmp_path: Path) -> None:
    """Relative paths resolve against the config file's folder; an unknown
    key and a bad port are errors naming the key."""
    path = tmp_path / "relay.json"
    base = {
        "thing_name": "r1",
        "endpoint": "h",
        "cert_path": "c.pem",
        "key_path": "/abs/k.pem",
        "ca_path": "ca.pem",
        "models_dir": "m",
        "public_keys": "p.pem",
    }
    path.write_text(json.dumps(base))
    cfg = ModelSyncConfig.load(path)
    assert cfg.cert_path == tmp_path / "c.pem"
    assert cfg.key_path == Path("/abs/k.pem")
    assert cfg.public_keys == (tmp_path / "p.pem",)
    with pytest.raises(ModelSyncConfigError) as info:
        ModelSyncConfig.from_mapping({**base, "colour": "red"})
    assert info.value.key == "colour"
    with pytest.raises(ModelSyncConfigError) as info:
        ModelSyncConfig.from_mapping({**base, "port": 0})
    assert info.value.key == "port"


def test_signature_checks(tmp_path: Path, signer: Signer) -> None:
    """A signature verifies only over the signed bytes, with the signer's
    key; another key id is untrusted_key, garbage is bad_signature."""
    keys = trusted_keys([signer.public_path])
    assert list(keys) == [signer.key_id]
    assert key_id(next(iter(keys.values()))) == signer.key_id
    data = b'{"a": 1}'
    verify_signature(data, signer.sign(data), signer.key_id, keys)
    for sig, kid, reason in (
        (signer.sign(data), "0" * 16, "untrusted_key"),
        (signer.sign(b'{"a": 2}'), signer.key_id, "bad_signature"),
        ("not base64!", signer.key_id, "bad_signature"),
    ):
        with pytest.raises(ModelRejectedError) as info:
            verify_signature(data, sig, kid, keys)
        assert info.value.reason == reason


# -- the store ---------------------------------------------------------------------


def test_store_recovers_from_a_damaged_current_model(
    tmp_path: Path, signer: Signer
) -> None:
    """When the file ``current`` names is damaged (a byte flipped), start-up
    falls back to ``previous``, rewrites the pointer and empties tmp/."""
    relay = make_relay(tmp_path, signer)
    store = relay.store
    v1 = store.current_entry()
    staged = store.new_tmp()
    (staged / GOOD_MODEL.name).write_bytes(GOOD_MODEL.read_bytes())
    manifest = {**V1, "version": "1.1.0"}
    (staged / st.MANIFEST_FILE).write_text(json.dumps(manifest))
    v2 = st.entry_name(V1["name"], "1.1.0", V1["sha256"])
    store.commit(staged, v2)
    store.set_current(v2)
    assert (store.current_entry(), store.previous_entry()) == (v2, v1)
    damaged = store.versions / v2 / GOOD_MODEL.name
    data = bytearray(damaged.read_bytes())
    data[500] ^= 0x01
    damaged.write_bytes(bytes(data))
    (store.new_tmp() / "partial.tflite").write_bytes(b"half")
    recovered = store.recover()
    assert recovered is not None and recovered.entry == v1
    assert store.current_entry() == v1
    assert list(store.tmp.iterdir()) == []


def test_unreadable_state_file_is_dropped(tmp_path: Path) -> None:
    """A state file that is not JSON, or has an unknown phase, reads as none."""
    store = st.ModelStore(tmp_path / "m")
    store.state_path.write_text("{not json")
    assert store.read_state() is None
    store.state_path.write_text(
        json.dumps({"job_id": "j", "execution_number": 1, "phase": "dancing"})
    )
    assert store.read_state() is None


# -- the runner ---------------------------------------------------------------------


def test_good_model_installs_and_swaps_the_filter(
    tmp_path: Path, web: tuple[Path, str], signer: Signer
) -> None:
    """A signed v2 downloads, passes the canary, becomes ``current`` with v1
    as ``previous``, and the filter now scores with it; the state file says
    installed until the report is accepted."""
    relay = make_relay(tmp_path, signer)
    assert relay.filter.model is not None
    assert relay.filter.model.version == filter_version(V1)
    doc = publish(web, signer, GOOD_MODEL.read_bytes(), version="1.1.0")
    phases: list[str] = []
    outcome = relay.runner.run("job-1", 1, doc, progress=phases.append)
    assert outcome.status == SUCCEEDED, outcome.details
    assert outcome.details["running_version"] == "1.1.0"
    assert phases == ["downloading", "verifying"]
    assert relay.filter.model.version == filter_version({**V1, "version": "1.1.0"})
    assert relay.store.current().version == "1.1.0"  # type: ignore[union-attr]
    assert relay.store.previous_entry() == st.entry_name(
        V1["name"], "1.0.0", V1["sha256"]
    )
    state = relay.store.read_state()
    assert state is not None and state.phase == st.INSTALLED
    relay.runner.reported("job-1")
    assert relay.store.read_state() is None
    assert relay.runner.counters.downloaded_bytes == GOOD_MODEL.stat().st_size + int(
        doc["manifest"]["size"]
    )


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("longer", "too_large"),
        ("shorter", "size_mismatch"),
        ("missing", "download_failed"),
        ("too_big_for_relay", "too_large"),
    ],
)
def test_download_problems_are_refused_and_counted(
    tmp_path: Path, web: tuple[Path, str], signer: Signer, tamper: str, reason: str
) -> None:
    """A served file longer or shorter than the document says, a 404, and a
    model over the relay's max_model_bytes each fail with their reason, are
    counted, and leave v1 running and tmp/ empty."""
    relay = make_relay(tmp_path, signer, max_model_bytes=4000)
    doc = publish(web, signer, GOOD_MODEL.read_bytes(), version="1.1.0")
    served = web[0] / "v2.tflite"
    if tamper == "longer":
        served.write_bytes(GOOD_MODEL.read_bytes() + b"\x00" * 10)
    elif tamper == "shorter":
        served.write_bytes(GOOD_MODEL.read_bytes()[:-10])
    elif tamper == "missing":
        served.unlink()
    else:
        relay = make_relay(tmp_path / "small", signer, max_model_bytes=1000)
    outcome = relay.runner.run("job-d", 1, doc)
    assert outcome.status == FAILED
    assert outcome.details["reason"] == reason, outcome.details
    assert outcome.details["running_version"] == "1.0.0"
    assert relay.runner.counters.failures[reason] == 1
    assert relay.filter.model is not None
    assert relay.filter.model.version == filter_version(V1)
    assert list(relay.store.tmp.iterdir()) == []


def test_interrupted_download_restarts_then_gives_up(
    tmp_path: Path, web: tuple[Path, str], signer: Signer
) -> None:
    """An execution found in the ``downloading`` phase starts over (attempt
    2); past max_attempts it is FAILED as interrupted, v1 untouched."""
    relay = make_relay(tmp_path, signer, max_attempts=2)
    doc = publish(web, signer, GOOD_MODEL.read_bytes(), version="1.1.0")
    previous = relay.store.current_entry()
    relay.store.write_state(
        st.UpdateState("job-i", 1, st.DOWNLOADING, previous=previous, attempts=1)
    )
    outcome = relay.runner.run("job-i", 1, doc)
    assert outcome.status == SUCCEEDED and outcome.details["attempts"] == "2"

    relay = make_relay(tmp_path / "again", signer, max_attempts=2)
    relay.store.write_state(
        st.UpdateState("job-j", 1, st.DOWNLOADING, previous=previous, attempts=2)
    )
    outcome = relay.runner.run("job-j", 1, doc)
    assert outcome.status == FAILED and outcome.details["reason"] == "interrupted"
    assert relay.store.current_entry() == previous


def test_verified_version_is_rolled_forward_without_the_network(
    tmp_path: Path, signer: Signer
) -> None:
    """An execution found in the ``installing`` phase (v2 verified and in
    versions/, ``current`` not moved yet) is finished from disk: no document
    or download is needed."""
    relay = make_relay(tmp_path, signer)
    v1 = relay.store.current_entry()
    staged = relay.store.new_tmp()
    (staged / GOOD_MODEL.name).write_bytes(GOOD_MODEL.read_bytes())
    (staged / st.MANIFEST_FILE).write_text(json.dumps({**V1, "version": "1.1.0"}))
    v2 = st.entry_name(V1["name"], "1.1.0", V1["sha256"])
    relay.store.commit(staged, v2)
    relay.store.write_state(
        st.UpdateState("job-f", 1, st.INSTALLING, target=v2, previous=v1)
    )
    outcome = relay.runner.run("job-f", 1, None)
    assert outcome.status == SUCCEEDED
    assert (relay.store.current_entry(), relay.store.previous_entry()) == (v2, v1)
    assert relay.filter.model is not None
    assert relay.filter.model.version.split(":")[1] == "1.1.0"


def test_settling_a_canceled_job_puts_the_old_model_back(
    tmp_path: Path, web: tuple[Path, str], signer: Signer
) -> None:
    """If the broker says the job of an installed update was CANCELED (or
    TIMED_OUT), settling it moves ``current`` back to v1 and the filter
    scores with v1 again; a SUCCEEDED job keeps v2."""
    relay = make_relay(tmp_path, signer)
    doc = publish(web, signer, GOOD_MODEL.read_bytes(), version="1.1.0")
    assert relay.runner.run("job-c", 1, doc).status == SUCCEEDED
    state = relay.store.read_state()
    assert state is not None
    relay.runner.settle(state, "CANCELED")
    assert relay.store.current().version == "1.0.0"  # type: ignore[union-attr]
    assert relay.filter.model is not None
    assert relay.filter.model.version == filter_version(V1)
    assert relay.store.read_state() is None
    assert relay.runner.counters.rolled_back == 1

    assert relay.runner.run("job-s", 1, doc).status == SUCCEEDED
    state = relay.store.read_state()
    assert state is not None
    relay.runner.settle(state, "SUCCEEDED")
    assert relay.store.current().version == "1.1.0"  # type: ignore[union-attr]


# -- the canary ---------------------------------------------------------------------


def test_canary_limits(tmp_path: Path) -> None:
    """The shipped model flags 1 of the 1001 real canary rows (0.1%): it
    passes at the default 20% limit, fails a 0.05% limit; too few rows and
    rows of another feature spec are refused; the NaN model is refused."""
    staged = tmp_path / "m"
    staged.mkdir()
    (staged / GOOD_MODEL.name).write_bytes(GOOD_MODEL.read_bytes())
    (staged / st.MANIFEST_FILE).write_bytes(GOOD_MANIFEST.read_bytes())
    model = load_fresh(staged / GOOD_MODEL.name)
    rows = rows_from_npz(CANARY_ROWS)
    assert rows is not None and len(rows) == 1001
    share = run_canary(model, rows, CanaryPolicy())
    assert share == pytest.approx(1 / 1001)
    cases: list[tuple[Any, CanaryPolicy, str]] = [
        (rows, CanaryPolicy(max_alert_share=0.0005), "canary_alert_share"),
        (rows, CanaryPolicy(min_rows=2000, max_rows=3000), "no_canary_rows"),
        (None, CanaryPolicy(), "no_canary_rows"),
        (dataclasses.replace(rows, spec_version=2), CanaryPolicy(), "spec_mismatch"),
    ]
    for case_rows, policy, reason in cases:
        with pytest.raises(ModelRejectedError) as info:
            run_canary(model, case_rows, policy)
        assert info.value.reason == reason
    nan_dir = tmp_path / "nan"
    nan_dir.mkdir()
    (nan_dir / "nan-model.tflite").write_bytes(
        (NAN_MANIFEST.parent / "nan-model.tflite").read_bytes()
    )
    (nan_dir / st.MANIFEST_FILE).write_bytes(NAN_MANIFEST.read_bytes())
    nan = load_fresh(nan_dir / "nan-model.tflite")
    with pytest.raises(ModelRejectedError) as info:
        run_canary(nan, rows, CanaryPolicy())
    assert info.value.reason == "non_finite_output"
    assert np.isfinite(model.reconstruct(model.scaler.transform(rows))).all()


# -- an s3 source against MiniStack ----------------------------------------------


@pytest.mark.integration
def test_s3_source_downloads_with_the_relays_credentials(
    ministack: MiniStack, tmp_path: Path, web: tuple[Path, str], signer: Signer
) -> None:
    """A document naming bucket and key is fetched through boto3 (the relay's
    credential chain, here the dummy keys) and installs."""
    s3 = boto3.session.Session(
        aws_access_key_id=DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    ).client("s3", endpoint_url=ministack.endpoint_url)
    bucket = f"relay-src-{tmp_path.name[-8:].lower().replace('_', '-')}"
    s3.create_bucket(Bucket=bucket)
    doc = publish(web, signer, GOOD_MODEL.read_bytes(), version="1.2.0")
    for key, name in (("m/v.tflite", "v2.tflite"), ("m/v.json", "v2.json")):
        s3.put_object(Bucket=bucket, Key=key, Body=(web[0] / name).read_bytes())
    doc["download"] = {
        "model": {"s3": {"bucket": bucket, "key": "m/v.tflite"}},
        "manifest": {"s3": {"bucket": bucket, "key": "m/v.json"}},
    }
    relay = make_relay(
        tmp_path, signer, s3_endpoint_url=ministack.endpoint_url, s3_region="us-east-1"
    )
    outcome = relay.runner.run("job-s3", 1, doc)
    assert outcome.status == SUCCEEDED, outcome.details
    assert outcome.details["running_version"] == "1.2.0"


def test_swap_during_scoring_loses_no_record(
    tmp_path: Path, web: tuple[Path, str], signer: Signer
) -> None:
    """While a thread keeps filtering real sampled records, an install swaps
    v1 for v2: every batch is scored whole by v1 or by v2 (never passed
    through), and each batch's flow counts add up to its input records."""
    from cloud.training.thinning import sample_flows  # noqa: PLC0415

    flows = ctu13.load_flows(ROOT / "data" / "ctu13-scenario6", slices=[7])
    records, _ = sample_flows(flows, 100, 5)
    relay = make_relay(tmp_path, signer)
    doc = publish(web, signer, GOOD_MODEL.read_bytes(), version="1.1.0")
    seen: list[str | None] = []
    losses: list[int] = []
    stop = threading.Event()
    #: batches to score at least (raised once the swap is done, so that one
    #: batch surely starts after it: the one in flight may be on v1)
    need = [3]

    def score() -> None:
        while not stop.is_set() or len(seen) < need[0]:
            result = relay.filter.process(records)
            seen.append(result.model_version)
            losses.append(records.size - int(result.flow_count.sum()))

    thread = threading.Thread(target=score)
    thread.start()
    try:
        while not seen and thread.is_alive():
            stop.wait(0.01)  # at least one batch on v1 first
        outcome = relay.runner.run("job-live", 1, doc)
        need[0] = max(need[0], len(seen) + 2)
    finally:
        stop.set()
        thread.join(60)
    assert outcome.status == SUCCEEDED
    v1, v2 = filter_version(V1), filter_version({**V1, "version": "1.1.0"})
    assert seen[0] == v1 and seen[-1] == v2 and set(seen) == {v1, v2}
    assert losses == [0] * len(losses)
    # Versions only ever move forward: v1 batches, then v2 batches.
    assert seen == sorted(seen, key=lambda v: v == v2)
