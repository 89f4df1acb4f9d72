"""Gram matrices: how far an input's layer-wise feature correlations leave the range seen on its predicted class
(Sastry & Oore, ICML 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import FeatureSource
from .base import Detector, layer_list, register
from ..validate import flag, integer, number

__all__ = ["Gram"]


def _deviation(g: Tensor, mins: Tensor, maxs: Tensor) -> Tensor:
    """Sum over entries of the relative distance of ``g`` below ``mins`` or above ``maxs`` (rows matched)."""
    return (F.relu(mins - g) / (mins + 1e-6).abs() + F.relu(g - maxs) / (maxs + 1e-6).abs()).sum(1)


@register
class Gram(Detector):
    """``-sum_l delta_l(x) / E[delta_l]``, divided by the maximum softmax probability (OpenOOD's form).

    For each layer ``l`` and power ``p = 1..powers``, the row sums of the ``p``-th order Gram matrix of the
    layer's map (:func:`oodlab.features.layers.gram_sums`); fit: per class the minimum and maximum of every entry
    over ID train less a seeded ``val_fraction`` of each class, and per layer the mean deviation of those held-out
    rows from their class's range (``E[delta_l]``); score: the deviation from the range of the *predicted*
    class. Read: the paper's code (VectorInstitute/gram-ood-detection), OpenOOD 3c35632
    ``gram_postprocessor.py`` (powers 1-5, 10% held out, score ``-deviation / MSP``) and pytorch-ood 0.4.0
    ``detector/gram.py`` (the same deviation and normalisation, score without the MSP division:
    ``msp_weighted=False``). Deviations: ``layers`` default to the model's stages (OpenOOD hooks every ReLU and
    convolution, which multiplies the cache by the network's depth; give ``layers`` to read more); a layer whose
    held-out deviation is 0 is normalised by 1 (pytorch-ood's rule; OpenOOD divides by zero).
    """

    name = "gram"

    def __init__(self, layers: Sequence[str] | str | None = None, powers: int = 5, val_fraction: float = 0.1,
                 msp_weighted: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.layers = layer_list(layers)
        self.powers = integer("powers", powers, 1, 10)
        self.layer_reduction = f"gram{self.powers}"
        self.val_fraction = number("val_fraction", val_fraction, 0.0, 1.0, high_open=True)
        self.msp_weighted = flag("msp_weighted", msp_weighted)
        self.seed = integer("seed", seed, 0)

    def _held_out(self, labels: Tensor) -> Tensor:
        """A mask of the rows held out for the normalisation: a seeded ``val_fraction`` of each class."""
        g = torch.Generator().manual_seed(self.seed)
        held = torch.zeros(len(labels), dtype=torch.bool)
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero().flatten()
            held[rows[torch.randperm(len(rows), generator=g)[:int(self.val_fraction * len(rows))]]] = True
        return held

    def _fit(self, train: FeatureSource) -> None:
        labels = train.labels
        classes = self.weight.shape[0]
        if labels is None:
            raise ValueError(f"{self.name} needs the class labels of the ID training features")
        held = self._held_out(labels)
        if set(labels[~held].tolist()) != set(range(classes)):
            raise ValueError(f"{self.name} needs training features of every one of the {classes} classes")
        for i, name in enumerate(self.taps):
            source = train.layer(name)
            mins = torch.full((classes, source.dim), torch.inf, dtype=torch.float64)
            maxs = torch.full((classes, source.dim), -torch.inf, dtype=torch.float64)
            start = 0
            for chunk in source.chunks():
                rows = slice(start, start + len(chunk))
                start += len(chunk)
                keep = ~held[rows]
                g, y = chunk.z.double()[keep], chunk.labels[keep]
                for c in y.unique().tolist():
                    mins[c] = torch.minimum(mins[c], g[y == c].min(0).values)
                    maxs[c] = torch.maximum(maxs[c], g[y == c].max(0).values)
            val = held.nonzero().flatten()
            mean_dev = 0.0
            if len(val):
                rows = source.take(val)
                mean_dev = float(_deviation(rows.z.double(), mins[rows.labels], maxs[rows.labels]).mean())
            self.state[f"mins_{i}"], self.state[f"maxs_{i}"] = mins, maxs
            self.state[f"norm_{i}"] = torch.tensor([mean_dev if mean_dev > 0 else 1.0], dtype=torch.float64)

    def _score(self, feats: FeatureSource) -> Tensor:
        total = torch.zeros(len(feats), dtype=torch.float64)
        s = self.state
        for i, name in enumerate(self.taps):
            parts = []
            for chunk in feats.layer(name).chunks():
                pred = chunk.logits.argmax(1)
                parts.append(_deviation(chunk.z.double(), s[f"mins_{i}"][pred], s[f"maxs_{i}"][pred]))
            total += torch.cat(parts) / s[f"norm_{i}"]
        if self.msp_weighted:
            msp = torch.cat([torch.softmax(c.logits.double(), 1).max(1).values for c in feats.chunks()])
            return -total / msp
        return -total
