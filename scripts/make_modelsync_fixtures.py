"""Regenerate tests/data/modelsync/canary_rows.npz (no TensorFlow needed).

The model-update tests run each new model's canary on "recent real feature
rows".  This script makes them from real CTU-13 scenario 6 traffic
(data/ctu13-scenario6, slices 0-5), sampled at 1:100 with thinning seed 6
and cut into 300 s host windows, the settings of the shipped relay model
(models/relay-ctu13s6-r100-w300): it keeps the rows of the windows that
start in slices 4-5 (``values`` float64 (n, 15), ``spec_version``,
``window_s``).  Run from anywhere::

    python scripts/make_modelsync_fixtures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud.training import ctu13  # noqa: E402
from cloud.training.thinning import sample_flows  # noqa: E402
from edge_agent.features import host_window_features  # noqa: E402

OUT = ROOT / "tests" / "data" / "modelsync" / "canary_rows.npz"


def main() -> None:
    flows = ctu13.load_flows(ROOT / "data" / "ctu13-scenario6", slices=range(6))
    records, _labels = sample_flows(flows, 100, 6)
    windows = host_window_features(records, ctu13.INTERNAL_NETWORKS, 300)
    start4 = int(flows.start_ms[flows.slice_index == 4].min())
    recent = windows.window_start_ms >= start4
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        values=windows.values[recent],
        spec_version=np.int64(windows.spec_version),
        window_s=np.int64(windows.window_s),
    )
    print(f"{OUT}: {int(recent.sum())} rows")


if __name__ == "__main__":
    main()
