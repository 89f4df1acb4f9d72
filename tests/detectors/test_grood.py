"""GrOOD: the gradient by hand, the whole score against autograd + sorting, the noise rules, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodlab.detectors import create
from oodlab.features import Features


def feats(z, head, labels=None):
    with torch.no_grad():
        return Features(z, head(z), labels)


def test_gradient_by_hand():
    """Prototypes e1, e2; noise = their mean [0.5, 0.5]. At z = e1: s = [0, -sqrt 2, -sqrt 0.5];
    g = softmax(s)_noise * (z - p_o) / ||z - p_o|| = p * [0.5, -0.5] / sqrt 0.5."""
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    train = feats(torch.eye(2).repeat(3, 1), head, torch.tensor([0, 1] * 3))
    det = create("grood").fit(train, head)
    assert det.state["noise"].tolist() == [0.5, 0.5]
    p = math.exp(-math.sqrt(0.5)) / (1 + math.exp(-math.sqrt(2)) + math.exp(-math.sqrt(0.5)))
    g = det.gradients(torch.tensor([[1.0, 0.0]]))[0]
    assert g.tolist() == pytest.approx([p * 0.5 / math.sqrt(0.5), -p * 0.5 / math.sqrt(0.5)], abs=1e-12)
    assert len(det.state["bank"]) == 6  # all six correctly classified
    assert det.score(feats(torch.tensor([[1.0, 0.0]]), head)).item() == pytest.approx(0.0, abs=1e-6)


def _autograd_gradient(z, pred, prototypes, noise):
    """Autograd of the cross-entropy of the prototype classifier at ``pred`` with respect to the OOD prototype."""
    p_o = noise.clone().requires_grad_(True)
    protos = torch.cat([prototypes, p_o[None]])
    scores = -torch.linalg.vector_norm(z[None, :] - protos, dim=1)
    F.cross_entropy(scores[None], torch.tensor([pred])).backward()
    return p_o.grad


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(3)
    head = nn.Linear(6, 4)
    with torch.no_grad():
        head.weight.copy_(2 * torch.eye(4, 6) + 0.3 * torch.randn(4, 6, generator=g))
    labels = torch.arange(160) % 4
    z = F.relu(torch.randn(160, 6, generator=g) + 1.5 * F.one_hot(labels, 6).float())
    test = F.relu(torch.randn(25, 6, generator=g) * 1.5)
    return head, feats(z, head, labels), feats(test, head)


@pytest.mark.parametrize("noise, k", [("mean", 1), ("mean", 4), ("mixup", 1)])
def test_matches_autograd_and_sorting(problem, noise, k):
    head, train, test = problem
    z, y, logits = train.z.double(), train.labels, train.logits
    prototypes = torch.stack([z[y == c].mean(0) for c in range(4)])
    if noise == "mean":
        p_o = prototypes.mean(0)
    else:
        second = [int(torch.argsort(lg, descending=True)[1]) for lg in logits]
        p_o = torch.stack([0.5 * z[i] + 0.5 * prototypes[second[i]] for i in range(len(z))]).mean(0)
    correct = [i for i in range(len(z)) if int(logits[i].argmax()) == int(y[i])]
    bank = torch.stack([_autograd_gradient(z[i], int(logits[i].argmax()), prototypes, p_o) for i in correct])
    expected = []
    for q, lg in zip(test.z.double(), test.logits):
        gq = _autograd_gradient(q, int(lg.argmax()), prototypes, p_o)
        expected.append(-((bank - gq) ** 2).sum(1).sort().values[k - 1])
    det = create("grood", noise=noise, k=k).fit(train, head)
    assert torch.allclose(det.state["noise"], p_o, atol=1e-12)
    assert len(det.state["bank"]) == len(correct)
    assert torch.allclose(det.score(test), torch.stack(expected), rtol=1e-4, atol=1e-7)
    assert torch.allclose(det.tensor_score(test.z, test.logits), torch.stack(expected), rtol=1e-4, atol=1e-7)


def test_fraction_is_a_seeded_subset(problem):
    head, train, test = problem
    a = create("grood", fraction=0.5).fit(train, head)
    b = create("grood", fraction=0.5).fit(train, head)
    c = create("grood", fraction=0.5, seed=1).fit(train, head)
    assert torch.equal(a.score(test), b.score(test))
    assert not torch.equal(a.state["prototypes"], c.state["prototypes"])
    assert len(a.state["bank"]) < len(create("grood").fit(train, head).state["bank"])


def test_fit_refusals(problem):
    head, train, _ = problem
    with pytest.raises(ValueError, match="class labels"):
        create("grood").fit(Features(train.z, train.logits), head)
    with pytest.raises(ValueError, match="correctly classified"):
        create("grood", k=10_000).fit(train, head)
    with pytest.raises(ValueError, match="no training features"):
        create("grood").fit(Features(train.z[:3], train.logits[:3], train.labels[:3]), head)


@pytest.mark.parametrize("params, message", [
    ({"noise": "val_ood"}, "noise must be one of"), ({"k": 0}, "k must be an integer >= 1"),
    ({"k": 1.5}, "k must be an integer"), ({"fraction": 0}, "fraction"), ({"fraction": 1.5}, "fraction"),
    ({"seed": -1}, "seed must be an integer >= 0"),
])
def test_bad_parameters_fail_in_one_line(params, message):
    with pytest.raises(ValueError, match=message) as info:
        create("grood", **params)
    assert "\n" not in str(info.value)
