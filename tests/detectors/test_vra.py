"""Known answers for VRA: the official piecewise operator, its thresholds, and the rules it reduces to."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodlab.detectors import create, energy
from oodlab.detectors.vra import rectify
from oodlab.features import Features


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(5, 3)
    z = torch.relu(torch.randn(300, 5, generator=g)) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    return head, Features(z, head(z).detach()), Features(torch.rand(40, 5, generator=g) * 4, torch.zeros(40, 3))


def test_rectify_piecewise_known_answer():
    z = torch.tensor([[0.1, 0.5, 0.7, 1.0, 1.5]])
    low, high = torch.tensor([0.5]), torch.tensor([1.0])
    assert rectify(z, low, high, gamma=0.2)[0].tolist() == pytest.approx([0.0, 0.7, 0.9, 1.2, 1.0])  # above beta: beta
    assert rectify(z, low, high, zero_below=False)[0].tolist() == pytest.approx([0.5, 0.5, 0.7, 1.0, 1.0])  # a clip
    per_dim = rectify(z, torch.tensor([0.0, 0.6, 0.0, 0.0, 2.0]), torch.full((5,), 1.2))
    assert per_dim[0].tolist() == pytest.approx([0.1, 0.0, 0.7, 1.0, 0.0])


def test_vra_thresholds_are_exact_percentiles_and_score_is_energy_of_rectified(data):
    head, train, test = data
    det = create("vra", gamma=0.3).fit(train, head)
    z = train.z.double().numpy()
    low, high = np.percentile(z, 60, axis=0), np.percentile(z, 90, axis=0)  # official: per dimension
    assert np.array_equal(det.state["low"].numpy(), low) and np.array_equal(det.state["high"].numpy(), high)
    zt = test.z.double().numpy()
    g = np.where(zt < low, 0.0, np.where(zt > high, high, zt + 0.3))
    want = energy(F.linear(torch.from_numpy(g), head.weight.double(), head.bias.double()))
    assert torch.allclose(det.score(test), want, rtol=1e-12)
    assert det.logits(test).argmax(1).tolist() == F.linear(torch.from_numpy(g), head.weight.double(),
                                                           head.bias.double()).argmax(1).tolist()
    glob = create("vra", low=10, high=90, per_dimension=False, zero_below=False).fit(train, head)  # OpenOOD's rule
    assert glob.state["low"].item() == np.percentile(z, 10) and glob.state["high"].item() == np.percentile(z, 90)
    clip = np.clip(zt, np.percentile(z, 10), np.percentile(z, 90))
    want = energy(F.linear(torch.from_numpy(clip), head.weight.double(), head.bias.double()))
    assert torch.allclose(glob.score(test), want, rtol=1e-12)


def test_vra_limits_reduce_to_react_and_energy(data):
    head, train, test = data
    react = create("react", percentile=90).fit(train, head)
    as_react = create("vra", low=0, high=90, per_dimension=False).fit(train, head)  # nothing below the minimum
    assert torch.allclose(as_react.score(train), react.score(train), rtol=1e-12)
    whole = create("vra", low=0, high=100).fit(train, head)  # the training range: the identity on train
    assert torch.allclose(whole.score(train), energy(train.logits), rtol=1e-6)
    with pytest.raises(ValueError, match="low <= high"):
        create("vra", low=95, high=90)
