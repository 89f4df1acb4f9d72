"""Features in memory, and the chunked view every fit and score reads them through.

A :class:`Features` holds one data set seen through one model. Detectors never assume the whole
of ``z`` is in memory: they read :meth:`Features.chunks` (row blocks), :meth:`Features.take`
(chosen rows) and :meth:`Features.shuffled_batches`, which :class:`~oodlab.features.store.StoredFeatures`
implements over on-disk shards too. So a fit at ImageNet size needs memory for one chunk, not N rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..validate import tensor

__all__ = ["Features", "chunk_rows", "CHUNK_BYTES"]

#: Rows per chunk are chosen so that one chunk in float64 takes about this many bytes.
CHUNK_BYTES = 1 << 26


def chunk_rows(dim: int) -> int:
    """Rows per chunk for ``dim``-wide features: ~64 MiB in float64 (4096 rows at 2048-d)."""
    return max(1, CHUNK_BYTES // (8 * max(1, dim)))


@dataclass(frozen=True)
class Features:
    """Penultimate features ``z`` (N, D), ``logits`` (N, C) and ``labels`` (N,) or None for OOD data.

    ``skipped`` lists the indices (in the data set) of images that could not be read: their rows are
    absent, so row ``i`` belongs to the ``i``-th readable item. ``layers`` holds features of intermediate
    layers captured in the same pass (``"<layer>:<reduction>"`` -> (N, K), see :mod:`oodlab.features.layers`);
    :meth:`layer` gives one of them as the ``z`` of a :class:`Features` with the same logits and labels.
    """

    z: Tensor
    logits: Tensor
    labels: Tensor | None = None
    skipped: tuple[int, ...] = ()
    layers: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:  # shapes and dtypes only: NaN / inf are checked where they are read (fit, score)
        tensor("z", self.z, "ND")
        tensor("logits", self.logits, "NC")
        if self.z.shape[0] != self.logits.shape[0] or 0 in (self.z.shape[1], self.logits.shape[1]):
            raise ValueError(f"z must be (N, D) and logits (N, C) with the same N and D, C >= 1; got "
                             f"{tuple(self.z.shape)} and {tuple(self.logits.shape)}")
        if self.labels is not None:
            tensor("labels", self.labels, "N", floating=False)
            if self.labels.shape != (self.z.shape[0],):
                raise ValueError(f"labels must be ({self.z.shape[0]},), got {tuple(self.labels.shape)}")
        for name, x in self.layers.items():
            if x.dim() != 2 or x.shape[0] != self.z.shape[0]:
                raise ValueError(f"layer features {name} must be ({self.z.shape[0]}, K), got {tuple(x.shape)}")

    def __len__(self) -> int:
        return self.z.shape[0]

    @property
    def dim(self) -> int:
        """Feature width D."""
        return self.z.shape[1]

    @property
    def num_classes(self) -> int:
        """Number of logits C."""
        return self.logits.shape[1]

    def accuracy(self) -> float:
        """Top-1 accuracy of ``logits`` against ``labels``."""
        if self.labels is None:
            raise ValueError("these features have no labels (OOD data)")
        return float((self.logits.argmax(1) == self.labels).float().mean())

    def all_finite(self) -> bool:
        """True when no entry of ``z`` or ``logits`` is NaN or infinite."""
        return bool(torch.isfinite(self.z).all()) and bool(torch.isfinite(self.logits).all())

    def load(self) -> Features:
        """These features in memory (they already are)."""
        return self

    def layer(self, name: str) -> Features:
        """The features of intermediate layer ``name`` (a key of :attr:`layers`) as ``z``, with these logits and labels."""
        if name not in self.layers:
            raise ValueError(missing_layer(name, self.layers))
        return Features(self.layers[name], self.logits, self.labels, self.skipped)

    def chunks(self, rows: int | None = None) -> Iterator[Features]:
        """Consecutive row blocks of at most ``rows`` rows (default :func:`chunk_rows`), as views."""
        rows = rows or chunk_rows(self.dim)
        for i in range(0, len(self), rows):
            yield self._rows(slice(i, i + rows))

    def take(self, idx: Tensor) -> Features:
        """The rows at ``idx`` (a 1-d index tensor), in that order."""
        return self._rows(idx)

    def shuffled_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        """Batches of ``z`` in a fresh random order (one ``randperm`` of all rows from ``generator``); the
        last batch may be short."""
        order = torch.randperm(len(self), generator=generator)
        for i in range(0, len(self), batch_size):
            yield self.z[order[i:i + batch_size]]

    def _rows(self, idx: slice | Tensor) -> Features:
        return Features(self.z[idx], self.logits[idx], self.labels[idx] if self.labels is not None else None,
                        layers={k: v[idx] for k, v in self.layers.items()})


def missing_layer(name: str, have: Mapping[str, object]) -> str:
    """The one-line message for features that lack the layer features ``name``."""
    held = ", ".join(sorted(have)) or "none"
    return (f"these features hold no layer features {name!r} (they hold: {held}); extract them with the detector's "
            "layers (FeatureCache.get(..., layers=detector.layer_taps(model, data)))")
