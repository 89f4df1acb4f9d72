"""Streaming statistics over features, shared by every detector's fit: memory bounded by one chunk.

* :func:`class_moments`: per-class sums and counts and the total scatter ``sum z z^T`` in float64
  over the chunks of a feature source, from which class means, the shared (class-centred)
  covariance and the all-data mean and covariance follow (Mahalanobis, RMDS, ViM, SHE, ...).
* :func:`mean_features`: the float64 mean (DICE, fDBD, NCI).
* :func:`percentile`: NumPy's linearly interpolated percentile of all entries, **exact**, by
  histogram refinement: one pass for the count and range, then passes that histogram the values
  of the bin holding each wanted order statistic into 65,536 finer bins until that bin holds at
  most ``cap`` values (then they are gathered and sorted) or only one distinct value. At ImageNet
  size (2.6e9 activations) that is 3-4 passes.
* :func:`column_percentiles`: the same, exact, for every column of ``z`` at once (NumPy's
  ``percentile(z, q, axis=0)``; VRA's per-dimension thresholds): each pass histograms all columns
  together, so the number of passes does not grow with the width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import Features, FeatureSource

__all__ = ["Moments", "class_moments", "mean_features", "percentile", "column_percentiles"]


@dataclass(frozen=True)
class Moments:
    """Float64 sums over rows of ``z - shift``: per-class ``sums`` (C, D) and ``counts`` (C,), and
    ``scatter = sum (z - shift)(z - shift)^T``.

    The shift (the first row, for covariances; zero for the plain second moment) keeps the sums at the scale of
    the data's spread: a covariance taken as ``E[z z^T] - mu mu^T`` from raw sums loses everything below
    ``eps * |mu|^2``, and features far from the origin (a ReLU network's) then leave rounding noise where the
    covariance is zero, which a pseudo-inverse turns into huge precisions (constant Mahalanobis scores)."""

    sums: Tensor
    counts: Tensor
    scatter: Tensor
    shift: Tensor

    @property
    def n(self) -> float:
        return float(self.counts.sum())

    def class_means(self) -> Tensor:
        return self.sums / self.counts[:, None] + self.shift

    def shared_covariance(self) -> Tensor:
        """Maximum-likelihood covariance around the class means (divided by N), symmetrised."""
        means = self.sums / self.counts[:, None]  # of z - shift
        cov = (self.scatter - (means.T * self.counts) @ means) / self.n
        return (cov + cov.T) / 2

    def mean(self) -> Tensor:
        return self.sums.sum(0) / self.n + self.shift

    def covariance(self) -> Tensor:
        """Maximum-likelihood covariance of all rows around their one mean, symmetrised."""
        mean = self.sums.sum(0) / self.n  # of z - shift
        cov = (self.scatter - self.n * torch.outer(mean, mean)) / self.n
        return (cov + cov.T) / 2


def class_moments(source: FeatureSource, num_classes: int = 1,
                  transform: Callable[[Tensor], Tensor] | None = None, centred: bool = True) -> Moments:
    """:class:`Moments` of ``transform(z)`` (default ``z``) over ``source``, by class when ``num_classes`` > 1
    (then the labels are required), in one pass over its chunks. ``centred``: sums are shifted by the first row
    (for covariances); ``False`` keeps raw sums, whose ``scatter`` is the plain second moment ``sum z z^T``."""
    sums = torch.zeros(num_classes, source.dim, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    scatter = torch.zeros(source.dim, source.dim, dtype=torch.float64)
    shift = None
    for chunk in source.chunks():
        z = transform(chunk.z) if transform is not None else chunk.z.double()
        z = z.double()
        if shift is None:
            shift = z[0].clone() if centred and len(z) else torch.zeros(source.dim, dtype=torch.float64)
        z = z - shift
        y = chunk.labels.long() if num_classes > 1 else torch.zeros(len(z), dtype=torch.long)
        sums.index_add_(0, y, z)
        counts += torch.bincount(y, minlength=num_classes).double()
        scatter.addmm_(z.T, z)
    return Moments(sums, counts, scatter, shift if shift is not None else torch.zeros(source.dim, dtype=torch.float64))


def mean_features(source: FeatureSource) -> Tensor:
    """Mean of ``z`` over rows, accumulated in float64 chunk by chunk."""
    total = torch.zeros(source.dim, dtype=torch.float64)
    for chunk in source.chunks():
        total += chunk.z.double().sum(0)
    return total / len(source)


# -- exact streaming percentile -------------------------------------------------------------------
BINS = 1 << 16
CAP = 1 << 22
PIECE = 1 << 23  # values a pass handles at a time: 64 MiB in float64, above glibc's mmap threshold, so freed at once


def _lerp_numpy(n: int, q: float) -> tuple[int, int, float]:
    """Order statistics and weight of NumPy's 'linear' percentile ``q`` of ``n`` values (its own arithmetic)."""
    virtual = (n - 1) * np.true_divide(np.float64(q), 100)
    lo = int(np.floor(virtual))
    return max(lo, 0), min(max(lo, 0) + 1, n - 1), float(virtual - np.floor(virtual))


def _bin(v: Tensor, lo: float, hi: float) -> Tensor:
    return ((v - lo) * (BINS / (hi - lo))).floor().clamp_(0, BINS - 1).long()


@dataclass
class _Chain:
    """Values inside nested bins: ``levels`` of (lo, hi, bin) that a value must fall into, in order."""

    levels: list[tuple[float, float, int]]
    lo: float
    hi: float
    below: int  # values smaller than every member
    count: int  # members
    ranks: list[int]

    def members(self, v: Tensor) -> Tensor:
        for lo, hi, b in self.levels:
            v = v[(v >= lo) & (v <= hi)]
            v = v[_bin(v, lo, hi) == b]
        return v


def percentile(source: FeatureSource, q: float, values: Callable[[Features], Tensor] = lambda c: c.z,
               cap: int = CAP) -> float:
    """The ``q``-th percentile (NumPy's default linear interpolation) of every entry of ``values(chunk)``
    over the chunks of ``source``, exact, with memory for one chunk plus ``cap`` gathered values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")

    def passes() -> Iterator[Tensor]:  # pieces of at most PIECE values: the temporaries stay small
        for chunk in source.chunks():
            v = values(chunk).reshape(-1)
            for i in range(0, len(v), PIECE):
                yield v[i:i + PIECE].double()

    n, vmin, vmax = 0, math.inf, -math.inf
    for v in passes():
        if len(v):
            n, vmin, vmax = n + len(v), min(vmin, float(v.min())), max(vmax, float(v.max()))
    if n == 0:
        raise ValueError("no values to take a percentile of")
    lo_rank, hi_rank, frac = _lerp_numpy(n, q)
    found: dict[int, float] = {}
    chains = [_Chain([], vmin, vmax, 0, n, sorted({lo_rank, hi_rank}))]
    while chains:
        for c in [c for c in chains if c.lo == c.hi]:
            found.update({r: c.lo for r in c.ranks})
        chains = [c for c in chains if c.lo != c.hi]
        gather = [c for c in chains if c.count <= cap]
        split = [c for c in chains if c.count > cap]
        # one buffer per gathered chain, filled in place: appended pieces would fragment the heap
        gathered = [torch.empty(c.count, dtype=torch.float64) for c in gather]
        filled = [0] * len(gather)
        hists = [torch.zeros(BINS, dtype=torch.long) for _ in split]
        mins = [torch.full((BINS,), math.inf, dtype=torch.float64) for _ in split]
        maxs = [torch.full((BINS,), -math.inf, dtype=torch.float64) for _ in split]
        if chains:
            for v in passes():
                for j, c in enumerate(gather):
                    m = c.members(v)
                    gathered[j][filled[j]:filled[j] + len(m)] = m
                    filled[j] += len(m)
                for i, c in enumerate(split):
                    m = c.members(v)
                    b = _bin(m, c.lo, c.hi)
                    hists[i] += torch.bincount(b, minlength=BINS)
                    mins[i].scatter_reduce_(0, b, m, "amin")
                    maxs[i].scatter_reduce_(0, b, m, "amax")
        for c, out in zip(gather, gathered):
            ordered = out.sort().values
            found.update({r: float(ordered[r - c.below]) for r in c.ranks})
        nxt = []
        for i, c in enumerate(split):
            cum = hists[i].cumsum(0)
            by_bin: dict[int, list[int]] = {}
            for r in c.ranks:
                by_bin.setdefault(int(torch.searchsorted(cum, r - c.below, right=True)), []).append(r)
            for b, ranks in by_bin.items():
                before = int(cum[b] - hists[i][b])
                nxt.append(_Chain(c.levels + [(c.lo, c.hi, b)], float(mins[i][b]), float(maxs[i][b]),
                                  c.below + before, int(hists[i][b]), ranks))
        chains = nxt
    a, b = np.float64(found[lo_rank]), np.float64(found[hi_rank])
    if frac >= 0.5:
        return float(b - (b - a) * (1 - frac))
    return float(a + (b - a) * frac)


#: Histogram cells (targets x bins) one pass of :func:`column_percentiles` may hold: 3 x 32 MiB.
CELLS = 1 << 22


def _target_blocks(source: FeatureSource, cols: Tensor) -> Iterator[Tensor]:
    """``z[rows][:, cols]`` in float64 over the chunks of ``source``, in row blocks of at most ``CELLS / 2`` entries."""
    rows = max(1, CELLS // (2 * len(cols)))
    for chunk in source.chunks():
        for i in range(0, len(chunk.z), rows):
            yield chunk.z[i:i + rows].double()[:, cols]


def column_percentiles(source: FeatureSource, qs: Sequence[float], cap: int = CAP) -> Tensor:
    """``(len(qs), D)`` float64: the ``q``-th percentile of each column of ``z`` over ``source`` for every ``q``
    in ``qs``, exactly NumPy's ``percentile(z, q, axis=0)`` (linear interpolation), in a few passes.

    Every wanted order statistic of every column is a target holding a closed value interval
    ``[lo, hi]`` (the exact minimum and maximum of its members) and the count of the column's values
    below it. A pass histograms the members of all targets into up to 65,536 bins each (fewer when
    the columns are many, at most :data:`CELLS` cells in all) and narrows each target to the bin that
    holds its rank; a bin's members are exactly the values inside its ``[min, max]``, since binning
    is monotone. Once all the members left number at most ``cap`` they are gathered and sorted.
    """
    qs = [float(q) for q in qs]
    if any(not 0 <= q <= 100 for q in qs):
        raise ValueError(f"percentiles must be in [0, 100], got {qs}")
    d = source.dim
    n, cmin, cmax = 0, torch.full((d,), math.inf, dtype=torch.float64), torch.full((d,), -math.inf, dtype=torch.float64)
    for chunk in source.chunks():
        z = chunk.z.double()
        if len(z):
            n += len(z)
            cmin, cmax = torch.minimum(cmin, z.min(0).values), torch.maximum(cmax, z.max(0).values)
    if n == 0:
        raise ValueError("no values to take a percentile of")
    lerps = [_lerp_numpy(n, q) for q in qs]
    ranks = sorted({r for lo, hi, _ in lerps for r in (lo, hi)})
    col = torch.arange(d).repeat(len(ranks))  # target t: column col[t], order statistic rank[t]
    rank = torch.tensor(ranks).repeat_interleave(d)
    lo, hi = cmin[col].clone(), cmax[col].clone()
    below = torch.zeros(len(col), dtype=torch.long)
    count = torch.full((len(col),), n, dtype=torch.long)
    value = torch.full((len(col),), math.nan, dtype=torch.float64)
    while True:
        flat = lo == hi
        value[flat] = lo[flat]
        act = (~flat & value.isnan()).nonzero().flatten()
        if len(act) == 0:
            break
        a_col, a_lo, a_hi = col[act], lo[act][None, :], hi[act][None, :]
        if int(count[act].sum()) <= cap:  # gather every remaining member and sort
            who, vals = [], []
            for v in _target_blocks(source, a_col):
                rows, t = ((v >= a_lo) & (v <= a_hi)).nonzero(as_tuple=True)
                who.append(t)
                vals.append(v[rows, t])
            who_t, vals_t = torch.cat(who), torch.cat(vals)
            order = vals_t.argsort(stable=True)
            order = order[who_t[order].argsort(stable=True)]  # by target, then by value
            start = torch.bincount(who_t, minlength=len(act)).cumsum(0) - torch.bincount(who_t, minlength=len(act))
            value[act] = vals_t[order][start + rank[act] - below[act]]
            continue
        bins = max(2, min(BINS, CELLS // len(act)))
        scale = bins / (a_hi - a_lo)
        offset = torch.arange(len(act))[None, :] * bins
        hist = torch.zeros(len(act) * bins, dtype=torch.long)
        mins = torch.full((len(act) * bins,), math.inf, dtype=torch.float64)
        maxs = torch.full((len(act) * bins,), -math.inf, dtype=torch.float64)
        for v in _target_blocks(source, a_col):
            member = (v >= a_lo) & (v <= a_hi)
            cell = (((v - a_lo) * scale).floor().clamp_(0, bins - 1).long() + offset)[member]
            m = v[member]
            hist += torch.bincount(cell, minlength=len(hist))
            mins.scatter_reduce_(0, cell, m, "amin")
            maxs.scatter_reduce_(0, cell, m, "amax")
        hist, mins, maxs = hist.view(len(act), bins), mins.view(len(act), bins), maxs.view(len(act), bins)
        cum = hist.cumsum(1)
        b = torch.searchsorted(cum, (rank[act] - below[act])[:, None], right=True)
        below[act] += (cum.gather(1, b) - hist.gather(1, b)).flatten()
        count[act] = hist.gather(1, b).flatten()
        lo[act], hi[act] = mins.gather(1, b).flatten(), maxs.gather(1, b).flatten()
    at = {r: value[i * d:(i + 1) * d].numpy() for i, r in enumerate(ranks)}
    out = []
    for lo_rank, hi_rank, frac in lerps:
        a, b_ = at[lo_rank], at[hi_rank]
        out.append(b_ - (b_ - a) * (1 - frac) if frac >= 0.5 else a + (b_ - a) * frac)
    return torch.from_numpy(np.stack(out))
