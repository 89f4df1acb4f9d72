"""T2FNorm: the training logits by hand, the head held as W / tau trains exactly as the official
parametrisation and its checkpoint computes the official inference, resuming, the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from helpers import make_tiny_suite
from oodlab.cli import main
from oodlab.data import suites
from oodlab.models import load_checkpoint
from oodlab.models.adapter import Classifier
from oodlab.training import OBJECTIVES, TrainConfig, create_objective, train
from oodlab.training.t2fnorm import T2FNorm, t2fnorm_logits

META = {"arch": "linear", "num_classes": 3, "in_channels": 1}


def _net(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
    return Classifier(body, nn.Flatten(1), nn.Linear(16, 3))


def test_training_logits_by_hand():
    # z = (3, 4) -> unit (0.6, 0.8) -> / 0.1 = (6, 8); W = [[1, 0], [0, 1], [1, 1]], b = (0, 1, -1)
    w, b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0.0, 1.0, -1.0])
    logits = t2fnorm_logits(torch.tensor([[3.0, 4.0], [0.0, -2.0]]), w, b, 0.1)
    assert torch.allclose(logits, torch.tensor([[6.0, 9.0, 13.0], [0.0, -9.0, -11.0]]))
    with pytest.raises(ValueError, match=r"z must be a torch.Tensor of shape \(N, D\)"):
        t2fnorm_logits(torch.ones(2, 2, 2), w, b, 0.1)


def _official_steps(model: Classifier, batches, tau: float, opt_args: dict) -> Classifier:
    """The official parametrisation, written independently: logits = W (z / ||z||) / tau + b, SGD on W."""
    opt = torch.optim.SGD(model.parameters(), **opt_args)
    for x, y in batches:
        z = model.features(x)
        logits = (z / z.norm(dim=1, keepdim=True)) @ model.head.weight.t() / tau + model.head.bias
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        opt.step()
    return model


def test_head_held_as_w_over_tau_takes_the_official_steps_and_computes_the_official_inference():
    tau, opt_args = 0.1, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    g = torch.Generator().manual_seed(3)
    batches = [(torch.rand(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    official = _official_steps(_net().double(), [(x.double(), y) for x, y in batches], tau, opt_args)
    ours, objective = _net().double(), T2FNorm(tau)
    objective.begin(ours, None)
    opt = torch.optim.SGD(ours.parameters(), **opt_args)
    for x, y in batches:
        loss, _ = objective.loss(ours, x.double(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(ours.head.weight * tau, official.head.weight, atol=1e-10)
    assert torch.allclose(ours.head.bias, official.head.bias, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(ours.body.parameters(), official.body.parameters()))
    # the checkpoint's own forward is the official test-time forward: W (z / tau) + b, no normalisation
    x = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    expected = official.head(official.features(x) / tau)
    assert torch.allclose(ours(x), expected, atol=1e-10)


def test_unscaled_inference_keeps_w_in_the_head():
    model, objective = _net(), T2FNorm(0.5, scaled_inference=False)
    before = model.head.weight.detach().clone()
    objective.begin(model, None)
    assert torch.equal(model.head.weight, before)
    x, y = torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    loss, logs = objective.loss(model, x, y)
    z = model.features(x).detach()
    assert float(loss) == pytest.approx(float(F.cross_entropy(model.head(F.normalize(z, dim=1) / 0.5), y)), rel=1e-5)
    assert objective.config()["scaled_inference"] is False


def test_resume_equals_uninterrupted(tmp_path):
    """The head is divided by tau at the start of every run; a resumed run must load its own W / tau over it."""
    suite = make_tiny_suite(n_train=32, n_test=8)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, augment=False)
    train(_net(), suite.id_train, T2FNorm(), cfg, tmp_path / "full", META, device="cpu")

    def crash(model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # killed during epoch 2, after epoch 1 was saved
        return {}

    with pytest.raises(KeyboardInterrupt):
        train(_net(), suite.id_train, T2FNorm(), cfg, tmp_path / "cut", META, hooks=[crash], device="cpu")
    train(_net(), suite.id_train, T2FNorm(), cfg, tmp_path / "cut", META, device="cpu")
    a, b = load_file(str(tmp_path / "full" / "last.safetensors")), load_file(str(tmp_path / "cut" / "last.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("kwargs, match", [({"tau": 0}, "tau must be"), ({"tau": "0.1"}, "tau must be"),
                                           ({"scaled_inference": "yes"}, "scaled_inference must be True or False")])
def test_bad_options_are_refused_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        T2FNorm(**kwargs)
    assert "\n" not in str(err.value)


def test_cli_trains_with_t2fnorm_and_the_checkpoint_is_a_plain_classifier(monkeypatch, tmp_path):
    assert "t2fnorm" in OBJECTIVES and T2FNorm().tau == 0.1
    assert isinstance(create_objective("t2fnorm", {}, model=_net(), suite=None, config=TrainConfig()), T2FNorm)
    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite(n_train=32, n_test=8))
    common = ["train", "--suite", "tiny", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--method", "t2fnorm"]
    assert main([*common, "--option", "tau=0.2", "--out", str(tmp_path / "t2f")]) == 0
    meta = json.loads((tmp_path / "t2f" / "last.json").read_text())
    assert meta["objective"] == "t2fnorm" and meta["objective_config"]["tau"] == 0.2
    model, _ = load_checkpoint(tmp_path / "t2f" / "last.safetensors")
    assert isinstance(model, Classifier) and type(model.head) is nn.Linear
    x = torch.rand(3, 1, 28, 28)
    model.eval()
    assert torch.allclose(model(x), model.head(model.features(x)))  # nothing hidden in the forward
    assert main([*common, "--option", "tau=0", "--out", str(tmp_path / "bad")]) == 2
