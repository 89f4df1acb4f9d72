"""`torchrun --nproc-per-node 2` (gloo, CPU) of `oodlab bench` gives the single-process results exactly.

Both ranks extract their own contiguous block of cache shards (shards of 16 items here, so each set is
split between the ranks and the tiny sets' sizes do not divide evenly); rank 0 alone fits, scores and
writes. The shard grid does not depend on the world size, so the features, and every result, are equal.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from helpers import subprocess_env
from oodlab.bench import load_rows, load_scores

TESTS = Path(__file__).resolve().parents[1]
DRIVER = """
import os, sys
sys.path.insert(0, {tests!r})
from helpers import make_tiny_suite
from oodlab.cli import main
from oodlab.data import suites
from oodlab.features import extraction
suites.SUITES["tiny"] = lambda data_root=None: make_tiny_suite(n_train=90, n_test=45)
if os.environ.get("RANK") == os.environ.get("DIE_ON_RANK"):  # test hook: this rank dies in its second shard
    real, calls = extraction.extract, []
    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os._exit(3)
        return real(*a, **k)
    extraction.extract = dying
if os.environ.get("RANK") == os.environ.get("FAIL_ON_RANK"):  # test hook: this rank cannot read a folder
    def unreadable(*a, **k):
        raise PermissionError("cannot read folder /data/ood: Permission denied")
    extraction.extract = unreadable
sys.exit(main())
"""
DETECTORS = "energy,react,mahalanobis,vim,knn,odin"
VOLATILE = ("fit_s", "score_s")


def _bench(tmp_path: Path, name: str, ckpt: Path, launcher: list[str], die_on_rank: str = "",
           expect: int = 0, fail_on_rank: str = "") -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(TESTS)))
    env = {**subprocess_env(), "OODLAB_CACHE": str(tmp_path / f"cache-{name}"), "OODLAB_SHARD_ITEMS": "16",
           "OODLAB_WORKERS": "0", "OMP_NUM_THREADS": "1", "DIE_ON_RANK": die_on_rank,
           "FAIL_ON_RANK": fail_on_rank}
    out = tmp_path / name
    cmd = [*launcher, str(driver), "bench", "--suite", "tiny", "--model", str(ckpt), "--detectors", DETECTORS,
           "--out", str(out), "--device", "cpu", "--batch-size", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == (expect == 0), proc.stderr[-3000:]
    proc.out = out
    return proc


def test_two_rank_bench_equals_one_process(tmp_path):
    from oodlab.models import build, save_checkpoint

    torch.manual_seed(0)
    meta = {"arch": "smallcnn", "num_classes": 3, "in_channels": 1, "suite": "tiny"}
    ckpt = save_checkpoint(build("smallcnn", 3, 1).eval(), tmp_path / "model", meta)
    one = _bench(tmp_path, "one", ckpt, [sys.executable]).out
    two = _bench(tmp_path, "two", ckpt, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc-per-node", "2"]).out
    strip = lambda rows: sorted((json.dumps({k: v for k, v in r.items() if k not in VOLATILE}, sort_keys=True)  # noqa: E731
                                 for r in rows))
    rows_one, rows_two = load_rows(one), load_rows(two)
    assert len(rows_one) == 6 * 2 and strip(rows_one) == strip(rows_two)
    for r in rows_one:
        a, b = load_scores(one, r["key"]), load_scores(two, r["key"])
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # the ranks split the shards: 90 training items = 6 shards of 16 (the last of 10), 3 per rank
    (train_entry,) = (tmp_path / "cache-two" / "features").glob("tiny-train-*")
    assert len(list(train_entry.glob("shard-*.json"))) == 6


def test_a_rank_that_dies_fails_the_run_and_a_rerun_resumes(tmp_path):
    from oodlab.models import build, save_checkpoint

    torch.manual_seed(0)
    meta = {"arch": "smallcnn", "num_classes": 3, "in_channels": 1, "suite": "tiny"}
    ckpt = save_checkpoint(build("smallcnn", 3, 1).eval(), tmp_path / "model", meta)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _bench(tmp_path, "two", ckpt, torchrun, die_on_rank="1", expect=1)  # torchrun stops rank 0 too: no rows
    assert not (tmp_path / "two" / "results.jsonl").exists()
    kept = list((tmp_path / "cache-two" / "features").glob("*/shard-*.json"))
    assert kept  # the shards finished before the failure stay
    before = {p: p.stat().st_mtime_ns for p in kept}
    out = _bench(tmp_path, "two", ckpt, torchrun).out
    assert len(load_rows(out)) == 6 * 2
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # resumed: finished shards not rewritten


def test_a_rank_with_an_error_ends_every_rank_with_one_line_and_no_results(tmp_path):
    from oodlab.models import build, save_checkpoint

    torch.manual_seed(0)
    meta = {"arch": "smallcnn", "num_classes": 3, "in_channels": 1, "suite": "tiny"}
    ckpt = save_checkpoint(build("smallcnn", 3, 1).eval(), tmp_path / "model", meta)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = _bench(tmp_path, "two", ckpt, torchrun, fail_on_rank="1", expect=1)
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("oodlab bench")]
    first, second = sorted(lines)
    assert second == "oodlab bench (rank 1 of 2): error: cannot read folder /data/ood: Permission denied", lines
    # rank 0 sees the peer go in a collective, or torchrun stops it first (SIGTERM): either way one line
    assert first.startswith(("oodlab bench (rank 0 of 2): error: another rank stopped before this one finished (gloo: ",
                             "oodlab bench (rank 0 of 2): error: torchrun stopped this rank because another rank "
                             "failed")), lines
    assert first.endswith("its own message says why: fix that and run the same command again (finished shards and "
                          "rows are kept)")
    assert str(Path("oodlab") / "") not in "".join(ln for ln in proc.stderr.splitlines() if ln.strip().startswith("File"))
    assert not proc.out.exists()  # no rank wrote (or read) a results file
