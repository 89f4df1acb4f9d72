"""Seeded Gaussian and uniform noise images: the classic sanity-check OOD sets."""

from __future__ import annotations

import torch

from ..base import ArrayDataset, ImageSet, tensor_fingerprint

__all__ = ["gaussian", "uniform"]


def gaussian(n: int = 2000, shape: tuple[int, int, int] = (1, 28, 28), seed: int = 0) -> ImageSet:
    """Pixels ~ N(0.5, 0.25^2) clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = (0.5 + 0.25 * torch.randn((n, *shape), generator=g)).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8)
    return ImageSet("gaussian", ArrayDataset(images), tensor_fingerprint(images))


def uniform(n: int = 2000, shape: tuple[int, int, int] = (1, 28, 28), seed: int = 0) -> ImageSet:
    """Pixels ~ U(0, 1)."""
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return ImageSet("uniform", ArrayDataset(images), tensor_fingerprint(images))
