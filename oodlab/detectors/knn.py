"""KNN: distance to the k-th nearest ID-train neighbour of the L2-normalised features (Sun et al., ICML 2022)."""

from __future__ import annotations

import faiss
import numpy as np
import torch
from torch import Tensor

from ..features import Features
from .base import Detector, register
from ..validate import integer, number

__all__ = ["KNN", "l2_normalise"]


def l2_normalise(z: Tensor) -> Tensor:
    """Rows of ``z`` scaled to unit length, float32 (``z / (||z|| + 1e-10)`` as in the official code)."""
    z = z.float()
    return z / (z.norm(dim=1, keepdim=True) + 1e-10)


@register
class KNN(Detector):
    """``-||z' - z'_(k)||``: minus the Euclidean distance to the k-th nearest normalised ID-train feature.

    k = 50 is the paper's CIFAR-10 setting (it uses k = 1000 with ``fraction = 0.01`` of ImageNet
    train). Search is exact (faiss ``IndexFlatL2``). The official code scores with faiss' squared
    distance; we take its square root, which changes no ranking and so no metric. faiss marks a
    missing neighbour with id -1; that is checked and raises instead of giving a silent score.
    :meth:`tensor_score` is the same exact search as dense tensor arithmetic (the bank is a constant
    of the graph), which is what an exported guard runs.
    """

    name = "knn"

    def __init__(self, k: int = 50, fraction: float = 1.0) -> None:
        super().__init__()
        self.k = integer("k", k, 1)
        self.fraction = number("fraction of ID-train features to keep", fraction, 0, 1, low_open=True)

    def _fit(self, train: Features) -> None:
        z = train.z
        if self.fraction < 1:
            n = max(1, int(round(self.fraction * len(z))))
            z = z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:n].sort().values]
        if len(z) < self.k:
            raise ValueError(f"k={self.k} needs at least {self.k} training features, got {len(z)}; lower k")
        self.state["bank"] = l2_normalise(z).contiguous()

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        bank = self.state["bank"]
        q = l2_normalise(z)
        d2 = q.square().sum(1, keepdim=True) + bank.square().sum(1)[None, :] - 2 * q @ bank.T
        kth = torch.topk(d2, self.k, dim=1, largest=False).values[:, -1]
        return -kth.double().clamp(min=0).sqrt()

    def _score(self, feats: Features) -> Tensor:
        bank = self.state["bank"]
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(np.ascontiguousarray(bank.numpy()))
        dist, ids = index.search(np.ascontiguousarray(l2_normalise(feats.z).numpy()), self.k)
        if (ids[:, -1] < 0).any():
            raise RuntimeError(f"faiss found fewer than k={self.k} neighbours (id -1) for "
                               f"{int((ids[:, -1] < 0).sum())} samples; the index holds {index.ntotal} vectors")
        return -torch.from_numpy(dist[:, -1].astype(np.float64)).clamp(min=0).sqrt()
