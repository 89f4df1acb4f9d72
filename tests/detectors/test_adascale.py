"""Known answers for AdaSCALE-A on a linear "network" (z = an affine map of the normalised input), where the input
gradient, the perturbation and the feature shift have closed forms; limits against SCALE."""

import numpy as np
import pytest
import torch
from torch import nn

from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
from oodlab.detectors import create, fit_with_model, score_with_model
from oodlab.detectors.ash import kept_count
from oodlab.detectors.scale import scale_features
from oodlab.features import Features
from oodlab.models.adapter import Classifier

D, C = 40, 3
MEAN, STD = 0.2, 0.5


class Affine(nn.Module):
    """``a * x + c`` per entry with fixed, distinct ``a > 0`` and ``c``: continuous features (no ties)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", 0.5 + torch.rand(D))
        self.register_buffer("c", 0.01 * torch.randn(D))

    def forward(self, x):
        return self.a * x + self.c


def linear_model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    head = nn.Linear(D, C)
    return Classifier(Affine(), nn.Flatten(1), head, mean=(MEAN,), std=(STD,)).eval()


def images(n: int, seed: int, name: str) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 1, D), generator=g, dtype=torch.uint8)
    return ImageSet(name, ArrayDataset(x, torch.zeros(n, dtype=torch.long)), tensor_fingerprint(x), C)


def by_hand(model: Classifier, data: ImageSet, det, ecdf=None):
    """Q' and the score from the closed forms: the gradient of the top logit w.r.t. the normalised input is
    ``g = a * w_yhat``, so the official step (eps in normalised units on the o*D entries of smallest |g|)
    moves z by ``a * eps * sign(g)`` there."""
    w, b = model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()
    a, c = model.body.a.double().numpy(), model.body.c.double().numpy()
    x = torch.stack([data.dataset[i][0] for i in range(len(data))]).reshape(len(data), D).double().numpy()
    z = a * (x - MEAN) / STD + c
    yhat = (z @ w.T + b).argmax(1)
    n_pix = int(D * det.o)
    q_all, scores = [], []
    for zi, y in zip(z, yhat):
        g = a * w[y]
        mask = np.zeros(D)
        mask[np.argsort(np.abs(g), kind="stable")[:n_pix]] = 1
        zp = zi + a * det.eps * np.sign(g) * mask
        top_q = np.argsort(-zi, kind="stable")[: int(D * det.k1 / 100)]
        top_c = np.argsort(-zi, kind="stable")[: int(D * det.k2 / 100)]
        q_all.append(np.maximum(zp[top_c], 0).sum() + det.lmbda * np.abs(zi - zp)[top_q].sum())
    q_all = np.array(q_all)
    if ecdf is None:
        return q_all, None
    for zi, q in zip(z, q_all):
        p = det.p_min + (1 - np.searchsorted(ecdf, q, side="right") / len(ecdf)) * (det.p_max - det.p_min)
        relu = np.maximum(zi, 0)
        k = D - int(np.round(D * p / 100))
        r = relu.sum() / np.sort(relu)[::-1][:k].sum()
        logits = (zi * np.exp(r)) @ w.T + b
        scores.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max())
    return q_all, np.array(scores)


def test_adascale_statistic_ecdf_and_score_by_hand():
    model = linear_model()
    fit_set, test_set = images(50, 1, "val"), images(20, 2, "test")
    det = fit_with_model(create("adascale-a", k1=5.0, k2=10.0), model, fit_set, batch_size=16, device="cpu")
    q_fit, _ = by_hand(model, fit_set, det)
    assert np.allclose(det.state["ecdf"].numpy(), np.sort(q_fit), rtol=1e-6)
    _, want = by_hand(model, test_set, det, det.state["ecdf"].numpy())
    got = score_with_model(det, model, test_set, batch_size=7, device="cpu").numpy()
    assert np.allclose(got, want, rtol=1e-5)


def test_adascale_percentile_follows_the_ecdf_between_p_min_and_p_max():
    det = create("adascale-a")
    det.state = {"ecdf": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)}
    p = det.percentiles(torch.tensor([0.5, 2.0, 2.5, 4.0, 9.0]))
    assert p.tolist() == pytest.approx([85.0, 72.5, 72.5, 60.0, 60.0])  # more shift (OOD-like): less scaling


def test_adascale_with_one_percentile_is_scale():
    """p_min = p_max: the percentile no longer adapts, and AdaSCALE's shaping is SCALE's at that percentile (z >= 0)."""
    z = torch.relu(torch.randn(30, D))
    det = create("adascale-a", p_min=70.0, p_max=70.0)
    det.state = {"ecdf": torch.tensor([0.0], dtype=torch.float64)}
    ratio = det.ratio(z, det.percentiles(torch.rand(30)))
    k = kept_count(D, 70.0)
    want = z.double().sum(1, keepdim=True) / torch.topk(z.double(), k, 1).values.sum(1, keepdim=True)
    assert torch.allclose(ratio, want, rtol=1e-12)
    assert torch.allclose(z.double() * torch.exp(ratio), scale_features(z, 70.0), rtol=1e-12)


def test_adascale_l_scales_the_logits_by_the_squared_ratio():
    """AdaSCALE-L (OpenOOD's AdaScaleLNet): logits of the unscaled features times (s1 / s2)^2, then Energy;
    its statistic and percentiles are AdaSCALE-A's (checked against the by-hand ECDF)."""
    model = linear_model()
    fit_set, test_set = images(50, 1, "val"), images(20, 2, "test")
    det = fit_with_model(create("adascale-l", k1=5.0, k2=10.0), model, fit_set, batch_size=16, device="cpu")
    assert (det.p_min, det.p_max) == (75.0, 85.0)
    q_fit, _ = by_hand(model, fit_set, det)
    assert np.allclose(det.state["ecdf"].numpy(), np.sort(q_fit), rtol=1e-6)
    q_test, _ = by_hand(model, test_set, det)
    x = torch.stack([test_set.dataset[i][0] for i in range(len(test_set))])
    with torch.no_grad():
        z = model.features(x).double()
    w, b = model.head.weight.detach().double(), model.head.bias.detach().double()
    want = []
    ecdf = np.sort(q_fit)
    for zi, q in zip(z.numpy(), q_test):
        p = det.p_min + (1 - np.searchsorted(ecdf, q, side="right") / len(ecdf)) * (det.p_max - det.p_min)
        relu = np.maximum(zi, 0)
        k = D - int(np.round(D * p / 100))
        logits = (zi @ w.numpy().T + b.numpy()) * (relu.sum() / np.sort(relu)[::-1][:k].sum()) ** 2
        want.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max())
    got = score_with_model(det, model, test_set, batch_size=7, device="cpu").numpy()
    assert np.allclose(got, want, rtol=1e-5)


def test_adascale_fits_through_the_model_only():
    det = create("adascale-a")
    with pytest.raises(TypeError, match="fit_with_model"):
        det.fit(Features(torch.zeros(3, D), torch.zeros(3, C)), nn.Linear(D, C))
    small = fit_with_model(create("adascale-a", num_samples=5), linear_model(), images(40, 4, "v"), device="cpu")
    assert len(small.state["ecdf"]) == 5  # a seeded subset of the held-out images
