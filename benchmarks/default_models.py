"""Train the default models with the default recipe and ship them inside the package.

    python benchmarks/default_models.py [--runs runs/default-models] [--threads 1]

For each 28x28 suite this runs ``oodlab train --suite S --out RUNS/S`` on ``--threads`` CPU threads
(a finished run folder is reused: training resumes, so a complete one trains nothing), measures
the test accuracy of the final checkpoint, and copies it to ``oodlab/models/weights/S-smallcnn``
(safetensors + JSON) with its training record: command, seed, compute (device and threads),
epochs, test accuracy, fingerprint, torch version and date.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, child_env, commit, parser, threads as set_threads

SUITES = ("fashionmnist", "fashionmnist-split")


def ship(suite: str, runs: Path, threads: int) -> dict:
    import torch

    from oodlab.data import load_suite
    from oodlab.features import extract
    from oodlab.models import checkpoint_fingerprint, load_checkpoint
    from oodlab.training.recipes import SHIPPED, shipped_name

    run = runs / suite
    cmd = ["oodlab", "train", "--suite", suite, "--out", str(run)]
    subprocess.run([sys.executable, "-m", "oodlab.cli", *cmd[1:]], env=child_env(threads), check=True)
    ckpt = run / "last.safetensors"
    model, meta = load_checkpoint(ckpt)
    set_threads(threads)
    acc = extract(model, load_suite(suite).id_test, device="cpu").accuracy()
    record = {"command": f"OMP_NUM_THREADS={threads} {shlex.join(cmd[:-2])} --out <run folder>", "oodlab_commit": commit(),
              "seed": meta["train_config"]["seed"], "compute": meta.get("compute"),
              "epochs": meta.get("epoch"), "test_accuracy": acc, "fingerprint": checkpoint_fingerprint(ckpt),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    SHIPPED.mkdir(parents=True, exist_ok=True)
    dst = SHIPPED / f"{shipped_name(suite)}.safetensors"
    shutil.copyfile(ckpt, dst)
    dst.with_suffix(".json").write_text(json.dumps({**meta, "training_record": record}, indent=2, sort_keys=True))
    return record


def main() -> None:
    ap = parser(__doc__, threads=1, write=False)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "default-models"))
    ap.add_argument("--suite", action="append", choices=SUITES, help="only these suites (repeatable)")
    args = ap.parse_args()
    for suite in args.suite or SUITES:
        rec = ship(suite, Path(args.runs), args.threads)
        print(f"{suite}: test accuracy {100 * rec['test_accuracy']:.2f}%, fingerprint {rec['fingerprint']}, "
              f"{rec['compute']}")


if __name__ == "__main__":
    main()
