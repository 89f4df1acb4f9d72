import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn

from oodlab.detectors import create
from oodlab.detectors.vim import default_dim
from oodlab.features import Features


def linear(w, b):
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data, lin.bias.data = w.clone(), b.clone()
    return lin


def feats(z, w, b):
    return Features(z, z @ w.T + b)


def test_closed_form_axis_aligned():
    # second moment diag(4, 4, .25, .25): principal space e1, e2 (dim 2), residual e3, e4
    e = torch.eye(4)
    z = torch.cat([4 * e[:2], -4 * e[:2], e[2:], -e[2:]])
    w, b = e[:2], torch.zeros(2)  # u = -pinv(W) b = 0
    det = create("vim", dim=2).fit(feats(z, w, b), linear(w, b))
    # mean max-logit over train = (4 + 4) / 8 = 1; mean residual norm = 4 / 8 = 0.5  ->  alpha = 2
    assert float(det.state["alpha"]) == pytest.approx(2.0)
    proj = det.state["residual"] @ det.state["residual"].T
    assert torch.allclose(proj, torch.diag(torch.tensor([0.0, 0, 1, 1], dtype=torch.float64)), atol=1e-12)
    q = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert det.score(feats(q, w, b)).item() == pytest.approx(math.log(math.e + math.e**2) - 2 * 5)


def test_matches_a_numpy_reference_of_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    d, c, dim = 10, 4, 3
    w, b = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    train, query = torch.rand(500, d, generator=g) * 3, torch.rand(40, d, generator=g) * 3
    det = create("vim", dim=dim).fit(feats(train, w, b), linear(w, b))

    W, Bv, X, Q = (t.double().numpy() for t in (w, b, train, query))
    u = -np.linalg.pinv(W) @ Bv
    vals, vecs = np.linalg.eigh((X - u).T @ (X - u) / len(X))
    ns = vecs[:, np.argsort(-vals)[dim:]]
    alpha = (X @ W.T + Bv).max(1).mean() / np.linalg.norm((X - u) @ ns, axis=1).mean()
    ref = logsumexp(Q @ W.T + Bv, axis=1) - alpha * np.linalg.norm((Q - u) @ ns, axis=1)
    assert np.allclose(det.score(feats(query, w, b)).numpy(), ref, rtol=1e-10)


def test_default_dim_follows_the_paper_and_halves_small_features():
    assert [default_dim(d) for d in (2048, 1024, 768, 512, 128)] == [1000, 512, 512, 256, 64]


def test_dim_must_leave_a_residual():
    w, b = torch.eye(4)[:2], torch.zeros(2)
    with pytest.raises(ValueError, match="no residual"):
        create("vim", dim=4).fit(feats(torch.rand(10, 4), w, b), linear(w, b))
