"""From auto-encoder reconstructions to a threat score and class.

Three steps, all numpy, shared by the relay filter and the cloud engine:

1. Per-feature reconstruction loss ``(x - x_hat)**2`` on the scaled rows,
   plus their mean (``total``).
2. :class:`LossNormaliser`: ``z = (log(loss + eps) - mean) / std`` with the
   mean and std of ``log(loss + eps)`` over that network's own held-out
   normal windows, clipped to ±10.  After this step a z of 3 means "three
   standard deviations above this network's normal", on every network.
3. :class:`GlobalDetector`: a logistic regression on the z values, one set of
   weights for every network using the same model layout.  The class is the
   feature group with the largest weighted contribution.

Thresholds come from an alert budget (a percentile of the scores of normal
windows) and are applied with hysteresis, see :func:`hysteresis`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.features import spec

LOSS_EPS = 1e-4
Z_CLIP = 10.0
TOTAL = "total"

#: Threat class of each feature: the group whose losses explain a score.
FEATURE_CLASS: dict[str, str] = {
    "pkts_out": "volume",
    "pkts_in": "volume",
    "bytes_out": "volume",
    "bytes_in": "volume",
    "records_out": "volume",
    "records_in": "volume",
    "tcp_starts_out": "scan",
    "dst_addrs_out": "scan",
    "dst_ports_out": "scan",
    "dst_addr_entropy": "scan",
    "dst_port_entropy": "scan",
    "failed_tcp_share": "scan",
    "mail_share": "spam",
    "dns_share": "dns",
    "irc_share": "irc",
    TOTAL: "volume",
}
THREAT_CLASSES: tuple[str, ...] = ("none", "volume", "scan", "spam", "dns", "irc")

if set(FEATURE_CLASS) != {*spec.FEATURE_NAMES, TOTAL}:  # pragma: no cover
    raise RuntimeError("FEATURE_CLASS must cover every feature")


def reconstruction_losses(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    """Squared error per feature plus the mean as a last column, float64."""
    err = (np.asarray(x, np.float64) - np.asarray(x_hat, np.float64)) ** 2
    return np.concatenate([err, err.mean(axis=1, keepdims=True)], axis=1)


@dataclass(frozen=True)
class LossNormaliser:
    """Per-network statistics of ``log(loss + eps)`` on normal windows."""

    inputs: tuple[str, ...]  # model features, then "total"
    mean: np.ndarray
    std: np.ndarray
    eps: float = LOSS_EPS

    @classmethod
    def fit(cls, losses: np.ndarray, names: tuple[str, ...]) -> LossNormaliser:
        """Fit on the losses of held-out normal windows (see module doc)."""
        u = np.log(losses + LOSS_EPS)
        std = u.std(axis=0)
        return cls(
            inputs=(*names, TOTAL),
            mean=u.mean(axis=0),
            std=np.where(std > 1e-9, std, 1.0),
        )

    def transform(self, losses: np.ndarray) -> np.ndarray:
        """Normalised losses ``z``, same shape as ``losses``."""
        z = (np.log(losses + self.eps) - self.mean) / self.std
        return np.clip(z, -Z_CLIP, Z_CLIP)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the model manifest)."""
        return {
            "inputs": list(self.inputs),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "eps": self.eps,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossNormaliser:
        """Inverse of :meth:`to_dict`."""
        inputs = tuple(str(n) for n in data["inputs"])
        mean = np.asarray(data["mean"], np.float64)
        std = np.asarray(data["std"], np.float64)
        if mean.shape != (len(inputs),) or std.shape != (len(inputs),):
            raise ValueError("loss statistics do not match their input names")
        return cls(inputs=inputs, mean=mean, std=std, eps=float(data["eps"]))


@dataclass(frozen=True)
class GlobalDetector:
    """Logistic regression on normalised losses: ``sigmoid(z @ w + b)``."""

    inputs: tuple[str, ...]
    weights: np.ndarray
    bias: float

    def logit(self, z: np.ndarray) -> np.ndarray:
        """The linear score ``z @ w + b`` (before the sigmoid)."""
        return np.asarray(z, np.float64) @ self.weights + self.bias

    def score(self, z: np.ndarray) -> np.ndarray:
        """Threat score in [0, 1] per row."""
        return 1.0 / (1.0 + np.exp(-np.clip(self.logit(z), -50.0, 50.0)))

    def classify(self, z: np.ndarray) -> np.ndarray:
        """Index into :data:`THREAT_CLASSES` of each row's dominant group.

        Rows whose weighted contributions are all <= 0 get ``"none"``.
        """
        contrib = np.asarray(z, np.float64) * self.weights
        classes = THREAT_CLASSES[1:]
        per_class = np.stack(
            [
                np.clip(contrib, 0.0, None)[
                    :, [FEATURE_CLASS[n] == c for n in self.inputs]
                ].sum(axis=1)
                for c in classes
            ],
            axis=1,
        )
        best = per_class.argmax(axis=1) + 1
        return np.where(per_class.max(axis=1) > 0, best, 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the model manifest)."""
        return {
            "kind": "logistic",
            "inputs": list(self.inputs),
            "weights": [float(v) for v in self.weights],
            "bias": float(self.bias),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GlobalDetector:
        """Inverse of :meth:`to_dict`."""
        if data.get("kind", "logistic") != "logistic":
            raise ValueError(f"unknown detector kind {data.get('kind')!r}")
        inputs = tuple(str(n) for n in data["inputs"])
        weights = np.asarray(data["weights"], np.float64)
        if weights.shape != (len(inputs),):
            raise ValueError("detector weights do not match their input names")
        return cls(inputs=inputs, weights=weights, bias=float(data["bias"]))


def hysteresis(
    above_alert: np.ndarray, above_clear: np.ndarray, k: int, n: int
) -> np.ndarray:
    """Alert state per (host, window) with k-of-n raising and n-window clearing.

    ``above_alert`` and ``above_clear`` are ``(hosts, windows)`` booleans:
    score >= alert threshold, score >= clear threshold (clear <= alert).
    An alert is raised at a window when at least ``k`` of the last ``n``
    windows (this one included) were above the alert threshold, and cleared
    once ``n`` windows in a row were below the clear threshold.
    """
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    hosts, windows = above_alert.shape
    active = np.zeros((hosts, windows), dtype=bool)
    state = np.zeros(hosts, dtype=bool)
    alert_run = np.zeros((hosts, n), dtype=bool)  # ring of the last n windows
    quiet = np.zeros(hosts, dtype=np.int64)  # windows in a row below clear
    for w in range(windows):  # loop over windows, vectorised over hosts
        alert_run[:, w % n] = above_alert[:, w]
        quiet = np.where(above_clear[:, w], 0, quiet + 1)
        state = np.where(state, quiet < n, alert_run.sum(axis=1) >= k)
        active[:, w] = state
    return active
