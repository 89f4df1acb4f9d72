import numpy as np
import pytest
import torch
from torch import nn

from oodlab.detectors import create, energy, load_detector
from oodlab.detectors.react import activation_percentile
from oodlab.features import core
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


def test_percentile_is_exact_over_many_chunks(monkeypatch):
    monkeypatch.setattr(core, "CHUNK_BYTES", 8 * 4 * 37)  # chunks of 37 rows
    z = torch.relu(torch.randn(1000, 4))
    assert activation_percentile(Features(z, torch.zeros(1000, 2)), 90) == np.percentile(z.double().numpy(), 90)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="percentile"):
        create("react", percentile=101)
    with pytest.raises(ValueError, match="threshold"):
        create("react", threshold=float("nan"))
