"""OOD detection tracked along training: does a model have an intermediate stage that detects OOD
better than its final one (the Unleashing Mask observation)?

After every epoch, :func:`track_ood_hook` measures ID accuracy and AUROC/FPR95 of Energy and MSP on
a held-out validation split: a fixed random 20% of the ID test set and of every OOD set
(:func:`holdout_suite`). The numbers join the run's ``history.jsonl``; ``ood_tracking.png`` in the
run folder plots them over the epochs. Evaluate final numbers on the other 80% so that picking an
epoch on this split does not leak into them.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from ..data.base import ArrayDataset, ImageSet, tensor_fingerprint
from ..data.suites import Suite, load_suite
from ..detectors import create
from ..features import extract
from ..metrics import evaluate
from ..models.adapter import Classifier
from .loop import EpochHook

__all__ = ["TRACKED", "split_holdout", "holdout_suite", "ood_metrics", "best_epoch", "plot_tracking", "tracking_hook",
           "track_ood_hook"]

TRACKED = ("energy", "msp")


def split_holdout(data: ImageSet, fraction: float = 0.2, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """``(validation, rest)``: a fixed random ``fraction`` of ``data`` (at least one item) and the disjoint remainder."""
    if not 0.0 < fraction < 1.0 or len(data) < 2:
        raise ValueError(f"need 0 < fraction < 1 and at least 2 items to split {data.name} (got {fraction}, {len(data)})")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(fraction * len(data)))

    def part(idx: torch.Tensor, tag: str) -> ImageSet:
        idx = idx.sort().values
        ds = data.dataset
        sub = ArrayDataset(ds.images[idx], ds.labels[idx]) if isinstance(ds, ArrayDataset) else Subset(ds, idx.tolist())
        fp = tensor_fingerprint(data.fingerprint, f"holdout:{tag}:{fraction}:{seed}")
        return ImageSet(data.name, sub, fp, data.num_classes)

    return part(order[:n_val], "val"), part(order[n_val:], "rest")


def holdout_suite(suite: Suite, fraction: float = 0.2, seed: int = 0) -> tuple[Suite, Suite]:
    """``(validation, test)`` suites: the ID test set and each OOD set split by :func:`split_holdout`."""
    test_parts = split_holdout(suite.id_test, fraction, seed)
    ood_parts = {name: split_holdout(data, fraction, seed) for name, data in suite.ood.items()}
    return tuple(replace(suite, id_test=test_parts[i], ood={n: p[i] for n, p in ood_parts.items()})  # type: ignore[return-value]
                 for i in (0, 1))


@torch.no_grad()
def ood_metrics(model: Classifier, val: Suite, batch_size: int = 512,
                device: torch.device | str | None = None) -> dict[str, float]:
    """``val_acc`` and, for Energy and MSP, ``<det>_auroc`` / ``<det>_fpr95`` (means over the OOD sets)
    and ``<det>_auroc/<ood>`` / ``<det>_fpr95/<ood>`` per set; fractions in [0, 1]."""
    id_feats = extract(model, val.id_test, batch_size, device)
    oods = {name: extract(model, data, batch_size, device) for name, data in val.ood.items()}
    out: dict[str, float] = {"val_acc": id_feats.accuracy()}
    for det_name in TRACKED:
        det = create(det_name).fit(id_feats, model.head)
        s_id = det.score(id_feats).numpy()
        per = {name: evaluate(s_id, det.score(f).numpy()) for name, f in oods.items()}
        for metric in ("auroc", "fpr95"):
            for name, m in per.items():
                out[f"{det_name}_{metric}/{name}"] = m[metric]
            out[f"{det_name}_{metric}"] = sum(m[metric] for m in per.values()) / len(per)
    return out


def best_epoch(rows: list[dict[str, Any]], key: str = "energy_auroc", min_acc: float | None = None) -> int:
    """The epoch with the highest ``key`` (the earliest one on ties), among those with ``val_acc >= min_acc``."""
    scored = [r for r in rows if key in r and (min_acc is None or r["val_acc"] >= min_acc)]
    if not scored:
        raise ValueError(f"no row has {key!r}" + (f" with val_acc >= {min_acc}" if min_acc is not None else "")
                         + ": train with --track-ood to record it")
    return max(scored, key=lambda r: (r[key], -r["epoch"]))["epoch"]


def plot_tracking(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Plot ID accuracy, AUROC and FPR95 (Energy, MSP; means over OOD sets) against the epoch into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    col = lambda key: [100 * r.get(key, math.nan) for r in rows]  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, col("val_acc"), "o-", ms=3, label="validation")
    if any("train_acc" in r for r in rows):
        axes[0].plot(epochs, col("train_acc"), "s--", ms=3, label="training (train mode)")
    axes[0].set_title("ID accuracy (%)")
    for ax, metric in zip(axes[1:], ("auroc", "fpr95")):
        for det_name in TRACKED:
            ax.plot(epochs, col(f"{det_name}_{metric}"), "o-", ms=3, label=det_name)
        ax.set_title(f"mean {metric.upper()} over OOD sets (%)")
    if any("energy_auroc" in r for r in rows):
        best = best_epoch(rows)
        for ax in axes:
            ax.axvline(best, color="grey", lw=0.8, ls=":")
        axes[1].annotate(f"best energy AUROC: epoch {best}", xy=(0.02, 0.04), xycoords="axes fraction", fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tracking_hook(val: Suite, run_dir: str | Path | None = None, device: torch.device | str | None = None) -> EpochHook:
    """An epoch hook returning :func:`ood_metrics` on ``val`` (on ``device``, default: the model's); with
    ``run_dir`` it also redraws ``run_dir/ood_tracking.png`` from the run's history after each epoch."""

    def hook(model: Classifier, epoch: int) -> dict[str, Any]:
        row = ood_metrics(model, val, device=device or next(model.parameters()).device)
        if run_dir is not None:
            history = Path(run_dir) / "history.jsonl"
            past = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
            plot_tracking([r for r in past if r["epoch"] < epoch] + [{"epoch": epoch, **row}],
                          Path(run_dir) / "ood_tracking.png", f"{val.name}: OOD detection along training")
        return row

    return hook


def track_ood_hook(suite_name: str, data_root: str | Path | None = None, device: torch.device | str | None = None,
                   run_dir: str | Path | None = None, fraction: float = 0.2, seed: int = 0) -> EpochHook:
    """:func:`tracking_hook` on the validation part of suite ``suite_name`` (:func:`holdout_suite`)."""
    val, _ = holdout_suite(load_suite(suite_name, data_root), fraction, seed)
    return tracking_hook(val, run_dir, device)
