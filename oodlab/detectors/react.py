"""ReAct: clip the penultimate activations, then score with Energy (Sun, Guo & Li, NeurIPS 2021)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import Features
from .base import Detector, energy, register
from ..validate import number

__all__ = ["ReAct", "activation_percentile"]

#: At most this many activations enter the percentile; above it, whole rows are subsampled (seed 0).
MAX_PERCENTILE_ENTRIES = 1 << 24


def activation_percentile(z: Tensor, percentile: float) -> float:
    """The ``percentile``-th percentile of all entries of ``z`` (NumPy's linear interpolation).

    The official code takes it over the flattened pooled activations of ~2,000 ID images. We use ID
    training features; when they hold more than :data:`MAX_PERCENTILE_ENTRIES` values (ImageNet:
    1.28M x 2048) a seeded random subset of rows is used, which keeps memory bounded and is far
    larger than the official 2,000-image sample.
    """
    rows = max(1, MAX_PERCENTILE_ENTRIES // max(1, z.shape[1]))
    if z.shape[0] > rows:
        idx = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(0))[:rows]
        z = z[idx]
    return float(np.percentile(z.double().numpy().ravel(), percentile))


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

    def _fit(self, train: Features) -> None:
        c = self.threshold if self.threshold is not None else activation_percentile(train.z, self.percentile)
        self.state["clip"] = torch.tensor([c], dtype=torch.float64)

    def logits(self, feats: Features) -> Tensor:
        self._check_fitted()
        return self._clipped_logits(feats.z)

    def _clipped_logits(self, z: Tensor) -> Tensor:
        return F.linear(z.double().clamp(max=self.state["clip"]), self.weight.double(), self.bias.double())

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return energy(self._clipped_logits(z))
