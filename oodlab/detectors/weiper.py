"""WeiPer: weight perturbations of the class projections (Granz, Heurich & Landgraf, NeurIPS 2024).

The head's class projections ``w_c`` are perturbed ``r`` times, each time by a random direction of length
``delta * ||w_c||``, giving a wider "WeiPer space" of ``r * C`` perturbed logits. Two scores read it:

* :class:`WeiPer` (the paper's MSP_W): the maximum softmax probability of every perturbed copy of the head,
  averaged over the ``r`` copies.
* :class:`WeiPerKLD` (the paper's WeiPer+KLD): for each sample, the histogram of its own ``D`` penultimate
  activations and the histogram of its ``r * C`` perturbed logits, each compared by a symmetric KL divergence
  with the mean histogram of the ID training set; ``score = lambda_2 * MSP_W - KLD_z - lambda_1 * KLD_W``.

Official code: github.com/mgranz/weiper at commit 1c27a4f7458570f60091d9c581e7fad6e5e369d1 (an OpenOOD fork;
``Weiper/OpenOOD/openood/postprocessors/weiper_kldiv/utils.py``, ``weiper_kldiv_postprocessor.py``,
``configs/postprocessors/weiper_kldiv.yml``; the leaderboard of zjysteven/OpenOOD links it for WeiPer+KLD).
Written from that code, not copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from typing_extensions import Self

from ..features import FeatureSource
from .base import Detector, register
from ..validate import integer, number

__all__ = ["WeiPer", "WeiPerKLD", "perturbed_head", "bin_edges", "row_counts", "row_histograms", "smooth", "symmetric_kl"]

#: Entries of the perturbed logits one chunk may hold (32 MiB of float32; the bin indices take twice that).
CELLS = 1 << 23


def perturbed_head(weight: Tensor, n_repeats: int, delta: float, seed: int) -> Tensor:
    """``(n_repeats * C, D)`` float32: ``n_repeats`` copies of ``weight`` stacked, row ``c`` of copy ``i`` moved by
    ``delta * ||w_c|| * u``, ``u`` a standard normal ``(C, D)`` draw normalised per row. Draws come one ``(C, D)``
    block per copy from a CPU generator seeded with ``seed``, as the official code draws them (``randn_like``)."""
    g = torch.Generator().manual_seed(int(seed))
    w = weight.detach().float().cpu()
    norms = w.norm(dim=1)[:, None]
    return torch.cat([w + delta * F.normalize(torch.randn(w.shape, generator=g), dim=1) * norms
                      for _ in range(n_repeats)])


def bin_edges(low: Tensor, high: Tensor, n_bins: int) -> Tensor:
    """``n_bins + 1`` float32 edges from ``low`` to ``high + 1e-8``, evenly spaced (the official arithmetic)."""
    low, high = low.float(), high.float()
    steps = torch.arange(n_bins + 1, dtype=torch.float32) / n_bins
    return low + steps * ((high + 1e-8) - low)


def row_counts(values: Tensor, edges: Tensor) -> Tensor:
    """``(N, bins)`` int64 on the CPU: for each row of ``values`` how many of its entries lie in
    ``[edges[k], edges[k+1])``; entries outside ``[edges[0], edges[-1])`` fall in no bin."""
    n = values.shape[0]
    bins = len(edges) - 1
    k = torch.bucketize(values.float().contiguous(), edges.to(values.device), right=True) - 1
    inside = (k >= 0) & (k < bins)
    cell = (torch.arange(n, device=k.device)[:, None] * bins + k)[inside]
    return torch.bincount(cell, minlength=n * bins).view(n, bins).cpu()


def row_histograms(values: Tensor, edges: Tensor) -> Tensor:
    """``(N, bins)`` float64: :func:`row_counts` over the row's number of entries (a row's fractions sum to less
    than one when some of its entries fall outside the edges)."""
    return row_counts(values, edges).double() / values.shape[1]


def smooth(hist: Tensor, size: int) -> Tensor:
    """Moving average of width ``size`` along each row, the ends repeated: the official ``UniformKernel`` (a
    ``Conv1d`` with ``padding="same"``, ``padding_mode="replicate"``: ``(size - 1) // 2`` bins left, the rest right)."""
    left = (size - 1) // 2
    right = size - 1 - left
    padded = torch.cat([hist[:, :1].expand(-1, left), hist, hist[:, -1:].expand(-1, right)], dim=1)
    return padded.unfold(1, size, 1).mean(-1)


def symmetric_kl(p: Tensor, q: Tensor, eps: float) -> Tensor:
    """``KL(p' || q') + KL(q' || p')`` per row of ``q`` (N, bins) against ``p`` (bins,), after adding ``eps`` to
    every bin and renormalising each histogram to sum to one."""
    p = p + eps
    p = p / p.sum()
    q = q + eps
    q = q / q.sum(dim=1, keepdim=True)
    return ((p - q) * (p.log() - q.log())).sum(dim=1)


class _Perturbed(Detector):
    """Shared by both scores: the seeded perturbed head (state ``perturbed``) and its logits."""

    def __init__(self, n_repeats: int, perturbation_distance: float, seed: int) -> None:
        super().__init__()
        self.n_repeats = integer("n_repeats", n_repeats, 1)
        self.perturbation_distance = number("perturbation_distance", perturbation_distance, 0)
        self.seed = integer("seed", seed, 0)

    def _perturb(self) -> None:
        self.state["perturbed"] = perturbed_head(self.weight, self.n_repeats, self.perturbation_distance, self.seed)

    def _rows(self) -> int:
        """Rows per chunk so that one chunk's perturbed logits hold at most :data:`CELLS` entries."""
        return max(1, CELLS // max(self.state["perturbed"].shape[0], self.weight.shape[1]))

    def _head_on(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """The perturbed head's weight and bias (the head's, repeated) on ``device``, float32: moved once per pass."""
        return self.state["perturbed"].to(device), self.bias.float().repeat(self.n_repeats).to(device)

    def _perturbed_logits(self, z: Tensor, head: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``(N, r * C)`` float32 logits of the perturbed head (``head``: :meth:`_head_on`, default on the CPU)."""
        weight, bias = head if head is not None else self._head_on("cpu")
        return F.linear(z.float().to(weight.device), weight, bias)

    def _msp(self, perturbed_logits: Tensor) -> Tensor:
        """MSP_W: the maximum softmax probability of each perturbed copy (float64), averaged over copies."""
        c = self.weight.shape[0]
        probs = torch.softmax(perturbed_logits.double().reshape(-1, self.n_repeats, c), dim=-1)
        return probs.max(dim=-1).values.mean(dim=1)

@register
class WeiPer(_Perturbed):
    """MSP_W: the maximum softmax probability averaged over ``n_repeats`` perturbed copies of the head.

    Each copy moves every class projection ``w_c`` by ``perturbation_distance * ||w_c||`` along its own random
    direction (uniform on the sphere); the bias is kept. The perturbations are drawn once, at fit, from a
    generator seeded with ``seed``, and stored (``perturbed``, ``n_repeats * C`` x ``D`` float32: 820 MB for an
    ImageNet ResNet-50, which the official code holds in memory as well), so scores are reproducible and a saved
    detector scores exactly as it did. Reads only the head (no training features).

    Defaults: ``n_repeats = 100``, ``perturbation_distance = 1.8``: the official repository has no configuration
    of its own for MSP_W, so these are ``postprocessor_args`` of its ``weiper_kldiv.yml`` (its CIFAR-10 values;
    its README lists 2.4 for CIFAR-100 and ImageNet ResNet-50, 2.0 for ImageNet ViT-B/16). Official code:
    mgranz/weiper @ 1c27a4f, ``calculate_weiper_space`` and ``calculate_WeiPerKLDiv_score.calculate_weiper_pred``
    in ``Weiper/OpenOOD/openood/postprocessors/weiper_kldiv/utils.py``.

    Deviations: the official code draws new perturbations every time it is called (once per scored batch, see
    :class:`WeiPerKLD`); oodlab draws them once, at fit, from ``seed``. The softmax is taken in float64 of the
    float32 perturbed logits (official: float32), so saturated probabilities do not tie.
    """

    name = "weiper"
    needs_train = False

    def __init__(self, n_repeats: int = 100, perturbation_distance: float = 1.8, seed: int = 0) -> None:
        super().__init__(n_repeats, perturbation_distance, seed)

    def fit(self, train: FeatureSource | None, head: nn.Linear, *, device: torch.device | str | None = None) -> Self:
        super().fit(train, head, device=device)
        self._perturb()
        return self

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        return self._msp(self._perturbed_logits(z))

    def _score(self, feats: FeatureSource) -> Tensor:
        head = self._head_on("cpu")
        return torch.cat([self._msp(self._perturbed_logits(c.z, head)) for c in feats.chunks(self._rows())])


@register
class WeiPerKLD(_Perturbed):
    """WeiPer+KLD: ``lambda_2 * MSP_W - KLD(z) - lambda_1 * KLD(perturbed logits)``.

    Fit (two streamed passes over ID train): the minimum and maximum over all training samples of every
    activation (``latent_range``) and of every perturbed logit (``weiper_range``); then the mean over training
    samples of each sample's histogram of its ``D`` activations (resp. its ``n_repeats * C`` perturbed logits)
    in ``n_bins`` equal bins spanning that range (``latent_density``, ``weiper_density``). A value outside the
    range, as in the official code, falls in no bin.

    Score: the sample's own two histograms, each smoothed by a moving average (``smoothing`` bins for the
    activations, ``smoothing_perturbed`` for the perturbed logits; the training mean is not smoothed, as in the
    official code), ``eps`` (0.01) resp. ``eps_perturbed`` (0.025) added to every bin of both histograms, both
    renormalised, then the symmetric KL divergence ``KL(p||q) + KL(q||p)`` to the training mean. MSP_W is
    :class:`WeiPer`'s score on the same perturbations. Higher = more ID.

    Defaults: ``postprocessor_args`` of ``weiper_kldiv.yml`` at mgranz/weiper @ 1c27a4f (the CIFAR-10 ResNet-18
    values): r = 100, delta = 1.8, 100 bins, lambda_1 = 2.5, lambda_2 = 0.1, smoothing 4 / 15; ``eps`` and
    ``eps_perturbed`` are the defaults of ``calculate_WeiPerKLDiv_score`` (its ``epsilon`` / ``epsilon_noise``).
    The README's values for other models: CIFAR-100 ResNet-18 delta 2.4, lambda_1 0.1, lambda_2 1, smoothing 4 /
    40; ImageNet ResNet-50 delta 2.4, lambda_1 2.5, lambda_2 0.25, smoothing 40 / 15; ImageNet ViT-B/16 delta 2.0,
    80 bins, lambda_1 2.5, lambda_2 0.1, smoothing 40 / 15.

    Deviations from the official code, each deliberate:

    * One perturbation, drawn at fit from ``seed``, serves the fit and every score. The official postprocessor
      passes its perturbed head as ``W_tilde=``, which ``calculate_WeiPerKLDiv_score`` swallows in ``**params``
      (its argument is ``perturbed_fc``), so every call draws a new one: the min/max pass, each training batch
      of the density pass and each scored batch see different perturbations (its notebook: "produces different
      results each time").
    * The training density is the mean over all training samples; the official code averages per-batch means
      (the last, shorter batch weighs more).
    * Histograms count every value once. The official ``batch_histogram`` splits more than 1,000 values per
      sample into blocks of 1,000 and averages the blocks' fractions, so when the count is not a multiple of
      1,000 (ImageNet ResNet-50's 2,048 activations: blocks of 1,000, 1,000 and 48) the last block's values
      weigh more (there, the last 48 activations carry a third of the histogram).
    * All training samples are used; for ImageNet the official evaluator fits on a class-balanced random
      300,000 of them (``n_samples_for_setup``): pass such a subset to reproduce that.
    * Histograms, smoothing and divergences are float64 (official: float32); the perturbed logits and the bin
      edges are float32 with the official arithmetic, so values fall in the same bins.

    Cost: each pass multiplies every training sample by the ``n_repeats * C`` x ``D`` perturbed head (at ImageNet
    scale 2e8 multiply-adds per sample), on the fit's ``device`` (CUDA when present; its float32 products may
    differ from the CPU's in the last bit, which can move a value that lies on a bin edge); scoring runs on the
    CPU. Chunks hold at most :data:`CELLS` perturbed logits. Not exportable: the per-sample histogram is not
    plain tensor arithmetic.
    """

    name = "weiper-kld"

    def __init__(self, n_repeats: int = 100, perturbation_distance: float = 1.8, n_bins: int = 100,
                 smoothing: int = 4, smoothing_perturbed: int = 15, lambda_1: float = 2.5, lambda_2: float = 0.1,
                 eps: float = 0.01, eps_perturbed: float = 0.025, seed: int = 0) -> None:
        super().__init__(n_repeats, perturbation_distance, seed)
        self.n_bins = integer("n_bins", n_bins, 1)
        self.smoothing = integer("smoothing", smoothing, 1, self.n_bins, hint="a moving average over at most n_bins bins")
        self.smoothing_perturbed = integer("smoothing_perturbed", smoothing_perturbed, 1, self.n_bins,
                                           hint="a moving average over at most n_bins bins")
        self.lambda_1 = number("lambda_1", lambda_1)
        self.lambda_2 = number("lambda_2", lambda_2)
        self.eps = number("eps", eps, 0, low_open=True)
        self.eps_perturbed = number("eps_perturbed", eps_perturbed, 0, low_open=True)

    @property
    def export_refusal(self) -> str | None:
        return "its score histograms each sample's activations (bucketize / bincount), not plain tensor arithmetic"

    def _fit(self, train: FeatureSource) -> None:
        self._perturb()
        device, rows = self.fit_device, self._rows()
        head = self._head_on(device)
        lo = torch.full((2,), float("inf"))
        hi = torch.full((2,), -float("inf"))
        for chunk in train.chunks(rows):
            z = chunk.z.float().to(device)
            lp = self._perturbed_logits(z, head)
            lo = torch.minimum(lo, torch.stack([z.min(), lp.min()]).cpu())
            hi = torch.maximum(hi, torch.stack([z.max(), lp.max()]).cpu())
        self.state["latent_range"] = torch.stack([lo[0], hi[0]])
        self.state["weiper_range"] = torch.stack([lo[1], hi[1]])
        edges_z, edges_w = self._edges()
        counts = torch.zeros(2, self.n_bins, dtype=torch.long)  # exact: the mean of per-sample fractions is a count
        for chunk in train.chunks(rows):
            z = chunk.z.float().to(device)
            counts[0] += row_counts(z, edges_z).sum(0)
            counts[1] += row_counts(self._perturbed_logits(z, head), edges_w).sum(0)
        self.state["latent_density"] = counts[0].double() / (len(train) * train.dim)
        self.state["weiper_density"] = counts[1].double() / (len(train) * self.state["perturbed"].shape[0])

    def _edges(self) -> tuple[Tensor, Tensor]:
        zr, wr = self.state["latent_range"], self.state["weiper_range"]
        return bin_edges(zr[0], zr[1], self.n_bins), bin_edges(wr[0], wr[1], self.n_bins)

    def _score(self, feats: FeatureSource) -> Tensor:
        edges_z, edges_w = self._edges()
        head, out = self._head_on("cpu"), []
        for chunk in feats.chunks(self._rows()):
            z = chunk.z.float()
            lp = self._perturbed_logits(z, head)
            kld_z = symmetric_kl(self.state["latent_density"], smooth(row_histograms(z, edges_z), self.smoothing),
                                 self.eps)
            kld_w = symmetric_kl(self.state["weiper_density"],
                                 smooth(row_histograms(lp, edges_w), self.smoothing_perturbed), self.eps_perturbed)
            out.append(self.lambda_2 * self._msp(lp) - kld_z - self.lambda_1 * kld_w)
        return torch.cat(out)
