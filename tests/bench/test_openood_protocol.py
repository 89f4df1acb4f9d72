"""OpenOOD's protocol: its metrics, openood.csv in the Evaluator layout, the search on validation OOD only,
full-spectrum runs apart, the leaderboard beside a run, and the whole chain on a stand-in OpenOOD tree."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from helpers import make_tiny_suite
from openood_tree import make_openood_tree, resnet18_32x32_state
from oodlab.bench import BenchContext, run_bench
from oodlab.bench import openood as proto
from oodlab.bench.search import search_parameters
from oodlab.cli import main
from oodlab.data import suites
from oodlab.detectors import create
from oodlab.features import FeatureCache
from oodlab.metrics import auroc, fpr_at_tpr_ood_positive
from oodlab.models import build
from oodlab.specs import RunSpec, resolve
from oodlab.training import TrainConfig, train
from oodlab.training.erm import CrossEntropy


def test_openood_metrics_follow_its_definitions():
    rng = np.random.default_rng(0)
    sid, sood = rng.normal(1, 1, 300).round(1), rng.normal(0, 1, 200).round(1)  # rounded: ties
    m = proto.openood_metrics(sid, sood)
    assert m["auroc"] == pytest.approx(roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[sid, sood]))
    assert m["fpr95"] == pytest.approx(fpr_at_tpr_ood_positive(sid, sood))  # OOD positive
    # the AUPRs are trapezoids under the PR curve, written out here: thresholds at each distinct score
    conf, is_id = np.r_[sid, sood], np.r_[np.ones(300), np.zeros(200)]
    thr = np.unique(conf)[::-1]
    prec = np.array([is_id[conf >= t].mean() for t in thr])
    rec = np.array([is_id[conf >= t].sum() / 300 for t in thr])
    want = np.trapezoid(np.r_[1.0, prec], np.r_[0.0, rec])
    assert m["aupr_in"] == pytest.approx(want, abs=1e-12)
    assert proto.openood_metrics([2.0, 3.0], [0.0, 1.0]) == {"fpr95": 0.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0}


def test_grid_points_vary_the_first_key_fastest():
    pts = proto.grid_points({"temperature": [1, 10], "eps": [0.1, 0.2]})
    assert pts == [{"temperature": 1, "eps": 0.1}, {"temperature": 10, "eps": 0.1},
                   {"temperature": 1, "eps": 0.2}, {"temperature": 10, "eps": 0.2}]
    ada = proto.grid_points(proto.GRIDS["adascale-a"][1])
    assert len(ada) == 36 and ada[0] == {"p_min": 60.0, "p_max": 65.0} and ada[-1] == {"p_min": 95.0, "p_max": 99.0}


def test_openood_csv_has_the_evaluator_layout(tmp_path):
    rng = np.random.default_rng(1)
    scores = {"msp": {"id": rng.normal(1, 1, 50), "a": rng.normal(0, 1, 40), "b": rng.normal(0.5, 1, 30),
                      "c": rng.normal(-1, 1, 20)}}
    proto.write_openood_csv(tmp_path / "openood.csv", scores, {"near": ["a", "b"], "far": ["c"]}, 0.9)
    rows = list(csv.reader(open(tmp_path / "openood.csv")))
    assert rows[0] == ["detector", "dataset", "FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"]
    assert [r[1] for r in rows[1:]] == ["a", "b", "nearood", "c", "farood"]
    a, b, near = (proto.openood_metrics(scores["msp"]["id"], scores["msp"][n]) for n in ("a", "b", "a"))
    assert float(rows[1][3]) == pytest.approx(100 * a["auroc"], abs=1e-4)
    assert float(rows[3][3]) == pytest.approx(50 * (a["auroc"] + b["auroc"]), abs=1e-4)  # unweighted mean
    assert float(rows[3][2]) == pytest.approx(50 * (a["fpr95"] + b["fpr95"]), abs=1e-4)
    assert {r[6] for r in rows[1:]} == {"90.0000"}  # the classifier's accuracy in every row


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A smallcnn trained 2 epochs on the tiny suite (its checkpoint)."""
    torch.manual_seed(0)
    return train(build("smallcnn", 3, 1), make_tiny_suite().id_train, CrossEntropy(),
                 TrainConfig(epochs=2, batch_size=16, augment=False), tmp_path_factory.mktemp("m"),
                 {"arch": "smallcnn", "num_classes": 3, "in_channels": 1}, device="cpu")


def test_search_picks_on_validation_ood_only(tiny_model, tmp_path, monkeypatch):
    """Validation OOD = noise, test OOD = stripes: the grid point that is best on stripes is not the one chosen."""
    base = make_tiny_suite()
    suite = dataclasses.replace(base, ood={"stripes": base.ood["stripes"]}, groups={"near": ["stripes"], "far": []},
                                ood_val=base.ood["noise"])
    grid = [65.0, 75.0, 85.0, 95.0]
    monkeypatch.setitem(proto.GRIDS, "ash-b", ("test grid", {"percentile": grid}))
    loaded, suite = resolve(RunSpec(tiny_model, data=suite))
    cache = FeatureCache(tmp_path / "cache")
    ctx = BenchContext(suite, loaded.model, loaded.model_id, tmp_path / "out", cache, device="cpu")
    import oodlab.features.extraction as extraction

    seen = []
    real = extraction.extract
    monkeypatch.setattr(extraction, "extract", lambda m, d, *a, **k: seen.append(d.name) or real(m, d, *a, **k))
    (chosen,), notes = search_parameters(ctx, [create("ash-b")])
    assert sorted(seen) == sorted({suite.held_out().name, "noise"})  # each validation set once for the whole grid
    feats = {n: cache.get(loaded.model, loaded.model_id, d, lazy=True)
             for n, d in (("id", suite.held_out()), ("val", suite.ood_val), ("test", suite.ood["stripes"]),
                          ("id_test", suite.id_test))}

    def aurocs(id_key, ood_key):
        dets = [create("ash-b", percentile=p).fit(None, loaded.model.head) for p in grid]
        return [auroc(d.score(feats[id_key]).numpy(), d.score(feats[ood_key]).numpy()) for d in dets]

    val, test = aurocs("id", "val"), aurocs("id_test", "test")
    assert int(np.argmax(val)) != int(np.argmax(test))  # the case where tuning on test OOD would pick otherwise
    assert chosen.percentile == grid[int(np.argmax(val))]
    note = notes["ash-b"]
    assert note["ood_val"] == "noise" and note["val_auroc"] == pytest.approx(max(val))
    assert [p["percentile"] for p in note["points"]] == grid


def test_search_records_choices_in_rows_and_refuses_suites_without_validation_ood(tiny_model, tmp_path):
    base = make_tiny_suite()
    suite = dataclasses.replace(base, ood_val=base.ood["noise"])
    rows = run_bench(RunSpec(tiny_model, data=suite, device="cpu"), detectors="react,msp,vim", out_dir=tmp_path / "s",
                     search=True, verbose=False)
    by = {r["detector"]: r for r in rows}
    assert by["react"]["search"]["grid"] == "OpenOOD configs/postprocessors/react.yml"
    assert by["react"]["params"]["percentile"] in (85, 90, 95, 99)
    assert by["msp"]["search"]["grid"] is None  # MSP has no OpenOOD grid: its defaults, said so
    assert [s["dim"] for s in by["vim"]["search"]["skipped"]] == [256, 1000]  # wider than the 128-d features
    assert by["vim"]["search"]["note"] == "every grid point was refused: defaults kept" and by["vim"]["params"]["dim"] is None
    with pytest.raises(ValueError, match="--search needs a validation OOD set"):
        run_bench(RunSpec(tiny_model, data=base, device="cpu"), detectors="msp", out_dir=tmp_path / "x", search=True)


def test_openood_tree_end_to_end_with_an_openood_checkpoint(tmp_path, capsys):
    """cifar10 from its lists with openood:resnet18_32x32 (random weights): openood.csv, --search, --fsood, and
    the leaderboard's numbers beside the run's."""
    make_openood_tree(tmp_path / "data", "cifar10", per_set=6)
    torch.save(resnet18_32x32_state(10), tmp_path / "best.ckpt")
    out = tmp_path / "run"
    assert main(["bench", "--suite", "cifar10", "--data-root", str(tmp_path / "data"), "--model",
                 "openood:resnet18_32x32", "--weights", str(tmp_path / "best.ckpt"), "--detectors", "msp,energy,react",
                 "--search", "--fsood", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "OpenOOD v1.5 leaderboard (cifar10, ResNet18" in printed.out
    assert "msp" in printed.out and "OpenOOD MSP: 88.03 / 90.73" in printed.out
    rows = list(csv.DictReader(open(out / "openood.csv")))
    assert [r["dataset"] for r in rows if r["detector"] == "msp"] == \
        ["cifar100", "tin", "nearood", "mnist", "svhn", "texture", "places365", "farood"]
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["search"] is True and settings["suite"] == "cifar10"
    fs = json.loads((out / "fsood" / "results.json").read_text())["settings"]
    assert fs["suite"] == "cifar10-fsood" and (out / "fsood" / "openood.csv").is_file()
    make_openood_tree(tmp_path / "data", "cifar100", per_set=6)
    torch.save(resnet18_32x32_state(100), tmp_path / "c100.ckpt")
    assert main(["bench", "--suite", "cifar100", "--data-root", str(tmp_path / "data"), "--model",
                 "openood:resnet18_32x32", "--weights", str(tmp_path / "c100.ckpt"), "--fsood", "--out",
                 str(tmp_path / "no")]) == 2
    assert "cifar100 has no covariate-shifted ID sets" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_fashionmnist_split_has_a_validation_ood_set_disjoint_from_test():
    s = suites.load_suite("fashionmnist-split")
    val, near = s.ood_val.dataset.images, s.ood["fashionmnist-6to9"].dataset.images
    assert len(val) == 1000 and val.shape[1:] == near.shape[1:]
    flat = {bytes(x.numpy().tobytes()) for x in near}
    assert not any(bytes(x.numpy().tobytes()) in flat for x in val)


def test_python_entry_point_gives_the_openood_table(tmp_path):
    """oodlab.openood_table(net, "cifar10") on a plain nn.Module equals the CLI run with openood:resnet18_32x32 on
    the same weights (the module takes normalised inputs, as OpenOOD's Evaluator feeds them)."""
    import oodlab
    from oodlab.models.openood_nets import ResNet18Cifar

    make_openood_tree(tmp_path / "data", "cifar10", per_set=6)
    state = resnet18_32x32_state(10, seed=3)
    net = ResNet18Cifar(10)
    net.load_state_dict(state)
    table = oodlab.openood_table(net, "cifar10", "msp,energy", data_root=tmp_path / "data", out_dir=tmp_path / "py",
                                 device="cpu")
    torch.save(state, tmp_path / "best.ckpt")
    assert main(["bench", "--suite", "cifar10", "--data-root", str(tmp_path / "data"), "--model",
                 "openood:resnet18_32x32", "--weights", str(tmp_path / "best.ckpt"), "--detectors", "msp,energy",
                 "--out", str(tmp_path / "cli"), "--device", "cpu"]) == 0
    cli = list(csv.DictReader(open(tmp_path / "cli" / "openood.csv")))
    rows = table.reset_index().to_dict("records") if hasattr(table, "reset_index") else table
    assert len(rows) == len(cli) == 16
    for got, want in zip(rows, cli):
        assert (got["detector"], got["dataset"]) == (want["detector"], want["dataset"])
        assert got["AUROC"] == pytest.approx(float(want["AUROC"]), abs=1e-3)
        assert got["ACC"] == pytest.approx(float(want["ACC"]), abs=1e-3)
    with pytest.raises(ValueError, match="unknown OpenOOD benchmark"):
        oodlab.openood_table(net, "svhn")
