"""Training helpers: metrics, detector fit, thresholds, CLI, and (with
TensorFlow installed) the auto-encoder training and TFLite export."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cloud.training import commands
from cloud.training.detector import (
    average_precision,
    fit_detector,
    roc_auc,
    thresholds_from_budget,
)
from edge_agent.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
RELAY = ROOT / "models" / "relay-ctu13s6-r100-w300.manifest.json"
HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(
    not HAS_TF,
    reason="TensorFlow is not installed (optional 'train' extra; CI skips it)",
)


def test_average_precision_by_hand() -> None:
    """Ranking +,-,+,-: precision at the positives 1/1 and 2/3 -> AP 5/6."""
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.7, 0.1])
    assert average_precision(y, s) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(np.zeros(3), np.arange(3)))


def test_roc_auc_by_hand() -> None:
    """Pairs (pos, neg): 0.9>0.8, 0.9>0.1, 0.7<0.8, 0.7>0.1 -> 3/4; a tie
    counts one half."""
    y = np.array([1, 0, 1, 0])
    assert roc_auc(y, np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(0.75)
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_thresholds_from_budget() -> None:
    """Alert at the 99.9th percentile of normal scores, clear at the 99th.

    Scores 0..9999 / 10000: numpy's linear quantile of 0.999 over 10000
    points is at rank 0.999 * 9999 = 9989.001 -> 0.9989001.
    """
    s = np.arange(10000) / 10000
    th = thresholds_from_budget(s, budget=0.001, clear_quantile=0.99, k=2, n=3)
    assert th.alert == pytest.approx(0.9989001)
    assert th.clear == pytest.approx(0.99 * 9999 / 10000)
    assert (th.k, th.n) == (2, 3)
    with pytest.raises(ValueError, match="budget"):
        thresholds_from_budget(s, budget=0)


def test_detector_weights_follow_the_signal() -> None:
    """Positives high on input 0 only: weight 0 grows, the anti-signal
    input 1 (lower for positives) is held at 0 by the >= 0 constraint."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 3))
    y = np.zeros(2000, dtype=bool)
    y[:100] = True
    z[:100, 0] += 4.0
    z[:100, 1] -= 4.0
    det = fit_detector(z, y, ("mail_share", "pkts_out", "total"))
    assert det.weights[0] > 1.0
    assert det.weights[1] == 0.0
    assert average_precision(y, det.score(z)) > 0.95
    flat = fit_detector(z, np.zeros(2000, dtype=bool), ("a", "b", "c"))
    np.testing.assert_allclose(flat.weights, [1 / 3] * 3)


def test_cli_has_models_train_and_evaluate() -> None:
    """The entry point adds 'models train' and 'models evaluate'."""
    args = build_parser().parse_args(["models", "train", "--rate", "1000"])
    assert args.rate == 1000 and args.func is commands.run_train
    args = build_parser().parse_args(["models", "evaluate", str(RELAY)])
    assert args.func is commands.run_evaluate


def test_models_group_is_extensible() -> None:
    """Another module can add 'models push' to the same group, before or
    after this one registers."""
    for order in ("push_first", "train_first"):
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")

        def add_push(s: argparse._SubParsersAction) -> None:
            push = commands.models_subparsers(s).add_parser("push")
            push.set_defaults(func=lambda _a: 0)

        if order == "push_first":
            add_push(sub)
            commands.register(sub)
        else:
            commands.register(sub)
            add_push(sub)
        assert parser.parse_args(["models", "push"]).func(None) == 0
        assert parser.parse_args(["models", "train"]).func is commands.run_train


def test_shipped_manifest_records_its_training() -> None:
    """The default relay model carries its data, seeds, command and metrics."""
    m = json.loads(RELAY.read_text())
    t = m["training"]
    assert t["sampling_rate"] == 100 and t["thinning_seeds"] == [6, 7, 8, 9]
    assert t["command"].startswith("sampleflow models train --rate 100")
    assert 0 < m["thresholds"]["clear"] <= m["thresholds"]["alert"] < 1
    test = m["metrics"]["test"]
    assert test["positive_windows"] > 0 and 0 <= test["pr_auc"] <= 1


def test_evaluate_reproduces_the_manifest_metrics() -> None:
    """Scoring the .tflite through LiteRT on the training seeds gives the
    test metrics the trainer computed with the numpy forward pass."""
    from cloud.training.evaluate import evaluate_manifest  # noqa: PLC0415

    m = json.loads(RELAY.read_text())
    got = evaluate_manifest(RELAY, seed=6, n_seeds=4)
    want = m["metrics"]["test"]
    assert got["test"]["positive_windows"] == want["positive_windows"]
    assert got["test"]["normal_windows"] == want["normal_windows"]
    assert got["test"]["pr_auc"] == pytest.approx(want["pr_auc"], abs=1e-3)
    assert got["test"]["roc_auc"] == pytest.approx(want["roc_auc"], abs=1e-3)


@needs_tf
def test_autoencoder_training_is_seeded_and_exports_dynamic_batch() -> None:
    """Same seed, same weights; the .tflite takes any batch size and equals
    the numpy forward pass."""
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    from cloud.training.autoencoder import (  # noqa: PLC0415
        export_tflite,
        forward,
        train_autoencoder,
    )

    x = np.random.default_rng(1).normal(size=(512, 12)).astype(np.float32)
    a = train_autoencoder(x, (8, 4, 8), seed=3, epochs=2, batch_size=64)
    b = train_autoencoder(x, (8, 4, 8), seed=3, epochs=2, batch_size=64)
    for wa, wb in zip(a, b, strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert [w.shape for w in a[::2]] == [(12, 8), (8, 4), (4, 8), (8, 12)]
    interp = Interpreter(model_content=export_tflite(a), num_threads=1)
    inp = interp.get_input_details()[0]
    assert list(inp["shape_signature"]) == [-1, 12]
    assert inp["dtype"] == np.float32
    for n in (1, 33):
        interp.resize_tensor_input(inp["index"], [n, 12], strict=True)
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], x[:n])
        interp.invoke()
        out = interp.get_tensor(interp.get_output_details()[0]["index"])
        np.testing.assert_allclose(out, forward(a, x[:n]), atol=1e-5)
