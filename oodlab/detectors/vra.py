"""VRA: variational rectified activation, then Energy (Xu, Lian, Liu & Tao, NeurIPS 2023; zeroQiaoba/VRA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import Features, FeatureSource
from ..features import stats
from ..validate import flag, number
from .base import Detector, energy, register

__all__ = ["VRA", "rectify"]


def rectify(z: Tensor, low: Tensor, high: Tensor, gamma: float = 0.0, zero_below: bool = True) -> Tensor:
    """VRA's piecewise operator on each entry (float64): ``0`` below ``low`` (or ``low`` itself when
    ``zero_below`` is False), ``z + gamma`` in ``[low, high]``, ``high`` above ``high``.

    ``low`` and ``high`` broadcast against ``z``: scalars, or one threshold per dimension (D,).
    """
    z = z.double()
    low, high = low.double(), high.double()
    mid = z + gamma
    out = torch.where(z > high, high.expand_as(z), mid)
    return torch.where(z < low, torch.zeros_like(z) if zero_below else low.expand_as(z), out)


@register
class VRA(Detector):
    """Energy of ``f(g(z))``: ``g`` zeroes activations below ``alpha``, adds ``gamma`` to those in
    ``[alpha, beta]`` and sets those above ``beta`` to ``beta``.

    This is the official code's operator (``--case clip2``: ``x + lamb``, zero where ``x < featmin``,
    ``featmax`` where ``x > featmax``; note that values above ``beta`` become ``beta``, not
    ``beta + gamma``). Thresholds, as the official CIFAR runs: ``alpha`` and ``beta`` are the
    ``low``-th and ``high``-th percentiles **of each dimension** of the ID-train features
    (``torch.quantile(feat, q, dim=0)``, computed here exactly and streaming with
    :func:`~oodlab.features.stats.column_percentiles`); defaults 60 / 90 with ``gamma`` 0, the
    README's CIFAR-10 "VRA" command (its "VRA+" is 60 / 95 with ``gamma`` 0.6). The official
    ImageNet runs instead set absolute thresholds by hand (ResNet-50: 0.5 / 1.0).

    Other rules, selectable: OpenOOD's ``vra`` takes one pair of thresholds over all ID activations
    (``per_dimension=False``, 10 / 90) and **clips** below ``alpha`` instead of zeroing
    (``zero_below=False``), with no ``gamma``; pytorch-ood 0.4's ``VRA`` clips both sides per
    dimension (``zero_below=False``, 1 / 99, on feature maps). :meth:`logits` are those of the
    rectified features (the official code classifies with them).
    """

    name = "vra"
    notes = ("official rule: per-dimension ID-train percentiles, zero below low, +gamma between, high above; "
             "OpenOOD's: per_dimension=False, zero_below=False, low=10")

    def __init__(self, low: float = 60.0, high: float = 90.0, gamma: float = 0.0, per_dimension: bool = True,
                 zero_below: bool = True) -> None:
        super().__init__()
        self.low = number("low", low, 0, 100)
        self.high = number("high", high, 0, 100)
        if low > high:
            raise ValueError(f"need low <= high, got low={low}, high={high}")
        self.gamma = number("gamma", gamma)
        self.per_dimension = flag("per_dimension", per_dimension)
        self.zero_below = flag("zero_below", zero_below)

    def _fit(self, train: FeatureSource) -> None:
        if self.per_dimension:
            low, high = stats.column_percentiles(train, [self.low, self.high])
        else:
            low = torch.tensor([stats.percentile(train, self.low)], dtype=torch.float64)
            high = torch.tensor([stats.percentile(train, self.high)], dtype=torch.float64)
        self.state["low"], self.state["high"] = low, high

    def logits(self, feats: Features) -> Tensor:
        self._check_fitted()
        return self._rectified_logits(feats.z)

    def _rectified_logits(self, z: Tensor) -> Tensor:
        g = rectify(z, self.state["low"], self.state["high"], self.gamma, self.zero_below)
        return F.linear(g, self.weight.double(), self.bias.double())

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return energy(self._rectified_logits(z))
