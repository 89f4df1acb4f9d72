"""LogitNorm (Wei et al., ICML 2022, "Mitigating Neural Network Overconfidence with Logit Normalization").

Cross-entropy trains the logits' norm to keep growing on the training data, so softmax confidence
ends up high for almost any input, outliers included. LogitNorm takes that lever away: the loss is
the cross-entropy of the logits divided by their L2 norm and a temperature,
``CE(f / (tau * ||f||), y)``, so only the logits' direction is trained. The network itself is
unchanged: at test time its plain logits are scored, and the paper pairs it with MSP.

Read: the official code hongxin001/logitnorm_ood at commit 0a60eeffb7dfc970fe68e07c5649ea1c9c8244c6
(``common/loss_function.py``, ``train.py``) and OpenOOD's ``logitnorm`` trainer and
``configs/pipelines/train/train_logitnorm.yml`` (Jingkang50/OpenOOD at commit
3c35632ee91b54b09d1f085d04f94744cece7d0b). Both add 1e-7 to the norm before dividing; so does this.

Default ``tau = 0.04``: the paper's CIFAR-10 value, which OpenOOD's config uses. The official
repository has no method default of its own: ``train.py``'s ``--temp`` defaults to 1.0 (unit-norm
logits then keep the softmax near uniform) and its README's example command passes ``--temp 0.01``; pass
``tau`` to choose either. The loop's recipe is the papers': SGD with Nesterov momentum 0.9, weight
decay 5e-4, cosine schedule (OpenOOD: 100 epochs at lr 0.1 on CIFAR; the official repository's
WideResNet: 200 epochs).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..data.suites import Suite
from ..models.adapter import Classifier
from ..validate import number, tensor
from . import register_objective
from .loop import Objective, TrainConfig

__all__ = ["logitnorm_loss", "LogitNorm"]

NORM_EPS = 1e-7  # added to ||f|| before dividing, as both official codes do


def logitnorm_loss(logits: Tensor, labels: Tensor, tau: float) -> Tensor:
    """Batch mean of ``CE(f / (tau * (||f||_2 + 1e-7)), y)``, the norm taken per sample over the classes."""
    tensor("logits", logits, "NC")
    return F.cross_entropy(logits / ((logits.norm(p=2, dim=1, keepdim=True) + NORM_EPS) * tau), labels)


class LogitNorm(Objective):
    """Cross-entropy on L2-normalised logits at temperature ``tau`` (default 0.04, the paper's CIFAR-10 value)."""

    name = "logitnorm"

    def __init__(self, tau: float = 0.04) -> None:
        self.tau = number("tau", tau, 0.0, low_open=True,
                          hint="the temperature dividing the unit-norm logits (the paper's 0.04 on CIFAR-10)")

    def loss(self, model: Classifier, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        logits = model(x)
        return logitnorm_loss(logits, y, self.tau), {"correct": float((logits.argmax(1) == y).sum())}

    def config(self) -> dict[str, Any]:
        return {"tau": self.tau}


@register_objective("logitnorm")
def _factory(*, model: Classifier, suite: Suite, config: TrainConfig, tau: float = 0.04) -> LogitNorm:
    return LogitNorm(tau)
