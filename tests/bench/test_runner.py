"""The benchmark runner: one extraction per data set, rows per OOD set, resume without recomputation."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from oodlab.specs import RunSpec
from oodlab.bench import BenchContext, load_rows, load_scores, run_bench, run_detectors
from oodlab.detectors import create
from oodlab.features import FeatureCache
from oodlab.bench.report import format_summary, markdown, summary_rows
from oodlab.metrics import auroc, confidence_intervals
from oodlab.models import build, save_checkpoint
from oodlab.training import TrainConfig, train
from oodlab.training.erm import CrossEntropy
from helpers import make_tiny_suite


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    suite = make_tiny_suite()
    torch.manual_seed(0)
    model = build("smallcnn", 3, 1)
    run = tmp_path_factory.mktemp("run")
    ckpt = train(model, suite.id_train, CrossEntropy(), TrainConfig(epochs=2, batch_size=16, augment=False),
                 run, {"arch": "smallcnn", "num_classes": 3, "in_channels": 1}, device="cpu")
    return suite, model.eval(), ckpt


def test_sweep_extracts_each_set_once(trained, tmp_path):
    suite, model, _ = trained
    cache = FeatureCache(tmp_path / "cache")
    ctx = BenchContext(suite, model, "m", tmp_path / "out", cache, batch_size=32, device="cpu")
    dets = [create("msp"), create("energy"), create("maxlogit")]
    rows = run_detectors(ctx, dets)
    assert cache.extractions == 3  # test and two OOD sets once each; no detector here fits on the training set
    assert len(rows) == 3 * 2 and {r["ood"] for r in rows} == {"noise", "stripes"}
    assert {r["group"] for r in rows if r["ood"] == "stripes"} == {"near"}
    s = load_scores(tmp_path / "out", rows[0]["key"])
    assert set(s) == {"id", "noise", "stripes"} and len(s["id"]) == len(suite.id_test)
    row = next(r for r in rows if r["ood"] == "noise" and r["detector"] == rows[0]["detector"])
    assert row["auroc"] == pytest.approx(auroc(s["id"], s["noise"]))
    ci = confidence_intervals(s["id"], s["noise"])  # seeded: the row holds exactly these 95% bounds
    assert {k: row[k] for k in ci} == ci
    for r in rows:
        assert r["auroc_lo"] <= r["auroc"] <= r["auroc_hi"] and r["fpr95_lo"] <= r["fpr95"] <= r["fpr95_hi"]
    test_feats = cache.get(model, "m", suite.id_test)
    assert rows[0]["id_acc"] == pytest.approx(test_feats.accuracy())  # the model's own accuracy (MSP keeps logits)


def test_resume_skips_finished_detectors(trained, tmp_path):
    suite, model, _ = trained
    out = tmp_path / "out"
    ctx = BenchContext(suite, model, "m", out, FeatureCache(tmp_path / "c"), device="cpu")
    run_detectors(ctx, [create("msp")])
    before = (out / "results.jsonl").read_text()
    cache2 = FeatureCache(tmp_path / "c2")  # an empty cache: any extraction would show
    rows = run_detectors(BenchContext(suite, model, "m", out, cache2, device="cpu"), [create("msp"), create("energy")])
    assert (out / "results.jsonl").read_text().startswith(before)
    assert len(rows) == 4 and cache2.extractions == 3  # only energy needed features (not the training set's)
    again = run_detectors(BenchContext(suite, model, "m", out, FeatureCache(tmp_path / "c3"), device="cpu"),
                          [create("msp"), create("energy")])
    assert again == rows


@pytest.mark.parametrize("names,extracted", [(["energy"], {"tiny-test", "noise", "stripes"}),
                                             (["odin"], {"tiny-test"}),
                                             (["odin", "knn"], {"tiny-train", "tiny-test", "noise", "stripes"}),
                                             (["klm", "temp-scaling"], {"tiny-train-held-out", "tiny-test", "noise", "stripes"}),
                                             (["adascale-a"], {"tiny-test"})])
def test_only_the_sets_a_detector_reads_are_extracted(trained, tmp_path, monkeypatch, names, extracted):
    suite, model, _ = trained
    import oodlab.features.extraction as features

    seen = []
    real = features.extract
    monkeypatch.setattr(features, "extract", lambda m, data, *a, **k: seen.append(data.name) or real(m, data, *a, **k))
    ctx = BenchContext(suite, model, "m", tmp_path / "out", FeatureCache(tmp_path / "c"), device="cpu")
    rows = run_detectors(ctx, [create(n) for n in names])
    assert set(seen) == extracted and len(seen) == len(extracted)
    assert len(rows) == 2 * len(names) and all(0 <= r["auroc"] <= 1 for r in rows)


def test_second_run_reuses_fitted_detectors_and_model_path_scores(trained, tmp_path, monkeypatch):
    suite, model, _ = trained
    cache = FeatureCache(tmp_path / "cache" / "features")
    first = run_detectors(BenchContext(suite, model, "m", tmp_path / "a", cache, device="cpu"),
                          [create("knn", k=3), create("flow", blocks=2), create("odin")])
    import oodlab.detectors.base as base
    import oodlab.features.extraction as features

    seen = []
    real = features.extract
    monkeypatch.setattr(features, "extract", lambda m, data, *a, **k: seen.append(data.name) or real(m, data, *a, **k))
    monkeypatch.setattr(base, "score_with_model", lambda *a, **k: pytest.fail("ODIN ran again"))
    again = run_detectors(BenchContext(suite, model, "m", tmp_path / "b", FeatureCache(cache.root), device="cpu"),
                          [create("knn", k=3), create("flow", blocks=2), create("odin")])
    assert seen == []  # every feature set came from the cache, and no training set was needed
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("fit_s", "score_s", "fit_cached")} for r in rows]  # noqa: E731
    assert strip(again) == strip(first)
    assert {r["fit_cached"] for r in again if r["detector"] in ("knn", "flow")} == {True}
    for key in {r["key"] for r in first}:
        a, b = load_scores(tmp_path / "a", key), load_scores(tmp_path / "b", key)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    bad = next((tmp_path / "cache" / "detectors").iterdir())
    bad.write_bytes(b"broken")  # an unusable entry is refitted, never used
    third = run_detectors(BenchContext(suite, model, "m", tmp_path / "c", FeatureCache(cache.root), device="cpu"),
                          [create("knn", k=3), create("flow", blocks=2)])
    assert strip(third) == strip([r for r in first if r["detector"] != "odin"])


def test_truncated_jsonl_line_is_ignored(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps({"key": "a"}) + "\n" + '{"key": "b", "aur')
    assert load_rows(tmp_path) == [{"key": "a"}]


def test_run_bench_writes_tables(trained, tmp_path):
    suite, _, ckpt = trained
    rows = run_bench(RunSpec(ckpt, data=suite, device="cpu"), detectors="msp,energy", out_dir=tmp_path / "res",
                     params={"energy": {"temperature": 2.0}}, verbose=False)
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert res["settings"]["detectors"]["energy"] == {"temperature": 2.0}
    assert res["settings"]["data"]["noise"] == suite.ood["noise"].fingerprint
    assert len(res["rows"]) == len(rows) == 4
    csv = (tmp_path / "res" / "results.csv").read_text().splitlines()
    assert len(csv) == 5 and csv[0].startswith("detector,key,ood")
    assert csv[0].split(",")[4:6] == ["kind", "auroc"] and csv[0].split(",")[9:13] == ["auroc_lo", "auroc_hi", "fpr95_lo", "fpr95_hi"]
    md = (tmp_path / "res" / "results.md").read_text()
    assert "| msp |" in md and "| energy |" in md
    r = res["rows"][0]
    assert "| auroc_lo | auroc_hi | fpr95_lo | fpr95_hi |" in md
    assert (f"| {100 * r['aupr_out']:.2f} | {100 * r['auroc_lo']:.2f} | {100 * r['auroc_hi']:.2f} | "
            f"{100 * r['fpr95_lo']:.2f} | {100 * r['fpr95_hi']:.2f} |") in md
    old = [{k: v for k, v in row.items() if not k.endswith(("_lo", "_hi"))} for row in rows]  # rows of an older run
    assert "| – | – | – | – |" in markdown(old, res["settings"])
    with pytest.raises(ValueError, match="unknown detector"):
        run_bench(RunSpec(ckpt, data=suite, device="cpu"), detectors="nope", out_dir=tmp_path / "x", verbose=False)
    with pytest.raises(ValueError, match="not in the run"):
        run_bench(RunSpec(ckpt, data=suite, device="cpu"), detectors="msp", out_dir=tmp_path / "x",
                  params={"energy": {"temperature": 2.0}}, verbose=False)


def test_natural_and_synthetic_means_are_reported_apart(trained, tmp_path):
    suite, _, ckpt = trained
    suite = dataclasses.replace(suite, ood={**suite.ood, "stripes2": suite.ood["stripes"]},
                                groups={"near": ["stripes", "stripes2"], "far": ["noise"]}, synthetic=("noise",))
    rows = run_bench(RunSpec(ckpt, data=suite, device="cpu"), detectors="energy", out_dir=tmp_path / "res", verbose=False)
    assert {r["ood"]: r["kind"] for r in rows} == {"stripes": "natural", "stripes2": "natural", "noise": "synthetic"}
    (s,) = summary_rows(rows)
    by = {r["ood"]: r for r in rows}
    assert s["by_kind"]["synthetic"]["auroc"] == by["noise"]["auroc"]
    assert s["by_kind"]["natural"]["fpr95"] == pytest.approx((by["stripes"]["fpr95"] + by["stripes2"]["fpr95"]) / 2)
    assert s["mean"]["auroc"] == pytest.approx(sum(r["auroc"] for r in rows) / 3)
    md = (tmp_path / "res" / "results.md").read_text()
    nat, syn = s["by_kind"]["natural"], s["by_kind"]["synthetic"]
    assert "| natural AUROC / FPR95 | synthetic AUROC / FPR95 | ID acc |" in md
    assert f"| {100 * nat['auroc']:.2f} / {100 * nat['fpr95']:.2f} | {100 * syn['auroc']:.2f} / {100 * syn['fpr95']:.2f} |" in md
    assert "mean over natural sets" in (tmp_path / "res" / "report.html").read_text()
    header = format_summary(rows).splitlines()[0].split()
    assert header[-6:] == ["natural", "AUROC/FPR95", "synthetic", "AUROC/FPR95", "ID", "acc"]


def test_checkpoint_class_mismatch(trained, tmp_path):
    suite, _, _ = trained
    other = save_checkpoint(build("smallcnn", 5, 1), tmp_path / "five", {"arch": "smallcnn", "num_classes": 5,
                                                                         "in_channels": 1})
    with pytest.raises(ValueError, match="5 classes"):
        run_bench(RunSpec(other, data=suite, device="cpu"), detectors="msp", out_dir=tmp_path / "x", verbose=False)


def test_held_out_fits_use_the_suites_validation_set(trained, tmp_path):
    """fits_on = "val": fitted on Suite.held_out (a seeded 10% of ID train here, id_val where the suite has one)."""
    import dataclasses

    from oodlab.detectors import fit_data, fit_detector

    suite, model, _ = trained
    held = suite.held_out()
    assert held.name == "tiny-train-held-out" and len(held) == round(0.1 * len(suite.id_train))
    assert held.fingerprint == suite.held_out().fingerprint != suite.id_train.fingerprint  # seeded
    cache = FeatureCache(tmp_path / "c")
    ctx = BenchContext(suite, model, "m", tmp_path / "out", cache, device="cpu")
    rows = run_detectors(ctx, [create("temp-scaling"), create("knn", k=3)])
    want = fit_detector(create("temp-scaling"), model, "m", suite, cache, device="cpu")
    assert want.fitted_temperature == create("temp-scaling").fit(cache.get(model, "m", held), model.head).fitted_temperature
    key = next(r["key"] for r in rows if r["detector"] == "temp-scaling")
    assert np.array_equal(load_scores(tmp_path / "out", key)["id"], want.score(cache.get(model, "m", suite.id_test)).numpy())
    with_val = dataclasses.replace(suite, id_val=suite.id_test)
    assert fit_data(create("klm"), with_val) is suite.id_test and fit_data(create("knn"), with_val) is suite.id_train
    assert fit_data(create("energy"), with_val) is None


def test_model_path_scores_are_cached_per_fit_data(trained, tmp_path, monkeypatch):
    """AdaSCALE fits on held-out ID data: scores cached for one fit are not served to a fit on other data."""
    import oodlab.detectors.base as base

    suite, model, _ = trained
    cache = FeatureCache(tmp_path / "cache" / "features")
    calls = []
    real = base.score_with_model
    monkeypatch.setattr(base, "score_with_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    det = lambda: create("adascale-a", num_samples=8, k1=5.0, k2=10.0)  # noqa: E731
    run_detectors(BenchContext(suite, model, "m", tmp_path / "a", cache, device="cpu"), [det()])
    first = len(calls)
    run_detectors(BenchContext(suite, model, "m", tmp_path / "b", cache, device="cpu"), [det()])
    assert len(calls) == first  # the same fit data: every score from the cache
    other = dataclasses.replace(suite, id_train=suite.id_train.subset(60, 1))  # another held-out 10%
    run_detectors(BenchContext(other, model, "m", tmp_path / "c", cache, device="cpu"), [det()])
    assert len(calls) == 2 * first  # fitted on other data: scored again


def test_a_warm_run_scores_and_resamples_nothing_again(trained, tmp_path, monkeypatch):
    """A second run into a new folder reads every score and interval from the cache; other features (another
    cache dtype) are scored anew."""
    import oodlab.bench.runner as runner
    from oodlab.detectors.base import Detector

    suite, model, _ = trained
    cache = FeatureCache(tmp_path / "cache" / "features")
    dets = lambda: [create("knn", k=3), create("flow", blocks=2), create("energy")]  # noqa: E731
    first = run_detectors(BenchContext(suite, model, "m", tmp_path / "a", cache, device="cpu"), dets())
    monkeypatch.setattr(Detector, "score", lambda *a, **k: pytest.fail("scored again"))
    monkeypatch.setattr(runner, "confidence_intervals", lambda *a, **k: pytest.fail("resampled again"))
    again = run_detectors(BenchContext(suite, model, "m", tmp_path / "b", FeatureCache(cache.root), device="cpu"), dets())
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("fit_s", "score_s", "fit_cached")} for r in rows]  # noqa: E731
    assert strip(again) == strip(first)
    half = FeatureCache(cache.root, storage=torch.float16)
    with pytest.raises(pytest.fail.Exception, match="scored again"):
        run_detectors(BenchContext(suite, model, "m", tmp_path / "c", half, device="cpu"), [create("energy")])
