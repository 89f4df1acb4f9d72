"""scikit-learn's 1,797 handwritten digits, made MNIST-like: 8x8 upsampled to 20x20, centred in 28x28."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import ArrayDataset, ImageSet, tensor_fingerprint

__all__ = ["load"]


def load() -> ImageSet:
    """The digits as 1x28x28 OOD images (labels dropped: for a Fashion-MNIST model they are OOD)."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    x = F.pad(x, (4, 4, 4, 4))
    images = (x * 255).round().to(torch.uint8)
    return ImageSet("digits", ArrayDataset(images), tensor_fingerprint(images))
