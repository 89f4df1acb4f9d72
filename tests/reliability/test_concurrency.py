"""Two `oodlab bench` processes sharing one feature cache and one results folder do not corrupt each other.

Every file is written under a temporary name unique to its process and thread, then renamed (the
last rename wins, and both processes compute the same bytes); results rows are appended with one
O_APPEND write each, and a row both processes wrote is read once.
"""

import json
import subprocess
import sys

from helpers import subprocess_env
from oodlab.features.store import check_shard
from oodlab.bench import load_rows
from oodlab.data import load_suite


def test_two_benches_share_cache_and_out(tmp_path):
    env = subprocess_env(OODLAB_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "oodlab.cli", "bench", "--detectors", "energy,msp,odin", "--out", str(tmp_path / "out"),
           "--device", "cpu"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    want = 3 * len(load_suite("fashionmnist").ood)  # every (detector, OOD set) row once
    rows = load_rows(tmp_path / "out")
    assert len(rows) == want and len({(r["key"], r["ood"]) for r in rows}) == want
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(res["rows"]) == want
    leftovers = [p for p in (tmp_path).rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    # every cache entry the two processes wrote is whole: it reads back with a matching checksum
    metas = list((tmp_path / "cache" / "features").glob("*/shard-*.json"))
    records = [json.loads(m.read_text()) for m in metas]
    assert metas and all(check_shard(m.parent, int(m.stem.split("-")[1]), r["key"], tuple(r["items"])) is not None
                         for m, r in zip(metas, records))
