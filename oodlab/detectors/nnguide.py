"""NNGuide: nearest-neighbour guidance of the energy score (Park et al., ICCV 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..features import FeatureSource
from .base import Detector, energy, register
from ..validate import integer, number
from .knn import l2_normalise

__all__ = ["NNGuide"]


@register
class NNGuide(Detector):
    """``mean of the k largest <z', b_i>`` times ``energy(f(z))``, with ``z'`` the L2-normalised feature.

    The bank holds ``b_i = z_i' * energy(f(z_i))`` for a seeded random ``fraction`` of ID train
    (1 %, k = 100: OpenOOD's setting, which takes the first 1 % of a shuffled training loader; the
    official code likewise). pytorch-ood 0.4 uses the whole training set as the bank and k = 10. On
    a training set so small that ``fraction`` gives fewer than k features, the bank keeps k of them
    (a deviation that only tiny data sets see).
    """

    name = "nnguide"

    def __init__(self, k: int = 100, fraction: float = 0.01) -> None:
        super().__init__()
        self.k = integer("k", k, 1)
        self.fraction = number("fraction", fraction, 0, 1, low_open=True)

    def _fit(self, train: FeatureSource) -> None:
        if len(train) < self.k:
            raise ValueError(f"k={self.k} needs at least {self.k} training features, got {len(train)}; lower k")
        n = max(self.k, int(round(self.fraction * len(train))))
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n].sort().values
        bank = train.take(idx)
        self.state["bank"] = (l2_normalise(bank.z).double() * energy(bank.logits)[:, None]).float()

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        sims = l2_normalise(z) @ self.state["bank"].T
        return torch.topk(sims, self.k, dim=1).values.double().mean(1) * energy(logits)
