"""CADRef: class-aware decoupled relative feature error, scaled by a logit score (Ling et al., CVPR 2025).

Paper: Z. Ling, Y. Chang, H. Zhao, X. Zhao, K. Chow, S. Deng, "CADRef: Robust Out-of-Distribution Detection via
Class-Aware Decoupled Relative Feature Leveraging", CVPR 2025, pp. 4968-4977. (The oodlab issue called it "Class-Aware
Decomposition and Refinement"; the paper's title is the one above.) Official code: github.com/LingAndZero/CADRef at
commit 121f74b (``ood_methods/CADRef.py``, ``utils/get_stat.py``, ``ood_eval.py``; CC0), read, not copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import FeatureSource
from ..validate import choice
from .base import Detector, energy, register

__all__ = ["CADRef", "LOGIT_SCORES"]

LOGIT_SCORES = ("energy", "msp", "maxlogit", "gen")


def logit_score(logits: Tensor, method: str) -> Tensor:
    """The official code's logit-based confidence (higher = more ID), float64.

    ``gen`` is the official ``gen`` helper, not oodlab's ``gen`` detector: the inverse of GEN's entropy
    ``sum p^0.1 (1 - p)^0.1`` over the top ``M = max(10, C // 10)`` softmax probabilities."""
    x = logits.double()
    if method == "energy":
        return energy(x)
    if method == "maxlogit":
        return x.max(1).values
    p = F.softmax(x, dim=1)
    if method == "msp":
        return p.max(1).values
    m = min(max(10, x.shape[1] // 10), x.shape[1])
    top = p.topk(m, dim=1).values
    return 1.0 / (top.pow(0.1) * (1 - top).pow(0.1)).sum(1)


@register
class CADRef(Detector):
    """``-(E+(x) / S(x) + E-(x) / mean S)``: decoupled relative feature errors against the predicted class's mean.

    With ``c = argmax f(z)`` and ``mu_c`` the mean ID-train feature of the samples the model *predicts* as ``c``
    (the official ``get_features`` groups training features by predicted, not true, label), the signed deviation
    ``(z - mu_c) * sign(w_c)`` is split into its positive part (deviations that raise the class's logit) and its
    negative part; their L1 norms relative to ``||z||_1`` are ``E+`` and ``E-``. ``E+`` is divided by the sample's
    logit score ``S(x)`` (``logit_score``: Energy by default, as ``ood_eval.py``; MSP, MaxLogit and the official
    GEN variant are its other options) and ``E-`` by the mean of ``S`` over all ID training features. CARef, the
    paper's simpler variant, is the undecoupled ``||z - mu_c||_1 / ||z||_1`` (not registered here).

    Fit streams: one pass over the training chunks for the per-predicted-class sums and the sum of ``S``; no labels
    are needed. The score is tensor arithmetic and exports.

    Deviations, each named: a class the model never predicts on ID train has no mean in the official code (it
    fails); here it takes the mean of the training features *labelled* with that class when labels are present,
    and fit refuses otherwise. ``||z||_1`` is floored at 1e-12 so an all-zero feature scores finite (very OOD)
    instead of NaN. Like the official code, ``S`` is used as it is: a logit score that is zero or negative (Energy
    can be) makes the ratio meaningless; that is the method's, not a guarded case.
    """

    name = "cadref"
    notes = "class means by predicted class on ID train, as the official code"

    def __init__(self, logit_score: str = "energy") -> None:
        super().__init__()
        self.logit_score = choice("logit_score", logit_score, LOGIT_SCORES)

    def _fit(self, train: FeatureSource) -> None:
        c, d = self.weight.shape
        sums = torch.zeros(c, d, dtype=torch.float64)
        counts = torch.zeros(c, dtype=torch.float64)
        lab_sums = torch.zeros(c, d, dtype=torch.float64)
        lab_counts = torch.zeros(c, dtype=torch.float64)
        score_sum = torch.zeros((), dtype=torch.float64)
        labelled = train.labels is not None
        for chunk in train.chunks():
            z = chunk.z.double()
            pred = chunk.logits.argmax(1)
            sums.index_add_(0, pred, z)
            counts += torch.bincount(pred, minlength=c).double()
            score_sum += logit_score(chunk.logits, self.logit_score).sum()
            if labelled:
                y = chunk.labels.long()
                if len(y) and (int(y.min()) < 0 or int(y.max()) >= c):
                    raise ValueError(f"training labels must lie in [0, {c}) to match the head")
                lab_sums.index_add_(0, y, z)
                lab_counts += torch.bincount(y, minlength=c).double()
        means = sums / counts.clamp(min=1)[:, None]
        never = counts == 0
        if never.any():
            if not labelled or (lab_counts[never] == 0).any():
                missing = never.nonzero().flatten().tolist()
                raise ValueError(f"classes {missing[:10]} are never predicted on the training features and have no "
                                 "labelled features either; cadref needs a mean feature for every class")
            means[never] = lab_sums[never] / lab_counts[never][:, None]
        self.state["means"] = means
        self.state["mean_logit_score"] = (score_sum / len(train)).reshape(1)

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        z = z.double()
        pred = logits.argmax(1)
        signed = (z - self.state["means"][pred]) * self.weight.double()[pred].sign()
        norm = z.abs().sum(1).clamp(min=1e-12)
        e_pos = signed.clamp(min=0).sum(1) / norm
        e_neg = (-signed).clamp(min=0).sum(1) / norm
        return -(e_pos / logit_score(logits, self.logit_score) + e_neg / self.state["mean_logit_score"])
