"""One detector fitted and saved, and folders of images scored with it: what ``oodlab fit`` and ``oodlab score`` run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .data.sources import folder
from .detectors.base import Detector, create, fit_data, fit_detector, load_detector
from .features import extract
from .runtime import write_csv
from .specs import RunSpec, resolve, resolve_model

__all__ = ["fit_and_save", "score_folder"]


def fit_and_save(spec: RunSpec, detector: str, out: str | Path, *, params: dict[str, Any] | None = None,
                 verbose: bool = True) -> Path:
    """Fit ``detector`` on what it reads of the suite ``spec`` names and save it as ``out`` (.safetensors + .json).
    Returns the .safetensors path; ``verbose`` says on stderr what the detector read and where it went."""
    det = create(detector, **(params or {}))
    loaded, suite = resolve(spec)
    data = fit_data(det, suite)
    if verbose:
        print(f"note: {det.name} {det.requirements()}" + (f": {data.name} ({len(data)} images)" if data else ""),
              file=sys.stderr)
    path = fit_detector(det, loaded.model, loaded.model_id, suite, device=spec.device).save(out)
    if verbose:
        print(f"saved {det!r} to {path}")
    return path


def score_folder(spec: RunSpec, detector: str | Path | Detector, images: str | Path, out_csv: str | Path, *,
                 strict: bool = False) -> int:
    """Score every image under ``images`` with ``detector`` (fitted, or the path :func:`fit_and_save` wrote) on the
    model ``spec`` names, at the model's own input size; write ``file,score,error``.

    An unreadable image gets an empty score and its reason (``strict``: refuse the folder). Returns
    the number of images scored.
    """
    loaded = resolve_model(spec)
    det = detector if isinstance(detector, Detector) else load_detector(detector)
    data = folder.load(images, prep=loaded.prep)
    feats = extract(loaded.model, data, device=spec.device, strict=strict, layers=det.layer_taps(loaded.model, data))
    scores = det.score_on(loaded.model, data, feats, device=spec.device)
    values = iter(scores.tolist())
    skipped = set(feats.skipped)
    files: list[Path] = data.dataset.files  # type: ignore[attr-defined]
    rows = [[str(f), "", data.dataset.error(i)] if i in skipped else [str(f), repr(next(values)), ""]  # type: ignore[attr-defined]
            for i, f in enumerate(files)]
    write_csv(out_csv, ["file", "score", "error"], rows)
    return len(scores)
