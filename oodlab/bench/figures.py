"""PNG figures of a benchmark run for papers (``oodlab report --png``), drawn from its saved per-sample scores
(matplotlib, imported only when a figure is drawn; no display needed). The HTML report draws its own.

Per detector, one PNG with two panels: the ROC curves of ID against every OOD set, and the score
histograms of ID and each OOD set overlaid, with the threshold that accepts 95% of ID marked.
Per run, a heat-map of AUROC (detectors x OOD sets, plus the mean).

Figures are built on :class:`matplotlib.figure.Figure` directly (never pyplot), under matplotlib's
default style, at fixed sizes, and saved without a "Software" stamp, so the same scores give the
same PNG bytes and a user's matplotlibrc cannot change them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from ..metrics import auroc, fpr_at_tpr
from ..runtime import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DPI", "DETECTOR_SIZE", "ID_COLOR", "heatmap_size", "ood_color", "threshold_at_tpr", "hist_edges",
           "detector_figure", "auroc_heatmap", "save_png"]

DPI = 100
DETECTOR_SIZE = (12.0, 4.8)  # inches: ROC panel + histogram panel
ID_COLOR = "#3a3a3a"
_RC = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9.5,
       "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.grid": True, "grid.alpha": 0.3}
_OOD_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_BINS = 60
_TAIL = 0.5  # percent of each set's scores beyond which the histogram range is cut (tails go to the edge bins)


@contextmanager
def _style() -> Iterator[None]:
    """matplotlib's defaults plus oodlab's font sizes, whatever the user's rcParams say."""
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
        yield


def ood_color(index: int) -> str:
    """The colour of the ``index``-th OOD set of a suite (the same in every figure)."""
    return _OOD_COLORS[index % len(_OOD_COLORS)]


def threshold_at_tpr(score_id: np.ndarray, tpr: float = 0.95) -> float:
    """The score threshold (accept if ``score >= t``) at which oodlab's FPR@TPR is read.

    Same rule as :func:`oodlab.metrics.fpr_at_tpr`: the highest threshold whose ID acceptance rate
    reaches ``tpr``, i.e. the ``ceil(tpr * n)``-th highest ID score; so the fraction of OOD scores
    ``>= t`` is exactly the FPR95 of the results table.
    """
    s = np.sort(np.asarray(score_id, dtype=np.float64).ravel())[::-1]
    if s.size == 0 or not 0.0 < tpr <= 1.0:
        raise ValueError(f"need at least one ID score and 0 < tpr <= 1 (got {s.size} scores, tpr={tpr})")
    k = max(1, math.ceil(s.size * (tpr - 1e-12)))
    return float(s[k - 1])


def hist_edges(sets: Sequence[np.ndarray]) -> np.ndarray:
    lo = min(float(np.percentile(s, _TAIL)) for s in sets)
    hi = max(float(np.percentile(s, 100 - _TAIL)) for s in sets)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, _BINS + 1)


def detector_figure(scores: dict[str, np.ndarray], title: str, id_name: str = "ID",
                    colors: dict[str, str] | None = None) -> Figure:
    """ROC curves (left) and score histograms with the 95%-TPR threshold (right) of one detector.

    ``scores`` maps ``"id"`` and each OOD set's name to per-sample scores (higher = more ID).
    ``colors`` fixes each OOD set's colour (default: by order).
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    if "id" not in scores or len(scores) < 2:
        raise ValueError(f"scores need an 'id' array and at least one OOD set, got keys {sorted(scores)}")
    sid = np.asarray(scores["id"], dtype=np.float64)
    oods = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items() if k != "id"}
    colors = colors or {name: ood_color(i) for i, name in enumerate(oods)}
    thr = threshold_at_tpr(sid)
    with _style():
        fig = Figure(figsize=DETECTOR_SIZE, dpi=DPI, layout="constrained")
        roc_ax, hist_ax = fig.subplots(1, 2, width_ratios=[1, 1.35])
        roc_ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls=":", label="chance")
        roc_ax.axhline(0.95, color="#999999", lw=1, ls="--")
        for name, sood in oods.items():
            labels = np.r_[np.ones(sid.size), np.zeros(sood.size)]
            fpr, tpr, _ = roc_curve(labels, np.r_[sid, sood])
            fpr95 = fpr_at_tpr(sid, sood)
            roc_ax.plot(fpr, tpr, color=colors[name], lw=1.8,
                        label=f"{name}: AUROC {100 * auroc(sid, sood):.1f}, FPR95 {100 * fpr95:.1f}")
            roc_ax.plot([fpr95], [0.95], "o", color=colors[name], ms=5)
        roc_ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title="ROC (ID = positive)",
                   xlabel="false positive rate (OOD accepted)", ylabel="true positive rate (ID accepted)")
        roc_ax.legend(loc="lower right")

        edges = hist_edges([sid, *oods.values()])
        clip = lambda s: np.clip(s, edges[0], edges[-1])  # noqa: E731
        hist_ax.hist(clip(sid), bins=edges, density=True, histtype="stepfilled", color=ID_COLOR, alpha=0.3,
                     label=f"ID: {id_name}")
        for name, sood in oods.items():
            hist_ax.hist(clip(sood), bins=edges, density=True, histtype="step", lw=1.8, color=colors[name], label=name)
        hist_ax.axvline(thr, color="black", lw=1.5, ls="--", label=f"95% TPR threshold = {thr:.4g}")
        hist_ax.set(title="score histograms", xlabel="score (higher = more in-distribution)", ylabel="density")
        hist_ax.legend(loc="best")
        fig.suptitle(title, fontsize=13, fontweight="bold")
    return fig


def heatmap_size(n_rows: int, n_cols: int, label_chars: int = 12) -> tuple[float, float]:
    """Inches of the AUROC heat-map for ``n_rows`` detectors and ``n_cols`` columns (OOD sets + mean),
    widened for row labels longer than 12 characters so the grid keeps its room."""
    return (max(6.0, 2.7 + 0.075 * max(label_chars, 12) + 1.0 * n_cols), max(3.0, 1.6 + 0.45 * n_rows))


def auroc_heatmap(row_labels: list[str], col_labels: list[str], values: np.ndarray, title: str) -> Figure:
    """AUROC in % as a colour grid with each cell's value written in; the best of each column in bold.

    The last column is taken to be the mean and is set apart by a line.
    """
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(row_labels), len(col_labels)) or values.size == 0:
        raise ValueError(f"values must be ({len(row_labels)}, {len(col_labels)}) AUROCs in %, got {values.shape}")
    vmin = min(50.0, math.floor(np.nanmin(values)))
    with _style():
        fig = Figure(figsize=heatmap_size(*values.shape, max(map(len, row_labels))), dpi=DPI, layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=100.0, aspect="auto")
        best = np.nanmax(values, axis=0).round(1)
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=10,
                        color="white" if v < (vmin + 100.0) / 2 else "black",
                        fontweight="bold" if round(v, 1) == best[j] else "normal")
        ax.set_xticks(range(len(col_labels)), col_labels, rotation=20, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(row_labels)), row_labels)
        ax.grid(False)
        ax.axvline(len(col_labels) - 1.5, color="white", lw=3)
        ax.set(title=title, xlabel="OOD set", ylabel="detector")
        fig.colorbar(im, ax=ax, label="AUROC (%)")
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` at its own size as a PNG with no software/date stamp (reproducible bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path
