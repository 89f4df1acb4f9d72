"""SCALE: scale the whole penultimate feature by ASH-S's factor, then Energy (Xu et al., ICLR 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ash import kept_count, sum_ratio
from .base import Detector, energy, register
from ..validate import number

__all__ = ["SCALE", "scale_features"]


def scale_features(z: Tensor, percentile: float) -> Tensor:
    """``z * exp(s1 / s2)`` per row (float64), with ``s1`` the sum of ``z`` and ``s2`` the sum of its top
    ``k`` values at ``percentile`` (ASH-S's ratio), but nothing pruned: every activation is kept.

    A row whose kept values sum to 0 is left unscaled, as in oodlab's ASH-S (the official code gives NaN).
    """
    z = z.double()
    k = kept_count(int(z.shape[1]), percentile)
    if k < 1:
        raise ValueError(f"percentile {percentile} keeps no activation of {z.shape[1]}; use a smaller percentile")
    return z * torch.exp(sum_ratio(z.sum(1, keepdim=True), torch.topk(z, k, dim=1).values.sum(1, keepdim=True)))


@register
class SCALE(Detector):
    """Energy of ``f(z * exp(s1 / s2))`` (the official ImageNet setting: pooled ResNet features, p = 85).

    As in the official code (and OpenOOD's ``ScaleNet``), the ratio is taken on the pooled
    features; the classification logits are the model's own (the scaling is for the score only).
    At percentile 0 every activation is "kept", so ``s2 = s1`` and the feature is scaled by ``e``.
    """

    name = "scale"
    needs_train = False

    def __init__(self, percentile: float = 85.0) -> None:
        super().__init__()
        self.percentile = number("percentile", percentile, 0, 100, high_open=True)

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return energy(F.linear(scale_features(z, self.percentile), self.weight.double(), self.bias.double()))
