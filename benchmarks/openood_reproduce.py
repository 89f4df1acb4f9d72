"""Reproduce OpenOOD v1.5's leaderboard with oodlab: its four benchmarks, its released checkpoints, beside its numbers.

For a user who has OpenOOD's data (``--data-root D``: ``benchmark_imglist/``, ``images_classic/``,
``images_largescale/``) and its released checkpoints (``--checkpoints C``: the folders its download script
makes, e.g. ``C/cifar10_resnet18_32x32_base_e100_lr0.1_default/s0/best.ckpt``), and a GPU. ImageNet-1K uses
torchvision's ResNet-50 with ``IMAGENET1K_V1`` (torch's hub cache, or torchvision's download), as OpenOOD does.
For each benchmark and seed it runs ``oodlab bench`` (one feature extraction per data set for every
detector), then prints per method oodlab's near / far AUROC (mean over seeds) beside the leaderboard's.

    python benchmarks/openood_reproduce.py --data-root D --checkpoints C [--benchmarks cifar10,imagenet200]
        [--seeds 0,1,2] [--detectors msp,energy,...] [--fit-subset 200000] [--out runs/openood] [--search]
"""

from __future__ import annotations

import statistics
from pathlib import Path

from harness import mean_sd, parser, table

from oodlab.bench import run_bench
from oodlab.bench.openood import NETWORKS, OPENOOD_NAMES, leaderboard
from oodlab.bench.report import summary_rows
from oodlab.specs import RunSpec

CHECKPOINTS = {"cifar10": ("openood:resnet18_32x32", "cifar10_resnet18_32x32_base_e100_lr0.1_default"),
               "cifar100": ("openood:resnet18_32x32", "cifar100_resnet18_32x32_base_e100_lr0.1_default"),
               "imagenet200": ("openood:resnet18_224x224", "imagenet200_resnet18_224x224_base_e90_lr0.1_default")}


def _runs(benchmark: str, checkpoints: Path, seeds: list[int]) -> list[tuple[str, str, str]]:
    """(label, model spec, weights) for each seed of ``benchmark``'s released checkpoints."""
    if benchmark == "imagenet1k":
        return [("torchvision", "torchvision:resnet50", "IMAGENET1K_V1")]
    model, folder = CHECKPOINTS[benchmark]
    runs = []
    for s in seeds:
        ckpt = checkpoints / folder / f"s{s}" / "best.ckpt"
        if not ckpt.is_file():
            raise SystemExit(f"openood_reproduce: {ckpt} not found: download OpenOOD's v1.5 checkpoints into "
                             f"{checkpoints} (its scripts/download/download.py)")
        runs.append((f"s{s}", model, str(ckpt)))
    return runs


def main() -> None:
    ap = parser(__doc__, write=False)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--checkpoints", required=True)
    ap.add_argument("--benchmarks", default="cifar10,cifar100,imagenet200,imagenet1k")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--detectors", default=",".join(OPENOOD_NAMES))
    ap.add_argument("--fit-subset", type=int, help="ImageNet-1K: fit on a seeded subset of ID train")
    ap.add_argument("--search", action="store_true", help="OpenOOD's automatic parameter search first")
    ap.add_argument("--out", default="runs/openood")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    board = leaderboard()
    for benchmark in a.benchmarks.split(","):
        per: dict[str, dict[str, list[float]]] = {}
        for label, model, weights in _runs(benchmark, Path(a.checkpoints), seeds):
            spec = RunSpec(model, weights=weights, data=benchmark, data_root=a.data_root,
                           fit_subset=a.fit_subset if benchmark == "imagenet1k" else None)
            rows = run_bench(spec, detectors=a.detectors, out_dir=Path(a.out) / benchmark / label, search=a.search,
                             verbose=False)
            groups = {g: [r["ood"] for r in rows if r["group"] == g] for g in ("near", "far")}
            for s in summary_rows(rows):
                for g, names in groups.items():
                    names = sorted(set(names))
                    value = 100 * sum(s["per_ood"][n]["auroc"] for n in names) / len(names)
                    per.setdefault(s["detector"], {}).setdefault(g, []).append(value)
        ref = {r["postprocessor"]: r for r in board if r["benchmark"] == benchmark and
               r["network"] == NETWORKS[benchmark] and r["training"] == "CrossEntropy"}
        print(f"\n{benchmark} ({NETWORKS[benchmark]}, {len(seeds) if benchmark != 'imagenet1k' else 1} run(s)): "
              "near / far AUROC, oodlab vs OpenOOD v1.5's leaderboard")
        rows = []
        for det, g in per.items():
            name = OPENOOD_NAMES.get(det, "-")
            r = ref.get(name)
            near, far = statistics.mean(g["near"]), statistics.mean(g["far"])
            cells = ([r["near_auroc"], r["far_auroc"], f"{near - float(r['near_auroc']):+.2f}",
                      f"{far - float(r['far_auroc']):+.2f}"] if r else ["–"] * 4)
            rows.append([det, mean_sd(g["near"], 1), mean_sd(g["far"], 1), name, *cells])
        print(table(["detector", "oodlab near", "oodlab far", "OpenOOD", "leaderboard near", "leaderboard far", "Δ near",
                     "Δ far"], rows))


if __name__ == "__main__":
    main()
