"""T2FNorm (Regmi et al., CVPR Workshops 2024, "T2FNorm: Train-time Feature Normalization for OOD
Detection in Image Classification").

Training sees the penultimate features projected onto the unit hypersphere and divided by a
temperature, ``logits = W (z / ||z||) / tau + b``; testing uses the features as they are. The paper
finds that this shrinks feature norms, more for OOD inputs than for ID ones, so confidence computed
from the untransformed features separates them better. The normalisation lives in this objective
(on ``z = model.features(x)``, then the head), not in the architecture: the saved checkpoint is a
plain oodlab :class:`~oodlab.models.adapter.Classifier`, and every post-hoc detector composes with it.

Read: the official code sudarshanregmi/T2FNorm at commit c78851ea31040612c8bdaadafa3c2e3d7b0bc706
(``openood/networks/t2fnorm_net.py``, ``openood/postprocessors/t2fnorm_postprocessor.py``,
``configs/pipelines/train/train_t2fnorm.yml``, ``scripts/ood/t2fnorm/``), which is also OpenOOD's
``t2fnorm`` trainer / network / postprocessor (Jingkang50/OpenOOD at commit
3c35632ee91b54b09d1f085d04f94744cece7d0b). Defaults from there: ``tau = 0.1``; SGD with Nesterov
momentum 0.9, weight decay 5e-4, cosine schedule, 100 epochs at lr 0.1 from scratch (ImageNet-1K:
a pretrained ResNet-50 fine-tuned 30 epochs at lr 0.001).

**What the test-time model computes.** The official inference (``forward_ood_inference``) is
``W (z / tau) + b`` for models trained from scratch and ``W z + b`` for the fine-tuned ImageNet-1K
model (it tells the two apart by the 1000 classes); its postprocessor is MSP of that. Here
``scaled_inference`` chooses (default True, the from-scratch rule; pass False when fine-tuning with
``--from`` to follow the official fine-tune). With True the checkpoint's head must compute
``W z / tau + b`` by itself, so the head holds ``V = W / tau`` throughout training (divided once at
the start of a run) and the training logits are ``V (z / ||z||) + b``: the same function of the
input. To take the same optimisation steps as the official parametrisation, the gradient reaching
``V`` from the loss is multiplied by ``1 / tau**2``; with SGD (momentum, Nesterov and weight decay
included, all linear in the step) the iterates are then exactly ``W_t / tau`` of the official run
in exact arithmetic. MSP (or any detector) on the saved checkpoint is then the official
``t2fnorm`` postprocessor's score, and the epoch's ``test_acc`` is the accuracy of that inference.

Deviations: with Adam (``--optimizer adam``, not an official setting) the ``V`` steps are not
``W`` steps divided by ``tau``, because Adam's step does not scale with its gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.suites import Suite
from ..models.adapter import Classifier
from ..validate import flag, number, tensor
from . import register_objective
from .loop import Objective, TrainConfig

__all__ = ["t2fnorm_logits", "T2FNorm"]


class _ScaleGrad(torch.autograd.Function):
    """The identity forward; the gradient multiplied by ``factor`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # noqa: D401 - autograd signature
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def t2fnorm_logits(z: Tensor, weight: Tensor, bias: Tensor | None, tau: float) -> Tensor:
    """The training logits ``weight (z / ||z||_2) / tau + bias`` (``F.normalize``'s norm, floored at 1e-12)."""
    tensor("z", z, "ND")
    return F.linear(F.normalize(z, dim=1) / tau, weight, bias)


class T2FNorm(Objective):
    """Cross-entropy on ``W (z / ||z||) / tau + b`` (default ``tau = 0.1``); see the module docstring for
    the head's parametrisation under ``scaled_inference``."""

    name = "t2fnorm"

    def __init__(self, tau: float = 0.1, scaled_inference: bool = True) -> None:
        self.tau = number("tau", tau, 0.0, low_open=True,
                          hint="the temperature dividing the unit-norm features (official 0.1)")
        self.scaled_inference = flag("scaled_inference", scaled_inference)

    def begin(self, model: Classifier, run_dir: Path) -> None:
        # the head holds V = W / tau (a resumed run then loads its own V over this)
        if self.scaled_inference:
            with torch.no_grad():
                model.head.weight.div_(self.tau)

    def loss(self, model: Classifier, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        z, head = model.features(x), model.head
        if self.scaled_inference:  # V (z / ||z||) + b == W (z / ||z||) / tau + b, with W's steps
            logits = t2fnorm_logits(z, _ScaleGrad.apply(head.weight, self.tau ** -2), head.bias, 1.0)
        else:
            logits = t2fnorm_logits(z, head.weight, head.bias, self.tau)
        return F.cross_entropy(logits, y), {"correct": float((logits.argmax(1) == y).sum())}

    def config(self) -> dict[str, Any]:
        return {"tau": self.tau, "scaled_inference": self.scaled_inference,
                "head": "W / tau (the checkpoint computes W z / tau + b)" if self.scaled_inference else "W"}


@register_objective("t2fnorm")
def _factory(*, model: Classifier, suite: Suite, config: TrainConfig, tau: float = 0.1,
             scaled_inference: bool = True) -> T2FNorm:
    return T2FNorm(tau, scaled_inference)
