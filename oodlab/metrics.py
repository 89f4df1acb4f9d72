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

Confidence intervals (:func:`confidence_intervals`): DeLong's interval for AUROC (on the logit scale) and a
seeded percentile bootstrap for FPR95 (ID and OOD resampled separately; 1,000 resamples drawn from their exact
distribution without materialising them). :func:`bootstrap_metrics` gives the full bootstrap of both metrics.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike

from .validate import number, score_array

__all__ = ["roc_curve", "auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "fpr_at_tpr_ood_positive", "evaluate", "bootstrap_metrics",
           "confidence_intervals"]


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


def roc_curve(score_id: ArrayLike, score_ood: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, ID positive, from (0, 0) to (1, 1): the curve :func:`auroc`
    integrates."""
    scores, labels = _labelled(score_id, score_ood)
    tps, fps = _roc_counts(scores, labels)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def auroc(score_id: ArrayLike, score_ood: ArrayLike) -> float:
    """Area under the ROC curve, ID positive (ties count one half, as the trapezoidal ROC does)."""
    fpr, tpr = roc_curve(score_id, score_ood)
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


def _needed(n: int, tpr: float) -> int:
    """The fewest of ``n`` ID samples at or above a threshold for :func:`fpr_at_tpr`'s test ``tps / n >= tpr``."""
    target = tpr - 1e-12
    need = int(np.ceil(target * n))
    while need > 0 and (need - 1) / n >= target:
        need -= 1
    while need / n < target:
        need += 1
    return need


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
    need = _needed(n, tpr)
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


def confidence_intervals(score_id: ArrayLike, score_ood: ArrayLike, level: float = 0.95, n_boot: int = 1000,
                         seed: int = 0) -> dict[str, float]:
    """Intervals for AUROC and FPR95 at ``level``: ``auroc_lo``, ``auroc_hi``, ``fpr95_lo``, ``fpr95_hi``.

    AUROC: DeLong's variance (the placement values' variances, ties counted one half), as a Wald interval on the
    logit scale, so that it stays inside [0, 1] (a point estimate of exactly 0 or 1 gives that point).
    FPR95: the percentile interval of ``n_boot`` bootstrap resamples (ID and OOD resampled separately, seeded),
    drawn in O(1) each without resampling: the resampled threshold is an order statistic of the ID scores,
    its position ``floor(n U)`` with ``U ~ Beta(r, n - r + 1)``; the resampled OOD count at or above it is
    ``Binomial(m, q)`` with ``q`` its OOD share. Both draws have exactly the distribution of the full
    bootstrap's (:func:`bootstrap_metrics`), at about 1/100 of its cost.
    """
    number("level", level, 0.0, 1.0, low_open=True, high_open=True)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    scores, labels = _labelled(score_id, score_ood)
    x, y = np.sort(scores[labels == 1]), np.sort(scores[labels == 0])
    n, m = x.size, y.size
    # DeLong: each ID sample's share of OOD below it, each OOD sample's share of ID above it (ties one half)
    v10 = (np.searchsorted(y, x, "left") + np.searchsorted(y, x, "right")) / (2.0 * m)
    v01 = 1.0 - (np.searchsorted(x, y, "left") + np.searchsorted(x, y, "right")) / (2.0 * n)
    a = float(v10.mean())
    var = (v10.var(ddof=1) / n if n > 1 else 0.0) + (v01.var(ddof=1) / m if m > 1 else 0.0)
    z = NormalDist().inv_cdf((1 + level) / 2)
    if 0.0 < a < 1.0 and var > 0:
        logit, half = np.log(a / (1 - a)), z * np.sqrt(var) / (a * (1 - a))
        a_lo, a_hi = 1 / (1 + np.exp(-(logit - half))), 1 / (1 + np.exp(-(logit + half)))
    else:
        a_lo = a_hi = a
    fprs = _fpr_draws(x, y, int(n_boot), seed)
    f_lo, f_hi = np.percentile(fprs, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"auroc_lo": float(a_lo), "auroc_hi": float(a_hi), "fpr95_lo": float(f_lo), "fpr95_hi": float(f_hi)}


def _fpr_draws(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int, tpr: float = 0.95) -> np.ndarray:
    """FPR@``tpr`` of ``n_boot`` bootstrap resamples of sorted ID scores ``x`` and OOD scores ``y``, drawn from their
    distribution directly (see :func:`confidence_intervals`)."""
    n, m = x.size, y.size
    need = _needed(n, tpr)
    rng = np.random.default_rng(seed)
    k = np.minimum((n * rng.beta(n - need + 1, need, n_boot)).astype(np.int64), n - 1)  # the threshold's position
    share = (m - np.searchsorted(y, x[k], "left")) / m  # OOD at or above each resampled threshold
    return rng.binomial(m, share) / m
