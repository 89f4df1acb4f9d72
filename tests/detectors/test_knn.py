import math

import numpy as np
import pytest
import torch
from torch import nn

from oodlab.detectors import create
from oodlab.detectors import knn as knn_module
from oodlab.features import Features

# normalised, the bank is the four unit vectors +-e1, +-e2
BANK = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, -0.5]])
QUERY = torch.tensor([[2.0, 0.0], [0.0, 0.0]])


def feats(z):
    return Features(z, torch.zeros(len(z), 3))


def fitted(k, **kw):
    return create("knn", k=k, **kw).fit(feats(BANK), nn.Linear(2, 3))


@pytest.mark.parametrize("k, distance", [(1, 0.0), (2, math.sqrt(2)), (3, math.sqrt(2)), (4, 2.0)])
def test_score_is_minus_the_kth_neighbour_distance(k, distance):
    s = fitted(k).score(feats(QUERY))
    assert s[0].item() == pytest.approx(-distance, abs=1e-6)
    assert s[1].item() == pytest.approx(-1.0, abs=1e-6)  # a zero vector stays at the origin: distance 1 to all


def test_matches_brute_force_on_random_features():
    g = torch.Generator().manual_seed(0)
    bank, query = torch.rand(200, 8, generator=g), torch.rand(30, 8, generator=g)
    det = create("knn", k=7).fit(feats(bank), nn.Linear(8, 3))
    nb, nq = bank / bank.norm(dim=1, keepdim=True), query / query.norm(dim=1, keepdim=True)
    expected = -torch.cdist(nq.double(), nb.double()).sort(dim=1).values[:, 6]
    assert torch.allclose(det.score(feats(query)), expected, atol=1e-5)


def test_k_larger_than_the_bank_is_refused():
    with pytest.raises(ValueError, match="at least 5"):
        fitted(5)


def test_fraction_keeps_a_seeded_subset():
    det = create("knn", k=1, fraction=0.5).fit(feats(torch.rand(10, 3)), nn.Linear(3, 3))
    assert det.state["bank"].shape == (5, 3)


def test_missing_neighbours_fail_loudly(monkeypatch):
    def lossy_knn(q, bank, k):  # what faiss gives where it finds no neighbour (as an IVF index with a small nprobe)
        return np.full((len(q), k), 3.4e38, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)

    monkeypatch.setattr(knn_module.faiss, "knn", lossy_knn)
    with pytest.raises(RuntimeError, match="id -1"):
        fitted(2).score(feats(QUERY))


def test_a_bank_larger_than_free_memory_is_refused_with_its_size(monkeypatch):
    monkeypatch.setattr(knn_module, "available_memory", lambda: 39)  # bytes: the 4 x 2 float32 bank needs 32 > 80% of 39
    with pytest.raises(MemoryError, match=r"bank of 4 x 2 float32 features needs 0\.0 GiB"):
        fitted(1)
    monkeypatch.setattr(knn_module, "available_memory", lambda: 41)
    assert fitted(1).fitted


def test_ivf_index_is_opt_in_and_marked_approximate(tiny):
    exact = create("knn", k=5).fit(tiny.train, tiny.model.head)
    ivf = create("knn", k=5, index="ivf", nprobe=1000).fit(tiny.train, tiny.model.head)
    assert not exact.approximate and ivf.approximate and "approximate" in ivf.export_refusal
    # every cell probed: the IVF search is exhaustive, so it finds the exact neighbours
    assert torch.allclose(ivf.score(tiny.test), exact.score(tiny.test), atol=1e-5)
    few = create("knn", k=250, index="ivf", nprobe=1).fit(tiny.train, tiny.model.head)
    with pytest.raises(RuntimeError, match="id -1.*raise nprobe"):  # one small cell cannot hold 250 neighbours
        few.score(tiny.test)
