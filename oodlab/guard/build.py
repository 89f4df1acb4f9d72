"""Guards from a suite and a checkpoint, and guards applied to folders of images: what ``oodlab guard`` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.sources import folder
from ..detectors.base import create, fit_data, fit_detector
from ..features import FeatureCache
from ..runtime import write_csv
from ..specs import RunSpec, resolve
from .conformal import check_rate
from .core import Guard, GuardOutput

__all__ = ["build_guard", "check_folder"]


def build_guard(spec: RunSpec, detector: str, *, alpha: float | None = None, tpr: float | None = None,
                params: dict[str, Any] | None = None) -> Guard:
    """Fit ``detector`` on the ID training features of the suite ``spec`` names, calibrate it on held-out ID data.

    Calibration uses :meth:`Suite.calibration_split` (seeded with ``spec.seed``): the suite's ID
    validation set, or a seeded half of its ID test set (the other half stays for evaluating the
    guard). A detector that fits on held-out ID data (KL-Matching, temperature scaling, AdaSCALE)
    fits on the validation set, so it is then calibrated on a seeded half of ID test: a guard is never
    calibrated on the images its detector was fitted on.
    """
    if alpha is not None and tpr is not None:
        raise ValueError("give alpha (false-alarm rate) or tpr (fraction of ID accepted), not both")
    for name, rate in (("alpha", alpha), ("tpr", tpr)):
        if rate is not None:
            check_rate(rate, name)  # before any fitting: a bad rate is refused at once
    det = create(detector, **(params or {}))
    loaded, suite_obj = resolve(spec)
    seed, device = spec.seed, spec.device
    fit_detector(det, loaded.model, loaded.model_id, suite_obj, FeatureCache(), device=device)
    calibration, _ = suite_obj.calibration_split(seed)
    if fit_data(det, suite_obj) is calibration:  # fitted on id_val: calibrate on unseen ID data
        calibration, _ = suite_obj.id_test.split(len(suite_obj.id_test) // 2, seed)
    guard = Guard(loaded.model, det, loaded.prep, loaded.meta, device)
    return guard.calibrate(calibration, alpha=alpha, tpr=tpr)


def check_folder(guard: Guard, images: str | Path, out_csv: str | Path, strict: bool = False) -> GuardOutput:
    """Decide for every image under ``images`` and write ``file,class,score,p_value,is_ood,error`` to ``out_csv``.

    An unreadable image gets a row with empty values and the reason in ``error`` (``strict``: refuse).
    """
    data = folder.load(images, prep=guard.prep)
    out = guard.predict(data, strict=strict)
    files: list[Path] = data.dataset.files  # type: ignore[attr-defined]
    skipped = set(out.skipped)
    values = iter(zip(out.pred.tolist(), out.score.tolist(), out.p_value.tolist(), out.is_ood.tolist()))
    rows = []
    for i, f in enumerate(files):
        if i in skipped:
            rows.append([str(f), "", "", "", "", data.dataset.error(i)])  # type: ignore[attr-defined]
        else:
            c, s, p, o = next(values)
            rows.append([str(f), c, repr(s), repr(p), int(o), ""])
    write_csv(out_csv, ["file", "class", "score", "p_value", "is_ood", "error"], rows)
    return out

