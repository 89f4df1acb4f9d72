"""OpenMax: a brute-force known answer (loops, scipy distances, the Weibull CDF by formula), the Weibull fit
checked against its maximum-likelihood equations (and libmr where it is installed), and the refusals."""

import math

import numpy as np
import pytest
import scipy.spatial.distance as spd
import torch
from scipy import stats
from torch import nn

from oodlab.detectors import create
from oodlab.detectors.openmax import weibull_fit_high
from oodlab.features import Features

C = 4


def _features(n: int, seed: int, labels: torch.Tensor | None = None, signal: float = 3.0) -> Features:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C if labels is None else labels
    logits = torch.randn(n, C, generator=g) * 1.5 + signal * nn.functional.one_hot(y, C)
    return Features(torch.randn(n, 6, generator=g), logits, y)


@pytest.fixture(scope="module")
def head():
    return nn.Linear(6, C)


def _distance(x, mu, kind, eu_weight):
    if kind == "euclidean":
        return spd.euclidean(mu, x)
    if kind == "cosine":
        return spd.cosine(mu, x)
    return eu_weight * spd.euclidean(mu, x) + spd.cosine(mu, x)


def _brute_force(train: Features, test: Features, tail_size, alpha, kind, eu_weight, translate):
    """OpenMax spelled out sample by sample: -P(unknown), with the Weibull parameters from scipy's generic MLE."""
    x_train, y = train.logits.double().numpy(), train.labels.numpy()
    right = x_train.argmax(1) == y
    models = []
    for c in range(C):
        rows = x_train[right & (y == c)]
        mav = rows.mean(0)
        tail = sorted(_distance(r, mav, kind, eu_weight) for r in rows)[-tail_size:]
        small = min(tail)
        shape, _, scale = stats.weibull_min.fit(np.array(tail) - small + translate, floc=0)
        models.append((mav, small, scale, shape))
    out = []
    for v in test.logits.double().numpy():
        ranked = list(np.argsort(-v, kind="stable")[:alpha])
        revised, unknown = list(v), 0.0
        for c in range(C):
            if c not in ranked:
                continue
            mav, small, scale, shape = models[c]
            t = max(_distance(v, mav, kind, eu_weight) - small + translate, 0.0)
            w = (1 - math.exp(-((t / scale) ** shape))) * (alpha - ranked.index(c)) / alpha
            revised[c] = v[c] * (1 - w)
            unknown += v[c] * w
        e = np.exp(np.array(revised + [unknown], dtype=np.float64))
        out.append(-e[-1] / e.sum())
    return torch.tensor(out, dtype=torch.float64), models


@pytest.mark.parametrize("kind, alpha, eu_weight, translate", [("euclidean", 3, 0.5, 1.0), ("cosine", 2, 0.5, 1.0),
                                                                ("eucos", 4, 0.005, 1.0), ("eucos", 1, 0.5, 1.0)])
def test_known_answer(head, kind, alpha, eu_weight, translate):
    train, test = _features(600, 0), _features(80, 1, signal=1.0)
    det = create("openmax", tail_size=15, alpha=alpha, distance=kind, eu_weight=eu_weight, translate=translate)
    ours = det.fit(train, head).score(test)
    want, models = _brute_force(train, test, 15, alpha, kind, eu_weight, translate)
    s = det.state
    for c, (mav, small, scale, shape) in enumerate(models):
        assert np.allclose(s["means"][c].numpy(), mav, rtol=1e-12, atol=1e-12)
        assert math.isclose(float(s["smallest"][c]), small, rel_tol=1e-12)
        # scipy's generic optimiser stops near the MLE; ours solves it (checked exactly in the next test)
        assert math.isclose(float(s["scale"][c]), scale, rel_tol=1e-4)
        assert math.isclose(float(s["shape"][c]), shape, rel_tol=1e-3)
    assert ours.dtype == torch.float64 and ours.shape == (80,)
    assert torch.allclose(ours, want, rtol=1e-3, atol=1e-4)
    assert float(ours.std()) > 0.01 and (ours <= 0).all() and (ours >= -1).all()


def test_known_answer_exact_with_our_parameters(head):
    """With the fitted Weibull parameters given, the recalibration is exact arithmetic (1e-12)."""
    train, test = _features(500, 2), _features(50, 3, signal=1.0)
    det = create("openmax", tail_size=10).fit(train, head)
    s = det.state
    x = test.logits.double().numpy()
    want = []
    for v in x:
        ranked = list(np.argsort(-v)[:3])
        revised, unknown = v.copy(), 0.0
        for r, c in enumerate(ranked):
            t = max(np.linalg.norm(v - s["means"][c].numpy()) - float(s["smallest"][c]) + 1.0, 0.0)
            w = (1 - math.exp(-((t / float(s["scale"][c])) ** float(s["shape"][c])))) * (3 - r) / 3
            revised[c], unknown = v[c] * (1 - w), unknown + v[c] * w
        e = np.exp(np.append(revised, unknown))
        want.append(-e[-1] / e.sum())
    assert np.allclose(det.score(test).numpy(), want, rtol=1e-12, atol=1e-14)
    # one score per sample, whatever the batch: scoring a slice gives the same numbers
    part = Features(test.z[7:9], test.logits[7:9])
    assert torch.allclose(det.score(part), det.score(test)[7:9], rtol=1e-14, atol=0)


@pytest.mark.parametrize("translate", [1.0, 10000.0])
def test_weibull_fit_solves_the_likelihood_equations(translate):
    tail = np.sort(np.abs(np.random.default_rng(0).normal(size=200)) * 3)[-20:]
    scale, shape, small = weibull_fit_high(tail, translate)
    x = tail - small + translate
    assert small == tail.min()
    # maximum likelihood of a Weibull with location 0: the profile equation in the shape, then the scale
    lx, xk = np.log(x), (x / x.max()) ** shape
    assert abs((xk * lx).sum() / xk.sum() - 1 / shape - lx.mean()) < 1e-9 * max(1.0, 1 / shape)
    assert math.isclose(scale, x.max() * xk.mean() ** (1 / shape), rel_tol=1e-9)


@pytest.mark.parametrize("translate", [1, 10000])
def test_weibull_fit_equals_libmr(translate):
    """Only where libmr is installed (it cannot be a pip extra: its sdist needs numpy at setup time)."""
    libmr = pytest.importorskip("libmr")
    rng = np.random.default_rng(1)
    for _ in range(20):
        d = np.abs(rng.normal(size=100)) * 10 ** rng.uniform(-2, 1)
        tail = np.sort(d)[-20:]
        mr = libmr.MR(translate_amount=translate)
        mr.fit_high(tail, len(tail))
        scale, shape, small = weibull_fit_high(tail, translate)
        mr_scale, mr_shape, _, _, mr_small = mr.get_params()
        assert np.allclose((scale, shape, small), (mr_scale, mr_shape, mr_small), rtol=1e-5)
        w = 1 - np.exp(-((np.maximum(d - small + translate, 0) / scale) ** shape))
        assert np.allclose(w, [mr.w_score(v) for v in d], atol=1e-5)


def test_far_from_every_class_mean_scores_lower(head):
    det = create("openmax").fit(_features(400, 4), head)
    means = det.state["means"].float()
    far = means + 8 * torch.tensor([-1.0, 1.0, -1.0, 1.0])
    assert (det.score(Features(torch.zeros(C, 6), far)) < det.score(Features(torch.zeros(C, 6), means))).all()


def test_class_with_too_few_correct_samples_is_refused(head):
    train = _features(400, 5)
    logits, y = train.logits.clone(), train.labels
    ones = (y == 1).nonzero().flatten()
    logits[ones[:12], 1], logits[ones[12:], 1] = 10.0, -10.0  # 12 samples of class 1 classified correctly
    bad = Features(train.z, logits, y)
    assert int(((logits.argmax(1) == y) & (y == 1)).sum()) == 12
    with pytest.raises(ValueError) as exc:
        create("openmax").fit(bad, head)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg == ("class 1 has 12 correctly classified training samples, fewer than tail_size = 20: "
                   "lower tail_size or give more data")
    assert create("openmax", tail_size=12).fit(bad, head).fitted


def test_alpha_above_the_number_of_classes_is_refused(head):
    with pytest.raises(ValueError, match=r"^alpha = 5 is above the number of classes \(4\): lower alpha$"):
        create("openmax", alpha=5).fit(_features(400, 6), head)


def test_class_never_classified_correctly_uses_all_its_samples(head):
    train = _features(400, 7)
    logits, y = train.logits.clone(), train.labels
    logits[y == 2, 2] = -10.0
    with pytest.warns(UserWarning, match=r"classes \[2\] is classified correctly"):
        det = create("openmax").fit(Features(train.z, logits, y), head)
    assert torch.allclose(det.state["means"][2], logits[y == 2].double().mean(0))


@pytest.mark.parametrize("make, match", [
    (lambda f: Features(f.z, f.logits), "needs the class labels"),
    (lambda f: Features(f.z[:300], f.logits[:300], torch.arange(300) % 3), r"classes \[3\] have no training features"),
    (lambda f: Features(f.z, f.logits[:1].repeat(len(f), 1) * (1 + (f.labels[:, None] == 0)), f.labels),
     "no Weibull can be fitted"),
])
def test_bad_training_data_is_refused_in_one_line(head, make, match):
    with pytest.raises(ValueError, match=match) as exc:
        create("openmax").fit(make(_features(400, 8)), head)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("params", [{"tail_size": 1}, {"tail_size": 2.5}, {"alpha": 0}, {"distance": "manhattan"},
                                    {"eu_weight": -1}, {"translate": 0}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError, match=f"bad parameters for openmax: {next(iter(params))}"):
        create("openmax", **params)
