"""NECO against the official recipe rebuilt here with scikit-learn (StandardScaler, PCA, norm ratio), a worked
example, dead units, and refused parameters."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from torch import nn

from oodlab.detectors import create
from oodlab.detectors.neco import default_dim
from oodlab.features import Features


def linear(w, b):
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data, lin.bias.data = w.clone(), b.clone()
    return lin


def feats(z, w, b):
    return Features(z, z @ w.T + b)


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    c, d = 5, 20
    w, b = torch.randn(c, d, generator=g), 0.1 * torch.randn(c, generator=g)
    labels = torch.arange(600) % c
    train = F.relu(torch.randn(600, d, generator=g) + 3 * F.one_hot(labels, d).float())
    query = F.relu(torch.randn(50, d, generator=g) * 2)
    return w, b, train, query


def sklearn_neco(train, query, logits, dim, max_logit, raw_norm, standardize=True):
    """The official recipe: scaler (optional) then a full PCA of the training features; the norm of the first
    ``dim`` coordinates over the norm of the (scaled, or raw) feature; times the max logit."""
    x_train, x_query = train.double().numpy(), query.double().numpy()
    if standardize:
        ss = StandardScaler().fit(x_train)
        x_train, x_query_s = ss.transform(x_train), ss.transform(x_query)
    else:
        x_query_s = x_query
    pca = PCA(x_train.shape[1]).fit(x_train)
    reduced = pca.transform(x_query_s)[:, :dim]
    whole = x_query if raw_norm else x_query_s
    ratio = np.linalg.norm(reduced, axis=1) / np.linalg.norm(whole, axis=1)
    return ratio * logits.double().numpy().max(1) if max_logit else ratio


@pytest.mark.parametrize("params", [{}, {"max_logit": False}, {"raw_norm": True}, {"dim": 3, "max_logit": False},
                                    {"standardize": False, "dim": 7}])
def test_matches_the_official_recipe_with_scikit_learn(setup, params):
    w, b, train, query = setup
    det = create("neco", **params).fit(feats(train, w, b), linear(w, b))
    ref = sklearn_neco(train, query, query @ w.T + b, det.config()["dim"] or default_dim(20),
                       det.max_logit, det.raw_norm, det.standardize)
    assert np.allclose(det.score(feats(query, w, b)).numpy(), ref, rtol=1e-8, atol=1e-10)


def test_worked_example_two_correlated_dimensions():
    # standardised train = raw train (mean 0, std 1); covariance [[1,1,0],[1,1,0],[0,0,1]]: top direction (1,1,0)/sqrt 2
    z = torch.tensor([[1.0, 1, 1], [1, 1, -1], [-1, -1, 1], [-1, -1, -1]])
    w, b = torch.eye(3)[:2], torch.zeros(2)
    det = create("neco", dim=1, max_logit=False).fit(feats(z, w, b), linear(w, b))
    q = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 2], [3, 1, 0]])
    want = [1 / math.sqrt(2), 1.0, 0.0, (4 / math.sqrt(2)) / math.sqrt(10)]
    assert det.score(feats(q, w, b)).tolist() == pytest.approx(want, abs=1e-12)
    with_logit = create("neco", dim=1).fit(feats(z, w, b), linear(w, b)).score(feats(q, w, b))
    assert with_logit.tolist() == pytest.approx([a * m for a, m in zip(want, [1, 1, 0, 3])], abs=1e-12)


def test_dead_units_keep_scale_one_as_scikit_learn_does(setup):
    w, b, train, query = setup
    dead = train.clone()
    dead[:, :4] = 0.0  # never active on ID train
    det = create("neco", dim=5, max_logit=False).fit(feats(dead, w, b), linear(w, b))
    assert torch.equal(det.state["scale"][:4], torch.ones(4, dtype=torch.float64))
    s = det.score(feats(query, w, b))
    assert torch.isfinite(s).all()
    assert np.allclose(s.numpy(), sklearn_neco(dead, query, None, 5, False, False), rtol=1e-8)


def test_a_feature_at_the_mean_scores_zero():
    z = torch.tensor([[1.0, 1, 1], [1, 1, -1], [-1, -1, 1], [-1, -1, -1]]) + 0.5  # mean 0.5: exact in float32
    w, b = torch.eye(3)[:2], torch.zeros(2)
    det = create("neco", dim=1, max_logit=False).fit(feats(z, w, b), linear(w, b))
    assert det.score(feats(torch.full((1, 3), 0.5), w, b)).item() == 0.0


def test_id_scores_higher_than_ood(setup):
    w, b, train, query = setup
    labels = torch.arange(50) % 5
    id_query = F.relu(torch.randn(50, 20, generator=torch.Generator().manual_seed(9)) + 3 * F.one_hot(labels, 20).float())
    det = create("neco", dim=5, max_logit=False).fit(feats(train, w, b), linear(w, b))
    assert det.score(feats(id_query, w, b)).mean() > det.score(feats(query, w, b)).mean()


def test_default_dim_is_the_official_100_and_halves_small_features():
    assert [default_dim(d) for d in (2048, 768, 101, 100, 16, 1)] == [100, 100, 100, 50, 8, 1]


def test_dim_must_leave_a_complement(setup):
    w, b, train, _ = setup
    with pytest.raises(ValueError, match="dim=20 keeps every direction of 20-d features"):
        create("neco", dim=20).fit(feats(train, w, b), linear(w, b))


@pytest.mark.parametrize("params, match", [
    ({"dim": 0}, "dim must be an integer >= 1 or None"), ({"dim": "a"}, "dim must be an integer"),
    ({"max_logit": "yes"}, "max_logit must be True or False"), ({"raw_norm": 1}, "raw_norm must be True or False"),
    ({"standardize": None}, "standardize must be True or False"),
])
def test_bad_parameters_are_refused_in_one_line(params, match):
    with pytest.raises(ValueError, match=match) as info:
        create("neco", **params)
    assert "\n" not in str(info.value)
