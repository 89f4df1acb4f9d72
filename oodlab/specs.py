"""One way from what a user names to what a command runs on: a model spec and a data spec -> model + suite.

Every command (``bench``, ``fit``, ``score``, ``train``, ``guard``) calls :func:`resolve`; none builds
models or loaders itself.

- model: an oodlab checkpoint path, ``torchvision:NAME`` or ``timm:NAME`` (+ a weights file), or
  None for oodlab's shipped default model of a built-in suite;
- data: a registered suite name (``oodlab list``), a suite TOML file, a :class:`SuiteFlags`
  (``--id-train DIR --id-test DIR --ood near:NAME=DIR``), or a :class:`Suite` object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.custom import load_suite_file, suite_from_flags
from .data.preprocessing import Preprocessing
from .data.suites import SUITES, Suite, load_suite
from .models.loaders import LoadedModel, load_model
from .validate import integer

__all__ = ["SuiteFlags", "resolve", "resolve_suite"]


@dataclass(frozen=True)
class SuiteFlags:
    """A suite given on the command line: ``--id-train``, ``--id-test``, ``--id-val`` and ``--ood group:NAME=PATH``."""

    id_train: str
    id_test: str
    ood: list[str] = field(default_factory=list)
    id_val: str | None = None


DataSpec = str | Path | Suite | SuiteFlags


def _builtin(data: DataSpec) -> bool:
    return isinstance(data, Suite) or (isinstance(data, str) and data in SUITES)


def resolve_suite(data: DataSpec, prep: Preprocessing | None, data_root: str | Path | None = None) -> Suite:
    """The suite ``data`` names; suites from the user's files are read with the model's ``prep``."""
    if isinstance(data, Suite):
        return data
    if isinstance(data, str) and data in SUITES:
        return load_suite(data, data_root)
    if prep is None:
        raise ValueError("your own data needs your model: pass --model (torchvision:NAME, timm:NAME or a checkpoint)")
    if isinstance(data, SuiteFlags):
        if not data.ood:
            raise ValueError("--id-train/--id-test need at least one --ood near:NAME=DIR or far:NAME=DIR")
        return suite_from_flags(data.id_train, data.id_test, data.ood, prep, data.id_val)
    return load_suite_file(data, prep)


def resolve(model: str | Path | None = None, data: DataSpec = "fashionmnist", weights: str | Path | None = None,
            data_root: str | Path | None = None, device: str | torch.device | None = None,
            fit_subset: int | None = None, seed: int = 0, retrain: bool = False) -> tuple[LoadedModel, Suite]:
    """The model and the suite a command runs on, checked against each other.

    ``fit_subset`` keeps a seeded random subset of that many ID training images (ImageNet-size
    fits); ``retrain`` trains the default model instead of using the shipped one.
    """
    if isinstance(data, (str, Path)) and str(data) not in SUITES and not str(data).endswith(".toml"):
        raise ValueError(f"unknown suite {str(data)!r}; available: {', '.join(sorted(SUITES))} (or a suite .toml file)")
    if model is None:
        if not _builtin(data):
            raise ValueError("your own data needs your model: pass --model (torchvision:NAME, timm:NAME or a checkpoint)")
        from .training.recipes import default_checkpoint

        suite = resolve_suite(data, None, data_root)
        if suite.name not in ("fashionmnist", "fashionmnist-split", "cifar10", "cifar100"):
            raise ValueError(f"suite {suite.name} has no default model: pass --model")
        loaded = load_model(default_checkpoint(suite, device=device, retrain=retrain), device=device or "cpu")
    else:
        if retrain:
            raise ValueError("--retrain trains the default model; it cannot be combined with --model/--checkpoint")
        loaded = load_model(model, weights, device or "cpu")
        suite = resolve_suite(data, loaded.prep, data_root)
    if loaded.model.num_classes != suite.num_classes:
        raise ValueError(f"{loaded.spec} has {loaded.model.num_classes} classes but suite {suite.name} has "
                         f"{suite.num_classes}")
    if tuple(suite.input_shape) != loaded.input_shape:
        raise ValueError(f"{loaded.spec} takes inputs of shape {loaded.input_shape} but suite {suite.name} gives "
                         f"{tuple(suite.input_shape)}")
    if fit_subset is not None:
        fit_subset = integer("--fit-subset (a number of images)", fit_subset, 1)
        suite = dataclasses.replace(suite, id_train=suite.id_train.subset(fit_subset, seed))
    return loaded, suite
