"""SHE: similarity to the stored pattern of the predicted class (Zhang et al., ICLR 2023)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..features import Features
from .base import Detector, register

__all__ = ["SHE"]


def _class_means(z: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    sums = torch.zeros(num_classes, z.shape[1], dtype=torch.float64).index_add_(0, labels.long(), z.double())
    counts = torch.bincount(labels.long(), minlength=num_classes)
    return sums / counts.clamp(min=1)[:, None], counts


@register
class SHE(Detector):
    """``<z, m_yhat>``: inner product with the mean ID-train feature of the predicted class ``yhat``.

    As the official code and OpenOOD, each class's pattern averages only the training features
    that the model classifies correctly (label == prediction). A class the model never gets right
    (a NaN pattern there) falls back to the mean of all its training features, with a warning.
    """

    name = "she"

    def _fit(self, train: Features) -> None:
        if train.labels is None:
            raise ValueError("she needs the class labels of the ID training features")
        num_classes = self.weight.shape[0]
        pred = train.logits.argmax(1)
        keep = pred == train.labels
        patterns, counts = _class_means(train.z[keep], train.labels[keep], num_classes)
        if (counts == 0).any():
            every, total = _class_means(train.z, train.labels, num_classes)
            if (total == 0).any():
                raise ValueError(f"classes {(total == 0).nonzero().flatten().tolist()} have no training features")
            empty = (counts == 0).nonzero().flatten().tolist()
            warnings.warn(f"she: no training feature of classes {empty} is classified correctly; their patterns "
                          "are the means of all their training features", stacklevel=3)
            patterns[counts == 0] = every[counts == 0]
        self.state["patterns"] = patterns

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return (z.double() * self.state["patterns"][logits.argmax(1)]).sum(1)
