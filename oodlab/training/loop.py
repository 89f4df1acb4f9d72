"""The shared training loop: seeded, a checkpoint every epoch, resumable, with a progress bar.

A run folder holds ``epoch-NNN.safetensors/.json`` (weights + metadata after each epoch),
``last.safetensors/.json`` (the newest), ``train_state.pt`` (optimizer, schedule and RNG state,
tensors only, read with ``weights_only=True``) and ``history.jsonl`` (one row of metrics per
epoch). Re-running the same command on the same folder resumes after the last finished epoch.
Runs are deterministic for a given device and CPU thread count (both recorded in the metadata as
``compute``); a resume under another one continues correctly but not bit-for-bit, and warns.

What is optimised comes from an :class:`Objective` (plain cross-entropy, Outlier Exposure, GReg,
Unleashing Mask...), so every method shares this one loop.
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from .. import distributed
from ..data.base import ArrayDataset, ImageSet, batches
from ..models.adapter import Classifier, inference_input
from ..models.zoo import save_checkpoint
from ..runtime import append_whole, atomic_path, atomic_write_text, default_device, progress, seed_everything
from ..validate import choice, flag, integer, number

__all__ = ["TrainConfig", "Objective", "train", "resolve_config", "evaluate_accuracy", "augment", "shuffled_batches",
           "EpochHook"]


@dataclass
class TrainConfig:
    """Optimisation settings (SGD with momentum and a per-step cosine schedule by default).

    ``optimizer`` and ``weight_decay`` left as None take the objective's defaults
    (:attr:`Objective.train_defaults`, e.g. GReg+'s Adam), else SGD with weight decay 5e-4; :func:`train`
    fills them in (:func:`resolve_config`) before building the optimiser and records the filled values.
    """

    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float | None = None  # None: the objective's default, else 5e-4
    schedule: str = "cosine"  # "cosine" or "constant"
    optimizer: str | None = None  # "sgd" or "adam"; None: the objective's default, else "sgd"
    augment: bool = True  # random 2-pixel shifts + horizontal flips
    seed: int = 0
    eval_batch_size: int = 512
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in metadata (method settings)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            setattr(self, name, integer(name, getattr(self, name), 1))
        self.seed = integer("seed", self.seed, 0)
        number("lr", self.lr, 0.0, low_open=True)
        number("momentum", self.momentum, 0.0, 1.0, high_open=True)
        if self.weight_decay is not None:  # None: the method's default (see resolve_config)
            number("weight_decay", self.weight_decay, 0.0)
        choice("schedule", self.schedule, ("cosine", "constant"))
        if self.optimizer is not None:
            choice("optimizer", self.optimizer, ("sgd", "adam"))
        flag("augment", self.augment)
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict of method settings, got {type(self.extra).__name__}")


class Objective(ABC):
    """What a training step minimises. ``loss`` returns the scalar loss and numbers to log."""

    name: ClassVar[str]
    #: Optimiser settings this method trains with when the :class:`TrainConfig` leaves them None
    #: (keys ``optimizer``, ``weight_decay``); the loop's own are SGD with weight decay 5e-4.
    train_defaults: ClassVar[dict[str, Any]] = {}

    def start_epoch(self, model: Classifier, epoch: int, device: torch.device) -> None:
        """Called before each epoch (e.g. to re-sample auxiliary outliers)."""

    @abstractmethod
    def loss(self, model: Classifier, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Loss on an ID batch (x, y) in training mode."""

    def config(self) -> dict[str, Any]:
        """Settings recorded in checkpoint metadata."""
        return {}

    def parameters(self, model: Classifier) -> list[torch.nn.Parameter]:
        """Parameters the optimiser updates (default: all of the model's)."""
        return list(model.parameters())

    def weight_decays(self, model: Classifier) -> dict[str, float]:
        """Parameters (by name in ``model.named_parameters()``) that train with a weight decay other than the
        config's, and theirs (e.g. ISH's head); each value makes its own optimiser group."""
        return {}

    def begin(self, model: Classifier, run_dir: Path) -> None:
        """Called once per run, before resuming, with the model on its device (e.g. to write reports)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Learned tensors that live outside the model (saved with the training state for resuming)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""


def augment(x: Tensor, generator: torch.Generator, shift: int = 2, rows: tuple[int, int] | None = None) -> Tensor:
    """Random horizontal flips and translations of up to ``shift`` pixels (zero padding), per sample.

    ``rows = (start, total)`` says ``x`` holds rows ``start ...`` of a batch of ``total``: the random
    draws are made for the whole batch (as a single process would) and this part's are used, so a
    rank of a distributed run augments its rows exactly as the single-process run does.
    """
    n, _, h, w = x.shape
    start, total = rows or (0, n)
    flip = (torch.rand(total, generator=generator) < 0.5)[start:start + n]
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    padded = F.pad(x, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (total,), generator=generator)[start:start + n].tolist()
    dx = torch.randint(0, 2 * shift + 1, (total,), generator=generator)[start:start + n].tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def shuffled_batches(data: ImageSet, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches in a random order drawn from ``generator`` (in-memory sets are sliced directly)."""
    ds = data.dataset
    if isinstance(ds, ArrayDataset):
        order = torch.randperm(len(ds), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield ds.images[idx].float().div_(255), ds.labels[idx]
    else:
        yield from DataLoader(ds, batch_size=batch_size, shuffle=True, generator=generator, num_workers=2)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Global batches in an epoch of ``n`` images: the last, smaller one counts only when it has an image for
    every rank (under ``torchrun``; a single process takes every batch)."""
    return n // batch_size + int(n % batch_size >= max(1, distributed.world_size()))


def rank_batches(data: ImageSet, batch_size: int,
                 generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, tuple[int, int]]]:
    """This rank's part of each global batch of :func:`shuffled_batches`, with ``(start, total)``: where
    the part sits in its global batch (see :func:`augment`). A single process gets whole batches.

    Ranks take contiguous blocks of every global batch of ``batch_size``, so the union of the ranks'
    step equals the single-process step: exactly for in-memory sets (both orders are one ``randperm``);
    a file-backed set is ordered by one ``randperm`` of ``generator`` too (a single process orders it
    with the DataLoader's shuffle), and each rank decodes only its own files. A last batch with fewer
    images than ranks is skipped: a rank cannot take a step on no images (see :func:`steps_per_epoch`).
    """
    if distributed.world_size() == 1:
        for x, y in shuffled_batches(data, batch_size, generator):
            yield x, y, (0, len(y))
        return
    order = torch.randperm(len(data), generator=generator)
    parts = []
    for i in range(0, steps_per_epoch(len(data), batch_size) * batch_size, batch_size):
        batch = order[i:i + batch_size]
        mine = distributed.block(len(batch))
        parts.append((batch[mine.start:mine.stop], (mine.start, len(batch))))
    ds = data.dataset
    if isinstance(ds, ArrayDataset):
        for idx, where in parts:
            yield ds.images[idx].float().div_(255), ds.labels[idx], where
        return
    loader = DataLoader(ds, batch_sampler=[idx.tolist() for idx, _ in parts], num_workers=2)
    for (x, y), (_, where) in zip(loader, parts):
        yield x, y, where


@torch.no_grad()
def evaluate_accuracy(model: Classifier, data: ImageSet, batch_size: int = 1024, device: torch.device | None = None) -> float:
    """Top-1 accuracy on a labelled set, in eval mode, on the model's fast inference copy."""
    device = device or default_device()
    fast = model.for_inference().to(device)
    correct = total = 0
    for x, y in batches(data, batch_size):
        correct += int((fast(inference_input(x, device)).argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / max(total, 1)


EpochHook = Callable[[Classifier, int], dict[str, Any]]

LOOP_DEFAULTS: dict[str, Any] = {"optimizer": "sgd", "weight_decay": 5e-4}


def resolve_config(cfg: TrainConfig, objective: Objective) -> TrainConfig:
    """``cfg`` with its None optimiser settings filled from ``objective.train_defaults``, then :data:`LOOP_DEFAULTS`."""
    fill = {k: v for k, v in {**LOOP_DEFAULTS, **objective.train_defaults}.items() if getattr(cfg, k) is None}
    return replace(cfg, **fill) if fill else cfg


def compute_signature(device: torch.device) -> str:
    """Where a run computes, e.g. ``"cpu, 2 threads"``: the floating-point summation order (and so the
    trained weights) depends on it, not only on the seed."""
    n = torch.get_num_threads()
    return f"cpu, {n} thread{'s' * (n > 1)}" if device.type == "cpu" else device.type


def _meta(base: dict[str, Any], cfg: TrainConfig, objective: Objective, epoch: int, row: dict[str, Any],
          compute: str) -> dict[str, Any]:
    return {**base, "epoch": epoch, "objective": objective.name, "objective_config": objective.config(),
            "train_config": asdict(cfg), "compute": compute, "metrics": row}


def train(model: Classifier, train_set: ImageSet, objective: Objective, cfg: TrainConfig, run_dir: str | Path,
          model_meta: dict[str, Any], test_set: ImageSet | None = None, hooks: list[EpochHook] | None = None,
          device: torch.device | str | None = None) -> Path:
    """Train ``model`` in place for ``cfg.epochs`` epochs, resuming in ``run_dir`` if it has a state.

    ``model_meta`` must name the architecture (``arch``, ``num_classes``, ``in_channels``) so the
    checkpoints can be rebuilt. ``hooks`` run after each epoch; their dicts join the history row.
    Returns the path of the final checkpoint (``run_dir/last.safetensors``).

    Under ``torchrun`` every rank computes its contiguous part of each global batch of
    ``cfg.batch_size`` (:func:`rank_batches`), then the gradients of the objective's parameters are
    averaged over ranks weighted by the ranks' sample counts (one all-reduce per step) before the
    optimiser steps, so every rank holds the same weights. That is what DistributedDataParallel does,
    done explicitly because GReg's double back-propagation and Unleashing Mask's functional calls with
    mask scores (parameters outside the model) do not go through DDP's forward. Batch-norm statistics
    are per rank during the step (as DDP without SyncBatchNorm, which has no CPU kernels) and their
    running averages are averaged over ranks at the end of each epoch. Rank 0 evaluates, runs the
    hooks and writes the checkpoints; the others wait.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else default_device()
    seed_everything(cfg.seed)
    model.to(device, memory_format=torch.channels_last)  # oneDNN / cuDNN convolutions run faster in NHWC
    cfg = resolve_config(cfg, objective)
    objective.begin(model, run)
    params = objective.parameters(model)
    groups = _param_groups(model, params, objective.weight_decays(model))
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    else:
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = steps_per_epoch(len(train_set), cfg.batch_size)
    if steps * cfg.batch_size < len(train_set) and distributed.is_main():
        n, world = len(train_set), distributed.world_size()
        warnings.warn(f"every epoch skips its last batch ({n % cfg.batch_size} of {n} images): it has fewer images "
                      f"than the {world} ranks; a batch size that divides {n} or leaves at least {world} keeps it",
                      stacklevel=2)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
             if cfg.schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    compute = compute_signature(device)
    start = _resume(run, model, opt, sched, cfg, objective, compute)
    for epoch in range(start + 1, cfg.epochs + 1):
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        objective.start_epoch(model, epoch, device)
        model.train()
        t0, seen, loss_sum, correct, logs = time.time(), 0, 0.0, 0, {}
        bar = progress(rank_batches(train_set, cfg.batch_size, gen), total=steps,
                       desc=f"epoch {epoch}/{cfg.epochs}", unit="batch")
        for x, y, where in bar:
            if cfg.augment:
                x = augment(x, gen, rows=where)
            x, y = inference_input(x, device), y.to(device, non_blocking=True)
            loss, logs = objective.loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(params, len(y))
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            correct += int(logs.pop("correct", 0))
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        seen, loss_sum, correct = distributed.all_reduce_sum(torch.tensor([seen, loss_sum, correct],
                                                                          dtype=torch.float64)).tolist()
        distributed.average_buffers(model)
        row: dict[str, Any] = {"epoch": epoch, "loss": loss_sum / seen, "train_acc": correct / seen,
                               "seconds": round(time.time() - t0, 2), **logs}
        if distributed.is_main():
            if test_set is not None:
                row["test_acc"] = evaluate_accuracy(model, test_set, cfg.eval_batch_size, device)
            for hook in hooks or []:
                row.update(hook(model, epoch))
            model.train()
            _save_epoch(run, model, opt, sched, epoch, _meta(model_meta, cfg, objective, epoch, row, compute), row,
                        objective.state_dict())
        distributed.barrier()
    return run / "last.safetensors"


def _param_groups(model: Classifier, params: list[torch.nn.Parameter],
                  decays: dict[str, float]) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
    """``params`` as they are when ``decays`` is empty, else one optimiser group per weight decay named in
    ``decays`` (see :meth:`Objective.weight_decays`) and one, with the config's, for the rest."""
    if not decays:
        return params
    names = {id(p): n for n, p in model.named_parameters()}
    if unknown := sorted(set(decays) - {names.get(id(p)) for p in params}):
        raise ValueError(f"weight decays given for {', '.join(map(repr, unknown))}, which the optimiser does not "
                         "update (not among the objective's parameters)")
    rest = [p for p in params if names.get(id(p)) not in decays]
    groups: list[dict[str, Any]] = [{"params": rest}] if rest else []
    for wd in sorted(set(decays.values())):
        number("weight decay", wd, 0.0)
        groups.append({"params": [p for p in params if decays.get(names.get(id(p))) == wd], "weight_decay": wd})
    return groups


def _save_epoch(run: Path, model: Classifier, opt, sched, epoch: int, meta: dict[str, Any], row: dict[str, Any],
                objective_state: dict[str, Tensor]) -> None:
    ckpt = save_checkpoint(model, run / f"epoch-{epoch:03d}", meta)
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(ckpt.with_suffix(suffix), (run / "last").with_suffix(suffix))
    state = {"epoch": torch.tensor(epoch), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "config": json.dumps(meta["train_config"], sort_keys=True), "objective": meta["objective"],
             "compute": meta["compute"], "objective_state": objective_state}
    with atomic_path(run / "train_state.pt") as tmp:
        torch.save(state, tmp)
    append_whole(run / "history.jsonl", json.dumps(row) + "\n")


def _resume(run: Path, model: Classifier, opt, sched, cfg: TrainConfig, objective: Objective, compute: str) -> int:
    """Restore the newest finished epoch from ``run``; returns it (0 = fresh start)."""
    path = run / "train_state.pt"
    if not path.exists():
        if distributed.is_main():
            (run / "history.jsonl").unlink(missing_ok=True)
        return 0
    from safetensors.torch import load_file

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{path} is not a training state oodlab wrote (it is truncated, or holds pickled objects "
                         "other than tensors, which are never loaded); delete it to restart the run, or use a new "
                         "--out folder") from exc
    cfg_now = json.dumps(asdict(cfg), sort_keys=True)
    if state["config"] != cfg_now or state["objective"] != objective.name:
        raise ValueError(f"{run} holds a run with other settings; use a new --out folder "
                         "(or delete it) instead of resuming it")
    epoch = int(state["epoch"])
    before = state.get("compute", "an unrecorded device / thread count")
    if before != compute and epoch < cfg.epochs:
        warnings.warn(f"{run} was trained on {before} and resumes on {compute}: the result will differ slightly from "
                      "an uninterrupted run (floating-point summation order); match it (e.g. torch.set_num_threads) "
                      "to reproduce it exactly", stacklevel=3)
    model.load_state_dict(load_file(str(run / f"epoch-{epoch:03d}.safetensors")))
    objective.load_state_dict(state.get("objective_state", {}))
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if distributed.is_main():
        lines = (run / "history.jsonl").read_text().splitlines() if (run / "history.jsonl").exists() else []
        atomic_write_text(run / "history.jsonl", "".join(line + "\n" for line in lines[:epoch]))
    return epoch
