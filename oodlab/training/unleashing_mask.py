"""Unleashing Mask (Zhu et al., ICML 2023): give a well-trained model back the better OOD detection
of an intermediate training stage by making it forget the atypical ID samples it memorised last.

1. **Loss constraint** (:func:`estimate_constraint`): with the model in eval mode, zero a random
   3.5% of every conv/linear layer's weights and take the mean cross-entropy over the (augmented)
   ID training set, as the official code does at HEAD. The issue's KL-matched *learned* mask over
   the most typical samples existed only as dead code in early commits and is not implemented.
   The samples whose loss rises most under the mask, relative to their class, are reported as the
   memorised atypical ones (:func:`write_atypical_report`; the class centring is ours).
2. **UM** (``um``): fine-tune every weight with the flooded loss ``|CE - c| + c`` (:func:`flooded`),
   so the training loss cannot go below ``c``; below it the gradient pushes the loss back up.
3. **UMAP** (``umap``): freeze the weights and learn edge-popup masks (keep 0.8 of every conv/linear
   weight tensor, scores ranked by magnitude, straight-through gradients) with the same loss.

Both take ``base=<objective>`` (default ``erm``; ``oe``, ``energy-oe``, ``greg``...) and then flood
only that objective's ID cross-entropy, as the official OE+UM code does.

Official settings: 100 epochs, SGD lr 0.1 cosine, weight decay 1e-4, batch 256 (CIFAR DenseNet).
Flooding is applied to the batch-mean CE, as in the official code. Unlike the official README's
command (whose config makes ``--UM`` a no-op), ours always floods; a test pins that.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .. import distributed
from ..data.base import ImageSet, batches
from ..data.suites import Suite
from ..models.adapter import Classifier
from . import register_objective
from .loop import Objective, TrainConfig, augment

__all__ = ["flooded", "maskable_weights", "top_fraction_mask", "ConstraintEstimate", "estimate_constraint",
           "write_atypical_report", "UnleashingMask", "UnleashingMaskPruning"]

ESTIMATE_KEEP = 0.965  # the official estimate_loss config: prune_rate 0.965 = keep 96.5% of each layer
UMAP_KEEP = 0.8  # the official UMAP configs: prune_rate 0.8 = keep 80% of each layer


def flooded(loss: Tensor, constraint: float, weight: float = 1.0) -> Tensor:
    """``|loss - c| + c``: equals ``loss`` above ``c`` and ``2c - loss`` below, so the gradient flips sign.

    Under ``torchrun`` ``loss`` is this rank's part of the batch loss (``weight`` = its share, e.g. its
    sample count): the sign comes from the whole batch's loss (the weighted mean over ranks), so the
    ranks' averaged gradient is the single-process one, not an average of per-rank floods.
    """
    if distributed.world_size() == 1:
        return (loss - constraint).abs() + constraint
    total, weights = distributed.all_reduce_sum(torch.stack([loss.detach().double() * weight,
                                                             torch.tensor(float(weight), dtype=torch.float64,
                                                                          device=loss.device)]))
    sign = 1.0 if float(total / weights) >= constraint else -1.0
    return sign * (loss - constraint) + constraint


def maskable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every conv and linear layer (the head included), by parameter name."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def _check_keep(keep: float, what: str) -> None:
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"{what} is the fraction of weights kept and must be in (0, 1], got {keep}")


def top_fraction_mask(scores: Tensor, keep: float) -> Tensor:
    """A 0/1 mask shaped like ``scores`` that keeps the ``round(keep * n)`` (at least one) largest scores."""
    _check_keep(keep, "keep")
    flat = scores.detach().flatten()
    n_keep = max(1, round(keep * flat.numel()))
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat, n_keep, sorted=False).indices] = 1.0
    return mask.view_as(scores)


@dataclass(frozen=True)
class ConstraintEstimate:
    """The estimated loss constraint and what the random mask did to each training sample."""

    constraint: float  # mean CE of the randomly masked model: the flooding level
    full_loss: float  # mean CE of the unmasked model on the same inputs
    loss_rise: Tensor  # (N,) masked CE - full CE per training sample, in data-set order
    labels: Tensor  # (N,) their labels
    keep: float

    def atypicality(self) -> Tensor:
        """Each sample's loss rise minus the mean rise of its class.

        One random mask shifts whole classes (it may hit one class's head row), so raw rises would
        list mostly one class; centring per class keeps the samples that are fragile for their class.
        """
        sums = torch.zeros(int(self.labels.max()) + 1, dtype=torch.float64).index_add_(0, self.labels, self.loss_rise.double())
        counts = torch.bincount(self.labels, minlength=len(sums)).clamp(min=1)
        return self.loss_rise.double() - (sums / counts)[self.labels]

    def atypical(self, k: int) -> Tensor:
        """Indices of the ``k`` most atypical samples (largest :meth:`atypicality` first)."""
        return torch.topk(self.atypicality(), min(k, len(self.loss_rise))).indices


@torch.no_grad()
def estimate_constraint(model: Classifier, data: ImageSet, keep: float = ESTIMATE_KEEP, augmented: bool = True,
                        seed: int = 0, batch_size: int = 512,
                        device: torch.device | str | None = None) -> ConstraintEstimate:
    """Mean training CE of ``model`` with a random ``1 - keep`` of each conv/linear weight zeroed (eval mode).

    ``augmented`` applies the training augmentation (flips and shifts, seeded), as the official code
    averages over its augmented training loader.
    """
    _check_keep(keep, "keep")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    masked = {name: w * top_fraction_mask(torch.rand(w.shape, generator=gen), keep).to(w.device)
              for name, w in maskable_weights(model).items()}
    was_training = model.training
    model.eval()
    # under torchrun each rank takes a contiguous block of the batches; every rank draws every batch's
    # augmentation (so its generator stays in step with a single process) and the sums are added up
    n_batches = (len(data) + batch_size - 1) // batch_size
    mine = distributed.block(n_batches)
    stop = min(mine.stop * batch_size, len(data))
    loader = iter(batches(data, batch_size, start=mine.start * batch_size, stop=stop)) if len(mine) else iter(())
    full_sum, masked_sum, rises, labels = 0.0, 0.0, [torch.zeros(0)], [torch.zeros(0, dtype=torch.long)]
    try:
        for b in range(n_batches):
            if b not in mine:
                if augmented:
                    size = min(batch_size, len(data) - b * batch_size)
                    augment(torch.zeros(size, 1, 1, 1), gen)  # the draws this batch takes
                continue
            x, y = next(loader)
            labels.append(y.long())
            if augmented:
                x = augment(x, gen)
            x, y = x.to(device), y.to(device)
            ce_full = F.cross_entropy(model(x), y, reduction="none")
            ce_masked = F.cross_entropy(functional_call(model, masked, (x,)), y, reduction="none")
            full_sum += float(ce_full.double().sum())
            masked_sum += float(ce_masked.double().sum())
            rises.append((ce_masked - ce_full).cpu())
    finally:
        model.train(was_training)
    full_sum, masked_sum = distributed.all_reduce_sum(torch.tensor([full_sum, masked_sum], dtype=torch.float64)).tolist()
    n = max(len(data), 1)
    return ConstraintEstimate(masked_sum / n, full_sum / n, distributed.all_gather_cat(torch.cat(rises)),
                              distributed.all_gather_cat(torch.cat(labels)), keep)


def write_atypical_report(estimate: ConstraintEstimate, data: ImageSet, out_dir: str | Path, k: int = 64) -> Path:
    """Write ``atypical.json`` (constraint, the ``k`` most atypical samples' indices, labels, loss rises) and
    ``atypical.png`` (a grid of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    idx = estimate.atypical(k).tolist()
    items = [data.dataset[i] for i in idx]
    (out / "atypical.json").write_text(json.dumps({
        "constraint": estimate.constraint, "full_loss": estimate.full_loss, "keep": estimate.keep,
        "data": data.name, "indices": idx, "labels": [int(y) for _, y in items],
        "loss_rise": [round(float(estimate.loss_rise[i]), 5) for i in idx],
        "atypicality": [round(float(a), 5) for a in estimate.atypicality()[idx]]}, indent=1))
    cols, pad = 8, 2
    h, w = items[0][0].shape[-2:]
    grid = make_grid(torch.stack([img for img, _ in items]), nrow=cols, padding=pad, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(cols * 1.1, max(1, math.ceil(len(items) / cols)) * 1.2 + 0.4))
    ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy())  # make_grid gives 3 channels
    ax.axis("off")
    for n, (i, (_, label)) in enumerate(zip(idx, items)):
        r, c = divmod(n, cols)
        ax.text(pad + c * (w + pad), pad + r * (h + pad), f"#{i} y={int(label)}", fontsize=5, color="yellow", va="top")
    ax.set_title(f"{data.name}: the {len(items)} samples whose CE rises most (relative to their class) under a "
                 f"random {100 * (1 - estimate.keep):.1f}% weight mask", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "atypical.png", dpi=110)
    plt.close(fig)
    return out / "atypical.png"


class UnleashingMask(Objective):
    """UM: fine-tune all weights with the ID cross-entropy flooded at ``c``; ``c`` is given or estimated.

    ``base`` is the objective being fine-tuned (plain CE by default, or Outlier Exposure, Energy-OE,
    GReg...). As in the official OE+UM code only its ID cross-entropy is flooded: the loss is
    ``base_loss - CE + |CE - c| + c``, where CE is recomputed from the first gradient-carrying head
    output of the step (the ID rows come first, as every oodlab objective concatenates ID then
    outliers). A base whose loss is not ``CE + non-negative terms`` is refused at the first step.
    """

    name = "um"

    def __init__(self, train_set: ImageSet, base: Objective, constraint: float | None = None,
                 estimate_keep: float = ESTIMATE_KEEP, augmented: bool = True, seed: int = 0,
                 batch_size: int = 512) -> None:
        if constraint is not None and constraint < 0:
            raise ValueError(f"the loss constraint is a cross-entropy level and must be >= 0, got {constraint}")
        if isinstance(base, UnleashingMask):
            raise ValueError("the base objective of Unleashing Mask cannot itself be um/umap")
        _check_keep(estimate_keep, "estimate_keep")
        self.train_set, self.base = train_set, base
        self.constraint = constraint
        self.estimated = constraint is None
        self.estimate_keep = estimate_keep
        self.augmented, self.seed, self.batch_size = augmented, seed, batch_size

    def begin(self, model: Classifier, run_dir: Path) -> None:
        self.base.begin(model, run_dir)
        if not self.estimated:
            return
        est = estimate_constraint(model, self.train_set, self.estimate_keep, self.augmented, self.seed, self.batch_size)
        if est.constraint >= math.log(model.num_classes):
            raise ValueError(f"the estimated loss constraint {est.constraint:.3f} is at or above chance level "
                             f"(ln {model.num_classes} = {math.log(model.num_classes):.3f}): the model looks "
                             "untrained. Start from a trained model (--from CHECKPOINT) or give --constraint")
        self.constraint = est.constraint
        if distributed.is_main():
            write_atypical_report(est, self.train_set, run_dir)

    def start_epoch(self, model: Classifier, epoch: int, device: torch.device) -> None:
        self.base.start_epoch(model, epoch, device)

    def parameters(self, model: Classifier) -> list[nn.Parameter]:
        return self.base.parameters(model)

    def _constraint(self) -> float:
        if self.constraint is None:
            raise RuntimeError("the loss constraint is estimated in begin(); train() calls it before the first step")
        return self.constraint

    def flooded_loss(self, model: Classifier, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The base objective's loss with its ID cross-entropy flooded at the constraint."""
        heads: list[Tensor] = []

        def grab(_module: nn.Module, _inputs: Any, out: Tensor) -> None:
            if out.requires_grad and not heads:
                heads.append(out)

        handle = model.head.register_forward_hook(grab)
        try:
            loss, logs = self.base.loss(model, x, y)
        finally:
            handle.remove()
        if not heads or len(heads[0]) < len(y):
            raise RuntimeError(f"the base objective {self.base.name!r} produced no logits for the ID batch")
        ce = F.cross_entropy(heads[0][: len(y)], y)
        rest = loss - ce
        if float(rest.detach()) < -1e-4 * max(1.0, float(loss.detach())):
            raise RuntimeError(f"the loss of {self.base.name!r} is not CE on the ID batch plus non-negative terms; "
                               "Unleashing Mask cannot flood its cross-entropy")
        return rest + flooded(ce, self._constraint(), len(y)), logs

    def loss(self, model: Classifier, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        return self.flooded_loss(model, x, y)

    def config(self) -> dict[str, Any]:
        return {"constraint": self.constraint, "estimated": self.estimated, "estimate_keep": self.estimate_keep,
                "base": self.base.name, "base_config": self.base.config()}

    def state_dict(self) -> dict[str, Tensor]:
        return {"constraint": torch.tensor(self._constraint(), dtype=torch.float64),
                **{f"base/{k}": v for k, v in self.base.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        saved = float(state["constraint"])
        if not math.isclose(saved, self._constraint(), rel_tol=1e-6, abs_tol=1e-9):
            raise ValueError(f"this run folder was trained with loss constraint {saved:.6f}, not "
                             f"{self._constraint():.6f}; use a new --out folder to change it")
        self.base.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("base/")})


class _Step(nn.Module):
    """Calls ``fn(model, x, y)``; lets ``functional_call`` run a whole loss with substituted weights."""

    def __init__(self, model: Classifier, fn: Any) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        return self.fn(self.model, x, y)


class UnleashingMaskPruning(UnleashingMask):
    """UMAP: weights frozen; learn per-layer edge-popup scores whose top ``keep`` fraction forms the mask.

    The model's own weights always hold ``weight * mask`` of the current scores (refreshed at each
    step, so a checkpoint holds the mask of its epoch's last step): checkpoints are plain
    classifiers that load with ``load_checkpoint``. The scores and the unmasked weights live here.
    BatchNorm is not masked; its affine parameters stay frozen and its running statistics follow the
    masked network, as in the official code (which uses non-affine BatchNorm).
    ``score_init="kaiming"`` starts the scores as the official code does, from Kaiming-uniform noise,
    so the first mask is a random 80%; ``"magnitude"`` (ours) starts from ``|weight|``, so the first
    mask is magnitude pruning and short runs start from a working network.
    """

    name = "umap"

    def __init__(self, train_set: ImageSet, base: Objective, constraint: float | None = None, keep: float = UMAP_KEEP,
                 score_init: str = "kaiming", estimate_keep: float = ESTIMATE_KEEP, augmented: bool = True,
                 seed: int = 0, batch_size: int = 512) -> None:
        super().__init__(train_set, base, constraint, estimate_keep, augmented, seed, batch_size)
        _check_keep(keep, "keep")
        if score_init not in ("kaiming", "magnitude"):
            raise ValueError(f"score_init must be 'kaiming' (official) or 'magnitude', got {score_init!r}")
        self.keep, self.score_init = keep, score_init
        self.weights: dict[str, Tensor] = {}
        self.scores: dict[str, nn.Parameter] = {}

    def begin(self, model: Classifier, run_dir: Path) -> None:
        super().begin(model, run_dir)
        gen = torch.Generator().manual_seed(self.seed)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, w in maskable_weights(model).items():
            self.weights[name] = w.detach().clone()
            if self.score_init == "magnitude":
                scores = w.detach().abs().clone()
            else:  # kaiming_uniform_(a=sqrt(5)) as the official SubnetConv: U(-b, b), b = 1/sqrt(fan_in)
                scores = ((torch.rand(w.shape, generator=gen) * 2 - 1) / math.sqrt(w[0].numel())).to(w.device)
            self.scores[name] = nn.Parameter(scores)
        self._step = _Step(model, self.flooded_loss)
        self._apply_masks(model, self.masks())

    def parameters(self, model: Classifier) -> list[nn.Parameter]:
        return list(self.scores.values())

    def masks(self) -> dict[str, Tensor]:
        """The current 0/1 mask of every masked weight."""
        return {n: top_fraction_mask(s.abs(), self.keep) for n, s in self.scores.items()}

    @torch.no_grad()
    def _apply_masks(self, model: Classifier, masks: dict[str, Tensor]) -> None:
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            params[name].copy_(self.weights[name] * mask)

    def loss(self, model: Classifier, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        masks = self.masks()
        self._apply_masks(model, masks)
        masked = {}
        for name, s in self.scores.items():
            magnitude = s.abs()  # straight-through: the forward sees the 0/1 mask, the gradient flows to |s|
            masked[f"model.{name}"] = self.weights[name] * (masks[name] + magnitude - magnitude.detach())
        return functional_call(self._step, masked, (x, y))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "keep": self.keep, "score_init": self.score_init}

    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), **{f"scores/{n}": s.detach() for n, s in self.scores.items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for name, s in self.scores.items():
                s.copy_(state[f"scores/{name}"])


def _setup(model: Classifier, suite: Suite, config: TrainConfig, options: dict[str, Any]) -> dict[str, Any]:
    """Split ``options`` into ours and the base objective's, and build the base objective."""
    from . import OBJECTIVES, create_objective

    ours = {k: options.pop(k) for k in ("constraint", "estimate_keep", "keep", "score_init") if k in options}
    base = options.pop("base", "erm")
    if base not in OBJECTIVES:
        raise ValueError(f"unknown base objective {base!r} for Unleashing Mask; use one of "
                         f"{', '.join(sorted(set(OBJECTIVES) - {'um', 'umap'}))}")
    return {**ours, "base": create_objective(base, options, model=model, suite=suite, config=config),
            "augmented": config.augment, "seed": config.seed, "batch_size": config.eval_batch_size}


@register_objective("um")
def _um(*, model: Classifier, suite: Suite, config: TrainConfig, **options: Any) -> UnleashingMask:
    if "keep" in options or "score_init" in options:
        raise ValueError("'keep' and 'score_init' set UMAP's mask; UM fine-tunes every weight (see `--method umap`)")
    return UnleashingMask(suite.id_train, **_setup(model, suite, config, options))


@register_objective("umap")
def _umap(*, model: Classifier, suite: Suite, config: TrainConfig, **options: Any) -> UnleashingMaskPruning:
    return UnleashingMaskPruning(suite.id_train, **_setup(model, suite, config, options))
