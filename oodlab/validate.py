"""Checks of what a user hands to oodlab, done once at the boundary, each failing with one line.

Every public constructor and entry point (detectors, :class:`~oodlab.features.Features`,
:func:`~oodlab.metrics.evaluate`, :func:`~oodlab.features.extract`, ``TrainConfig``, the guard,
suites) checks its numbers here, so a NaN learning rate, a percentile of ``"high"`` or a list where
a number belongs is refused before any work starts, with a :class:`ValueError` that names the value,
what it must be and what was given, e.g. ``percentile must be a finite number in [0, 100], got 'high'``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["number", "integer", "flag", "choice", "shape", "score_array", "tensor"]


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def number(name: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, allow_none: bool = False, allow_inf: bool = False, hint: str = "") -> Any:
    """``value`` if it is a real number (not a bool) within the bounds, finite unless ``allow_inf``
    (NaN never); else a one-line :class:`ValueError`. Python numbers come back unchanged, NumPy
    scalars as Python floats (so configs stay JSON)."""
    if value is None and allow_none:
        return None
    ok = _is_number(value) and not math.isnan(value) and (allow_inf or math.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        what = ("a number (inf allowed)" if allow_inf else "a finite number") + _bounds(low, high, low_open, high_open)
        raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}, got {value!r}"
                         + (f"; {hint}" if hint else ""))
    return value if type(value) in (int, float) else float(value)


def integer(name: str, value: Any, low: int | None = None, high: int | None = None, *, allow_none: bool = False,
            hint: str = "") -> int | None:
    """``int(value)`` if ``value`` is a whole number (``5`` or ``5.0``, not a bool) within ``[low, high]``."""
    if value is None and allow_none:
        return None
    ok = _is_number(value) and math.isfinite(value) and float(value).is_integer()
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        raise ValueError(f"{name} must be an integer{_bounds(low, high, False, False)}"
                         f"{' or None' if allow_none else ''}, got {value!r}" + (f"; {hint}" if hint else ""))
    return int(value)


def flag(name: str, value: Any) -> bool:
    """``value`` if it is True or False (a string such as ``"yes"`` or the number 1 is refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    """``value`` if it is one of ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def shape(name: str, value: Any, length: int) -> tuple[int, ...]:
    """A tuple of ``length`` positive integers (an image shape such as (channels, height, width))."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != length:
        raise ValueError(f"{name} must be {length} positive integers, got {value!r}")
    return tuple(integer(f"{name}[{i}]", v, 1) for i, v in enumerate(value))


def score_array(name: str, values: Any) -> np.ndarray:
    """Per-sample scores as a float64 NumPy vector: 1-D, not empty, every value finite."""
    if hasattr(values, "detach"):  # a torch tensor, possibly on the GPU
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} scores must be numbers, one per sample ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} scores must be a 1-D array (one score per sample), got shape {arr.shape}; "
                         "pass the detector's scores, not features or logits")
    if arr.size == 0:
        raise ValueError(f"{name} scores are empty: metrics need at least one ID and one OOD sample")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} scores contain {int(bad.sum())} NaN/inf value(s) of {arr.size}; "
                         "fix the detector or the features before computing metrics")
    return arr


def tensor(name: str, value: Any, dims: str, floating: bool = True) -> None:
    """Refuse anything but a torch tensor with ``len(dims)`` dimensions (``dims`` spells them, e.g. "ND")
    and a floating (or, with ``floating=False``, integer) dtype."""
    import torch

    want = f"a torch.Tensor of shape ({', '.join(dims)})"
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be {want}, got {type(value).__name__}; convert it with torch.as_tensor")
    if value.ndim != len(dims):
        raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name} must hold floating-point values, got {value.dtype}")
    if not floating and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise ValueError(f"{name} must hold integer class ids, got {value.dtype}")
