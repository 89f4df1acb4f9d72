"""Metrics agree with scikit-learn exactly and follow the documented FPR@TPR rule."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodlab import metrics


def _cases():
    rng = np.random.default_rng(0)
    for i in range(60):
        n_id, n_ood = int(rng.integers(1, 80)), int(rng.integers(1, 400))  # imbalanced both ways
        if i % 3 == 0:  # heavy ties: few distinct values
            yield rng.integers(0, 4, n_id).astype(float), rng.integers(0, 4, n_ood).astype(float)
        elif i % 3 == 1:
            yield rng.normal(0.5, 1, n_id), rng.normal(0, 1, n_ood)
        else:  # energy-like magnitudes far outside [0, 1]
            yield rng.normal(12, 3, n_id), rng.normal(7, 3, n_ood)


@pytest.mark.parametrize("sid,sood", list(_cases()))
def test_against_sklearn(sid, sood):
    y = np.r_[np.ones(sid.size), np.zeros(sood.size)]
    s = np.r_[sid, sood]
    assert metrics.auroc(sid, sood) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert metrics.aupr_in(sid, sood) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert metrics.aupr_out(sid, sood) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-9)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert metrics.fpr_at_tpr(sid, sood) == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)


def test_known_values():
    assert metrics.auroc([3, 4], [1, 2]) == 1.0
    assert metrics.auroc([1, 2], [3, 4]) == 0.0
    assert metrics.auroc([1, 1], [1, 1]) == 0.5  # all tied
    assert metrics.fpr_at_tpr([3, 4], [1, 2]) == 0.0


def test_fpr95_tie_rule_pinned():
    # 20 ID scores 1..20; OOD scores tie with the ID score that is the 95% point (ID rank 19 -> score 2).
    sid = np.arange(1, 21, dtype=float)
    sood = np.array([2.0, 2.0, 0.5, 0.5])
    # Threshold 2 is the first one reaching TPR >= 0.95 (19/20); both tied OOD samples are accepted with it.
    assert metrics.fpr_at_tpr(sid, sood) == 0.5
    # Moving the OOD ties just below the threshold makes them rejected.
    assert metrics.fpr_at_tpr(sid, sood - 0.1) == 0.0


def test_ood_positive_variant_differs():
    sid, sood = np.linspace(0, 1, 100), np.linspace(-0.5, 0.6, 100)
    assert metrics.fpr_at_tpr(sid, sood) != metrics.fpr_at_tpr_ood_positive(sid, sood)
    # It is exactly the papers' rule with the roles swapped.
    assert metrics.fpr_at_tpr_ood_positive(sid, sood) == metrics.fpr_at_tpr(-sood, -sid)


@pytest.mark.parametrize("bad,msg", [
    (([1.0, np.nan], [0.0]), "NaN"),
    (([1.0], [np.inf]), "NaN/inf"),
    (([], [0.0]), "empty"),
    (([1.0], []), "empty"),
])
def test_bad_inputs(bad, msg):
    with pytest.raises(ValueError, match=msg):
        metrics.evaluate(*bad)


def test_evaluate_keys_and_range():
    rng = np.random.default_rng(1)
    out = metrics.evaluate(rng.normal(1, 1, 50), rng.normal(0, 1, 70))
    assert set(out) == {"auroc", "fpr95", "aupr_in", "aupr_out"}
    assert all(0 <= v <= 1 for v in out.values())


def _reference_bootstrap(sid, sood, n_boot, seed):
    """The slow loop: resample ID and OOD indices separately (same generator, same order), recompute exactly."""
    rng = np.random.default_rng(seed)
    aurocs, fprs = [], []
    for _ in range(n_boot):
        i, j = rng.integers(0, sid.size, sid.size), rng.integers(0, sood.size, sood.size)
        aurocs.append(metrics.auroc(sid[i], sood[j]))
        fprs.append(metrics.fpr_at_tpr(sid[i], sood[j]))
    return np.array(aurocs), np.array(fprs)


@pytest.mark.parametrize("sid,sood", list(_cases())[:12])
def test_bootstrap_equals_the_reference_loop(sid, sood, monkeypatch):
    monkeypatch.setattr(metrics, "_BOOT_CHUNK", 997)  # several chunks: the chunking must not change the draws
    aurocs, fprs = metrics.bootstrap_metrics(sid, sood, n_boot=60, seed=5)
    ref_aurocs, ref_fprs = _reference_bootstrap(sid, sood, 60, 5)
    np.testing.assert_allclose(aurocs, ref_aurocs, rtol=0, atol=1e-12)
    assert np.array_equal(fprs, ref_fprs)


@pytest.mark.parametrize("sid,sood", list(_cases())[:12])
def test_fpr_draws_have_the_full_bootstraps_distribution(sid, sood):
    """The O(1) draws (order statistic of the ID scores, binomial OOD count) against the resampling bootstrap:
    20,000 of each, their empirical CDFs within 0.02 everywhere (a two-sample KS bound at p = 0.001 is 0.0195)."""
    fast = metrics._fpr_draws(np.sort(np.asarray(sid, float)), np.sort(np.asarray(sood, float)), 20000, seed=1)
    _, slow = metrics.bootstrap_metrics(sid, sood, n_boot=20000, seed=2)
    grid = np.union1d(fast, slow)
    gap = np.abs(np.searchsorted(np.sort(fast), grid, "right") - np.searchsorted(np.sort(slow), grid, "right"))
    assert gap.max() / 20000 < 0.02


def test_delong_variance_is_the_placement_value_formula():
    """DeLong's interval from its definition, written out with pairwise comparisons (ties one half)."""
    rng = np.random.default_rng(3)
    sid, sood = np.round(rng.normal(1, 1, 60), 1), np.round(rng.normal(0, 1, 40), 1)  # rounded: ties
    psi = (sid[:, None] > sood[None, :]) + 0.5 * (sid[:, None] == sood[None, :])
    a = psi.mean()
    var = psi.mean(1).var(ddof=1) / 60 + psi.mean(0).var(ddof=1) / 40
    logit, half = np.log(a / (1 - a)), 1.959963984540054 * np.sqrt(var) / (a * (1 - a))
    ci = metrics.confidence_intervals(sid, sood)
    assert a == pytest.approx(metrics.auroc(sid, sood), abs=1e-12)
    assert ci["auroc_lo"] == pytest.approx(1 / (1 + np.exp(half - logit)), abs=1e-12)
    assert ci["auroc_hi"] == pytest.approx(1 / (1 + np.exp(-half - logit)), abs=1e-12)
    perfect = metrics.confidence_intervals([2.0, 3.0], [0.0, 1.0])
    assert perfect["auroc_lo"] == perfect["auroc_hi"] == 1.0


@pytest.mark.parametrize("shift", [1.5, 3.0])
def test_95_percent_intervals_cover_the_truth_in_93_to_97_percent_of_400_repetitions(shift):
    """Unit Gaussians ``shift`` apart (ID above): AUROC = Phi(shift / sqrt 2), FPR95 = 1 - Phi(shift - z_0.95)."""
    from statistics import NormalDist

    phi, z95 = NormalDist().cdf, NormalDist().inv_cdf(0.95)
    true_auroc, true_fpr = phi(shift / np.sqrt(2)), 1 - phi(shift - z95)
    rng = np.random.default_rng(11)
    hits = np.zeros(2)
    for rep in range(400):
        ci = metrics.confidence_intervals(rng.normal(shift, 1, 1000), rng.normal(0, 1, 500), seed=rep)
        hits += [ci["auroc_lo"] <= true_auroc <= ci["auroc_hi"], ci["fpr95_lo"] <= true_fpr <= ci["fpr95_hi"]]
    assert 0.93 <= hits[0] / 400 <= 0.97 and 0.93 <= hits[1] / 400 <= 0.97, hits / 400


def test_intervals_contain_the_estimate_shrink_with_n_and_are_seeded():
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 3200):
        sid, sood = rng.normal(1.0, 1, n), rng.normal(0, 1, n // 2)
        ci = metrics.confidence_intervals(sid, sood, seed=0)
        assert ci["auroc_lo"] < metrics.auroc(sid, sood) < ci["auroc_hi"]
        assert ci["fpr95_lo"] < metrics.fpr_at_tpr(sid, sood) < ci["fpr95_hi"]
        widths.append((ci["auroc_hi"] - ci["auroc_lo"], ci["fpr95_hi"] - ci["fpr95_lo"]))
        assert metrics.confidence_intervals(sid, sood, seed=0) == ci
        assert metrics.confidence_intervals(sid, sood, seed=1) != ci
    # 16x the samples: intervals about 4x narrower (1/sqrt(n)); 2.5x leaves room for sampling noise
    assert widths[1][0] < widths[0][0] / 2.5 and widths[1][1] < widths[0][1] / 2.5
    # Hanley & McNeil: AUROC's standard error for unit Gaussians 1 apart, 3200 ID and 1600 OOD samples, is 0.0068
    assert widths[1][0] == pytest.approx(2 * 1.96 * 0.0068, rel=0.2)


def test_bootstrap_validation_and_default_size():
    sid, sood = np.arange(10.0), np.arange(5.0)
    a, f = metrics.bootstrap_metrics(sid, sood)
    assert a.shape == f.shape == (1000,)
    for bad in ({"n_boot": 0}, {"n_boot": 2.5}, {"level": 1.0}, {"level": 0.0}):
        with pytest.raises(ValueError):
            metrics.confidence_intervals(sid, sood, **bad)
    with pytest.raises(ValueError, match="NaN"):
        metrics.confidence_intervals(np.r_[sid, np.nan], sood)
