"""Scores read off the logits: MSP, MaxLogit and Energy."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Detector, energy, register

__all__ = ["MSP", "MaxLogit", "Energy"]


class _Tempered(Detector):
    """A logit score with a softmax temperature (must be > 0)."""

    needs_train = False

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature


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
