"""Streaming fits: a detector fitted on features read shard by shard and chunk by chunk from disk equals
the same detector fitted in memory, and the exact streaming percentile equals NumPy's."""

import numpy as np
import pytest
import torch

from oodlab.detectors import REGISTRY, available, create
from oodlab.features import stats
from oodlab.features.stats import percentile
from oodlab.features import Features, StoredFeatures, core
from oodlab.features.store import write_features

FITTED = [n for n in available() if create(n).feature_sets() - {"eval"}]


def stored(feats: Features, path, shard_rows: int) -> StoredFeatures:
    return write_features(path, (feats.take(torch.arange(i, min(i + shard_rows, len(feats))))
                                 for i in range(0, len(feats), shard_rows)))


@pytest.mark.parametrize("name", FITTED)
def test_streaming_fit_equals_in_memory_fit(name, tiny, tmp_path, monkeypatch):
    memory = create(name).fit_on(tiny.model, tiny.train_set, tiny.train, device="cpu")
    monkeypatch.setattr(core, "CHUNK_BYTES", 8 * tiny.train.dim * 5)  # chunks of 5 rows
    disk = stored(tiny.train, tmp_path / "train", len(tiny.train) if name == "flow" else 13)
    streamed = create(name).fit_on(tiny.model, tiny.train_set, disk, device="cpu")
    assert memory.state.keys() == streamed.state.keys()
    for k, v in memory.state.items():
        # float64 sums in another order; relative to the largest entry, since a near-singular covariance's
        # pseudo-inverse (dead units: entries ~5e6 here) amplifies their rounding in its small entries
        scale = float(v.double().abs().max()) if v.numel() else 0.0
        assert torch.allclose(streamed.state[k].double(), v.double(), rtol=1e-9, atol=1e-11 + 1e-11 * scale), (name, k)
    test = stored(tiny.test, tmp_path / "test", 7)
    # float32 arithmetic (KNN, NNGuide banks) on chunks of other shapes may round differently
    assert torch.allclose(streamed.score(test), memory.score(tiny.test), rtol=1e-6, atol=1e-9)


def test_flow_over_shuffled_shards_trains(tiny, tmp_path):
    """Several shards: the flow sees shuffled shards (a different order than in memory) and still fits."""
    disk = stored(tiny.train, tmp_path / "train", 16)
    a = create("flow", epochs=2).fit(disk, tiny.model.head)
    b = create("flow", epochs=2).fit(disk, tiny.model.head)
    assert torch.equal(a.score(tiny.test), b.score(tiny.test))  # seeded
    nll = a.train_nll
    assert len(nll) == 2 and nll[1] < nll[0]


def test_shuffled_batches_cover_every_row_once(tiny, tmp_path):
    disk = stored(tiny.train, tmp_path / "train", 10)
    rows = torch.cat(list(disk.shuffled_batches(8, torch.Generator().manual_seed(1))))
    assert len(rows) == len(tiny.train)
    key = lambda z: sorted(map(tuple, z.tolist()))  # noqa: E731
    assert key(rows) == key(tiny.train.z)


def test_take_and_chunks_of_stored_features(tiny, tmp_path):
    disk = stored(tiny.train, tmp_path / "train", 10)
    idx = torch.tensor([25, 3, 17, 3, 0, len(tiny.train) - 1])
    got = disk.take(idx)
    assert torch.equal(got.z, tiny.train.z[idx]) and torch.equal(got.labels, tiny.train.labels[idx])
    back = disk.load()
    assert torch.equal(back.z, tiny.train.z) and torch.equal(back.logits, tiny.train.logits)
    assert disk.accuracy() == pytest.approx(tiny.train.accuracy())


def test_float16_storage_is_read_as_float32(tiny, tmp_path):
    disk = write_features(tmp_path / "half", [tiny.train], storage=torch.float16)
    z = disk.load().z
    assert z.dtype == torch.float32 and torch.equal(z, tiny.train.z.half().float())


@pytest.mark.parametrize("cap", [1 << 22, 5])  # gather at once, or refine through nested histograms
def test_streaming_percentile_equals_numpy(cap, monkeypatch):
    monkeypatch.setattr(core, "CHUNK_BYTES", 8 * 9 * 31)
    rng = np.random.default_rng(0)
    for trial in range(12):
        z = rng.normal(size=(int(rng.integers(1, 400)), 9)).astype(np.float32)
        z = np.maximum(z, 0) if trial % 2 else z  # many tied zeros, as after a ReLU
        z = z.round(1) if trial % 3 == 0 else z
        f = Features(torch.from_numpy(z), torch.zeros(len(z), 2))
        for q in (0, 0.5, 10, 50, 85, 90, 99.9, 100, float(rng.uniform(0, 100))):
            assert percentile(f, q, cap=cap) == np.percentile(z.astype(np.float64), q), (trial, q)


@pytest.mark.parametrize("cap", [1 << 22, 5])
def test_column_percentiles_equal_numpy_per_column(cap, monkeypatch, tmp_path):
    monkeypatch.setattr(core, "CHUNK_BYTES", 8 * 7 * 23)
    monkeypatch.setattr(stats, "CELLS", 64)  # a few bins per target, row blocks of a few rows
    rng = np.random.default_rng(1)
    for trial in range(8):
        z = rng.normal(size=(int(rng.integers(1, 300)), 7)).astype(np.float32)
        z = np.maximum(z, 0) if trial % 2 else z
        z = z.round(1) if trial % 3 == 0 else z
        z[:, 2] = 0.25  # a constant column
        qs = [0, 1, 10, 60, 90, 99, 100, float(rng.uniform(0, 100))]
        f = Features(torch.from_numpy(z), torch.zeros(len(z), 2))
        want = np.percentile(z.astype(np.float64), qs, axis=0)
        assert np.array_equal(stats.column_percentiles(f, qs, cap=cap).numpy(), want), trial
    disk = stored(f, tmp_path / "z", 11)
    assert np.array_equal(stats.column_percentiles(disk, qs, cap=cap).numpy(), want)
