"""GReg / GReg+: the gradient penalty by hand and against per-sample autograd, the energy-based sampler."""

import json
import math

import pytest
import torch
from torch import nn

from helpers import make_tiny_suite
from oodlab.cli import main
from oodlab.data import suites
from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
from oodlab.models.adapter import Classifier
import dataclasses

from oodlab.training import OBJECTIVES, TrainConfig
from oodlab.training.outlier_exposure import default_margins
from oodlab.training.greg import GReg, GRegPlus, energy_based_sampling, energy_gradient_norms


def _aux(n: int = 64, seed: int = 1) -> ImageSet:
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return ImageSet("aux", ArrayDataset(x), tensor_fingerprint(x))


def _small_bn_net() -> Classifier:
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
    return Classifier(body, nn.Flatten(1), nn.Linear(16, 3), mean=(0.3,), std=(0.5,))


def test_gradient_norms_by_hand_on_a_linear_energy():
    # One output: E(x) = -(w.x + b), so dE/dx = -w everywhere and ||dE/dx~|| = std * ||w|| (w.r.t. the
    # normalised input). ID: 3 samples, E = -4, -1, -6 with m_in = -3 -> samples 0 and 2 detected,
    # each weighted 1/3. Outliers: 2 samples, E = -2, -8 with m_out = -5 -> sample 3 detected, weight 1/2.
    w = torch.tensor([3.0, 4.0])  # ||w|| = 5
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [2.0, 0.0]], requires_grad=True)
    b = torch.tensor([1.0, 1.0, 0.0, 2.0, 2.0])  # per-sample offsets to place the energies
    energies = -(x @ w + b)
    assert energies.tolist() == [-4.0, -1.0, -6.0, -2.0, -8.0]
    is_outlier = torch.tensor([False, False, False, True, True])
    norms = energy_gradient_norms(x, energies, is_outlier, m_in=-3, m_out=-5, input_std=torch.tensor(0.5))
    assert norms.tolist() == pytest.approx([0.5 * 5 / 3, 0.0, 0.5 * 5 / 3, 2.5 / 2, 0.0])


def test_penalty_is_zero_outside_the_detected_set():
    """On a conv net with batch norm in training mode, where samples are coupled through batch statistics."""
    model = _small_bn_net().train()
    x = torch.rand(10, 1, 8, 8, requires_grad=True)
    energies = -torch.logsumexp(model(x), dim=1)
    is_outlier = torch.arange(10) >= 6
    m_in, m_out = float(energies[:6].detach().median()), float(energies[6:].detach().median())  # about half detected
    norms = energy_gradient_norms(x, energies, is_outlier, m_in, m_out, model.std)
    detected = torch.where(is_outlier, energies > m_out, energies < m_in)
    assert 0 < int(detected.sum()) < 10
    assert bool((norms[~detected] == 0).all()) and bool((norms[detected] > 0).all())


def test_penalty_matches_per_sample_autograd():
    """In eval mode each detected sample's norm is its own ||dE/dx~|| over its group size."""
    model = _small_bn_net().eval()
    x = torch.rand(10, 1, 8, 8, requires_grad=True)
    energies = -torch.logsumexp(model(x), dim=1)
    is_outlier = torch.arange(10) >= 6
    m_in, m_out = float(energies[:6].detach().median()), float(energies[6:].detach().median())
    norms = energy_gradient_norms(x, energies, is_outlier, m_in, m_out, model.std)
    detected = torch.where(is_outlier, energies > m_out, energies < m_in)
    for i in torch.nonzero(detected).flatten().tolist():
        xi = x[i : i + 1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(-torch.logsumexp(model(xi), dim=1).sum(), xi)
        group = 4 if i >= 6 else 6
        assert float(norms[i].detach()) == pytest.approx(float((g * 0.5).norm()) / group, rel=1e-5)


def test_penalty_back_propagates_to_the_weights_by_hand():
    # One linear output on the normalised input x~ = x / 0.5: E = -w.x~, so ||dE/dx~|| = ||w|| and a
    # detected sample's norm is ||w|| / n_group. mean(norms) = ||w|| (d_in / n_in + d_out / n_out) / N,
    # whose gradient w.r.t. w is that factor times w / ||w||: double back-propagation must give it.
    model = Classifier(nn.Identity(), nn.Flatten(1), nn.Linear(2, 1), mean=(0.0,), std=(0.5,))
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[3.0, 4.0]]))
        model.head.bias.zero_()
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.1, 0.0], [-2.0, 0.0]]).view(4, 2, 1, 1).requires_grad_(True)
    logits = model(x)
    energies = -logits[:, 0]
    assert energies.tolist() == pytest.approx([-14.0, 14.0, -0.6, 12.0])
    is_outlier = torch.tensor([False, False, True, True])
    norms = energy_gradient_norms(x, energies, is_outlier, m_in=0.0, m_out=1.0, input_std=model.std)
    assert norms.tolist() == pytest.approx([2.5, 0.0, 0.0, 2.5])  # detected: ID 0 (of 2), outlier 3 (of 2)
    norms.mean().backward()
    factor = (1 / 2 + 1 / 2) / 4
    assert model.head.weight.grad.flatten().tolist() == pytest.approx([factor * 3 / 5, factor * 4 / 5], rel=1e-6)


def _clustered(k: int = 5, per: int = 6, seed: int = 0):
    """k tight clusters of directions; members differ in length (x1..x10) so only L2 normalisation groups them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1) * 4
    members = centres.repeat_interleave(per, 0) + 0.05 * torch.randn(k * per, 16, generator=g)
    lengths = torch.linspace(1, 10, per).repeat(k).view(-1, 1)
    truth = torch.arange(k).repeat_interleave(per)
    order = torch.randperm(k * per, generator=g)
    energies = torch.randn(k * per, generator=g)
    return (members * lengths)[order], energies, truth[order]


def test_sampler_returns_one_lowest_and_one_highest_energy_sample_per_cluster():
    features, energies, truth = _clustered()
    low, high = energy_based_sampling(features, energies, k=5, seed=0)
    assert low.shape == high.shape == (5,)
    assert sorted(truth[low].tolist()) == list(range(5)) and sorted(truth[high].tolist()) == list(range(5))
    for i in low.tolist():
        assert float(energies[i]) == float(energies[truth == truth[i]].min())
    for i in high.tolist():
        assert float(energies[i]) == float(energies[truth == truth[i]].max())


def test_sampler_always_returns_k_indices():
    features = torch.ones(12, 4)  # one distinct point: k-means cannot fill 5 clusters
    low, high = energy_based_sampling(features, torch.arange(12.0), k=5, seed=0)
    assert len(low) == len(high) == 5 and 0 <= int(low.min()) and int(high.max()) < 12
    with pytest.raises(ValueError, match=r"2 \* k \* per_cluster <="):
        energy_based_sampling(features, torch.arange(12.0), k=7)
    with pytest.raises(ValueError, match="diverged"):
        energy_based_sampling(features, torch.full((12,), float("nan")), k=5)


@pytest.mark.parametrize("refresh", ["iteration", "epoch"])
def test_greg_plus_draws_2k_outliers_from_the_pool(refresh):
    model = _small_bn_net()
    cfg = TrainConfig(batch_size=4, augment=False)
    objective = GRegPlus(_aux(), cfg, m_in=-5, m_out=-1, pool_factor=4, refresh=refresh)
    objective.start_epoch(model, 1, torch.device("cpu"))
    out = objective.draw_outliers(model, torch.device("cpu"))
    assert out.shape == (8, 1, 28, 28)  # 2 B, K = min(64, B) = 4 clusters of one lowest + one highest
    pool = _aux().dataset.images.float() / 255
    assert all(any(torch.equal(o, p) for p in pool) for o in out)
    assert len({bytes(o.numpy()) for o in out}) == 8
    loss, logs = objective.loss(model.train(), torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_greg_loss_adds_the_penalty_to_energy_oe():
    model = Classifier(nn.Flatten(1), nn.Identity(), nn.Linear(28 * 28, 3))
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 0])
    cfg = TrainConfig(batch_size=4, augment=False)
    values = {}
    for lam in (0.0, 1.0):
        objective = GReg(_aux(), cfg, m_in=-0.5, m_out=5.0, lambda_grad=lam)  # same seed: same outliers
        values[lam] = float(objective.loss(model, x, y)[0].detach())
    x_out = GReg(_aux(), cfg, m_in=-0.5, m_out=5.0).outliers.next()
    inputs = torch.cat([x, x_out]).requires_grad_(True)
    energies = -torch.logsumexp(model(inputs), 1)
    norms = energy_gradient_norms(inputs, energies, torch.arange(8) >= 4, -0.5, 5.0, model.std)
    penalty = float(norms.detach().mean())
    assert penalty > 0
    assert values[1.0] - values[0.0] == pytest.approx(penalty, rel=1e-4)


def test_cli_fine_tunes_with_greg_plus(monkeypatch, tmp_path):
    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite(n_train=32, n_test=8))
    common = ["--suite", "tiny", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-augment"]
    assert main(["train", *common, "--out", str(tmp_path / "erm")]) == 0
    assert main(["train", *common, "--method", "greg+", "--aux", "photos:100", "--option", "pool_factor=3",
                 "--option", "m_in=-6", "--option", "m_out=-2", "--lr", "0.01",
                 "--from", str(tmp_path / "erm" / "last.safetensors"), "--out", str(tmp_path / "gp")]) == 0
    meta = json.loads((tmp_path / "gp" / "last.json").read_text())
    assert meta["objective"] == "greg+" and meta["objective_config"]["clusters"] == 8
    # GReg+ trains with the official clustered runs' Adam (no weight decay); ERM keeps SGD, wd 5e-4
    assert meta["train_config"]["optimizer"] == "adam" and meta["train_config"]["weight_decay"] == 0.0
    state = torch.load(tmp_path / "gp" / "train_state.pt", weights_only=True)
    assert all("exp_avg" in v for v in state["optimizer"]["state"].values())
    erm = json.loads((tmp_path / "erm" / "last.json").read_text())["train_config"]
    assert erm["optimizer"] == "sgd" and erm["weight_decay"] == 5e-4
    assert main(["train", *common, "--method", "greg+", "--aux", "photos:100", "--option", "pool_factor=3",
                 "--optimizer", "sgd", "--epochs", "1", "--out", str(tmp_path / "gp-sgd")]) == 0
    assert json.loads((tmp_path / "gp-sgd" / "last.json").read_text())["train_config"]["optimizer"] == "sgd"
    assert math.isfinite(meta["metrics"]["loss"])
    assert meta["objective_config"]["lambda_s"] == 0.1 and meta["objective_config"]["lambda_grad"] == 1.0


def test_sampler_takes_b_over_k_lowest_and_highest_per_cluster():
    features, energies, truth = _clustered(k=5, per=6)
    low, high = energy_based_sampling(features, energies, k=5, seed=0, per_cluster=2)
    assert low.shape == high.shape == (10,)
    for c in range(5):
        members = torch.nonzero(truth == c).flatten()
        ranked = members[torch.argsort(energies[members])].tolist()
        assert sorted(i for i in low.tolist() if truth[i] == c) == sorted(ranked[:2])
        assert sorted(i for i in high.tolist() if truth[i] == c) == sorted(ranked[-2:])


def test_greg_plus_clusters_at_most_64_at_the_default_batch(monkeypatch):
    """At B = 128: K = min(64, B) = 64 clusters, 2 lowest + 2 highest each (the official int(B / K)), 2B outliers."""
    import oodlab.training.greg as greg

    objective = GRegPlus(_aux(1536), TrainConfig(batch_size=128, augment=False), m_in=-5, m_out=-1, n_id=256)
    assert (objective.clusters, objective.per_cluster) == (64, 2)
    assert objective.pool == objective.outliers.batch_size == 768  # 128 * 1536 / 256
    calls = []

    def spy(features, energies, k, seed, n_init, per_cluster):
        calls.append((len(features), k, per_cluster))
        return energy_based_sampling(features, energies, k, seed, n_init, per_cluster)

    monkeypatch.setattr(greg, "energy_based_sampling", spy)
    out = objective.draw_outliers(_small_bn_net(), torch.device("cpu"))
    assert calls == [(768, 64, 2)]
    assert out.shape == (256, 1, 28, 28) and len({bytes(o.numpy()) for o in out}) == 256
    small = GRegPlus(_aux(64), TrainConfig(batch_size=8, augment=False), m_in=-5, m_out=-1, pool_factor=4)
    assert (small.clusters, small.per_cluster) == (8, 1)


def test_greg_plus_pool_follows_the_official_formula():
    assert GRegPlus.pool_size(64, 300_000, 50_000) == 384  # the official CIFAR number
    assert GRegPlus.pool_size(32, 300_000, 50_000) == 192
    assert GRegPlus.pool_size(64, 1_000_000, 50_000) == 384  # at most 300K auxiliary images count per epoch
    assert GRegPlus.pool_size(64, 50_000, 12_000) == 266  # oodlab's Fashion-MNIST fine-tune benchmark
    assert GRegPlus.pool_size(128, 50_000, 60_000) == 512  # floored at 4 B: 106 could not give 2 B outliers
    assert GRegPlus.pool_size(8, 20, 2) == 20  # never more than the auxiliary set
    assert GRegPlus.pool_size(4, 64, None, pool_factor=3) == 12
    with pytest.raises(ValueError, match="n_id"):
        GRegPlus(_aux(), TrainConfig(batch_size=4), m_in=-5, m_out=-1)
    with pytest.raises(ValueError, match="2 \\* batch size"):
        GRegPlus(_aux(12), TrainConfig(batch_size=8), m_in=-5, m_out=-1, n_id=100)


def test_greg_plus_draws_each_aux_image_about_once_per_epoch():
    aux = _aux(640)
    objective = GRegPlus(aux, TrainConfig(batch_size=4, augment=False), m_in=-5, m_out=-1, n_id=40)
    assert objective.pool == 64  # 4 * 640 / 40
    objective.start_epoch(_small_bn_net(), 1, torch.device("cpu"))
    seen = [bytes(img.numpy()) for _ in range(40 // 4) for img in objective.outliers.next()]  # one epoch of steps
    assert len(seen) == len(set(seen)) == 640
    assert set(seen) == {bytes((img.float() / 255).numpy()) for img in aux.dataset.images}


def test_greg_uses_its_own_margins_on_cifar():
    assert default_margins("cifar10", "greg") == default_margins("cifar10", "greg+") == (-25.0, -7.0)
    assert default_margins("cifar10") == (-23.0, -5.0)  # Energy-OE keeps its official runs' margins
    assert default_margins("fashionmnist", "greg+") == default_margins("fashionmnist") == (-10.0, -5.0)
    suite = dataclasses.replace(make_tiny_suite(n_train=32), name="cifar10")
    cfg = TrainConfig(batch_size=4, augment=False)
    for method in ("greg", "greg+"):
        objective = OBJECTIVES[method](model=_small_bn_net(), suite=suite, config=cfg, aux=_aux())
        assert (objective.m_in, objective.m_out) == (-25.0, -7.0)
    oe = OBJECTIVES["energy-oe"](model=_small_bn_net(), suite=suite, config=cfg, aux=_aux())
    assert (oe.m_in, oe.m_out) == (-23.0, -5.0)
    with pytest.raises(ValueError, match="no energy margins"):
        default_margins("cifar10", "oe")
