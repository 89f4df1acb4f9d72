"""The 200 grey 25x25 photographs of scikit-image's ``lfw_subset`` (100 faces from Labeled Faces in the
Wild and 100 other crops of the same photos), resized to 28x28: a small natural-photo OOD set.

It ships inside scikit-image and shares no photo with the auxiliary outlier set (:mod:`.photos`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import ArrayDataset, ImageSet, tensor_fingerprint

__all__ = ["load"]


def load(size: int = 28) -> ImageSet:
    """The 200 photos as 1 x ``size`` x ``size`` uint8 images (bilinear, antialiased)."""
    import skimage.data

    x = torch.from_numpy(skimage.data.lfw_subset()).float().unsqueeze(1)  # (200, 1, 25, 25) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8)
    return ImageSet("faces", ArrayDataset(images), tensor_fingerprint(images))
