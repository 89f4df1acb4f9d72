"""Named benchmarks: an ID training/test set plus OOD sets grouped into near and far.

``load_suite("fashionmnist")`` works offline on any machine with Fashion-MNIST (see the README).
``cifar10``, ``cifar100``, ``imagenet200`` and ``imagenet1k`` are OpenOOD v1.5's benchmarks read
from its image lists (:mod:`oodlab.data.openood`). Without the lists, the CIFAR suites fall back to
torchvision's CIFAR / MNIST / SVHN sets and folders of TinyImageNet, Textures and Places365 under
``<data_root>/<name>`` (or ``images_classic/<name>``): not OpenOOD's split, and they say so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path


from ..registry import Registry
from ..runtime import atomic_write_text, cache_dir, digest, sha256_hex
from ..validate import integer, shape
from .base import ArrayDataset, DataMissingError, ImageSet, concat, tensor_fingerprint
from .locate import search_roots
from .preprocessing import Preprocessing
from .sources import digits, faces, fashion_mnist, folder, glyphs, mnist, noise, terrain, torchvision_sets

__all__ = ["Suite", "load_suite", "SUITES", "register_suite"]


@dataclass(frozen=True)
class Suite:
    """An ID set (train/test split) and named OOD sets, grouped as ``{"near": [...], "far": [...]}``."""

    name: str
    id_train: ImageSet
    id_test: ImageSet
    ood: dict[str, ImageSet]
    groups: dict[str, list[str]]
    num_classes: int
    input_shape: tuple[int, int, int]
    aux: ImageSet | None = field(default=None)
    id_val: ImageSet | None = field(default=None)  # held-out ID data for calibration, where the suite has it
    synthetic: tuple[str, ...] = ()  # OOD sets that are generated noise, reported apart from the natural ones
    ood_val: ImageSet | None = field(default=None)  # validation OOD set: parameter search only, never reported
    csid: dict[str, ImageSet] = field(default_factory=dict)  # covariate-shifted ID sets (full-spectrum evaluation)

    def __post_init__(self) -> None:
        integer("num_classes", self.num_classes, 1)
        shape("input_shape", self.input_shape, 3)
        if not self.ood:
            raise ValueError(f"suite {self.name} has no OOD sets: give at least one")
        listed = [n for names in self.groups.values() for n in names]
        wrong = sorted(set(listed) - set(self.ood)) or sorted({n for n in listed if listed.count(n) > 1})
        missing = sorted(set(self.ood) - set(listed))
        if wrong or missing:
            raise ValueError(f"suite {self.name}: every OOD set must be in exactly one group; "
                             + (f"groups list {wrong} (unknown or twice)" if wrong else f"{missing} are in no group"))
        if set(self.synthetic) - set(self.ood):
            raise ValueError(f"suite {self.name}: synthetic sets {sorted(set(self.synthetic) - set(self.ood))} are "
                             "not among its OOD sets")
        if clash := sorted(set(self.csid) & set(self.ood)):
            raise ValueError(f"suite {self.name}: {clash} are both OOD and covariate-shifted ID sets")
        if "id" in self.ood:
            raise ValueError(f"suite {self.name}: an OOD set may not be named 'id' (the ID scores are stored under it); "
                             "rename it")
        for name in [self.name, *self.ood, *self.csid, *(s.name for s in self._sets())]:
            check_name(name, f"suite {self.name}")
        for name, data in self.ood.items():
            if shared := _shared_items(data, self.id_test):
                warnings.warn(f"suite {self.name}: OOD set {name!r} shares {shared} of its {len(data)} images with ID "
                              f"test ({self.id_test.name}); its AUROC then says little", stacklevel=3)

    def _sets(self) -> list[ImageSet]:
        return [s for s in (self.id_train, self.id_test, self.id_val, self.ood_val, *self.ood.values(),
                            *self.csid.values()) if s is not None]

    def full_spectrum(self) -> Suite:
        """OpenOOD's full-spectrum setting (FSOOD): ID test is ID test followed by every covariate-shifted ID
        set (they count as ID), named ``<suite>-fsood``; everything else is the same."""
        if not self.csid:
            raise ValueError(f"suite {self.name} has no covariate-shifted ID sets, so --fsood has nothing to add; "
                             "the OpenOOD benchmarks cifar10, imagenet200 and imagenet1k have them")
        test = concat(f"{self.id_test.name}+csid", [self.id_test, *self.csid.values()])
        return dataclasses.replace(self, name=f"{self.name}-fsood", id_test=test, csid={})

    def group_of(self, ood_name: str) -> str:
        return next(g for g, names in self.groups.items() if ood_name in names)

    def kind_of(self, ood_name: str) -> str:
        """``"synthetic"`` for generated noise, else ``"natural"`` (real images, photos, rendered fonts)."""
        return "synthetic" if ood_name in self.synthetic else "natural"

    def calibration_split(self, seed: int = 0) -> tuple[ImageSet, ImageSet]:
        """(calibration, evaluation) ID sets that neither the model nor a detector was fitted on.

        ``id_val`` and ``id_test`` where the suite has a validation split; else a seeded random half
        of ``id_test`` and the other half.
        """
        if self.id_val is not None:
            return self.id_val, self.id_test
        return self.id_test.split(len(self.id_test) // 2, seed)

    def held_out(self, fraction: float = 0.1, seed: int = 0) -> ImageSet:
        """Held-out ID data for detectors that fit on validation data (``fits_on = "val"``).

        ``id_val`` where the suite has it (as OpenOOD's ``id_loader_dict['val']``). A suite without one
        gets a seeded random ``fraction`` of ``id_train`` instead: a deviation, since the model was
        trained on those images (a temperature fitted there, for instance, comes out lower than on
        unseen data), but it keeps ``id_test`` for evaluation alone. The other detectors still fit on
        all of ``id_train``.
        """
        if self.id_val is not None:
            return self.id_val
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        n = max(1, round(fraction * len(self.id_train)))
        return dataclasses.replace(self.id_train.subset(n, seed), name=f"{self.id_train.name}-held-out")


def _shared_items(a: ImageSet, b: ImageSet) -> int:
    """How many items of ``a`` are also in ``b`` by content: all of them for the same fingerprint; else equal pixels
    (sets held in memory) or equal file contents (file sets). Files are compared only where their sizes are equal,
    by a hash of their size and first and last 64 KiB; the count is cached by the two fingerprints."""
    if a.fingerprint == b.fingerprint:
        return len(a)
    da, db = a.dataset, b.dataset
    if isinstance(da, ArrayDataset) and isinstance(db, ArrayDataset):
        if da.images.shape[1:] != db.images.shape[1:]:
            return 0
        seen = {row.tobytes() for row in db.images.flatten(1).numpy()}
        return sum(row.tobytes() in seen for row in da.images.flatten(1).numpy())
    fa, fb = getattr(da, "files", None), getattr(db, "files", None)
    if fa is None or fb is None:
        return 0
    record = cache_dir() / "overlaps" / f"{digest(a.fingerprint, b.fingerprint)}.json"
    with suppress(OSError, ValueError):
        return int(json.loads(record.read_text())["shared"])
    sizes: dict[int, list[Path]] = {}
    for p in fb:
        with suppress(OSError):
            sizes.setdefault(os.stat(p).st_size, []).append(p)
    keys: dict[Path, str | None] = {}
    shared = 0
    for p in fa:
        with suppress(OSError):
            twins = sizes.get(os.stat(p).st_size)
            mine = _sample_hash(p, keys) if twins else None
            if mine is not None and mine in {_sample_hash(q, keys) for q in twins}:
                shared += 1
    with suppress(OSError):
        atomic_write_text(record, json.dumps({"shared": shared}))
    return shared


def _sample_hash(path: Path, memo: dict[Path, str | None]) -> str | None:
    """SHA-256 of a file's size and its first and last 64 KiB (the whole file when smaller); None if unreadable."""
    if path not in memo:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(1 << 16)
                f.seek(max(len(head), size - (1 << 16)))
                memo[path] = sha256_hex([f"{size}|", head, f.read()])
        except OSError:
            memo[path] = None
    return memo[path]


SUITES: Registry[Callable[..., Suite]] = Registry("suite")


def check_name(name: str, where: str) -> str:
    """Refuse a set or suite name that could act as a path: names become cache and output file names."""
    if not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".") or \
            any(c in name for c in "/\\\0") or any(ord(c) < 32 for c in name):
        raise ValueError(f"{where}: {name!r} cannot be a data set name (no slashes, no leading dot, no control "
                         "characters: it becomes a file name); rename it")
    return name


def register_suite(name: str) -> Callable[[Callable[..., Suite]], Callable[..., Suite]]:
    """Register a builder ``f(data_root=None) -> Suite`` under ``name``."""
    return SUITES.register(name)


def load_suite(name: str, data_root: str | Path | None = None) -> Suite:
    """Build the suite called ``name`` (see :data:`SUITES`)."""
    return SUITES.get_named(name)(data_root=data_root)


SYNTHETIC_28 = ("gaussian", "uniform")


def _far_28() -> dict[str, ImageSet]:
    """The far-OOD sets of the 28x28 suites: six natural ones (``fonts`` only where its Debian fonts are
    installed: a warning says when it is left out) and the two noise sets of :data:`SYNTHETIC_28`."""
    natural = [mnist.load(), digits.load(), glyphs.load()]
    try:
        natural.append(glyphs.load_fonts())
    except DataMissingError as exc:
        warnings.warn(f"OOD set 'fonts' left out of the 28x28 suites: {exc}", stacklevel=3)
    natural += [faces.load(), terrain.load()]
    return {s.name: s for s in (*natural, noise.gaussian(), noise.uniform())}


def _classes(data: ImageSet, keep: range, name: str) -> ImageSet:
    ds = data.dataset
    assert isinstance(ds, ArrayDataset)
    mask = (ds.labels >= keep.start) & (ds.labels < keep.stop)
    images, labels = ds.images[mask], ds.labels[mask] - keep.start
    return ImageSet(name, ArrayDataset(images, labels), tensor_fingerprint(images, labels), len(keep))


@register_suite("fashionmnist")
def _fashionmnist(data_root: str | Path | None = None) -> Suite:
    far = _far_28()
    return Suite("fashionmnist", fashion_mnist.load("train", data_root), fashion_mnist.load("test", data_root),
                 far, {"near": [], "far": list(far)}, 10, (1, 28, 28), synthetic=SYNTHETIC_28)


@register_suite("fashionmnist-split")
def _fashionmnist_split(data_root: str | Path | None = None) -> Suite:
    train, test = fashion_mnist.load("train", data_root), fashion_mnist.load("test", data_root)
    near = _classes(test, range(6, 10), "fashionmnist-6to9")
    unlabeled = ImageSet(near.name, ArrayDataset(near.dataset.images), near.fingerprint + "u")  # type: ignore[attr-defined]
    far = _far_28()
    # validation OOD for --search: 1,000 seeded *training* images of the held-out classes 6-9 (the near set is
    # their test images), so no test OOD image is ever seen by a search
    val = _classes(train, range(6, 10), "fashionmnist-6to9-train").subset(1000, 0)
    ood_val = ImageSet(val.name, ArrayDataset(val.dataset.images), val.fingerprint + "u")  # type: ignore[attr-defined]
    return Suite("fashionmnist-split", _classes(train, range(0, 6), "fashionmnist-0to5"),
                 _classes(test, range(0, 6), "fashionmnist-0to5-test"), {unlabeled.name: unlabeled, **far},
                 {"near": [unlabeled.name], "far": list(far)}, 6, (1, 28, 28), synthetic=SYNTHETIC_28,
                 ood_val=ood_val)


def _folder_set(name: str, data_root: str | Path | None) -> ImageSet:
    for root in search_roots(data_root):
        for cand in (root / name, root / "images_classic" / name):
            if cand.is_dir():
                return folder.load(cand, name=name, prep=Preprocessing(32, 3, reader="pil"))  # as OpenOOD reads them
    raise DataMissingError(
        f"OOD set {name!r} not found: put its images in <data_root>/{name}/ (OpenOOD v1.5's "
        f"images_classic/{name} layout also works) and pass --data-root or set OODLAB_DATA"
    )


def _cifar(which: str, other: str, data_root: str | Path | None) -> Suite:
    from .openood import openood_root, openood_suite

    if openood_root(which, data_root) is not None:
        return openood_suite(which, data_root)
    warnings.warn(f"{which}: OpenOOD v1.5's lists (benchmark_imglist/{which}/) not found under the data root, so this "
                  "is torchvision's train/test split with folder OOD sets, not OpenOOD's split", stacklevel=3)

    def tv(name: str, split: str = "test") -> ImageSet:
        return torchvision_sets.load(name, split, data_root, size=32, channels=3)

    ood = {other: tv(other), "tin": _folder_set("tin", data_root),
           "mnist": tv("mnist"), "svhn": tv("svhn"), "texture": _folder_set("texture", data_root),
           "places365": _folder_set("places365", data_root)}
    return Suite(which, tv(which, "train"), tv(which), ood,
                 {"near": [other, "tin"], "far": ["mnist", "svhn", "texture", "places365"]},
                 10 if which == "cifar10" else 100, (3, 32, 32))


@register_suite("cifar10")
def _cifar10(data_root: str | Path | None = None) -> Suite:
    return _cifar("cifar10", "cifar100", data_root)


@register_suite("cifar100")
def _cifar100(data_root: str | Path | None = None) -> Suite:
    return _cifar("cifar100", "cifar10", data_root)


@register_suite("imagenet200")
def _imagenet200(data_root: str | Path | None = None) -> Suite:
    from .openood import openood_suite

    return openood_suite("imagenet200", data_root)


@register_suite("imagenet1k")
def _imagenet1k(data_root: str | Path | None = None) -> Suite:
    from .openood import openood_suite

    return openood_suite("imagenet1k", data_root)
