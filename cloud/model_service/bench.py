"""``sampleflow bench model-service``: rows/s through HTTP and in-process.

Both modes score the same batches of synthetic rows (drawn around the
default model's normal medians, a fifth of them outliers) with the default
model:

* in-process: :func:`~cloud.model_service.scoring.score_rows` on a float64
  array, in this process (scaling, LiteRT pass, losses, detector);
* HTTP: the real server (``sampleflow model-service run`` as a child
  process on a loopback port) fed by :class:`cloud.scoring_client.ScoringClient`
  over one keep-alive connection, one request per batch, so JSON encoding,
  parsing and validation are included.

Per mode: rows/s of wall time, rows per CPU-second of the scoring process
(the server's utime+stime from /proc for HTTP, this process's for
in-process), rows per CPU-second of client and server together, and the
per-batch latency.  On a 2-core machine client and server share the cores,
so the HTTP wall rate is a lower bound of what a dedicated server does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud.model_service.config import DEFAULT_MODEL
from cloud.model_service.registry import DirectorySource, ModelRegistry
from cloud.model_service.scoring import score_rows
from cloud.scoring_client import ScoringClient, ScoringClientConfig


class BenchError(RuntimeError):
    """Raised when the benchmark cannot run (no model, server did not start)."""


@dataclass(frozen=True)
class ModeResult:
    """Figures of one mode."""

    mode: str
    rows: int
    wall_s: float
    scorer_cpu_s: float
    total_cpu_s: float
    p50_ms: float
    p99_ms: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s

    @property
    def rows_per_scorer_cpu_s(self) -> float:
        return self.rows / self.scorer_cpu_s if self.scorer_cpu_s else float("inf")

    @property
    def rows_per_cpu_s(self) -> float:
        return self.rows / self.total_cpu_s if self.total_cpu_s else float("inf")


@dataclass(frozen=True)
class BenchReport:
    """Both modes, and what was measured."""

    model_version: str
    batch: int
    seconds: float
    results: tuple[ModeResult, ...]


def synthetic_rows(manifest: dict[str, object], n: int, seed: int = 0) -> np.ndarray:
    """``n`` raw feature rows around the manifest scaler's medians."""
    scaler = manifest["scaler"]
    assert isinstance(scaler, dict)
    med = np.array(scaler["median"], dtype=np.float64)
    scale = np.array(scaler["scale"], dtype=np.float64)
    rng = np.random.default_rng(seed)
    x = med + rng.normal(0.0, 0.7, size=(n, med.size)) * scale
    for i, log1p in enumerate(scaler["log1p"]):
        if log1p:
            x[:, i] = np.expm1(np.maximum(x[:, i], 0.0))
    x = np.abs(x)
    x[:, 11:] = np.minimum(x[:, 11:], 1.0)
    x[::5, 0] *= 40.0
    x[::5, 11] = 0.9
    return x


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _latencies(samples: list[float]) -> tuple[float, float]:
    arr = np.array(samples) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def _in_process(
    registry: ModelRegistry, batches: list[np.ndarray], seconds: float
) -> ModeResult:
    model = registry.resolve("bench")
    score_rows(model, batches[0])  # warm up (interpreter resize)
    rows, lat = 0, []
    cpu0, t0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for x in batches:
            s = time.perf_counter()
            score_rows(model, x)
            lat.append(time.perf_counter() - s)
            rows += x.shape[0]
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    p50, p99 = _latencies(lat)
    return ModeResult("in-process", rows, wall, cpu, cpu, p50, p99)


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_server(models_dir: Path, batch: int) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "model-service",
            "run",
            "--port",
            str(port),
            "--models-dir",
            str(models_dir),
            "--max-rows",
            str(max(batch, 1000)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"model service exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1.0):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise BenchError("model service did not become ready within 60 s")


def _http(
    models_dir: Path, batches: list[np.ndarray], seconds: float, losses: str
) -> ModeResult:
    proc, url = _start_server(models_dir, batches[0].shape[0])
    try:
        client = ScoringClient(
            ScoringClientConfig(
                url=url, chunk_rows=batches[0].shape[0], retries=0, losses=losses
            )
        )
        client.score("bench", batches[0])  # warm up
        rows, lat = 0, []
        server0, cpu0 = _proc_cpu_s(proc.pid), time.process_time()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for x in batches:
                s = time.perf_counter()
                client.score("bench", x)
                lat.append(time.perf_counter() - s)
                rows += x.shape[0]
        wall = time.perf_counter() - t0
        server_cpu = _proc_cpu_s(proc.pid) - server0
        client_cpu = time.process_time() - cpu0
        client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    p50, p99 = _latencies(lat)
    return ModeResult(
        f"HTTP/{losses}", rows, wall, server_cpu, server_cpu + client_cpu, p50, p99
    )


def run_benchmark(
    models_dir: Path,
    batch: int = 1000,
    seconds: float = 3.0,
    losses: tuple[str, ...] = ("alerts", "all"),
) -> BenchReport:
    """Time in-process scoring and HTTP with each ``losses`` setting (which
    rows get their losses back) on batches of ``batch`` rows, ``seconds``
    each."""
    if batch < 1 or seconds <= 0:
        raise BenchError(f"need batch >= 1 and seconds > 0, got {batch}, {seconds}")
    manifest_path = Path(models_dir) / f"{DEFAULT_MODEL}.manifest.json"
    if not manifest_path.exists():
        raise BenchError(f"no default model {manifest_path}")
    manifest = json.loads(manifest_path.read_text())
    rows = synthetic_rows(manifest, batch * 8)
    batches = [rows[i : i + batch] for i in range(0, rows.shape[0], batch)]
    registry = ModelRegistry(DirectorySource(models_dir), DEFAULT_MODEL)
    registry.refresh()
    version = registry.resolve("bench").version
    results = (
        _in_process(registry, batches, seconds),
        *(_http(models_dir, batches, seconds, which) for which in losses),
    )
    return BenchReport(version, batch, seconds, results)


def print_report(report: BenchReport) -> None:
    """The figures of both modes side by side."""
    print(
        f"model service: model {report.model_version}, batches of {report.batch} "
        f"rows, {report.seconds:g} s per mode"
    )
    header = (
        f"{'mode':<12} {'rows/s wall':>12} {'rows/CPU-s scorer':>18} "
        f"{'rows/CPU-s all':>15} {'p50 ms':>8} {'p99 ms':>8}"
    )
    print(header)
    for r in report.results:
        print(
            f"{r.mode:<12} {r.rows_per_s:>12,.0f} {r.rows_per_scorer_cpu_s:>18,.0f} "
            f"{r.rows_per_cpu_s:>15,.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f}"
        )
    inproc, *http = report.results
    for h in http:
        ratio = inproc.rows_per_scorer_cpu_s / h.rows_per_scorer_cpu_s
        print(
            f"scorer CPU per row: {h.mode} {ratio:.1f}x in-process "
            "(JSON parsing, validation and encoding)"
        )
