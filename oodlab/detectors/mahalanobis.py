"""Mahalanobis distance to the closest class mean, on penultimate features (Lee et al., NeurIPS 2018).

This is the penultimate-layer variant without input preprocessing or layer ensembles that OpenOOD
calls "MDS": class means and one shared covariance of ``z`` on ID train, score =
``-min_c (z - mu_c)^T Sigma^+ (z - mu_c)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..features import Features
from .base import Detector, register

__all__ = ["Mahalanobis", "class_statistics"]

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
        means, cov = class_statistics(train.z, labels, num_classes)
        self.state["means"] = means
        self.state["precision"] = torch.linalg.pinv(cov, hermitian=True)

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        means, prec = self.state["means"], self.state["precision"]
        mpm = ((means @ prec) * means).sum(1)
        zp = z.double() @ prec
        d = (zp * z.double()).sum(1, keepdim=True) - 2 * zp @ means.T + mpm[None, :]
        return -d.clamp(min=0).min(1).values
