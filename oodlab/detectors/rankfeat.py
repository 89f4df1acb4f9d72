"""RankFeat: remove the rank-1 part of the last feature map, then score with Energy (Song et al., NeurIPS 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.adapter import Classifier
from .base import Detector, energy, register

__all__ = ["RankFeat", "remove_rank1"]


def remove_rank1(fmap: Tensor) -> Tensor:
    """Each map ``X`` (C x HW) of ``fmap`` (N, C, H, W) less ``s_1 u_1 v_1^T`` from its SVD, in float64."""
    x = fmap.double().flatten(2)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (x - s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).reshape(fmap.shape)


@register
class RankFeat(Detector):
    """Energy of ``head(pool(X - s_1 u_1 v_1^T))``, ``X`` the body's last feature map (C x HW) of each input.

    Read: the official code (KingJamesSong/RankFeat: block-4 removal with an exact SVD, Energy at temperature 1)
    and pytorch-ood 0.4.0 ``detector/rankfeat.py`` (the same, on ``backbone`` / ``head`` callables). It edits
    the map before the model's pool, so it goes back to the model (one pass per data set, as ODIN; the SVD in
    float64). Deviation: only the last block (the paper's default); its block-3 variant, which sends the edited
    map of block 3 through block 4 again, is not offered.
    """

    name = "rankfeat"
    needs = "model"
    needs_train = False

    @torch.no_grad()
    def score_inputs(self, model: Classifier, x: Tensor) -> Tensor:
        fmap = model.feature_map(x)
        if fmap.dim() != 4:
            raise ValueError(f"{self.name} edits a feature map (N, C, H, W); this model's body gives {tuple(fmap.shape)}")
        z = model.pool(remove_rank1(fmap).to(fmap.dtype).contiguous())
        return energy(F.linear(z.double(), self.weight.to(z.device).double(), self.bias.to(z.device).double()))
