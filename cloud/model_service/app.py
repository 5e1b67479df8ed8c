"""The HTTP API (FastAPI): ``POST /v1/score`` and the operational endpoints.

Errors are JSON ``{"error": RULE, "message": TEXT}`` with a status that
says whose fault it is: 422 bad rows or body (``spec_version``,
``row_width``, ``non_finite``, ``negative``, ``ids_length``,
``invalid_body``), 413 ``too_many_rows``, 404 ``unknown_tenant``, 503
``model_not_loaded``, 500 ``non_finite_output`` (a broken model).  Each is
counted in ``sampleflow_model_service_rejected_total{rule}``.

The score endpoint reads the raw body and hands it to a worker thread,
which parses and checks it with pydantic's JSON parser (Rust; it accepts
the ``NaN`` token so that NaN rows get a clear ``non_finite`` error),
scores, and encodes the answer with ``pydantic_core.to_json``; the
stdlib ``json`` module costs about 5x more per row here.  A model's
interpreter runs one batch at a time under its own lock.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import prometheus_client
import pydantic_core
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from cloud.model_service.config import DEFAULT_MAX_ROWS
from cloud.model_service.registry import (
    ModelNotLoadedError,
    ModelRegistry,
    UnknownTenantError,
)
from cloud.model_service.scoring import (
    NonFiniteOutputError,
    RowsRejectedError,
    Scored,
    check_rows,
    class_names,
    score_rows,
)
from edge_agent.features import FEATURE_NAMES, FEATURE_SPEC_VERSION

log = structlog.get_logger(__name__)

TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def service_version() -> str:
    """The installed sampleflow version."""
    try:
        return version("sampleflow")
    except PackageNotFoundError:  # pragma: no cover - running from a bare tree
        return "0+unknown"


class ScoreRequest(BaseModel):
    """Feature rows of one tenant to score."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(pattern=TENANT_PATTERN, description="tenant id")
    spec_version: int = Field(
        description=f"feature spec version of the rows ({FEATURE_SPEC_VERSION} here)"
    )
    rows: list[list[float]] = Field(
        description=(
            f"one row per host window: the {len(FEATURE_NAMES)} raw features "
            f"{', '.join(FEATURE_NAMES)}, in that order"
        )
    )
    hosts: list[str] | None = Field(
        default=None, description="optional host id per row, echoed back"
    )
    window_starts_ms: list[int] | None = Field(
        default=None, description="optional window start per row (ms), echoed back"
    )
    losses: Literal["all", "alerts", "none"] = Field(
        default="all",
        description="which rows get their normalised losses in the answer "
        "(the others get null): most of the answer's size",
    )


class Thresholds(BaseModel):
    """The model's score thresholds (docs/models.md)."""

    alert: float
    clear: float
    hysteresis_k: int
    hysteresis_n: int


class ScoreResponse(BaseModel):
    """Scores of every row, in request order."""

    tenant: str
    model_name: str
    model_version: str = Field(description="name:version:sha256-prefix")
    spec_version: int
    thresholds: Thresholds
    loss_names: list[str] = Field(description="columns of losses: features, total")
    scores: list[float] = Field(description="detector probability in [0, 1]")
    alert: list[bool] = Field(description="score >= thresholds.alert")
    classes: list[str] = Field(
        description="dominant threat class of alerting rows, 'none' otherwise"
    )
    losses: list[list[float] | None] = Field(
        description="per-feature reconstruction losses normalised by the "
        "network's normal windows (z, clipped to ±10)"
    )
    hosts: list[str] | None = None
    window_starts_ms: list[int] | None = None


class ErrorBody(BaseModel):
    """An error: the rule broken and a message naming the bad value."""

    error: str
    message: str


class ServiceError(Exception):
    """An error answer (status, rule, message)."""

    def __init__(self, status: int, rule: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.rule = rule


class _Figures(Collector):
    """Registry figures read at scrape time (model loads, models loaded)."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        loads = CounterMetricFamily(
            "sampleflow_model_service_model_loads",
            "Model loads by outcome (ok, skipped, or the failure reason)",
            labels=["outcome"],
        )
        for outcome, count in sorted(self.registry.loads.items()):
            loads.add_metric([outcome], count)
        yield loads
        polls = CounterMetricFamily(
            "sampleflow_model_service_poll_errors",
            "Model source polls that failed",
        )
        polls.add_metric([], self.registry.poll_errors)
        yield polls
        loaded = GaugeMetricFamily(
            "sampleflow_model_service_models_loaded", "Models currently loaded"
        )
        loaded.add_metric([], len(self.registry.models))
        yield loaded


class ServiceMetrics:
    """The service's Prometheus figures, in a registry of their own."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "sampleflow_model_service_score_requests",
            "Score requests by outcome (ok or the rule broken)",
            ["outcome"],
            registry=self.registry,
        )
        self.rows = prometheus_client.Counter(
            "sampleflow_model_service_rows_scored",
            "Rows scored, by model name",
            ["model"],
            registry=self.registry,
        )
        self.rejected = prometheus_client.Counter(
            "sampleflow_model_service_rejected",
            "Requests refused, by rule",
            ["rule"],
            registry=self.registry,
        )
        self.score_seconds = prometheus_client.Histogram(
            "sampleflow_model_service_score_seconds",
            "Time to check and score one request's rows (s)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.registry.register(_Figures(registry))


def _losses(scored: Scored, which: str) -> list[list[float] | None]:
    """The ``losses`` field: every row, alerting rows only, or none."""
    if which == "all":
        rows: list[list[float] | None] = scored.z.tolist()
        return rows
    if which == "none":
        return [None] * len(scored.scores)
    return [
        z if alert else None
        for z, alert in zip(scored.z.tolist(), scored.alert.tolist(), strict=True)
    ]


def _describe(errors: Sequence[Any]) -> str:
    """The first pydantic error as one sentence, with where it is."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())) or "the body"
    return (
        f"request body does not match the ScoreRequest schema at {where}: "
        f"{first.get('msg', 'invalid')} ({len(errors)} error(s))"
    )


def _error_responses() -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": ErrorBody, "description": text}
        for status, text in (
            (404, "unknown_tenant"),
            (413, "too_many_rows"),
            (
                422,
                "spec_version, row_width, non_finite, negative, ids_length, "
                "invalid_body",
            ),
            (500, "non_finite_output"),
            (503, "model_not_loaded"),
        )
    }


def create_app(
    registry: ModelRegistry, *, max_rows: int = DEFAULT_MAX_ROWS, poll: bool = True
) -> FastAPI:
    """The service app over ``registry``.

    With ``poll`` the registry's poll thread runs for the app's lifetime
    (started and stopped by the ASGI lifespan); without it the caller
    refreshes the registry.
    """
    metrics = ServiceMetrics(registry)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if poll:
            registry.start()
        log.info(
            "model_service_started",
            source=registry.source.describe(),
            models=len(registry.models),
            ready=registry.ready(),
        )
        try:
            yield
        finally:
            if poll:
                registry.stop()

    app = FastAPI(
        title="sampleflow model service",
        version=service_version(),
        description=(
            "Scores host-window feature rows with per-tenant auto-encoder "
            "models; see docs/model-service.md."
        ),
        lifespan=lifespan,
    )

    def reject(rule: str, status: int, message: str) -> JSONResponse:
        metrics.rejected.labels(rule).inc()
        metrics.requests.labels(rule).inc()
        return JSONResponse({"error": rule, "message": message}, status_code=status)

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return reject(exc.rule, exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(
        _request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        return reject("invalid_body", 422, _describe(exc.errors()))

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=_error_responses(),
        summary="Score feature rows of one tenant",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": ScoreRequest.model_json_schema()}
                },
            }
        },
    )
    async def score(http_request: Request) -> Response:
        # The body is parsed by pydantic's own JSON parser in a worker
        # thread: about 4x cheaper than json.loads plus validation, and the
        # event loop stays free while rows are checked and scored.
        body = await http_request.body()
        return await run_in_threadpool(score_body, body)

    def score_body(raw: bytes) -> Response:
        started = time.perf_counter()
        try:
            request = ScoreRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise ServiceError(422, "invalid_body", _describe(exc.errors())) from exc
        n = len(request.rows)
        for name, ids in (
            ("hosts", request.hosts),
            ("window_starts_ms", request.window_starts_ms),
        ):
            if ids is not None and len(ids) != n:
                raise ServiceError(
                    422, "ids_length", f"{name} has {len(ids)} entries for {n} rows"
                )
        try:
            x = check_rows(request.rows, request.spec_version, max_rows)
        except RowsRejectedError as exc:
            status = 413 if exc.rule == "too_many_rows" else 422
            raise ServiceError(status, exc.rule, str(exc)) from exc
        try:
            model = registry.resolve(request.tenant)
        except UnknownTenantError as exc:
            raise ServiceError(404, "unknown_tenant", str(exc)) from exc
        except ModelNotLoadedError as exc:
            raise ServiceError(503, "model_not_loaded", str(exc)) from exc
        try:
            scored = score_rows(model, x)
        except NonFiniteOutputError as exc:
            log.error("model_output_not_finite", model=model.version, error=str(exc))
            raise ServiceError(500, "non_finite_output", str(exc)) from exc
        th = model.thresholds
        body: dict[str, Any] = {
            "tenant": request.tenant,
            "model_name": model.name,
            "model_version": model.version,
            "spec_version": FEATURE_SPEC_VERSION,
            "thresholds": {
                "alert": th.alert,
                "clear": th.clear,
                "hysteresis_k": th.k,
                "hysteresis_n": th.n,
            },
            "loss_names": list(model.normaliser.inputs),
            "scores": scored.scores.tolist(),
            "alert": scored.alert.tolist(),
            "classes": class_names(scored.classes),
            "losses": _losses(scored, request.losses),
        }
        if request.hosts is not None:
            body["hosts"] = request.hosts
        if request.window_starts_ms is not None:
            body["window_starts_ms"] = request.window_starts_ms
        # Every value is finite (z is clipped, scores are a sigmoid).
        content = pydantic_core.to_json(body)
        metrics.rows.labels(model.name).inc(n)
        metrics.requests.labels("ok").inc()
        metrics.score_seconds.observe(time.perf_counter() - started)
        return Response(content=content, media_type="application/json")

    @app.get("/healthz", summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Models are loaded (503 until the default and mapped ones are)",
        responses={503: {"description": "not ready"}},
    )
    def readyz() -> JSONResponse:
        ready = registry.ready()
        return JSONResponse(
            {
                "ready": ready,
                "models_loaded": len(registry.models),
                "missing": registry.missing(),
            },
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", summary="Prometheus text exposition")
    def metrics_endpoint() -> Response:
        return Response(
            prometheus_client.generate_latest(metrics.registry),
            media_type=prometheus_client.CONTENT_TYPE_LATEST,
        )

    @app.get("/version", summary="Service, feature spec and model versions")
    def version_endpoint() -> dict[str, Any]:
        models = registry.models
        return {
            "service": service_version(),
            "feature_spec_version": FEATURE_SPEC_VERSION,
            "source": registry.source.describe(),
            "default_model": registry.default_model,
            "tenant_models": registry.tenant_models,
            "shared_models": {
                name: m.version for name, m in sorted(models.shared.items())
            },
            "tenant_own_models": {
                tenant: m.version for tenant, m in sorted(models.tenants.items())
            },
        }

    app.state.metrics = metrics
    app.state.registry = registry
    return app
