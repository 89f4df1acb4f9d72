"""``oodlab bench`` as a library call: resolve the model, run the detectors, write tables, figures and report.html."""

from __future__ import annotations

import csv
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..detectors.base import Detector, available, create
from ..features import FeatureCache
from ..features.extraction import EXTRACT_BATCH
from ..data.suites import Suite
from ..models.loaders import LoadedModel
from ..specs import RunSpec, resolve
from ..runtime import check_writable, disk_full, free_bytes
from ..validate import integer
from .html import write_report
from .openood import leaderboard_lines, write_openood_csv
from .report import format_summary, summary_rows, write_tables
from .runner import BenchContext, load_scores, run_detectors
from .search import search_parameters

__all__ = ["run_bench", "parse_detectors", "openood_table"]


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


#: What a results folder holds (an earlier, maybe interrupted, run's folder resumes).
_RESULTS = {"results.jsonl", "scores", "results.json", "results.csv", "results.md", "openood.csv", "figures",
            "report.html", "fsood"}


def check_results_dir(out: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an ``--out`` that is a file or a folder of someone else's files (one line)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the results")
    others = sorted(p.name for p in out.iterdir() if p.name not in _RESULTS) if out.is_dir() else []
    if others and not overwrite:
        raise ValueError(f"--out {out} is a folder that holds other files ({', '.join(others[:3])}); choose another, "
                         "or pass --overwrite to write the results among them")
    check_writable(out)


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("oodlab", "torch", "torchvision", "numpy", "scikit-learn", "faiss-cpu", "zuko"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_bench(spec: RunSpec, *, detectors: str | list[str] | None = None, out_dir: str | Path | None = None,
              params: dict[str, dict[str, Any]] | None = None, batch_size: int = EXTRACT_BATCH, command: str | None = None,
              verbose: bool = True, cache_dtype: str = "float32", search: bool = False,
              fsood: bool = False, overwrite: bool = False) -> list[dict[str, Any]]:
    """Evaluate ``detectors`` (default: every registered one) on the model and suite ``spec`` names (see
    :func:`oodlab.specs.resolve`) and write results into ``out_dir``. Returns the result rows.
    ``cache_dtype="float16"`` stores the cached features in half precision (half the disk and read
    volume; scores then see rounded features).

    Besides oodlab's tables, ``openood.csv`` holds OpenOOD's ``eval_ood`` table (:mod:`oodlab.bench.openood`).
    ``search``: each detector's parameters chosen first on validation data by OpenOOD's grid
    (:mod:`oodlab.bench.search`). ``fsood``: also OpenOOD's full-spectrum setting (ID test plus the
    covariate-shifted ID sets), written apart into ``out_dir/fsood/``; its rows are not returned. ``out_dir``
    must be new or a results folder of an earlier run (which then resumes); a file, or a folder holding other
    files, is refused before any work unless ``overwrite`` (oodlab then writes its files among them).

    Under ``torchrun`` every rank extracts its own part of each data set into the shared feature
    cache; rank 0 alone fits, scores and writes (the other ranks return an empty list)."""
    if cache_dtype not in ("float32", "float16"):
        raise ValueError(f"cache_dtype must be 'float32' or 'float16', got {cache_dtype!r}")
    integer("batch_size", batch_size, 1)
    if out_dir is not None:
        check_results_dir(Path(out_dir), overwrite)
    dets = parse_detectors(detectors, params)
    loaded, suite_obj = resolve(spec)
    if search and suite_obj.ood_val is None:
        raise ValueError(f"--search needs a validation OOD set and suite {suite_obj.name} has none (the OpenOOD "
                         "benchmarks and fashionmnist-split have one)")
    if fsood:
        suite_obj.full_spectrum()  # refuses a suite without covariate-shifted ID sets before any work
    stamp = distributed.broadcast_object(time.strftime('%Y%m%d-%H%M%S'))  # one folder for every rank
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{suite_obj.name}-{stamp}"
    # scores (float32, one per image and detector) plus tables and report: refuse a disk without room before any work
    need = 4 * len(dets) * (len(suite_obj.id_test) + sum(len(d) for d in suite_obj.ood.values())) + (8 << 20)
    if distributed.is_main() and free_bytes(out) < need:
        raise disk_full(out, need)
    cache = FeatureCache(storage=getattr(torch, cache_dtype))
    rows = _run(loaded, suite_obj, dets, out, cache, batch_size, spec, command, verbose, search)
    if fsood:
        _run(loaded, suite_obj.full_spectrum(), [create(d.name, **d.config()) for d in dets], out / "fsood", cache,
             batch_size, spec, command, verbose, search)
    return rows


def extract_suite(spec: RunSpec, *, detectors: str | list[str] | None = None, params: dict[str, dict[str, Any]] | None = None,
                  batch_size: int = EXTRACT_BATCH, cache_dtype: str = "float32") -> list[dict[str, Any]]:
    """Fill the feature cache with every data set a sweep of ``spec``'s suite reads, each once, and nothing else:
    ID train, ID test, the held-out ID set (:meth:`Suite.held_out`), every OOD set, and where the suite has them
    its validation OOD and covariate-shifted ID sets, with the intermediate layers that ``detectors`` (as for
    :func:`run_bench`: default every registered one) read. Returns one record per set: ``set``, ``images``,
    ``seconds`` and ``extracted`` (False: already cached). Under ``torchrun`` every rank extracts its shards."""
    if cache_dtype not in ("float32", "float16"):
        raise ValueError(f"cache_dtype must be 'float32' or 'float16', got {cache_dtype!r}")
    integer("batch_size", batch_size, 1)
    dets = parse_detectors(detectors, params)
    loaded, suite = resolve(spec)
    layers = tuple(dict.fromkeys(name for d in dets for name in d.layer_taps(loaded.model, suite.id_test)))
    cache = FeatureCache(storage=getattr(torch, cache_dtype))
    sets = [suite.id_train, suite.id_test, suite.held_out(), *suite.ood.values(),
            *([suite.ood_val] if suite.ood_val is not None else []), *suite.csid.values()]
    records, seen = [], set()
    for data in sets:
        if data.fingerprint in seen:
            continue
        seen.add(data.fingerprint)
        before, t0 = cache.extractions, time.perf_counter()
        cache.get(loaded.model, loaded.model_id, data, batch_size, spec.device, lazy=True, layers=layers)
        records.append({"set": data.name, "images": len(data), "seconds": round(time.perf_counter() - t0, 3),
                        "extracted": cache.extractions > before})
    return records


def _run(loaded: LoadedModel, suite_obj: Suite, dets: list[Detector], out: Path, cache: FeatureCache, batch_size: int,
         spec: RunSpec, command: str | None, verbose: bool, search: bool) -> list[dict[str, Any]]:
    """One suite: (search,) run the detectors, write tables, openood.csv, figures and the report."""
    t0 = time.perf_counter()
    ctx = BenchContext(suite_obj, loaded.model, loaded.model_id, out, cache, batch_size, spec.device)
    notes = None
    if search:
        dets, notes = search_parameters(ctx, dets)
    rows = run_detectors(ctx, dets, notes)
    model_acc = ctx.features(train=False, ood=False)[1].accuracy()  # every rank: reading the cache is collective
    if not distributed.is_main():
        return rows
    meta = loaded.meta
    settings = {
        "suite": suite_obj.name, "checkpoint": loaded.spec, "model_id": loaded.model_id,
        "model_meta": {k: meta.get(k) for k in ("arch", "num_classes", "in_channels", "epoch", "objective", "source",
                                                "weights") if k in meta},
        "preprocessing": loaded.prep.describe(), "fit_subset": spec.fit_subset, "model_acc": model_acc,
        "data": {"id_train": suite_obj.id_train.fingerprint, "id_test": suite_obj.id_test.fingerprint,
                 **{k: v.fingerprint for k, v in suite_obj.ood.items()}},
        "groups": suite_obj.groups, "detectors": {d.name: d.config() for d in dets}, "search": search,
        "command": command, "versions": _versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(time.perf_counter() - t0, 2), "feature_cache": str(ctx.cache.root),
    }
    write_tables(out, rows, settings)
    keys = {r["key"]: r["detector"] for r in rows}
    names = [d for d in keys.values()]
    write_openood_csv(out / "openood.csv", {(d if names.count(d) == 1 else k): load_scores(out, k) for k, d in keys.items()},
                      suite_obj.groups, model_acc)
    report = write_report([out])
    if verbose:
        print(format_summary(rows))
        if lines := leaderboard_lines(suite_obj.name, summary_rows(rows), suite_obj.groups):
            print("\n" + "\n".join(lines))
        print(f"\nResults in {out}/ (results.md, results.csv, results.json, openood.csv, figures/); report: {report}")
    return rows


def openood_table(net: nn.Module, benchmark: str, detectors: str | list[str] = "msp", *,
                  data_root: str | Path | None = None, out_dir: str | Path | None = None, search: bool = False,
                  fsood: bool = False, device: str | None = None) -> Any:
    """OpenOOD's ``Evaluator(net, id_name=benchmark, postprocessor_name=...).eval_ood()`` in one call: ``net`` is any
    ``nn.Module`` whose logits are one ``nn.Linear`` of its features and that takes inputs normalised as OpenOOD
    feeds them (the benchmark's mean / std; oodlab normalises its [0, 1] images so); ``benchmark`` is cifar10,
    cifar100, imagenet200 or imagenet1k. Runs :func:`run_bench` and returns the rows of its ``openood.csv``
    (per detector: each near set, ``nearood``, each far set, ``farood``; FPR@95 OOD-positive, AUROC, AUPR_IN,
    AUPR_OUT, ACC in %) as a pandas DataFrame when pandas is installed, else a list of dicts."""
    from ..data.openood import BENCHMARKS, CIFAR_PREP
    from ..data.preprocessing import IMAGENET
    from ..models.adapter import Classifier
    from ..models.openood_nets import NORMALISATIONS
    from ..models.zoo import state_fingerprint

    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown OpenOOD benchmark {benchmark!r}; available: {', '.join(BENCHMARKS)}")
    if not isinstance(net, nn.Module):
        raise ValueError(f"net must be a torch nn.Module, got {type(net).__name__}")
    prep = CIFAR_PREP if benchmark.startswith("cifar") else IMAGENET
    mean, std = NORMALISATIONS[benchmark if benchmark.startswith("cifar") else "imagenet"]
    probe = torch.rand(2, *prep.input_shape, generator=torch.Generator().manual_seed(0))
    model = Classifier.from_final_linear(net.eval(), probe, mean, std)
    model.input_shape = prep.input_shape
    loaded = LoadedModel(model, f"net-{state_fingerprint(net)}-{benchmark}", prep, f"{type(net).__name__} (Python)")
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{benchmark}-openood-{time.strftime('%Y%m%d-%H%M%S')}"
    run_bench(RunSpec(loaded, data=benchmark, data_root=data_root, device=device), detectors=detectors, out_dir=out,
              search=search, fsood=fsood, verbose=False)
    with open(out / "openood.csv", newline="") as f:
        rows = [{k: (v if k in ("detector", "dataset") else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows).set_index(["detector", "dataset"])
