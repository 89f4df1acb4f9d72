"""Every command takes one run spec and resolves it through oodlab.specs, and the CLI builds that spec once."""

import json

import pytest
from PIL import Image

import oodlab.bench.api as bench_api
import oodlab.guard.build as guard_build
import oodlab.scoring as scoring
import oodlab.specs as specs
from helpers import make_tiny_suite
from oodlab.bench import run_bench
from oodlab.cli import main
from oodlab.data import suites
from oodlab.guard.build import build_guard
from oodlab.models import save_checkpoint
from oodlab.models.zoo import small_cnn
from oodlab.scoring import fit_and_save, score_folder
from oodlab.specs import RunSpec
from oodlab.training.recipes import train_on_suite


@pytest.fixture
def counted(monkeypatch):
    """The tiny suite registered, and a log of every resolver call with the spec it got."""
    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite())
    calls = []
    for name in ("resolve", "resolve_model", "resolve_training"):
        real = getattr(specs, name)
        counting = lambda spec, *a, _real=real, _name=name, **k: calls.append((_name, spec)) or _real(spec, *a, **k)  # noqa: E731
        for module in (specs, bench_api, guard_build, scoring):  # wherever a command imported it from
            if getattr(module, name, None) is real:
                monkeypatch.setattr(module, name, counting)
    return calls


def test_every_command_resolves_the_same_spec(counted, tmp_path):
    ckpt = save_checkpoint(small_cnn(3), tmp_path / "m", {"arch": "smallcnn", "num_classes": 3, "in_channels": 1})
    spec = RunSpec(ckpt, data="tiny", device="cpu", fit_subset=40, seed=3)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("L", (28, 28), 60 * i).save(imgs / f"{i}.png")

    rows = run_bench(spec, detectors="energy", out_dir=tmp_path / "bench", verbose=False)
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["settings"]["fit_subset"] == 40
    det = fit_and_save(spec, "knn", tmp_path / "knn", params={"k": 2}, verbose=False)
    assert score_folder(spec, det, imgs, tmp_path / "s.csv") == 3
    guard = build_guard(spec, "energy", alpha=0.2)
    tuned = train_on_suite(RunSpec(ckpt, data="tiny", device="cpu", seed=3), tmp_path / "ft",
                           config={"epochs": 1, "batch_size": 16}, verbose=False)
    assert rows and guard.k >= 1 and tuned.is_file()
    # bench, fit, score, guard build, train (resolve loads the model through resolve_model)
    assert [name for name, _ in counted] == ["resolve", "resolve_model"] * 2 + ["resolve_model"] + \
        ["resolve", "resolve_model", "resolve_training"]
    assert all(s == spec for _, s in counted[:-1])
    assert json.loads(tuned.with_suffix(".json").read_text())["train_config"]["seed"] == 3  # the spec's seed seeds training


def test_cli_builds_one_spec_per_command(counted, tmp_path):
    ckpt = save_checkpoint(small_cnn(3), tmp_path / "m", {"arch": "smallcnn", "num_classes": 3, "in_channels": 1})
    common = ["--suite", "tiny", "--checkpoint", str(ckpt), "--device", "cpu", "--fit-subset", "40"]
    assert main(["bench", *common, "--detectors", "msp", "--out", str(tmp_path / "b")]) == 0
    assert main(["fit", "msp", *common, "--out", str(tmp_path / "msp")]) == 0
    assert main(["guard", "build", "msp", *common, "--out", str(tmp_path / "g")]) == 0
    want = RunSpec(str(ckpt), data="tiny", device="cpu", fit_subset=40)
    assert counted == [("resolve", want), ("resolve_model", want)] * 3


@pytest.mark.parametrize("kwargs, message", [
    ({"fit_subset": 0}, "--fit-subset"),
    ({"retrain": True, "model": "m.safetensors"}, "--retrain"),
    ({"weights": "w.pth"}, "--weights goes with --model"),
    ({"seed": -1}, "seed"),
])
def test_bad_specs_are_refused_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunSpec(**kwargs)


def test_train_refuses_fit_subset_zero(counted, capsys):
    assert main(["train", "--suite", "tiny", "--fit-subset", "0"]) == 2
    assert "--fit-subset" in capsys.readouterr().err and counted == []
