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
    q = np.percentile(ref_aurocs, [2.5, 97.5]), np.percentile(ref_fprs, [2.5, 97.5])
    ci = metrics.bootstrap_ci(sid, sood, n_boot=60, seed=5)
    np.testing.assert_allclose([ci["auroc_lo"], ci["auroc_hi"]], q[0], rtol=0, atol=1e-12)
    assert [ci["fpr95_lo"], ci["fpr95_hi"]] == pytest.approx(list(q[1]), abs=1e-12)


def test_bootstrap_interval_contains_the_estimate_shrinks_with_n_and_is_seeded():
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 3200):
        sid, sood = rng.normal(1.0, 1, n), rng.normal(0, 1, n // 2)
        ci = metrics.bootstrap_ci(sid, sood, seed=0)
        assert ci["auroc_lo"] < metrics.auroc(sid, sood) < ci["auroc_hi"]
        assert ci["fpr95_lo"] < metrics.fpr_at_tpr(sid, sood) < ci["fpr95_hi"]
        widths.append((ci["auroc_hi"] - ci["auroc_lo"], ci["fpr95_hi"] - ci["fpr95_lo"]))
        assert metrics.bootstrap_ci(sid, sood, seed=0) == ci
        assert metrics.bootstrap_ci(sid, sood, seed=1) != ci
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
            metrics.bootstrap_ci(sid, sood, **bad)
    with pytest.raises(ValueError, match="NaN"):
        metrics.bootstrap_ci(np.r_[sid, np.nan], sood)
