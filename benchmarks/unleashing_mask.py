"""Unleashing Mask on Fashion-MNIST: the per-epoch curve of a long ERM run, then UM and UMAP from its
final checkpoint; Energy and MSP AUROC / FPR95 per OOD set for final, best-intermediate, UM and UMAP.

Protocol (2 shared CPU cores): a fixed random subset of the Fashion-MNIST training set, no
augmentation, and enough epochs to fit it almost completely (memorisation is what UM undoes).
Every epoch is tracked on a validation split (a fixed 20% of the ID test set and of every OOD
set); intermediate epochs and the hand-set constraint are picked there, and the table is measured
on the other 80%. A sensitivity table runs UM / UMAP over constraints and learning rates (validation);
its best setting within the accuracy budget is evaluated on the test split and repeated with other
fine-tuning seeds. Two robustness checks follow: the ERM run repeated with other seeds, each with
UM at a constraint chosen from ID data only (test split), and a search for a setting with a better
intermediate stage (other learning rate, label noise, near OOD, another thread count), each over seeds.
Every run trains on ``--threads`` CPU threads (default 1), since the weights depend on it; interrupted runs
resume, and run folders trained on another thread count are refused. Usage::

    python benchmarks/unleashing_mask.py [--train-size 5000] [--epochs 30] [--um-epochs 10] [--threads 1] [--stage erm]
        [--no-write]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from harness import SECTIONS, parser, read_rows, table, threads, write_section

from oodlab.specs import RunSpec
from oodlab.bench import run_bench
from oodlab.bench.report import summary_rows
from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
from oodlab.data.suites import SYNTHETIC_28, Suite, load_suite
from oodlab.models.zoo import load_checkpoint
from oodlab.runtime import default_device
from oodlab.training import TrainConfig
from oodlab.training.loop import compute_signature
from oodlab.training.recipes import train_on_suite
from oodlab.training.tracking import best_epoch, holdout_suite, plot_tracking, tracking_hook
from oodlab.training.unleashing_mask import estimate_constraint, write_atypical_report

ACC_BUDGET = 1.5  # points of ID accuracy a method may lose against the final model
ID_ONLY_GAP = 1.0  # the ID-only constraint's epoch: within this many points (a margin under the budget, since
#                    a fine-tune from the final model ends below the accuracy of the epoch whose loss it targets)
SYNTHETIC = SYNTHETIC_28  # the noise OOD sets; the others are natural images


@dataclass(frozen=True)
class Setting:
    """One ERM setting of the search for a better intermediate stage (``lr=None``: the main run's;
    ``threads``: CPU threads for the run instead of ``--threads``, which changes only the summation order)."""

    key: str
    label: str
    suite: str = "fashionmnist"
    lr: float | None = None
    label_noise: float = 0.0
    threads: int | None = None


SETTINGS = (Setting("clean", "as the main run"),
            Setting("clean-2threads", "as the main run, on 2 CPU threads", threads=2),
            Setting("lr0.01", "lr 0.01", lr=0.01),
            Setting("noise0.2", "20% of the training labels flipped", label_noise=0.2),
            Setting("split", "fashionmnist-split (ID classes 0-5; near OOD: classes 6-9)", suite="fashionmnist-split"))


def with_label_noise(data: ImageSet, fraction: float, seed: int = 0) -> ImageSet:
    """``data`` with a fixed random ``fraction`` of its labels replaced by a different class (symmetric noise)."""
    ds = data.dataset
    if not isinstance(ds, ArrayDataset) or data.num_classes is None:
        raise ValueError(f"label noise needs an in-memory labelled set, got {data.name}")
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(ds), generator=gen) < fraction
    other = (ds.labels + torch.randint(1, data.num_classes, (len(ds),), generator=gen)) % data.num_classes
    return ImageSet(data.name, ArrayDataset(ds.images, torch.where(flip, other, ds.labels)),
                    tensor_fingerprint(data.fingerprint, f"label-noise:{fraction}:{seed}"), data.num_classes)


def prepare(suite_name: str, train_size: int, label_noise: float = 0.0) -> tuple[Suite, Suite, Suite, ImageSet]:
    """``(train suite, validation suite, test suite, training subset)``: the subset is the ID training set
    (per-epoch accuracy on the validation part), validation / test are a fixed 20% / 80% split of every set."""
    suite = load_suite(suite_name)
    val, test = holdout_suite(suite)
    subset = suite.id_train.subset(train_size, seed=0)
    if label_noise:
        subset = with_label_noise(subset, label_noise)
    return replace(suite, id_train=subset, id_test=val.id_test), val, replace(test, id_train=subset), subset


BASE = dict(augment=False, batch_size=128, weight_decay=5e-4)  # every ERM and fine-tuning run here


def tracked_erm(setting: Setting, seed: int, a: argparse.Namespace,
                out: Path) -> tuple[Path, list[dict[str, Any]], tuple[Suite, Suite, Suite, ImageSet]]:
    """Train (or resume) ERM in ``setting`` with ``seed``, tracked on the validation split every epoch; returns
    the final checkpoint, the per-epoch rows and :func:`prepare`'s suites. The main run lives in ``out/erm``."""
    data = prepare(setting.suite, a.train_size, setting.label_noise)
    run = out / "erm" if (setting, seed) == (SETTINGS[0], 0) else out / "search" / f"{setting.key}-seed{seed}"
    cfg = TrainConfig(epochs=a.epochs, lr=setting.lr or a.lr, seed=seed, **BASE)
    before = torch.get_num_threads()
    torch.set_num_threads(setting.threads or before)
    try:
        check_compute(run)
        final = train_on_suite(RunSpec(data=data[0]), run, config=cfg, hooks=[tracking_hook(data[1], run)], verbose=False)
    finally:
        torch.set_num_threads(before)
    return final, history(run), data


def check_compute(run: Path) -> None:
    """Refuse a run folder trained on another device or CPU thread count: its numbers would not be the ones
    this command produces (the trained weights depend on the floating-point summation order)."""
    now = compute_signature(default_device())
    meta = run / "last.json"
    if meta.exists() and (before := json.loads(meta.read_text()).get("compute")) != now:
        sys.exit(f"{run} was trained on {before or 'an unrecorded device / thread count'}, this run computes on "
                 f"{now}: delete the folder or pass its --threads (or another --out)")


def best_within_budget(rows: list[dict[str, Any]]) -> int:
    """The epoch with the best validation mean Energy AUROC among those within the accuracy budget of the final one."""
    return best_epoch(rows, min_acc=rows[-1]["val_acc"] - ACC_BUDGET / 100)


def sweep_run(out: Path, seed: int, method: str, c: float, lr: float) -> Path:
    """The folder of a fine-tuning run from ERM seed ``seed``'s final model (seed 0: the sensitivity table's)."""
    return (out / "sweep" if seed == 0 else out / f"sweep-seed{seed}") / f"{method}-c{c:g}-lr{lr:g}"


def id_only_constraint(rows: list[dict[str, Any]]) -> float:
    """A constraint chosen from ID data only: the training loss at the earliest epoch whose validation
    accuracy is within :data:`ID_ONLY_GAP` points of the final epoch's."""
    return round(next(r for r in rows if r["val_acc"] >= rows[-1]["val_acc"] - ID_ONLY_GAP / 100)["loss"], 4)


def family_means(auroc: dict[str, float]) -> tuple[float, float]:
    """Mean AUROC over the natural OOD sets and over the synthetic-noise ones, from ``{set: AUROC}``."""
    nat = [v for k, v in auroc.items() if k not in SYNTHETIC]
    syn = [v for k, v in auroc.items() if k in SYNTHETIC]
    return statistics.mean(nat), statistics.mean(syn)


def replicate(a: argparse.Namespace, out: Path) -> str:
    """ERM seeds 0 and ``--erm-seeds``: final, best intermediate within the budget, and UM at the ID-only
    constraint, on the test split; a markdown table of the changes against each seed's final model."""
    lines = []
    deltas: dict[str, list[float]] = {"best": [], "um": [], "acc": [], "nat": [], "syn": []}
    for seed in [0, *a.erm_seeds]:
        final, rows, (train_suite, val, test_suite, _) = tracked_erm(SETTINGS[0], seed, a, out)
        c = id_only_constraint(rows)
        um, _ = fine_tune("um", train_suite, val, final, rows[-1], sweep_run(out, seed, "um", c, a.replicate_lr),
                          TrainConfig(epochs=a.um_epochs, lr=a.replicate_lr, **BASE), flood_options("um", c))
        close = best_within_budget(rows)
        ckpts = {"final": final, "best": final.parent / f"epoch-{close:03d}.safetensors", "um": um}
        s = {k: summary(run_bench(RunSpec(p, data=test_suite), detectors=["energy"], out_dir=out / "bench" / f"seed{seed}-{k}", verbose=False), "energy")
             for k, p in ckpts.items()}
        acc = {k: 100 * v["id_acc"] for k, v in s.items()}
        auroc = {k: 100 * v["mean"]["auroc"] for k, v in s.items()}
        (nat0, syn0), (nat, syn) = (family_means({k: v["auroc"] for k, v in s[m]["per_ood"].items()})
                                    for m in ("final", "um"))
        deltas["best"].append(auroc["best"] - auroc["final"])
        deltas["um"].append(auroc["um"] - auroc["final"])
        deltas["acc"].append(acc["um"] - acc["final"])
        deltas["nat"].append(100 * (nat - nat0))
        deltas["syn"].append(100 * (syn - syn0))
        lines.append([seed, f"{acc['final']:.2f} / {auroc['final']:.2f}",
                      f"{close}, {acc['best'] - acc['final']:+.2f} / {auroc['best'] - auroc['final']:+.2f}", f"{c:g}",
                      f"{acc['um'] - acc['final']:+.2f} / {auroc['um'] - auroc['final']:+.2f}",
                      f"{deltas['nat'][-1]:+.2f} / {deltas['syn'][-1]:+.2f}"])
    mean = {k: statistics.mean(v) for k, v in deltas.items()}
    lines.append(["mean", "", f"Δ AUROC {mean['best']:+.2f}", "", f"{mean['acc']:+.2f} / {mean['um']:+.2f}",
                  f"{mean['nat']:+.2f} / {mean['syn']:+.2f}"])
    n = len(deltas["um"])
    within = [-d <= ACC_BUDGET for d in deltas["acc"]]
    better = [d > 0 for d in deltas["um"]]
    return "\n".join([table(["ERM seed", "final: ID acc / mean AUROC",
                              "best intermediate within budget: epoch, Δ acc / Δ AUROC", "UM c (ID-only)",
                              "UM: Δ acc / Δ AUROC", "UM Δ AUROC natural / synthetic"], lines),
                       "", f"UM at the ID-only constraint over the {n} ERM seeds: mean Energy AUROC {mean['um']:+.2f} points "
              f"(natural sets {mean['nat']:+.2f}, synthetic {mean['syn']:+.2f}) at a mean ID accuracy change of "
              f"{mean['acc']:+.2f} points ({'within' if -mean['acc'] <= ACC_BUDGET else 'outside'} the {ACC_BUDGET}-point "
              f"budget). Per seed: AUROC up in {sum(better)} of {n}, accuracy within the budget in {sum(within)} of {n}, "
              f"both in {sum(b and w for b, w in zip(better, within))} of {n}; natural-set AUROC up in "
              f"{sum(d > 0 for d in deltas['nat'])} of {n}."])


def search(a: argparse.Namespace, out: Path) -> tuple[str, dict[str, dict[int, list[dict[str, Any]]]]]:
    """ERM in every setting of :data:`SETTINGS` over seeds; a markdown table (validation split) of how much
    better the best intermediate epoch detects OOD than the final one, and the curves."""
    curves: dict[str, dict[int, list[dict[str, Any]]]] = {}
    lines = []
    for setting in SETTINGS:
        for seed in ([0, *a.erm_seeds] if setting is SETTINGS[0] else a.search_seeds):
            rows = curves.setdefault(setting.label, {})[seed] = tracked_erm(setting, seed, a, out)[1]
            last, late = rows[-1], [100 * r["energy_auroc"] for r in rows[-10:]]
            d = lambda e, key: 100 * (rows[e - 1][key] - last[key])  # noqa: E731
            close, best = best_within_budget(rows), best_epoch(rows)
            lines.append([setting.label, seed, f"{100 * last['val_acc']:.2f} / {100 * last['energy_auroc']:.2f}",
                          f"{min(late):.2f} - {max(late):.2f}",
                          f"{close}, {d(close, 'val_acc'):+.2f} / {d(close, 'energy_auroc'):+.2f}",
                          f"{best}, {d(best, 'val_acc'):+.2f} / {d(best, 'energy_auroc'):+.2f}"])
    searched = table(["setting", "seed", "final: ID acc / mean AUROC", "AUROC range, last 10 epochs",
                      "best within budget: epoch, Δ acc / Δ AUROC", "best overall: epoch, Δ acc / Δ AUROC"], lines)
    return "\n".join([searched, "", seed_means(curves), "", thread_effect(curves, a.search_seeds)]), curves


def natural_auroc(row: dict[str, Any]) -> float:
    """Mean Energy AUROC over the natural OOD sets of one tracked row."""
    return family_means({k.split("/")[1]: v for k, v in row.items() if k.startswith("energy_auroc/")})[0]


def mean_curve(seeds: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The curve averaged over seeds epoch by epoch: validation accuracy, mean and natural-set Energy AUROC."""
    return [{"epoch": rows[0]["epoch"], "val_acc": statistics.mean(r["val_acc"] for r in rows),
             "energy_auroc": statistics.mean(r["energy_auroc"] for r in rows),
             "natural_auroc": statistics.mean(natural_auroc(r) for r in rows)} for rows in zip(*seeds.values())]


def seed_means(curves: dict[str, dict[int, list[dict[str, Any]]]]) -> str:
    """Markdown: per setting with several seeds, the seed-averaged curve's best epoch within the budget against
    its final epoch, next to the spread of the final AUROC over seeds (a stage that exists systematically
    shows on the averaged curve; one seed's lucky epoch averages out)."""
    lines = []
    for label, seeds in curves.items():
        if len(seeds) < 2:
            continue
        rows, finals = mean_curve(seeds), [100 * r[-1]["energy_auroc"] for r in seeds.values()]
        last, e = rows[-1], best_within_budget(rows)
        d = {k: 100 * (rows[e - 1][k] - last[k]) for k in ("val_acc", "energy_auroc", "natural_auroc")}
        lines.append([label, len(seeds),
                      f"{100 * last['val_acc']:.2f} / {100 * last['energy_auroc']:.2f} / {100 * last['natural_auroc']:.2f}",
                      f"{min(finals):.2f} - {max(finals):.2f}",
                      f"{e}, {d['val_acc']:+.2f} / {d['energy_auroc']:+.2f} / {d['natural_auroc']:+.2f}"])
    return ("The curves averaged over seeds, epoch by epoch (validation split; natural = the OOD sets other than "
            f"{', '.join(SYNTHETIC)}; the best epoch within the budget is picked on the averaged mean AUROC):\n\n"
            + table(["setting", "seeds", "mean final: ID acc / AUROC / natural AUROC", "final AUROC over seeds: min - max",
                     "averaged curve, best within budget: epoch, Δ acc / Δ AUROC / Δ natural AUROC"], lines))


def thread_effect(curves: dict[str, dict[int, list[dict[str, Any]]]], seeds: list[int]) -> str:
    """Compare the clean runs with their twins on another thread count: same data, seed and settings, other
    summation order."""
    default, twin = curves[SETTINGS[0].label], curves[SETTINGS[1].label]
    same = lambda r, q: all(r[k] == q[k] for k in r if k != "seconds")  # noqa: E731
    parts = []
    for seed in seeds:
        if seed not in default:
            continue
        r, q = default[seed], twin[seed]
        if all(same(x, y) for x, y in zip(r, q)):
            parts.append(f"seed {seed}: every tracked number identical")
        else:
            parts.append(f"seed {seed}: final mean AUROC {100 * r[-1]['energy_auroc']:.2f} vs {100 * q[-1]['energy_auroc']:.2f}, "
                         f"ID accuracy {100 * r[-1]['val_acc']:.2f} vs {100 * q[-1]['val_acc']:.2f}")
    return (f"The clean runs against their twins on {SETTINGS[1].threads} CPU threads (same data, seed and settings; "
            "only the floating-point summation order can differ): " + "; ".join(parts) + ".")


def plot_search(curves: dict[str, dict[int, list[dict[str, Any]]]], path: Path) -> None:
    """Validation ID accuracy and mean Energy AUROC per epoch: one column per setting, one line per seed
    (black: their mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(curves), figsize=(3.4 * len(curves), 5.6), sharex=True, squeeze=False)
    for col, (label, seeds) in enumerate(curves.items()):
        for seed, rows in seeds.items():
            for ax, key in zip(axes[:, col], ("val_acc", "energy_auroc")):
                ax.plot([r["epoch"] for r in rows], [100 * r[key] for r in rows], "o-", ms=2, lw=1, label=f"seed {seed}")
        if len(seeds) > 1:
            rows = mean_curve(seeds)
            for ax, key in zip(axes[:, col], ("val_acc", "energy_auroc")):
                ax.plot([r["epoch"] for r in rows], [100 * r[key] for r in rows], "k-", lw=2, label="mean")
        axes[0, col].set_title(label if len(label) < 40 else label.split(" (")[0], fontsize=8)
        axes[1, col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("validation ID accuracy (%)")
    axes[1, 0].set_ylabel("mean Energy AUROC (%)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def history(run: Path) -> list[dict[str, Any]]:
    return read_rows(run / "history.jsonl")


def fine_tune(method: str, train_suite: Suite, val: Suite, init_from: Path, start: dict[str, Any], out: Path,
              cfg: TrainConfig, options: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]]:
    """Run UM or UMAP from ``init_from``; returns the checkpoint and the curve with ``start`` (the tracked
    validation row of ``init_from``, already in its training history) as epoch 0."""
    check_compute(out)
    ckpt = train_on_suite(RunSpec(init_from, data=train_suite), out, method=method, config=cfg, method_options=options,
                          hooks=[tracking_hook(val, out)], verbose=False)
    return ckpt, [{**start, "epoch": 0}, *history(out)]


def flood_options(method: str, c: float) -> dict[str, Any]:
    """UM / UMAP options at constraint ``c`` (UMAP with magnitude-initialised scores)."""
    return {"constraint": c, **({"score_init": "magnitude"} if method == "umap" else {})}


def plot_fine_tuning(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Validation ID accuracy and mean Energy AUROC along each fine-tuning run (epoch 0 = the final ERM model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for label, rows in curves.items():
        for ax, key in zip(axes, ("val_acc", "energy_auroc")):
            ax.plot([r["epoch"] for r in rows], [100 * r[key] for r in rows], "o-", ms=3, label=label)
    for ax, title in zip(axes, ("ID accuracy (%)", "mean Energy AUROC over OOD sets (%)")):
        ax.set_title(title)
        ax.set_xlabel("fine-tuning epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("UM / UMAP from the final ERM model (validation split)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict[str, Any]], det: str) -> dict[str, Any]:
    return next(s for s in summary_rows(rows) if s["detector"] == det)


def detector_table(results: dict[str, list[dict[str, Any]]], det: str) -> str:
    """Markdown: one row per model, ``AUROC / FPR95`` per OOD set with ``det``, the mean and ID accuracy."""
    lines = []
    for model, rows in results.items():
        s = summary(rows, det)
        lines.append([model, *(f"{100 * v['auroc']:.2f} / {100 * v['fpr95']:.2f}" for v in s["per_ood"].values()),
                      f"{100 * s['mean']['auroc']:.2f} / {100 * s['mean']['fpr95']:.2f}", f"{100 * s['id_acc']:.2f}"])
    return table([det, *s["per_ood"], "mean", "ID acc"], lines)


def main() -> None:
    ap = parser(__doc__, threads=1)
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=30, help="ERM epochs")
    ap.add_argument("--lr", type=float, default=0.05, help="ERM learning rate (SGD, cosine)")
    ap.add_argument("--um-epochs", type=int, default=10)
    ap.add_argument("--um-lr", type=float, default=0.05)
    ap.add_argument("--umap-lr", type=float, default=0.1)
    ap.add_argument("--sweep-lr", type=float, nargs="*", default=[0.005, 0.001],
                    help="UM learning rates besides --um-lr for the sensitivity table (validation split)")
    ap.add_argument("--sweep-umap-lr", type=float, default=0.01, help="UMAP learning rate in the sensitivity table")
    ap.add_argument("--pick-seeds", type=int, nargs="*", default=[1, 2],
                    help="repeat the picked setting with these fine-tuning seeds (data order), on the test split")
    ap.add_argument("--erm-seeds", type=int, nargs="*", default=[1, 2, 3, 4],
                    help="repeat the ERM run with these seeds, each with UM at the ID-only constraint (test split)")
    ap.add_argument("--replicate-lr", type=float, default=0.005, help="UM learning rate for those repeats")
    ap.add_argument("--search-seeds", type=int, nargs="*", default=[0, 1],
                    help="ERM seeds per setting of the search for a better intermediate stage")
    ap.add_argument("--stage", choices=["erm", "all"], default="all", help="erm: only the long ERM run")
    ap.add_argument("--out", default="runs/unleashing_mask")
    a = ap.parse_args()
    threads(a.threads)
    out = Path(a.out)

    final, erm, (train_suite, val, test_suite, _) = tracked_erm(SETTINGS[0], 0, a, out)
    if a.stage == "erm":
        return
    best = best_epoch(erm)
    best_close = best_within_budget(erm)
    c_curve = round(erm[best_close - 1]["loss"], 4)  # the training loss at that stage: a hand-set constraint

    um_cfg, umap_cfg = TrainConfig(epochs=a.um_epochs, lr=a.um_lr, **BASE), TrainConfig(epochs=a.um_epochs, lr=a.umap_lr, **BASE)
    # The official estimate, made here and passed on: `oodlab train` refuses an estimate at or above chance
    # level (the model looks untrained), but this benchmark measures the paper's recipe as it is.
    est = estimate_constraint(load_checkpoint(final)[0], train_suite.id_train, augmented=um_cfg.augment,
                              seed=um_cfg.seed, batch_size=um_cfg.eval_batch_size)
    write_atypical_report(est, train_suite.id_train, out / "estimate")
    c_est = {"constraint": est.constraint}
    runs = {  # key: (label, method, config, options)
        "um": ("UM, estimated c", "um", um_cfg, c_est),
        "um-curve": (f"UM, c = {c_curve}", "um", um_cfg, {"constraint": c_curve}),
        "umap": ("UMAP, estimated c", "umap", umap_cfg, c_est),
        "umap-magnitude": ("UMAP, estimated c, magnitude init", "umap", umap_cfg, {**c_est, "score_init": "magnitude"}),
        "umap-magnitude-curve": (f"UMAP, c = {c_curve}, magnitude init", "umap", umap_cfg,
                                 {"score_init": "magnitude", "constraint": c_curve}),
    }
    tuned = {key: fine_tune(method, train_suite, val, final, erm[-1], out / key, cfg, opts)
             for key, (_, method, cfg, opts) in runs.items()}
    c_id = id_only_constraint(erm)
    sweep = [("um", c, lr) for c in (c_curve, c_id) for lr in a.sweep_lr] + [("umap", c, a.sweep_umap_lr)
                                                                              for c in (c_curve, c_id)]
    swept = {(m, c, lr): fine_tune(m, train_suite, val, final, erm[-1], sweep_run(out, 0, m, c, lr),
                                   TrainConfig(epochs=a.um_epochs, lr=lr, **BASE), flood_options(m, c))
             for m, c, lr in sweep}
    swept[("um", c_curve, a.um_lr)] = tuned["um-curve"]
    v0 = erm[-1]
    within = {k: r for k, r in swept.items() if r[1][-1]["val_acc"] >= v0["val_acc"] - ACC_BUDGET / 100}
    pool = within or swept
    pick = max(pool, key=lambda k: pool[k][1][-1]["energy_auroc"])

    models = {"final": (f"ERM final (epoch {a.epochs})", final),
              "best": (f"ERM best intermediate (epoch {best})", out / "erm" / f"epoch-{best:03d}.safetensors"),
              "best_close": (f"ERM best intermediate within {ACC_BUDGET} acc (epoch {best_close})",
                             out / "erm" / f"epoch-{best_close:03d}.safetensors"),
              **{key: (f"ERM final + {label}", tuned[key][0]) for key, (label, *_) in runs.items()},
              "pick": (f"ERM final + {pick[0].upper()}, c = {pick[1]:g}, lr {pick[2]:g} (best of the sensitivity "
                       "table on validation)", swept[pick][0]),
              **{f"pick-seed{seed}": (f"the same, fine-tuning seed {seed}", fine_tune(
                  pick[0], train_suite, val, final, erm[-1], out / "pick" / f"seed{seed}",
                  TrainConfig(epochs=a.um_epochs, lr=pick[2], seed=seed, **BASE), flood_options(*pick[:2]))[0])
                 for seed in a.pick_seeds}}
    results = {key: run_bench(RunSpec(ckpt, data=test_suite), detectors=["energy", "msp"], out_dir=out / "bench" / key, verbose=False)
               for key, (_, ckpt) in models.items()}

    SECTIONS.mkdir(parents=True, exist_ok=True)
    plot_tracking(erm, SECTIONS / "unleashing_mask_erm.png",
                  f"ERM on {a.train_size} Fashion-MNIST training images (validation split)")
    plot_fine_tuning({runs[k][0]: rows for k, (_, rows) in tuned.items()}, SECTIONS / "unleashing_mask_fine_tuning.png")
    shutil.copyfile(out / "estimate" / "atypical.png", SECTIONS / "unleashing_mask_atypical.png")
    replicated = replicate(a, out)
    searched, curves = search(a, out)
    plot_search(curves, SECTIONS / "unleashing_mask_search.png")

    est = json.loads((out / "estimate" / "atypical.json").read_text())
    auroc = {k: 100 * summary(r, "energy")["mean"]["auroc"] for k, r in results.items()}
    acc = {k: 100 * summary(r, "energy")["id_acc"] for k, r in results.items()}
    first_below = next((r for r in erm if r["loss"] <= est["constraint"]), erm[-1])
    where_c = (f"It is above the training loss after the very first ERM epoch ({erm[0]['loss']:.4f}): a random "
               "3.5% mask costs this network about as much as all of its training"
               if first_below is erm[0] else
               f"ERM training reached that loss at epoch {first_below['epoch']} (validation accuracy "
               f"{100 * first_below['val_acc']:.2f}%)")
    chance = (f", at or above chance level (ln 10 = {math.log(10):.4f}): `oodlab train` refuses such an estimate "
              "as the sign of an untrained model, and this benchmark passes it on explicitly to measure the recipe as "
              "published" if est["constraint"] >= math.log(10) else "")
    sens = table(["method", "c", "lr", "val ID acc", "val mean Energy AUROC"],
                 [[f"ERM final (epoch {a.epochs})", "-", "-", f"{100 * v0['val_acc']:.2f}", f"{100 * v0['energy_auroc']:.2f}"],
                  *([m.upper(), f"{c:g}", f"{lr:g}",
                     f"{100 * rows[-1]['val_acc']:.2f} ({100 * (rows[-1]['val_acc'] - v0['val_acc']):+.2f})",
                     f"{100 * rows[-1]['energy_auroc']:.2f} ({100 * (rows[-1]['energy_auroc'] - v0['energy_auroc']):+.2f})"]
                    for (m, c, lr), (_, rows) in sorted(swept.items(), key=lambda kv: kv[0]))])
    verdict = "\n".join(
        f"- {models[k][0]}: mean Energy AUROC {auroc[k] - auroc['final']:+.2f} points, ID accuracy "
        f"{acc[k] - acc['final']:+.2f} points ({'within' if acc['final'] - acc[k] <= ACC_BUDGET else 'outside'} "
        f"the {ACC_BUDGET}-point budget)." for k in models if k != "final")
    picks = [k for k in models if k.startswith("pick")]
    d_auroc, d_acc = [auroc[k] - auroc["final"] for k in picks], [acc[k] - acc["final"] for k in picks]
    verdict += (f"\n- The picked setting over its {len(picks)} fine-tuning seeds: mean Energy AUROC "
                f"{statistics.mean(d_auroc):+.2f} points (from {min(d_auroc):+.2f} to {max(d_auroc):+.2f}), ID accuracy "
                f"{statistics.mean(d_acc):+.2f} points (from {min(d_acc):+.2f} to {max(d_acc):+.2f}).")
    body = f"""Protocol: smallcnn trained from scratch on a fixed random {a.train_size} of the 60k Fashion-MNIST
training images (seed 0), no augmentation, SGD (momentum 0.9, Nesterov) lr {a.lr} cosine, weight decay
5e-4, batch 128, {a.epochs} epochs (final training accuracy {100 * erm[-1]['train_acc']:.2f}% in train
mode, training loss {erm[-1]['loss']:.4f}). Every run here trains on {a.threads} CPU thread{"s" * (a.threads > 1)}
(`--threads`): the trained weights depend on the thread count through the floating-point summation order, so
these numbers reproduce with the same count (run folders record it; see the twin runs below). Every epoch is
tracked on a validation split: a fixed 20%
of the Fashion-MNIST test set and of each OOD set. The best intermediate epoch is the one with the best
mean Energy AUROC there, also restricted to epochs whose validation accuracy is within {ACC_BUDGET} points
of the final epoch's. All numbers in the tables are on the other 80%.

UM and UMAP start from the final checkpoint and train {a.um_epochs} epochs on the same subset (UM: all
weights, SGD lr {a.um_lr} cosine; UMAP: weights frozen, edge-popup scores keeping 80% of every
conv/linear weight tensor, SGD lr {a.umap_lr} cosine; "magnitude init" starts the scores at |w| instead
of the official random scores). The estimated constraint follows the official code (a random 3.5% of
every conv/linear weight zeroed, eval mode, mean training CE): **c = {est['constraint']:.4f}** (unmasked:
{est['full_loss']:.4f}){chance}. {where_c}. The better stage within the accuracy budget is epoch {best_close};
the hand-set c = {c_curve} is the ERM training loss at that epoch (picked on the validation split).

Against the final model:

{verdict}

Cells are AUROC / FPR95 in % (ID = Fashion-MNIST test, higher score = ID).

{detector_table({models[k][0]: r for k, r in results.items()}, "energy")}

{detector_table({models[k][0]: r for k, r in results.items()}, "msp")}

Sensitivity of UM to the constraint and the fine-tuning learning rate, {a.um_epochs} epochs from the final
model, measured on the validation split after the last epoch (the split the hand-set c came from, so
these are not test numbers; the best row within the accuracy budget is evaluated on the test split in the
tables above). c = {c_curve} is the loss at the best validation stage within the budget
(an OOD-informed choice); c = {c_id} is the loss at the earliest epoch whose validation accuracy is
within {ID_ONLY_GAP} points of the final one (ID data only; a margin under the {ACC_BUDGET}-point budget because a
fine-tune ends below the accuracy of the epoch whose loss it targets). UMAP uses magnitude init.

{sens}

**The same with other ERM seeds.** The ERM run repeated with seeds {", ".join(map(str, [0, *a.erm_seeds]))} (same
data, other initialisation and batch order); each final model fine-tuned with UM for {a.um_epochs} epochs at lr
{a.replicate_lr:g} and the ID-only constraint (its training loss at the earliest epoch within {ID_ONLY_GAP} points of
its final validation accuracy). Test split, Energy; changes against that seed's final model; natural OOD sets =
{", ".join(k for k in summary(results["final"], "energy")["per_ood"] if k not in SYNTHETIC)}, synthetic = {", ".join(SYNTHETIC)}.

{replicated}

**Where is there a better intermediate stage?** ERM in other settings, each over seeds (validation split,
mean Energy AUROC over the setting's OOD sets; Δ against the final epoch; "within budget" = validation
accuracy within {ACC_BUDGET} points of the final epoch's). Same subset size, epochs and optimiser as the main run.

{searched}

![ERM curves per setting and seed](results/unleashing_mask_search.png)

The ERM run epoch by epoch (validation split; the dotted line marks the best Energy AUROC epoch):

![ERM per-epoch ID accuracy and OOD detection](results/unleashing_mask_erm.png)

The fine-tuning runs epoch by epoch (epoch 0 = the final ERM model):

![UM and UMAP fine-tuning curves](results/unleashing_mask_fine_tuning.png)

The training images whose loss rises most, relative to their class, under the random mask that
estimated c:

![atypical samples](results/unleashing_mask_atypical.png)
"""
    print(body)
    if not a.no_write:
        write_section("unleashing_mask", "Unleashing Mask (UM / UMAP) on Fashion-MNIST", body)


if __name__ == "__main__":
    main()
