"""Files an older oodlab wrote (tests/fixtures/legacy, made by its make.py at the commit in expected.json) still load:
a bench folder resumes without recomputing, cache entries are reused, a fitted detector and a guard give the
scores and flags they gave then."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_suite
from oodlab.bench import BenchContext, load_rows, run_detectors
from oodlab.detectors import create, load_detector
from oodlab.features import FeatureCache, extract
from oodlab.guard import Guard
from oodlab.models import load_checkpoint

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture
def legacy(tmp_path):
    shutil.copytree(LEGACY, tmp_path / "legacy")
    return tmp_path / "legacy", json.loads((LEGACY / "expected.json").read_text())


def test_fixtures_come_from_an_older_commit(legacy):
    _, expected = legacy
    assert len(expected["commit"]) == 40 and expected["commit"].startswith("725d3fb")


def test_old_bench_folder_and_caches_are_reused(legacy, monkeypatch):
    root, _ = legacy
    model, _ = load_checkpoint(root / "model.safetensors")
    suite = make_tiny_suite()
    before = load_rows(root / "bench")
    import oodlab.detectors.base as base
    import oodlab.features.extraction as extraction

    monkeypatch.setattr(extraction, "extract", lambda *a, **k: pytest.fail("features were extracted again"))
    monkeypatch.setattr(base, "score_with_model", lambda *a, **k: pytest.fail("ODIN ran again"))
    ctx = BenchContext(suite, model, "legacy-model", root / "bench", FeatureCache(root / "cache" / "features"),
                       device="cpu")
    rows = run_detectors(ctx, [create("energy"), create("knn", k=3), create("odin")])
    assert rows == before and len(rows) == 6  # done detectors are kept as they were
    # a fresh output folder: the old fit and score caches and features serve it, nothing is recomputed
    again = run_detectors(BenchContext(suite, model, "legacy-model", root / "bench2",
                                       FeatureCache(root / "cache" / "features"), device="cpu"),
                          [create("knn", k=3), create("odin")])
    old = {(r["key"], r["ood"]): r["auroc"] for r in before}
    assert all(r["fit_cached"] for r in again if r["detector"] == "knn")
    assert all(old[(r["key"], r["ood"])] == r["auroc"] for r in again)


def test_old_fitted_detector_and_guard_give_the_same_answers(legacy):
    root, expected = legacy
    model, _ = load_checkpoint(root / "model.safetensors")
    suite = make_tiny_suite()
    vim = load_detector(root / "vim")
    test = extract(model, suite.id_test, device="cpu")
    torch.testing.assert_close(vim.score(test), torch.tensor(expected["vim"], dtype=torch.float64), rtol=1e-9, atol=1e-9)
    guard = Guard.load(root / "guard", device="cpu")
    assert guard.predict(suite.ood["noise"]).is_ood.tolist() == expected["guard_flags"]
