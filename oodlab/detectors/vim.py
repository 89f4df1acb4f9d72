"""ViM: virtual-logit matching (Wang et al., CVPR 2022), and its residual alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import FeatureSource
from .base import Detector, energy, register
from ..validate import integer
from ..features.stats import class_moments

__all__ = ["ViM", "Residual", "default_dim"]

def default_dim(d: int) -> int:
    """Principal-subspace size for D-dim features: 1000 if D >= 2048 and 512 if D >= 768 (official
    code and paper); for smaller D, which the paper does not cover, D // 2."""
    return 1000 if d >= 2048 else 512 if d >= 768 else d // 2


@register
class ViM(Detector):
    """``energy(f(z)) - alpha * ||residual of (z - u)||`` with ``u = -pinv(W) b``.

    The residual is the projection of ``z - u`` onto the eigenvectors of its (uncentred, divided
    by N) ID-train second-moment matrix beyond the top ``dim``; ``alpha`` = mean max-logit /
    mean residual norm over ID train. All in float64; eigenvectors from ``eigh`` (the official code
    calls ``eig`` on the same symmetric matrix). ``dim=None`` picks :func:`default_dim`.
    """

    name = "vim"

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = integer("dim", dim, 1, allow_none=True, hint="None picks it from the feature size")

    def _fit(self, train: FeatureSource) -> None:
        d = train.dim
        dim = self.dim if self.dim is not None else default_dim(d)
        if dim >= d:
            raise ValueError(f"dim={dim} leaves no residual for {d}-d features; choose dim < {d}")
        w, b = self.weight.double(), self.bias.double()
        u = -torch.linalg.pinv(w) @ b
        moment = class_moments(train, transform=lambda z: z.double() - u, centred=False).scatter
        _, vecs = torch.linalg.eigh(moment / len(train))  # ascending eigenvalues
        residual = vecs[:, : d - dim].contiguous()
        self.state.update(origin=u, residual=residual)
        norm_sum = max_logit_sum = torch.zeros(1, dtype=torch.float64)
        for chunk in train.chunks():
            z = chunk.z.double()
            norm_sum = norm_sum + ((z - u) @ residual).norm(dim=1).sum()
            max_logit_sum = max_logit_sum + F.linear(z, w, b).max(1).values.sum()
        self.state["alpha"] = max_logit_sum / norm_sum

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        z = z.double()
        virtual = ((z - self.state["origin"]) @ self.state["residual"]).norm(dim=1) * self.state["alpha"]
        return energy(F.linear(z, self.weight.double(), self.bias.double())) - virtual

    def export_constants(self) -> dict[str, Tensor]:
        return {"origin": self.state["origin"].float(), "residual": self.state["residual"].float()}

    def export_score(self, z: Tensor, logits: Tensor, constants: dict[str, Tensor]) -> Tensor:
        """The exported guard's score: the residual projection in float32 (see :meth:`Mahalanobis.export_score`),
        the energy of the model's own logits; they differ from :meth:`tensor_score` by float32 rounding."""
        virtual = ((z.float() - constants["origin"]) @ constants["residual"]).norm(dim=1).double() * self.state["alpha"]
        return energy(logits) - virtual


@register
class Residual(ViM):
    """``-||residual of (z - u)||``: ViM's virtual-logit norm without the energy term (OpenOOD's "Residual").

    Same principal subspace (``dim``, the origin ``u = -pinv(W) b``) as :class:`ViM`.
    """

    name = "residual"

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return -((z.double() - self.state["origin"]) @ self.state["residual"]).norm(dim=1)

    def export_score(self, z: Tensor, logits: Tensor, constants: dict[str, Tensor]) -> Tensor:
        return -((z.float() - constants["origin"]) @ constants["residual"]).norm(dim=1).double()
