"""Scores read off the logits: MSP, MaxLogit, Energy and GEN."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Detector, energy, register
from ..validate import integer, number

__all__ = ["MSP", "MaxLogit", "Energy", "GEN"]


class _Tempered(Detector):
    """A logit score with a softmax temperature (must be > 0)."""

    needs_train = False

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = number("temperature", temperature, 0.0, low_open=True)


@register
class MSP(_Tempered):
    """Maximum softmax probability (Hendrycks & Gimpel 2017).

    Computed in float64: in float32 the softmax of a confident sample rounds to exactly 1.0, and
    those ties change FPR95.
    """

    name = "msp"

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return torch.softmax(logits.double() / self.temperature, dim=1).max(dim=1).values


@register
class MaxLogit(Detector):
    """The largest logit (Hendrycks et al. 2022)."""

    name = "maxlogit"
    needs_train = False

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return logits.double().max(dim=1).values


@register
class Energy(_Tempered):
    """Negative free energy ``T logsumexp(f(z)/T)`` with T = 1 (Liu et al. 2020)."""

    name = "energy"

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return energy(logits, self.temperature)


@register
class GEN(Detector):
    """Generalized entropy ``-sum_j p_j^g (1 - p_j)^g`` over the ``M`` largest softmax probabilities (Liu et al., CVPR 2023).

    Defaults g = 0.1 and M = 100, capped at the number of classes, as the official code and
    OpenOOD (pytorch-ood 0.4 sums over all classes: M = None). Computed in float64.
    """

    name = "gen"
    needs_train = False

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        super().__init__()
        self.gamma = number("gamma", gamma, 0.0, low_open=True)
        self.M = integer("M (how many top probabilities)", M, 1)

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        p = torch.softmax(logits.double(), dim=1)
        top = torch.topk(p, min(self.M, int(p.shape[1])), dim=1).values
        return -(top.pow(self.gamma) * (1 - top).pow(self.gamma)).sum(1)
