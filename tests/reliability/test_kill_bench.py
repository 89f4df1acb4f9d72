"""kill -9 in the middle of `oodlab bench`, then the same command: the result rows and scores equal an uninterrupted run's.

The benchmark runs in a subprocess on the tiny suite. To kill it at a chosen point, the test's own driver
(test code, nothing in oodlab) wraps one function in that subprocess: on its N-th call (N drawn with a fixed
seed) the wrapper writes a marker file and waits; the test polls for the marker and sends SIGKILL. Kill points:

- ``extract``: before the N-th batch of feature extraction (the training set cached, the others not);
- ``fit``: before the N-th backward pass (step) of the flow's fit (energy and knn finished; the flow has no resumable
  state of its own, so the same command refits it from the start, with the same seed);
- ``report``: before the N-th detector's curves of report.html (every row and results.json written, the report not).
"""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import subprocess_env
from oodlab.bench import load_rows, load_scores
from oodlab.models import build, save_checkpoint

TESTS = Path(__file__).resolve().parents[1]
VOLATILE = ("fit_s", "score_s")
DETECTORS = "energy,knn,flow"
DRIVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import make_tiny_suite
from oodlab.data import suites
suites.SUITES["tiny"] = lambda data_root=None: make_tiny_suite()

def pause():  # the test sends SIGKILL while this process waits here
    Path({marker!r}).write_text("reached")
    time.sleep(600)

def on_call(owner, attr, n):
    orig, calls = getattr(owner, attr), [0]
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            pause()
        return orig(*args, **kwargs)
    setattr(owner, attr, wrapped)

{patch}
from oodlab.cli import main
sys.exit(main({args!r}))
"""
# what to wrap, and the range N is drawn from: the tiny suite in batches of 16 is 6 (ID train) + 3 + 3 + 2
# batches, so N in 7..14 kills after the training set is cached; the flow takes 6 steps over 96 training
# features; the report reduces the scores of 3 detectors to the curves it embeds
POINTS = {
    "extract": ("from oodlab.models.adapter import Classifier; on_call(Classifier, 'features', {n})", 7, 14),
    "fit": ("import torch; on_call(torch.Tensor, 'backward', {n})", 2, 6),
    "report": ("import oodlab.bench.html as html; on_call(html, '_curves', {n})", 1, 3),
}


def _args(ckpt: Path, out: Path) -> list[str]:
    return ["bench", "--suite", "tiny", "--checkpoint", str(ckpt), "--detectors", DETECTORS, "--param", "knn.k=5",
            "--param", "flow.batch_size=16", "--batch-size", "16", "--device", "cpu", "--out", str(out)]


def _run(args: list[str], cache: Path, patch: str = "", marker: Path | None = None, **popen) -> subprocess.Popen:
    code = DRIVER.format(tests=str(TESTS), marker=str(marker), patch=patch, args=args)
    return subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(OODLAB_CACHE=str(cache)), **popen)


def _finish(args: list[str], cache: Path) -> None:
    proc = _run(args, cache, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-kill")
    ckpt = save_checkpoint(build("smallcnn", 3, 1), root / "model", {"arch": "smallcnn", "num_classes": 3, "in_channels": 1})
    _finish(_args(ckpt, root / "clean"), root / "clean-cache")
    return ckpt, root / "clean"


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_bench_resumes_to_the_same_rows(point, clean, tmp_path):
    ckpt, clean_out = clean
    patch, lo, hi = POINTS[point]
    n = random.Random(f"issue-19-{point}").randint(lo, hi)
    out, cache, marker = tmp_path / "out", tmp_path / "cache", tmp_path / "reached"
    args = _args(ckpt, out)
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = _run(args, cache, patch.format(n=n), marker, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert marker.exists(), f"the run never reached the kill point: {(tmp_path / 'stderr.txt').read_text()[-3000:]}"
    assert proc.returncode == -signal.SIGKILL

    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.rglob("*") if p.is_file()}
    rows_before = load_rows(out)
    if point == "extract":  # the training set's features are cached, the rest not
        assert rows_before == [] and not (out / "results.json").exists() and before
    elif point == "fit":  # what finished before the kill is on disk: energy's and knn's rows
        assert {r["detector"] for r in rows_before} == {"energy", "knn"} and not (out / "results.json").exists()
    else:
        assert len(rows_before) == 6 and (out / "results.json").exists() and not (out / "report.html").exists()
    jsonl_before = (out / "results.jsonl").read_bytes() if (out / "results.jsonl").exists() else b""

    _finish(args, cache)  # the same command again

    rows, want = load_rows(out), load_rows(clean_out)
    assert _strip(rows) == _strip(want) and len(rows) == 6
    assert _strip(json.loads((out / "results.json").read_text())["rows"]) == _strip(want)
    for key in {r["key"] for r in want}:
        a, b = load_scores(clean_out, key), load_scores(out, key)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (out / "report.html").is_file()
    assert (out / "results.jsonl").read_bytes().startswith(jsonl_before)  # finished rows kept, never rewritten
    if point == "report":
        assert (out / "results.jsonl").read_bytes() == jsonl_before  # nothing recomputed
    for path, (mtime, data) in before.items():  # cache entries written before the kill are reused, not redone
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    assert not [p for p in [*out.rglob("*"), *cache.rglob("*")] if ".tmp" in p.name]
