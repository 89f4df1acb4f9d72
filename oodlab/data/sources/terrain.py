"""Natural-texture crops: hill-shaded relief of a real elevation model, resized to 28x28.

The source is the digital elevation model of the Jacksboro fault (Tennessee) that ships inside
matplotlib's wheel (``sample_data/jacksboro_fault_dem.npz``), lit as a relief map; every crop
(position, side, rotation, flip) is drawn from ``seed``, so the set is reproducible. It shares no
picture with the auxiliary outlier set (:mod:`.photos`), whose textures are scikit-image's brick,
grass and gravel photos.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..base import ArrayDataset, ImageSet, tensor_fingerprint

__all__ = ["relief", "load"]


@lru_cache(maxsize=1)
def relief() -> np.ndarray:
    """The hill-shaded elevation model as a read-only (H, W) uint8 array (light from the north-west)."""
    import matplotlib
    from matplotlib.colors import LightSource

    with np.load(Path(matplotlib.get_data_path()) / "sample_data" / "jacksboro_fault_dem.npz") as dem:
        elevation, dx, dy = dem["elevation"].astype(np.float64), float(dem["dx"]), float(dem["dy"])
    shade = LightSource(azdeg=315, altdeg=45).hillshade(elevation, vert_exag=0.05, dx=dx, dy=dy)
    out = (255 * shade).round().astype(np.uint8)
    out.setflags(write=False)
    return out


def load(n: int = 2000, size: int = 28, seed: int = 0, min_side: int = 28, max_side: int = 112) -> ImageSet:
    """``n`` random square crops of side ``min_side``..``max_side`` pixels, each rotated by a multiple of
    90 degrees and flipped with p = 0.5, resized to ``size`` x ``size`` with PIL's bilinear filter."""
    from PIL import Image

    source = relief()
    h, w = source.shape
    if n < 1 or not 8 <= min_side <= max_side <= min(h, w):
        raise ValueError(f"need n >= 1 and 8 <= min_side <= max_side <= {min(h, w)}; got n={n}, "
                         f"min_side={min_side}, max_side={max_side}")
    rng = np.random.default_rng(seed)
    image = Image.fromarray(source)
    images = np.empty((n, 1, size, size), dtype=np.uint8)
    for i in range(n):
        side = int(rng.integers(min_side, max_side + 1))
        left, top = int(rng.integers(w - side + 1)), int(rng.integers(h - side + 1))
        crop = np.asarray(image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side)))
        crop = np.rot90(crop, int(rng.integers(4)))
        images[i, 0] = crop[:, ::-1] if rng.random() < 0.5 else crop
    tensor = torch.from_numpy(images)
    return ImageSet("terrain", ArrayDataset(tensor), tensor_fingerprint(tensor))
