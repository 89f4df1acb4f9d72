"""The head's geometry around the ID mean: distance to the decision boundaries (fDBD, Liu & Qin, ICML 2024)
and alignment with the predicted class's weight under neural collapse (NCI, CVPR 2025)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import FeatureSource
from .base import Detector, register
from ..validate import flag, number
from ..features.stats import mean_features

__all__ = ["FDBD", "NCI"]


@register
class FDBD(Detector):
    """``mean_{j != yhat} |f_yhat(z) - f_j(z)| / ||w_yhat - w_j||``, divided by ``||z - mu||`` (or ``||z||``).

    ``|f_yhat - f_j| / ||w_yhat - w_j||`` is the distance from ``z`` to the boundary between the
    predicted class and class j; ``mu`` is the mean ID-train feature (``distance_as_normalizer=True``,
    the paper's and OpenOOD's default). OpenOOD sums over j instead of averaging, a constant factor
    ``C - 1`` that changes no ranking.
    """

    name = "fdbd"

    def __init__(self, distance_as_normalizer: bool = True) -> None:
        super().__init__()
        self.distance_as_normalizer = flag("distance_as_normalizer", distance_as_normalizer)

    def _fit(self, train: FeatureSource) -> None:
        self.state["mean"] = mean_features(train)
        w = self.weight.double()
        gaps = (w[:, None, :] - w[None, :, :]).norm(dim=2)  # (C, C) ||w_p - w_j||
        self.state["gaps"] = gaps + torch.eye(len(w), dtype=torch.float64)  # the j = p term is 0 / 1

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        z = z.double()
        out = F.linear(z, self.weight.double(), self.bias.double())
        top, pred = out.max(1)
        boundary = ((top[:, None] - out).abs() / self.state["gaps"][pred]).sum(1) / (out.shape[1] - 1)
        norm = (z - self.state["mean"]).norm(dim=1) if self.distance_as_normalizer else z.norm(dim=1)
        return boundary / norm


@register
class NCI(Detector):
    """``<w_yhat, z - mu> / ||z - mu|| + alpha * ||z||_1`` (alpha = 1e-4), ``mu`` the mean ID-train feature.

    Under neural collapse, ID features centred on ``mu`` align with their class's head weight. This
    is the form of OpenOOD's reference implementation (the alignment is not divided by
    ``||w_yhat||``, so it is the cosine times the weight's norm), which the paper's authors contributed.
    """

    name = "nci"

    def __init__(self, alpha: float = 1e-4) -> None:
        super().__init__()
        self.alpha = number("alpha", alpha, 0)

    def _fit(self, train: FeatureSource) -> None:
        self.state["mean"] = mean_features(train)

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        z = z.double()
        centred = z - self.state["mean"]
        w = self.weight.double()[logits.argmax(1)]
        return (w * centred).sum(1) / centred.norm(dim=1) + self.alpha * z.abs().sum(1)
