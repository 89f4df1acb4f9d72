"""Conformal p-values, thresholds, Benjamini-Hochberg and the drift test against brute force and references."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from oodlab.guard.conformal import (benjamini_hochberg, flag_rate_test, p_values, rank_for_alpha, rank_for_tpr,
                                    sorted_calibration)


def test_p_values_match_the_definition_with_ties():
    cal = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    s = torch.tensor([0.5, 1.0, 2.0, 2.5, 5.0, 9.0], dtype=torch.float64)
    want = [(1 + sum(c <= x for c in cal.tolist())) / 6 for x in s.tolist()]
    assert p_values(sorted_calibration(cal), s).tolist() == pytest.approx(want, abs=0)


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("n", [99, 100, 999, 1234])
def test_threshold_rule_is_p_at_most_alpha(alpha, n):
    g = torch.Generator().manual_seed(n)
    cal = sorted_calibration(torch.randint(0, 50, (n,), generator=g).double())  # many ties on purpose
    s = torch.randint(-5, 55, (5000,), generator=g).double()
    k = rank_for_alpha(n, alpha)
    assert k == math.floor(alpha * (n + 1) + 1e-9)
    assert torch.equal(p_values(cal, s) <= alpha, s < cal[k - 1])


def test_tpr_rule_accepts_at_least_that_fraction():
    cal = sorted_calibration(torch.randn(1000, generator=torch.Generator().manual_seed(0)))
    for tpr in (0.5, 0.9, 0.95, 0.999, 1.0):
        k = rank_for_tpr(len(cal), tpr)
        accepted = (cal >= cal[k - 1]).double().mean()
        assert accepted >= tpr and (k == 1 or (cal >= cal[k]).double().mean() < tpr)


def test_too_small_calibration_and_bad_rates_are_refused():
    with pytest.raises(ValueError, match="at least 99 calibration inputs"):
        rank_for_alpha(50, 0.01)
    assert rank_for_alpha(99, 0.01) == 1
    for bad in (0, 1, -0.1, float("nan")):
        with pytest.raises(ValueError, match="alpha must be a finite number in"):
            rank_for_alpha(100, bad)
    with pytest.raises(ValueError, match="empty"):
        sorted_calibration(torch.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        sorted_calibration(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("seed", range(5))
def test_benjamini_hochberg_equals_scipy(seed):
    g = np.random.default_rng(seed)
    p = np.concatenate([g.uniform(size=80), g.uniform(0, 0.01, size=20)])
    for q in (0.05, 0.1, 0.2):
        want = scipy.stats.false_discovery_control(p, method="bh") <= q
        assert np.array_equal(benjamini_hochberg(torch.from_numpy(p), q).numpy(), want)


def test_flag_rate_distribution_is_exact():
    n, k, m = 40, 3, 25
    pmf = [flag_rate_test(torch.arange(m) < j, n, k).p_value for j in range(m + 1)]
    assert pmf[0] == pytest.approx(1.0)
    # Monte Carlo of the exchangeable model: n + m i.i.d. scores, flags = stream scores below the k-th cal score
    g = np.random.default_rng(0)
    x = g.uniform(size=(200_000, n + m))
    kth = np.sort(x[:, :n], axis=1)[:, k - 1]
    j = (x[:, n:] < kth[:, None]).sum(1)
    for jj in (2, 5, 8):
        assert pmf[jj] == pytest.approx((j >= jj).mean(), abs=4e-3)


def test_flag_rate_test_tends_to_the_binomial_and_sees_drift():
    n, alpha, m = 200_000, 0.05, 1000
    k = rank_for_alpha(n, alpha)
    for j in (40, 50, 62, 70):
        ours = flag_rate_test(torch.arange(m) < j, n, k).p_value
        binom = scipy.stats.binomtest(j, m, k / (n + 1), alternative="greater").pvalue
        assert ours == pytest.approx(binom, rel=0.05)
    report = flag_rate_test(torch.arange(m) < 100, n, k)
    assert report.drift and report.rate == 0.1 and "DRIFT" in str(report)
    assert not flag_rate_test(torch.arange(m) < 50, n, k).drift
