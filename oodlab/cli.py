"""The ``oodlab`` command: parses arguments into one :class:`~oodlab.specs.RunSpec` (and each command's own
options) and calls the library; what a command does is decided there, not here."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import shlex
import sys
from pathlib import Path
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
    p.add_argument("--suite", default="fashionmnist", help="suite name (see `oodlab list`) or a suite .toml file")
    p.add_argument("--id-train", help="your own data: ID training images (class folders or an image list)")
    p.add_argument("--id-test", help="your own data: ID test images (class folders or an image list)")
    p.add_argument("--id-val", help="your own data: held-out ID images for calibration (optional)")
    p.add_argument("--ood", action="append", metavar="GROUP:NAME=PATH", help="your own data: an OOD set, "
                   "e.g. far:textures=/data/dtd (repeatable)")
    p.add_argument("--data-root", help="folder with data sets (else $OODLAB_DATA, then Debian's location)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")


def _model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", "--checkpoint", dest="model", required=required,
                   help="an oodlab checkpoint, torchvision:NAME, timm:NAME or openood:resnet18_32x32|resnet18_224x224"
                        + ("" if required else " (default: oodlab's shipped default model for the suite)"))
    p.add_argument("--weights", help="state-dict file (safetensors or .pth; OpenOOD's best.ckpt), or released weights "
                   "by name: torchvision's IMAGENET1K_V1 / DEFAULT, timm's pretrained")


def _data_spec(a: argparse.Namespace):
    from .specs import SuiteFlags

    given = [f for f in ("id_train", "id_test") if getattr(a, f, None)]
    if not given and not getattr(a, "ood", None) and not getattr(a, "id_val", None):
        return getattr(a, "suite", "fashionmnist")
    if len(given) < 2:
        raise ValueError("your own data needs both --id-train and --id-test (and at least one --ood)")
    return SuiteFlags(a.id_train, a.id_test, a.ood or [], a.id_val)


def _spec(a: argparse.Namespace):
    """The one run spec of a command, from its flags (``train``: the model is the checkpoint to fine-tune)."""
    from .specs import RunSpec

    model = a.init_from if a.cmd == "train" else getattr(a, "model", None)
    return RunSpec(model=model, weights=getattr(a, "weights", None), data=_data_spec(a),
                   data_root=getattr(a, "data_root", None), device=a.device, fit_subset=getattr(a, "fit_subset", None),
                   seed=getattr(a, "seed", 0), retrain=getattr(a, "retrain", False))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="oodlab", description="Out-of-distribution detection for PyTorch classifiers.")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error (or set OODLAB_DEBUG=1)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train or fine-tune a classifier (checkpoint each epoch, resumable)")
    _common(t)
    t.add_argument("--fit-subset", type=int, help="train on a seeded random subset of this many ID images")
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
    _model_args(b)
    b.add_argument("--fit-subset", type=int, help="fit on a seeded random subset of this many ID training images")
    b.add_argument("--retrain", action="store_true",
                   help="train the default model with the default recipe (cached) instead of using the shipped one")
    b.add_argument("--param", action="append", metavar="DET.KEY=VALUE", help="detector parameter, e.g. ash-b.percentile=65")
    b.add_argument("--out", help="results folder (default: runs/<suite>-<date>); re-using one resumes")
    b.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds other files")
    b.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    b.add_argument("--cache-dtype", choices=("float32", "float16"), default="float32",
                   help="storage of the cached features (float16: half the disk and read volume)")
    b.add_argument("--search", action="store_true", help="choose each detector's parameters first, as OpenOOD's "
                   "automatic search: its grids, AUROC of ID val vs the suite's validation OOD set (never test OOD)")
    b.add_argument("--fsood", action="store_true", help="also OpenOOD's full-spectrum setting (covariate-shifted ID "
                   "sets count as ID), written apart into OUT/fsood/")

    e = sub.add_parser("extract", help="fill the feature cache for a model and suite (every data set once), nothing "
                       "else: extract on one machine, fit and score on another")
    _common(e)
    _model_args(e)
    e.add_argument("--fit-subset", type=int, help="a seeded random subset of this many ID training images")
    e.add_argument("--retrain", action="store_true", help="the default model trained with the default recipe")
    e.add_argument("--detectors", help="comma list whose intermediate layers to extract too (default: all, as bench)")
    e.add_argument("--param", action="append", metavar="DET.KEY=VALUE", help="detector parameter, e.g. "
                   "mds-ensemble.layers=2,9")
    e.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    e.add_argument("--cache-dtype", choices=("float32", "float16"), default="float32")

    f = sub.add_parser("fit", help="fit one detector on a suite's ID training features and save it")
    _common(f)
    f.add_argument("detector")
    _model_args(f)
    f.add_argument("--fit-subset", type=int, help="fit on a seeded random subset of this many ID training images")
    f.add_argument("--param", action="append", metavar="KEY=VALUE")
    f.add_argument("--out", required=True, help="file prefix for the fitted detector (.safetensors + .json)")

    s = sub.add_parser("score", help="score a folder of images with a fitted detector; writes CSV")
    s.add_argument("detector_file", help="a detector saved by `oodlab fit`")
    s.add_argument("images", help="folder of images")
    _model_args(s, required=True)
    s.add_argument("--out", required=True, help="CSV path (file, score, error)")
    s.add_argument("--strict", action="store_true", help="refuse the folder if an image cannot be read")
    s.add_argument("--device")

    g = sub.add_parser("guard", help="calibrated OOD flags for a deployed model: build, check images, export")
    gs = g.add_subparsers(dest="guard_cmd", required=True)
    gb = gs.add_parser("build", help="fit a detector, calibrate it on held-out ID data, save the guard folder")
    _common(gb)
    gb.add_argument("detector")
    _model_args(gb)
    gb.add_argument("--fit-subset", type=int, help="fit on a seeded random subset of this many ID training images")
    rule = gb.add_mutually_exclusive_group()
    rule.add_argument("--alpha", type=float, help="false-alarm rate on ID inputs, guaranteed (default 0.05)")
    rule.add_argument("--tpr", type=float, help="fraction of calibration ID inputs to accept instead")
    gb.add_argument("--param", action="append", metavar="KEY=VALUE", help="detector parameter (repeatable)")
    gb.add_argument("--out", required=True, help="guard folder to write (an existing guard folder is replaced)")
    gb.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a guard folder")
    gc = gs.add_parser("check", help="flag the images of a folder; writes CSV (file, class, score, p_value, is_ood)")
    gc.add_argument("guard_dir")
    gc.add_argument("images", help="folder of images")
    gc.add_argument("--out", required=True, help="CSV path")
    gc.add_argument("--strict", action="store_true", help="refuse the folder if an image cannot be read")
    gc.add_argument("--device")
    ge = gs.add_parser("export", help="write the guard as one ONNX or TorchScript model")
    ge.add_argument("guard_dir")
    ge.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    ge.add_argument("--out", help="model file (default: GUARD_DIR/guard.onnx or guard.pt)")

    r = sub.add_parser("report", help="regenerate reports from saved runs (no model needed)")
    r.add_argument("runs", nargs="+", help="results folders of `oodlab bench`")
    r.add_argument("--out", help="folder for a report of all the runs side by side (report.html)")
    r.add_argument("--png", action="store_true", help="also draw the figures as PNG files for papers (figures/)")

    sub.add_parser("list", help="list suites, detectors, training methods and architectures")
    return ap


def _train(a: argparse.Namespace) -> None:
    from .training.recipes import train_on_suite

    overrides = {k: v for k, v in {"epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size,
                                   "weight_decay": a.weight_decay, "optimizer": a.optimizer,
                                   "schedule": a.schedule}.items() if v is not None}
    if a.no_augment:
        overrides["augment"] = False
    options = _pairs(a.option, "--option")
    options.update({k: v for k, v in {"aux": a.aux, "constraint": a.constraint}.items() if v is not None})
    _writable(a.out)
    train_on_suite(_spec(a), a.out, method=a.method, arch=a.arch, config=overrides, method_options=options,
                   track_ood=a.track_ood)


def _writable(path: str | Path | None, file: bool = False) -> None:
    from .runtime import check_writable

    if path is not None:  # before any work (None: the command's default folder, checked where it is made)
        check_writable(path, file=file)


def _bench(a: argparse.Namespace) -> None:
    from .bench import run_bench

    run_bench(_spec(a), detectors=a.detectors, out_dir=a.out, params=_detector_params(a.param),
              batch_size=a.batch_size, command=shlex.join(["oodlab", *a.argv]), cache_dtype=a.cache_dtype,
              search=a.search, fsood=a.fsood, overwrite=a.overwrite)


def _extract(a: argparse.Namespace) -> None:
    from . import distributed
    from .bench.api import extract_suite
    from .runtime import cache_dir

    records = extract_suite(_spec(a), detectors=a.detectors, params=_detector_params(a.param), batch_size=a.batch_size,
                            cache_dtype=a.cache_dtype)
    if distributed.is_main():
        for r in records:
            rate = f"{r['images'] / r['seconds']:9.0f} images/s" if r["extracted"] and r["seconds"] > 0 else "   (cached)"
            print(f"{r['set']:28s} {r['images']:8d} images {r['seconds']:8.2f} s {rate}")
        total = sum(r["seconds"] for r in records)
        print(f"{sum(r['images'] for r in records)} images in {total:.1f} s -> {cache_dir() / 'features'}")


def _fit(a: argparse.Namespace) -> None:
    from .scoring import fit_and_save

    _writable(a.out)
    fit_and_save(_spec(a), a.detector, a.out, params=_pairs(a.param, "--param"))


def _score(a: argparse.Namespace) -> None:
    from .scoring import score_folder

    _writable(a.out, file=True)
    n = score_folder(_spec(a), a.detector_file, a.images, a.out, strict=a.strict)
    print(f"scored {n} images (higher = more in-distribution) -> {a.out}")


def _guard(a: argparse.Namespace) -> None:
    from .guard import Guard
    from .guard.build import build_guard, check_folder

    if a.guard_cmd == "build":
        from .guard.core import check_guard_out

        check_guard_out(a.out, a.overwrite)  # before any work
        guard = build_guard(_spec(a), a.detector, alpha=a.alpha, tpr=a.tpr, params=_pairs(a.param, "--param"))
        rule = ", ".join(f"{k} = {v}" for k, v in guard.rule.items())
        print(f"guard for {guard.detector.name} ({rule}) calibrated on {guard.calibration_source}: "
              f"flag when score < {guard.threshold:.6g} -> {guard.save(a.out, a.overwrite)}")
    elif a.guard_cmd == "check":
        _writable(a.out, file=True)
        out = check_folder(Guard.load(a.guard_dir, device=a.device), a.images, a.out, a.strict)
        print(f"{int(out.is_ood.sum())} of {len(out)} images flagged as out-of-distribution -> {a.out}")
    else:
        path = a.out or f"{a.guard_dir}/guard.{'onnx' if a.format == 'onnx' else 'pt'}"
        _writable(path, file=True)
        print(f"exported {Guard.load(a.guard_dir).export(path, a.format)} "
              "(input: images (N, C, H, W) in [0, 1]; outputs: logits, score, p_value, is_ood)")


def _report(a: argparse.Namespace) -> None:
    from .bench.html import load_run, write_report
    from .bench.report import write_tables

    if a.out:
        _writable(a.out, file=True)
    for path in a.runs:
        run = load_run(path)
        write_tables(run.path, run.rows, run.settings)
        print(f"regenerated {run.path}/results.md and {write_report([run.path], png=a.png)}")
    if a.out:
        print(f"side-by-side report: {write_report(a.runs, a.out, png=a.png)}")


def _list(_: argparse.Namespace) -> None:
    """Print the listing; it depends only on oodlab's code and the installed packages, so it is kept in the cache
    under a key of both (the sizes and mtimes of the package's files, the packages' versions) and printed from
    there without importing torch (0.1 s instead of 3)."""
    from importlib import metadata

    from .runtime import atomic_write_text, cache_dir, sha256_hex

    package = Path(__file__).resolve().parent
    key = [f"{f.relative_to(package)}|{f.stat().st_size}|{f.stat().st_mtime_ns}\n" for f in sorted(package.rglob("*.py"))]
    for dist in ("torch", "torchvision", "timm", "faiss-cpu", "onnx", "onnxruntime", "zuko"):
        try:
            key.append(f"{dist}={metadata.version(dist)}\n")
        except metadata.PackageNotFoundError:
            key.append(f"{dist}=-\n")
    kept = cache_dir() / "list" / f"{sha256_hex(key)[:24]}.txt"
    try:
        print(kept.read_text(encoding="utf-8"), end="")
        return
    except OSError:  # not listed yet for this code
        pass
    text = _listing()
    print(text, end="")
    try:
        atomic_write_text(kept, text)
    except OSError:  # a read-only cache costs the next listing its time, nothing else
        pass


def _listing() -> str:
    from .data.suites import SUITES
    from .detectors import REGISTRY
    from .models import ARCHS
    from .training import OBJECTIVES

    lines = ["suites:     " + ", ".join(sorted(SUITES)), "detectors:"]
    for name in sorted(REGISTRY):
        det = REGISTRY[name]()
        export = "exports" if det.export_refusal is None else f"no export ({det.export_refusal})"
        notes = f"; {det.notes}" if det.notes else ""
        lines.append(f"  {name:14s} {json.dumps(det.config())}  {det.requirements()}; {export}{notes}")
    lines += ["training:   " + ", ".join(sorted(OBJECTIVES)), "archs:      " + ", ".join(ARCHS)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    handlers = {"train": _train, "bench": _bench, "extract": _extract, "fit": _fit, "score": _score, "guard": _guard,
                "report": _report, "list": _list}
    collective = args.cmd in ("train", "bench", "extract")  # the commands that run under torchrun
    distributed = importlib.import_module(".distributed", __package__) if collective else None
    joined = done = False
    rc = 0
    import warnings

    shown = warnings.showwarning  # a warning is one line too, without the source line that raised it
    warnings.showwarning = lambda message, *_, **__: print(f"oodlab {args.cmd}: warning: {message}", file=sys.stderr)
    try:
        if distributed is not None:
            joined = distributed.init()  # under torchrun: join the process group (gloo on CPU, NCCL on CUDA)
        handlers[args.cmd](args)
        done = True
    except Exception as exc:  # a user's error is one line; anything else too, with the way to its traceback
        if args.debug or os.environ.get("OODLAB_DEBUG"):
            raise
        ranks = distributed.world_size() if distributed is not None else 1
        where = f" (rank {distributed.rank()} of {ranks})" if ranks > 1 else ""
        expected = isinstance(exc, (ValueError, OSError, TypeError, MemoryError)) or (
            distributed is not None and isinstance(exc, distributed.PeerError))
        text = " ".join(str(exc).split()) or type(exc).__name__
        if not expected:
            text = f"{type(exc).__name__}: {text} (an unexpected error: --debug shows its traceback)"
        # under torchrun the ranks share one stderr: a line of its own, not glued to rank 0's progress bar
        print(f"{chr(10) if where else ''}oodlab {args.cmd}{where}: error: {text}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished epochs / detectors are saved; run the same command again to resume",
              file=sys.stderr)
        rc = 130
    finally:
        warnings.showwarning = shown
        if joined:
            distributed.shutdown(wait=done)
    if joined:
        # every file is written and the process group is gone; gloo's threads can still abort the interpreter's
        # teardown ("terminate called without an active exception", a SIGABRT after a run that went well), so a
        # distributed process leaves here, its output flushed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
