"""GradNorm: the norm of the head's gradient of a KL divergence to the uniform distribution (Huang et al., NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Detector, register
from ..validate import number

__all__ = ["GradNorm"]


@register
class GradNorm(Detector):
    """``||d KL(u || softmax(f(z)/T)) / d W||_1`` per sample, in closed form: ``||softmax - u||_1 * ||z||_1 / T``.

    The official code (and OpenOOD's) back-propagates ``-sum_j (1/C) log softmax_j(f(x)/T)`` for
    each sample alone and sums the absolute gradient of the last layer's weight (not its bias).
    That gradient is the outer product ``(softmax - u) z^T / T``, whose entry-wise L1 norm factors
    as above: one pass over cached features instead of a backward pass per sample (tested equal to
    autograd). Default T = 1, as the paper.
    """

    name = "gradnorm"
    needs_train = False

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = number("temperature", temperature, 0.0, low_open=True)

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        p = torch.softmax(logits.double() / self.temperature, dim=1)
        return (p - 1.0 / p.shape[1]).abs().sum(1) * z.double().abs().sum(1) / self.temperature
