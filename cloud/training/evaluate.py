"""Evaluating a model on CTU-13 or CIC-IDS2017 replayed at any sampling rate.

Runs the model's ``.tflite`` through the relay's own loader (LiteRT), so the
numbers are those of the artifact, not of the Keras model it came from; no
TensorFlow is needed.  Thinning seeds are other than the training ones
(default 1000, 1001, ...); at 1:1 thinning draws every packet, so one run.

CTU-13 (:func:`evaluate_ctu13`): the test period (slices 20-25, never used
in training) by default, or the whole capture (``period="all"``) to time
the detection of the infected host from the start of its infection; over
the whole capture the normal windows of slices 0-19 were training or
validation data, so its false alert numbers are in-sample and optimistic
(the infected host's windows of slices 0-13 were never fit on).

CIC-IDS2017 (:func:`evaluate_cicids`): a model whose per-network part was
refit there (:mod:`cloud.training.transfer`); metrics per attack class on
the test hours (see :mod:`cloud.training.cicids`).

Metrics per run and their mean and spread over runs: :mod:`cloud.training.metrics`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from cloud.training import cicids, ctu13
from cloud.training.dataset import (
    TEST,
    TRAIN,
    VALIDATION,
    LabelledWindows,
    build_windows,
    host_keys,
    period_bounds,
)
from cloud.training.detector import Thresholds
from cloud.training.metrics import (
    AlertRule,
    RunRows,
    onset_ms,
    run_metrics,
    summarise_runs,
)
from cloud.training.thinning import cut_active_timeout, thin
from cloud.training.train import PeriodRows, window_metrics
from edge_agent.features import HostWindows
from edge_agent.features.scoring import reconstruction_losses
from edge_agent.filter.model import LoadedModel, load_model
from edge_agent.flows.schema import address_bytes

log = structlog.get_logger(__name__)

#: Evaluation periods of CTU-13 and the dataset periods they cover.
PERIODS: dict[str, tuple[int, ...]] = {
    "test": (TEST,),
    "all": (TRAIN, VALIDATION, TEST),
}
DATASETS = ("ctu13", "cicids2017")
DEFAULT_SEED = 1000


def run_seeds(rate: int, seed: int, n_seeds: int) -> list[int]:
    """Thinning seeds of an evaluation: one at 1:1, else ``n_seeds``."""
    if n_seeds < 1:
        raise ValueError(f"need at least one seed, got {n_seeds}")
    return [seed] if rate == 1 else [seed + i for i in range(n_seeds)]


def score_windows(
    model: LoadedModel, windows: HostWindows
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(score, z, losses)`` of every window through the model's ``.tflite``.

    Raises ``ValueError`` when the model gives non-finite output.
    """
    x = model.scaler.transform(windows)
    x_hat = model.reconstruct(x)
    if not np.all(np.isfinite(x_hat)):
        raise ValueError(f"model {model.name} gave non-finite output")
    losses = reconstruction_losses(x, x_hat)
    z = model.normaliser.transform(losses)
    return model.detector.score(z), z, losses


def alert_rule(model: LoadedModel) -> AlertRule:
    """The model's thresholds and hysteresis."""
    th = model.thresholds
    return AlertRule(alert=th.alert, clear=th.clear, k=th.k, n=th.n)


def dataset_of(model: LoadedModel) -> str:
    """Which dataset a model belongs to: its manifest's ``training.network``."""
    return str(model.manifest.get("training", {}).get("network", "ctu13"))


# CTU-13 ---------------------------------------------------------------------


@dataclasses.dataclass
class Ctu13Source:
    """CTU-13 flows loaded once, with window sets cached per realisation."""

    flows: ctu13.ArgusFlows
    _cache: dict[tuple[int, int, int], LabelledWindows] = dataclasses.field(
        default_factory=dict
    )

    @classmethod
    def load(cls, dataset_dir: Path | None = None) -> Ctu13Source:
        """Parse the 26 slices (see :func:`cloud.training.ctu13.dataset_dir`)."""
        return cls(ctu13.load_flows(dataset_dir))

    def windows(self, rate: int, seed: int, window_s: int) -> LabelledWindows:
        """Labelled windows of one realisation (computed once)."""
        key = (rate, seed, window_s)
        if key not in self._cache:
            self._cache[key] = build_windows(self.flows, rate, seed, window_s)
        return self._cache[key]

    def first_slot_ms(self, period: str, window_s: int) -> int:
        """Start of the first window of ``period``."""
        window_ms = window_s * 1000
        if period == "all":
            return int(self.flows.start_ms.min()) // window_ms * window_ms
        _, test_ms = period_bounds(self.flows)
        return -(-test_ms // window_ms) * window_ms

    def references_ms(self, first_slot_ms: int) -> dict[str, float]:
        """Reference times (ms) for detection, from the unsampled flows that
        start at or after ``first_slot_ms``: the infected host's first flow,
        its first botnet flow, and the botnet onset
        (:func:`cloud.training.metrics.onset_ms`)."""
        f = self.flows
        infected = np.frombuffer(address_bytes(ctu13.INFECTED_HOST), "V16")[0]
        later = f.start_ms >= first_slot_ms
        touches = (f.src_addr == infected) | (f.dst_addr == infected)
        bot = f.label == ctu13.LABEL_BOTNET
        nan = float("nan")
        return {
            "first_activity": float(f.start_ms[later & touches].min())
            if (later & touches).any()
            else nan,
            "first_malicious": float(f.start_ms[later & bot].min())
            if (later & bot).any()
            else nan,
            "onset": onset_ms(f.start_ms[later & bot]),
        }


def _ctu13_rows(
    lw: LabelledWindows, periods: tuple[int, ...]
) -> tuple[np.ndarray, PeriodRows]:
    """Mask of one realisation's windows in ``periods`` and their rows."""
    mask = np.isin(lw.period, periods)
    w = lw.windows
    return mask, PeriodRows(
        values=w.values[mask],
        label=lw.label[mask],
        seed=np.full(int(mask.sum()), lw.seed),
        host=host_keys(w)[mask],
        window_start_ms=w.window_start_ms[mask],
        spec_version=w.spec_version,
        window_s=w.window_s,
    )


def _concat_rows(parts: Sequence[PeriodRows]) -> PeriodRows:
    return PeriodRows(
        values=np.concatenate([p.values for p in parts]),
        label=np.concatenate([p.label for p in parts]),
        seed=np.concatenate([p.seed for p in parts]),
        host=np.concatenate([p.host for p in parts]),
        window_start_ms=np.concatenate([p.window_start_ms for p in parts]),
        spec_version=parts[0].spec_version,
        window_s=parts[0].window_s,
    )


def evaluate_ctu13(
    model: LoadedModel,
    source: Ctu13Source,
    *,
    rate: int,
    seed: int = DEFAULT_SEED,
    n_seeds: int = 4,
    period: str = "test",
) -> dict[str, Any]:
    """Metrics of one model on CTU-13 at 1:``rate`` (see module doc).

    The result holds the pooled metrics of all runs under the period's name
    (as the trainer computes them), ``runs`` (one dict per seed, from
    :func:`cloud.training.metrics.run_metrics`) and ``summary`` (mean, std,
    min, max of each run metric).
    """
    if period not in PERIODS:
        raise ValueError(f"unknown period {period!r}; valid: {', '.join(PERIODS)}")
    seeds = run_seeds(rate, seed, n_seeds)
    window_s = model.window_s
    first_slot = source.first_slot_ms(period, window_s)
    refs = source.references_ms(first_slot)
    infected = np.frombuffer(address_bytes(ctu13.INFECTED_HOST), "V16")[0]
    rule = alert_rule(model)
    parts: list[PeriodRows] = []
    scores: list[np.ndarray] = []
    zs: list[np.ndarray] = []
    losses: list[np.ndarray] = []
    runs: list[dict[str, Any]] = []
    for s in seeds:
        lw = source.windows(rate, s, window_s)
        mask, rows = _ctu13_rows(lw, PERIODS[period])
        windows = dataclasses.replace(
            lw.windows,
            host=lw.windows.host[mask],
            window_start_ms=rows.window_start_ms,
            values=rows.values,
        )
        score, z, loss = score_windows(model, windows)
        parts.append(rows)
        scores.append(score)
        zs.append(z)
        losses.append(loss)
        run_rows = RunRows(
            host=rows.host,
            window_start_ms=rows.window_start_ms,
            label=rows.label,
            score=score,
            target=windows.host == infected,
            window_s=window_s,
            first_slot_ms=first_slot,
            last_slot_ms=int(rows.window_start_ms.max()),
        )
        runs.append({"seed": s, **run_metrics(run_rows, rule, refs)})
    th = model.thresholds
    pooled = window_metrics(
        _concat_rows(parts),
        np.concatenate(scores),
        np.concatenate(zs),
        np.concatenate(losses),
        Thresholds(alert=th.alert, clear=th.clear, budget=float("nan"), k=th.k, n=th.n),
    )
    log.info(
        "evaluated",
        model=model.name,
        dataset="ctu13",
        rate=rate,
        period=period,
        runs=len(runs),
    )
    return {
        "model": model.version,
        "dataset": "ctu13",
        "trained_rate": int(model.manifest["training"]["sampling_rate"]),
        "rate": rate,
        "window_s": window_s,
        "period": period,
        "in_sample_normals": period != "test",
        "seeds": seeds,
        "references_ms": refs,
        period: pooled,
        "runs": runs,
        "summary": summarise_runs(runs),
    }


def evaluate_manifest(
    manifest_path: Path,
    *,
    rate: int | None = None,
    seed: int = DEFAULT_SEED,
    n_seeds: int = 4,
    dataset_dir: Path | None = None,
    period: str = "test",
) -> dict[str, Any]:
    """Metrics of one CTU-13 model at 1:``rate`` (default: the rate it was
    trained at); see :func:`evaluate_ctu13`."""
    model = load_model(manifest_path)
    trained_rate = int(model.manifest["training"]["sampling_rate"])
    return evaluate_ctu13(
        model,
        Ctu13Source.load(dataset_dir),
        rate=trained_rate if rate is None else rate,
        seed=seed,
        n_seeds=n_seeds,
        period=period,
    )


# CIC-IDS2017 ----------------------------------------------------------------


@dataclasses.dataclass
class CicSource:
    """CIC-IDS2017 flows loaded once, with sampled records cached."""

    flows: cicids.CicFlows
    _directional: Any = None
    _cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict
    )

    @classmethod
    def load(cls, dataset_dir: Path | None = None) -> CicSource:
        """Parse the CSV files (see :func:`cloud.training.cicids.dataset_dir`)."""
        return cls(cicids.load_flows(dataset_dir))

    def records(self, rate: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Sampled records and the flow index of each (computed once)."""
        key = (rate, seed)
        if key not in self._cache:
            if self._directional is None:
                self._directional = cicids.directional_flows(self.flows)
            rng = np.random.default_rng(seed)
            rec, flow = thin(self._directional, rate, rng)
            self._cache[key] = cut_active_timeout(rec, flow)
        return self._cache[key]

    def class_windows(
        self, class_name: str, rate: int, seed: int, window_s: int
    ) -> cicids.ClassWindows:
        """Labelled windows of BENIGN plus one class, one realisation."""
        rec, flow = self.records(rate, seed)
        return cicids.class_windows(
            rec, flow, self.flows, class_name, window_s=window_s, seed=seed
        )


def evaluate_cicids(
    model: LoadedModel,
    source: CicSource,
    *,
    rate: int,
    seed: int = DEFAULT_SEED,
    n_seeds: int = 4,
) -> dict[str, Any]:
    """Metrics per attack class on the CIC test hours at 1:``rate``.

    Normal windows count only in test hours; every positive window counts
    (none was used to fit anything).  Detection is timed from the class's
    first flow in the file and from its onset (its first flow followed
    within 5 minutes by >= 1% of its flows, :func:`cloud.training.metrics.onset_ms`).
    Per-day rates are left out: the benign flows
    are a 1-in-316 random sample of five days, so a day here holds a
    fraction of a real day's host windows.
    """
    seeds = run_seeds(rate, seed, n_seeds)
    rule = alert_rule(model)
    classes: dict[str, Any] = {}
    for name in source.flows.classes[1:]:
        runs: list[dict[str, Any]] = []
        refs: dict[str, float] = {}
        for s in seeds:
            cw = source.class_windows(name, rate, s, model.window_s)
            score, _, _ = score_windows(model, cw.windows)
            label = np.where(
                (cw.label == 0) & (cw.split != cicids.TEST), -1, cw.label
            ).astype(np.int8)
            window_ms = model.window_s * 1000
            starts = cw.windows.window_start_ms
            rows = RunRows(
                host=host_keys(cw.windows),
                window_start_ms=starts,
                label=label,
                score=score,
                target=cw.target,
                window_s=model.window_s,
                first_slot_ms=int(starts.min()) // window_ms * window_ms,
                last_slot_ms=int(starts.max()),
            )
            refs = {
                "first_attack": float(cw.first_attack_ms),
                "onset": float(cw.onset_ms),
            }
            metrics = run_metrics(rows, rule, refs)
            for key in [k for k in metrics if "per_day" in k]:
                del metrics[key]
            metrics["principal_hosts"] = int(np.unique(cw.windows.host[cw.target]).size)
            metrics["principal_hosts_flagged"] = int(
                np.unique(cw.windows.host[cw.target & (score >= rule.alert)]).size
            )
            runs.append({"seed": s, **metrics})
        classes[name] = {
            "references_ms": refs,
            "runs": runs,
            "summary": summarise_runs(runs),
        }
    log.info("evaluated", model=model.name, dataset="cicids2017", rate=rate)
    return {
        "model": model.version,
        "dataset": "cicids2017",
        "trained_rate": int(model.manifest["training"]["sampling_rate"]),
        "rate": rate,
        "window_s": model.window_s,
        "seeds": seeds,
        "classes": classes,
    }


def evaluate_models(
    manifests: Sequence[Path],
    rates: Sequence[int | None],
    *,
    seed: int = DEFAULT_SEED,
    n_seeds: int = 4,
    period: str = "test",
    dataset: str | None = None,
    dataset_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Every model at every rate (``None``: the model's training rate).

    ``dataset``: ``ctu13`` or ``cicids2017``; default per model, from its
    manifest.  Data are loaded once and window sets shared across models.
    """
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    ctu: Ctu13Source | None = None
    cic: CicSource | None = None
    results = []
    for path in manifests:
        model = load_model(path)
        which = dataset or dataset_of(model)
        trained = int(model.manifest["training"]["sampling_rate"])
        for rate in rates:
            r = trained if rate is None else rate
            if which == "cicids2017":
                cic = cic or CicSource.load(dataset_dir)
                results.append(
                    evaluate_cicids(model, cic, rate=r, seed=seed, n_seeds=n_seeds)
                )
            else:
                ctu = ctu or Ctu13Source.load(dataset_dir)
                results.append(
                    evaluate_ctu13(
                        model, ctu, rate=r, seed=seed, n_seeds=n_seeds, period=period
                    )
                )
    return results
