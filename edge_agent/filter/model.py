"""A loaded relay model: the TFLite auto-encoder plus its manifest.

A model is a ``<name>.manifest.json`` next to its ``<name>.tflite`` (format
in docs/models.md).  :func:`load_model` checks the manifest, the file's
sha256, the feature spec version and the interpreter's input signature, and
raises :class:`ModelLoadError` with a stable ``reason`` on any mismatch.

The interpreter is LiteRT's (``ai-edge-litert``).  Where that has no wheel
(it has x86_64 and aarch64 manylinux_2_27 wheels for CPython 3.11+), the
older ``tflite-runtime`` package offers the same ``Interpreter`` class and
is used if installed; neither is needed to import this module.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.features import FEATURE_SPEC_VERSION, FeatureScaler
from edge_agent.features.scoring import GlobalDetector, LossNormaliser

MANIFEST_FORMAT = "sampleflow-model/1"

#: The relay model shipped with the project (trained on CTU-13, 1:100, 300 s).
SHIPPED_RELAY_MANIFEST = "relay-ctu13s6-r100-w300.manifest.json"
#: Where an installed wheel puts the shipped relay model, under sys.prefix
#: (pyproject.toml, [tool.setuptools.data-files]).
INSTALLED_MODELS_DIR = Path("share") / "sampleflow" / "models"


def default_model_manifest() -> Path | None:
    """The shipped relay model's manifest, or None if neither copy exists.

    A development checkout or editable install has it in ``models/`` at the
    project root (next to the ``edge_agent`` package); an installed wheel
    has it under ``sys.prefix`` (:data:`INSTALLED_MODELS_DIR`).  The
    checkout wins, so a developer's retrained model is the one used.
    """
    candidates = (
        Path(__file__).resolve().parents[2] / "models" / SHIPPED_RELAY_MANIFEST,
        Path(sys.prefix) / INSTALLED_MODELS_DIR / SHIPPED_RELAY_MANIFEST,
    )
    return next((path for path in candidates if path.is_file()), None)


class ModelLoadError(Exception):
    """Raised when a model cannot be used; ``reason`` is a counter key.

    Reasons: ``missing``, ``bad_manifest``, ``checksum``, ``spec_version``,
    ``no_interpreter``, ``bad_model``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
    except ImportError:
        try:
            from tflite_runtime.interpreter import (  # noqa: PLC0415
                Interpreter,
            )
        except ImportError as exc:
            raise ModelLoadError(
                "no_interpreter",
                "no TFLite interpreter: install ai-edge-litert (or tflite-runtime)",
            ) from exc
    return Interpreter


@dataclass(frozen=True)
class Thresholds:
    """Score thresholds from the manifest (see docs/models.md)."""

    alert: float
    clear: float
    k: int
    n: int


class LoadedModel:
    """An immutable loaded model; :meth:`reconstruct` is thread-safe.

    The interpreter is driven under a lock with one thread; its input is
    resized only when the batch size differs from the previous call.
    """

    def __init__(
        self, manifest: Mapping[str, Any], model_path: Path, interpreter: Any
    ) -> None:
        self.manifest = manifest
        self.model_path = model_path
        self.name = str(manifest["name"])
        self.version = (
            f"{manifest['name']}:{manifest['version']}:{manifest['sha256'][:12]}"
        )
        self.scaler = FeatureScaler.from_dict(manifest["scaler"])
        self.normaliser = LossNormaliser.from_dict(manifest["loss_normaliser"])
        self.detector = GlobalDetector.from_dict(manifest["detector"])
        th = manifest["thresholds"]
        self.thresholds = Thresholds(
            alert=float(th["alert"]),
            clear=float(th["clear"]),
            k=int(th["hysteresis"]["k"]),
            n=int(th["hysteresis"]["n"]),
        )
        self.window_s = int(manifest["window_s"])
        self.n_features = len(self.scaler.names)
        self._interpreter = interpreter
        self._lock = threading.Lock()
        self._batch = -1
        self._input = interpreter.get_input_details()[0]["index"]
        self._output = interpreter.get_output_details()[0]["index"]

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """Run the auto-encoder on scaled rows ``(n, n_features)`` float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(
                f"model {self.name} takes (n, {self.n_features}) rows, got {x.shape}"
            )
        if x.shape[0] == 0:
            return x.copy()
        with self._lock:
            if x.shape[0] != self._batch:
                self._interpreter.resize_tensor_input(
                    self._input, [x.shape[0], self.n_features], strict=True
                )
                self._interpreter.allocate_tensors()
                self._batch = x.shape[0]
            self._interpreter.set_tensor(self._input, x)
            self._interpreter.invoke()
            return np.array(self._interpreter.get_tensor(self._output))


def load_model(manifest_path: Path | str) -> LoadedModel:
    """Load and check a model from its manifest path (see module doc)."""
    manifest_path = Path(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError("missing", f"no model manifest {manifest_path}") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            "bad_manifest", f"unreadable manifest {manifest_path}: {exc}"
        ) from exc
    try:
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(
                f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
            )
        if int(manifest["feature_spec_version"]) != FEATURE_SPEC_VERSION:
            raise ModelLoadError(
                "spec_version",
                f"model {manifest_path.name} was trained on feature spec "
                f"{manifest['feature_spec_version']}, this relay computes spec "
                f"{FEATURE_SPEC_VERSION}: ship a model trained on spec "
                f"{FEATURE_SPEC_VERSION}",
            )
        model_path = manifest_path.parent / str(manifest["model_file"])
        expected_sha = str(manifest["sha256"])
    except ModelLoadError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(
            "bad_manifest", f"bad manifest {manifest_path}: {exc}"
        ) from exc
    try:
        blob = model_path.read_bytes()
    except OSError as exc:
        raise ModelLoadError("missing", f"no model file {model_path}") from exc
    actual_sha = hashlib.sha256(blob).hexdigest()
    if actual_sha != expected_sha:
        raise ModelLoadError(
            "checksum",
            f"{model_path.name} has sha256 {actual_sha[:12]}..., the manifest "
            f"says {expected_sha[:12]}...",
        )
    interpreter_cls = _interpreter_class()
    # The builtin kernels without the default XNNPACK delegate: a model of a
    # few hundred weights gains nothing from it, and creating it prints an
    # INFO line on stderr, where the relay's JSON log goes.
    resolver = getattr(sys.modules[interpreter_cls.__module__], "OpResolverType", None)
    options: dict[str, Any] = {}
    if resolver is not None:
        options["experimental_op_resolver_type"] = (
            resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    try:
        interpreter = interpreter_cls(model_content=blob, num_threads=1, **options)
        interpreter.allocate_tensors()
        details = interpreter.get_input_details()[0]
        signature = [int(d) for d in details["shape_signature"]]
        n_features = len(manifest["features"])
        if signature != [-1, n_features] or details["dtype"] != np.float32:
            raise ValueError(
                f"input signature {signature} {details['dtype']}, expected "
                f"[-1, {n_features}] float32"
            )
        return LoadedModel(manifest, model_path, interpreter)
    except ModelLoadError:
        raise
    except Exception as exc:  # the interpreter raises plain RuntimeError/ValueError
        raise ModelLoadError(
            "bad_model", f"cannot load {model_path.name}: {exc}"
        ) from exc
