"""Any folder of images (Textures, Places365, iNaturalist, SUN, OpenImage-O, ImageNet subsets...).

Images are found recursively; with ``labelled=True`` the first-level sub-folders are the classes,
as in torchvision's ImageFolder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..base import DataMissingError, ImageSet, UNLABELED

__all__ = ["load", "image_transform", "transform_fingerprint", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_transform(size: int, channels: int):
    """Resize (shorter side) + centre crop to ``size``, convert to ``channels`` (1 or 3), to [0,1] tensor."""
    from torchvision import transforms as T

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = T.Grayscale(channels) if channels == 1 else T.Lambda(lambda im: im.convert("RGB"))
    return T.Compose([mode, T.Resize(size), T.CenterCrop(size), T.ToTensor()])


def transform_fingerprint(identity: str, size: int, channels: int) -> str:
    return hashlib.sha256(f"{identity}|size={size}|channels={channels}".encode()).hexdigest()[:16]


class _Files(Dataset):
    def __init__(self, files: list[Path], labels: list[int], size: int, channels: int) -> None:
        self.files, self.labels, self.tf = files, labels, image_transform(size, channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.tf(im), torch.tensor(self.labels[i])


def load(root: str | Path, name: str | None = None, size: int = 32, channels: int = 3,
         labelled: bool = False) -> ImageSet:
    """All images under ``root`` as one set named ``name`` (default: the folder's name)."""
    root = Path(root)
    if not root.is_dir():
        raise DataMissingError(f"image folder {root} does not exist; pass the folder that holds the images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataMissingError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    if labelled:
        classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index.get(p.relative_to(root).parts[0], UNLABELED) for p in files]
    else:
        classes, labels = [], [UNLABELED] * len(files)
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    fp = transform_fingerprint(f"folder:{h.hexdigest()}:{labelled}", size, channels)
    return ImageSet(name or root.name, _Files(files, labels, size, channels), fp, len(classes) or None)
