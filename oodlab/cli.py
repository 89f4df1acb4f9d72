"""The ``oodlab`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys
from typing import Any

__all__ = ["main"]


def _value(text: str) -> Any:
    """A command-line value: a Python literal when it parses as one (numbers, True, None), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _pairs(items: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"oodlab: {flag} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _value(v.strip())
    return out


def _detector_params(items: list[str] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in _pairs(items, "--param").items():
        if "." not in key:
            raise SystemExit(f"oodlab: --param expects DETECTOR.NAME=VALUE (e.g. ash-b.percentile=65), got {key!r}")
        det, name = key.split(".", 1)
        out.setdefault(det, {})[name] = value
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="fashionmnist", help="benchmark suite (see `oodlab list`)")
    p.add_argument("--data-root", help="folder with data sets (else $OODLAB_DATA, then Debian's location)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="oodlab", description="Out-of-distribution detection for PyTorch classifiers.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train or fine-tune a classifier (checkpoint each epoch, resumable)")
    _common(t)
    t.add_argument("--method", default="erm", help="training method (see `oodlab list`)")
    t.add_argument("--arch", help="architecture for training from scratch (default: the suite's)")
    t.add_argument("--from", dest="init_from", help="checkpoint to fine-tune instead of training from scratch")
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--optimizer", choices=["sgd", "adam"])
    t.add_argument("--schedule", choices=["cosine", "constant"])
    t.add_argument("--no-augment", action="store_true", help="no random shifts/flips")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--aux", help="auxiliary outliers for OE/GReg: 'photos' or a folder of images")
    t.add_argument("--constraint", type=float, help="Unleashing Mask loss constraint (default: estimated)")
    t.add_argument("--track-ood", action="store_true", help="evaluate OOD detection on a held-out split after every epoch")
    t.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option, e.g. lambda_s=0.1 (repeatable)")
    t.add_argument("--out", help="run folder (default: runs/train-<suite>-<method>-seed<seed>)")

    b = sub.add_parser("bench", help="evaluate detectors on a suite and write a results folder")
    _common(b)
    b.add_argument("--detectors", help="comma-separated names (default: every registered detector)")
    b.add_argument("--checkpoint", help="classifier checkpoint (default: oodlab's shipped default model for the suite)")
    b.add_argument("--retrain", action="store_true",
                   help="train the default model with the default recipe (cached) instead of using the shipped one")
    b.add_argument("--param", action="append", metavar="DET.KEY=VALUE", help="detector parameter, e.g. ash-b.percentile=65")
    b.add_argument("--out", help="results folder (default: runs/<suite>-<date>); re-using one resumes")
    b.add_argument("--batch-size", type=int, default=512)

    f = sub.add_parser("fit", help="fit one detector on a suite's ID training features and save it")
    _common(f)
    f.add_argument("detector")
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--param", action="append", metavar="KEY=VALUE")
    f.add_argument("--out", required=True, help="file prefix for the fitted detector (.safetensors + .json)")

    s = sub.add_parser("score", help="score a folder of images with a fitted detector; writes CSV")
    s.add_argument("detector_file", help="a detector saved by `oodlab fit`")
    s.add_argument("images", help="folder of images")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True, help="CSV path (file, score)")
    s.add_argument("--device")

    g = sub.add_parser("guard", help="calibrated OOD flags for a deployed model: build, check images, export")
    gs = g.add_subparsers(dest="guard_cmd", required=True)
    gb = gs.add_parser("build", help="fit a detector, calibrate it on held-out ID data, save the guard folder")
    _common(gb)
    gb.add_argument("detector")
    gb.add_argument("--checkpoint", help="classifier checkpoint (default: oodlab's default model for the suite)")
    rule = gb.add_mutually_exclusive_group()
    rule.add_argument("--alpha", type=float, help="false-alarm rate on ID inputs, guaranteed (default 0.05)")
    rule.add_argument("--tpr", type=float, help="fraction of calibration ID inputs to accept instead")
    gb.add_argument("--param", action="append", metavar="KEY=VALUE", help="detector parameter (repeatable)")
    gb.add_argument("--out", required=True, help="guard folder to write")
    gc = gs.add_parser("check", help="flag the images of a folder; writes CSV (file, class, score, p_value, is_ood)")
    gc.add_argument("guard_dir")
    gc.add_argument("images", help="folder of images")
    gc.add_argument("--out", required=True, help="CSV path")
    gc.add_argument("--device")
    ge = gs.add_parser("export", help="write the guard as one ONNX or TorchScript model")
    ge.add_argument("guard_dir")
    ge.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    ge.add_argument("--out", help="model file (default: GUARD_DIR/guard.onnx or guard.pt)")

    r = sub.add_parser("report", help="regenerate reports from saved runs (no model needed)")
    r.add_argument("runs", nargs="+", help="results folders of `oodlab bench`")
    r.add_argument("--out", help="folder for a report of all the runs side by side (report.html + figures/)")

    sub.add_parser("list", help="list suites, detectors, training methods and architectures")
    return ap


def _train(a: argparse.Namespace) -> None:
    from .training.recipes import default_config, train_on_suite

    overrides = {k: v for k, v in {"epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size, "seed": a.seed,
                                   "weight_decay": a.weight_decay, "optimizer": a.optimizer,
                                   "schedule": a.schedule}.items() if v is not None}
    if a.no_augment:
        overrides["augment"] = False
    options = _pairs(a.option, "--option")
    options.update({k: v for k, v in {"aux": a.aux, "constraint": a.constraint}.items() if v is not None})
    out = a.out or f"runs/train-{a.suite}-{a.method}-seed{a.seed}"
    hooks = None
    if a.track_ood:
        from .training.tracking import track_ood_hook

        hooks = [track_ood_hook(a.suite, a.data_root, a.device, run_dir=out)]
    train_on_suite(a.suite, out, method=a.method, arch=a.arch, config=default_config(a.suite, **overrides),
                   init_from=a.init_from, method_options=options, hooks=hooks, data_root=a.data_root, device=a.device)


def _bench(a: argparse.Namespace) -> None:
    from .bench import run_bench

    run_bench(a.suite, a.detectors, a.checkpoint, a.out, _detector_params(a.param), a.data_root, a.batch_size,
              a.device, command=shlex.join(["oodlab", *a.argv]), retrain=a.retrain)


def _fit(a: argparse.Namespace) -> None:
    from .data.suites import load_suite
    from .detectors import create
    from .features import FeatureCache
    from .models import checkpoint_fingerprint, load_checkpoint

    model, _ = load_checkpoint(a.checkpoint, a.device or "cpu")
    suite = load_suite(a.suite, a.data_root)
    det = create(a.detector, **_pairs(a.param, "--param"))
    if det.needs == "model":
        print(f"note: {det.name} also needs the model when scoring", file=sys.stderr)
    train = FeatureCache().get(model, checkpoint_fingerprint(a.checkpoint), suite.id_train, device=a.device)
    path = det.fit(train, model.head).save(a.out)
    print(f"saved {det!r} to {path}")


def _score(a: argparse.Namespace) -> None:
    import csv

    from .data.sources import folder
    from .detectors import load_detector, score_with_model
    from .features import extract
    from .models import load_checkpoint

    model, meta = load_checkpoint(a.checkpoint, a.device or "cpu")
    det = load_detector(a.detector_file)
    data = folder.load(a.images, size=28 if meta["in_channels"] == 1 else 32, channels=meta["in_channels"])
    scores = (score_with_model(det, model, data, device=a.device) if det.needs == "model"
              else det.score(extract(model, data, device=a.device)))
    with open(a.out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "score"])
        w.writerows(zip(map(str, data.dataset.files), scores.tolist()))  # type: ignore[attr-defined]
    print(f"scored {len(scores)} images with {det.name} (higher = more in-distribution) -> {a.out}")


def _guard(a: argparse.Namespace) -> None:
    from .guard import Guard
    from .guard.build import build_guard, check_folder

    if a.guard_cmd == "build":
        guard = build_guard(a.detector, a.suite, a.checkpoint, a.alpha, a.tpr, _pairs(a.param, "--param"),
                            a.data_root, a.device)
        rule = ", ".join(f"{k} = {v}" for k, v in guard.rule.items())
        print(f"guard for {guard.detector.name} ({rule}) calibrated on {guard.calibration_source}: "
              f"flag when score < {guard.threshold:.6g} -> {guard.save(a.out)}")
    elif a.guard_cmd == "check":
        out = check_folder(Guard.load(a.guard_dir, device=a.device), a.images, a.out)
        print(f"{int(out.is_ood.sum())} of {len(out)} images flagged as out-of-distribution -> {a.out}")
    else:
        path = a.out or f"{a.guard_dir}/guard.{'onnx' if a.format == 'onnx' else 'pt'}"
        print(f"exported {Guard.load(a.guard_dir).export(path, a.format)} "
              "(input: images (N, C, H, W) in [0, 1]; outputs: logits, score, p_value, is_ood)")


def _report(a: argparse.Namespace) -> None:
    from .bench.html import load_run, write_report
    from .bench.report import write_tables

    for path in a.runs:
        run = load_run(path)
        write_tables(run.path, run.rows, run.settings)
        print(f"regenerated {run.path}/results.md and {write_report([run.path])}")
    if a.out:
        print(f"side-by-side report: {write_report(a.runs, a.out)}")


def _list(_: argparse.Namespace) -> None:
    from .data.suites import SUITES
    from .detectors import REGISTRY
    from .models import ARCHS
    from .training import OBJECTIVES

    print("suites:     " + ", ".join(sorted(SUITES)))
    print("detectors:")
    for name in sorted(REGISTRY):
        det = REGISTRY[name]()
        export = "exports" if det.export_refusal is None else f"no export ({det.export_refusal})"
        train = "" if det.needs_train else ", no training features"
        print(f"  {name:14s} {json.dumps(det.config())}  needs {det.needs}{train}; {export}")
    print("training:   " + ", ".join(sorted(OBJECTIVES)))
    print("archs:      " + ", ".join(ARCHS))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    handlers = {"train": _train, "bench": _bench, "fit": _fit, "score": _score, "guard": _guard, "report": _report,
                "list": _list}
    try:
        handlers[args.cmd](args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"oodlab {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished epochs / detectors are saved; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
