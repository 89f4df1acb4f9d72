"""Automatic parameter search as OpenOOD's APS does it: each grid point scored on validation data only.

For every detector with a grid (:data:`~oodlab.bench.openood.GRIDS`, from OpenOOD's configs), every
point is fitted as usual and scores ID validation data (the suite's ``id_val``, else its seeded
held-out part of ID train) against the suite's validation OOD set (``Suite.ood_val``); the point
with the highest AUROC wins, the first one on a tie (OpenOOD's strict ``>``). Test OOD sets are never
read. Points the detector refuses (a ViM ``dim`` not below the feature width, as OpenOOD's own
``dim = 1000`` on 512-d features) are skipped and named; where it refuses every point, its defaults
are kept and the rows say so. Features come from the cache, so the whole
search adds one extraction of each validation set, whatever the number of points.
"""

from __future__ import annotations

from typing import Any

from ..detectors.base import Detector, create, fit_data
from ..metrics import auroc
from .openood import GRIDS, grid_points
from .runner import BenchContext

__all__ = ["search_parameters"]


def search_parameters(ctx: BenchContext, detectors: list[Detector]) -> tuple[list[Detector], dict[str, dict[str, Any]]]:
    """The detectors at their chosen grid points, and per detector name what the search did (recorded in rows)."""
    suite = ctx.suite
    if suite.ood_val is None:
        raise ValueError(f"--search needs a validation OOD set and suite {suite.name} has none (the OpenOOD "
                         "benchmarks and fashionmnist-split have one; a suite file can name one under [ood] val = ...)")
    id_val = suite.id_val if suite.id_val is not None else suite.held_out()
    get = lambda data: ctx.cache.get(ctx.model, ctx.model_id, data, ctx.batch_size, ctx.device, lazy=True)  # noqa: E731
    val_feats: dict[str, Any] = {}
    chosen, records = [], {}
    for det in detectors:
        if det.name not in GRIDS:
            chosen.append(det)
            records[det.name] = {"grid": None, "note": "OpenOOD's config has no search grid: defaults kept"}
            continue
        source, grid = GRIDS[det.name]
        fit_on = fit_data(det, suite)
        fit_feats = get(fit_on) if fit_on is not None and det.feature_sets() - {"eval"} else None
        reads_eval = "eval" in det.feature_sets()
        if reads_eval and not val_feats:
            val_feats = {"id": get(id_val), "ood": get(suite.ood_val)}
        best, best_auroc, tried, skipped = None, 0.0, [], []
        for point in grid_points(grid):
            try:
                cand = create(det.name, **{**det.config(), **point})
                cand.fit_on(ctx.model, fit_on, fit_feats, device=ctx.device)
            except ValueError as exc:
                skipped.append({**point, "reason": str(exc)})
                continue
            score = lambda data, key: cand.score_on(ctx.model, data, val_feats.get(key), device=ctx.device)  # noqa: E731
            value = auroc(score(id_val, "id").numpy(), score(suite.ood_val, "ood").numpy())
            tried.append({**point, "val_auroc": value})
            if value > best_auroc:
                best, best_auroc = cand, value
        record = {"grid": f"OpenOOD configs/postprocessors/{source}", "id_val": id_val.name,
                  "ood_val": suite.ood_val.name, "points": tried, **({"skipped": skipped} if skipped else {})}
        if best is None:  # OpenOOD's search would crash here; the defaults are kept, and the row says so
            chosen.append(det)
            records[det.name] = {**record, "note": "every grid point was refused: defaults kept"}
            continue
        chosen.append(create(det.name, **best.config()))
        records[det.name] = {**record, "val_auroc": best_auroc}
    return chosen, records
