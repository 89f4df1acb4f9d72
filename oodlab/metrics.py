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

Confidence intervals (:func:`bootstrap_ci`): a seeded bootstrap that resamples the ID and the OOD
scores separately (each with replacement, at its own size), recomputes AUROC and FPR95 exactly on
every resample, and reports the percentile interval (95% by default: the 2.5th and 97.5th
percentiles of the 1,000 resampled values, NumPy's linear interpolation).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .validate import number, score_array

__all__ = ["auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "fpr_at_tpr_ood_positive", "evaluate", "bootstrap_metrics",
           "bootstrap_ci"]


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


_BOOT_CHUNK = 1 << 18  # resampled entries (resamples x samples) held at once: bounds memory, not results


def bootstrap_metrics(score_id: ArrayLike, score_ood: ArrayLike, n_boot: int = 1000, seed: int = 0,
                      tpr: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and FPR@``tpr`` of ``n_boot`` bootstrap resamples: two float64 arrays of shape (n_boot,).

    Resample ``b`` draws, from ``numpy.random.default_rng(seed)`` in this order, ``n`` ID indices then
    ``m`` OOD indices (``rng.integers(0, n, n)``, ``rng.integers(0, m, m)``), so it is the pair
    ``(score_id[i], score_ood[j])`` and its metrics equal :func:`auroc` / :func:`fpr_at_tpr` on it
    (AUROC up to float rounding, FPR exactly). Vectorised: a resample is a vector of counts per sample;
    AUROC is then an exact integer sum over the sorted OOD scores (a gather of m per resample) and FPR
    counts the resampled OOD under the resample's threshold, chunk by chunk of resamples.
    """
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    scores, labels = _labelled(score_id, score_ood)
    sid, sood = scores[labels == 1], scores[labels == 0]
    n, m, n_boot = sid.size, sood.size, int(n_boot)
    id_order, ood_order = np.argsort(sid, kind="mergesort"), np.argsort(sood, kind="mergesort")
    x, y = sid[id_order], sood[ood_order]  # ascending
    rank_id, rank_ood = np.empty(n, np.int64), np.empty(m, np.int64)
    rank_id[id_order], rank_ood[ood_order] = np.arange(n), np.arange(m)  # sample -> position in x / y
    below = np.searchsorted(y, x, "left")  # OOD positions under each sorted ID score
    id_below, id_upto = np.searchsorted(x, y, "left"), np.searchsorted(x, y, "right")  # ID under / at each OOD score
    target = tpr - 1e-12  # fpr_at_tpr's test, tps / n >= target, as a whole count of resampled ID
    need = int(np.ceil(target * n))
    while need > 0 and (need - 1) / n >= target:
        need -= 1
    while need / n < target:
        need += 1
    rng = np.random.default_rng(seed)
    aurocs, fprs = np.empty(n_boot), np.empty(n_boot)
    step = max(1, _BOOT_CHUNK // (n + m))
    for start in range(0, n_boot, step):
        size = min(step, n_boot - start)
        c_id, c_ood = np.empty((size, n), np.int32), np.empty((size, m), np.int32)  # n, m < 2**31
        for b in range(size):  # counts per sample, indexed by sorted position (x for ID, y for OOD)
            c_id[b] = np.bincount(rank_id[rng.integers(0, n, n)], minlength=n)
            c_ood[b] = np.bincount(rank_ood[rng.integers(0, m, m)], minlength=m)
        cum_id = np.zeros((size, n + 1), np.int32)
        np.cumsum(c_id, axis=1, out=cum_id[:, 1:])  # cum_id[:, k] = resampled ID among the k lowest
        # 2 * (pairs with id > ood) + (pairs with id == ood), an exact integer, summed over the OOD side:
        # each OOD sample has n - cum_id[upto] resampled ID above it and cum_id[upto] - cum_id[below] equal to it
        twice = np.multiply(c_ood, 2 * n - cum_id[:, id_upto] - cum_id[:, id_below], dtype=np.int64).sum(1)
        aurocs[start:start + size] = twice / (2.0 * n * m)
        # threshold x[k]: the highest ID score with >= need resampled ID at or above it, i.e. with at most
        # n - need of them below it (the count below position p is the cumulative count up to p - 1)
        k = (cum_id[:, 1:n] <= n - need).sum(1)
        ood_below = np.array([c_ood[b, :below[k[b]]].sum() for b in range(size)])  # resampled OOD under x[k]
        fprs[start:start + size] = (m - ood_below) / m  # OOD at or above it
    return aurocs, fprs


def bootstrap_ci(score_id: ArrayLike, score_ood: ArrayLike, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> dict[str, float]:
    """Percentile bootstrap intervals for AUROC and FPR95: ``auroc_lo``, ``auroc_hi``, ``fpr95_lo``, ``fpr95_hi``.

    ID and OOD scores are resampled separately (:func:`bootstrap_metrics`, seeded); the bounds are the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the ``n_boot`` resampled values.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    aurocs, fprs = bootstrap_metrics(score_id, score_ood, n_boot, seed)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    (a_lo, a_hi), (f_lo, f_hi) = np.percentile(aurocs, q), np.percentile(fprs, q)
    return {"auroc_lo": float(a_lo), "auroc_hi": float(a_hi), "fpr95_lo": float(f_lo), "fpr95_hi": float(f_hi)}
