"""OpenOOD v1.5's protocol, named as such: its metrics, its ``eval_ood`` table, its leaderboard, its search grids.

- :func:`openood_metrics`: FPR@95, AUROC, AUPR_IN, AUPR_OUT as OpenOOD's ``compute_all_metrics`` computes
  them: **OOD is the positive class** for FPR@95 (the fraction of ID flagged when 95% of OOD is caught,
  at the first ROC point reaching it), and both AUPRs are the trapezoid under scikit-learn's
  precision-recall curve (not average precision, which oodlab's own ``aupr_in`` / ``aupr_out`` are).
- :func:`write_openood_csv`: ``openood.csv`` in the layout of ``Evaluator.eval_ood``'s table: per detector,
  one row per near set, ``nearood`` (their unweighted mean), one row per far set, ``farood``; columns
  FPR@95, AUROC, AUPR_IN, AUPR_OUT, ACC in %, ACC being the classifier's own ID test accuracy in every row.
- :data:`LEADERBOARD`: OpenOOD v1.5's published near / far AUROC (``results/*.csv`` of zjysteven/OpenOOD,
  the commit in each row), shipped as data; :func:`leaderboard_lines` sets a run's numbers beside it.
- :data:`GRIDS`: the ``postprocessor_sweep`` grids of OpenOOD's ``configs/postprocessors/*.yml`` (at
  Jingkang50/OpenOOD 3c35632), for the detectors whose OpenOOD config searches (``APS_mode: True``),
  in oodlab's parameter names; :func:`grid_points` enumerates them in OpenOOD's order.
"""

from __future__ import annotations

import csv
import functools
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import cached_json, write_csv
from ..validate import score_array

__all__ = ["OPENOOD_NAMES", "GRIDS", "openood_metrics", "write_openood_csv", "leaderboard", "leaderboard_lines",
           "grid_points"]

#: oodlab detector -> the postprocessor name OpenOOD's leaderboard gives the same method (ASH is ASH-B there).
OPENOOD_NAMES = {
    "msp": "MSP", "maxlogit": "MLS", "energy": "EBO", "odin": "ODIN", "mahalanobis": "MDS", "rmds": "RMDS",
    "react": "ReAct", "ash-b": "ASH", "dice": "DICE", "knn": "KNN", "vim": "VIM", "gradnorm": "GradNorm",
    "gen": "GEN", "klm": "KLM", "temp-scaling": "TempScale", "she": "SHE", "scale": "SCALE", "nnguide": "NNGuide",
    "fdbd": "fDBD", "nci": "NCI", "adascale-a": "AdaSCALE-A", "adascale-l": "AdaSCALE-L",
    "mds-ensemble": "MDSEns", "gram": "Gram",
    "grood": "GrOOD", "weiper-kld": "WeiPer+KLD", "openmax": "OpenMax",
}

#: The network OpenOOD's leaderboard rows of each benchmark use (its released checkpoints; torchvision's for 1K).
NETWORKS = {"cifar10": "ResNet18", "cifar100": "ResNet18", "imagenet200": "ResNet18", "imagenet1k": "ResNet50"}

_ASH_GRID = {"percentile": [65, 70, 75, 80, 85, 90, 95]}
_PAIRS = [[a, b] for a in (60, 65, 70, 75, 80, 85, 90, 95) for b in (65, 70, 75, 80, 85, 90, 95, 99) if a < b]
#: detector -> (OpenOOD config it comes from, {oodlab parameter: values}); keys in the yml's order.
GRIDS: dict[str, tuple[str, dict[str, list[Any]]]] = {
    "energy": ("ebo.yml", {"temperature": [1]}),
    "odin": ("odin.yml", {"temperature": [1, 10, 100, 1000], "eps": [0.0014, 0.0028]}),
    "react": ("react.yml", {"percentile": [85, 90, 95, 99]}),
    "ash-b": ("ash.yml", _ASH_GRID),
    "ash-p": ("ash.yml (OpenOOD's ASH is ASH-B; its grid, applied to ASH-P)", _ASH_GRID),
    "ash-s": ("ash.yml (OpenOOD's ASH is ASH-B; its grid, applied to ASH-S)", _ASH_GRID),
    "knn": ("knn.yml", {"k": [50, 100, 200, 500, 1000]}),
    "vim": ("vim.yml", {"dim": [256, 1000]}),
    "gen": ("gen.yml", {"gamma": [0.01, 0.1, 0.5, 1, 2, 5, 10], "M": [10, 50, 100, 200, 500, 1000]}),
    "scale": ("scale.yml", {"percentile": [65, 70, 75, 80, 85, 90, 95]}),
    "fdbd": ("fdbd.yml", {"distance_as_normalizer": [True, False]}),
    "nci": ("nci.yml", {"alpha": [1e-4, 1e-3, 1e-2, 0.1]}),
    "vra": ("vra.yml", {"high": [85, 90, 95, 99], "low": [1, 5, 10, 15]}),
    "adascale-a": ("adascale_a.yml (its percentile pairs; k1, k2, lambda, o kept at oodlab's)",
                   {"percentiles": _PAIRS}),
    "adascale-l": ("adascale_l.yml (its percentile pairs; k1, k2, lambda, o kept at oodlab's)",
                   {"percentiles": _PAIRS}),
    "grood": ("grood.yaml (its k and sampling_ratio, as k and fraction; its layer, lambda, noise-source and "
              "noise-count axes have no penultimate, ID-only counterpart. In OpenOOD this search changes no score: "
              "setup is not rerun per point and k is never read)",
              {"k": [1, 10, 20, 50, 100], "fraction": [0.01, 0.1, 0.25, 0.5, 0.7, 1.0]}),
    "weiper-kld": ("weiper_kldiv.yml of the official OpenOOD fork mgranz/weiper @ 1c27a4f (Weiper/OpenOOD/configs/"
                   "postprocessors/; Jingkang50/OpenOOD has no WeiPer)",
                   {"lambda_1": [0.1, 1, 2.5, 4], "lambda_2": [0.1, 0.25, 1, 2.5, 5], "n_bins": [60, 80, 100],
                    "perturbation_distance": [1.8, 2.0, 2.2, 2.4], "smoothing": [4, 8, 12, 20, 40],
                    "smoothing_perturbed": [15, 25, 40]}),
}


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of ``grid`` in OpenOOD's order (its ``recursive_generator``: the first key varies fastest)."""
    keys = list(grid)
    combos = itertools.product(*(grid[k] for k in reversed(keys)))
    points = []
    for combo in combos:
        point = dict(zip(reversed(keys), combo))
        if "percentiles" in point:  # AdaSCALE's [p_min, p_max] pair
            p_min, p_max = point.pop("percentiles")
            point.update(p_min=float(p_min), p_max=float(p_max))
        points.append({k: point[k] for k in point})
    return points


def openood_metrics(score_id: Any, score_ood: Any) -> dict[str, float]:
    """FPR@95 (OOD positive), AUROC, AUPR_IN, AUPR_OUT as fractions, computed as OpenOOD computes them."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    sid, sood = score_array("ID", score_id), score_array("OOD", score_ood)
    conf = np.concatenate([sid, sood])
    ood = np.r_[np.zeros(sid.size), np.ones(sood.size)]
    fpr, tpr, _ = roc_curve(ood, -conf)
    p_in, r_in, _ = precision_recall_curve(1 - ood, conf)
    p_out, r_out, _ = precision_recall_curve(ood, -conf)
    return {"fpr95": float(fpr[np.argmax(tpr >= 0.95)]), "auroc": float(auc(fpr, tpr)),
            "aupr_in": float(auc(r_in, p_in)), "aupr_out": float(auc(r_out, p_out))}


def _cached_metrics(score_id: np.ndarray, score_ood: np.ndarray) -> dict[str, float]:
    """:func:`openood_metrics`, cached by the scores' content (a warm run does not recompute it)."""
    key = ["openood-metrics-v1|", np.asarray(score_id, np.float64).tobytes(), b"|",
           np.asarray(score_ood, np.float64).tobytes()]
    return cached_json("openood-metrics", key, lambda: openood_metrics(score_id, score_ood))


def write_openood_csv(path: str | Path, scores: dict[str, dict[str, np.ndarray]], groups: dict[str, list[str]],
                      accuracy: float) -> Path:
    """``openood.csv``: for each detector (``scores[detector] = {"id": ..., "<ood set>": ...}``) OpenOOD's
    ``eval_ood`` rows; ``accuracy`` is the classifier's ID test accuracy (a fraction)."""
    rows = []
    for det, s in scores.items():
        for group in ("near", "far"):
            names = groups.get(group, [])
            if not names:
                continue
            per = [_cached_metrics(s["id"], s[n]) for n in names]
            for name, m in zip(names, per):
                rows.append(_openood_row(det, name, m, accuracy))
            mean = {k: float(np.mean([m[k] for m in per])) for k in per[0]}
            rows.append(_openood_row(det, f"{group}ood", mean, accuracy))
    return write_csv(path, ["detector", "dataset", "FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"], rows)


def _openood_row(det: str, name: str, m: dict[str, float], accuracy: float) -> list[Any]:
    return [det, name, *(f"{100 * m[k]:.4f}" for k in ("fpr95", "auroc", "aupr_in", "aupr_out")), f"{100 * accuracy:.4f}"]


@functools.cache
def leaderboard() -> list[dict[str, str]]:
    """OpenOOD v1.5's published leaderboard rows (standard OOD setting), as shipped with oodlab."""
    with open(Path(__file__).with_name("data") / "openood_v15_leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


def leaderboard_lines(benchmark: str, summary: list[dict[str, Any]], groups: dict[str, list[str]]) -> list[str]:
    """For each detector of a run on an OpenOOD benchmark (rows of :func:`~oodlab.bench.report.summary_rows`),
    oodlab's near / far AUROC (unweighted means over the ``groups``) beside the leaderboard's row for the
    same method (cross-entropy training); no lines for other suites."""
    base = benchmark.removesuffix("-fsood")
    if base not in NETWORKS or base != benchmark:
        return []
    board = {r["postprocessor"]: r for r in leaderboard()
             if r["benchmark"] == base and r["network"] == NETWORKS[base] and r["training"] == "CrossEntropy"}
    lines = [f"OpenOOD v1.5 leaderboard ({base}, {NETWORKS[base]}, near / far AUROC; source results/*.csv of "
             "zjysteven/OpenOOD) beside this run:"]
    for s in summary:
        name = OPENOOD_NAMES.get(s["detector"])
        ref = board.get(name) if name else None
        ours = " / ".join(_group_auroc(s, groups.get(g, [])) for g in ("near", "far"))
        theirs = f"{ref['near_auroc']} / {ref['far_auroc']}" if ref else "not on the leaderboard"
        lines.append(f"  {s['detector']:14s} oodlab {ours}   OpenOOD {name or '-'}: {theirs}")
    return lines


def _group_auroc(summary: dict[str, Any], names: list[str]) -> str:
    values = [summary["per_ood"][n]["auroc"] for n in names if n in summary["per_ood"]]
    return f"{100 * sum(values) / len(values):.2f}" if values else "-"
