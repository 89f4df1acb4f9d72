"""Features of intermediate layers: how a layer's output becomes one vector per input, and how that is named.

A detector that reads intermediate layers names what it reads as ``"<layer>:<reduction>"`` (a *tap*): the
layer is a path in the model's body (:meth:`~oodlab.models.adapter.Classifier.layer`), the reduction one of
:data:`REDUCTIONS`. Extraction applies the reduction inside the forward pass, so one pass per data set gives
``z``, the logits and every tap, and the cache keeps each tap beside ``z``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["REDUCTIONS", "tap", "split_tap"]


def spatial_mean(out: Tensor) -> Tensor:
    """(N, C, ...) -> (N, C): the mean over every position (the identity for (N, C) outputs), in float32."""
    return out.float().flatten(2).mean(2) if out.dim() > 2 else out.float().flatten(1)


def spatial_stat(out: Tensor) -> Tensor:
    """(N, C, ...) -> (N, 2C): the mean and the (unbiased) variance over every position, OpenOOD's ``stat``
    feature type; the mean alone for outputs with one position."""
    flat = out.float().flatten(2) if out.dim() > 2 else out.float()[:, :, None]
    return flat.mean(2) if flat.shape[2] == 1 else torch.cat([flat.mean(2), flat.var(2)], 1)


def flatten(out: Tensor) -> Tensor:
    """(N, ...) -> (N, K): every value of the output (OpenOOD's ``flat``); K grows with the input's size."""
    return out.float().flatten(1)


def gram_sums(out: Tensor, powers: int) -> Tensor:
    """(N, C, ...) -> (N, C * powers): for p = 1..powers, the row sums of the p-th order Gram matrix
    ``(F^p F^p^T)`` of the (C, positions) map ``F``, taken to the power 1/p with their sign (Sastry & Oore, ICML
    2020). A row sum of ``A A^T`` is ``A`` times the sum of ``A``'s rows, so no C x C matrix is formed (C x positions
    operations, not C^2 x positions; the same numbers up to rounding); float64 inside, float32 out."""
    flat = out.double().flatten(2) if out.dim() > 2 else out.double()[:, :, None]
    parts = []
    for p in range(1, powers + 1):
        a = flat ** p
        sums = (a * a.sum(1, keepdim=True)).sum(2)
        parts.append(sums.sign() * sums.abs() ** (1 / p))
    return torch.cat(parts, 1).float()


#: Reduction name -> function from a layer's batched output to (N, K) float32; ``gram<P>`` (e.g. ``gram5``) are
#: the Gram-matrix sums of :func:`gram_sums` for the powers 1..P.
REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": spatial_mean, "stat": spatial_stat, "flat": flatten,
    **{f"gram{p}": (lambda out, p=p: gram_sums(out, p)) for p in range(1, 11)},
}


def tap(layer: str, reduction: str = "mean") -> str:
    """The name of ``reduction`` of ``layer``'s output, e.g. ``"4:mean"``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown layer reduction {reduction!r}; choose one of mean, stat, flat, gram1 ... gram10")
    if not layer or ":" in layer:
        raise ValueError(f"{layer!r} is not a layer path (a name of the body's modules, e.g. '4' or '4.0')")
    return f"{layer}:{reduction}"


def split_tap(name: str) -> tuple[str, str]:
    """(layer, reduction) of a tap name made by :func:`tap`."""
    layer, _, reduction = name.rpartition(":")
    tap(layer, reduction)
    return layer, reduction
