"""LogitNorm: the loss against hand-computed values and an independent formula, registration, the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import make_tiny_suite
from oodlab.cli import main
from oodlab.data import suites
from oodlab.models.adapter import Classifier
from oodlab.training import OBJECTIVES, TrainConfig, create_objective
from oodlab.training.logitnorm import LogitNorm, logitnorm_loss


def test_loss_by_hand():
    # logits (3, 4): norm 5 -> (0.6, 0.8) / 0.1 = (6, 8); label 1 -> CE = log(1 + e^(6 - 8)).
    loss = logitnorm_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([1]), tau=0.1)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    # the loss sees only the direction: scaling the logits changes nothing (up to the 1e-7 in the norm)
    x, y = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0])
    assert float(logitnorm_loss(7 * x, y, 0.04)) == pytest.approx(float(logitnorm_loss(x, y, 0.04)), rel=1e-5)


def test_loss_matches_an_independent_formula():
    g = torch.Generator().manual_seed(0)
    logits, y = 3 * torch.randn(16, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g)
    for tau in (0.04, 0.5, 1.0):
        scaled = logits / (tau * torch.sqrt((logits ** 2).sum(1, keepdim=True)))
        reference = -(scaled.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(scaled, 1)).mean()
        assert float(logitnorm_loss(logits, y, tau)) == pytest.approx(float(reference), rel=1e-6)


def test_objective_is_registered_and_computes_the_loss_on_the_model_logits():
    assert "logitnorm" in OBJECTIVES
    model = Classifier(nn.Flatten(1), nn.Identity(), nn.Linear(12, 3))
    objective = create_objective("logitnorm", {"tau": 0.05}, model=model, suite=None, config=TrainConfig())
    assert isinstance(objective, LogitNorm) and objective.config() == {"tau": 0.05}
    x, y = torch.rand(6, 1, 3, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, logs = objective.loss(model, x, y)
    logits = model(x).detach()
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits / (0.05 * logits.norm(dim=1, keepdim=True)), y)),
                                        rel=1e-5)
    assert logs["correct"] == float((logits.argmax(1) == y).sum())
    assert LogitNorm().tau == 0.04  # the paper's CIFAR-10 value (OpenOOD's config)


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), "0.04", True])
def test_bad_tau_is_refused_in_one_line(tau):
    with pytest.raises(ValueError, match="tau must be") as err:
        LogitNorm(tau)
    assert "\n" not in str(err.value)


def test_bad_logits_are_refused():
    with pytest.raises(ValueError, match=r"logits must be a torch.Tensor of shape \(N, C\)"):
        logitnorm_loss(torch.ones(3), torch.tensor([0]), 0.04)


def test_cli_trains_with_logitnorm(monkeypatch, tmp_path):
    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite(n_train=32, n_test=8))
    common = ["train", "--suite", "tiny", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--method",
              "logitnorm"]
    assert main([*common, "--option", "tau=0.05", "--out", str(tmp_path / "ln")]) == 0
    meta = json.loads((tmp_path / "ln" / "last.json").read_text())
    assert meta["objective"] == "logitnorm" and meta["objective_config"] == {"tau": 0.05}
    assert main([*common, "--option", "tau=-1", "--out", str(tmp_path / "bad")]) == 2
    assert main([*common, "--option", "temp=0.1", "--out", str(tmp_path / "typo")]) == 2
