"""What every data source returns: an :class:`ImageSet`, images in [0, 1] with an identity for caching."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..runtime import digest, sha256_hex

__all__ = ["ImageSet", "ArrayDataset", "DataMissingError", "batches", "concat", "tensor_fingerprint", "UNLABELED",
           "BROKEN"]

UNLABELED = -1
BROKEN = -2  # label of an item whose file could not be decoded (a black placeholder image)


class DataMissingError(FileNotFoundError):
    """Raised when a data set is not on disk; the message says how to get it."""


class ArrayDataset(Dataset):
    """Images held in memory as uint8 (N, C, H, W); items are float tensors in [0, 1]."""

    def __init__(self, images: Tensor, labels: Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels is None:
            labels = torch.full((images.shape[0],), UNLABELED, dtype=torch.long)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i].float().div_(255), self.labels[i]


@dataclass(frozen=True)
class ImageSet:
    """One named data set: ``dataset[i]`` is ``(image float (C,H,W) in [0,1], label)`` (label -1 if none).

    ``fingerprint`` identifies the exact content and preprocessing; the feature cache keys on it.
    """

    name: str
    dataset: Dataset
    fingerprint: str
    num_classes: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def subset(self, n: int, seed: int = 0) -> "ImageSet":
        """A reproducible random subset of ``n`` items (all of them if ``n`` >= len)."""
        if n >= len(self):
            return self
        return self.split(n, seed)[0]

    def split(self, n: int, seed: int = 0) -> tuple["ImageSet", "ImageSet"]:
        """A reproducible random split into ``n`` items and the rest, each in the original order."""
        if not 0 < n < len(self):
            raise ValueError(f"cannot split {len(self)} items of {self.name} into {n} and the rest")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        first = ImageSet(self.name, self._take(perm[:n].sort().values), digest(f"{self.fingerprint}|subset:{n}:{seed}"),
                         self.num_classes)
        rest = ImageSet(f"{self.name}-rest", self._take(perm[n:].sort().values),
                        digest(f"{self.fingerprint}|rest:{n}:{seed}"), self.num_classes)
        return first, rest

    def _take(self, idx: Tensor) -> Dataset:
        if isinstance(self.dataset, ArrayDataset):
            return ArrayDataset(self.dataset.images[idx], self.dataset.labels[idx])
        return torch.utils.data.Subset(self.dataset, idx.tolist())


def concat(name: str, sets: list[ImageSet]) -> ImageSet:
    """The items of ``sets`` one after the other, as one data set (labelled where they are)."""
    if all(isinstance(s.dataset, ArrayDataset) for s in sets):
        ds: Dataset = ArrayDataset(torch.cat([s.dataset.images for s in sets]),  # type: ignore[attr-defined]
                                   torch.cat([s.dataset.labels for s in sets]))  # type: ignore[attr-defined]
    else:
        ds = torch.utils.data.ConcatDataset([s.dataset for s in sets])
    return ImageSet(name, ds, digest("concat", *(s.fingerprint for s in sets)), sets[0].num_classes)


def tensor_fingerprint(*parts: Tensor | str) -> str:
    """A short content hash of tensors and strings (identity of in-memory data sets)."""
    return sha256_hex(p.contiguous().numpy().tobytes() if isinstance(p, Tensor) else p for p in parts)[:16]


def default_workers() -> int:
    """DataLoader workers for decoding files: ``$OODLAB_WORKERS``, else the CPU count."""
    return int(os.environ.get("OODLAB_WORKERS") or os.cpu_count() or 1)


def batches(data: ImageSet, batch_size: int, workers: int | None = None, start: int = 0,
            stop: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches of items ``[start, stop)`` (default: all) in order; slices in-memory sets
    directly (much faster than a DataLoader).

    Files are decoded by ``workers`` DataLoader processes (default :func:`default_workers`; 0 = in
    this process), each prefetching 4 batches, into pinned memory when a GPU will take them.
    """
    ds = data.dataset
    stop = len(ds) if stop is None else stop
    if isinstance(ds, ArrayDataset):
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            yield ds.images[i:j].float().div_(255), ds.labels[i:j]
        return
    if (start, stop) != (0, len(ds)):
        ds = torch.utils.data.Subset(ds, range(start, stop))
    workers = default_workers() if workers is None else workers
    n_batches = (len(ds) + batch_size - 1) // batch_size
    workers = min(workers, n_batches) if n_batches > 1 else 0  # a single batch gains nothing from a worker
    yield from DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None)
