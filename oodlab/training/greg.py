"""GReg and GReg+ (Sharifi et al., ECCV 2024, "Gradient-Regularized Out-of-Distribution Detection").

``L = CE + lambda_s * L_S + lambda_grad * L_gradS``: L_S is the Energy-OE hinge loss; L_gradS is the
input-gradient norm of the energy, counted only for samples already detected correctly (ID with
E < m_in, outliers with E > m_out), through double back-propagation. GReg+ adds energy-based
sampling of the outliers (:func:`energy_based_sampling`).

Details follow the official code (o4lc/Greg-OOD, ``train_sea.py``):
- the penalised function is ``sum_i w_i E(x_i)`` with ``w_i = 1/n_group`` for correctly detected
  samples and 0 otherwise (the gradient of its hinge form), and L_gradS is the batch mean of the
  per-sample L2 norms of its input gradient;
- that gradient is taken w.r.t. the network's *normalised* input, as in the official CIFAR code:
  oodlab models normalise inside, so the pixel-space gradient is scaled by the per-channel std;
- margins: GReg's own code uses m_in = -25, m_out = -7 on CIFAR-10 (not Energy-OE's -23 / -5); the
  28x28 suites use the pair measured for oodlab's default model (see
  :func:`~oodlab.training.outlier_exposure.default_margins`);
- GReg draws as many outliers as ID images. GReg+ draws, every iteration, a pool of
  ``B * N_aux / N_ID`` candidates (the official ``size_candidate_ood / len(train_set_id) * batch_size``,
  384 at B = 64 with 300K auxiliary images and CIFAR's 50K), so each auxiliary image is a candidate
  about once per epoch; like the official code, at most 300,000 auxiliary images count per epoch
  (``size_candidate_ood``). It clusters the candidates' L2-normalised features into
  K = min(64, B) clusters, takes from each the B/K lowest- and the B/K highest-energy members, and
  trains on their union, topped up at random to 2B (``--sampleTwoWay``, as in the official CIFAR
  script). Both groups enter both terms, as in the official code: the hinge acts only on outliers
  with E < m_out (the low-energy picks) and the gradient term only on those with E > m_out (the
  high-energy picks). The official script clusters every candidate (``--spt 0 --ept 10000``);
- GReg+ trains with Adam without weight decay by default, as the official clustered CIFAR runs
  (``train_sea.py`` builds Adam unless ``--noCluster``; its script uses lr 0.1); GReg keeps the loop's
  SGD (the paper's fine-tune: SGD, momentum 0.9). A ``--optimizer`` / ``--weight-decay`` given to
  ``oodlab train`` overrides either.
Deviations: the official code also counts the small gradient that reaches a not-yet-detected
sample through batch-norm statistics; here those samples contribute exactly zero, as the paper
defines L_gradS. With fewer than 4 auxiliary images per ID training image the formula's pool is
too small to choose from (below 2B the official code cannot fill its 2B outliers at all), so the pool
is floored at 4B (and capped at the auxiliary set's size): images then recur within an epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed
from ..data.auxiliary import aux_source
from ..data.base import ImageSet
from ..data.suites import Suite
from ..models.adapter import Classifier
from . import register_objective
from .loop import TrainConfig
from .outlier_exposure import AuxObjective, default_margins, energy_hinge_loss

__all__ = ["energy_gradient_norms", "energy_based_sampling", "GReg", "GRegPlus"]


def energy_gradient_norms(x: Tensor, energies: Tensor, is_outlier: Tensor, m_in: float, m_out: float,
                          input_std: Tensor | None = None, create_graph: bool = True) -> Tensor:
    """Per-sample ``||d h / d x_i||`` with ``h = sum_i w_i E_i``, zero for samples not detected correctly.

    ``energies`` (N,) must be computed from ``x`` (N, ...) in the current graph; ``w_i`` is
    ``1/n_in`` for ID samples with ``E < m_in``, ``1/n_out`` for outliers with ``E > m_out``, else 0.
    ``input_std`` (broadcastable to x) turns the gradient w.r.t. x into one w.r.t. ``(x - mean) / std``.
    With ``create_graph`` the result can be back-propagated (double back-propagation).
    """
    if energies.shape != (x.shape[0],) or is_outlier.shape != energies.shape:
        raise ValueError(f"energies and is_outlier must have shape ({x.shape[0]},), got "
                         f"{tuple(energies.shape)} and {tuple(is_outlier.shape)}")
    detected = torch.where(is_outlier, energies > m_out, energies < m_in).detach()
    # group sizes of the whole (global) batch: under torchrun each rank holds a part of it
    n_out, n_in = distributed.all_reduce_sum(torch.stack([is_outlier.sum(), (~is_outlier).sum()]))
    group_size = torch.where(is_outlier, n_out, n_in).clamp(min=1)
    weight = detected.to(energies.dtype) / group_size
    (grad,) = torch.autograd.grad((weight * energies).sum(), x, create_graph=create_graph)
    if input_std is not None:
        grad = grad * input_std
    return grad.flatten(1).norm(dim=1) * detected


def energy_based_sampling(features: Tensor, energies: Tensor, k: int, seed: int = 0, n_init: int = 3,
                          per_cluster: int = 1) -> tuple[Tensor, Tensor]:
    """GReg+ sampling: k-means (faiss) on L2-normalised ``features``, then per cluster the ``per_cluster``
    members with the lowest and the ``per_cluster`` with the highest energy. Returns two
    ``(k * per_cluster,)`` index tensors ``(lowest, highest)``, cluster by cluster.

    A cluster with fewer than ``per_cluster`` members gives all of them to both lists; the slots left
    over (also those of a cluster k-means left empty) are filled with random candidates not yet
    chosen, so both results always hold exactly ``k * per_cluster`` indices.
    """
    import faiss

    n = features.shape[0]
    if k < 1 or per_cluster < 1 or 2 * k * per_cluster > n or energies.shape != (n,):
        raise ValueError(f"need k >= 1, per_cluster >= 1, 2 * k * per_cluster <= number of candidates ({n}) and "
                         f"one energy per candidate; got k={k}, per_cluster={per_cluster}, "
                         f"energies {tuple(energies.shape)}")
    if not (torch.isfinite(features).all() and torch.isfinite(energies).all()):
        raise ValueError("non-finite features or energies: training diverged; lower --lr, or pick margins "
                         "m_in/m_out near the model's energies (see default_margins)")
    z = np.ascontiguousarray(F.normalize(features.detach().float().cpu(), dim=1).numpy())
    kmeans = faiss.Kmeans(z.shape[1], k, niter=20, nredo=n_init, seed=seed, min_points_per_centroid=1,
                          max_points_per_centroid=max(256, n), verbose=False)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # a few hundred points: one thread is ~100x faster than 2 on a busy CPU
    try:
        kmeans.train(z)
        labels = torch.from_numpy(kmeans.index.search(z, 1)[1][:, 0].astype(np.int64))
    finally:
        faiss.omp_set_num_threads(threads)
    e = energies.detach().cpu()
    low, high = [], []
    for c in range(k):
        members = torch.nonzero(labels == c).flatten()
        ranked = members[torch.argsort(e[members], stable=True)].tolist()  # ascending energy
        low += ranked[:per_cluster]
        high += ranked[::-1][:per_cluster]
    size = k * per_cluster
    if len(low) < size:
        taken = set(low) | set(high)
        rest = [i for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if i not in taken]
        missing = size - len(low)
        low += rest[:missing]
        high += rest[missing : 2 * missing]
    return torch.tensor(low), torch.tensor(high)


class GReg(AuxObjective):
    """``CE + lambda_s * energy hinge + lambda_grad * mean gradient norm`` (defaults 0.1 and 1)."""

    name = "greg"

    def __init__(self, aux: ImageSet, config: TrainConfig, m_in: float, m_out: float, lambda_s: float = 0.1,
                 lambda_grad: float = 1.0, aux_ratio: float = 1.0) -> None:
        if lambda_s < 0 or lambda_grad < 0 or m_in >= m_out:
            raise ValueError(f"need lambda_s, lambda_grad >= 0 and m_in < m_out; got lambda_s={lambda_s}, "
                             f"lambda_grad={lambda_grad}, m_in={m_in}, m_out={m_out}")
        if aux_ratio <= 0:
            raise ValueError(f"aux_ratio (outliers per ID image in a step) must be > 0, got {aux_ratio}")
        super().__init__(aux, config, self._aux_batch(config, aux_ratio))
        self.m_in, self.m_out, self.lambda_s, self.lambda_grad = m_in, m_out, lambda_s, lambda_grad

    def _aux_batch(self, config: TrainConfig, aux_ratio: float) -> int:
        return max(1, round(aux_ratio * config.batch_size))

    def draw_outliers(self, model: Classifier, device: torch.device) -> Tensor:
        """The outlier batch of this step (GReg: a random one)."""
        return self.outliers.next()

    def loss(self, model: Classifier, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        x_out = self.draw_outliers(model, x.device).to(x.device, non_blocking=True)
        inputs = torch.cat([x, x_out]).detach().requires_grad_(True)
        logits = model(inputs)
        logits_in, logits_out = logits[: len(x)], logits[len(x) :]
        is_outlier = torch.arange(len(inputs), device=x.device) >= len(x)
        norms = energy_gradient_norms(inputs, -torch.logsumexp(logits, dim=1), is_outlier, self.m_in, self.m_out,
                                      model.std)
        hinge = energy_hinge_loss(logits_in, logits_out, self.m_in, self.m_out)
        loss = F.cross_entropy(logits_in, y) + self.lambda_s * hinge + self.lambda_grad * norms.mean()
        return loss, {"correct": float((logits_in.argmax(1) == y).sum())}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "m_in": self.m_in, "m_out": self.m_out, "lambda_s": self.lambda_s,
                "lambda_grad": self.lambda_grad}


@torch.no_grad()
def _score_pool(model: Classifier, images: Tensor, device: torch.device, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """Features and energies of ``images`` in eval mode (as the official code scores its candidates).

    Under ``torchrun`` each rank scores its contiguous block of ``images`` and the blocks are gathered,
    so every rank holds the whole pool's values (the weights are the same on every rank, and eval mode
    scores each image on its own) and clusters and picks exactly as a single process would."""
    was = model.training
    model.eval()
    mine = distributed.block(len(images))
    zs, es = [torch.zeros(0, model.head.in_features)], [torch.zeros(0)]
    for i in range(mine.start, mine.stop, chunk):
        z = model.features(images[i : min(i + chunk, mine.stop)].to(device))
        zs.append(z.float().cpu())
        es.append(-torch.logsumexp(model.head(z).float(), dim=1).cpu())
    model.train(was)
    return distributed.all_gather_cat(torch.cat(zs)), distributed.all_gather_cat(torch.cat(es))


class GRegPlus(GReg):
    """GReg with energy-based sampling of the outliers, re-done every iteration as in the official code.

    Every step scores a pool of candidates (``pool_factor * B`` when given, else the official
    ``B * N_aux / N_ID``, see the module docstring), clusters them into ``clusters`` (default
    min(64, B)) and trains on the B/K lowest- and B/K highest-energy members of each cluster, 2B
    outliers in all. By default the loop trains it with Adam without weight decay (the official
    clustered CIFAR runs; :attr:`train_defaults`).

    ``refresh="epoch"`` is a cheaper variant: features and energies of ``epoch_pool`` auxiliary
    images (default: all) are computed once at the start of each epoch and each iteration clusters
    a random pool of them with those (up to one epoch stale) values.
    """

    name = "greg+"
    train_defaults = {"optimizer": "adam", "weight_decay": 0.0}
    MAX_CLUSTERS = 64  # the official --num_cluster, capped at the batch size
    AUX_PER_EPOCH = 300_000  # the official --size_candidate_ood: auxiliary images that count per epoch
    MIN_POOL_FACTOR = 4  # floor of the pool, in ID batches (see the module docstring)

    def __init__(self, aux: ImageSet, config: TrainConfig, m_in: float, m_out: float, lambda_s: float = 0.1,
                 lambda_grad: float = 1.0, pool_factor: float | None = None, clusters: int | None = None,
                 n_init: int = 3, refresh: str = "iteration", epoch_pool: int | None = None,
                 n_id: int | None = None) -> None:
        batch = config.batch_size
        if pool_factor is None and (n_id is None or n_id < 1):
            raise ValueError("GReg+ sizes its candidate pool as batch * N_aux / N_ID: pass n_id (the number of ID "
                             "training images) or pool_factor")
        self.clusters = clusters or min(self.MAX_CLUSTERS, batch)
        self.pool = self.pool_size(batch, len(aux), n_id, pool_factor)
        if (refresh not in ("iteration", "epoch") or not 1 <= self.clusters <= batch or n_init < 1
                or self.pool < 2 * batch or (epoch_pool is not None and epoch_pool < self.pool)):
            raise ValueError(f"need refresh 'iteration' or 'epoch', 1 <= clusters <= batch size ({batch}), a pool of "
                             f"at least 2 * batch size candidates, epoch_pool >= pool and n_init >= 1; got "
                             f"refresh={refresh!r}, clusters={self.clusters}, pool={self.pool} (auxiliary set: "
                             f"{len(aux)} images), epoch_pool={epoch_pool}, n_init={n_init}")
        self.per_cluster = batch // self.clusters  # the official int(B / K)
        self.n_outliers = 2 * batch  # outliers per step (the official 2B with --sampleTwoWay)
        self.pool_factor, self.n_id, self.n_init, self.refresh, self.epoch_pool = (pool_factor, n_id, n_init,
                                                                                    refresh, epoch_pool)
        super().__init__(aux, config, m_in, m_out, lambda_s, lambda_grad, aux_ratio=self.pool / batch)
        self._epoch_index = self._epoch_z = self._epoch_e = None

    @classmethod
    def pool_size(cls, batch: int, n_aux: int, n_id: int | None, pool_factor: float | None = None) -> int:
        """Candidates per step: ``round(pool_factor * batch)``, else ``int(batch * min(n_aux, 300K) / n_id)``
        floored at 4 batches; never more than the auxiliary set holds."""
        if pool_factor is not None:
            pool = round(pool_factor * batch)
        else:
            pool = max(int(min(n_aux, cls.AUX_PER_EPOCH) / n_id * batch), cls.MIN_POOL_FACTOR * batch)
        return min(pool, n_aux)

    def _aux_batch(self, config: TrainConfig, aux_ratio: float) -> int:
        return self.pool

    def start_epoch(self, model: Classifier, epoch: int, device: torch.device) -> None:
        super().start_epoch(model, epoch, device)
        if self.refresh == "epoch":
            n = min(self.epoch_pool or len(self.aux), len(self.aux))
            self._epoch_index = torch.randperm(len(self.aux), generator=self.outliers.generator)[:n]
            parts = [_score_pool(model, self.outliers.take(self._epoch_index[i : i + 4096]), device)
                     for i in range(0, n, 4096)]
            self._epoch_z, self._epoch_e = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def draw_outliers(self, model: Classifier, device: torch.device) -> Tensor:
        gen = self.outliers.generator
        if self.refresh == "iteration":
            pool = self.outliers.next(whole=True)
            z, e = _score_pool(model, pool, device)
        else:
            pick = torch.randperm(len(self._epoch_index), generator=gen)[: self.outliers.batch_size]
            pool = self.outliers.augmented(self.outliers.take(self._epoch_index[pick]))
            z, e = self._epoch_z[pick], self._epoch_e[pick]
        low, high = energy_based_sampling(z, e, self.clusters, int(torch.randint(2**31 - 1, (1,), generator=gen)),
                                          self.n_init, self.per_cluster)
        chosen = torch.unique(torch.cat([low, high]))
        size = self.n_outliers
        if len(chosen) < size:  # small clusters (or K not dividing B) gave fewer: top up at random, as official
            others = torch.ones(len(pool), dtype=torch.bool)
            others[chosen] = False
            extra = torch.nonzero(others).flatten()
            extra = extra[torch.randperm(len(extra), generator=gen)[: size - len(chosen)]]
            chosen = torch.cat([chosen, extra])
        mine = distributed.block(len(chosen))  # every rank chose the same outliers; each trains on its block
        return pool[chosen[mine.start:mine.stop]]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "pool_factor": self.pool_factor, "pool": self.pool, "n_id": self.n_id,
                "clusters": self.clusters, "per_cluster": self.per_cluster, "n_init": self.n_init,
                "refresh": self.refresh, "epoch_pool": self.epoch_pool}


@register_objective("greg")
def _greg(*, model: Classifier, suite: Suite, config: TrainConfig, aux: str | ImageSet | None = None,
          lambda_s: float = 0.1, lambda_grad: float = 1.0, m_in: float | None = None, m_out: float | None = None,
          aux_ratio: float = 1.0) -> GReg:
    d_in, d_out = default_margins(suite, "greg")
    return GReg(aux_source(aux, suite), config, d_in if m_in is None else m_in, d_out if m_out is None else m_out,
                lambda_s, lambda_grad, aux_ratio)


@register_objective("greg+")
def _greg_plus(*, model: Classifier, suite: Suite, config: TrainConfig, aux: str | ImageSet | None = None,
               lambda_s: float = 0.1, lambda_grad: float = 1.0, m_in: float | None = None,
               m_out: float | None = None, pool_factor: float | None = None, clusters: int | None = None,
               n_init: int = 3, refresh: str = "iteration", epoch_pool: int | None = None) -> GRegPlus:
    d_in, d_out = default_margins(suite, "greg+")
    return GRegPlus(aux_source(aux, suite), config, d_in if m_in is None else m_in,
                    d_out if m_out is None else m_out, lambda_s, lambda_grad, pool_factor=pool_factor,
                    clusters=clusters, n_init=n_init, refresh=refresh, epoch_pool=epoch_pool,
                    n_id=len(suite.id_train))
