"""ISH: the shaped features by hand, the head's gradients against an independent formula, the head's own
weight decay in the optimiser, the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import make_tiny_suite
from oodlab.cli import main
from oodlab.data import suites
from oodlab.models import load_checkpoint
from oodlab.models.adapter import Classifier
from oodlab.training import OBJECTIVES, TrainConfig, create_objective
from oodlab.training.ish import ISH, ish_kept, ish_linear, ish_shaped
from oodlab.training.loop import _param_groups


def test_kept_count_is_the_official_floor():
    assert ish_kept(512, 85) == 76  # int(512 * 0.15) = int(76.8); post-hoc SCALE keeps 512 - round(435.2) = 77
    assert ish_kept(2048, 85) == 307 and ish_kept(4, 50) == 2 and ish_kept(10, 85) == 1
    with pytest.raises(ValueError, match="keeps no activation of 4"):
        ish_kept(4, 80)


def test_shaped_features_by_hand():
    # row 0: k = 2 of 4 kept (3, 4); s1 = 10, s2 = 7 -> (0, 0, 3, 4) * e^(10/7)
    # row 1: magnitudes rank: |-5| and 2 kept as (5, 2); s1 = -5 + 2 + 1 = -2, s2 = 7 -> * e^(-2/7)
    # row 2: all zero -> s2 = 0 -> ratio 0, stays zero (the official code gives NaN)
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-5.0, 0.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[0.0, 0.0, 3.0, 4.0], [5.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    expected[0] *= math.exp(10 / 7)
    expected[1] *= math.exp(-2 / 7)
    assert torch.allclose(ish_shaped(z, 50), expected)
    with pytest.raises(ValueError, match=r"z must be a torch.Tensor of shape \(N, D\)"):
        ish_shaped(torch.ones(4), 50)


def test_forward_is_the_plain_head_and_gradients_match_the_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.relu(torch.randn(6, 20, generator=g, dtype=torch.float64)).requires_grad_(True)
    w = torch.randn(4, 20, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    logits = ish_linear(z, w, b, 85.0)
    assert torch.equal(logits, F.linear(z, w, b))
    F.cross_entropy(logits, y).backward()
    with torch.no_grad():  # dCE/dlogits = (softmax - onehot) / N, written out
        d = (torch.softmax(z @ w.t() + b, 1) - F.one_hot(y, 4).double()) / len(y)
        k = int(20 * 0.15)  # = 3
        top = torch.topk(z, k, dim=1)
        shaped = torch.zeros_like(z).scatter(1, top.indices, top.values) * torch.exp(
            z.sum(1, keepdim=True) / top.values.sum(1, keepdim=True))
    assert torch.allclose(w.grad, d.t() @ shaped, atol=1e-12)
    assert torch.allclose(b.grad, d.sum(0), atol=1e-12)
    assert torch.allclose(z.grad, d @ w.detach(), atol=1e-12)  # the backbone's gradient is unchanged


def test_objective_loss_and_the_heads_weight_decay_group():
    assert "ish" in OBJECTIVES
    model = Classifier(nn.Sequential(nn.Flatten(1), nn.Linear(12, 8), nn.ReLU()), nn.Identity(), nn.Linear(8, 3))
    objective = create_objective("ish", {}, model=model, suite=None, config=TrainConfig())
    assert isinstance(objective, ISH) and objective.config() == {"percentile": 85.0, "head_weight_decay": 5e-5}
    x, y = torch.rand(5, 1, 3, 4), torch.tensor([0, 1, 2, 0, 1])
    loss, logs = objective.loss(model, x, y)
    assert float(loss) == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-6)
    assert logs["correct"] == float((model(x).argmax(1) == y).sum())
    groups = _param_groups(model, list(model.parameters()), objective.weight_decays(model))
    assert [len(g["params"]) for g in groups] == [2, 2] and groups[1]["weight_decay"] == 5e-5
    assert groups[1]["params"][0] is model.head.weight and "weight_decay" not in groups[0]
    params = list(model.parameters())
    assert _param_groups(model, params, ISH(head_weight_decay=None).weight_decays(model)) is params
    with pytest.raises(ValueError, match="'body.9.weight', which the optimiser does not update"):
        _param_groups(model, params, {"body.9.weight": 0.0})


@pytest.mark.parametrize("kwargs, match", [({"percentile": 100}, "percentile must be"),
                                           ({"percentile": "high"}, "percentile must be"),
                                           ({"head_weight_decay": -1}, "head_weight_decay must be")])
def test_bad_options_are_refused_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        ISH(**kwargs)
    assert "\n" not in str(err.value)


def test_cli_trains_with_ish(monkeypatch, tmp_path):
    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite(n_train=32, n_test=8))
    common = ["train", "--suite", "tiny", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--method", "ish"]
    assert main([*common, "--option", "percentile=80", "--out", str(tmp_path / "ish")]) == 0
    meta = json.loads((tmp_path / "ish" / "last.json").read_text())
    assert meta["objective"] == "ish" and meta["objective_config"]["percentile"] == 80
    state = torch.load(tmp_path / "ish" / "train_state.pt", weights_only=True)
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [5e-4, 5e-5]
    model, _ = load_checkpoint(tmp_path / "ish" / "last.safetensors")
    assert isinstance(model, Classifier) and type(model.head) is nn.Linear
    assert main([*common, "--option", "percentile=100", "--out", str(tmp_path / "bad")]) == 2
