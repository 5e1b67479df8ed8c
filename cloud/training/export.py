"""Test fixtures derived from a trained model (need TensorFlow to build)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cloud.training.autoencoder import export_nan_tflite

NAN_MODEL_NAME = "nan-model"


def write_nan_fixture(out_dir: Path, like_manifest: Path) -> Path:
    """Write ``nan-model.tflite`` + manifest into ``out_dir``.

    The model has the input signature of ``like_manifest``'s model but every
    output is NaN (sqrt(-1)); its manifest copies the statistics of
    ``like_manifest`` so it loads like a real model.  The relay filter's
    tests use it to check that non-finite output passes data through.
    """
    manifest = json.loads(Path(like_manifest).read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blob = export_nan_tflite(len(manifest["features"]))
    model_path = out_dir / f"{NAN_MODEL_NAME}.tflite"
    model_path.write_bytes(blob)
    manifest.update(
        name=NAN_MODEL_NAME,
        model_file=model_path.name,
        sha256=hashlib.sha256(blob).hexdigest(),
        bytes=len(blob),
        weights_file=None,
        weights_sha256=None,
        metrics={},
    )
    manifest["training"] = {
        "note": f"test fixture: NaN output, stats of {manifest['kind']} model"
    }
    path = out_dir / f"{NAN_MODEL_NAME}.manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
