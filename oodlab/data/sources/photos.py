"""Random crops of the photographs that ship with scikit-image and scikit-learn: auxiliary outliers.

The offline stand-in for the "300K Random Images" set that Outlier Exposure and GReg train on.
The photo list is fixed and every crop (position, side, flip) is drawn from ``seed``, so the set is
reproducible. It is kept disjoint from the test OOD sets of the 28x28 suites: no text or
glyph-like pictures (scikit-image's ``text``, ``page``, ``logo``, ``checkerboard`` are left out),
no digits, no synthetic noise, no Fashion-MNIST.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..base import ArrayDataset, ImageSet, tensor_fingerprint

__all__ = ["SKIMAGE_PHOTOS", "SKLEARN_PHOTOS", "photos", "load"]

SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket", "stereo_motorcycle")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """The source photographs as read-only uint8 arrays, (H, W) grey or (H, W, 3) colour, in a fixed order."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = []
    for name in SKIMAGE_PHOTOS:
        image = getattr(skimage.data, name)()
        out.append(image[0] if isinstance(image, tuple) else image)  # stereo_motorcycle -> left view
    sample = load_sample_images()
    by_name = {path.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]: im for path, im in zip(sample.filenames, sample.images)}
    out += [by_name[name] for name in SKLEARN_PHOTOS]
    for image in out:
        image.setflags(write=False)  # shared through the cache
    return tuple(out)


def load(n: int = 50_000, size: int = 28, channels: int = 1, seed: int = 0, min_side: int | None = None,
         max_fraction: float = 0.5) -> ImageSet:
    """``n`` random square crops resized to ``size`` x ``size`` with ``channels`` 1 (grey) or 3 (RGB).

    Each crop picks a photo uniformly, a side between ``min_side`` (default ``size``) and
    ``max_fraction`` of the photo's shorter side, a position, and a horizontal flip with p = 0.5;
    it is then resized with PIL's antialiased bilinear filter.
    """
    from PIL import Image

    if n < 1 or size < 8 or channels not in (1, 3) or not 0 < max_fraction <= 1:
        raise ValueError(f"need n >= 1, size >= 8, channels 1 or 3 and 0 < max_fraction <= 1; got n={n}, "
                         f"size={size}, channels={channels}, max_fraction={max_fraction}")
    mode = "L" if channels == 1 else "RGB"
    sources = [Image.fromarray(p).convert(mode) for p in photos()]
    lo = min_side or size
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        im = sources[rng.integers(len(sources))]
        w, h = im.size
        side = int(rng.integers(lo, max(lo, int(max_fraction * min(w, h))) + 1))
        left, top = int(rng.integers(w - side + 1)), int(rng.integers(h - side + 1))
        crop = im.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        images[i] = np.asarray(crop).reshape(size, size, channels)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return ImageSet("photos", ArrayDataset(tensor), tensor_fingerprint(tensor))
