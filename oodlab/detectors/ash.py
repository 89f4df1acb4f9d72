"""ASH: activation shaping, then Energy (Djurisic et al., ICLR 2023) in its three variants.

Per sample, with n activations and percentile p, the top ``k = n - round(n * p / 100)`` values
are kept and the rest set to zero (ties broken by ``torch.topk``, as in the official code):

- ASH-P keeps the kept values as they are;
- ASH-B sets every kept value to ``s1 / k``, with ``s1`` the sum of the activations before pruning;
- ASH-S multiplies the kept values by ``exp(s1 / s2)``, with ``s2`` their sum after pruning.

By default ASH shapes the pooled penultimate features ``z``, as the official ResNet code does
(after ``avgpool``, before ``fc``), so it runs on cached features and needs no statistics. With
``feature_map=True`` it shapes the output of the last block instead (``Classifier.feature_map``)
and sends it through the model's ``pool`` and the head; that mode needs the model. The map it
shapes is the block output **after its final ReLU**, where pytorch-ood applies ASH (before
pooling). The official code's block-level ablation differs: it shapes the last block's residual
sum ``out + identity`` *before* that ReLU (its ``use_ash`` blocks), so values it prunes can be
negative; feature-map numbers here are pytorch-ood's placement, not that ablation. Unlike the
official code, nothing is edited in place.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import Features
from ..models.adapter import Classifier
from .base import Detector, energy, register
from ..validate import flag, number

__all__ = ["ASHP", "ASHB", "ASHS", "ash", "kept_count", "sum_ratio"]


def kept_count(n: int, percentile: float) -> int:
    """How many of ``n`` activations ASH keeps at ``percentile`` (``round`` is half-to-even, like NumPy's)."""
    return n - int(round(n * percentile / 100.0))


def sum_ratio(s1: Tensor, s2: Tensor) -> Tensor:
    """ASH-S's ``s1 / s2``, with 0 where the kept values sum to 0 (the official code would give NaN)."""
    return torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, 1.0), 0.0)


def ash(x: Tensor, percentile: float, variant: str) -> Tensor:
    """Shape each row of ``x`` (N, n) with ASH-``variant`` ("p", "b" or "s"); returns a new float64 tensor."""
    x = x.double().reshape(x.shape[0], -1)
    k = kept_count(int(x.shape[1]), percentile)
    if k < 1:
        raise ValueError(f"percentile {percentile} keeps no activation of {x.shape[1]}; use a smaller percentile")
    values, idx = torch.topk(x, k, dim=1)
    if variant == "b":
        values = (x.sum(1, keepdim=True) / k).expand_as(values)
    elif variant == "s":
        values = values * torch.exp(sum_ratio(x.sum(1, keepdim=True), values.sum(1, keepdim=True)))
    elif variant != "p":
        raise ValueError(f"unknown ASH variant {variant!r}; use 'p', 'b' or 's'")
    return torch.zeros_like(x).scatter_(1, idx, values)


class _ASH(Detector):
    """Shared ASH machinery; subclasses fix the variant and the paper's default percentile."""

    variant: ClassVar[str]
    needs_train = False  # ASH is per-sample shaping: no ID statistics
    notes = ("feature_map=True shapes the last block's output after its final ReLU (pytorch-ood's placement; "
             "the official block-level ablation shapes it before that ReLU)")

    def __init__(self, percentile: float, feature_map: bool = False) -> None:
        super().__init__()
        self.percentile = number("percentile", percentile, 0, 100, high_open=True)
        self.feature_map = flag("feature_map", feature_map)
        # feature-map mode must see the input, so this instance goes through the model path
        self.needs = "model" if feature_map else "features"  # type: ignore[misc]

    def logits(self, feats: Features) -> Tensor:
        """Logits of the shaped features (pooled mode).

        Cached features hold no feature map, so in feature-map mode these are the unshaped
        model's logits, and the bench's ID accuracy is that of the plain model.
        """
        self._check_fitted()
        if self.feature_map:
            return feats.logits
        return self._shaped_logits(feats.z)

    def _shaped_logits(self, z: Tensor) -> Tensor:
        return F.linear(ash(z, self.percentile, self.variant), self.weight.double(), self.bias.double())

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return energy(self._shaped_logits(z))

    @torch.no_grad()
    def score_inputs(self, model: Classifier, x: Tensor) -> Tensor:
        """Feature-map mode: shape ``model.feature_map(x)``, pool it with the model, score with Energy."""
        if not self.feature_map:
            return super().score_inputs(model, x)
        fmap = model.feature_map(x)
        shaped = ash(fmap, self.percentile, self.variant).to(fmap.dtype).reshape(fmap.shape)
        z = model.pool(shaped)
        w, b = self.weight.to(z.device).double(), self.bias.to(z.device).double()
        return energy(F.linear(z.double(), w, b))


@register
class ASHP(_ASH):
    """ASH-P: prune only. Default percentile 60 (the paper's ImageNet ResNet-50 setting)."""

    name = "ash-p"
    variant = "p"

    def __init__(self, percentile: float = 60.0, feature_map: bool = False) -> None:
        super().__init__(percentile, feature_map)


@register
class ASHB(_ASH):
    """ASH-B: prune, then binarise the kept values to ``s1 / k``. Default percentile 65 (ImageNet)."""

    name = "ash-b"
    variant = "b"

    def __init__(self, percentile: float = 65.0, feature_map: bool = False) -> None:
        super().__init__(percentile, feature_map)


@register
class ASHS(_ASH):
    """ASH-S: prune, then scale by ``exp(s1 / s2)``. Default percentile 90 (ImageNet; the paper uses 95 on CIFAR)."""

    name = "ash-s"
    variant = "s"

    def __init__(self, percentile: float = 90.0, feature_map: bool = False) -> None:
        super().__init__(percentile, feature_map)
