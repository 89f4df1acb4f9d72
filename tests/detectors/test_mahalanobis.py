import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from torch import nn

from oodlab.detectors import create
from oodlab.features.stats import class_moments
from oodlab.features import core
from oodlab.features import Features

A, B_ = 1.0, 2.0
CROSS = torch.tensor([[A, 0.0], [-A, 0.0], [0.0, B_], [0.0, -B_]])
MU = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
# each class: its mean +- a*e1, +- b*e2  ->  shared covariance diag(a^2 / 2, b^2 / 2)
TRAIN_Z = torch.cat([MU[0] + CROSS, MU[1] + CROSS])
TRAIN_Y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def feats(z, y=None):
    return Features(z, torch.zeros(len(z), 2), y)


def fitted(z=TRAIN_Z, y=TRAIN_Y):
    return create("mahalanobis").fit(feats(z, y), nn.Linear(z.shape[1], 2))


def test_closed_form_two_classes():
    det = fitted()
    assert torch.allclose(det.state["means"], MU.double())
    assert torch.allclose(det.state["precision"], torch.diag(torch.tensor([2 / A**2, 2 / B_**2], dtype=torch.float64)))
    q = torch.tensor([[1.0, 1.0], [9.0, -2.0], [5.0, 0.0]])
    # d_c = 2 (x - mu_c)_1^2 / a^2 + 2 (x - mu_c)_2^2 / b^2, score = -min_c d_c
    expected = torch.tensor([-(2 * 1 + 2 * 1 / 4), -(2 * 1 + 2 * 4 / 4), -(2 * 25)], dtype=torch.float64)
    assert torch.allclose(det.score(feats(q)), expected, rtol=1e-12)


def test_dead_unit_is_ignored_not_amplified():
    """A unit never active on ID train makes the covariance singular; the pseudo-inverse drops it."""
    dead = torch.cat([TRAIN_Z, torch.zeros(8, 1)], 1)
    det = fitted(dead)
    q = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 7.0], [9.0, -2.0, 1e-3]])
    s = det.score(feats(q))
    assert torch.isfinite(s).all()
    assert torch.allclose(s, fitted().score(feats(q[:, :2])), rtol=1e-12)
    assert torch.allclose(det.state["precision"][2], torch.zeros(3, dtype=torch.float64))


def test_precision_matches_sklearn_on_class_centred_features(monkeypatch):
    monkeypatch.setattr(core, "CHUNK_BYTES", 8 * 6 * 50)  # chunks of 50 rows: several running sums
    g = torch.Generator().manual_seed(0)
    z = torch.rand(333, 6, generator=g)
    z[:, 4] = 0  # a dead unit too
    y = torch.arange(333) % 3
    m = class_moments(Features(z, torch.zeros(333, 3), y), 3)
    means, cov = m.class_means(), m.shared_covariance()
    zd = z.double().numpy()
    centred = zd - means.numpy()[y.numpy()]
    ref = EmpiricalCovariance(assume_centered=True).fit(centred)
    assert np.allclose(means.numpy(), [zd[y.numpy() == c].mean(0) for c in range(3)], rtol=1e-12)
    assert np.allclose(cov.numpy(), ref.covariance_, atol=1e-12)
    assert np.allclose(m.covariance().numpy(), EmpiricalCovariance().fit(zd).covariance_, atol=1e-12)
    det = create("mahalanobis").fit(Features(z, torch.zeros(333, 3), y), nn.Linear(6, 3))
    assert np.allclose(det.state["precision"].numpy(), ref.precision_, rtol=1e-8, atol=1e-8)


def test_needs_labels_and_every_class():
    with pytest.raises(ValueError, match="labels"):
        create("mahalanobis").fit(feats(TRAIN_Z), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        create("mahalanobis").fit(feats(TRAIN_Z, TRAIN_Y), nn.Linear(2, 3))


@pytest.mark.parametrize("name", ["mahalanobis", "rmds"])
def test_features_far_from_the_origin_keep_their_distances(name):
    """ReLU features sit far from the origin relative to their spread; with fewer samples than dimensions the
    covariance is singular. Raw second moments then lost the covariance to rounding and the pseudo-inverse blew the
    noise up (constant scores, AUROC 0.55 where the distances give 1.0): the sums are now shifted."""
    torch.manual_seed(0)
    n, d, k = 200, 512, 10
    w = torch.randn(d, d) / d**0.5
    z, y = 30 + 0.01 * torch.randn(n, d) @ w, torch.arange(n) % k
    test = 30 + 0.01 * torch.randn(300, d) @ w
    head = torch.nn.Linear(d, k)
    det = create(name).fit(Features(z, head(z).detach(), y), head)
    got = det.score(Features(test, head(test).detach()))
    mu = torch.stack([z[y == c].double().mean(0) for c in range(k)])
    xc = z.double() - mu[y]
    precision = torch.linalg.pinv(xc.T @ xc / n, hermitian=True)
    dist = lambda x, m, p: (((x.double() - m) @ p) * (x.double() - m)).sum(1)  # noqa: E731  (differences first)
    want = -torch.stack([dist(test, mu[c], precision) for c in range(k)], 1)
    if name == "rmds":
        g = z.double().mean(0)
        p0 = torch.linalg.pinv((z.double() - g).T @ (z.double() - g) / n, hermitian=True)
        want = want + dist(test, g, p0)[:, None]
    want = want.max(1).values
    assert got.unique().numel() == 300
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
