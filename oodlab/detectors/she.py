"""SHE: similarity to the stored pattern of the predicted class (Zhang et al., ICLR 2023)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..features import FeatureSource
from .base import Detector, register

__all__ = ["SHE"]


@register
class SHE(Detector):
    """``<z, m_yhat>``: inner product with the mean ID-train feature of the predicted class ``yhat``.

    As the official code and OpenOOD, each class's pattern averages only the training features
    that the model classifies correctly (label == prediction). A class the model never gets right
    (a NaN pattern there) falls back to the mean of all its training features, with a warning.
    """

    name = "she"

    def _fit(self, train: FeatureSource) -> None:
        labels = train.labels
        if labels is None:
            raise ValueError("she needs the class labels of the ID training features")
        num_classes = self.weight.shape[0]
        right = torch.zeros(num_classes, train.dim, dtype=torch.float64)
        every = torch.zeros_like(right)
        counts = torch.zeros(num_classes, dtype=torch.long)
        total = torch.zeros(num_classes, dtype=torch.long)
        for chunk in train.chunks():
            z, y = chunk.z.double(), chunk.labels.long()
            keep = chunk.logits.argmax(1) == y
            right.index_add_(0, y[keep], z[keep])
            every.index_add_(0, y, z)
            counts += torch.bincount(y[keep], minlength=num_classes)
            total += torch.bincount(y, minlength=num_classes)
        if (total == 0).any():
            raise ValueError(f"classes {(total == 0).nonzero().flatten().tolist()} have no training features")
        patterns = right / counts.clamp(min=1)[:, None]
        if (counts == 0).any():
            empty = (counts == 0).nonzero().flatten().tolist()
            warnings.warn(f"she: no training feature of classes {empty} is classified correctly; their patterns "
                          "are the means of all their training features", stacklevel=3)
            patterns[counts == 0] = (every / total[:, None])[counts == 0]
        self.state["patterns"] = patterns

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return (z.double() * self.state["patterns"][logits.argmax(1)]).sum(1)
