"""ISH, Intermediate Tensor SHaping (Xu et al., ICLR 2024, "Scaling for Training Time and Post-hoc
Out-of-distribution Detection Enhancement"): SCALE's activation scaling brought into training.

The forward pass is the network's own: the loss is plain cross-entropy, and ID accuracy and the
saved checkpoint are those of an ordinary :class:`~oodlab.models.adapter.Classifier`. What changes is
the head's **weight gradient**: it is computed from a shaped copy of the penultimate features,
``z~ = scatter(top-k |z|) * exp(s1 / s2)`` (the ``k`` largest-magnitude activations kept, the rest zeroed,
then scaled by ASH-S's ratio: ``s1`` the sum of ``z``, ``s2`` that of the kept values), i.e.
``dL/dW = (dL/dlogits)^T z~`` instead of ``(dL/dlogits)^T z``. The bias gradient and the gradient
flowing back into the backbone (``(dL/dlogits) W``) are unchanged. Samples whose activation is
concentrated in few units (a large ``s1 / s2``, typical of ID data by SCALE's analysis) thus weigh
more in the head's update. The paper pairs the trained model with the post-hoc SCALE score
(oodlab's ``scale`` detector, percentile 85).

Read: the official repository kai422/SCALE at commit 6a6ab911228fae0cf95484be94484304177b77b0
(``README.md``: inference of an ISH model with the ``scale`` postprocessor; it points to OpenOOD for
the training code) and OpenOOD's ``openood/trainers/ish_trainer.py`` with
``configs/pipelines/train/train_ish.yml`` and ``scripts/ood/ish/imagenet_train_ish.sh``
(Jingkang50/OpenOOD at commit 3c35632ee91b54b09d1f085d04f94744cece7d0b; the trainer is the
authors' upload). Official settings: mode ``minksample_expscale`` on the final linear layer only
(``layer: r1``), ``param = 0.85`` (here ``percentile = 85``: 85% of the activations pruned for the
gradient), so ``k = int(n * (1 - 0.85))`` (floor; oodlab's post-hoc SCALE keeps
``n - round(0.85 n)``, one more at n = 512); SGD with Nesterov momentum 0.9, weight decay 5e-4 on
the backbone but **5e-5 on the head** (weight and bias, ``weight_decay_fc``); ImageNet-1K: a pretrained
ResNet-50 fine-tuned 10 epochs at lr 0.003, batch 128 per GPU, cosine schedule.

Deviations: where every activation of a sample is zero (``s2 = 0``) the ratio is taken as 0, as in
oodlab's ASH-S and SCALE (the official code gives NaN). OpenOOD's other modes (``expscale``,
``minksample_lnscale``) and ``layer: all`` are not implemented (the paper's method is the default).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.suites import Suite
from ..detectors.ash import sum_ratio
from ..models.adapter import Classifier
from ..validate import number, tensor
from . import register_objective
from .loop import Objective, TrainConfig

__all__ = ["ish_kept", "ish_shaped", "ish_linear", "ISH"]


def ish_kept(n: int, percentile: float) -> int:
    """Activations of ``n`` that the weight gradient keeps: ``int(n * (1 - percentile / 100))`` (official)."""
    k = int(n * (1 - percentile / 100))
    if k < 1:
        raise ValueError(f"ISH percentile {percentile:g} keeps no activation of {n}; use a smaller percentile")
    return k


def ish_shaped(z: Tensor, percentile: float) -> Tensor:
    """``z~`` per row: the ``k`` largest ``|z|`` kept (as magnitudes), the rest 0, all times ``exp(s1 / s2)``."""
    tensor("z", z, "ND")
    values, idx = z.abs().topk(ish_kept(z.shape[1], percentile), dim=1, sorted=False)
    ratio = sum_ratio(z.sum(1, keepdim=True), values.sum(1, keepdim=True))
    return torch.zeros_like(z).scatter_(1, idx, values * torch.exp(ratio))


class _ISHLinear(torch.autograd.Function):
    """``F.linear(z, weight, bias)`` forward; backward: the weight's gradient from ``ish_shaped(z)``."""

    @staticmethod
    def forward(ctx, z: Tensor, weight: Tensor, bias: Tensor | None, percentile: float) -> Tensor:
        ctx.save_for_backward(ish_shaped(z.detach(), percentile), weight)
        ctx.has_bias = bias is not None
        return F.linear(z, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        shaped, weight = ctx.saved_tensors
        grad_z = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ shaped if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_z, grad_w, grad_b, None


def ish_linear(z: Tensor, weight: Tensor, bias: Tensor | None, percentile: float = 85.0) -> Tensor:
    """The head's logits ``z W^T + b`` with ISH's weight gradient (see the module docstring)."""
    return _ISHLinear.apply(z, weight, bias, percentile)


class ISH(Objective):
    """Cross-entropy whose head weight gradient reads SCALE-shaped features (percentile 85); the head
    trains with weight decay ``head_weight_decay`` (official 5e-5; None: the config's)."""

    name = "ish"

    def __init__(self, percentile: float = 85.0, head_weight_decay: float | None = 5e-5) -> None:
        self.percentile = number("percentile", percentile, 0.0, 100.0, high_open=True,
                                 hint="the share of activations pruned for the head's weight gradient (official 85)")
        self.head_weight_decay = number("head_weight_decay", head_weight_decay, 0.0, allow_none=True)

    def loss(self, model: Classifier, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        logits = ish_linear(model.features(x), model.head.weight, model.head.bias, self.percentile)
        return F.cross_entropy(logits, y), {"correct": float((logits.argmax(1) == y).sum())}

    def weight_decays(self, model: Classifier) -> dict[str, float]:
        if self.head_weight_decay is None:
            return {}
        return {name: self.head_weight_decay for name, _ in model.named_parameters() if name.startswith("head.")}

    def config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "head_weight_decay": self.head_weight_decay}


@register_objective("ish")
def _factory(*, model: Classifier, suite: Suite, config: TrainConfig, percentile: float = 85.0,
             head_weight_decay: float | None = 5e-5) -> ISH:
    return ISH(percentile, head_weight_decay)
