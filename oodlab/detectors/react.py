"""ReAct: clip the penultimate activations, then score with Energy (Sun, Guo & Li, NeurIPS 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import Features, FeatureSource
from ..features import stats
from .base import Detector, energy, register
from ..validate import number

__all__ = ["ReAct", "activation_percentile"]

def activation_percentile(train: FeatureSource, percentile: float) -> float:
    """The ``percentile``-th percentile of all entries of ``z`` over ``train`` (NumPy's linear interpolation).

    The official code takes it over the flattened pooled activations of ~2,000 ID images; we use all
    ID training features, exactly (:func:`oodlab.features.stats.percentile` streams over chunks, so
    ImageNet's 1.28M x 2048 activations need memory for one chunk).
    """
    return stats.percentile(train, percentile)


@register
class ReAct(Detector):
    """Energy of ``f(min(z, c))`` with ``c`` the ``percentile``-th percentile of ID-train activations.

    ``threshold`` fixes ``c`` by hand instead (``float("inf")`` turns ReAct into plain Energy).
    :meth:`logits` are those of the clipped features, so the bench reports ID accuracy with ReAct on.
    """

    name = "react"

    def __init__(self, percentile: float = 90.0, threshold: float | None = None) -> None:
        super().__init__()
        self.percentile = number("percentile", percentile, 0, 100)
        self.threshold = number("threshold", threshold, -math.inf, low_open=True, allow_none=True, allow_inf=True,
                                hint="None estimates it from ID training features")

    @property
    def clip(self) -> float:
        """The clipping value ``c`` in use."""
        return float(self.state["clip"])

    def _fit(self, train: FeatureSource) -> None:
        c = self.threshold if self.threshold is not None else activation_percentile(train, self.percentile)
        self.state["clip"] = torch.tensor([c], dtype=torch.float64)

    def logits(self, feats: Features) -> Tensor:
        self._check_fitted()
        return self._clipped_logits(feats.z)

    def _clipped_logits(self, z: Tensor) -> Tensor:
        return F.linear(z.double().clamp(max=self.state["clip"]), self.weight.double(), self.bias.double())

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return energy(self._clipped_logits(z))
