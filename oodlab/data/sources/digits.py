"""scikit-learn's 1,797 handwritten digits, made MNIST-like: 8x8 upsampled to 20x20, centred in 28x28."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import ArrayDataset, ImageSet, tensor_fingerprint

__all__ = ["load"]


def load() -> ImageSet:
    """The digits as 1x28x28 OOD images (labels dropped: for a Fashion-MNIST model they are OOD)."""
    x = torch.from_numpy(_digit_images()).float().div(16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    x = F.pad(x, (4, 4, 4, 4))
    images = (x * 255).round().to(torch.uint8)
    return ImageSet("digits", ArrayDataset(images), tensor_fingerprint(images))


def _digit_images():
    """``sklearn.datasets.load_digits().images``, read from the file scikit-learn ships without importing
    scikit-learn (its import costs a second a run)."""
    import gzip
    import importlib.util
    from pathlib import Path

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("scikit-learn is not installed: pip install scikit-learn")
    with gzip.open(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz", "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8)
