"""`oodlab guard build | check | export` end to end on a tiny registered suite."""

import csv
import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from helpers import make_tiny_suite
from oodlab.cli import main
from oodlab.data import suites


@pytest.fixture
def checkpoint(monkeypatch, tmp_path_factory):
    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite())
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--suite", "tiny", "--epochs", "2", "--batch-size", "16", "--no-augment", "--out", str(run),
                 "--device", "cpu"]) == 0
    return run / "last.safetensors"


def test_build_check_export(checkpoint, tmp_path, capsys):
    folder = tmp_path / "guard"
    assert main(["guard", "build", "knn", "--param", "k=5", "--suite", "tiny", "--checkpoint", str(checkpoint),
                 "--alpha", "0.1", "--out", str(folder), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "calibrated on tiny-test (24 images" in printed and "alpha = 0.1" in printed
    info = json.loads((folder / "guard.json").read_text())
    assert info["detector"] == "knn" and info["config"]["k"] == 5 and info["n_calibration"] == 24

    images = tmp_path / "images"
    images.mkdir()
    suite = make_tiny_suite()
    for i in range(6):
        arr = (suite.id_test.dataset[i][0][0].numpy() * 255).astype(np.uint8) if i < 3 else \
            np.full((28, 28), 40 * i, dtype=np.uint8)
        Image.fromarray(arr).save(images / f"{i}.png")
    flags = tmp_path / "flags.csv"
    assert main(["guard", "check", str(folder), str(images), "--out", str(flags), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(flags.open()))
    assert [r["file"].rsplit("/", 1)[1] for r in rows] == [f"{i}.png" for i in range(6)]
    assert all(0 < float(r["p_value"]) <= 1 and r["is_ood"] in ("0", "1") for r in rows)
    assert all(r["is_ood"] == "1" for r in rows[3:])  # flat grey squares are nothing like the ID classes

    assert main(["guard", "export", str(folder), "--format", "onnx"]) == 0
    session = ort.InferenceSession(str(folder / "guard.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([np.asarray(Image.open(images / f"{i}.png"), dtype=np.float32)[None] / 255 for i in range(6)])
    score, want = session.run(None, {"images": x})[1], np.array([float(r["score"]) for r in rows])
    # float32 distances (as faiss computes them): ~1e-7 absolute error in the squared distance
    np.testing.assert_allclose(score, want, rtol=1e-4, atol=1e-4 * np.abs(want).mean())
    assert main(["guard", "export", str(folder), "--format", "torchscript", "--out", str(tmp_path / "g.pt")]) == 0
    assert (tmp_path / "g.pt").stat().st_size > 0


def test_errors_are_one_line(checkpoint, tmp_path, capsys):
    assert main(["guard", "build", "energy", "--suite", "tiny", "--checkpoint", str(checkpoint), "--alpha", "0.01",
                 "--out", str(tmp_path / "g"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oodlab guard: error: 24 calibration scores cannot give alpha=0.01") and err.count("\n") == 1
    assert not (tmp_path / "g").exists()  # nothing written half-way
    assert main(["guard", "build", "odin", "--suite", "tiny", "--checkpoint", str(checkpoint), "--alpha", "0.1",
                 "--out", str(tmp_path / "g"), "--device", "cpu"]) == 0
    assert main(["guard", "export", str(tmp_path / "g")]) == 2
    assert "odin cannot be exported: it must see the input image" in capsys.readouterr().err
    assert main(["guard", "check", str(tmp_path / "missing"), str(tmp_path), "--out", str(tmp_path / "f.csv")]) == 2
    assert "is not a guard folder" in capsys.readouterr().err


def test_detectors_fitted_on_id_val_are_calibrated_on_other_id_data(checkpoint, monkeypatch):
    """KL-Matching fits on the suite's ID validation set, so its guard calibrates on half of ID test instead."""
    import dataclasses

    from oodlab.guard.build import build_guard
    from oodlab.specs import RunSpec

    base = make_tiny_suite()
    val = make_tiny_suite(n_train=30, seed=5).id_train
    monkeypatch.setitem(suites.SUITES, "tiny-val", lambda data_root=None: dataclasses.replace(base, id_val=val))
    spec = RunSpec(checkpoint, data="tiny-val", device="cpu")
    klm, energy = build_guard(spec, "klm", alpha=0.1), build_guard(spec, "energy", alpha=0.1)
    assert klm.calibration_source.startswith("tiny-test (24 images")
    assert energy.calibration_source.startswith("tiny-train (30")  # the validation set itself
