"""Full-network totals from sampled flow counters, with confidence intervals.

Pure numpy; Spark only sums the per-row statistics defined here, so the
math lives in one place and is tested by hand computations.

The model
---------
A router sampling 1 packet in ``N`` (``sampling_rate`` N, probability
``p = 1/N``) keeps each packet independently with probability ``p``.  Of
a true total of ``T`` packets it samples ``n ~ Binomial(T, p)``, so

* packets: ``T̂ = n / p = n·N`` is unbiased, with
  ``Var(T̂) = T(1 − p)/p``, estimated by plugging in ``T̂``:
  ``Var ≈ T̂·(1/p − 1) = n·N·(N − 1)``;
* bytes: ``B̂ = b·N`` (``b`` the sampled bytes) is unbiased, with
  ``Var(B̂) = Σ_i s_i²·(1 − p)/p`` over every packet ``i`` of size ``s_i``,
  estimated (Horvitz–Thompson) by ``Σ_sampled s_i²·(1 − p)/p²``.  An
  aggregated row carries only its sums ``b`` and ``n``, so its packets are
  taken as all of the mean size ``b/n``: ``Var ≈ (b²/n)·N·(N − 1)``.
  Known shortcoming: with mixed packet sizes this understates the
  variance (``Σ s_i² ≥ b²/n``), so byte intervals are somewhat too narrow.

Rows are independent, so estimates and variances add over rows (and over
rows with different sampling rates).  The interval is the normal
approximation ``T̂ ± z·√Var`` with its lower end raised to the sampled
count itself (at least the sampled packets exist).  ``N = 1`` (unsampled)
gives zero variance.  Rows with an unknown rate (``sampling_rate`` 0) cannot
be scaled: they are left out of the estimate and counted on their own.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

#: Per-row (and per-group, once summed) statistics, all float64.
STAT_FIELDS: tuple[str, ...] = (
    "rows",
    "sampled_packets",
    "sampled_bytes",
    "est_packets",
    "var_packets",
    "est_bytes",
    "var_bytes",
    "unknown_rate_rows",
    "unknown_rate_packets",
    "unknown_rate_bytes",
)


def row_statistics(
    packets: np.ndarray, bytes_: np.ndarray, sampling_rate: np.ndarray
) -> dict[str, np.ndarray]:
    """The additive statistics of each row (see the module docstring).

    ``packets`` and ``bytes_`` are the sampled (as exported) counters,
    ``sampling_rate`` the 1-in-N rate (0 = unknown).  Returns one float64
    array per name in :data:`STAT_FIELDS`.  Rows with no packets but bytes
    (malformed exports) add to the byte estimate without variance.
    """
    n = np.asarray(packets, dtype=np.float64)
    b = np.asarray(bytes_, dtype=np.float64)
    rate = np.asarray(sampling_rate, dtype=np.float64)
    if not n.shape == b.shape == rate.shape:
        raise ValueError(
            f"packets, bytes and sampling_rate must have one shape, got "
            f"{n.shape}, {b.shape}, {rate.shape}"
        )
    known = rate > 0
    scale = np.where(known, rate, 0.0)
    spread = scale * (scale - 1.0)  # N(N-1) = (1/p)(1/p - 1)
    mean_size_sq = np.divide(b * b, n, out=np.zeros_like(b), where=n > 0)
    return {
        "rows": known.astype(np.float64),
        "sampled_packets": np.where(known, n, 0.0),
        "sampled_bytes": np.where(known, b, 0.0),
        "est_packets": n * scale,
        "var_packets": n * spread,
        "est_bytes": b * scale,
        "var_bytes": mean_size_sq * spread,
        "unknown_rate_rows": (~known).astype(np.float64),
        "unknown_rate_packets": np.where(known, 0.0, n),
        "unknown_rate_bytes": np.where(known, 0.0, b),
    }


def sum_statistics(
    stats: Mapping[str, np.ndarray], groups: np.ndarray, n_groups: int
) -> dict[str, np.ndarray]:
    """Sum per-row statistics into ``n_groups`` groups (codes in ``groups``)."""
    codes = np.asarray(groups, dtype=np.int64)
    return {
        name: np.bincount(codes, weights=stats[name], minlength=n_groups)
        for name in STAT_FIELDS
    }


def z_for(confidence: float) -> float:
    """The two-sided normal quantile for a confidence level in (0, 1)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


@dataclass(frozen=True)
class Interval:
    """An estimate and its confidence interval (arrays or scalars)."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray


def interval(
    estimate: np.ndarray, variance: np.ndarray, floor: np.ndarray, z: float
) -> Interval:
    """``estimate ± z·√variance``, the low end raised to ``floor``."""
    est = np.asarray(estimate, dtype=np.float64)
    half = z * np.sqrt(np.maximum(np.asarray(variance, dtype=np.float64), 0.0))
    low = np.maximum(est - half, np.asarray(floor, dtype=np.float64))
    return Interval(est, low, est + half)


def packet_interval(stats: Mapping[str, np.ndarray], z: float) -> Interval:
    """The full-network packet count of summed statistics."""
    return interval(
        stats["est_packets"], stats["var_packets"], stats["sampled_packets"], z
    )


def byte_interval(stats: Mapping[str, np.ndarray], z: float) -> Interval:
    """The full-network byte count of summed statistics."""
    return interval(stats["est_bytes"], stats["var_bytes"], stats["sampled_bytes"], z)
