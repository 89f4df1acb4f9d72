"""``oodlab bench`` as a library call: resolve the model, run the detectors, write tables, figures and report.html."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..detectors.base import Detector, available, create
from ..features import FeatureCache
from ..specs import RunSpec, resolve
from ..validate import integer
from .html import write_report
from .report import format_summary, write_tables
from .runner import BenchContext, run_detectors

__all__ = ["run_bench", "parse_detectors"]


def parse_detectors(names: str | list[str] | None, params: dict[str, dict[str, Any]] | None = None) -> list[Detector]:
    """Detectors from a comma list (default: every registered one) with optional per-name parameters."""
    if names is None:
        chosen = available()
    elif isinstance(names, str):
        chosen = [n.strip() for n in names.split(",") if n.strip()]
    else:
        chosen = list(names)
    if not chosen:
        raise ValueError("no detectors given; see `oodlab list` for the names")
    params = params or {}
    unknown = set(params) - set(chosen)
    if unknown:
        raise ValueError(f"parameters given for detectors not in the run: {', '.join(sorted(unknown))}")
    return [create(n, **params.get(n, {})) for n in chosen]


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("oodlab", "torch", "torchvision", "numpy", "scikit-learn", "faiss-cpu", "zuko"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_bench(spec: RunSpec, *, detectors: str | list[str] | None = None, out_dir: str | Path | None = None,
              params: dict[str, dict[str, Any]] | None = None, batch_size: int = 512, command: str | None = None,
              verbose: bool = True, cache_dtype: str = "float32") -> list[dict[str, Any]]:
    """Evaluate ``detectors`` (default: every registered one) on the model and suite ``spec`` names (see
    :func:`oodlab.specs.resolve`) and write results into ``out_dir``. Returns the result rows.
    ``cache_dtype="float16"`` stores the cached features in half precision (half the disk and read
    volume; scores then see rounded features).

    Under ``torchrun`` every rank extracts its own part of each data set into the shared feature
    cache; rank 0 alone fits, scores and writes (the other ranks return an empty list)."""
    if cache_dtype not in ("float32", "float16"):
        raise ValueError(f"cache_dtype must be 'float32' or 'float16', got {cache_dtype!r}")
    integer("batch_size", batch_size, 1)
    dets = parse_detectors(detectors, params)
    loaded, suite_obj = resolve(spec)
    model, meta, model_id = loaded.model, loaded.meta, loaded.model_id
    stamp = distributed.broadcast_object(time.strftime('%Y%m%d-%H%M%S'))  # one folder for every rank
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{suite_obj.name}-{stamp}"
    t0 = time.perf_counter()
    cache = FeatureCache(storage=getattr(torch, cache_dtype))
    ctx = BenchContext(suite_obj, model, model_id, out, cache, batch_size, spec.device)
    rows = run_detectors(ctx, dets)
    if not distributed.is_main():
        return rows
    settings = {
        "suite": suite_obj.name, "checkpoint": loaded.spec, "model_id": model_id,
        "model_meta": {k: meta.get(k) for k in ("arch", "num_classes", "in_channels", "epoch", "objective", "source",
                                                "weights") if k in meta},
        "preprocessing": loaded.prep.describe(), "fit_subset": spec.fit_subset,
        "data": {"id_train": suite_obj.id_train.fingerprint, "id_test": suite_obj.id_test.fingerprint,
                 **{k: v.fingerprint for k, v in suite_obj.ood.items()}},
        "groups": suite_obj.groups, "detectors": {d.name: d.config() for d in dets},
        "command": command, "versions": _versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(time.perf_counter() - t0, 2), "feature_cache": str(ctx.cache.root),
    }
    write_tables(out, rows, settings)
    report = write_report([out])
    if verbose:
        print(format_summary(rows))
        print(f"\nResults in {out}/ (results.md, results.csv, results.json, figures/); report: {report}")
    return rows
