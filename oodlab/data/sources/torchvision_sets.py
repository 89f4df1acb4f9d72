"""CIFAR-10/100, SVHN and MNIST through torchvision (downloaded on machines that have internet)."""

from __future__ import annotations

from pathlib import Path

from ..base import DataMissingError, ImageSet
from ..locate import download_root
from ..preprocessing import Preprocessing

__all__ = ["load", "NAMES"]

NAMES = ("cifar10", "cifar100", "svhn", "mnist")
_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "mnist": 10}


def load(name: str, split: str = "test", data_root: str | Path | None = None, size: int = 32,
         channels: int = 3, download: bool = True) -> ImageSet:
    """``name`` in :data:`NAMES`, resized to ``size`` with ``channels`` channels, values in [0, 1]."""
    from torchvision import datasets

    if name not in NAMES:
        raise ValueError(f"unknown torchvision set {name!r}; choose from {', '.join(NAMES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = str(download_root(data_root))
    prep = Preprocessing(size, channels, reader="pil")  # torchvision's data sets hand out PIL images
    tf = prep.transform()
    try:
        if name == "svhn":
            ds = datasets.SVHN(root, split=split, transform=tf, download=download)
        else:
            cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "mnist": datasets.MNIST}[name]
            ds = cls(root, train=split == "train", transform=tf, download=download)
    except (RuntimeError, OSError) as exc:
        raise DataMissingError(
            f"{name} ({split}) is not in {root} and could not be downloaded ({exc}). "
            "Download it on a machine with internet into that folder, or pass --data-root."
        ) from exc
    fp = prep.fingerprint(f"torchvision:{name}:{split}:{len(ds)}")
    label = name if split == "test" else f"{name}-train"
    return ImageSet(label, ds, fp, num_classes=_CLASSES[name])
