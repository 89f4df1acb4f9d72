"""One way from what a user names to what a command runs on: a :class:`RunSpec` -> model + suite.

Every command (``bench``, ``fit``, ``score``, ``train``, ``guard build``) takes one frozen
:class:`RunSpec`, built once by the CLI or by the Python caller, and resolves it here
(:func:`resolve`, :func:`resolve_model`, :func:`resolve_training`); none builds models or loaders itself.

- model: an oodlab checkpoint path, ``torchvision:NAME`` or ``timm:NAME`` (+ a weights file), or
  None for oodlab's shipped default model of a built-in suite (for ``train``: the checkpoint to
  fine-tune, None to train from scratch);
- data: a registered suite name (``oodlab list``), a suite TOML file, a :class:`SuiteFlags`
  (``--id-train DIR --id-test DIR --ood near:NAME=DIR``), or a :class:`Suite` object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


from .data.custom import load_suite_file, suite_from_flags
from .data.preprocessing import Preprocessing
from .data.suites import SUITES, Suite, load_suite
from .models.loaders import LoadedModel, load_model
from .validate import integer

__all__ = ["RunSpec", "SuiteFlags", "resolve", "resolve_model", "resolve_suite", "resolve_training"]


@dataclass(frozen=True)
class SuiteFlags:
    """A suite given on the command line: ``--id-train``, ``--id-test``, ``--id-val`` and ``--ood group:NAME=PATH``."""

    id_train: str
    id_test: str
    ood: list[str] = field(default_factory=list)
    id_val: str | None = None


DataSpec = str | Path | Suite | SuiteFlags


@dataclass(frozen=True)
class RunSpec:
    """What a command runs on: the model (and its weights), the data (and where data sets live), the
    device, a seeded subset of ID train to fit on, and the seed of every seeded choice."""

    model: str | Path | LoadedModel | None = None  # a LoadedModel: a network the caller built (Python only)
    weights: str | Path | None = None
    data: DataSpec = "fashionmnist"
    data_root: str | Path | None = None
    device: str | None = None
    fit_subset: int | None = None
    seed: int = 0
    retrain: bool = False  # train the default model with the default recipe instead of the shipped one

    def __post_init__(self) -> None:
        if self.fit_subset is not None:
            integer("--fit-subset (a number of images)", self.fit_subset, 1)
        integer("seed", self.seed, 0)
        if self.retrain and self.model is not None:
            raise ValueError("--retrain trains the default model; it cannot be combined with --model/--checkpoint")
        if self.weights is not None and self.model is None:
            raise ValueError("--weights goes with --model torchvision:NAME or timm:NAME")


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


def _check_data(data: DataSpec) -> None:
    if isinstance(data, (str, Path)) and str(data) not in SUITES and not str(data).endswith(".toml"):
        raise ValueError(f"unknown suite {str(data)!r}; available: {', '.join(sorted(SUITES))} (or a suite .toml file)")


def resolve_model(spec: RunSpec) -> LoadedModel:
    """The model ``spec`` names (it must name one: ``oodlab score`` has no suite to take a default from)."""
    if spec.model is None:
        raise ValueError("pass --model (an oodlab checkpoint, torchvision:NAME, timm:NAME or openood:NAME)")
    if isinstance(spec.model, LoadedModel):
        return spec.model
    return load_model(spec.model, spec.weights, spec.device or "cpu")


def resolve(spec: RunSpec) -> tuple[LoadedModel, Suite]:
    """The model and the suite ``spec`` names, checked against each other.

    ``fit_subset`` keeps a seeded random subset of that many ID training images (ImageNet-size
    fits); ``retrain`` trains the default model instead of using the shipped one.
    """
    _check_data(spec.data)
    if spec.model is None:
        if not _builtin(spec.data):
            raise ValueError("your own data needs your model: pass --model (torchvision:NAME, timm:NAME or a checkpoint)")
        from .training.recipes import default_checkpoint

        suite = resolve_suite(spec.data, None, spec.data_root)
        if suite.name not in ("fashionmnist", "fashionmnist-split", "cifar10", "cifar100"):
            raise ValueError(f"suite {suite.name} has no default model: pass --model")
        loaded = load_model(default_checkpoint(suite, device=spec.device, retrain=spec.retrain),
                            device=spec.device or "cpu")
    else:
        loaded = resolve_model(spec)
        suite = resolve_suite(spec.data, loaded.prep, spec.data_root)
    if loaded.model.num_classes != suite.num_classes:
        raise ValueError(f"{loaded.spec} has {loaded.model.num_classes} classes but suite {suite.name} has "
                         f"{suite.num_classes}")
    if tuple(suite.input_shape) != loaded.input_shape:
        raise ValueError(f"{loaded.spec} takes inputs of shape {loaded.input_shape} but suite {suite.name} gives "
                         f"{tuple(suite.input_shape)}")
    return loaded, _subset(spec, suite)


def _subset(spec: RunSpec, suite: Suite) -> Suite:
    if spec.fit_subset is None:
        return suite
    return dataclasses.replace(suite, id_train=suite.id_train.subset(spec.fit_subset, spec.seed))


def resolve_training(spec: RunSpec, arch: str | None = None) -> tuple[Suite, str | None]:
    """The suite a training run reads and its architecture (None: the suite's default one, or the one of
    the checkpoint ``spec.model`` that it fine-tunes). Built-in suites come as they are; the user's own
    data is read as the architecture takes its inputs, so it needs ``arch`` or a checkpoint to fine-tune."""
    _check_data(spec.data)
    if spec.weights is not None:
        raise ValueError("training fine-tunes oodlab checkpoints (--from); --weights is not used")
    if _builtin(spec.data):
        if spec.fit_subset is not None and not isinstance(spec.data, Suite):
            raise ValueError("--fit-subset with a built-in suite: train on the full set, or describe a subset in a "
                             "suite file")
        return _subset(spec, resolve_suite(spec.data, None, spec.data_root)), arch
    if spec.model is None and arch is None:
        raise ValueError("training on your own data needs --arch (see `oodlab list`) or --from CHECKPOINT")
    if arch is None:
        from .models.zoo import load_checkpoint

        arch = load_checkpoint(spec.model)[1]["arch"]
    from .models.loaders import arch_preprocessing

    return _subset(spec, resolve_suite(spec.data, arch_preprocessing(arch), spec.data_root)), arch
