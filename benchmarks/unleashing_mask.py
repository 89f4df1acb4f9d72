"""Unleashing Mask on Fashion-MNIST: the per-epoch curve of a long ERM run, then UM and UMAP from its
final checkpoint; Energy and MSP AUROC / FPR95 per OOD set for final, best-intermediate, UM and UMAP.

Protocol (2 shared CPU cores): a fixed random subset of the Fashion-MNIST training set, no
augmentation, and enough epochs to fit it completely (memorisation is what UM undoes). Every
epoch is tracked on the validation split (a fixed 20% of the ID test set and of every OOD set);
the best intermediate epoch is picked there, and the table is measured on the other 80%.
Interrupted runs resume. Usage::

    python benchmarks/unleashing_mask.py [--train-size 5000] [--epochs 30] [--um-epochs 10] [--stage erm]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from results_doc import ROOT, write_section

from oodlab.bench import run_bench
from oodlab.bench.report import summary_rows
from oodlab.data.suites import load_suite
from oodlab.models import load_checkpoint
from oodlab.training import TrainConfig
from oodlab.training.recipes import train_on_suite
from oodlab.training.tracking import best_epoch, holdout_suite, ood_metrics, plot_tracking, tracking_hook

FIGURES = ROOT / "docs" / "results"


def history(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def fine_tune(method: str, train_suite, val, init_from: Path, out: Path, cfg: TrainConfig) -> tuple[Path, list[dict]]:
    """Run UM or UMAP from ``init_from``; returns the checkpoint and the curve with the start as epoch 0."""
    ckpt = train_on_suite(train_suite, out, method=method, config=cfg, init_from=init_from,
                          hooks=[tracking_hook(val, out)], verbose=False)
    start, _ = load_checkpoint(init_from)
    rows = [{"epoch": 0, **ood_metrics(start, val)}, *history(out)]
    return ckpt, rows


def table(results: dict[str, list[dict[str, Any]]], det: str) -> str:
    """Markdown: one row per model, ``AUROC / FPR95`` per OOD set with ``det``, the mean and ID accuracy."""
    lines = []
    for model, rows in results.items():
        s = next(s for s in summary_rows(rows) if s["detector"] == det)
        if not lines:
            oods = list(s["per_ood"])
            lines = [f"| {det} | " + " | ".join(oods) + " | mean | ID acc |", "|---" * (len(oods) + 3) + "|"]
        cells = [f"{100 * v['auroc']:.2f} / {100 * v['fpr95']:.2f}" for v in s["per_ood"].values()]
        lines.append(f"| {model} | " + " | ".join(cells) +
                     f" | {100 * s['mean']['auroc']:.2f} / {100 * s['mean']['fpr95']:.2f} | {100 * s['id_acc']:.2f} |")
    return "\n".join(lines)


def mean_of(rows: list[dict[str, Any]], det: str, key: str) -> float:
    s = next(s for s in summary_rows(rows) if s["detector"] == det)
    return 100 * (s["id_acc"] if key == "id_acc" else s["mean"][key])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=30, help="ERM epochs")
    ap.add_argument("--lr", type=float, default=0.05, help="ERM learning rate (SGD, cosine)")
    ap.add_argument("--um-epochs", type=int, default=10)
    ap.add_argument("--um-lr", type=float, default=0.05)
    ap.add_argument("--umap-lr", type=float, default=0.1)
    ap.add_argument("--stage", choices=["erm", "all"], default="all", help="erm: only the long ERM run")
    ap.add_argument("--out", default="runs/unleashing_mask")
    a = ap.parse_args()
    out = Path(a.out)

    suite = load_suite("fashionmnist")
    val, test = holdout_suite(suite)
    subset = suite.id_train.subset(a.train_size, seed=0)
    train_suite = replace(suite, id_train=subset, id_test=val.id_test)  # per-epoch test_acc on the validation part
    base = dict(augment=False, batch_size=128, weight_decay=5e-4)

    erm_cfg = TrainConfig(epochs=a.epochs, lr=a.lr, **base)
    final = train_on_suite(train_suite, out / "erm", config=erm_cfg, hooks=[tracking_hook(val, out / "erm")],
                           verbose=False)
    erm_rows = history(out / "erm")
    if a.stage == "erm":
        return
    best = best_epoch(erm_rows)
    um, um_rows = fine_tune("um", train_suite, val, final, out / "um", TrainConfig(epochs=a.um_epochs, lr=a.um_lr, **base))
    umap, umap_rows = fine_tune("umap", train_suite, val, final, out / "umap",
                                TrainConfig(epochs=a.um_epochs, lr=a.umap_lr, **base))

    test_suite = replace(test, id_train=subset)
    models = {f"ERM final (epoch {a.epochs})": final, f"ERM best intermediate (epoch {best})": out / "erm" / f"epoch-{best:03d}",
              "ERM final + UM": um, "ERM final + UMAP": umap}
    results = {name: run_bench(test_suite, ["energy", "msp"], ckpt, out / "bench" / name.split(" (")[0].replace(" ", "_"),
                               verbose=False) for name, ckpt in models.items()}

    FIGURES.mkdir(parents=True, exist_ok=True)
    plot_tracking(erm_rows, FIGURES / "unleashing_mask_erm.png",
                  f"ERM on {a.train_size} Fashion-MNIST training images (validation split)")
    plot_tracking(um_rows, FIGURES / "unleashing_mask_um.png", "UM fine-tuning from the final ERM model (epoch 0 = start)")
    plot_tracking(umap_rows, FIGURES / "unleashing_mask_umap.png", "UMAP from the final ERM model (epoch 0 = start)")
    shutil.copyfile(out / "um" / "atypical.png", FIGURES / "unleashing_mask_atypical.png")

    est = json.loads((out / "um" / "atypical.json").read_text())
    names = list(results)
    final_rows, best_rows, um_res = results[names[0]], results[names[1]], results[names[2]]
    gain = mean_of(um_res, "energy", "auroc") - mean_of(final_rows, "energy", "auroc")
    acc_drop = mean_of(final_rows, "energy", "id_acc") - mean_of(um_res, "energy", "id_acc")
    stage_gain = mean_of(best_rows, "energy", "auroc") - mean_of(final_rows, "energy", "auroc")
    verdict = (f"UM {'improves' if gain > 0 else 'does not improve'} the final model's mean Energy AUROC "
               f"({gain:+.2f} points) at an ID accuracy change of {-acc_drop:+.2f} points "
               f"({'within' if acc_drop <= 1.5 else 'outside'} the 1.5-point budget). The best intermediate "
               f"epoch ({best}) is {stage_gain:+.2f} points of mean Energy AUROC from the final one on the test part.")
    erm_last = erm_rows[-1]
    body = f"""Protocol: smallcnn trained from scratch on a fixed random {a.train_size} of the 60k Fashion-MNIST
training images (seed 0), no augmentation, SGD (momentum 0.9, Nesterov) lr {a.lr} cosine, weight decay
5e-4, batch 128, {a.epochs} epochs; final training accuracy {100 * erm_last['train_acc']:.2f}% (train mode),
training loss {erm_last['loss']:.4f}. Every epoch is tracked on a validation split (a fixed 20% of the
Fashion-MNIST test set and of each OOD set); the best intermediate epoch is the one with the best mean
Energy AUROC there. All numbers below are on the other 80%. UM and UMAP start from the final checkpoint
and train {a.um_epochs} epochs on the same subset (UM: all weights, SGD lr {a.um_lr} cosine; UMAP: weights
frozen, edge-popup scores, keep 0.8, SGD lr {a.umap_lr} cosine). The loss constraint was estimated as in
the official code (random 3.5% of every conv/linear weight zeroed, eval mode, mean training CE):
**c = {est['constraint']:.4f}** (unmasked model: {est['full_loss']:.4f}).

{verdict}

Cells are AUROC / FPR95 in % (ID = Fashion-MNIST test, higher score = ID).

{table(results, "energy")}

{table(results, "msp")}

Per-epoch curve of the ERM run (validation split; the dotted line marks the best Energy AUROC epoch):

![ERM per-epoch ID accuracy and OOD detection](results/unleashing_mask_erm.png)

UM and UMAP fine-tuning curves (epoch 0 = the final ERM model):

![UM curve](results/unleashing_mask_um.png)
![UMAP curve](results/unleashing_mask_umap.png)

The training images whose loss rises most under the random mask (the memorised, atypical ones):

![atypical samples](results/unleashing_mask_atypical.png)
"""
    print(body)
    write_section("unleashing_mask", "Unleashing Mask (UM / UMAP) on Fashion-MNIST",
                  shlex.join(["python", "benchmarks/unleashing_mask.py", *sys.argv[1:]]), body)


if __name__ == "__main__":
    main()
