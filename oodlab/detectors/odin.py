"""ODIN: temperature scaling plus a small input perturbation (Liang, Li & Srikant, ICLR 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import Features
from ..models.adapter import Classifier
from .base import Detector, register
from ..validate import number

__all__ = ["ODIN"]


@register
class ODIN(Detector):
    """Max softmax at temperature T of ``x - eps * sign(grad_x CE(f(x)/T, argmax f(x)))``.

    Defaults T = 1000, eps = 0.0014 (the paper's CIFAR setting). ``eps`` is in [0, 1] pixel units:
    oodlab's :class:`Classifier` normalises inside the model, so the gradient is taken w.r.t. the
    raw pixels. The official code perturbs the normalised input by ``eps * sign(g) / std_c``; since
    ``x_norm = (x - mean_c) / std_c``, that is exactly a step of ``eps * sign(g)`` in pixels (and
    the gradient sign is the same in both spaces, as ``std_c > 0``), so the two agree.

    Batched: the loss is summed over the batch, so each sample's input gradient is the one it would
    get alone (the model is in eval mode). A zero gradient counts as positive, as in the official
    code. The perturbed input is not clipped to [0, 1], also as there. Needs the model; the
    softmax is taken in float64 so that confident samples do not tie at 1.0.
    """

    name = "odin"
    needs = "model"
    needs_train = False

    def __init__(self, temperature: float = 1000.0, eps: float = 0.0014) -> None:
        super().__init__()
        self.temperature = number("temperature", temperature, 0.0, low_open=True)
        self.eps = number("eps", eps, 0)

    def score_inputs(self, model: Classifier, x: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            logits = model(x)
            loss = F.cross_entropy(logits / self.temperature, logits.argmax(1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        direction = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype)
        with torch.no_grad():
            logits = model(x.detach() - self.eps * direction)
        return torch.softmax(logits.double() / self.temperature, dim=1).max(dim=1).values

    def logits(self, feats: Features) -> Tensor:
        """The model's own logits: ODIN changes the score, not the classifier."""
        return feats.logits
