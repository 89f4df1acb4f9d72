"""GMM: the log-likelihood of the features under a Gaussian mixture fitted on ID train.

No single paper introduced it; two reference implementations define it differently, and both are offered:

* OpenOOD's ``gmm`` postprocessor (``openood/postprocessors/gmm_postprocessor.py``, ``configs/postprocessors/gmm.yml``,
  ``reduce_feature_dim`` in ``mds_ensemble_postprocessor.py``, Jingkang50/OpenOOD 3c35632): an *unsupervised*
  scikit-learn ``GaussianMixture`` (50 components, tied covariance, ``random_state=0``) on the features projected
  onto their top 50 principal directions; the default here.
* pytorch-ood 0.4's ``pytorch_ood.detector.GMM`` (``pytorch_ood/detector/gmm.py``): *class-conditional*, one
  Gaussian per class with its own covariance (+ 1e-6 I), weights the class frequencies, on the raw features:
  ``components=None, covariance="full", dim=None`` here.

Both were read, not copied; the EM fit is scikit-learn's.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from ..features import FeatureSource
from ..features.stats import class_moments
from ..runtime import available_memory
from ..validate import choice, integer, number
from .base import Detector, register

__all__ = ["GMM"]


@register
class GMM(Detector):
    """``log sum_k w_k N(P^T z | mu_k, Sigma_k)``: the mixture's log-density of the (projected) features.

    ``P`` holds the top ``dim`` eigenvectors of the ID-train covariance of ``z`` (the PCA OpenOOD takes; like
    OpenOOD, features are projected without centring, which only shifts the fitted means); ``dim=None`` or
    ``dim >= D`` uses ``z`` itself (a projection onto all D directions is a rotation, which changes no
    likelihood). ``components`` Gaussians are fitted by scikit-learn's EM (k-means initialisation,
    ``covariance`` "tied" or "full", ``reg`` added to the covariance diagonal: its ``reg_covar``,
    ``random_state=seed``); ``components=None`` instead fits one Gaussian per class from the labels in closed form
    (maximum-likelihood mean and covariance + ``reg`` I, weight = class frequency). The score is the exact
    log-density in float64 (logsumexp over components, with each Gaussian's normalising constant), tensor
    arithmetic, so it exports.

    Streaming: the PCA and the class-conditional fit stream over ``train.chunks()`` (per-class covariances
    in two passes). EM cannot stream: it is fitted on at most ``max_samples`` projected rows, a seeded random
    subset (``seed``) when ID train is larger, so its memory is ``max_samples x dim`` float64 (40 MB at the
    defaults); ``max_samples=None`` uses every row, as OpenOOD does.

    This is the penultimate-feature version. OpenOOD's ``gmm.yml`` mixes per-layer scores
    ``alpha . log p_layer`` over three feature types (``stat``, ``mean`` and ``flat`` of early blocks, weights
    [0, 0, 1]), so its default reads the flattened map of an intermediate block, not ``z``: that multi-layer
    variant is what oodlab's intermediate-layer mechanism will add.

    Deviations from OpenOOD, each named: it computes ``log(sum_k w_k exp(-d_k / 2) + 1e-45)`` in float32, without
    the Gaussians' constant (the same for every component under a tied covariance, so a shift of every score) and
    with an underflow floor at log(1e-45) that ties every far sample; here the log-density is exact. Its PCA is
    scikit-learn's (eigenvector signs may differ: EM's answer, and so the density, does not depend on them).
    A ``dim`` at least the feature width keeps the features as they are (scikit-learn's PCA would refuse it);
    EM on a subset above ``max_samples`` rows. From pytorch-ood (``components=None, covariance="full",
    dim=None``): none in the definition; it inverts by Cholesky as here.
    """

    name = "gmm"
    notes = ("on the penultimate features; OpenOOD's gmm.yml reads an intermediate block. components=None: "
             "pytorch-ood's class-conditional GMM")

    def __init__(self, components: int | None = 50, covariance: str = "tied", dim: int | None = 50, reg: float = 1e-6,
                 max_samples: int | None = 100_000, seed: int = 0) -> None:
        super().__init__()
        self.components = integer("components", components, 1, allow_none=True,
                                  hint="None fits one Gaussian per class from the labels")
        self.covariance = choice("covariance", covariance, ("tied", "full"))
        self.dim = integer("dim", dim, 1, allow_none=True, hint="None keeps every feature dimension")
        self.reg = number("reg", reg, 0)
        self.max_samples = integer("max_samples", max_samples, 1, allow_none=True, hint="None fits EM on every row")
        self.seed = integer("seed", seed, 0)

    @property
    def score_chunk(self) -> int:  # type: ignore[override]
        """Rows per :meth:`tensor_score` call: a full covariance needs (rows x components x dim) floats at once."""
        if "factors" not in self.state or len(self.state["factors"]) == 1:
            return 65536
        k, d = self.state["means"].shape
        return max(64, min(65536, (1 << 24) // (k * d)))

    # -- fit ---------------------------------------------------------------------------------
    def _project(self, z: Tensor) -> Tensor:
        z = z.double()
        return z @ self.state["projection"] if "projection" in self.state else z

    def _fit(self, train: FeatureSource) -> None:
        d = train.dim
        if self.dim is not None and self.dim < d:
            cov = class_moments(train).covariance()
            _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
            self.state["projection"] = vecs[:, -self.dim:].flip(1).contiguous()
        d_out = self.dim if self.dim is not None and self.dim < d else d
        k = self.components if self.components is not None else self.weight.shape[0]
        if self.covariance == "full":
            need, free = k * d_out * d_out * 8 * 3, available_memory()
            if need > 0.8 * free:
                raise MemoryError(f"gmm's {k} full {d_out} x {d_out} covariances need {need / 2**30:.1f} GiB but "
                                  f"{free / 2**30:.1f} GiB are free; use covariance='tied' or a smaller dim")
        if self.components is None:
            means, covs, weights = self._fit_classes(train, d_out)
        else:
            means, covs, weights = self._fit_em(train)
        covs = covs + self.reg * torch.eye(d_out, dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(covs)
        if bool((info != 0).any()):
            raise ValueError(f"a covariance of gmm is not positive definite; raise reg (now {self.reg:g})")
        eye = torch.eye(d_out, dtype=torch.float64).expand_as(chol)
        factors = torch.linalg.solve_triangular(chol, eye, upper=False).transpose(-1, -2)  # P = F F^T
        log_det_prec = -2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # log det P, one per covariance
        self.state["means"] = means.contiguous()
        self.state["factors"] = factors.contiguous()
        self.state["log_norm"] = weights.log() + 0.5 * log_det_prec - 0.5 * d_out * math.log(2 * math.pi)

    def _fit_classes(self, train: FeatureSource, d_out: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per-class means, covariances (tied: one, (1, d, d); full: (C, d, d)) and class frequencies."""
        labels = train.labels
        if labels is None:
            raise ValueError("gmm with components=None needs the class labels of the ID training features")
        c = self.weight.shape[0]
        if int(labels.min()) < 0 or int(labels.max()) >= c:
            raise ValueError(f"training labels must lie in [0, {c}) to match the head")
        sums = torch.zeros(c, d_out, dtype=torch.float64)
        counts = torch.zeros(c, dtype=torch.float64)
        for chunk in train.chunks():  # first pass: class means of the projected features
            y = chunk.labels.long()
            sums.index_add_(0, y, self._project(chunk.z))
            counts += torch.bincount(y, minlength=c).double()
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"classes {missing[:10]} have no training features; gmm with components=None needs every class")
        means, weights = sums / counts[:, None], counts / counts.sum()
        tied = self.covariance == "tied"
        scatter = torch.zeros(1 if tied else c, d_out, d_out, dtype=torch.float64)
        for chunk in train.chunks():  # second pass: scatters around the class means, exactly centred
            y = chunk.labels.long()
            x = self._project(chunk.z) - means[y]
            if tied:
                scatter[0].addmm_(x.T, x)
                continue
            for cls in y.unique().tolist():
                xc = x[y == cls]
                scatter[cls].addmm_(xc.T, xc)
        covs = scatter / (counts.sum() if tied else counts[:, None, None])
        return means, (covs + covs.transpose(1, 2)) / 2, weights

    def _fit_em(self, train: FeatureSource) -> tuple[Tensor, Tensor, Tensor]:
        """scikit-learn's EM on (a seeded subset of) the projected ID-train features."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture

        n = len(train)
        if self.max_samples is not None and n > self.max_samples:
            keep = torch.zeros(n, dtype=torch.bool)
            keep[torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:self.max_samples]] = True
        else:
            keep = None
        rows, start = [], 0
        for chunk in train.chunks():
            z = chunk.z if keep is None else chunk.z[keep[start:start + len(chunk)]]
            start += len(chunk)
            rows.append(self._project(z))
        x = torch.cat(rows).numpy()
        if len(x) < self.components:
            raise ValueError(f"components={self.components} needs at least as many training features, got {len(x)}")
        gm = GaussianMixture(n_components=self.components, covariance_type=self.covariance, reg_covar=self.reg,
                             random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # as OpenOOD: EM's result is used either way
            gm.fit(x)
        covs = torch.from_numpy(np.asarray(gm.covariances_, dtype=np.float64))
        if self.covariance == "tied":
            covs = covs[None]
        # scikit-learn's covariances already hold reg_covar: it is added again in _fit, so take it out here
        covs = covs - self.reg * torch.eye(covs.shape[-1], dtype=torch.float64)
        return (torch.from_numpy(np.asarray(gm.means_, dtype=np.float64)), covs,
                torch.from_numpy(np.asarray(gm.weights_, dtype=np.float64)))

    # -- score -------------------------------------------------------------------------------
    def log_components(self, z: Tensor) -> Tensor:
        """(N, K): ``log w_k + log N(P^T z | mu_k, Sigma_k)`` per component, float64."""
        y = self._project(z)
        s = self.state
        means, factors = s["means"], s["factors"]
        if len(factors) == 1:  # tied: squared distances in the whitened space
            yw, mw = y @ factors[0], means @ factors[0]
            maha = (yw.square().sum(1, keepdim=True) + mw.square().sum(1)[None, :] - 2 * yw @ mw.T).clamp(min=0)
        else:
            diff = y[None, :, :] - means[:, None, :]  # (K, N, d)
            maha = torch.matmul(diff, factors).square().sum(-1).T
        return s["log_norm"][None, :] - 0.5 * maha

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return torch.logsumexp(self.log_components(z), dim=1)
