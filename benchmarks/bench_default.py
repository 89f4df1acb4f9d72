"""The README's main job, measured: `oodlab bench` on the default suite, cold and then warm.

Runs the command twice in a fresh cache folder: the first run trains the default model and
extracts every feature set, the second reuses both. Prints the wall times, the default model's
accuracy and training time, and the results table, and writes the "bench" section of
docs/results.md.

    python benchmarks/bench_default.py [--suite fashionmnist] [--keep-cache DIR] [--reuse-model]

With ``--reuse-model`` the default model already in the user's cache is copied into the fresh
cache, so the first run measures extraction + detectors only; the training time is then read
from the model's history (sum of its epoch times).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_doc import write_section


def _bench(env: dict[str, str], out: Path, suite: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "oodlab.cli", "bench", "--suite", suite, "--out", str(out)], env=env,
                   check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="fashionmnist")
    ap.add_argument("--keep-cache", help="use (and keep) this cache folder instead of a temporary one")
    ap.add_argument("--reuse-model", action="store_true", help="copy the cached default model (time extraction + detectors)")
    args = ap.parse_args()
    cache = Path(args.keep_cache or tempfile.mkdtemp(prefix="oodlab-bench-"))
    if args.reuse_model:
        from oodlab.data import load_suite
        from oodlab.training.recipes import default_checkpoint

        run = default_checkpoint(load_suite(args.suite)).parent
        shutil.copytree(run, cache / "models" / run.name, dirs_exist_ok=True)
    env = {**os.environ, "OODLAB_CACHE": str(cache), "OODLAB_QUIET": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        cold = _bench(env, Path(tmp) / "cold", args.suite)
        warm = _bench(env, Path(tmp) / "warm", args.suite)
        results = Path(tmp) / "warm" / "results.md"
        table = results.read_text().split("\n## All metrics")[0].split("\n", 2)[2]
        table = "\n".join(line for line in table.splitlines() if not line.startswith("Checkpoint `"))  # temp path
        (model_dir,) = (cache / "models").iterdir()
        hist = [json.loads(line) for line in (model_dir / "history.jsonl").read_text().splitlines()]
    train_s = sum(h["seconds"] for h in hist)
    first = ("model cached: extracts features, runs all detectors" if args.reuse_model
             else "trains the default model, extracts features, runs all detectors")
    lines = [
        "| run | wall time (s) |", "|---|---|",
        f"| first `oodlab bench` ({first}) | {cold:.1f} |",
        f"| second `oodlab bench` (model and features cached) | {warm:.1f} |",
        "",
        f"Default model: {model_dir.name}, {len(hist)} epochs, training {train_s:.0f} s (sum of epoch times), "
        f"test accuracy {100 * hist[-1]['test_acc']:.2f}%.",
        "",
        table,
    ]
    body = "\n".join(lines)
    print(body)
    write_section("bench", f"`oodlab bench` on {args.suite}", "python benchmarks/bench_default.py --suite " + args.suite + (" --reuse-model" if args.reuse_model else ""), body)


if __name__ == "__main__":
    main()
