"""Grouped richness and entropy estimators, vectorised over many groups.

The input is one row per observation: a group id (a host-window) and a
value key (a destination address or port), with an integer weight (how many
sampled records the row stands for).  :func:`abundances` collapses equal
(group, value) pairs; :func:`chao1` and :func:`entropy_bits` then reduce the
abundances per group with ``bincount``.
"""

from __future__ import annotations

import numpy as np


def abundances(
    group: np.ndarray, keys: list[np.ndarray], weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``weight`` over equal (group, *keys) rows.

    ``group`` is an int64 group id per row, ``keys`` a list of integer
    arrays (one value may span several arrays, e.g. the two 64-bit halves of
    an address), ``weight`` an int64 count per row.  Returns
    ``(group_of_pair, abundance)``: one entry per distinct (group, value)
    pair.
    """
    if group.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # lexsort sorts by the last key first: group is the primary key.
    order = np.lexsort((*reversed(keys), group))
    g = group[order]
    change = np.zeros(g.size, dtype=bool)
    change[0] = True
    change[1:] = g[1:] != g[:-1]
    for k in keys:
        ks = k[order]
        change[1:] |= ks[1:] != ks[:-1]
    starts = np.flatnonzero(change)
    abundance = np.add.reduceat(weight[order].astype(np.int64), starts)
    return g[starts], abundance


def chao1(pair_group: np.ndarray, abundance: np.ndarray, n_groups: int) -> np.ndarray:
    """Chao1 richness per group: ``S_obs + f1**2 / (2 f2)``.

    ``f1`` and ``f2`` are the numbers of values seen exactly once and twice
    in the group.  When ``f2 == 0`` the bias-corrected form
    ``S_obs + f1 (f1 - 1) / 2`` is used.  Groups without observations get 0.
    """
    s_obs = np.bincount(pair_group, minlength=n_groups).astype(np.float64)
    f1 = np.bincount(pair_group, weights=abundance == 1, minlength=n_groups)
    f2 = np.bincount(pair_group, weights=abundance == 2, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        corrected = np.where(
            f2 > 0, f1 * f1 / (2.0 * np.maximum(f2, 1.0)), f1 * (f1 - 1.0) / 2.0
        )
    return s_obs + corrected


def entropy_bits(
    pair_group: np.ndarray, abundance: np.ndarray, n_groups: int
) -> np.ndarray:
    """Plug-in Shannon entropy (bits) of the values in each group.

    ``H = log2(A) - sum(a log2 a) / A`` with ``a`` the abundances and ``A``
    their sum.  The plug-in estimate is biased low when few records were
    sampled; it is used as is because the model learns its normal level.
    Groups without observations get 0.
    """
    a = abundance.astype(np.float64)
    total = np.bincount(pair_group, weights=a, minlength=n_groups)
    a_log_a = np.bincount(pair_group, weights=a * np.log2(a), minlength=n_groups)
    out = np.zeros(n_groups, dtype=np.float64)
    seen = total > 0
    out[seen] = np.log2(total[seen]) - a_log_a[seen] / total[seen]
    # Rounding can give -1e-16 for a single value.
    return np.maximum(out, 0.0)
