"""The per-network auto-encoders: Keras training and float32 TFLite export.

TensorFlow is an optional dependency (``pip install -e '.[train]'``); it is
imported inside the functions that need it, so the rest of the training
package (loaders, thinning, evaluation) imports without it.

Layout: dense layers with ``tanh`` on every hidden layer and a linear
output; the relay's is 12-8-4-8-12, the cloud's 15-32-16-6-16-32-15.  The
weights are also saved as ``.npz`` (``W0, b0, W1, b1, ...``) so anyone can
recompute the forward pass without TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

HIDDEN_ACTIVATION = "tanh"
OUTPUT_ACTIVATION = "linear"


class TensorFlowMissingError(RuntimeError):
    """Raised when training is asked for but TensorFlow is not installed."""


def import_tensorflow() -> Any:
    """Import TensorFlow quietly, or raise :class:`TensorFlowMissingError`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf  # noqa: PLC0415 - optional, heavy
    except ImportError as exc:
        raise TensorFlowMissingError(
            "training needs TensorFlow: pip install -e '.[train]' "
            "(in a separate venv, see docs/models.md)"
        ) from exc
    return tf


def train_autoencoder(
    x: np.ndarray,
    hidden: Sequence[int],
    *,
    seed: int,
    epochs: int,
    batch_size: int = 256,
    learning_rate: float = 2e-3,
) -> list[np.ndarray]:
    """Train on scaled rows ``x`` (n, f); return ``[W0, b0, W1, b1, ...]``.

    Seeded and deterministic (op determinism on, fixed thread counts): the
    same inputs give the same weights on the same TensorFlow build.
    """
    tf = import_tensorflow()
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    n_features = x.shape[1]
    layers = [tf.keras.Input(shape=(n_features,), dtype="float32")]
    model = tf.keras.Sequential(
        [
            *layers,
            *[tf.keras.layers.Dense(h, activation=HIDDEN_ACTIVATION) for h in hidden],
            tf.keras.layers.Dense(n_features, activation=OUTPUT_ACTIVATION),
        ]
    )
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate=learning_rate), loss="mse"
    )
    model.fit(
        x.astype(np.float32),
        x.astype(np.float32),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
    )
    out: list[np.ndarray] = []
    for layer in model.layers:
        w, b = layer.get_weights()
        out += [np.asarray(w, np.float32), np.asarray(b, np.float32)]
    return out


def forward(weights: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Numpy forward pass of the layout above (float32)."""
    h = np.asarray(x, np.float32)
    n_layers = len(weights) // 2
    for i in range(n_layers):
        h = h @ weights[2 * i] + weights[2 * i + 1]
        if i < n_layers - 1:
            h = np.tanh(h)
    return h


def export_tflite(weights: Sequence[np.ndarray]) -> bytes:
    """Convert the weights to a float32 ``.tflite`` with a dynamic batch.

    Built from a ``tf.function`` whose input signature is ``[None, f]``, so
    the interpreter accepts any batch size after ``resize_tensor_input``.
    """
    tf = import_tensorflow()
    consts = [tf.constant(w) for w in weights]
    n_features = int(weights[0].shape[0])
    n_layers = len(consts) // 2

    @tf.function(input_signature=[tf.TensorSpec([None, n_features], tf.float32)])
    def reconstruct(x: Any) -> Any:
        h = x
        for i in range(n_layers):
            h = tf.matmul(h, consts[2 * i]) + consts[2 * i + 1]
            if i < n_layers - 1:
                h = tf.tanh(h)
        return h

    return _convert(tf, reconstruct)


def export_nan_tflite(n_features: int) -> bytes:
    """A test fixture: a dynamic-batch model whose every output is NaN."""
    tf = import_tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([None, n_features], tf.float32)])
    def broken(x: Any) -> Any:
        return tf.math.sqrt(x * 0.0 - 1.0)

    return _convert(tf, broken)


def _convert(tf: Any, fn: Any) -> bytes:
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [fn.get_concrete_function()], fn
    )
    # float32 on purpose: no quantisation (int8 would move the losses that
    # the thresholds were set on).
    converter.optimizations = []
    return bytes(converter.convert())
