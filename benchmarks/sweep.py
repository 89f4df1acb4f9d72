"""One-pass sweep speed: oodlab's full sweep vs one detector alone vs pytorch-ood, with AUROC side by side.

All runs use the suite's default checkpoint and the same in-memory data, batches and device, in one
process. Per repeat, in this order:

- ``oodlab extract`` (``extract_suite``) into its own empty cache: the floor;
- oodlab, cold cache: ``run_bench`` with every detector both libraries have (pytorch-ood 0.4), into an
  empty feature cache;
- oodlab, warm cache: the same again into a new folder (features, fitted states, every detector's scores and
  the intervals come from the cache; the tables and the report are written again);
- oodlab, one detector (Energy) alone, cold cache;
- pytorch-ood usage 1 (model path): each detector gets the model, ``fit(loader)`` / ``predict(x)``;
- pytorch-ood usage 2 (hand-wired): features extracted once by hand, then the feature-, feature-map- and
  logit-level APIs, wired as in ``benchmarks/crosscheck.py`` (imported from it); ODIN still needs the model.

Detectors that fit on held-out ID data in oodlab (``fits_on = "val"``: KL-Matching, temperature
scaling) fit on ``Suite.held_out()``; pytorch-ood is given the same images (usage 1 as a loader,
usage 2 as hand-extracted logits).

Times are medians over the repeats; ratios are taken within each repeat, then the median. pytorch-ood
(PyPI ``pytorch-ood``, the ``bench`` extra) is used only here. Its scores are outlier scores (higher =
more OOD), so they are negated; all AUROCs come from ``oodlab.metrics`` (ID positive). Usage::

    python benchmarks/sweep.py [--suite fashionmnist] [--repeats 3] [--detectors msp,klm,...] [--no-write]

``--detectors`` (a subset, for quick checks) and ``--no-write`` print only; docs/results is not written.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from crosscheck import Data, cases
from harness import feature_cache, parser, pytorch_ood, table, write_section

from oodlab.specs import RunSpec
from oodlab.bench import api as bench_api
from oodlab.bench import run_bench
from oodlab.bench import runner as bench_runner
from oodlab.bench.runner import load_scores
from oodlab.data.base import ImageSet, batches
from oodlab.data.suites import Suite, load_suite
from oodlab.detectors import create, score_with_model
from oodlab.features import extract
from oodlab.features.extraction import EXTRACT_BATCH
from oodlab.metrics import auroc
from oodlab.models.zoo import load_checkpoint
from oodlab.training.recipes import default_checkpoint

DETECTORS = ["msp", "maxlogit", "energy", "gen", "klm", "temp-scaling", "odin", "mahalanobis", "rmds", "knn", "vim",
             "she", "fdbd", "nci", "nnguide", "gradnorm", "react", "dice", "ash-p", "ash-b", "ash-s", "scale", "vra"]
HELD_OUT = [name for name in DETECTORS if create(name).fits_on == "val"]  # oodlab fits these on Suite.held_out()
BATCH = EXTRACT_BATCH  # oodlab's default; pytorch-ood's loaders get the same batches
MODEL_BATCH = 256  # oodlab's runner scores model-path detectors in batches of at most 256
CPU: dict[str, list[float]] = {}  # process CPU seconds per kind of run: robust to pauses of the process
# usage 2: the crosscheck case (method, setting) that wires the detector, and the pytorch-ood API it calls
USAGE2 = {
    "msp": ("MSP", "", "predict_logits"), "maxlogit": ("MaxLogit", "", "predict_logits"),
    "energy": ("Energy", "T=1", "predict_logits"), "gen": ("GEN", "gamma 0.1", "predict_logits"),
    "klm": ("KLMatching", "templates on held-out ID", "fit_logits / predict_logits"),
    "temp-scaling": ("TemperatureScaling", "T fitted by each on held-out ID", "fit_logits / predict_logits"),
    "mahalanobis": ("Mahalanobis", "", "fit_features / predict_features"),
    "rmds": ("RMD", "", "fit_features / predict_features"), "knn": ("KNN", "k=50", "fit_features / predict_features"),
    "vim": ("ViM", "dim=D/2", "fit_features / predict_features"), "she": ("SHE", "", "fit_features / predict_features"),
    "fdbd": ("fDBD", "", "fit_features / predict_features"),
    "nci": ("NCI", "defaults", "fit_features / predict_features"),
    "nnguide": ("NNGuide", "defaults", "fit_features / predict_features"),
    "gradnorm": ("GradNorm", "weight gradient", "predict on the head (features in)"),
    "react": ("ReAct", "p=90", "fit_feature_maps / predict_feature_maps"),
    "dice": ("DICE", "p=90", "fit_features / predict_features"), "ash-p": ("ASH-P", "p=60", "predict_feature_maps"),
    "ash-b": ("ASH-B", "p=65", "predict_feature_maps"), "ash-s": ("ASH-S", "p=90", "predict_feature_maps"),
    "scale": ("SCALE", "p=85", "predict_feature_maps"),
    "vra": ("VRA", "defaults", "fit_feature_maps / predict_feature_maps"),
}
# where pytorch-ood's definition is not oodlab's (which follows the official code / paper)
DIFFERENCES = {
    "msp": "pytorch-ood's softmax is float32 (saturates to 1.0 and ties); oodlab's is float64",
    "temp-scaling": "the same objective (MSP at the T that minimises the held-out NLL), but pytorch-ood's LBFGS "
                    "(lr 0.01, 50 iterations, from T = 1) stops short of the minimiser that oodlab finds exactly "
                    "(fitted temperatures in the crosscheck section)",
    "odin": "pytorch-ood steps by sign(grad), which is 0 where the gradient is 0; the official code (and oodlab) "
            "steps those pixels by +eps; its softmax is float32",
    "mahalanobis": "pytorch-ood inverts (scatter + 1e-6 I) in float32; oodlab takes the float64 pseudo-inverse "
                   "of the covariance (as sklearn's EmpiricalCovariance in the ViM/OpenOOD code), so dead units "
                   "are ignored instead of weighted by 1e6",
    "nci": "alpha: oodlab 1e-4 (the paper's and OpenOOD's default), pytorch-ood 0 (no feature-norm term)",
    "nnguide": "oodlab: a seeded 1% bank of ID train, k=100 (official code, OpenOOD); pytorch-ood: the whole "
               "training set as the bank, k=10, so it searches 100x the bank",
    "vra": "oodlab: the official rule (0 below the 60th percentile, x between, the 90th above, per dimension); "
           "pytorch-ood: clip to the 1st / 99th per-dimension ID-train quantiles",
}
# same definition, but a setting or numerics worth naming
NOTES = {
    "gen": "oodlab sums the top M=100 (capped at C; official code), pytorch-ood averages all C (M=None): the same "
           "ranking at C=10",
    "klm": "-min_k KL(p || d_k), templates from the held-out ID set in both",
    "knn": "exact neighbours in both (pytorch-ood searches with scikit-learn, oodlab with faiss in float32)",
    "gradnorm": "pytorch-ood set to the head's weight gradient (param_filter), the official code's and oodlab's rule; "
                "its default sums every parameter it is given (the whole network in usage 1, the head's weight and "
                "bias in usage 2); oodlab's closed form vs pytorch-ood's per-sample autograd (micro-batches of "
                f"{MODEL_BATCH})",
    "scale": "percentile 0.85 (the paper's, oodlab's default) in pytorch-ood too (its default 0.65)",
    "ash-p": "ASH is configured on the pooled features in both (pytorch-ood's own default shapes a feature map "
             "before pooling)",
    "vim": "d = D/2 in both",
}


class Loader:
    """Re-iterable ``(x, y)`` batches of an ImageSet: what a user hands to pytorch-ood's ``fit``."""

    def __init__(self, data: ImageSet, batch_size: int = BATCH) -> None:
        self.data, self.batch_size = data, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(self.data, self.batch_size)


def eval_sets(suite: Suite) -> dict[str, ImageSet]:
    return {"id": suite.id_test, **suite.ood}


# -- oodlab ---------------------------------------------------------------------------------------
def _timed(fn: Callable, spent: list[float]) -> Callable:
    """``fn``, adding the seconds of every call to ``spent``."""
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)
    return run


def oodlab_run(suite: Suite, ckpt: Path, detectors: list[str], cache: Path,
               out: Path) -> tuple[float, float, float, list[dict]]:
    """``run_bench`` into feature cache ``cache``: (seconds in all, seconds of them in the HTML report, seconds of
    them in the confidence intervals of the rows, rows).

    Every run's process CPU time is added to :data:`CPU` under ``out.name``."""
    report_s, ci_s = [], []
    with (feature_cache(cache),  # run_bench's own calls, timed where they happen:
          mock.patch.object(bench_api, "write_report", _timed(bench_api.write_report, report_s)),
          mock.patch.object(bench_runner, "confidence_intervals", _timed(bench_runner.confidence_intervals, ci_s))):
        t0, c0 = time.perf_counter(), time.process_time()
        rows = run_bench(RunSpec(ckpt, data=suite), detectors=detectors, out_dir=out, verbose=False)
        CPU.setdefault(out.name, []).append(time.process_time() - c0)
        return time.perf_counter() - t0, sum(report_s), sum(ci_s), rows


def extract_run(suite: Suite, ckpt: Path, cache: Path) -> float:
    """Seconds of ``extract_suite`` (what ``oodlab extract`` runs) into the empty feature cache ``cache``: the floor
    a sweep is measured against."""
    with feature_cache(cache):
        t0 = time.perf_counter()
        bench_api.extract_suite(RunSpec(ckpt, data=suite), batch_size=BATCH)
        return time.perf_counter() - t0


def oodlab_scores(out: Path, rows: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    keys = {r["detector"]: r["key"] for r in rows}
    return {name: load_scores(out, key) for name, key in keys.items()}


# -- pytorch-ood ----------------------------------------------------------------------------------
def pod_odin(model):
    from pytorch_ood.detector import ODIN

    return ODIN(model, eps=0.0014, temperature=1000.0)  # pixel-space eps: normalisation is in the model


def pod_detectors(model, names: list[str]) -> dict[str, object]:
    """pytorch-ood's detectors on the model (usage 1), each set as in :data:`USAGE2`'s crosscheck case; ASH,
    SCALE and VRA shape the pooled features, as oodlab's defaults do."""
    from pytorch_ood.detector import (ASH, DICE, GEN, KNN, NCI, RMD, SCALE, SHE, VRA, EnergyBased, GradNorm,
                                      KLMatching, Mahalanobis, MaxLogit, MaxSoftmax, NNGuide, ReAct,
                                      TemperatureScaling, ViM, fDBD)

    enc, head = model.features, model.head
    w, b = head.weight.detach(), head.bias.detach()
    as_map = lambda x: enc(x)[:, :, None, None]  # noqa: E731
    map_head = lambda t: head(t.flatten(1))  # noqa: E731
    make = {
        "msp": lambda: MaxSoftmax(model), "maxlogit": lambda: MaxLogit(model), "energy": lambda: EnergyBased(model),
        "gen": lambda: GEN(model), "klm": lambda: KLMatching(model), "temp-scaling": lambda: TemperatureScaling(model),
        "odin": lambda: pod_odin(model), "mahalanobis": lambda: Mahalanobis(enc), "rmds": lambda: RMD(enc),
        "knn": lambda: KNN(enc, k=50), "vim": lambda: ViM(enc, d=model.feature_dim // 2, w=w, b=b),
        "she": lambda: SHE(enc, head), "fdbd": lambda: fDBD(enc, head), "nci": lambda: NCI(enc, head),
        "nnguide": lambda: NNGuide(enc, head),
        "gradnorm": lambda: GradNorm(model, param_filter=lambda n: n == "head.weight", micro_batch_size=MODEL_BATCH),
        "react": lambda: ReAct(enc, head, percentile=0.9), "dice": lambda: DICE(enc, w, b, p=0.9),
        "ash-p": lambda: ASH(as_map, map_head, "ash-p", percentile=0.60),
        "ash-b": lambda: ASH(as_map, map_head, "ash-b", percentile=0.65),
        "ash-s": lambda: ASH(as_map, map_head, "ash-s", percentile=0.90),
        "scale": lambda: SCALE(as_map, map_head, percentile=0.85), "vra": lambda: VRA(as_map, map_head),
    }
    return {name: make[name]() for name in names}


def _per_set(suite: Suite, fn: Callable[[ImageSet], torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: -fn(data).double().numpy() for name, data in eval_sets(suite).items()}


def _predict_inputs(det, data: ImageSet, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return torch.cat([det.predict(x).detach() for x, _ in Loader(data, MODEL_BATCH if grad else BATCH)])


def pod_model_path(suite: Suite, ckpt: Path,
                   names: list[str]) -> tuple[float, float, dict[str, dict[str, np.ndarray]]]:
    """Seconds in all, seconds spent in ODIN, and scores."""
    t0, c0 = time.perf_counter(), time.process_time()
    model, _ = load_checkpoint(ckpt)
    held = suite.held_out()
    scores, odin_s = {}, 0.0
    for name, det in pod_detectors(model, names).items():
        t1 = time.perf_counter()
        det.to("cpu")
        if det.requires_fit:
            det.fit(Loader(held if name in HELD_OUT else suite.id_train))
        scores[name] = _per_set(suite, lambda d, det=det, grad=name == "odin": _predict_inputs(det, d, grad))
        if name == "odin":
            odin_s = time.perf_counter() - t1
    CPU.setdefault("pod1", []).append(time.process_time() - c0)
    return time.perf_counter() - t0, odin_s, scores


@dataclass
class HandFeatures:
    """Features extracted by hand, as crosscheck's pytorch-ood wiring reads them (``z``, ``logits``, ``labels``)."""

    z: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor | None


@torch.no_grad()
def _features(model, data: ImageSet, labels: bool = False) -> HandFeatures:
    z = torch.cat([model.features(x) for x, _ in Loader(data)])
    return HandFeatures(z, model.head(z), data.dataset.labels if labels else None)


def pod_feature_path(suite: Suite, ckpt: Path,
                     names: list[str]) -> tuple[float, float, dict[str, dict[str, np.ndarray]]]:
    """Seconds in all, seconds spent in ODIN, and scores. Every detector but ODIN runs as its crosscheck case
    (:data:`USAGE2`) on features extracted once by hand."""
    t0, c0 = time.perf_counter(), time.process_time()
    model, _ = load_checkpoint(ckpt)
    data = Data(_features(model, suite.id_train, labels=True),
                _features(model, suite.held_out(), labels=True) if set(HELD_OUT) & set(names) else None,
                _features(model, suite.id_test), {k: _features(model, v) for k, v in suite.ood.items()},
                model.head)
    wiring = {(c.method, c.setting): c.pyood for c in cases(pytorch_ood())}
    scores = {}
    with torch.no_grad():
        for name in names:
            if name != "odin":
                scores[name] = {k: v.numpy() for k, v in wiring[USAGE2[name][:2]](data).items()}
    t1 = time.perf_counter()
    if "odin" in names:
        scores["odin"] = _per_set(suite, lambda d, det=pod_odin(model).to("cpu"): _predict_inputs(det, d, grad=True))
    CPU.setdefault("pod2", []).append(time.process_time() - c0)
    return time.perf_counter() - t0, time.perf_counter() - t1, scores


def ash_feature_map_aurocs(suite: Suite, ckpt: Path) -> str:
    """ASH on the last block's feature map (pytorch-ood's own default) in both libraries, AUROC side by side."""
    from pytorch_ood.detector import ASH

    model, _ = load_checkpoint(ckpt)
    train = extract(model, suite.id_train.subset(512), BATCH, "cpu")
    oods = list(suite.ood)
    lines = []
    for name, pct in (("ash-p", 60), ("ash-b", 65), ("ash-s", 90)):
        det = create(name, percentile=pct, feature_map=True).fit(train, model.head)
        ours = {k: score_with_model(det, model, d, MODEL_BATCH, "cpu").numpy() for k, d in eval_sets(suite).items()}
        pod = ASH(model.feature_map, lambda t: model.head(model.pool(t)), name, percentile=pct / 100)
        theirs = _per_set(suite, lambda d, pod=pod: _predict_inputs(pod, d, grad=False))
        a = [100 * auroc(ours["id"], ours[o]) for o in oods]
        b = [100 * auroc(theirs["id"], theirs[o]) for o in oods]
        lines.append([f"{name}, feature map", *(f"{x:.2f} / {y:.2f}" for x, y in zip(a, b)),
                      f"{max(abs(x - y) for x, y in zip(a, b)):.3f}"])
    return table(["detector", *oods, "max abs diff"], lines)


# -- report ---------------------------------------------------------------------------------------
def auroc_table(names: list[str], ours: dict, theirs: dict, theirs_fp: dict, oods: list[str]) -> tuple[str, float]:
    lines = []
    worst_matching = 0.0
    for name in names:
        a = [100 * auroc(ours[name]["id"], ours[name][o]) for o in oods]
        b = [100 * auroc(theirs[name]["id"], theirs[name][o]) for o in oods]
        c = [100 * auroc(theirs_fp[name]["id"], theirs_fp[name][o]) for o in oods]
        diff = max(abs(x - y) for x, y in zip(a, b))
        if name not in DIFFERENCES:
            worst_matching = max(worst_matching, diff)
        mark = " (definitions differ)" if name in DIFFERENCES else ""
        api = f"`{USAGE2[name][2]}`" if name in USAGE2 else "none: the model path (`predict(x)`) in both usages"
        lines.append([name, *(f"{x:.2f} / {y:.2f}" for x, y in zip(a, b)), f"{diff:.3f}{mark}",
                      f"{max(abs(x - y) for x, y in zip(b, c)):.3f}", api])
    return table(["detector", *oods, "max abs diff", "usage 1 vs 2", "pytorch-ood usage 2 API"], lines), worst_matching


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(num, den))


def _odin_s(rows: list[dict]) -> float:
    return next((r["score_s"] for r in rows if r["detector"] == "odin"), 0.0)


def measure(suite: Suite, ckpt: Path, repeats: int, names: list[str] = DETECTORS) -> str:
    """Run the timing protocol and the AUROC comparison for detectors ``names``; returns the markdown body."""
    t: dict[str, list[float]] = {k: [] for k in ("extract", "cold", "warm", "one", "pod1", "pod2", "report cold",
                                                 "report warm",
                                                 "report one", "odin cold", "odin warm", "pod1 odin", "pod2 odin",
                                                 "ci cold", "ci warm", "ci one")}
    for rep in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            t["extract"].append(extract_run(suite, ckpt, tmp / "cx"))
            for kind, dets, cache in (("cold", names, "cache"), ("warm", names, "cache"), ("one", ["energy"], "c1")):
                sec, report_s, ci_s, rows = oodlab_run(suite, ckpt, dets, tmp / cache, tmp / kind)
                t[kind].append(sec)
                t[f"report {kind}"].append(report_s)
                t[f"ci {kind}"].append(ci_s)
                if kind != "one":
                    t[f"odin {kind}"].append(_odin_s(rows))
                if kind == "cold":
                    cold_rows = rows
                if kind == "warm":
                    warm_rows, ours = rows, oodlab_scores(tmp / kind, rows)
        sec, odin_s, theirs = pod_model_path(suite, ckpt, names)
        t["pod1"].append(sec)
        t["pod1 odin"].append(odin_s)
        sec, odin_s, theirs_fp = pod_feature_path(suite, ckpt, names)
        t["pod2"].append(sec)
        t["pod2 odin"].append(odin_s)
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in t.items()), flush=True)

    minus = lambda a, *b: [x - sum(y) for x, *y in zip(t[a], *(t[k] for k in b))]  # noqa: E731
    runs = {
        "oodlab sweep, cold cache (`run_bench`)": (t["cold"], minus("cold", "odin cold", "report cold")),
        "oodlab sweep, warm cache": (t["warm"], minus("warm", "odin warm", "report warm")),
        "oodlab, Energy alone, cold cache": (t["one"], minus("one", "report one")),
        "pytorch-ood usage 1 (model path)": (t["pod1"], minus("pod1", "pod1 odin")),
        "pytorch-ood usage 2 (hand-wired features)": (t["pod2"], minus("pod2", "pod2 odin")),
    }
    cold, cold_core = runs["oodlab sweep, cold cache (`run_bench`)"]
    cpu = dict(zip(runs, (CPU[k] for k in ("cold", "warm", "one", "pod1", "pod2"))))
    timing = table(["run", "end to end: median s", "ratio", "without ODIN and the HTML report: median s", "ratio",
                    "end to end, process CPU: median s", "ratio"],
                   [[k, f"{statistics.median(full):.1f}", f"{_median_ratio(full, cold):.2f}x",
                     f"{statistics.median(core):.1f}", f"{_median_ratio(core, cold_core):.2f}x",
                     f"{statistics.median(cpu[k]):.1f}", f"{_median_ratio(cpu[k], CPU['cold']):.2f}x"]
                    for k, (full, core) in runs.items()])
    warm_by = {r["detector"]: r for r in warm_rows}
    per_det = table(["detector", "cold: fit s", "cold: score s", "warm: score s"],
                    [[r["detector"], f"{r['fit_s']:.2f}", f"{r['score_s']:.2f}", f"{warm_by[r['detector']]['score_s']:.2f}"]
                     for r in {r["detector"]: r for r in cold_rows}.values()])
    oods = list(suite.ood)
    aurocs, worst = auroc_table(names, ours, theirs, theirs_fp, oods)
    map_table = ash_feature_map_aurocs(suite, ckpt)
    held = suite.held_out()
    sizes = ", ".join(f"{k} {len(v)}" for k, v in {"train": suite.id_train, **eval_sets(suite)}.items())
    pod1, pod2 = runs["pytorch-ood usage 1 (model path)"], runs["pytorch-ood usage 2 (hand-wired features)"]
    held_names = [n for n in HELD_OUT if n in names]
    differ = "; ".join(f"{k}: {v}" for k, v in DIFFERENCES.items() if k in names)
    notes = "; ".join(f"{k}: {v}" for k, v in NOTES.items() if k in names)
    held_how = ("the suite's validation split" if suite.id_val is not None else
                f"a seeded {100 * len(held) / len(suite.id_train):.0f}% of ID train, as the suite has no validation split")
    everyone = ": every oodlab detector that pytorch-ood 0.4 also implements" if names == DETECTORS else ", a subset"
    no_ci, ci_cold = minus("cold", "odin cold", "report cold", "ci cold"), statistics.median(t["ci cold"])
    return f"""Suite `{suite.name}` ({sizes} images; held-out ID `{held.name}` {len(held)}: {held_how}), default
checkpoint `{Path(ckpt).name}`, CPU, batch {BATCH}, {repeats} repeat{'s' if repeats > 1 else ''} in one process (order per repeat:
`oodlab extract` into its own empty cache, oodlab cold, oodlab warm, Energy alone, pytorch-ood usage 1, usage 2). ODIN runs in batches of {MODEL_BATCH} in both
libraries, as oodlab's runner does for model-path detectors. Detectors ({len(names)}{everyone}):
{', '.join(names)}; oodlab with its paper defaults, pytorch-ood with its
defaults or, where noted below, oodlab's setting (the settings of `benchmarks/crosscheck.py`, whose wiring usage 2
imports). {', '.join(held_names) or 'No detector'} fit{'s' if len(held_names) == 1 else ''} on the held-out ID set in
oodlab (`Suite.held_out()`), and pytorch-ood gets the same images (usage 1 as a loader, usage 2 as hand-extracted
logits); the others fit on ID train. Every detector has a model-path form (`fit(loader)` / `predict(x)`) in
pytorch-ood 0.4; ODIN alone has no feature-level form, so usage 2 runs it on the model too. Ratios are medians of
per-repeat ratios to the oodlab cold sweep in the same column. Wall-clock is what counts; process CPU time (all
threads) is shown as a check that is less sensitive to other users' load and to pauses. All repeats (wall s):
{_all(t)}.

{timing}

End to end, pytorch-ood usage 1 takes **{_median_ratio(pod1[0], cold):.2f}x** as long as oodlab's one-command
cold sweep, and usage 2 {_median_ratio(pod2[0], cold):.2f}x. `run_bench` also draws an HTML report with one figure per
detector (median {statistics.median(t['report cold']):.1f} s of the cold sweep here), which pytorch-ood does not do; ODIN needs the model in
both libraries (oodlab {statistics.median(t['odin cold']):.1f} s, pytorch-ood {statistics.median(t['pod1 odin']):.1f} s).
Setting both aside, usage 1 takes **{_median_ratio(pod1[1], cold_core):.2f}x** as long as oodlab and usage 2
{_median_ratio(pod2[1], cold_core):.2f}x. `run_bench` also computes 95% intervals of AUROC (DeLong) and FPR95 (1000
bootstrap draws) for every row ({len(names)} detectors x {len(suite.ood)} OOD sets; median {ci_cold:.1f} s of the cold sweep),
which pytorch-ood does not either; without them as well (oodlab {statistics.median(no_ci):.1f} s), usage 1 takes
**{_median_ratio(pod1[1], no_ci):.2f}x** as long as oodlab and usage 2 {_median_ratio(pod2[1], no_ci):.2f}x.
Against the floor, `oodlab extract` of the same data sets ({statistics.median(t['extract']):.1f} s) plus ODIN's own
passes ({statistics.median(t['odin cold']):.1f} s), the cold sweep takes
**{_median_ratio(cold, [e + o for e, o in zip(t['extract'], t['odin cold'])]):.2f}x**.
The full sweep costs {_median_ratio(cold, t['one']):.2f}x one detector alone (Energy fits on nothing, so that run extracts
only ID test and the OOD sets). On a warm cache oodlab extracts nothing, fits nothing and does not go back to the
model: fitted states, every detector's scores and the intervals are cached by content next to the features;
only the tables and the report are written again.
Per detector, last repeat (fit and score seconds inside `run_bench`; extraction is not in them):

{per_det}

AUROC (%) on `{suite.name}`, oodlab / pytorch-ood usage 1; "usage 1 vs 2" is the largest AUROC difference between
pytorch-ood's two usages; the last column is the API usage 2 calls. Largest oodlab vs pytorch-ood difference where
the definitions match: **{worst:.3f} points**.

{aurocs}

Where the definitions differ: {differ or 'nowhere'}. Same definition, other settings or numerics: {notes or 'none'}.

ASH on the last block's feature map instead (oodlab `feature_map=True`, pytorch-ood's default), not timed: both
shape the block output after its final ReLU (the official block-level ablation shapes it before that ReLU).
AUROC (%) oodlab / pytorch-ood:

{map_table}
"""


def main() -> None:
    ap = parser(__doc__, repeats=3, suite="fashionmnist")
    ap.add_argument("--detectors", help=f"comma list, a subset of {','.join(DETECTORS)} (quick checks; not written)")
    a = ap.parse_args()
    names = DETECTORS
    if a.detectors:
        wanted = a.detectors.split(",")
        if unknown := sorted(set(wanted) - set(DETECTORS)):
            ap.error(f"unknown detectors {unknown}; choose from {','.join(DETECTORS)}")
        names = [n for n in DETECTORS if n in wanted]
    pytorch_ood()
    os.environ.setdefault("OODLAB_QUIET", "1")
    suite = load_suite(a.suite)
    t0 = time.perf_counter()
    body = measure(suite, default_checkpoint(suite), a.repeats, names)
    print(body)
    print(f"measured in {time.perf_counter() - t0:.0f} s", flush=True)
    if not a.no_write and not a.detectors:
        write_section("sweep", f"One-pass sweep vs pytorch-ood ({a.suite})", body)


def _all(t: dict[str, list[float]]) -> str:
    return "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in v) for k, v in t.items())


if __name__ == "__main__":
    main()
