"""Conformal OOD flags: p-values from ID calibration scores, thresholds, Benjamini-Hochberg, drift tests.

Scores follow oodlab's convention (higher = more in-distribution). With ``n`` calibration scores
of held-out ID data, the conformal p-value of a score ``s`` is (Bates et al., Ann. Statist. 2023)

    p(s) = (1 + #{cal <= s}) / (n + 1).

If the calibration data and a new ID input are exchangeable, ``P(p(s) <= alpha) <= alpha``: flagging
at ``p <= alpha`` raises a false alarm on at most a fraction alpha of ID inputs. Exchangeability is
the whole assumption: drift (a new camera, a new season, a model update without recalibration)
breaks it silently, which is what :func:`flag_rate_test` watches for.

Every rule here is "flag when the score is below the k-th smallest calibration score":

- ``alpha``: ``k = floor(alpha (n + 1))``, exactly the inputs with ``p <= alpha``;
- ``tpr``: ``k = floor((1 - tpr) n) + 1``, the largest threshold that still accepts at least a
  fraction ``tpr`` of the calibration scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import gammaln
from torch import Tensor

from ..validate import number

__all__ = ["sorted_calibration", "p_values", "rank_for_alpha", "rank_for_tpr", "benjamini_hochberg", "FlagRateReport", "flag_rate_test"]


def sorted_calibration(cal: Tensor) -> Tensor:
    """Calibration scores sorted ascending in float64; refuses an empty set and NaN / inf."""
    if cal.ndim != 1 or len(cal) == 0:
        raise ValueError("the calibration set is empty: calibrate on held-out ID data (a few thousand inputs)")
    if not torch.isfinite(cal).all():
        raise ValueError("calibration scores contain NaN or inf; check the model and the calibration images")
    return cal.double().sort().values


def p_values(cal_sorted: Tensor, scores: Tensor) -> Tensor:
    """Conformal p-values ``(1 + #{cal <= s}) / (n + 1)`` of ``scores`` (float64), ``cal_sorted`` ascending."""
    counts = torch.searchsorted(cal_sorted, scores.double().contiguous(), right=True)
    return (counts + 1).double() / (len(cal_sorted) + 1)


def check_rate(value: float, name: str) -> float:
    return float(number(name, value, 0.0, 1.0, low_open=True, high_open=name != "tpr"))


def rank_for_alpha(n: int, alpha: float) -> int:
    """k with "flag iff score < k-th smallest calibration score" equal to "flag iff p <= alpha"."""
    alpha = check_rate(alpha, "alpha")
    k = math.floor(alpha * (n + 1) + 1e-9)  # the epsilon only absorbs rounding of alpha * (n + 1)
    if k < 1:
        raise ValueError(f"{n} calibration scores cannot give alpha={alpha}: every p-value is at least "
                         f"1/(n+1) = {1 / (n + 1):.4g} > alpha, so nothing would ever be flagged; "
                         f"use at least {math.ceil(1 / alpha) - 1} calibration inputs")
    return k


def rank_for_tpr(n: int, tpr: float) -> int:
    """k with "flag iff score < k-th smallest calibration score" accepting at least ``tpr`` of them."""
    tpr = check_rate(tpr, "tpr")
    return math.floor((1 - tpr) * n + 1e-9) + 1


def benjamini_hochberg(p: Tensor, fdr: float) -> Tensor:
    """Flags of the Benjamini-Hochberg procedure at level ``fdr`` over one batch of p-values.

    Conformal p-values of a batch are positively dependent (they share the calibration set), and BH
    still controls the false discovery rate for them (Bates et al. 2023, Theorem 3): among the
    flagged inputs, the expected fraction of ID ones is at most ``fdr``.
    """
    fdr = check_rate(fdr, "fdr")
    m = len(p)
    if m == 0:
        return torch.zeros(0, dtype=torch.bool)
    order = torch.argsort(p.double())
    below = p.double()[order] <= fdr * torch.arange(1, m + 1, dtype=torch.float64) / m
    flags = torch.zeros(m, dtype=torch.bool)
    if below.any():
        last = int(below.nonzero().max())
        flags[order[: last + 1]] = True
    return flags


@dataclass(frozen=True)
class FlagRateReport:
    """The realised flag rate of a stream of presumed-ID inputs against what the calibration promises."""

    n: int  # inputs in the stream
    flagged: int
    rate: float
    expected: float  # k / (n_cal + 1): the exact expected rate under exchangeability (<= alpha)
    p_value: float  # P(at least `flagged` flags | exchangeable with the calibration data)
    level: float

    @property
    def drift(self) -> bool:
        """True when so many flags are unlikely under exchangeability: the guarantee no longer holds."""
        return self.p_value < self.level

    def __str__(self) -> str:
        verdict = ("DRIFT: more flags than the calibration allows; recalibrate on current ID data"
                   if self.drift else "consistent with the calibration")
        return (f"{self.flagged}/{self.n} flagged ({100 * self.rate:.2f}%, expected {100 * self.expected:.2f}%); "
                f"p = {self.p_value:.3g}: {verdict}")


def flag_rate_test(flags: Tensor, n_cal: int, k: int, level: float = 0.01) -> FlagRateReport:
    """Test whether ``flags`` of presumed-ID inputs are too many for a rule "score < k-th of n_cal".

    Under exchangeability of the stream with the calibration set, the number J of flagged inputs
    among m is the number of stream scores that fall below the k-th smallest calibration score in
    a uniformly random ordering of all n + m scores: ``P(J = j) = C(j+k-1, j) C(m-j+n-k, m-j) / C(n+m, m)``.
    This is the exact form of a binomial test at rate ``k / (n + 1)``, with the randomness of
    the calibration set itself included (a binomial test alone would cry drift too often when n is small).
    """
    flags = torch.as_tensor(flags).bool().reshape(-1)
    m, j = len(flags), int(flags.sum())
    if m == 0:
        raise ValueError("the stream is empty: pass the flags of at least one presumed-ID input")
    level = check_rate(level, "level")
    js = np.arange(j, m + 1)
    log_pmf = (_log_comb(js + k - 1, js) + _log_comb(m - js + n_cal - k, m - js) - _log_comb(n_cal + m, m))
    tail = float(np.exp(log_pmf).sum())
    return FlagRateReport(m, j, j / m, k / (n_cal + 1), min(1.0, tail), level)


def _log_comb(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)
