"""Mahalanobis distance to the closest class mean, on penultimate features (Lee et al., NeurIPS 2018), and RMDS.

This is the penultimate-layer variant without input preprocessing or layer ensembles that OpenOOD
calls "MDS": class means and one shared covariance of ``z`` on ID train, score =
``-min_c (z - mu_c)^T Sigma^+ (z - mu_c)``. RMDS (Ren et al. 2021) subtracts the distance under
one Gaussian of all ID-train features. ``normalize=True`` L2-normalises the features first:
Mahalanobis++ (Mueller et al., ICML 2025), for either.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..features import Features
from .base import Detector, register
from ..validate import flag

__all__ = ["Mahalanobis", "RMDS", "class_statistics", "moments"]

CHUNK = 65536


def class_statistics(z: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Class means (C, D) and the shared covariance (D, D) of ``z`` around them, both float64.

    Streams over ``z`` in chunks with running float64 sums; the covariance is the maximum-likelihood
    one (divided by N), as sklearn's ``EmpiricalCovariance`` gives on class-centred features.
    """
    d = z.shape[1]
    sums = torch.zeros(num_classes, d, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    scatter = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, z.shape[0], CHUNK):
        zc, yc = z[i : i + CHUNK].double(), labels[i : i + CHUNK]
        sums.index_add_(0, yc, zc)
        counts += torch.bincount(yc, minlength=num_classes).double()
        scatter += zc.T @ zc
    means = sums / counts[:, None]
    cov = (scatter - (means.T * counts) @ means) / z.shape[0]
    return means, (cov + cov.T) / 2


def moments(z: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and maximum-likelihood covariance (D, D) of all rows of ``z``, float64, in chunks."""
    means, cov = class_statistics(z, torch.zeros(len(z), dtype=torch.long), 1)
    return means[0], cov


def _mean_norms(means: Tensor, precision: Tensor) -> Tensor:
    """``mu_k^T P mu_k`` per mean: computed once at fit (it costs K D^2, more than scoring a batch)."""
    return ((means @ precision) * means).sum(1)


def _squared_distances(z: Tensor, means: Tensor, precision: Tensor, mean_norms: Tensor) -> Tensor:
    """(N, K) squared Mahalanobis distances of the rows of ``z`` to ``means`` (K, D) under ``precision``."""
    zp = z @ precision
    return ((zp * z).sum(1, keepdim=True) - 2 * zp @ means.T + mean_norms[None, :]).clamp(min=0)

@register
class Mahalanobis(Detector):
    """``-min_c`` squared Mahalanobis distance of ``z`` to the class means, shared covariance.

    Everything is float64 and the precision matrix is the pseudo-inverse of the covariance (as
    sklearn's ``EmpiricalCovariance.precision_`` used by the ViM and OpenOOD code). Units that
    are never active on ID train ("dead units") make the covariance singular; the pseudo-inverse
    then ignores those directions instead of amplifying rounding noise. Needs the ID labels of
    the training features; every class must occur.
    """

    name = "mahalanobis"

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = flag("normalize", normalize)

    def _features(self, z: Tensor) -> Tensor:
        z = z.double()
        return z / (z.norm(dim=1, keepdim=True) + 1e-10) if self.normalize else z

    def _fit(self, train: Features) -> None:
        if train.labels is None:
            raise ValueError("mahalanobis needs the class labels of the ID training features")
        num_classes = self.weight.shape[0]
        labels = train.labels.long()
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"training labels must lie in [0, {num_classes}) to match the head")
        missing = sorted(set(range(num_classes)) - set(labels.unique().tolist()))
        if missing:
            raise ValueError(f"classes {missing} have no training features; mahalanobis needs every class")
        z = self._features(train.z) if self.normalize else train.z
        means, cov = class_statistics(z, labels, num_classes)
        self.state["means"] = means
        self.state["precision"] = torch.linalg.pinv(cov, hermitian=True)
        self.state["mean_norms"] = _mean_norms(means, self.state["precision"])

    def _distances(self, z: Tensor) -> Tensor:
        s = self.state
        return _squared_distances(z, s["means"], s["precision"], s["mean_norms"])

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return -self._distances(self._features(z)).min(1).values


@register
class RMDS(Mahalanobis):
    """Relative Mahalanobis: ``-min_c [MD_c(z) - MD_0(z)]``, ``MD_0`` under one Gaussian of all ID-train z.

    As OpenOOD's reference: class means with a shared class-centred covariance, and the background
    Gaussian's own mean and covariance, both maximum-likelihood, pseudo-inverted in float64.
    """

    name = "rmds"

    def _fit(self, train: Features) -> None:
        super()._fit(train)
        mean, cov = moments(self._features(train.z) if self.normalize else train.z)
        self.state["mean0"] = mean[None, :]
        self.state["precision0"] = torch.linalg.pinv(cov, hermitian=True)
        self.state["mean_norm0"] = _mean_norms(self.state["mean0"], self.state["precision0"])

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        z = self._features(z)
        s = self.state
        background = _squared_distances(z, s["mean0"], s["precision0"], s["mean_norm0"])
        return -(self._distances(z) - background).min(1).values
