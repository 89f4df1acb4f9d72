"""The README's main job, measured from a fresh clone: set-up, then `oodlab bench` cold and warm.

    python benchmarks/bench_default.py [--suite fashionmnist] [--no-clone] [--no-write]

Clones this repository into a temporary folder, runs ``bash setup.sh`` there (a new virtual
environment), then ``.venv/bin/oodlab bench`` twice with an empty feature cache (the first run
extracts every data set through the shipped default model and runs every detector; the second
reuses the features), then ``oodlab bench --detectors energy`` on another empty cache (it never
touches the training set). Prints the wall times and the results table and writes the "bench"
section of docs/results.md. ``--no-clone`` times the benches with this tree's environment instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT, child_env, parser, run_timed, table, write_section


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    return run_timed(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL)[1]


def main() -> None:
    ap = parser(__doc__, suite="fashionmnist")
    ap.add_argument("--no-clone", action="store_true", help="use this tree and its .venv (no set-up timing)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = child_env(OODLAB_CACHE=str(tmp / "cache"))
        rows = []
        if args.no_clone:
            tree, oodlab = ROOT, [sys.executable, "-m", "oodlab.cli"]
        else:
            tree = tmp / "clone"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(tree)], check=True)
            setup = _timed(["bash", "setup.sh"], tree, env)
            rows.append(["`bash setup.sh` (fresh clone: new virtual environment and the package; no test extras)",
                         f"{setup:.1f}"])
            oodlab = [str(tree / ".venv" / "bin" / "oodlab")]
        out = tmp / "runs"
        cold = _timed([*oodlab, "bench", "--suite", args.suite, "--out", str(out / "cold")], tree, env)
        warm = _timed([*oodlab, "bench", "--suite", args.suite, "--out", str(out / "warm")], tree, env)
        energy_env = child_env(OODLAB_CACHE=str(tmp / "cache-energy"))
        energy = _timed([*oodlab, "bench", "--suite", args.suite, "--detectors", "energy", "--out",
                         str(out / "energy")], tree, energy_env)
        res = json.loads((out / "warm" / "results.json").read_text())
        results = (out / "warm" / "results.md").read_text().split("\n## All metrics")[0].split("\n", 2)[2]
        results = "\n".join(line for line in results.splitlines() if not line.startswith("Checkpoint `"))
    rows += [["first `oodlab bench` (shipped model; extracts every data set, runs every detector)", f"{cold:.1f}"],
             ["second `oodlab bench` (features cached)", f"{warm:.1f}"],
             ["`oodlab bench --detectors energy` on an empty cache (no training-set pass)", f"{energy:.1f}"]]
    total = "" if args.no_clone else (f"\n\nFresh clone to the full table (`bash setup.sh && .venv/bin/oodlab bench`): "
                                      f"**{setup + cold:.0f} s**.")
    body = (table(["step", "wall time (s)"], rows) + total +
            f"\n\nShipped model {Path(res['settings']['checkpoint']).name}, fingerprint {res['settings']['model_id']}.\n\n"
            + results)
    print(body)
    if not args.no_write:
        write_section("bench", f"`oodlab bench` on {args.suite}", body, command="python benchmarks/bench_default.py "
                      "--suite " + args.suite + (" --no-clone" if args.no_clone else ""))


if __name__ == "__main__":
    main()
