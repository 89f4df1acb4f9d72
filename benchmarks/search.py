"""OpenOOD-style parameter search on fashionmnist-split: what `--search` chooses, what it costs, and that the
features are extracted once per data set for the whole search.

Runs `oodlab bench` twice on an empty feature cache each, in this process (2 threads): plain, and with
`--search` (validation OOD: 1,000 training images of the held-out classes 6-9; ID val: the suite's seeded
held-out 10% of ID train). Counts the extractions per data set by wrapping `oodlab.features.extract`.

    python benchmarks/search.py [--detectors a,b] [--no-write]
"""

from __future__ import annotations

import collections
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

from harness import feature_cache, parser, table, threads, write_section

import oodlab.features.extraction as extraction
from oodlab.bench import run_bench
from oodlab.bench.openood import GRIDS
from oodlab.bench.report import summary_rows
from oodlab.specs import RunSpec

DEFAULT = "energy,react,ash-b,ash-s,scale,knn,vim,gen,fdbd,nci,vra,msp,mahalanobis"


def _bench(search: bool, detectors: str, root: Path) -> tuple[float, list[dict], collections.Counter]:
    seen: collections.Counter = collections.Counter()
    real = extraction.extract

    def counted(model, data, *a, **k):  # passes over a data set: items extracted / its size (shards add up)
        start, stop = k.get("start", 0), k.get("stop") or len(data)
        seen[data.name] += (stop - start) / len(data)
        return real(model, data, *a, **k)

    with feature_cache(root / ("search" if search else "plain")), mock.patch.object(extraction, "extract", counted):
        t0 = time.perf_counter()
        rows = run_bench(RunSpec(data="fashionmnist-split", device="cpu"), detectors=detectors,
                         out_dir=root / f"out-{search}", search=search, verbose=False)
        return time.perf_counter() - t0, rows, seen


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--detectors", default=DEFAULT)
    a = ap.parse_args()
    threads(2)
    os.environ["OODLAB_QUIET"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        plain_s, plain, plain_seen = _bench(False, a.detectors, Path(tmp))
        search_s, searched, seen = _bench(True, a.detectors, Path(tmp))
    base = {s["detector"]: s for s in summary_rows(plain)}
    rows = []
    notes = {r["detector"]: r.get("search", {}) for r in searched}
    nat = lambda x: f"{100 * x['by_kind']['natural']['auroc']:.2f} / {100 * x['by_kind']['natural']['fpr95']:.2f}"  # noqa: E731
    for s in summary_rows(searched):
        note, grid = notes[s["detector"]], GRIDS.get(s["detector"], ("none", {}))
        keys = ("p_min", "p_max") if s["detector"].startswith("adascale-") else tuple(grid[1])
        chosen = {k: s["params"][k] for k in keys} if "val_auroc" in note else note.get("note", "defaults")
        val = f"{100 * note['val_auroc']:.2f}" if "val_auroc" in note else "–"
        rows.append([s["detector"], grid[0].split(" ")[0], len(note.get("points", [])), chosen, val,
                     nat(base[s["detector"]]), nat(s)])
    sets = sorted(set(seen) | set(plain_seen))
    counts = table(["data set", "passes, plain bench", "passes, bench --search"],
                   [[n, f"{plain_seen.get(n, 0):g}", f"{seen.get(n, 0):g}"] for n in sets])
    body = f"""On `fashionmnist-split` with oodlab's shipped default model, {len(base)} detectors
(`{a.detectors}`), each run on an empty feature cache, 2 threads, one process:
plain bench **{plain_s:.1f} s**, bench `--search` **{search_s:.1f} s** ({search_s / plain_s:.2f}x). The search
scores ID val (the suite's seeded held-out 10% of ID train: it has no ID validation split) against its
validation OOD set (1,000 *training* images of classes 6-9; the near-OOD test set is their test images),
never a test OOD set; OpenOOD's grids are those of its `configs/postprocessors/*.yml` (`oodlab.bench.openood.GRIDS`).
Detectors without an OpenOOD grid keep their defaults (and say so in their rows).

{table(["detector", "OpenOOD grid", "points scored", "chosen", "val AUROC",
        "test natural AUROC / FPR95, defaults", "chosen"], rows)}

Forward passes over each data set (images extracted / its size, counted by wrapping `extract`; the whole search
adds one pass over each validation set, whatever the number of grid points):

{counts}
"""
    print(body)
    if not a.no_write:
        write_section("search", "OpenOOD-style parameter search (--search)", body)


if __name__ == "__main__":
    main()
