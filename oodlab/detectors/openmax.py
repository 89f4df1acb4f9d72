"""OpenMax: extreme-value recalibration of the logits with an "unknown" class (Bendale & Boult, CVPR 2016).

OpenMax asks, for each of the top classes of a sample, how far out its logit vector lies compared with the
training samples the model got right for that class. Per class ``c`` it keeps the mean activation vector
``mu_c`` (MAV: mean of the logits of the correctly classified ID-train samples of ``c``) and fits a Weibull
to the ``tail_size`` largest distances of those samples to ``mu_c`` (extreme value theory: the tail of
the distances is what bounds the class's open space). At test time the ``alpha`` top-ranked classes get
their logit shrunk by ``w_r * W_c(d(x, mu_c))`` (``W_c`` the fitted Weibull CDF, ``w_r = (alpha - r) /
alpha`` for rank ``r = 0 .. alpha - 1``), the removed mass becomes the logit of an extra "unknown" class,
and a softmax over the ``C + 1`` revised logits gives ``P(unknown)``.

Score (higher = more ID): ``-P(unknown)``, float64: the ``conf`` OpenOOD reports for OpenMax.

Reference code read (none copied):

* official: abhijitbendale/OSDN (``compute_openmax.py``, ``evt_fitting.py``, ``openmax_utils.py`` at
  b55fe7b675d445f1587762a4095be9944afd7b61), which fits with libMR;
* OpenOOD ``openood/postprocessors/openmax_postprocessor.py`` at 3c35632ee91b54b09d1f085d04f94744cece7d0b
  (the leaderboard's reference; ``configs/postprocessors/openmax.yml`` has no sweep and no OpenMax
  parameters, so its constants are in the postprocessor);
* pytorch-ood 0.4.0 ``pytorch_ood/detector/openmax/{torch,numpy,libnotmr}.py``;
* libmr 0.1.9 from PyPI (what OpenOOD's README installs): ``MetaRecognition.cpp`` (``FitHigh``,
  ``EvtGeneric``, ``W_score``) and ``weibull.c`` (``weibull_fit``, ``weibull_cdf``).

**The Weibull fit.** libmr is not used: its PyPI sdist imports numpy in ``setup.py`` without declaring it,
so ``pip install libmr`` fails under build isolation (it builds only with ``--no-build-isolation`` after
numpy, Cython and wheel are installed), and it cannot be an installable extra. What ``MR.fit_high(tail,
len(tail))`` computes is reproduced with a maintained fit: libmr takes the tail, subtracts its smallest
value ``s`` and adds ``translate_amount`` ``t`` (``x = d - s + t``, all positive), and fits a two-parameter
Weibull (location 0) by maximum likelihood, the way MATLAB's ``wblfit`` does: by fitting the
smallest-extreme-value (Gumbel-min) distribution to ``log x`` (shape = 1 / Gumbel scale, scale = exp(Gumbel
location)). We call ``scipy.stats.gumbel_l.fit(log x)``, whose MLE is solved by root finding, and
``W_score(d) = 1 - exp(-(max(d - s + t, 0) / scale) ** shape)`` as libmr's ``weibull_cdf``. Against
libmr 0.1.9 built in a scratch environment the W-scores agree to 1.5e-6 (libmr's own tolerance is 1e-6) at
both translations below; ``scipy.stats.weibull_min.fit(x, floc=0)`` (a generic optimiser) does not converge
for the very large shapes a translation of 10000 gives (W-scores off by up to 0.74), so it is not used.
``translate`` is libmr's ``translate_amount``: 1 in PyPI libmr 0.1.9 (so in OpenOOD, our default); 10000
in the libMR of the OSDN era and in pytorch-ood's scipy stand-in.

**Defaults** are OpenOOD's: ``tail_size = 20``, ``alpha = 3``, ``distance = "euclidean"`` (OpenOOD passes
'euclidean' to both the fit and the recalibration; its ``eu_weight = 0.5`` enters only 'eucos'). The official
ImageNet script uses ``alpha = 10``, tail 20 and 'eucos'; its distances are ``euclidean / 200 + cosine``
('eucos') and ``euclidean / 200`` ('euclidean'): ``distance="eucos", eu_weight=0.005`` is its 'eucos'.
Distances: 'euclidean' ``||x - mu||``, 'cosine' ``1 - <x, mu> / (||x|| ||mu||)``, 'eucos' ``eu_weight *
euclidean + cosine`` (OpenOOD's definitions, as scipy.spatial.distance).

Deviations, each named:

* one "channel": the official code averages OpenMax over the 10 crops of each image (10 channels); OpenOOD
  and we use the single logit vector of the image.
* a class with fewer correctly classified training samples than ``tail_size`` is refused (the references
  silently fit the shorter tail; libmr then fits fewer points, or fails for one point and returns -9999);
  a tail of equal distances (libmr's fit fails: "insufficient distinct data") is refused too.
* a class with **no** correctly classified training sample (OpenOOD then fails on an empty concatenation):
  its MAV and tail come from all its training samples, with a warning (the house rule of SHE; pytorch-ood
  fits every class on all its labelled samples).
* the softmax over the revised logits is computed with logsumexp (OpenOOD exponentiates the raw values and
  overflows above ~709; pytorch-ood clips them at 709).
* the cosine distance of an all-zero logit vector is 1 (scipy returns NaN).
* MAVs, distances and the score in float64 (OpenOOD: float32 logits, float64 distances).
* the fit streams over ``train.chunks()`` in two passes (class means, then a running per-class top-``tail_size``
  of distances), so memory is bounded by a chunk, not by the training set.

pytorch-ood's ``OpenMax`` differs besides (``tests/detectors/test_peer_pytorch_ood.py`` checks the rest
equal): it fits on all labelled samples, not the correctly classified ones; its defaults are tail 25,
alpha 10, Euclidean; its mixed distance is ``(1 - euclid_weight) cosine + euclid_weight euclidean``; it
clips alpha to the number of classes; its score is ``P(unknown)`` (higher = OOD); it computes a sample's
distance to a class only when that class is the top class of some sample of the same batch (a second-ranked
class that is nobody's top class gets distance 0: scores depend on the batch); and its
``scipy.stats.exponweib.fit`` at translation 10000 is far from libmr's MLE (W-scores off by up to 0.48 with
scipy 1.17), so the peer test hands it our Weibull parameters.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from ..features import FeatureSource
from .base import Detector, register
from ..validate import choice, integer, number

__all__ = ["OpenMax", "weibull_fit_high", "weibull_score"]

DISTANCES = ("euclidean", "cosine", "eucos")


def weibull_fit_high(tail: np.ndarray, translate: float = 1.0) -> tuple[float, float, float]:
    """``(scale, shape, smallest)`` of libmr's ``fit_high(tail, len(tail))`` with ``translate_amount = translate``:
    the maximum-likelihood two-parameter Weibull of ``tail - min(tail) + translate``, fitted as a Gumbel-min
    of its logarithm (:func:`scipy.stats.gumbel_l.fit`). ``tail`` must hold at least two distinct values."""
    tail = np.asarray(tail, dtype=np.float64)
    smallest = float(tail.min())
    loc, gscale = stats.gumbel_l.fit(np.log(tail - smallest + translate))
    return math.exp(loc), 1.0 / gscale, smallest


def weibull_score(d: Tensor, scale: Tensor, shape: Tensor, smallest: Tensor, translate: float) -> Tensor:
    """libmr's ``W_score`` (the Weibull CDF of the translated distance; 0 where that is negative)."""
    t = ((d - smallest + translate) / scale).clamp(min=0)
    return 1 - torch.exp(-t.pow(shape))


@register
class OpenMax(Detector):
    """``-P(unknown)`` of OpenMax's recalibrated softmax: Weibull fits on the tails of the distances of correctly
    classified ID-train logits to their class mean (defaults: OpenOOD's; module docstring for every detail)."""

    name = "openmax"

    def __init__(self, tail_size: int = 20, alpha: int = 3, distance: str = "euclidean", eu_weight: float = 0.5,
                 translate: float = 1.0) -> None:
        super().__init__()
        self.tail_size = integer("tail_size", tail_size, 2, hint="a Weibull needs at least two distances")
        self.alpha = integer("alpha", alpha, 1)
        self.distance = choice("distance", distance, DISTANCES)
        self.eu_weight = number("eu_weight", eu_weight, 0)
        self.translate = number("translate", translate, 0, low_open=True)

    # -- fit ---------------------------------------------------------------------------------------
    def _fit(self, train: FeatureSource) -> None:
        num_classes = self.weight.shape[0]
        if self.alpha > num_classes:
            raise ValueError(f"alpha = {self.alpha} is above the number of classes ({num_classes}): lower alpha")
        if train.labels is None:
            raise ValueError("openmax needs the class labels of the ID training features")
        right, every, n_right, n_every = self._class_sums(train, num_classes)
        if (n_every == 0).any():
            raise ValueError(f"classes {(n_every == 0).nonzero().flatten().tolist()} have no training features; "
                             "openmax needs every class")
        fallback = n_right == 0
        if fallback.any():
            warnings.warn(f"openmax: no training feature of classes {fallback.nonzero().flatten().tolist()} is "
                          "classified correctly; their means and tails use all their training features", stacklevel=3)
        counts = torch.where(fallback, n_every, n_right)
        short = (counts < self.tail_size).nonzero().flatten().tolist()
        if short:
            c, more = short[0], f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
            what = ("correctly classified training samples" if not fallback[c] else
                    "training samples, none classified correctly")
            raise ValueError(f"class {c} has {int(counts[c])} {what}, fewer than tail_size = {self.tail_size}{more}: "
                             "lower tail_size or give more data")
        means = torch.where(fallback[:, None], every, right) / counts[:, None].double()
        tails = self._tails(train, means, fallback)
        params = []
        for c, tail in enumerate(tails.numpy()):
            if tail.max() == tail.min():
                raise ValueError(f"class {c}: its {self.tail_size} largest distances to the class mean are all "
                                 f"{tail.max():g}, so no Weibull can be fitted; check for duplicated training samples")
            params.append(weibull_fit_high(tail, self.translate))
        scale, shape, smallest = torch.tensor(params, dtype=torch.float64).T
        self.state.update(means=means, scale=scale.contiguous(), shape=shape.contiguous(),
                          smallest=smallest.contiguous())

    @staticmethod
    def _class_sums(train: FeatureSource, num_classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-class sums and counts of the logits: of the correctly classified samples, and of all samples."""
        right = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        every = torch.zeros_like(right)
        n_right = torch.zeros(num_classes, dtype=torch.long)
        n_every = torch.zeros(num_classes, dtype=torch.long)
        for chunk in train.chunks():
            x, y = chunk.logits.double(), chunk.labels.long()
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise ValueError(f"training labels must lie in [0, {num_classes}) to match the head")
            ok = x.argmax(1) == y
            right.index_add_(0, y[ok], x[ok])
            every.index_add_(0, y, x)
            n_right += torch.bincount(y[ok], minlength=num_classes)
            n_every += torch.bincount(y, minlength=num_classes)
        return right, every, n_right, n_every

    def _tails(self, train: FeatureSource, means: Tensor, fallback: Tensor) -> Tensor:
        """(C, tail_size): the largest distances to its class mean of each class's samples (the correctly
        classified ones; all of them for ``fallback`` classes), kept as a running top-k over the chunks."""
        num_classes, k = len(means), self.tail_size
        tails = torch.full((num_classes, k), -math.inf, dtype=torch.float64)
        for chunk in train.chunks():
            x, y = chunk.logits.double(), chunk.labels.long()
            keep = (x.argmax(1) == y) | fallback[y]
            x, y = x[keep], y[keep]
            if not len(y):
                continue
            d = self._distances(x, means[y])
            order = torch.argsort(d, descending=True, stable=True)
            order = order[torch.argsort(y[order], stable=True)]  # grouped by class, largest distance first
            ys, ds = y[order], d[order]
            starts = torch.searchsorted(ys, ys, right=False)
            rank = torch.arange(len(ys)) - starts
            top = rank < k
            fresh = torch.full_like(tails, -math.inf)
            fresh[ys[top], rank[top]] = ds[top]
            tails = torch.cat([tails, fresh], 1).topk(k, dim=1).values
        return tails

    # -- score -------------------------------------------------------------------------------------
    def _distances(self, x: Tensor, mu: Tensor) -> Tensor:
        """Distances along the last axis between ``x`` (..., C) and ``mu`` (..., C), broadcast."""
        if self.distance == "euclidean":
            return (x - mu).norm(dim=-1)
        cos = 1 - (x * mu).sum(-1) / (x.norm(dim=-1) * mu.norm(dim=-1)).clamp(min=torch.finfo(torch.float64).tiny)
        return cos if self.distance == "cosine" else self.eu_weight * (x - mu).norm(dim=-1) + cos

    def unknown_probability(self, logits: Tensor) -> Tensor:
        """``P(unknown)`` of the OpenMax softmax over the ``C + 1`` recalibrated logits, float64 (N,)."""
        s = self.state
        x = logits.double()
        top = x.topk(self.alpha, dim=1).indices  # (N, alpha): classes by rank
        rank_weight = (self.alpha - torch.arange(self.alpha, dtype=torch.float64)) / self.alpha
        # one rank at a time: memory of one (N, C) block, not (N, alpha, C)
        d = torch.stack([self._distances(x, s["means"][top[:, r]]) for r in range(self.alpha)], 1)
        w = weibull_score(d, s["scale"][top], s["shape"][top], s["smallest"][top], self.translate) * rank_weight
        x_top = x.gather(1, top)
        revised = x.scatter(1, top, x_top * (1 - w))
        unknown = (x_top * w).sum(1, keepdim=True)
        return torch.exp(unknown[:, 0] - torch.logsumexp(torch.cat([revised, unknown], 1), dim=1))

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return -self.unknown_probability(logits)
