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
        elif name == "gmm":
            s = pod.GMM(None).fit_features(train.z, train.labels).predict_features(test.z)
        elif name == "openmax":
            # fitted on the correctly classified samples (it takes all labelled ones) and given oodlab's Weibull
            # parameters (its exponweib fit at translation 10000 misses libmr's MLE); every class is some test
            # sample's top class, so its batch-dependent distances (only to the batch's top classes) are all there
            ok = train.logits.argmax(1) == train.labels
            det = pod.OpenMax(None, tailsize=20, alpha=3, euclid_weight=1.0).fit_logits(train.logits[ok], train.labels[ok])
            ours = create("openmax", translate=10000.0).fit(train, head).state
            for c, mr in det._openmax.distributions.items():
                mr.scale, mr.c, mr.min_val = (float(ours[k][c]) for k in ("scale", "shape", "smallest"))
            s = det.predict_logits(test.logits)
        else:
            raise KeyError(name)
    return -torch.as_tensor(s).double()


@pytest.mark.parametrize("name, params", [
    ("energy", {}), ("maxlogit", {}), ("react", {}), ("scale", {}), ("fdbd", {}),
    ("vim", {"dim": 4}), ("knn", {"k": 50}), ("entropy", {}),
    ("weighted-energy", {"weights": [0.5, 2.0, 0.0, 1.0, -1.0]}),
    # pytorch-ood's GMM is class-conditional (one full-covariance Gaussian per class, + 1e-6 I, class-frequency
    # weights) on the raw features; oodlab's default is OpenOOD's unsupervised 50-component tied EM on a 50-d PCA
    ("gmm", {"components": None, "covariance": "full", "dim": None}),
    ("openmax", {"translate": 10000.0}),  # pytorch-ood's translation; its other differences: see _peer and openmax.py
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


def test_mahalanobis_ensemble_is_pytorch_ood_multimahalanobis_times_2n():
    """MultiMahalanobis on the same per-layer maps (both take their spatial mean): its per-layer distances are
    oodlab's divided by 2N, as for plain Mahalanobis, so the weighted sums are too. (pytorch-ood 0.4's
    ``fit_structured`` says it takes maps but fails on them: it is given their means.)"""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(400) % 4
    maps = [torch.randn(400, c, 3, 3, generator=g) + F.one_hot(labels, c).float()[:, :, None, None] for c in (6, 9)]
    test_maps = [torch.randn(50, c, 3, 3, generator=g) * 1.3 for c in (6, 9)]
    mean = lambda m: m.mean((2, 3))  # noqa: E731
    head = nn.Linear(9, 4)
    with torch.no_grad():
        train = Features(mean(maps[1]), head(mean(maps[1])), labels, layers={"a:mean": mean(maps[0]), "b:mean": mean(maps[1])})
        test = Features(mean(test_maps[1]), head(mean(test_maps[1])),
                        layers={"a:mean": mean(test_maps[0]), "b:mean": mean(test_maps[1])})
    ours = create("mds-ensemble", layers="a,b", alpha=[0.7, 1.5]).fit(train, head).score(test)
    peer = pod.MultiMahalanobis([nn.Identity(), nn.Identity()], alpha=[0.7, 1.5]).fit_structured([mean(m) for m in maps], labels)
    theirs = peer.predict_structured(test_maps).double()
    assert torch.allclose(ours, -2 * len(labels) * theirs, rtol=1e-3)


def test_gram_equals_pytorch_ood_gram():
    """The same ranges, held-out rows (drawn by the same seeded permutations) and normalisation: pytorch-ood's
    deviation is oodlab's score without the MSP division (``msp_weighted=False``), negated."""
    from torch.utils.data import DataLoader, TensorDataset

    from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
    from oodlab.models.adapter import Classifier

    torch.manual_seed(0)
    body = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)))
    model = Classifier(body, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), nn.Linear(6, 3)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (150, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(150) % 3
    xt = torch.randint(0, 256, (40, 1, 8, 8), generator=g, dtype=torch.uint8)
    train = ImageSet("train", ArrayDataset(x, y), tensor_fingerprint(x), 3)
    test = ImageSet("test", ArrayDataset(xt, None), tensor_fingerprint(xt), None)
    ours = create("gram", layers="0,1", powers=3, msp_weighted=False, seed=7).fit_on(model, train, device="cpu")
    torch.manual_seed(7)  # pytorch-ood draws its held-out rows with torch.randperm, class by class, as oodlab does
    peer = pod.Gram(nn.Sequential(model.pool, model.head), [body[0], body[1]], 3, num_poles_list=[1, 2, 3])
    # (a loader with its own generator: iterating one draws its base seed from that, not from the global stream)
    peer.fit(DataLoader(TensorDataset(x.float() / 255, y), batch_size=50, generator=torch.Generator()))
    theirs = peer.predict(xt.float() / 255).double()
    assert torch.allclose(ours.score_on(model, test, device="cpu"), -theirs, rtol=1e-4, atol=1e-6)


def test_rankfeat_equals_pytorch_ood_rankfeat(tiny):
    """The same rank-1 removal before the pool and Energy after the head (pytorch-ood in float32, oodlab's SVD in
    float64)."""
    model = tiny.model
    x = torch.stack([tiny.ood_set.dataset[i][0] for i in range(len(tiny.ood_set))])
    ours = create("rankfeat").fit_on(model, None, device="cpu").score_on(model, tiny.ood_set, device="cpu")
    peer = pod.RankFeat(backbone=model.feature_map, head=lambda f: model.head(model.pool(f)))
    with torch.no_grad():
        theirs = peer.predict(x).double()
    assert torch.allclose(ours, -theirs, rtol=1e-4, atol=1e-4)
