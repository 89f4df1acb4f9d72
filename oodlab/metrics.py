"""Detection metrics for OOD scores.

Convention (used everywhere in oodlab): a **higher score means more in-distribution**, and the
in-distribution (ID) samples are the **positive class** in every metric, as in the papers and
OpenOOD's tables. ``aupr_out`` is the one metric that treats OOD as positive (on negated scores).

Everything is exact NumPy in float64 and agrees with scikit-learn's ``roc_auc_score`` and
``average_precision_score`` (tests check this on random, tied and imbalanced inputs). Scores are
never squashed through a sigmoid (the torchmetrics trap: energy scores saturate it).

FPR at a TPR target follows one rule: walk the ROC curve over *every* distinct threshold from
the highest score down and report the FPR at the first threshold whose TPR reaches the target.
Tied scores form one threshold, so all tied samples are accepted together.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .validate import number, score_array

__all__ = ["auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "fpr_at_tpr_ood_positive", "evaluate"]


def _labelled(score_id: ArrayLike, score_ood: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate and validate scores (1-D, not empty, finite: :func:`oodlab.validate.score_array`);
    returns (scores, labels) with ID = 1."""
    sid, sood = score_array("ID", score_id), score_array("OOD", score_ood)
    scores = np.concatenate([sid, sood])
    labels = np.concatenate([np.ones(sid.size), np.zeros(sood.size)])
    return scores, labels


def _roc_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true/false positives at each distinct threshold, highest threshold first."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    return tps, fps


def auroc(score_id: ArrayLike, score_ood: ArrayLike) -> float:
    """Area under the ROC curve, ID positive (ties count one half, as the trapezoidal ROC does)."""
    scores, labels = _labelled(score_id, score_ood)
    tps, fps = _roc_counts(scores, labels)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def _average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    tps, fps = _roc_counts(scores, labels)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(score_id: ArrayLike, score_ood: ArrayLike) -> float:
    """Average precision with ID as the positive class (scikit-learn's step-wise AP, no interpolation)."""
    scores, labels = _labelled(score_id, score_ood)
    return _average_precision(scores, labels)


def aupr_out(score_id: ArrayLike, score_ood: ArrayLike) -> float:
    """Average precision with OOD as the positive class, ranking by the negated score."""
    scores, labels = _labelled(score_id, score_ood)
    return _average_precision(-scores, 1.0 - labels)


def fpr_at_tpr(score_id: ArrayLike, score_ood: ArrayLike, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted at the first threshold where the ID acceptance rate reaches ``tpr``.

    This is the papers' FPR95 (ODIN, Energy, ReAct, DICE, ASH, KNN, GReg, UM).
    """
    number("tpr", tpr, 0.0, 1.0, low_open=True)
    scores, labels = _labelled(score_id, score_ood)
    tps, fps = _roc_counts(scores, labels)
    first = int(np.argmax(tps / tps[-1] >= tpr - 1e-12))
    return float(fps[first] / fps[-1])


def fpr_at_tpr_ood_positive(score_id: ArrayLike, score_ood: ArrayLike, tpr: float = 0.95) -> float:
    """The OpenOOD v1.5 / pytorch-ood variant: fraction of ID flagged when ``tpr`` of OOD is caught.

    Not comparable with :func:`fpr_at_tpr`; provided only to compare with those tools.
    """
    return fpr_at_tpr(-score_array("OOD", score_ood), -score_array("ID", score_id), tpr)


def evaluate(score_id: ArrayLike, score_ood: ArrayLike) -> dict[str, float]:
    """All headline metrics for one ID/OOD pair: auroc, fpr95, aupr_in, aupr_out (fractions in [0, 1])."""
    score_id, score_ood = score_array("ID", score_id), score_array("OOD", score_ood)  # one check, one message
    return {
        "auroc": auroc(score_id, score_ood),
        "fpr95": fpr_at_tpr(score_id, score_ood, 0.95),
        "aupr_in": aupr_in(score_id, score_ood),
        "aupr_out": aupr_out(score_id, score_ood),
    }
