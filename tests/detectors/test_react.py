import numpy as np
import pytest
import torch
from torch import nn

from oodlab.detectors import create, energy, load_detector
from oodlab.detectors import react as react_module
from oodlab.detectors.react import activation_percentile
from oodlab.features import Features

W = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]])
B = torch.tensor([0.0, 0.1, -0.2])
# entries 1..10: the 90th percentile (linear interpolation) is 9 + 0.1 * (10 - 9) = 9.1
TRAIN_Z = torch.arange(1.0, 11.0).reshape(5, 2)


def head():
    lin = nn.Linear(2, 3)
    lin.weight.data, lin.bias.data = W.clone(), B.clone()
    return lin


def feats(z):
    return Features(z, z @ W.T + B)


def test_threshold_is_the_90th_percentile_of_id_train_activations():
    det = create("react").fit(feats(TRAIN_Z), head())
    assert det.clip == pytest.approx(9.1)


def test_score_is_energy_of_the_clipped_features():
    det = create("react").fit(feats(TRAIN_Z), head())
    z = torch.tensor([[20.0, 1.0], [3.0, 9.5]])
    clipped = torch.tensor([[9.1, 1.0], [3.0, 9.1]], dtype=torch.float64)
    expected = torch.logsumexp(clipped @ W.double().T + B.double(), 1)
    assert torch.allclose(det.score(feats(z)), expected, rtol=1e-12)


def test_infinite_threshold_equals_energy(tmp_path):
    det = create("react", threshold=float("inf")).fit(feats(TRAIN_Z), head())
    z = 100 * torch.rand(8, 2)
    assert torch.allclose(det.score(feats(z)), energy(feats(z).logits), rtol=1e-6)
    again = load_detector(det.save(tmp_path / "react"))  # inf survives the JSON round trip
    assert again.threshold == float("inf") and torch.equal(again.score(feats(z)), det.score(feats(z)))


def test_fixed_threshold_is_used_as_given():
    assert create("react", threshold=1.0).fit(feats(TRAIN_Z), head()).clip == 1.0


def test_large_feature_sets_use_a_seeded_row_subsample(monkeypatch):
    monkeypatch.setattr(react_module, "MAX_PERCENTILE_ENTRIES", 40)
    z = torch.rand(1000, 4)  # 10 rows of 4 are used
    rows = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:10]
    expected = np.percentile(z[rows].double().numpy(), 90)
    assert activation_percentile(z, 90) == pytest.approx(expected, rel=1e-12)
    assert activation_percentile(z, 90) != pytest.approx(np.percentile(z.numpy(), 90), rel=1e-9)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="percentile"):
        create("react", percentile=101)
    with pytest.raises(ValueError, match="threshold"):
        create("react", threshold=float("nan"))
