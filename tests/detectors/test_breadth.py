"""Known answers for SCALE, GEN, RMDS / Mahalanobis++, Residual, GradNorm, SHE, fDBD, NCI and NNGuide."""

import numpy as np
import pytest
import sklearn.covariance
import torch
import torch.nn.functional as F
from torch import nn

from oodlab.detectors import create, energy
from oodlab.detectors.scale import scale_features
from oodlab.features import Features


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(6, 4)
    with torch.no_grad():  # a head that mostly gets the classes right, plus noise
        head.weight.copy_(3 * torch.eye(4, 6) + 0.3 * torch.randn(4, 6, generator=g))
    z = torch.rand(400, 6, generator=g) * torch.tensor([1, 2, 3, 1, 0.5, 2])
    labels = torch.arange(400) % 4
    z = z + 0.8 * F.one_hot(labels, 6)[:, :6].float()
    train = Features(z, head(z).detach(), labels)
    zt = torch.rand(50, 6, generator=g) * 2
    return head, train, Features(zt, head(zt).detach())


def test_scale_known_answer_and_limit(data):
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.allclose(scale_features(z, 50), z.double() * np.exp(10 / 7))  # top 2 of 4 sum to 7
    head, train, test = data
    det = create("scale", percentile=0).fit(None, head)
    want = energy(F.linear(np.e * test.z.double(), head.weight.double(), head.bias.double()))
    assert torch.allclose(det.score(test), want)
    assert create("scale").percentile == 85.0


def test_gen_known_answer(data):
    head, _, test = data
    p = torch.softmax(test.logits.double(), 1).numpy()
    top = np.sort(p, axis=1)[:, -2:]
    want = -(top ** 0.5 * (1 - top) ** 0.5).sum(1)
    assert np.allclose(create("gen", gamma=0.5, M=2).fit(None, head).score(test).numpy(), want)
    full = -(p ** 0.1 * (1 - p) ** 0.1).sum(1)  # M = 100 > C: all classes
    assert np.allclose(create("gen").fit(None, head).score(test).numpy(), full)


def _precision(x):
    return sklearn.covariance.EmpiricalCovariance(assume_centered=False).fit(x).precision_


@pytest.mark.parametrize("normalize", [False, True])
def test_rmds_and_mahalanobis_plus_plus_against_sklearn(data, normalize):
    head, train, test = data
    z, zt, y = train.z.double().numpy(), test.z.double().numpy(), train.labels.numpy()
    if normalize:
        z = z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-10)
        zt = zt / (np.linalg.norm(zt, axis=1, keepdims=True) + 1e-10)
    means = np.stack([z[y == c].mean(0) for c in range(4)])
    prec = _precision(z - means[y])
    md = np.stack([np.einsum("nd,de,ne->n", zt - m, prec, zt - m) for m in means], 1)
    prec0, m0 = _precision(z), z.mean(0)
    md0 = np.einsum("nd,de,ne->n", zt - m0, prec0, zt - m0)
    maha = create("mahalanobis", normalize=normalize).fit(train, head).score(test).numpy()
    rmds = create("rmds", normalize=normalize).fit(train, head).score(test).numpy()
    assert np.allclose(maha, -md.min(1), rtol=1e-6)
    assert np.allclose(rmds, -(md - md0[:, None]).min(1), rtol=1e-6, atol=1e-8)


def test_residual_is_vims_virtual_logit(data):
    head, train, test = data
    vim = create("vim", dim=3).fit(train, head)
    res = create("residual", dim=3).fit(train, head)
    assert torch.allclose(vim.score(test), energy(test.logits) + vim.state["alpha"] * res.score(test))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_closed_form_equals_autograd(data, temperature):
    head, _, test = data
    det = create("gradnorm", temperature=temperature).fit(None, head)
    want = []
    for z in test.z:
        w = head.weight.detach().clone().requires_grad_(True)
        logits = F.linear(z[None], w, head.bias.detach()) / temperature
        loss = -(torch.log_softmax(logits, 1) / logits.shape[1]).sum()
        (grad,) = torch.autograd.grad(loss, w)
        want.append(float(grad.abs().sum()))
    assert np.allclose(det.score(test).numpy(), want, rtol=1e-5)


def test_she_uses_correctly_classified_class_means(data):
    head, train, test = data
    det = create("she").fit(train, head)
    pred = train.logits.argmax(1)
    for c in range(4):
        keep = (train.labels == c) & (pred == c)
        assert torch.allclose(det.state["patterns"][c], train.z[keep].double().mean(0))
    want = (test.z.double() * det.state["patterns"][test.logits.argmax(1)]).sum(1)
    assert torch.allclose(det.score(test), want)


def test_fdbd_brute_force(data):
    head, train, test = data
    w, b = head.weight.double(), head.bias.double()
    mu = train.z.double().mean(0)
    want = []
    for z in test.z.double():
        f = w @ z + b
        p = int(f.argmax())
        d = [abs(f[p] - f[j]) / (w[p] - w[j]).norm() for j in range(4) if j != p]
        want.append(float(sum(d) / 3 / (z - mu).norm()))
    assert np.allclose(create("fdbd").fit(train, head).score(test).numpy(), want)


def test_nnguide_brute_force(data):
    head, train, test = data
    det = create("nnguide", k=5, fraction=0.1).fit(train, head)
    idx = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:40].sort().values
    zb = train.z[idx].double()
    bank = zb / (zb.norm(dim=1, keepdim=True) + 1e-10) * torch.logsumexp(train.logits[idx].double(), 1)[:, None]
    q = test.z.double() / (test.z.double().norm(dim=1, keepdim=True) + 1e-10)
    want = torch.topk(q @ bank.T, 5, dim=1).values.mean(1) * torch.logsumexp(test.logits.double(), 1)
    assert torch.allclose(det.score(test), want, rtol=1e-5)
    assert len(det.state["bank"]) == 40


def test_nci_brute_force(data):
    head, train, test = data
    mu = train.z.double().mean(0)
    want = []
    for z, logit in zip(test.z.double(), test.logits):
        w = head.weight.double()[int(logit.argmax())]
        want.append(float(w @ (z - mu) / (z - mu).norm() + 1e-3 * z.abs().sum()))
    assert np.allclose(create("nci", alpha=1e-3).fit(train, head).score(test).numpy(), want)
