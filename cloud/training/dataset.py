"""Labelled host-window sets from the sampled CTU-13 replay.

The capture is cut by time into three periods (slice indices, 5 min each):
training (slices 0-13, 70 min), validation (14-19, 30 min) and test
(20-25, 30 min).  A host window belongs to the period holding its start.

Labels: a window is positive (1) when it belongs to the infected host and
holds at least one sampled botnet-labelled record; other windows of the
infected host are excluded (-1): at 1:100 most of them hold no sampled bot
packet, so nothing in the data could reveal it.  Every other window is
normal (0); the CTU "background" traffic is unverified but mostly benign.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cloud.training import ctu13
from cloud.training.thinning import DEFAULT_ACTIVE_TIMEOUT_S, sample_flows
from edge_agent.features import HostWindows, host_window_features
from edge_agent.features.extract import address_halves
from edge_agent.flows.schema import address_bytes

TRAIN, VALIDATION, TEST = 0, 1, 2
PERIOD_NAMES = ("train", "validation", "test")
#: First slice of the validation and of the test period.
VALIDATION_SLICE = 14
TEST_SLICE = 20


@dataclass(frozen=True)
class LabelledWindows:
    """Host windows of one sampling realisation with label and period."""

    windows: HostWindows
    label: np.ndarray  # int8: 1 positive, 0 normal, -1 excluded
    period: np.ndarray  # int8: TRAIN / VALIDATION / TEST
    seed: int


def period_bounds(flows: ctu13.ArgusFlows) -> tuple[int, int]:
    """Start (ms) of the validation and test periods, from the slice times."""
    starts = [
        int(flows.start_ms[flows.slice_index == s].min())
        for s in (VALIDATION_SLICE, TEST_SLICE)
    ]
    return starts[0], starts[1]


def label_windows(
    windows: HostWindows, records: np.ndarray, record_labels: np.ndarray
) -> np.ndarray:
    """Label each window (see module doc)."""
    infected = np.frombuffer(address_bytes(ctu13.INFECTED_HOST), dtype="V16")[0]
    is_infected = windows.host == infected
    bot = records[record_labels == ctu13.LABEL_BOTNET]
    window_ms = windows.window_s * 1000
    bot_windows = np.unique(bot["time_start"] // window_ms * window_ms)
    hit = np.isin(windows.window_start_ms, bot_windows)
    label = np.zeros(len(windows), dtype=np.int8)
    label[is_infected] = -1
    label[is_infected & hit] = 1
    return label


def build_windows(
    flows: ctu13.ArgusFlows,
    rate: int,
    seed: int,
    window_s: int,
    active_timeout_s: int = DEFAULT_ACTIVE_TIMEOUT_S,
) -> LabelledWindows:
    """Sample the flows at 1:``rate`` and compute labelled host windows."""
    records, labels = sample_flows(flows, rate, seed, active_timeout_s)
    windows = host_window_features(records, ctu13.INTERNAL_NETWORKS, window_s)
    val_ms, test_ms = period_bounds(flows)
    start = windows.window_start_ms
    period = np.where(
        start >= test_ms, TEST, np.where(start >= val_ms, VALIDATION, TRAIN)
    ).astype(np.int8)
    return LabelledWindows(
        windows=windows,
        label=label_windows(windows, records, labels),
        period=period,
        seed=seed,
    )


def host_keys(windows: HostWindows) -> np.ndarray:
    """A sortable int key per window's host (for grouping by host)."""
    hi, lo = address_halves(windows.host)
    _, inverse = np.unique(np.stack([hi, lo], axis=1), axis=0, return_inverse=True)
    return inverse.reshape(-1)
