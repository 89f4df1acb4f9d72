"""The default models shipped inside the package: they load, match their record and reach its accuracy."""

import json

import pytest

from oodlab.bench.api import run_bench
from oodlab.specs import RunSpec
from oodlab.data import load_suite
from oodlab.features import extract
from oodlab.models import checkpoint_fingerprint, load_checkpoint
from oodlab.training.recipes import default_checkpoint, shipped_checkpoint


@pytest.mark.parametrize("suite", ["fashionmnist", "fashionmnist-split"])
def test_shipped_checkpoint_matches_its_record(suite):
    ckpt = shipped_checkpoint(suite)
    assert ckpt is not None and ckpt.stat().st_size < 1_000_000
    record = json.loads(ckpt.with_suffix(".json").read_text())["training_record"]
    assert checkpoint_fingerprint(ckpt) == record["fingerprint"]
    assert record["command"].startswith("OMP_NUM_THREADS=1 oodlab train --suite " + suite)
    assert record["compute"] == "cpu, 1 thread" and record["epochs"] == 15 and record["seed"] == 0
    model, meta = load_checkpoint(ckpt)
    s = load_suite(suite)
    assert meta["num_classes"] == s.num_classes and default_checkpoint(s) == ckpt
    acc = extract(model, s.id_test, device="cpu").accuracy()
    # another CPU thread count sums in another order; that may flip a near-tie argmax or two
    assert acc >= record["test_accuracy"] - 2e-4 and acc > 0.9


def test_bench_records_the_shipped_fingerprint(tmp_path):
    rows = run_bench(RunSpec(device="cpu"), detectors="energy", out_dir=tmp_path / "r", verbose=False)
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["settings"]["model_id"] == checkpoint_fingerprint(shipped_checkpoint("fashionmnist"))
    assert {r["ood"] for r in rows} == set(load_suite("fashionmnist").ood) >= {"mnist", "faces", "terrain", "gaussian"}
    assert {r["ood"] for r in rows if r["kind"] == "synthetic"} == {"gaussian", "uniform"}
