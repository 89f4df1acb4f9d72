"""Guards from a suite and a checkpoint, and guards applied to folders of images: what ``oodlab guard`` runs."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from ..data.sources import folder
from ..data.suites import load_suite
from ..detectors.base import create
from ..features import FeatureCache
from ..models.zoo import checkpoint_fingerprint, load_checkpoint
from ..training.recipes import default_checkpoint
from .core import Guard, GuardOutput

__all__ = ["build_guard", "check_folder"]


def build_guard(detector: str, suite: str = "fashionmnist", checkpoint: str | Path | None = None,
                alpha: float | None = None, tpr: float | None = None, params: dict[str, Any] | None = None,
                data_root: str | Path | None = None, device: str | None = None, seed: int = 0) -> Guard:
    """Fit ``detector`` on the suite's ID training features, calibrate it on held-out ID data.

    Calibration uses :meth:`Suite.calibration_split`: the suite's ID validation set, or a seeded
    half of its ID test set (the other half stays for evaluating the guard).
    """
    suite_obj = load_suite(suite, data_root)
    det = create(detector, **(params or {}))
    if checkpoint is None:
        checkpoint = default_checkpoint(suite_obj, device=device)
    model, meta = load_checkpoint(checkpoint, device or "cpu")
    if model.num_classes != suite_obj.num_classes:
        raise ValueError(f"checkpoint {checkpoint} has {model.num_classes} classes but suite {suite_obj.name} "
                         f"has {suite_obj.num_classes}")
    train = (FeatureCache().get(model, checkpoint_fingerprint(checkpoint), suite_obj.id_train, device=device)
             if det.needs_train else None)
    det.fit(train, model.head)
    calibration, _ = suite_obj.calibration_split(seed)
    guard = Guard(model, det, suite_obj.input_shape, meta, device)
    return guard.calibrate(calibration, alpha=alpha, tpr=tpr)


def check_folder(guard: Guard, images: str | Path, out_csv: str | Path) -> GuardOutput:
    """Decide for every image under ``images`` and write ``file,class,score,p_value,is_ood`` to ``out_csv``."""
    channels, height, width = guard.input_shape
    if height != width:
        raise ValueError(f"folders are read as square images; this guard's model takes {height}x{width}")
    data = folder.load(images, size=height, channels=channels)
    out = guard.predict(data)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(f".{out_csv.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "class", "score", "p_value", "is_ood"])
        for f, c, s, p, o in zip(data.dataset.files, out.pred.tolist(), out.score.tolist(),  # type: ignore[attr-defined]
                                 out.p_value.tolist(), out.is_ood.tolist()):
            w.writerow([str(f), c, repr(s), repr(p), int(o)])
    tmp.replace(out_csv)
    return out
