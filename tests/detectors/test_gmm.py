"""GMM: a one-Gaussian worked example, class-conditional Gaussians against SciPy, EM against scikit-learn's own
``score_samples``, the relation to OpenOOD's score, streaming, and bad inputs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture
from torch import nn

from oodlab.detectors import create
from oodlab.features import Features


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(8, 5)
    labels = torch.arange(300) % 5
    z = F.relu(torch.randn(300, 8, generator=g) + 1.5 * F.one_hot(labels, 8).float()) + 0.1 * torch.rand(300, 8, generator=g)
    test = F.relu(torch.randn(60, 8, generator=g) * 1.5)
    with torch.no_grad():
        return head, Features(z, head(z), labels), Features(test, head(test))


def test_one_gaussian_by_hand():
    """components=1 on 1-d data [0, 2]: mean 1, variance 1 (maximum likelihood), so log p(x) = -(x-1)^2/2 - log(2 pi)/2."""
    head = nn.Linear(1, 2)
    z = torch.tensor([[0.0], [2.0]])
    with torch.no_grad():
        det = create("gmm", components=1, dim=None, reg=0.0).fit(Features(z, head(z)), head)
        s = det.score(Features(torch.tensor([[1.0], [3.0]]), head(torch.tensor([[1.0], [3.0]]))))
    c = -0.5 * math.log(2 * math.pi)
    assert s.tolist() == pytest.approx([c, c - 2.0], abs=1e-9)


@pytest.mark.parametrize("covariance", ["full", "tied"])
def test_class_conditional_matches_scipy(problem, covariance):
    head, train, test = problem
    z, y = train.z.double().numpy(), train.labels.numpy()
    comps = []
    shared = sum(np.cov(z[y == c].T, bias=True) * (y == c).sum() for c in range(5)) / len(z)
    for c in range(5):
        cov = np.cov(z[y == c].T, bias=True) if covariance == "full" else shared
        comps.append(multivariate_normal(z[y == c].mean(0), cov + 1e-6 * np.eye(8)).logpdf(test.z.double().numpy())
                     + np.log((y == c).mean()))
    expected = logsumexp(np.stack(comps, 1), axis=1)
    det = create("gmm", components=None, covariance=covariance, dim=None).fit(train, head)
    assert np.allclose(det.score(test).numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("covariance, dim", [("tied", 4), ("full", 3), ("tied", None)])
def test_em_is_scikit_learns_mixture(problem, covariance, dim):
    head, train, test = problem
    det = create("gmm", components=4, covariance=covariance, dim=dim).fit(train, head)
    z = train.z.double().numpy()
    proj = np.eye(8)
    if dim is not None:  # the PCA: top eigenvectors of the covariance, the span must agree
        vals, vecs = np.linalg.eigh(np.cov(z.T, bias=True))
        proj = vecs[:, ::-1][:, :dim]
        ours = det.state["projection"].numpy()
        assert np.allclose(np.abs(ours.T @ proj), np.eye(dim), atol=1e-8)
        proj = ours  # EM from the same projection, so the two fits see identical data
    gm = GaussianMixture(4, covariance_type=covariance, random_state=0).fit(z @ proj)
    expected = gm.score_samples(test.z.double().numpy() @ proj)
    assert np.allclose(det.score(test).numpy(), expected, rtol=1e-8, atol=1e-8)


def test_tied_score_is_openoods_plus_a_constant(problem):
    """OpenOOD scores log(sum_k w_k exp(-d_k / 2)) (no Gaussian constant; here without its float32 floor)."""
    head, train, test = problem
    det = create("gmm", components=6).fit(train, head)
    y = test.z.double() @ det.state["projection"] if "projection" in det.state else test.z.double()
    gm = GaussianMixture(6, covariance_type="tied", random_state=0).fit(train.z.double().numpy())
    prec = torch.from_numpy(gm.precisions_)
    diff = y[:, None, :] - torch.from_numpy(gm.means_)[None]
    openood = torch.logsumexp(torch.from_numpy(gm.weights_).log() - 0.5 * torch.einsum("nki,ij,nkj->nk", diff, prec, diff), 1)
    gap = det.score(test) - openood
    assert gap.std() < 1e-8  # dim=50 >= D=8: no projection, the same EM fit, only the constant differs


def test_em_subset_bounds_memory_and_is_seeded(problem):
    head, train, test = problem
    a = create("gmm", components=3, max_samples=100).fit(train, head)
    b = create("gmm", components=3, max_samples=100).fit(train, head)
    c = create("gmm", components=3, max_samples=100, seed=1).fit(train, head)
    assert torch.equal(a.score(test), b.score(test))
    assert not torch.equal(a.score(test), c.score(test))


def test_chunked_scoring_of_full_covariances(problem):
    head, train, test = problem
    det = create("gmm", components=None, covariance="full", dim=None).fit(train, head)
    whole = det.tensor_score(test.z, test.logits)
    parts = torch.cat([det.tensor_score(c.z, c.logits) for c in test.chunks(7)])
    assert torch.allclose(whole, parts, rtol=0, atol=1e-12) and torch.equal(det.score(test), det.score(test))


def test_fit_refusals(problem):
    head, train, _ = problem
    with pytest.raises(ValueError, match="class labels"):
        create("gmm", components=None).fit(Features(train.z, train.logits), head)
    with pytest.raises(ValueError, match="needs at least as many"):
        create("gmm", components=50).fit(Features(train.z[:20], train.logits[:20]), head)
    with pytest.raises(ValueError, match="no training features"):
        create("gmm", components=None).fit(Features(train.z[:3], train.logits[:3], train.labels[:3]), head)


@pytest.mark.parametrize("params, message", [
    ({"components": 0}, "components must be an integer >= 1"), ({"covariance": "diag"}, "covariance must be one of"),
    ({"dim": 0}, "dim must be an integer >= 1"), ({"reg": -1.0}, "reg must be"), ({"reg": float("nan")}, "reg must be"),
    ({"max_samples": 0}, "max_samples must be an integer >= 1"), ({"seed": -1}, "seed must be an integer >= 0"),
])
def test_bad_parameters_fail_in_one_line(params, message):
    with pytest.raises(ValueError, match=message) as info:
        create("gmm", **params)
    assert "\n" not in str(info.value)
