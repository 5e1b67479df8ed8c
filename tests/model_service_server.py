"""The model service as a real server process for tests, and a numpy
reference scorer that shares no code with the service.

:class:`ServiceProcess` runs ``python -m edge_agent.cli model-service run``
(the installed command line) on a free loopback port and waits for
``/healthz``; it runs in its own process group, ended at :meth:`stop`.

:func:`reference_scores` recomputes what the service must answer from the
manifest JSON and the ``.weights.npz`` file alone, following
docs/models.md: ``log1p`` on counts, robust scaling, a tanh MLP forward
pass, squared errors plus their mean, ``log`` normalisation, the logistic
detector, and the class with the largest positive weighted contribution.
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tests.servers import ServerProcess

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODELS = PROJECT_ROOT / "models"
CLOUD_MODEL = "cloud-ctu13s6-r100-w300"
RELAY_MODEL = "relay-ctu13s6-r100-w300"
_START_TIMEOUT_S = 60.0

#: Threat class of each detector input, from the table in docs/models.md.
CLASS_OF = {
    **dict.fromkeys(
        ["pkts_out", "pkts_in", "bytes_out", "bytes_in", "records_out", "records_in"],
        "volume",
    ),
    **dict.fromkeys(
        [
            "tcp_starts_out",
            "dst_addrs_out",
            "dst_ports_out",
            "dst_addr_entropy",
            "dst_port_entropy",
            "failed_tcp_share",
        ],
        "scan",
    ),
    "mail_share": "spam",
    "dns_share": "dns",
    "irc_share": "irc",
    "total": "volume",
}
CLASSES = ("volume", "scan", "spam", "dns", "irc")


def copy_model(source: str, dest: Path, **manifest_changes: Any) -> dict[str, Any]:
    """Copy model ``source`` from models/ into ``dest``; apply top-level
    manifest changes (``name``, ``version``, ``detector``, ...); the
    manifest is written last, by rename.  Returns the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((MODELS / f"{source}.manifest.json").read_text())
    for key in ("model_file", "weights_file"):
        shutil.copyfile(MODELS / manifest[key], dest / manifest[key])
    manifest.update(manifest_changes)
    out = dest / f"{manifest['name']}.manifest.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest))
    tmp.rename(out)
    return manifest


def model_version(manifest: dict[str, Any]) -> str:
    """``name:version:sha256[:12]`` (the service's documented form)."""
    return f"{manifest['name']}:{manifest['version']}:{manifest['sha256'][:12]}"


def reference_scores(manifest: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """Scores, alerts, classes and z of raw feature ``rows`` (see module doc)."""
    weights = np.load(MODELS / manifest["weights_file"])
    sc = manifest["scaler"]
    x = np.array(rows, dtype=np.float64)
    for i, log1p in enumerate(sc["log1p"]):
        if log1p:
            x[:, i] = np.log1p(x[:, i])
    x = (x - np.array(sc["median"])) / np.array(sc["scale"])
    x = np.clip(x, -sc["clip"], sc["clip"]).astype(np.float32)
    h = x
    layers = len(manifest["architecture"]["layers"]) - 1
    for k in range(layers):
        h = h @ weights[f"W{k}"] + weights[f"b{k}"]
        if k < layers - 1:
            h = np.tanh(h)
    err = (x.astype(np.float64) - h.astype(np.float64)) ** 2
    losses = np.concatenate([err, err.mean(axis=1, keepdims=True)], axis=1)
    ln = manifest["loss_normaliser"]
    z = (np.log(losses + ln["eps"]) - np.array(ln["mean"])) / np.array(ln["std"])
    z = np.clip(z, -10.0, 10.0)
    det = manifest["detector"]
    w = np.array(det["weights"])
    score = 1.0 / (1.0 + np.exp(-(z @ w + det["bias"])))
    alert = score >= manifest["thresholds"]["alert"]
    contrib = np.clip(z * w, 0.0, None)
    per_class = np.stack(
        [
            contrib[:, [CLASS_OF[n] == c for n in det["inputs"]]].sum(axis=1)
            for c in CLASSES
        ],
        axis=1,
    )
    best = [CLASSES[int(np.argmax(r))] if r.max() > 0 else "none" for r in per_class]
    classes = [b if a else "none" for b, a in zip(best, alert, strict=True)]
    return {"scores": score, "alert": alert, "classes": classes, "z": z}


def sample_rows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` plausible raw feature rows around the shipped model's normal
    medians, every fifth one a spam-like outlier (many packets to port 25)."""
    manifest = json.loads((MODELS / f"{CLOUD_MODEL}.manifest.json").read_text())
    sc = manifest["scaler"]
    rng = np.random.default_rng(seed)
    med = np.array(sc["median"])
    scale = np.array(sc["scale"])
    z = rng.normal(0.0, 0.7, size=(n, med.size))
    x = med + z * scale
    for i, log1p in enumerate(sc["log1p"]):
        if log1p:
            x[:, i] = np.expm1(np.maximum(x[:, i], 0.0))
    x[:, 9:] = np.abs(x[:, 9:])
    x[:, 11:] = np.minimum(x[:, 11:], 1.0)
    outliers = np.arange(0, n, 5)
    x[outliers, 0] *= 40.0  # pkts_out
    x[outliers, 2] *= 40.0  # bytes_out
    x[outliers, 6] += 300.0  # tcp_starts_out
    x[outliers, 11] = 0.9  # mail_share
    return x


class ServiceProcess(ServerProcess):
    """``sampleflow model-service run`` on a loopback port, with the
    service's command-line ``args`` and extra environment ``env``."""

    def __init__(
        self, workdir: Path, args: list[str], env: dict[str, str] | None = None
    ) -> None:
        super().__init__(workdir)
        self.args = args
        self.env = env or {}

    label: ClassVar[str] = "model service"
    start_timeout_s: ClassVar[float] = _START_TIMEOUT_S
    poll_interval_s: ClassVar[float] = 0.1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"model-service-{id(self)}.log"

    def start(self, port: int | None = None) -> None:
        """Start on ``port`` (one try) or on a free port (three tries)."""
        self.launch(port)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "model-service",
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]

    def environment(self) -> dict[str, str]:
        return self.env

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1.0):
                return True
        except OSError:
            return False


def http_json(
    method: str, url: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    """One HTTP request with urllib; returns (status, parsed JSON or text)."""
    data = (
        raw
        if raw is not None
        else (None if body is None else json.dumps(body).encode())
    )
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")
