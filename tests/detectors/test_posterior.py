"""Known answers for KL-Matching and temperature scaling (both fit on held-out ID data)."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from oodlab.detectors import create
from oodlab.detectors.posterior import fit_temperature
from oodlab.features import Features


def _head(c: int = 3, d: int = 4) -> nn.Linear:
    return nn.Linear(d, c)


def test_klm_templates_and_score_match_openoods_formula():
    g = torch.Generator().manual_seed(0)
    val = torch.randn(200, 3, generator=g) * 3
    val[:, 2] -= 20  # class 2 is never predicted: no template
    test = torch.randn(30, 3, generator=g) * 3
    det = create("klm").fit(Features(torch.zeros(200, 4), val), _head())
    p = torch.softmax(val.double(), 1).numpy()
    pred = p.argmax(1)
    templates = [p[pred == k].mean(0) for k in (0, 1)]
    assert set(pred) == {0, 1} and det.state["log_templates"].shape == (2, 3)
    pt = torch.softmax(test.double(), 1).numpy()
    want = -np.array([min(scipy.stats.entropy(q, t) for t in templates) for q in pt])  # OpenOOD's klm
    got = det.score(Features(torch.zeros(30, 4), test)).numpy()
    assert np.allclose(got, want, rtol=1e-10, atol=1e-12)
    own = create("klm", nearest=False).fit(Features(torch.zeros(200, 4), val), _head())
    want_own = -np.array([scipy.stats.entropy(q, templates[q.argmax()]) if q.argmax() < 2 else -w
                          for q, w in zip(pt, want)])
    assert np.allclose(own.score(Features(torch.zeros(30, 4), test)).numpy(), want_own, rtol=1e-10, atol=1e-12)


def test_klm_limit_one_sample_per_class_scores_itself_zero():
    val = torch.tensor([[4.0, 0.0, -1.0], [0.0, 3.0, 1.0], [-2.0, 0.5, 2.0]])
    det = create("klm").fit(Features(torch.zeros(3, 4), val), _head())
    s = det.score(Features(torch.zeros(3, 4), val))
    assert torch.allclose(s, torch.zeros(3, dtype=torch.float64), atol=1e-15)  # each is its own template
    far = det.score(Features(torch.zeros(1, 4), torch.tensor([[0.0, 0.0, 0.0]])))
    assert far.item() < 0


def _binary(m: float, q: float, n: int = 1000):
    """Two-class logits (m, 0) or (0, m) with margin m; a fraction q of the labels are the argmax."""
    right = int(round(q * n))
    logits = torch.zeros(n, 2)
    logits[:, 0] = m
    labels = torch.ones(n, dtype=torch.long)
    labels[:right] = 0
    return Features(torch.zeros(n, 4), logits, labels)


@pytest.mark.parametrize("m,q", [(4.0, 0.8), (1.0, 0.95), (10.0, 0.6)])
def test_temperature_is_the_closed_form_nll_minimiser(m, q):
    """NLL(T) = q log(1 + e^(-m/T)) + (1 - q) log(1 + e^(m/T)) is minimal where sigmoid(m / T) = q."""
    val = _binary(m, q)
    det = create("temp-scaling").fit(val, _head(2))
    want = m / math.log(q / (1 - q))
    assert det.fitted_temperature == pytest.approx(want, rel=1e-10)
    t, passes = fit_temperature(val)
    assert passes <= 40
    test = torch.randn(20, 2)
    expect = torch.softmax(test.double() / want, 1).max(1).values
    assert torch.allclose(det.score(Features(torch.zeros(20, 4), test)), expect, rtol=1e-9)


def test_temperature_bounds_fixed_temperature_and_labels():
    perfect = _binary(3.0, 1.0)  # every sample right: the NLL keeps falling as T -> 0
    with pytest.warns(UserWarning, match="minimised at or beyond T = 0.01"):
        assert create("temp-scaling").fit(perfect, _head(2)).fitted_temperature == pytest.approx(0.01)
    fixed = create("temp-scaling", temperature=1.0).fit(perfect, _head(2))
    x = Features(torch.zeros(5, 4), torch.randn(5, 2))
    assert torch.equal(fixed.score(x), create("msp").fit(None, _head(2)).score(x))  # T = 1 is MSP
    with pytest.raises(ValueError, match="labels"):
        create("temp-scaling").fit(Features(torch.zeros(5, 4), torch.randn(5, 2)), _head(2))
    with pytest.raises(ValueError, match="> 0"):
        create("temp-scaling", temperature=0.0)
