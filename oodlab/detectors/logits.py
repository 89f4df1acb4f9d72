"""Scores read off the logits: MSP, MaxLogit, Energy, GEN, Entropy and weighted Energy."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..features import FeatureSource
from .base import Detector, energy, register
from ..validate import integer, number

__all__ = ["MSP", "MaxLogit", "Energy", "GEN", "Entropy", "WeightedEnergy"]


class _Tempered(Detector):
    """A logit score with a softmax temperature (must be > 0)."""

    needs_train = False

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = number("temperature", temperature, 0.0, low_open=True)


@register
class MSP(_Tempered):
    """Maximum softmax probability (Hendrycks & Gimpel 2017).

    Computed in float64: in float32 the softmax of a confident sample rounds to exactly 1.0, and
    those ties change FPR95.
    """

    name = "msp"

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return torch.softmax(logits.double() / self.temperature, dim=1).max(dim=1).values


@register
class MaxLogit(Detector):
    """The largest logit (Hendrycks et al. 2022)."""

    name = "maxlogit"
    needs_train = False

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return logits.double().max(dim=1).values


@register
class Energy(_Tempered):
    """Negative free energy ``T logsumexp(f(z)/T)`` with T = 1 (Liu et al. 2020)."""

    name = "energy"

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return energy(logits, self.temperature)


@register
class GEN(Detector):
    """Generalized entropy ``-sum_j p_j^g (1 - p_j)^g`` over the ``M`` largest softmax probabilities (Liu et al., CVPR 2023).

    Defaults g = 0.1 and M = 100, capped at the number of classes, as the official code and
    OpenOOD (pytorch-ood 0.4 sums over all classes: M = None). Computed in float64.
    """

    name = "gen"
    needs_train = False

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        super().__init__()
        self.gamma = number("gamma", gamma, 0.0, low_open=True)
        self.M = integer("M (how many top probabilities)", M, 1)

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        p = torch.softmax(logits.double(), dim=1)
        top = torch.topk(p, min(self.M, int(p.shape[1])), dim=1).values
        return -(top.pow(self.gamma) * (1 - top).pow(self.gamma)).sum(1)


@register
class Entropy(Detector):
    """Negative entropy of the softmax, ``sum_j p_j log p_j`` (higher = more confident = more ID).

    The baseline of Chan, Rottmann & Gottschalk (ICCV 2021; pytorch-ood ``Entropy``, which returns the entropy
    itself as an outlier score). Computed exactly in float64 from ``log_softmax`` (pytorch-ood clips ``p`` at
    1e-7 in float32 first: a difference of at most ``C * 1.6e-6`` per sample).
    """

    name = "entropy"
    needs_train = False

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        logp = torch.log_softmax(logits.double(), dim=1)
        return (logp.exp() * logp).sum(1)


@register
class WeightedEnergy(Detector):
    """Weighted Energy ``log sum_j relu(w_j) exp(f_j)`` (VOS, Du et al., ICLR 2022; pytorch-ood ``WeightedEBO``,
    which returns its negative as an outlier score; deeplearning-wisc/vos).

    The class weights ``w`` come from VOS training (its ``weight_energy`` layer); oodlab has no VOS objective,
    so pass them (a list of one number per class); the default, all ones, is Energy. Computed in float64 as
    ``logsumexp(f + log relu(w))`` (classes of weight 0 drop out).
    """

    name = "weighted-energy"
    needs_train = False

    def __init__(self, weights: list[float] | None = None) -> None:
        super().__init__()
        if weights is not None:
            if not isinstance(weights, (list, tuple)) or len(weights) < 2:
                raise ValueError(f"weights must be a list of one number per class (2 or more), got {weights!r}")
            weights = [number("class weight", w) for w in weights]
            if not any(w > 0 for w in weights):
                raise ValueError("weights: at least one class weight must be > 0 (negative ones count as 0)")
        self.weights = None if weights is None else list(weights)

    def fit(self, train: FeatureSource | None, head: nn.Linear, *, device: torch.device | str | None = None
            ) -> WeightedEnergy:
        """:meth:`Detector.fit`, then the class weights checked against the head's classes."""
        super().fit(train, head, device=device)
        if self.weights is not None and len(self.weights) != head.out_features:
            raise ValueError(f"weighted-energy has {len(self.weights)} class weights and the model "
                             f"{head.out_features} classes; give one weight per class")
        return self

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        if self.weights is None:
            return energy(logits)
        if len(self.weights) != logits.shape[1]:
            raise ValueError(f"weighted-energy has {len(self.weights)} class weights and the model "
                             f"{logits.shape[1]} classes; give one weight per class")
        w = torch.tensor(self.weights, dtype=torch.float64, device=logits.device).clamp(min=0)
        return torch.logsumexp(logits.double() + w.log(), dim=1)
