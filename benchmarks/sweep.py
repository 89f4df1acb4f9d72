"""One-pass sweep speed: oodlab's full sweep vs one detector alone vs pytorch-ood, with AUROC side by side.

All runs use the suite's default checkpoint and the same in-memory data, batches and device, in one
process. Per repeat, in this order:

- oodlab, cold cache: ``run_bench`` with every detector both libraries have, into an empty feature cache;
- oodlab, warm cache: the same again (features come from the cache; only ODIN goes back to the model);
- oodlab, one detector (Energy) alone, cold cache;
- pytorch-ood usage 1 (model path): each detector gets the model, ``fit(loader)`` / ``predict(x)``;
- pytorch-ood usage 2 (hand-wired): features extracted once by hand, then ``fit_features`` /
  ``predict_features`` / ``predict_logits`` / ``predict_feature_maps``; ODIN still needs the model.

Times are medians over the repeats; ratios are taken within each repeat, then the median. pytorch-ood
(PyPI ``pytorch-ood``, the ``bench`` extra) is used only here. Its scores are outlier scores (higher =
more OOD), so they are negated; all AUROCs come from ``oodlab.metrics`` (ID positive). Usage::

    python benchmarks/sweep.py [--suite fashionmnist] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from results_doc import write_section

from oodlab.bench import api as bench_api
from oodlab.bench import run_bench
from oodlab.bench.runner import load_scores
from oodlab.data.base import ImageSet, batches
from oodlab.data.suites import Suite, load_suite
from oodlab.detectors import create, score_with_model
from oodlab.features import extract
from oodlab.metrics import auroc
from oodlab.models.zoo import load_checkpoint
from oodlab.training.recipes import default_checkpoint

DETECTORS = ["msp", "maxlogit", "energy", "odin", "mahalanobis", "knn", "vim", "react", "dice", "ash-p", "ash-b",
             "ash-s"]
BATCH = 512
MODEL_BATCH = 256  # oodlab's runner scores model-path detectors in batches of at most 256
CPU: dict[str, list[float]] = {}  # process CPU seconds per kind of run: robust to pauses of the process
# where pytorch-ood's definition is not oodlab's (which follows the official code / paper)
DIFFERENCES = {
    "msp": "pytorch-ood's softmax is float32 (saturates to 1.0 and ties); oodlab's is float64",
    "odin": "pytorch-ood steps by sign(grad), which is 0 where the gradient is 0; the official code (and oodlab) "
            "steps those pixels by +eps; its softmax is float32",
    "mahalanobis": "pytorch-ood inverts (scatter + 1e-6 I) in float32; oodlab takes the float64 pseudo-inverse "
                   "of the covariance (as sklearn's EmpiricalCovariance in the ViM/OpenOOD code), so dead units "
                   "are ignored instead of weighted by 1e6",
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
def oodlab_run(suite: Suite, ckpt: Path, detectors: list[str], cache: Path, out: Path) -> tuple[float, float, list[dict]]:
    """``run_bench`` into feature cache ``cache``: (seconds in all, seconds of them in the HTML report, rows).

    Every run's process CPU time is added to :data:`CPU` under ``out.name``."""
    previous = os.environ.get("OODLAB_CACHE")
    os.environ["OODLAB_CACHE"] = str(cache)
    draw, report_s = bench_api.write_report, []

    def timed_report(*args, **kwargs):  # run_bench's own call, timed where it happens
        t0 = time.perf_counter()
        try:
            return draw(*args, **kwargs)
        finally:
            report_s.append(time.perf_counter() - t0)

    bench_api.write_report = timed_report
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        rows = run_bench(suite, detectors, ckpt, out, verbose=False)
        CPU.setdefault(out.name, []).append(time.process_time() - c0)
        return time.perf_counter() - t0, sum(report_s), rows
    finally:
        bench_api.write_report = draw
        if previous is None:
            os.environ.pop("OODLAB_CACHE")
        else:
            os.environ["OODLAB_CACHE"] = previous


def oodlab_scores(out: Path, rows: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    keys = {r["detector"]: r["key"] for r in rows}
    return {name: load_scores(out, key) for name, key in keys.items()}


# -- pytorch-ood ----------------------------------------------------------------------------------
def pod_detectors(model, feature_path: bool) -> dict[str, object]:
    """pytorch-ood's detectors with oodlab's defaults; ASH shapes the pooled features, as oodlab's default does."""
    from pytorch_ood.detector import ASH, DICE, KNN, ODIN, EnergyBased, Mahalanobis, MaxLogit, MaxSoftmax, ReAct, ViM

    enc = None if feature_path else model.features
    mdl = None if feature_path else model
    w, b = model.head.weight.detach(), model.head.bias.detach()
    as_map = lambda x: model.features(x)[:, :, None, None]  # noqa: E731
    map_head = lambda t: model.head(t.flatten(1))  # noqa: E731
    return {
        "msp": MaxSoftmax(mdl), "maxlogit": MaxLogit(mdl), "energy": EnergyBased(mdl),
        "odin": ODIN(model, eps=0.0014, temperature=1000.0),  # pixel-space eps: normalisation is in the model
        "mahalanobis": Mahalanobis(enc), "knn": KNN(enc, k=50), "vim": ViM(enc, d=model.feature_dim // 2, w=w, b=b),
        "react": ReAct(model.features, model.head, percentile=0.9), "dice": DICE(enc, w, b, p=0.9),
        "ash-p": ASH(as_map, map_head, "ash-p", percentile=0.60), "ash-b": ASH(as_map, map_head, "ash-b", percentile=0.65),
        "ash-s": ASH(as_map, map_head, "ash-s", percentile=0.90),
    }


def _per_set(suite: Suite, fn: Callable[[ImageSet], torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: -fn(data).double().numpy() for name, data in eval_sets(suite).items()}


def _predict_inputs(det, data: ImageSet, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return torch.cat([det.predict(x).detach() for x, _ in Loader(data, MODEL_BATCH if grad else BATCH)])


def pod_model_path(suite: Suite, ckpt: Path) -> tuple[float, float, dict[str, dict[str, np.ndarray]]]:
    """Seconds in all, seconds spent in ODIN, and scores."""
    t0, c0 = time.perf_counter(), time.process_time()
    model, _ = load_checkpoint(ckpt)
    scores = {}
    for name, det in pod_detectors(model, feature_path=False).items():
        t1 = time.perf_counter()
        det.to("cpu")
        if det.requires_fit:
            det.fit(Loader(suite.id_train))
        scores[name] = _per_set(suite, lambda d, det=det, grad=name == "odin": _predict_inputs(det, d, grad))
        if name == "odin":
            odin_s = time.perf_counter() - t1
    CPU.setdefault("pod1", []).append(time.process_time() - c0)
    return time.perf_counter() - t0, odin_s, scores


@torch.no_grad()
def _features(model, data: ImageSet) -> torch.Tensor:
    return torch.cat([model.features(x) for x, _ in Loader(data)])


def pod_feature_path(suite: Suite, ckpt: Path) -> tuple[float, float, dict[str, dict[str, np.ndarray]]]:
    """Seconds in all, seconds spent in ODIN, and scores."""
    t0, c0 = time.perf_counter(), time.process_time()
    model, _ = load_checkpoint(ckpt)
    z_train, y_train = _features(model, suite.id_train), suite.id_train.dataset.labels
    z = {name: _features(model, data) for name, data in eval_sets(suite).items()}
    with torch.no_grad():
        logits = {name: model.head(v) for name, v in z.items()}
        dets = pod_detectors(model, feature_path=True)
        scores = {}
        for name, det in dets.items():
            det.to("cpu")
            if name in ("msp", "maxlogit", "energy"):
                out = {k: det.predict_logits(v) for k, v in logits.items()}
            elif name in ("mahalanobis", "knn", "vim", "dice"):
                det.fit_features(z_train, y_train)
                out = {k: det.predict_features(v) for k, v in z.items()}
            elif name == "react":
                det.fit_feature_maps(z_train, y_train)
                out = {k: det.predict_feature_maps(v) for k, v in z.items()}
            elif name.startswith("ash"):
                out = {k: det.predict_feature_maps(v[:, :, None, None]) for k, v in z.items()}
            else:
                continue
            scores[name] = {k: -torch.as_tensor(v).double().numpy() for k, v in out.items()}
    t1 = time.perf_counter()
    scores["odin"] = _per_set(suite, lambda d: _predict_inputs(dets["odin"], d, grad=True))
    CPU.setdefault("pod2", []).append(time.process_time() - c0)
    return time.perf_counter() - t0, time.perf_counter() - t1, scores


def ash_feature_map_aurocs(suite: Suite, ckpt: Path) -> str:
    """ASH on the last block's feature map (pytorch-ood's own default) in both libraries, AUROC side by side."""
    from pytorch_ood.detector import ASH

    model, _ = load_checkpoint(ckpt)
    train = extract(model, suite.id_train.subset(512), BATCH, "cpu")
    oods = list(suite.ood)
    lines = ["| detector | " + " | ".join(oods) + " | max abs diff |", "|---" * (len(oods) + 2) + "|"]
    for name, pct in (("ash-p", 60), ("ash-b", 65), ("ash-s", 90)):
        det = create(name, percentile=pct, feature_map=True).fit(train, model.head)
        ours = {k: score_with_model(det, model, d, MODEL_BATCH, "cpu").numpy() for k, d in eval_sets(suite).items()}
        pod = ASH(model.feature_map, lambda t: model.head(model.pool(t)), name, percentile=pct / 100)
        theirs = _per_set(suite, lambda d, pod=pod: _predict_inputs(pod, d, grad=False))
        a = [100 * auroc(ours["id"], ours[o]) for o in oods]
        b = [100 * auroc(theirs["id"], theirs[o]) for o in oods]
        lines.append(f"| {name}, feature map | " + " | ".join(f"{x:.2f} / {y:.2f}" for x, y in zip(a, b))
                     + f" | {max(abs(x - y) for x, y in zip(a, b)):.3f} |")
    return "\n".join(lines)


# -- report ---------------------------------------------------------------------------------------
def auroc_table(ours: dict, theirs: dict, theirs_fp: dict, oods: list[str]) -> tuple[str, float]:
    lines = ["| detector | " + " | ".join(oods) + " | max abs diff | usage 1 vs 2 |", "|---" * (len(oods) + 3) + "|"]
    worst_matching = 0.0
    for name in DETECTORS:
        a = [100 * auroc(ours[name]["id"], ours[name][o]) for o in oods]
        b = [100 * auroc(theirs[name]["id"], theirs[name][o]) for o in oods]
        c = [100 * auroc(theirs_fp[name]["id"], theirs_fp[name][o]) for o in oods]
        diff = max(abs(x - y) for x, y in zip(a, b))
        if name not in DIFFERENCES:
            worst_matching = max(worst_matching, diff)
        cells = [f"{x:.2f} / {y:.2f}" for x, y in zip(a, b)]
        mark = " (definitions differ)" if name in DIFFERENCES else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {diff:.3f}{mark} | {max(abs(x - y) for x, y in zip(b, c)):.3f} |")
    return "\n".join(lines), worst_matching


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(num, den))


def measure(suite: Suite, ckpt: Path, repeats: int) -> str:
    """Run the timing protocol and the AUROC comparison; returns the markdown body."""
    t: dict[str, list[float]] = {k: [] for k in ("cold", "warm", "one", "pod1", "pod2", "report cold", "report warm",
                                                 "report one", "odin cold", "odin warm", "pod1 odin", "pod2 odin")}
    for rep in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for kind, dets, cache in (("cold", DETECTORS, "cache"), ("warm", DETECTORS, "cache"), ("one", ["energy"], "c1")):
                sec, report_s, rows = oodlab_run(suite, ckpt, dets, tmp / cache, tmp / kind)
                t[kind].append(sec)
                t[f"report {kind}"].append(report_s)
                if kind != "one":
                    t[f"odin {kind}"].append(next(r["score_s"] for r in rows if r["detector"] == "odin"))
                if kind == "warm":
                    warm_rows, ours = rows, oodlab_scores(tmp / kind, rows)
        sec, odin_s, theirs = pod_model_path(suite, ckpt)
        t["pod1"].append(sec)
        t["pod1 odin"].append(odin_s)
        sec, odin_s, theirs_fp = pod_feature_path(suite, ckpt)
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
    timing = ["| run | end to end: median s | ratio | without ODIN and the HTML report: median s | ratio "
              "| end to end, process CPU: median s | ratio |", "|---|---|---|---|---|---|---|"]
    timing += [f"| {k} | {statistics.median(full):.1f} | {_median_ratio(full, cold):.2f}x | "
               f"{statistics.median(core):.1f} | {_median_ratio(core, cold_core):.2f}x | "
               f"{statistics.median(cpu[k]):.1f} | {_median_ratio(cpu[k], CPU['cold']):.2f}x |"
               for k, (full, core) in runs.items()]
    per_det = ["| detector | fit s | score s |", "|---|---|---|"]
    per_det += [f"| {r['detector']} | {r['fit_s']:.2f} | {r['score_s']:.2f} |"
                for r in {r["detector"]: r for r in warm_rows}.values()]
    oods = list(suite.ood)
    table, worst = auroc_table(ours, theirs, theirs_fp, oods)
    map_table = ash_feature_map_aurocs(suite, ckpt)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in {"train": suite.id_train, **eval_sets(suite)}.items())
    pod1, pod2 = runs["pytorch-ood usage 1 (model path)"], runs["pytorch-ood usage 2 (hand-wired features)"]
    return f"""Suite `{suite.name}` ({sizes} images), default checkpoint `{Path(ckpt).parent.name}`, CPU, batch {BATCH},
{repeats} repeats in one process (order per repeat: oodlab cold, oodlab warm, Energy alone, pytorch-ood usage 1,
usage 2). ODIN runs in batches of {MODEL_BATCH} in both libraries, as oodlab's runner does for model-path detectors.
Detectors: {', '.join(DETECTORS)}, paper defaults, in both libraries. Ratios are
medians of per-repeat ratios to the oodlab cold sweep in the same column. Wall-clock is what counts; process CPU time
(all threads) is shown as a check that is less sensitive to other users' load and to pauses. All repeats (wall s): {_all(t)}.

{chr(10).join(timing)}

End to end, pytorch-ood usage 1 takes **{_median_ratio(pod1[0], cold):.2f}x** as long as oodlab's one-command
cold sweep, and usage 2 {_median_ratio(pod2[0], cold):.2f}x. `run_bench` also draws an HTML report with one figure per
detector (median {statistics.median(t['report cold']):.1f} s of the cold sweep here), which pytorch-ood does not do; ODIN needs the model in
both libraries (oodlab {statistics.median(t['odin cold']):.1f} s, pytorch-ood {statistics.median(t['pod1 odin']):.1f} s).
Setting both aside, usage 1 takes **{_median_ratio(pod1[1], cold_core):.2f}x** as long as oodlab and usage 2
{_median_ratio(pod2[1], cold_core):.2f}x. The full sweep costs {_median_ratio(cold, t['one']):.2f}x one detector alone. On
a warm cache oodlab extracts nothing; ODIN and the detectors remain. Per detector, warm run:

{chr(10).join(per_det)}

AUROC (%) on `{suite.name}`, oodlab / pytorch-ood usage 1; the last column is the largest AUROC difference between
pytorch-ood's two usages. Largest oodlab vs pytorch-ood difference where the definitions match: **{worst:.3f} points**.

{table}

Where the definitions differ: {'; '.join(f'{k}: {v}' for k, v in DIFFERENCES.items())}. Same definition, other
numerics: KNN (pytorch-ood searches with scikit-learn, oodlab with exact faiss in float32). ASH is configured on the
pooled features in both (pytorch-ood's own default shapes a feature map before pooling); ViM uses d = D/2 in both.

ASH on the last block's feature map instead (oodlab `feature_map=True`, pytorch-ood's default), not timed: both
shape the block output after its final ReLU (the official block-level ablation shapes it before that ReLU).
AUROC (%) oodlab / pytorch-ood:

{map_table}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="fashionmnist")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("OODLAB_QUIET", "1")
    suite = load_suite(a.suite)
    body = measure(suite, default_checkpoint(suite), a.repeats)
    print(body)
    write_section("sweep", f"One-pass sweep vs pytorch-ood ({a.suite})",
                  shlex.join(["python", "benchmarks/sweep.py", *sys.argv[1:]]), body)


def _all(t: dict[str, list[float]]) -> str:
    return "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in v) for k, v in t.items())


if __name__ == "__main__":
    main()
