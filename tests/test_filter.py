"""The relay's TFLite filter: the shipped model under LiteRT, fallbacks, roll-up."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from cloud.training import ctu13
from edge_agent.features import host_window_features
from edge_agent.features.scoring import reconstruction_losses
from edge_agent.filter import ModelLoadError, RelayFilter, load_model, rollup
from edge_agent.flows.schema import address_bytes, empty_records

ROOT = Path(__file__).resolve().parents[1]
RELAY = ROOT / "models" / "relay-ctu13s6-r100-w300.manifest.json"
CLOUD = ROOT / "models" / "cloud-ctu13s6-r100-w300.manifest.json"
NAN = ROOT / "tests" / "data" / "nan-model" / "nan-model.manifest.json"
NETS = list(ctu13.INTERNAL_NETWORKS)


def numpy_forward(npz_path: Path, x: np.ndarray) -> np.ndarray:
    """The auto-encoder by hand: dense layers, tanh hidden, linear output."""
    with np.load(npz_path) as w:
        n_layers = len(w.files) // 2
        h = x.astype(np.float64)
        for i in range(n_layers):
            h = h @ w[f"W{i}"].astype(np.float64) + w[f"b{i}"].astype(np.float64)
            if i < n_layers - 1:
                h = np.tanh(h)
    return h


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """Slices 20-21 of CTU-13 (10 min, the bot active) sampled at 1:100."""
    records, _ = ctu13.sampled_records(100, seed=11, slices=[20, 21])
    return records


def copy_model(manifest: Path, dest: Path) -> Path:
    data = json.loads(manifest.read_text())
    shutil.copy(manifest.parent / data["model_file"], dest / data["model_file"])
    out = dest / manifest.name
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("manifest", [RELAY, CLOUD], ids=["relay", "cloud"])
def test_shipped_tflite_matches_numpy_forward(manifest: Path, batch) -> None:
    """LiteRT output equals a float64 numpy pass of the npz weights (1e-5)."""
    model = load_model(manifest)
    data = json.loads(manifest.read_text())
    assert data["architecture"]["layers"][0] == len(data["features"])
    windows = host_window_features(batch, NETS, model.window_s)
    x = model.scaler.transform(windows)
    assert x.shape == (len(windows), len(data["features"]))
    expected = numpy_forward(manifest.parent / data["weights_file"], x)
    # Batch sizes change between calls: 1, all, 7, 7, all again.
    for rows in (x[:1], x, x[:7], x[7:14], x):
        got = model.reconstruct(rows)
        ref = numpy_forward(manifest.parent / data["weights_file"], rows)
        np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(model.reconstruct(x), expected, atol=1e-5)
    assert model.reconstruct(x[:0]).shape == (0, x.shape[1])


def test_manifest_checksums_match_files() -> None:
    """The shipped manifests name files whose sha256 they record."""
    for manifest in (RELAY, CLOUD):
        data = json.loads(manifest.read_text())
        for key, sha_key in (
            ("model_file", "sha256"),
            ("weights_file", "weights_sha256"),
        ):
            blob = (manifest.parent / data[key]).read_bytes()
            assert hashlib.sha256(blob).hexdigest() == data[sha_key]
        assert data["feature_spec_version"] == 1
        assert data["architecture"]["input_shape"] == [None, len(data["features"])]
    relay = json.loads(RELAY.read_text())
    assert relay["architecture"]["layers"] == [12, 8, 4, 8, 12]
    assert relay["training"]["sampling_rate"] == 100


def test_filter_scores_and_conserves_totals(batch) -> None:
    """Every packet and byte comes out; express records are untouched detail."""
    f = RelayFilter(NETS, RELAY)
    result = f.process(batch)
    assert result.passthrough_reason is None
    assert result.model_version is not None
    assert result.model_version.startswith("relay-ctu13s6-r100-w300:1.0.0:")
    assert result.records["packets"].sum() == batch["packets"].sum()
    assert result.records["bytes"].sum() == batch["bytes"].sum()
    assert result.flow_count.sum() == batch.size
    assert result.records.size < batch.size  # something was rolled up
    model = f.model
    assert model is not None
    # Scores are those of the manifest's pipeline recomputed by hand.
    windows = host_window_features(batch, NETS, model.window_s)
    x = model.scaler.transform(windows)
    z = model.normaliser.transform(reconstruction_losses(x, model.reconstruct(x)))
    np.testing.assert_allclose(
        result.host_scores["score"], model.detector.score(z), rtol=1e-5, atol=1e-6
    )
    express_rows = result.host_scores[result.host_scores["express"]]
    assert np.all(express_rows["score"] >= model.thresholds.alert)
    kept = result.records[result.express_mask]
    flagged = {bytes(h) for h in express_rows["host"]}
    for rec in kept:
        assert bytes(rec["src_addr"]) in flagged or bytes(rec["dst_addr"]) in flagged
    c = f.counters
    assert c.batches == 1 and c.records_in == batch.size
    assert c.records_out == result.records.size
    assert c.records_express == int(result.express_mask.sum())
    assert c.host_windows_scored == len(windows)


def test_infected_host_window_is_flagged(batch) -> None:
    """In this 10-min replay the infected host keeps full 5-tuple detail."""
    result = RelayFilter(NETS, RELAY).process(batch)
    infected = address_bytes(ctu13.INFECTED_HOST)
    rows = result.host_scores[result.host_scores["host"] == np.void(infected)]
    assert rows.size > 0 and rows["express"].any()
    bot_in = (batch["src_addr"] == np.void(infected)).sum()
    bot_out = (
        result.records["src_addr"][result.express_mask] == np.void(infected)
    ).sum()
    assert bot_out > 0 and bot_out <= bot_in


def test_missing_model_passes_through(tmp_path: Path, batch) -> None:
    """No manifest: records pass unchanged and the reason is counted."""
    f = RelayFilter(NETS, tmp_path / "none.manifest.json")
    result = f.process(batch)
    assert result.passthrough_reason == "model_load_failed"
    np.testing.assert_array_equal(result.records, batch)
    assert not result.express_mask.any()
    assert result.model_version is None
    assert f.counters.model_load_failures["missing"] == 1
    assert f.counters.passthrough_batches["model_load_failed"] == 1
    assert f.counters.passthrough_records == batch.size
    no_model = RelayFilter(NETS)
    assert no_model.process(batch).passthrough_reason == "model_missing"


def test_corrupt_and_tampered_models_are_refused(tmp_path: Path, batch) -> None:
    """Garbage bytes with a matching checksum, a wrong checksum, a wrong
    spec version: each refused with its reason, data passes through."""
    manifest = copy_model(RELAY, tmp_path)
    data = json.loads(manifest.read_text())
    model_file = tmp_path / data["model_file"]
    model_file.write_bytes(b"not a flatbuffer" * 10)
    with pytest.raises(ModelLoadError) as err:
        load_model(manifest)
    assert err.value.reason == "checksum"
    data["sha256"] = hashlib.sha256(model_file.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError) as err:
        load_model(manifest)
    assert err.value.reason == "bad_model"
    f = RelayFilter(NETS, manifest)
    result = f.process(batch)
    assert result.passthrough_reason == "model_load_failed"
    assert f.counters.model_load_failures["bad_model"] == 1
    np.testing.assert_array_equal(result.records, batch)

    spec = copy_model(RELAY, tmp_path / ".." / tmp_path.name)
    data = json.loads(spec.read_text())
    data["feature_spec_version"] = 99
    spec.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="spec 99") as err:
        load_model(spec)
    assert err.value.reason == "spec_version"
    (tmp_path / "bad.manifest.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path / "bad.manifest.json")
    assert err.value.reason == "bad_manifest"


def test_nan_output_passes_through(batch) -> None:
    """A model that returns NaN: nothing filtered, counted as non-finite."""
    f = RelayFilter(NETS, NAN)
    assert f.model is not None  # it loads fine; its output is the problem
    result = f.process(batch)
    assert result.passthrough_reason == "non_finite_output"
    np.testing.assert_array_equal(result.records, batch)
    assert f.counters.passthrough_batches["non_finite_output"] == 1


def test_failed_swap_keeps_the_current_model(tmp_path: Path, batch) -> None:
    """Swapping to a missing model fails and leaves the good one in place."""
    f = RelayFilter(NETS, RELAY)
    assert not f.swap_model(tmp_path / "missing.manifest.json")
    assert f.model is not None
    assert f.process(batch).passthrough_reason is None


def test_swap_while_processing_loses_nothing(batch) -> None:
    """Batches processed while another thread swaps models all conserve
    their packets, bytes and record counts."""
    f = RelayFilter(NETS, RELAY)
    part = batch[:4000]
    results = []
    stop = threading.Event()

    def worker() -> None:
        for _ in range(12):
            results.append(f.process(part))
        stop.set()

    t = threading.Thread(target=worker)
    t.start()
    swaps = 0
    while not stop.is_set() and swaps < 200:
        f.swap_model([RELAY, CLOUD, NAN][swaps % 3])
        swaps += 1
    t.join()
    assert len(results) == 12
    for r in results:
        assert r.records["packets"].sum() == part["packets"].sum()
        assert r.records["bytes"].sum() == part["bytes"].sum()
        assert r.flow_count.sum() == part.size
    c = f.counters
    assert c.batches == 12
    assert c.model_loads == 1 + swaps


def test_rollup_by_hand() -> None:
    """Client connections to one service collapse; totals stay exact.

    r0, r1: 10.0.0.1:50000/50001 -> 192.0.2.1:443, ACK, same window -> one
    record, src_port 0, 3+4 packets, 300+400 bytes, flow_count 2.
    r2: same but SYN flags -> its own record.  r3: server side (src port
    443 -> dst 50000) keeps its ports.  r4: next 60 s window -> its own.
    """
    rec = empty_records(5)
    rec["src_addr"] = [address_bytes("10.0.0.1")] * 3 + [
        address_bytes("192.0.2.1"),
        address_bytes("10.0.0.1"),
    ]
    rec["dst_addr"] = [address_bytes("192.0.2.1")] * 3 + [
        address_bytes("10.0.0.1"),
        address_bytes("192.0.2.1"),
    ]
    rec["src_port"] = [50000, 50001, 50002, 443, 50003]
    rec["dst_port"] = [443, 443, 443, 50000, 443]
    rec["protocol"] = 6
    rec["tcp_flags"] = [0x10, 0x10, 0x02, 0x10, 0x10]
    rec["packets"] = [3, 4, 1, 5, 2]
    rec["bytes"] = [300, 400, 60, 500, 200]
    rec["time_start"] = [1000, 2000, 3000, 4000, 61000]
    rec["time_end"] = [1500, 9000, 3000, 4000, 61000]
    out, count = rollup(rec, 60)
    assert out.size == 4
    merged = out[(out["src_port"] == 0) & (out["tcp_flags"] == 0x10)]
    assert merged.size == 2
    first = merged[merged["time_start"] == 1000][0]
    assert (first["packets"], first["bytes"], first["time_end"]) == (7, 700, 9000)
    assert int(count[(out["src_port"] == 0) & (out["time_start"] == 1000)][0]) == 2
    assert 443 in out["src_port"] and 50000 in out["dst_port"]
    assert out["packets"].sum() == 15 and out["bytes"].sum() == 1460
    assert count.sum() == 5


def test_rollup_keeps_features_exact(batch) -> None:
    """Features of rolled-up records weighted by flow_count equal the raw ones;
    uint64 totals are exact per destination."""
    out, count = rollup(batch, 300)
    assert out.size < batch.size
    raw = host_window_features(batch, NETS, 300)
    cols = {n: out[n] for n in out.dtype.names or ()}
    cols["flow_count"] = count
    rolled = host_window_features(cols, NETS, 300)
    np.testing.assert_array_equal(raw.host, rolled.host)
    np.testing.assert_allclose(raw.values, rolled.values, rtol=1e-12)
    for name in ("packets", "bytes"):
        assert int(out[name].sum()) == int(batch[name].sum())
