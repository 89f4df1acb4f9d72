"""Equality with a peer: oodlab and pytorch-ood 0.4 give the same scores where their definitions match.

pytorch-ood's scores are outlier scores (higher = OOD), oodlab's are ID scores, so one is the negative
of the other. The benchmark ``benchmarks/crosscheck.py`` compares every shared method on the default
model's features; this test keeps the matched definitions checked in CI on small made-up features.
"""

import pytest
import torch
import torch.nn.functional as F
from pytorch_ood import detector as pod
from torch import nn

from oodlab.detectors import create
from oodlab.features import Features


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(8, 5)
    with torch.no_grad():
        head.weight.copy_(2 * torch.eye(5, 8) + 0.3 * torch.randn(5, 8, generator=g))
        head.bias.copy_(0.1 * torch.randn(5, generator=g))
    labels = torch.arange(300) % 5
    z = F.relu(torch.randn(300, 8, generator=g) + 1.5 * F.one_hot(labels, 8).float())
    test_z = F.relu(torch.randn(60, 8, generator=g) * 1.5)
    with torch.no_grad():
        train = Features(z, head(z), labels)
        test = Features(test_z, head(test_z))
    return head, train, test


def _maps(z: torch.Tensor) -> torch.Tensor:
    return z[:, :, None, None]


def _oodlab(name: str, head: nn.Linear, train: Features, test: Features, **params) -> torch.Tensor:
    det = create(name, **params)
    return det.fit(train if det.feature_sets() - {"eval"} else None, head).score(test)


def _peer(head: nn.Linear, train: Features, test: Features, name: str) -> torch.Tensor:
    w, b = head.weight.detach(), head.bias.detach()
    map_head = lambda m: head(m.flatten(1))  # noqa: E731
    with torch.no_grad():
        if name == "energy":
            s = pod.EnergyBased(None).predict_logits(test.logits)
        elif name == "maxlogit":
            s = pod.MaxLogit(None).predict_logits(test.logits)
        elif name == "mahalanobis":
            s = pod.Mahalanobis(None).fit_features(train.z, train.labels).predict_features(test.z)
        elif name == "knn":
            s = pod.KNN(None, k=50).fit_features(train.z, train.labels).predict_features(test.z)
        elif name == "vim":
            s = pod.ViM(None, 4, w, b).fit_features(train.z, train.labels).predict_features(test.z)
        elif name == "react":
            det = pod.ReAct(None, map_head, percentile=0.9).fit_feature_maps(_maps(train.z), train.labels)
            s = det.predict_feature_maps(_maps(test.z))
        elif name == "scale":
            s = pod.SCALE(None, map_head, percentile=0.85).predict_feature_maps(_maps(test.z))
        elif name == "fdbd":
            s = pod.fDBD(None, head).fit_features(train.z).predict_features(test.z)
        elif name == "entropy":
            s = pod.Entropy(None).predict_logits(test.logits)
        elif name == "weighted-energy":
            s = pod.WeightedEBO(None, torch.tensor([0.5, 2.0, 0.0, 1.0, -1.0])).predict_logits(test.logits)
        else:
            raise KeyError(name)
    return -torch.as_tensor(s).double()


@pytest.mark.parametrize("name, params", [
    ("energy", {}), ("maxlogit", {}), ("react", {}), ("scale", {}), ("fdbd", {}),
    ("vim", {"dim": 4}), ("knn", {"k": 50}), ("entropy", {}),
    ("weighted-energy", {"weights": [0.5, 2.0, 0.0, 1.0, -1.0]}),
])
def test_same_scores_as_pytorch_ood(data, name, params):
    head, train, test = data
    ours = _oodlab(name, head, train, test, **params)
    assert torch.allclose(ours, _peer(head, train, test, name), rtol=1e-4, atol=1e-4)


def test_mahalanobis_is_pytorch_ood_times_2n(data):
    """pytorch-ood's shared covariance is the unnormalised scatter (N times oodlab's) and its score carries the
    Gaussian's -1/2, so its distances are oodlab's divided by 2N (its ridge 1e-6 I, float32: rtol 1e-3)."""
    head, train, test = data
    ours = _oodlab("mahalanobis", head, train, test)
    assert torch.allclose(ours, 2 * len(train.labels) * _peer(head, train, test, "mahalanobis"), rtol=1e-3)
