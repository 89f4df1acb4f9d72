"""Ready-made training runs: the default model of a suite and ``oodlab train`` as a library call."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..data.suites import SUITES, Suite
from ..models.zoo import build, load_checkpoint
from ..runtime import cache_dir, seed_everything
from ..specs import RunSpec
from .loop import EpochHook, TrainConfig, train

__all__ = ["DEFAULT_ARCH", "SHIPPED", "default_config", "default_checkpoint", "shipped_checkpoint", "shipped_name",
           "train_on_suite"]

DEFAULT_ARCH = {"fashionmnist": "smallcnn", "fashionmnist-split": "smallcnn", "cifar10": "resnet18-cifar",
                "cifar100": "resnet18-cifar"}


#: Default models that travel inside the package (made by benchmarks/default_models.py).
SHIPPED = Path(__file__).resolve().parent.parent / "models" / "weights"


def shipped_name(suite: str) -> str:
    return f"{suite}-{DEFAULT_ARCH.get(suite, 'smallcnn')}"


def shipped_checkpoint(suite: str) -> Path | None:
    """The default model shipped for ``suite`` (trained with the default recipe), or None if there is none."""
    path = SHIPPED / f"{shipped_name(suite)}.safetensors"
    return path if path.is_file() and path.with_suffix(".json").is_file() else None


def default_config(suite: str, **overrides: Any) -> TrainConfig:
    """The default recipe: 15 epochs (lr 0.05, cosine) for 28x28 suites, 100 epochs (lr 0.1) for CIFAR; the
    optimiser is the method's (SGD with momentum, GReg+ Adam: :attr:`~oodlab.training.Objective.train_defaults`)."""
    base: dict[str, Any] = {"epochs": 15, "lr": 0.05} if suite.startswith("fashionmnist") else {"epochs": 100, "lr": 0.1}
    return TrainConfig(**{**base, **overrides})


def train_on_suite(spec: RunSpec, out_dir: str | Path | None = None, *, method: str = "erm", arch: str | None = None,
                   config: TrainConfig | Mapping[str, Any] | None = None, method_options: dict[str, Any] | None = None,
                   hooks: list[EpochHook] | None = None, track_ood: bool = False, verbose: bool = True) -> Path:
    """Train a classifier on the ID training set of ``spec.data`` with ``method`` (or fine-tune the checkpoint
    ``spec.model``), resolved by :func:`oodlab.specs.resolve_training`.

    ``config`` is a :class:`TrainConfig`, or overrides of the suite's default recipe (:func:`default_config`,
    seeded with ``spec.seed``). ``track_ood`` evaluates OOD detection on a held-out split of a built-in
    suite after every epoch. ``out_dir`` defaults to ``runs/train-<suite>-<method>-seed<seed>``. Returns the
    final checkpoint path; re-running with the same ``out_dir`` resumes.
    """
    from ..specs import resolve_training
    from . import create_objective

    suite_obj, arch = resolve_training(spec, arch)
    cfg = config if isinstance(config, TrainConfig) else default_config(suite_obj.name, **{"seed": spec.seed,
                                                                                          **(config or {})})
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / f"train-{suite_obj.name}-{method}-seed{cfg.seed}"
    hooks = list(hooks or [])
    if track_ood:
        if not isinstance(spec.data, str) or spec.data not in SUITES:
            raise ValueError("--track-ood works with the built-in suites only")
        from .tracking import track_ood_hook

        hooks.append(track_ood_hook(spec.data, spec.data_root, spec.device, run_dir=out_dir))
    seed_everything(cfg.seed)  # before building, so the initial weights follow the seed too
    init_from = spec.model
    if init_from is not None:
        model, meta = load_checkpoint(init_from)
        if model.num_classes != suite_obj.num_classes:
            raise ValueError(f"{init_from} has {model.num_classes} classes; suite {suite_obj.name} has {suite_obj.num_classes}")
        arch = meta["arch"]
    else:
        arch = arch or DEFAULT_ARCH.get(suite_obj.name, "smallcnn")
        model = build(arch, suite_obj.num_classes, suite_obj.input_shape[0])
    objective = create_objective(method, method_options, model=model, suite=suite_obj, config=cfg)
    meta_out = {"arch": arch, "num_classes": suite_obj.num_classes, "in_channels": suite_obj.input_shape[0],
                "suite": suite_obj.name, "method": method, "init_from": str(init_from) if init_from else None}
    t0 = time.perf_counter()
    ckpt = train(model, suite_obj.id_train, objective, cfg, out_dir, meta_out, test_set=suite_obj.id_test,
                 hooks=hooks or None, device=spec.device)
    if verbose:
        print(f"trained {arch} with {method} on {suite_obj.name} in {time.perf_counter() - t0:.0f} s -> {ckpt}")
    return ckpt


def default_checkpoint(suite: Suite, device: str | torch.device | None = None, verbose: bool = True,
                       retrain: bool = False) -> Path:
    """oodlab's default model for ``suite``: the shipped one, else (or with ``retrain``) one trained on
    first use with the default recipe into the oodlab cache."""
    if not retrain and (shipped := shipped_checkpoint(suite.name)) is not None:
        return shipped
    run = cache_dir() / "models" / f"{shipped_name(suite.name)}-seed0"
    ckpt = run / "last.safetensors"
    cfg = default_config(suite.name)
    if ckpt.exists() and (run / f"epoch-{cfg.epochs:03d}.safetensors").exists():
        return ckpt
    if verbose:
        print(f"No default model for {suite.name} yet: training one into {run} (resumable)...")
    return train_on_suite(RunSpec(data=suite, device=device), run, config=cfg, verbose=verbose)
