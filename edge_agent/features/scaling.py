"""Per-network robust scaling of feature rows, stored with each model.

``x -> clip((f(x) - median) / scale, -clip, clip)`` per feature, where ``f``
is ``log1p`` for counts and the identity otherwise, and ``median`` and
``scale`` come from that network's own normal windows.  ``scale`` is the
inter-quartile range; when it is zero (a feature that is 0 in most windows,
such as ``mail_share``) the standard deviation is used, and 1.0 if that is
zero too, so that rare non-zero values stay visible instead of dividing by
zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.features import spec
from edge_agent.features.extract import FeatureSpecError, HostWindows

DEFAULT_CLIP = 10.0
_TINY = 1e-9


@dataclass(frozen=True)
class FeatureScaler:
    """Select, transform and scale the model's features from host windows."""

    names: tuple[str, ...]
    median: np.ndarray  # float64, one per name, after log1p where applied
    scale: np.ndarray  # float64, > 0
    spec_version: int = spec.FEATURE_SPEC_VERSION
    clip: float = DEFAULT_CLIP

    @classmethod
    def fit(
        cls,
        windows: HostWindows,
        names: tuple[str, ...] = spec.FEATURE_NAMES,
        clip: float = DEFAULT_CLIP,
    ) -> FeatureScaler:
        """Fit median and scale on (normal) host windows."""
        if len(windows) == 0:
            raise ValueError("cannot fit a scaler on zero host windows")
        x = _transform(windows.values[:, spec.feature_index(names)], names)
        q25, median, q75 = np.percentile(x, [25.0, 50.0, 75.0], axis=0)
        scale = q75 - q25
        std = x.std(axis=0)
        scale = np.where(scale > _TINY, scale, np.where(std > _TINY, std, 1.0))
        return cls(
            names=tuple(names),
            median=median,
            scale=scale,
            spec_version=windows.spec_version,
            clip=clip,
        )

    def transform(self, windows: HostWindows) -> np.ndarray:
        """Return the scaled ``(n, len(names))`` float32 model input.

        Raises :class:`FeatureSpecError` when the rows were computed with
        another feature spec version than the one this scaler was fit on.
        """
        if windows.spec_version != self.spec_version:
            raise FeatureSpecError(
                f"feature rows have spec version {windows.spec_version}, the "
                f"model was trained on spec version {self.spec_version}: "
                "retrain the model or compute features with the matching spec"
            )
        x = _transform(windows.values[:, spec.feature_index(self.names)], self.names)
        z = (x - self.median) / self.scale
        return np.clip(z, -self.clip, self.clip).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the model manifest)."""
        return {
            "feature_spec_version": self.spec_version,
            "features": list(self.names),
            "log1p": [n in spec.LOG1P_FEATURES for n in self.names],
            "median": [float(v) for v in self.median],
            "scale": [float(v) for v in self.scale],
            "clip": float(self.clip),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureScaler:
        """Inverse of :meth:`to_dict`; checks lengths and the log1p flags."""
        names = tuple(str(n) for n in data["features"])
        spec.feature_index(names)
        median = np.asarray(data["median"], dtype=np.float64)
        scale = np.asarray(data["scale"], dtype=np.float64)
        if median.shape != (len(names),) or scale.shape != (len(names),):
            raise ValueError(
                f"scaler has {len(names)} features but {median.size} medians "
                f"and {scale.size} scales"
            )
        if not np.all(scale > 0):
            raise ValueError("scaler scales must all be > 0")
        expected = [n in spec.LOG1P_FEATURES for n in names]
        if "log1p" in data and list(data["log1p"]) != expected:
            raise FeatureSpecError(
                "scaler log1p flags do not match this code's feature spec"
            )
        return cls(
            names=names,
            median=median,
            scale=scale,
            spec_version=int(data["feature_spec_version"]),
            clip=float(data.get("clip", DEFAULT_CLIP)),
        )


def _transform(x: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    out = np.array(x, dtype=np.float64)
    for i, name in enumerate(names):
        if name in spec.LOG1P_FEATURES:
            out[:, i] = np.log1p(np.maximum(out[:, i], 0.0))
    return out
