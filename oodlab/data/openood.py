"""OpenOOD v1.5's four benchmarks, read from its image lists exactly as its ``DATA_INFO`` defines them.

With OpenOOD's data under a data root (``benchmark_imglist/<benchmark>/*.txt``, images under
``images_classic/`` for CIFAR and ``images_largescale/`` for ImageNet; ``textures`` of the ImageNet
benchmarks lives in ``images_classic/``), :func:`openood_suite` builds ID train / val / test, the
validation OOD set (:attr:`Suite.ood_val`, for ``--search``), near and far OOD in OpenOOD's order,
and the covariate-shifted ID sets (:attr:`Suite.csid`, for ``--fsood``). Preprocessing is OpenOOD's
test-time pipeline whatever the model: PIL, RGB, shorter side resized (bilinear) to 32 / 256,
centre crop 32 / 224 (ImageNet-C: no resize, its images are 224 already); the model applies its
own mean / std. OOD list labels are ignored (OpenOOD overwrites them with -1 too). Every listed
file must exist; only ImageNet-1K's list lengths are checked (the others vary between releases).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import DataMissingError, ImageSet
from .locate import search_roots
from .preprocessing import IMAGENET, Preprocessing
from .sources import folder

__all__ = ["BENCHMARKS", "Benchmark", "openood_suite", "openood_root", "CIFAR_PREP"]

CIFAR_PREP = Preprocessing(32, 3, 32, "bilinear", reader="pil")
IMAGENET_C_PREP = Preprocessing(224, 3, 224, "bilinear", reader="pil")


@dataclass(frozen=True)
class Benchmark:
    """One OpenOOD benchmark: its list folder, class count, image folder, and list files by role."""

    lists: str
    num_classes: int
    images: str  # images_classic or images_largescale
    near: tuple[str, ...]
    far: tuple[str, ...]
    csid: tuple[str, ...]
    ood_val: str
    counts: tuple[tuple[str, int], ...] = ()  # list file -> expected line count, where verified

    def list_file(self, role: str) -> str:
        """The list of ``role``: "train" / "val" / "test" (ID), "ood_val", or an OOD / csid set name."""
        if role in ("train", "val", "test"):
            return f"{role}_{self.lists}.txt"
        if role == "ood_val":
            return f"{self.ood_val}.txt"
        if role in self.csid:
            return f"test_{self.lists}_{role.removeprefix('imagenet_')}.txt" if self.lists.startswith("imagenet") \
                else f"test_{role}.txt"
        return f"test_{role}.txt"


_IN_FAR = ("inaturalist", "textures", "openimage_o")
BENCHMARKS: dict[str, Benchmark] = {
    "cifar10": Benchmark("cifar10", 10, "images_classic", ("cifar100", "tin"),
                         ("mnist", "svhn", "texture", "places365"), ("cifar10c",), "val_tin"),
    "cifar100": Benchmark("cifar100", 100, "images_classic", ("cifar10", "tin"),
                          ("mnist", "svhn", "texture", "places365"), (), "val_tin"),
    "imagenet200": Benchmark("imagenet200", 200, "images_largescale", ("ssb_hard", "ninco"), _IN_FAR,
                             ("imagenet_v2", "imagenet_c", "imagenet_r"), "val_openimage_o"),
    "imagenet1k": Benchmark("imagenet", 1000, "images_largescale", ("ssb_hard", "ninco"), _IN_FAR,
                            ("imagenet_v2", "imagenet_c", "imagenet_r", "imagenet_es"), "val_openimage_o",
                            (("train_imagenet.txt", 1_281_167), ("val_imagenet.txt", 5_000),
                             ("test_imagenet.txt", 45_000), ("test_ssb_hard.txt", 49_000), ("test_ninco.txt", 5_879),
                             ("test_inaturalist.txt", 10_000), ("test_textures.txt", 5_160),
                             ("test_openimage_o.txt", 15_869), ("val_openimage_o.txt", 1_763))),
}


def openood_root(benchmark: str, data_root: str | Path | None = None) -> Path | None:
    """The first data root holding ``benchmark_imglist/<benchmark's lists>/``, or None."""
    lists = BENCHMARKS[benchmark].lists
    return next((r for r in search_roots(data_root) if (r / "benchmark_imglist" / lists).is_dir()), None)


def openood_suite(benchmark: str, data_root: str | Path | None = None):
    """The OpenOOD v1.5 benchmark ``benchmark`` (cifar10, cifar100, imagenet200, imagenet1k) from its lists."""
    from .suites import Suite

    b = BENCHMARKS[benchmark]
    root = openood_root(benchmark, data_root)
    if root is None:
        raise DataMissingError(f"{benchmark} (OpenOOD v1.5 layout) not found: pass --data-root DIR with "
                               f"DIR/benchmark_imglist/{b.lists}/*.txt and DIR/{b.images}/ (OpenOOD's download script "
                               "makes this layout)")
    lists = root / "benchmark_imglist" / b.lists
    images = [root / b.images, root / "images_classic", root]
    prep = CIFAR_PREP if b.images == "images_classic" else IMAGENET
    counts = dict(b.counts)

    def read(role: str, name: str, labelled: bool, p: Preprocessing = prep) -> ImageSet:
        file = b.list_file(role)
        return folder.load_list(lists / file, images, name, p, b.num_classes if labelled else None, counts.get(file),
                                ood=not labelled)

    train_file = lists / b.list_file("train")
    if train_file.is_file() or benchmark != "imagenet1k":
        train = read("train", f"{benchmark}-train", True)
    else:  # ImageNet-1K's train list is not always shipped: its class folders then
        train_dir = root / "images_largescale" / "imagenet_1k" / "train"
        train = folder.load(train_dir, f"{benchmark}-train", IMAGENET, labelled=True)
        if train.num_classes != 1000:
            raise DataMissingError(f"{train_dir} has {train.num_classes} class folders; ImageNet-1K has 1000")
    ood = {name: read(name, name, False) for name in (*b.near, *b.far)}
    csid = {name: read(name, name, True, IMAGENET_C_PREP if name == "imagenet_c" else prep)
            for name in b.csid if (lists / b.list_file(name)).is_file()}
    return Suite(benchmark, train, read("test", f"{benchmark}-test", True), ood,
                 {"near": list(b.near), "far": list(b.far)}, b.num_classes, prep.input_shape,
                 id_val=read("val", f"{benchmark}-val", True), ood_val=read("ood_val", b.ood_val, False), csid=csid)
