"""Scoring a folder of images with a fitted detector: what ``oodlab score`` runs."""

from __future__ import annotations

from pathlib import Path

from .data.sources import folder
from .detectors.base import Detector
from .features import extract
from .models.loaders import LoadedModel
from .runtime import write_csv

__all__ = ["score_folder"]


def score_folder(detector: Detector, loaded: LoadedModel, images: str | Path, out_csv: str | Path,
                 strict: bool = False, device: str | None = None) -> int:
    """Score every image under ``images`` at the model's own input size; write ``file,score,error``.

    An unreadable image gets an empty score and its reason (``strict``: refuse the folder). Returns
    the number of images scored.
    """
    data = folder.load(images, prep=loaded.prep)
    feats = extract(loaded.model, data, device=device, strict=strict)
    scores = detector.score_on(loaded.model, data, feats, device=device)
    values = iter(scores.tolist())
    skipped = set(feats.skipped)
    files: list[Path] = data.dataset.files  # type: ignore[attr-defined]
    rows = [[str(f), "", data.dataset.error(i)] if i in skipped else [str(f), repr(next(values)), ""]  # type: ignore[attr-defined]
            for i, f in enumerate(files)]
    write_csv(out_csv, ["file", "score", "error"], rows)
    return len(scores)
