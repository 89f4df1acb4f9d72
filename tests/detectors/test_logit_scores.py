"""Known answers of the entropy and weighted-energy scores."""

import math

import pytest
import torch

from oodlab.detectors import create
from oodlab.features import Features


def _score(name: str, logits: torch.Tensor, **params) -> torch.Tensor:
    return create(name, **params).fit(None, torch.nn.Linear(2, logits.shape[1])).score(
        Features(torch.zeros(len(logits), 2), logits))


def test_entropy_known_answers():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0, 0.0]], dtype=torch.float64)
    logits[2, 2:] = -1e9  # two classes of probability 0: 0 log 0 counts 0
    got = _score("entropy", logits)
    # uniform over 4: -log 4; a sure prediction: 0; p = (3/4, 1/4): 3/4 log 3/4 + 1/4 log 1/4
    assert got.tolist() == pytest.approx([-math.log(4), 0.0, 0.75 * math.log(0.75) + 0.25 * math.log(0.25)], abs=1e-12)


def test_weighted_energy_known_answers():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]], dtype=torch.float64)
    assert torch.allclose(_score("weighted-energy", logits), torch.logsumexp(logits, 1))  # all ones: Energy
    got = _score("weighted-energy", logits, weights=[2.0, 0.0, -3.0])  # a zero and a negative weight drop out
    assert got.tolist() == pytest.approx((logits[:, 0] + math.log(2)).tolist(), abs=1e-12)
    with pytest.raises(ValueError, match="one weight per class"):
        _score("weighted-energy", logits, weights=[1.0, 1.0])  # refused at fit: 2 weights, 3 classes
    with pytest.raises(ValueError, match="2 or more"):
        create("weighted-energy", weights=[1.0])
    with pytest.raises(ValueError, match="at least one class weight must be > 0"):
        create("weighted-energy", weights=[0.0, -1.0])
