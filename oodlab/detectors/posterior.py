"""Scores fitted on the softmax of held-out ID data: KL-Matching (Hendrycks et al., ICML 2022) and
temperature scaling (Guo et al., ICML 2017).

Both papers (and OpenOOD's ``klm`` / ``temp_scaling``) fit on the ID **validation** set, so both say
``fits_on = "val"``: the runner and ``oodlab fit`` give them the features of
:meth:`Suite.held_out <oodlab.data.suites.Suite.held_out>` (the suite's ID validation set, or a
seeded 10% of ID train where the suite has none).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..features import FeatureSource
from ..validate import flag, number
from .base import Detector, register

__all__ = ["KLMatching", "TemperatureScaling", "fit_temperature"]

#: log 0 of a template entry (a softmax mean that underflowed) is replaced by this finite value, so a
#: probability of 0 contributes 0 and a positive one a divergence of ~1e300 (never inf or NaN).
LOG_FLOOR = -1e300


@register
class KLMatching(Detector):
    """``-min_k KL(p(x) || d_k)``, ``d_k`` the mean softmax of the held-out ID samples the model predicts as ``k``.

    As the paper, OpenOOD's ``klm`` and pytorch-ood's ``KLMatching``: the templates need no labels,
    and the minimum runs over every class with a template (``nearest=True``). A class that no
    held-out sample is predicted as has no template; pytorch-ood skips it and OpenOOD gives it a
    one-hot template whose divergence is infinite for any softmax that is not one-hot, so both
    agree with skipping. ``nearest=False`` compares only with the template of the predicted class
    (``-KL(p || d_argmax)``; the nearest template where that class has none). KL is computed in
    float64 from ``log_softmax`` (``0 log 0 = 0``).
    """

    name = "klm"
    fits_on = "val"
    notes = "the minimum runs over the templates of all predicted classes (nearest=False: the predicted class's)"

    def __init__(self, nearest: bool = True) -> None:
        super().__init__()
        self.nearest = flag("nearest", nearest)

    def _fit(self, train: FeatureSource) -> None:
        num_classes = self.weight.shape[0]
        if train.num_classes != num_classes:
            raise ValueError(f"logits have {train.num_classes} classes but the head has {num_classes}")
        sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        counts = torch.zeros(num_classes, dtype=torch.float64)
        for chunk in train.chunks():
            p = torch.softmax(chunk.logits.double(), dim=1)
            pred = p.argmax(1)
            sums.index_add_(0, pred, p)
            counts += torch.bincount(pred, minlength=num_classes).double()
        present = counts > 0
        templates = sums[present] / counts[present][:, None]
        self.state["log_templates"] = templates.log().clamp(min=LOG_FLOOR)
        index = torch.full((num_classes,), -1, dtype=torch.long)  # template row of each class, -1: none
        index[present] = torch.arange(int(present.sum()))
        self.state["template_of"] = index

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        log_p = torch.log_softmax(logits.double(), dim=1)
        p = log_p.exp()
        neg_kl = p @ self.state["log_templates"].T - (p * log_p).sum(1, keepdim=True)  # (N, K): -KL(p || d_k)
        best = neg_kl.max(1).values
        if self.nearest:
            return best
        row = self.state["template_of"][logits.argmax(1)]
        own = neg_kl.gather(1, row.clamp(min=0)[:, None]).squeeze(1)
        return torch.where(row >= 0, own, best)


def fit_temperature(train: FeatureSource, bounds: tuple[float, float] = (0.01, 100.0), tol: float = 1e-12,
                    max_passes: int = 200) -> tuple[float, int]:
    """The temperature ``T`` that minimises the mean NLL ``-log softmax(l / T)_y`` of labelled logits over
    ``train``, and the number of passes it took.

    The NLL is convex in ``beta = 1 / T`` (a log-sum-exp minus a linear term), so its derivative
    ``mean(E_softmax(beta l)[l] - l_y)`` is monotone: Newton steps on ``beta`` (second derivative:
    the softmax variance of ``l``) inside a shrinking bracket, bisecting (geometrically) whenever a
    step leaves it, until ``beta`` moves by less than ``tol`` relative. One pass over the chunks per
    step. A minimiser outside ``bounds`` is reported at the nearest bound, with a warning (no finite
    minimum exists, e.g., when every held-out sample is classified correctly, or the NLL is flat to float
    precision there).
    """
    if train.labels is None:
        raise ValueError("temperature scaling needs the class labels of the held-out ID data")
    b_lo, b_hi = 1.0 / bounds[1], 1.0 / bounds[0]

    def slope(beta: float) -> tuple[float, float]:
        g, h = 0.0, 0.0
        for chunk in train.chunks():
            l = chunk.logits.double()
            p = torch.softmax(beta * l, dim=1)
            mean = (p * l).sum(1)
            g += float((mean - l.gather(1, chunk.labels.long()[:, None]).squeeze(1)).sum())
            h += float(((p * l * l).sum(1) - mean * mean).clamp(min=0).sum())
        return g / len(train), h / len(train)

    passes = 0
    for edge, sign in ((b_hi, -1), (b_lo, 1)):  # minimum beyond a bound: the slope there points outwards
        g, _ = slope(edge)
        passes += 1
        if sign * g >= 0:
            warnings.warn(f"temperature scaling: the held-out NLL is minimised at or beyond T = {1 / edge:g}; "
                          f"using T = {1 / edge:g}", stacklevel=3)
            return 1.0 / edge, passes
    lo, hi, beta = b_lo, b_hi, min(max(1.0, b_lo), b_hi)
    while passes < max_passes:
        g, h = slope(beta)
        passes += 1
        if g == 0:
            break
        lo, hi = (lo, beta) if g > 0 else (beta, hi)
        step = beta - g / h if h > 0 else math.nan
        nxt = step if lo < step < hi else math.sqrt(lo * hi)
        if abs(nxt - beta) <= tol * beta or hi - lo <= tol * beta:
            beta = nxt
            break
        beta = nxt
    return 1.0 / beta, passes


@register
class TemperatureScaling(Detector):
    """Maximum softmax probability of ``logits / T``, with ``T`` minimising the NLL on held-out ID data.

    OpenOOD's ``temp_scaling`` runs LBFGS on ``T`` (start 1.5, lr 0.01, 50 iterations) and
    pytorch-ood 0.4 the same from ``T = 1``: both stop near the minimiser. oodlab finds the exact
    minimiser (relative tolerance 1e-12) with the safeguarded Newton iteration of
    :func:`fit_temperature`, bracketed to ``T`` in [0.01, 100]. ``temperature`` fixes ``T`` by hand
    instead (``temperature=1`` is MSP). Computed in float64. ``T`` changes no prediction, so the ID
    accuracy is the model's.
    """

    name = "temp-scaling"
    fits_on = "val"
    notes = "T minimises the held-out NLL exactly (safeguarded Newton; OpenOOD runs 50 LBFGS steps)"

    def __init__(self, temperature: float | None = None) -> None:
        super().__init__()
        self.temperature = number("temperature", temperature, 0.0, low_open=True, allow_none=True,
                                  hint="None fits it on held-out ID data")

    @property
    def fitted_temperature(self) -> float:
        """The temperature in use."""
        return float(self.state["temperature"])

    def _fit(self, train: FeatureSource) -> None:
        t = self.temperature if self.temperature is not None else fit_temperature(train)[0]
        self.state["temperature"] = torch.tensor([t], dtype=torch.float64)

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return torch.softmax(logits.double() / self.state["temperature"], dim=1).max(dim=1).values
