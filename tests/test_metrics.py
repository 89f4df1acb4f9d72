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
