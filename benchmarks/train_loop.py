"""Training-loop speed: one epoch of the default recipe with this tree's loop against an earlier commit's.

    python benchmarks/train_loop.py [--base 6532d25] [--repeats 2] [--threads 1] [--no-write]

Checks the ``--base`` commit out into a temporary git worktree and runs ``oodlab train --suite
fashionmnist --epochs 1`` alternately with each tree (``--repeats`` times each, ``--threads`` CPU
threads), reading the epoch's training seconds from the run's history. Prints the median of each
and their ratio, and writes the "train_loop" section of docs/results.md. The default base is the
loop before channels-last training and fused evaluation.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT, child_env, parser, read_rows, run_timed, table, write_section


def _epoch(tree: Path, out: Path, threads: int) -> tuple[float, float, float]:
    _, wall = run_timed([sys.executable, "-m", "oodlab.cli", "train", "--suite", "fashionmnist", "--epochs", "1",
                         "--out", str(out)], env=child_env(threads, tree), cwd=tree, stdout=subprocess.DEVNULL)
    row = read_rows(out / "history.jsonl")[-1]
    return row["seconds"], wall, row["test_acc"]


def main() -> None:
    ap = parser(__doc__, threads=1, repeats=2)
    ap.add_argument("--base", default="6532d25")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            times: dict[str, list[tuple[float, float, float]]] = {"base": [], "now": []}
            for i in range(args.repeats):
                for name, tree in (("base", base), ("now", ROOT)):
                    times[name].append(_epoch(tree, Path(tmp) / f"{name}-{i}", args.threads))
                    print(name, times[name][-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    rows = [[name, f"{med[name][0]:.1f}", f"{med[name][1]:.1f}", ", ".join(f"{100 * t[2]:.2f}" for t in times[name])]
            for name in ("base", "now")]
    body = (f"One epoch of the default Fashion-MNIST recipe (469 steps of batch 128), {args.threads} CPU thread(s), "
            f"{args.repeats} alternating runs each, medians.\n\n"
            + table(["loop", "training s (epoch)", "wall s (process, with evaluation)",
                     "test accuracy after the epoch (%)"], rows) +
            f"\n\nSpeed-up of the training epoch: **{med['base'][0] / med['now'][0]:.2f}x** "
            f"(whole command {med['base'][1] / med['now'][1]:.2f}x), base = commit {args.base}.\n")
    print(body)
    if not args.no_write:
        write_section("train_loop", "Training loop speed", body, command=f"python benchmarks/train_loop.py --base "
                      f"{args.base} --repeats {args.repeats} --threads {args.threads}")


if __name__ == "__main__":
    main()
