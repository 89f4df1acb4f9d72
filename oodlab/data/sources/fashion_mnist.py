"""Fashion-MNIST from IDX files (Debian's ``dataset-fashion-mnist`` or any copy), else torchvision's download."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from ..base import ArrayDataset, DataMissingError, ImageSet, tensor_fingerprint
from ..locate import download_root, search_roots

__all__ = ["load", "read_idx", "CLASSES"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_SUBDIRS = ("", "fashion-mnist", "FashionMNIST/raw")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): images (N, H, W) or labels (N,), uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(data)} bytes, expected {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(stem: str, roots: list[Path]) -> Path | None:
    for root in roots:
        for sub in _SUBDIRS:
            for name in (stem + ".gz", stem):
                p = root / sub / name
                if p.is_file():
                    return p
    return None


def _download(data_root: str | Path | None) -> Path:
    from torchvision.datasets import FashionMNIST

    root = download_root(data_root)
    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataMissingError(
            "Fashion-MNIST not found and the download failed "
            f"({type(exc).__name__}: {exc}). On Debian/Ubuntu run `apt-get install dataset-fashion-mnist`, "
            "or put the four IDX files in a folder and pass --data-root (or set OODLAB_DATA)."
        ) from exc
    return root


def load(split: str = "train", data_root: str | Path | None = None, download: bool = True) -> ImageSet:
    """Fashion-MNIST ``split`` ('train' 60k or 'test' 10k) as 1x28x28 images with labels 0-9."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_stem, lbl_stem = _FILES[split]
    roots = search_roots(data_root)
    img, lbl = _find(img_stem, roots), _find(lbl_stem, roots)
    if img is None or lbl is None:
        if not download:
            raise DataMissingError(
                f"Fashion-MNIST IDX files not found in {', '.join(map(str, roots))}. "
                "Install Debian's dataset-fashion-mnist or pass --data-root."
            )
        root = _download(data_root)
        img, lbl = _find(img_stem, [root]), _find(lbl_stem, [root])
        assert img is not None and lbl is not None, "torchvision's download left no raw IDX files"
    images = torch.from_numpy(read_idx(img).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(lbl).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img} and {lbl} disagree on the number of samples")
    name = "fashionmnist" if split == "train" else "fashionmnist-test"
    return ImageSet(name, ArrayDataset(images, labels), tensor_fingerprint(images, labels), num_classes=10)
