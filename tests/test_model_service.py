"""The model service as a real uvicorn server process, over HTTP.

Expected scores come from tests.model_service_server.reference_scores: a
numpy forward pass of the ``.weights.npz`` weights and the manifest's
statistics, sharing no code with the service (which runs the ``.tflite``
through LiteRT).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the model service needs the cloud extra")
pytest.importorskip("uvicorn", reason="the model service needs the cloud extra")

from tests.model_service_server import (
    CLOUD_MODEL,
    MODELS,
    RELAY_MODEL,
    ServiceProcess,
    copy_model,
    http_json,
    model_version,
    reference_scores,
    sample_rows,
)
from tests.servers import MiniStack

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = json.loads((MODELS / f"{CLOUD_MODEL}.manifest.json").read_text())
# Z of float32 TFLite vs float32 numpy: the log(loss + 1e-4) step magnifies
# float32 rounding of tiny losses; 1e-3 in z is far below any threshold use.
Z_ATOL = 1e-3
SCORE_ATOL = 1e-5


def _tenant_variant(version: str, bias: float) -> dict[str, Any]:
    """Changes that make a distinct model from the shipped weights."""
    detector = dict(SHIPPED["detector"], bias=bias)
    return {"name": "acme-cloud", "version": version, "detector": detector}


def _wait_for(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    copy_model(CLOUD_MODEL, root)
    copy_model(RELAY_MODEL, root)
    copy_model(CLOUD_MODEL, root, name="spare-cloud", version="3.1.0")
    copy_model(CLOUD_MODEL, root / "tenants" / "acme", **_tenant_variant("1.0.0", -2.0))
    return root


@pytest.fixture(scope="module")
def service(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(
        tmp_path_factory.mktemp("svc"),
        [
            "--models-dir",
            str(models_dir),
            "--tenant-model",
            "beta=spare-cloud",
            "--poll-interval",
            "0.2",
            "--max-rows",
            "5000",
        ],
    )
    proc.start()
    _wait_for(lambda: http_json("GET", proc.url + "/readyz")[0] == 200)
    try:
        yield proc
    finally:
        proc.stop()


def _score(
    service: ServiceProcess, tenant: str, rows: Any, **extra: Any
) -> tuple[int, Any]:
    body = {"tenant": tenant, "spec_version": 1, "rows": rows, **extra}
    return http_json("POST", service.url + "/v1/score", body)


def test_scores_match_an_independent_numpy_computation(service: ServiceProcess) -> None:
    """Scores, normalised losses, alerts and classes of 400 rows equal a numpy
    forward pass of the same weights; the default model scores a tenant
    without its own."""
    rows = sample_rows(400, seed=1)
    status, body = _score(service, "newco", rows.tolist())
    assert status == 200, body
    want = reference_scores(SHIPPED, rows)
    assert body["model_version"] == model_version(SHIPPED)
    assert body["model_name"] == CLOUD_MODEL
    assert body["loss_names"] == SHIPPED["loss_normaliser"]["inputs"]
    np.testing.assert_allclose(body["scores"], want["scores"], atol=SCORE_ATOL)
    np.testing.assert_allclose(np.array(body["losses"]), want["z"], atol=Z_ATOL)
    assert body["alert"] == want["alert"].tolist()
    assert body["classes"] == want["classes"]
    # The sample has both kinds of rows, so the comparison means something.
    assert 0 < sum(body["alert"]) < len(rows)
    assert body["thresholds"]["alert"] == SHIPPED["thresholds"]["alert"]
    assert (
        body["thresholds"]["hysteresis_k"] == SHIPPED["thresholds"]["hysteresis"]["k"]
    )


def test_losses_can_be_limited_to_alerting_rows(service: ServiceProcess) -> None:
    """losses="alerts" returns the losses of alerting rows and null for the
    others; losses="none" returns null for every row."""
    rows = sample_rows(40, seed=13)
    want = reference_scores(SHIPPED, rows)
    status, body = _score(service, "newco", rows.tolist(), losses="alerts")
    assert status == 200
    for i, alert in enumerate(want["alert"]):
        if alert:
            np.testing.assert_allclose(body["losses"][i], want["z"][i], atol=Z_ATOL)
        else:
            assert body["losses"][i] is None
    status, body = _score(service, "newco", rows.tolist(), losses="none")
    assert status == 200
    assert body["losses"] == [None] * 40
    assert body["scores"] and len(body["scores"]) == 40


def test_ids_are_echoed_in_order(service: ServiceProcess) -> None:
    """Host and window ids come back row-aligned with the scores."""
    rows = sample_rows(3, seed=2).tolist()
    status, body = _score(
        service,
        "newco",
        rows,
        hosts=["a", "b", "c"],
        window_starts_ms=[0, 300_000, 600_000],
    )
    assert status == 200
    assert body["hosts"] == ["a", "b", "c"]
    assert body["window_starts_ms"] == [0, 300_000, 600_000]
    assert len(body["scores"]) == 3


def test_tenant_own_model_and_mapping(
    service: ServiceProcess, models_dir: Path
) -> None:
    """A tenant with tenants/<id>/ gets its own model; a mapped tenant gets the
    shared model it is mapped to."""
    rows = sample_rows(50, seed=3)
    own = json.loads((models_dir / "tenants/acme/acme-cloud.manifest.json").read_text())
    status, body = _score(service, "acme", rows.tolist())
    assert status == 200
    assert body["model_version"] == model_version(own)
    np.testing.assert_allclose(
        body["scores"], reference_scores(own, rows)["scores"], atol=SCORE_ATOL
    )
    status, body = _score(service, "beta", rows.tolist())
    assert status == 200
    assert body["model_name"] == "spare-cloud"
    assert body["model_version"].startswith("spare-cloud:3.1.0:")


@pytest.mark.parametrize(
    ("change", "status", "rule", "says"),
    [
        ({"spec_version": 2}, 422, "spec_version", "spec version 2"),
        ({"rows": "short"}, 422, "row_width", "row 3 has 14 values"),
        ({"rows": "negative"}, 422, "negative", "row 1 feature pkts_in is -1.0"),
        ({"hosts": ["a"]}, 422, "ids_length", "hosts has 1 entries for 5 rows"),
        ({"rows": "text"}, 422, "invalid_body", "rows.0.2"),
        ({"tenant": "no spaces"}, 422, "invalid_body", "tenant"),
        ({"rows": "many"}, 413, "too_many_rows", "5001 rows in one request"),
    ],
)
def test_bad_requests_name_the_rule(
    service: ServiceProcess, change: dict[str, Any], status: int, rule: str, says: str
) -> None:
    """Each broken rule gets its status, its rule key and a message naming the
    bad value."""
    rows = sample_rows(5, seed=4).tolist()
    body: dict[str, Any] = {"tenant": "newco", "spec_version": 1, "rows": rows}
    kind = change.get("rows")
    if kind == "short":
        rows[3] = rows[3][:14]
    elif kind == "negative":
        rows[1][1] = -1.0
    elif kind == "text":
        rows[0][2] = "lots"
    elif kind == "many":
        body["rows"] = sample_rows(5001, seed=5).tolist()
    body.update({k: v for k, v in change.items() if k != "rows"})
    got_status, got = http_json("POST", service.url + "/v1/score", body)
    assert got_status == status, got
    assert got["error"] == rule
    assert says in got["message"]


def test_nan_rows_are_refused(service: ServiceProcess) -> None:
    """A NaN in the JSON (Python's NaN token) is refused as non_finite, naming
    the row and feature."""
    rows = sample_rows(4, seed=6).tolist()
    rows[2][12] = float("nan")
    raw = json.dumps({"tenant": "newco", "spec_version": 1, "rows": rows}).encode()
    status, body = http_json("POST", service.url + "/v1/score", raw=raw)
    assert status == 422
    assert body["error"] == "non_finite"
    assert "row 2 feature dns_share is nan" in body["message"]


def test_new_model_version_is_picked_up(
    service: ServiceProcess, models_dir: Path
) -> None:
    """A new manifest in a tenant folder replaces the tenant's model without a
    restart; a model that fails its checksum leaves the previous one in
    service and is counted."""
    rows = sample_rows(20, seed=7)
    folder = models_dir / "tenants" / "gamma"
    first = copy_model(CLOUD_MODEL, folder, **_tenant_variant("1.0.0", -3.0))
    _wait_for(
        lambda: (
            _score(service, "gamma", rows.tolist())[1]["model_version"]
            == model_version(first)
        )
    )
    second = copy_model(CLOUD_MODEL, folder, **_tenant_variant("1.1.0", -1.0))
    _wait_for(
        lambda: (
            _score(service, "gamma", rows.tolist())[1]["model_version"]
            == model_version(second)
        )
    )
    status, body = _score(service, "gamma", rows.tolist())
    np.testing.assert_allclose(
        body["scores"], reference_scores(second, rows)["scores"], atol=SCORE_ATOL
    )
    bad = dict(second, version="1.2.0", sha256="0" * 64)
    (folder / "acme-cloud.manifest.json").write_text(json.dumps(bad))
    _wait_for(
        lambda: 'outcome="checksum"' in http_json("GET", service.url + "/metrics")[1]
    )
    status, body = _score(service, "gamma", rows.tolist())
    assert status == 200
    assert body["model_version"] == model_version(second)


def test_operational_endpoints(service: ServiceProcess) -> None:
    """healthz, readyz and version answer; metrics count the rows scored and
    the requests refused, and the relay model was skipped."""
    before = _metric(
        service, 'sampleflow_model_service_rows_scored_total{model="spare-cloud"}'
    )
    _score(service, "beta", sample_rows(7, seed=8).tolist())
    _score(service, "beta", sample_rows(3, seed=9).tolist())
    after = _metric(
        service, 'sampleflow_model_service_rows_scored_total{model="spare-cloud"}'
    )
    assert after - before == 10
    assert http_json("GET", service.url + "/healthz") == (200, {"status": "ok"})
    status, ready = http_json("GET", service.url + "/readyz")
    assert status == 200 and ready["ready"] is True and ready["missing"] == []
    status, version = http_json("GET", service.url + "/version")
    assert status == 200
    assert version["feature_spec_version"] == 1
    assert version["default_model"] == CLOUD_MODEL
    assert version["tenant_models"] == {"beta": "spare-cloud"}
    assert RELAY_MODEL not in version["shared_models"]
    assert version["tenant_own_models"]["acme"].startswith("acme-cloud:1.0.0:")
    assert (
        _metric(
            service, 'sampleflow_model_service_model_loads_total{outcome="skipped"}'
        )
        >= 1
    )


def _metric(service: ServiceProcess, name: str) -> float:
    status, text = http_json("GET", service.url + "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_no_default_model_means_unknown_tenants(
    models_dir: Path, tmp_path: Path
) -> None:
    """Without a default model an unmapped tenant is 404 unknown_tenant; a tenant
    mapped to a model that is not there is 503, and readyz says which is missing."""
    proc = ServiceProcess(
        tmp_path,
        [
            "--models-dir",
            str(models_dir),
            "--default-model",
            "none",
            "--tenant-model",
            "beta=not-shipped",
            "--poll-interval",
            "0.2",
        ],
    )
    proc.start()
    try:
        rows = sample_rows(2).tolist()
        status, body = _score(proc, "newco", rows)
        assert (status, body["error"]) == (404, "unknown_tenant")
        assert "'newco'" in body["message"]
        status, body = _score(proc, "beta", rows)
        assert (status, body["error"]) == (503, "model_not_loaded")
        assert "not-shipped" in body["message"]
        status, ready = http_json("GET", proc.url + "/readyz")
        assert status == 503
        assert ready["missing"] == ["not-shipped"]
        assert _score(proc, "acme", rows)[0] == 200
    finally:
        proc.stop()


def test_models_from_s3_reload_on_new_etag(
    ministack: MiniStack, tmp_path: Path
) -> None:
    """Models under an S3 prefix (MiniStack) are served; a new manifest PUT
    there is picked up by its ETag."""
    s3 = boto3.client(
        "s3", endpoint_url=ministack.endpoint_url, region_name="us-east-1"
    )
    bucket = f"models-{time.monotonic_ns()}"
    s3.create_bucket(Bucket=bucket)
    staged = tmp_path / "staged"
    copy_model(CLOUD_MODEL, staged)
    own = copy_model(
        CLOUD_MODEL, staged / "tenants" / "acme", **_tenant_variant("1.0.0", -2.5)
    )
    for path in sorted(staged.rglob("*"), key=lambda p: p.suffix == ".json"):
        if path.is_file():
            s3.upload_file(
                str(path), bucket, f"prod/{path.relative_to(staged).as_posix()}"
            )
    proc = ServiceProcess(
        tmp_path / "svc",
        [
            "--s3-uri",
            f"s3://{bucket}/prod",
            "--s3-endpoint-url",
            ministack.endpoint_url,
            "--poll-interval",
            "0.2",
        ],
    )
    proc.start()
    try:
        rows = sample_rows(30, seed=10)
        _wait_for(lambda: http_json("GET", proc.url + "/readyz")[0] == 200)
        status, body = _score(proc, "acme", rows.tolist())
        assert status == 200
        assert body["model_version"] == model_version(own)
        np.testing.assert_allclose(
            body["scores"], reference_scores(own, rows)["scores"], atol=SCORE_ATOL
        )
        newer = dict(own, version="2.0.0")
        s3.put_object(
            Bucket=bucket,
            Key="prod/tenants/acme/acme-cloud.manifest.json",
            Body=json.dumps(newer).encode(),
        )
        _wait_for(
            lambda: (
                _score(proc, "acme", rows.tolist())[1]["model_version"]
                == model_version(newer)
            )
        )
        assert _score(proc, "newco", rows.tolist())[1]["model_name"] == CLOUD_MODEL
    finally:
        proc.stop()
        s3.close()


def test_committed_openapi_document_is_current(service: ServiceProcess) -> None:
    """docs/model-service-openapi.json is what `sampleflow model-service openapi`
    writes, and what the running server serves."""
    from cloud.model_service.commands import openapi_document  # noqa: PLC0415

    committed = json.loads(
        (PROJECT_ROOT / "docs/model-service-openapi.json").read_text()
    )
    assert committed == openapi_document()
    status, served = http_json("GET", service.url + "/openapi.json")
    assert status == 200
    assert served == committed
    assert set(served["paths"]["/v1/score"]["post"]["responses"]) >= {
        "200",
        "404",
        "413",
        "422",
        "500",
        "503",
    }


def test_bench_command_reports_both_modes(capsys: pytest.CaptureFixture[str]) -> None:
    """`sampleflow bench model-service` scores through a real server and
    in-process and prints a line for each with rows counted."""
    import argparse  # noqa: PLC0415

    from cloud.model_service.commands import register_bench  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="sampleflow")
    bench = parser.add_subparsers(dest="command").add_parser("bench")
    register_bench(bench.add_subparsers(dest="benchmark"))
    args = parser.parse_args(
        ["bench", "model-service", "--seconds", "0.3", "--batch", "200"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line}
    assert {"in-process", "HTTP/alerts", "HTTP/all"} <= set(lines)
    for mode in ("in-process", "HTTP/alerts", "HTTP/all"):
        assert float(lines[mode][1].replace(",", "")) > 0
