"""Plain empirical risk minimisation: cross-entropy on the ID labels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..data.suites import Suite
from ..models.adapter import Classifier
from . import register_objective
from .loop import Objective, TrainConfig

__all__ = ["CrossEntropy"]


class CrossEntropy(Objective):
    """Standard supervised training."""

    name = "erm"

    def loss(self, model: Classifier, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        logits = model(x)
        return F.cross_entropy(logits, y), {"correct": float((logits.argmax(1) == y).sum())}


@register_objective("erm")
def _factory(*, model: Classifier, suite: Suite, config: TrainConfig) -> CrossEntropy:
    return CrossEntropy()
