"""Your own model and data through every command: a torchvision ResNet-18 and a timm model (random weights)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from oodlab.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    g = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 6), ("val", 4)):
        for c, cls in enumerate(("a", "b")):
            for i in range(n):
                arr = (g.uniform(size=(40, 48, 3)) * 80 + 120 * c).astype(np.uint8)
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / split / cls / f"{i}.jpg")
    (root / "ood").mkdir()
    for i in range(5):
        Image.fromarray((g.uniform(size=(30, 30, 3)) * 255).astype(np.uint8)).save(root / "ood" / f"{i}.png")
    (root / "ood" / "broken.png").write_bytes(b"\x89PNG broken")
    (root / "suite.toml").write_text('[id]\ntrain = "train"\ntest = "test"\nval = "val"\n[ood.far]\nnoise = "ood"\n')
    return root


def _weights(kind, path):
    torch.manual_seed(0)
    if kind == "torchvision":
        import torchvision

        net = torchvision.models.resnet18(num_classes=2)
    else:
        import timm
        net = timm.create_model("resnet18", pretrained=False, num_classes=2)
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_bench_fit_score_guard(kind, data, tmp_path, capsys, caplog):
    model = ["--model", f"{kind}:resnet18", "--weights", str(_weights(kind, tmp_path / "w.pth")), "--device", "cpu"]
    suite = ["--suite", str(data / "suite.toml")]
    out = tmp_path / "bench"
    assert main(["bench", *suite, *model, "--detectors", "energy,knn,vim", "--param", "knn.k=3", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["preprocessing"]["size"] == 224 and res["settings"]["checkpoint"] == f"{kind}:resnet18"
    assert {r["ood"] for r in res["rows"]} == {"noise"} and len(res["rows"]) == 3
    assert "1 of 6 images of noise could not be read" in caplog.text  # skipped and counted (a warning on stderr)

    flags = ["--id-train", str(data / "train"), "--id-test", str(data / "test"), "--ood", f"far:noise={data / 'ood'}"]
    assert main(["fit", "mahalanobis", *flags, *model, "--out", str(tmp_path / "det")]) == 0
    scores = tmp_path / "scores.csv"
    assert main(["score", str(tmp_path / "det.safetensors"), str(data / "ood"), *model, "--out", str(scores)]) == 0
    rows = list(csv.DictReader(scores.open()))
    assert len(rows) == 6 and [r["error"] != "" for r in rows] == [False] * 5 + [True]  # broken.png sorts last
    assert all(np.isfinite(float(r["score"])) for r in rows[:5]) and rows[5]["score"] == ""
    assert main(["score", str(tmp_path / "det.safetensors"), str(data / "ood"), *model, "--out", str(scores),
                 "--strict"]) == 2
    assert "could not be read (first:" in capsys.readouterr().err

    guard = tmp_path / "guard"
    assert main(["guard", "build", "energy", *suite, *model, "--alpha", "0.3", "--out", str(guard)]) == 0
    assert "calibrated on id-val (8 images" in capsys.readouterr().out
    info = json.loads((guard / "guard.json").read_text())
    assert info["preprocessing"]["resize"] > 224 and info["model"]["meta"]["source"] == f"{kind}:resnet18"
    assert main(["guard", "check", str(guard), str(data / "ood"), "--out", str(tmp_path / "f.csv")]) == 0
    checked = list(csv.DictReader((tmp_path / "f.csv").open()))
    assert len(checked) == 6 and checked[5]["error"] and checked[0]["p_value"] and not checked[0]["error"]
    assert main(["guard", "export", str(guard), "--format", "torchscript"]) == 0


def test_own_data_needs_a_model_and_matching_classes(data, tmp_path, capsys):
    assert main(["bench", "--suite", str(data / "suite.toml"), "--detectors", "energy"]) == 2
    assert "your own data needs your model" in capsys.readouterr().err
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "five.pth")
    assert main(["bench", "--suite", str(data / "suite.toml"), "--model", "torchvision:resnet18", "--weights",
                 str(tmp_path / "five.pth"), "--detectors", "energy", "--out", str(tmp_path / "x")]) == 2
    assert "has 5 classes but suite suite has 2" in capsys.readouterr().err


def test_train_on_your_own_data(data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--suite", str(data / "suite.toml"), "--arch", "resnet18-cifar", "--epochs", "1",
                 "--batch-size", "8", "--out", str(run), "--device", "cpu"]) == 0
    meta = json.loads((run / "last.json").read_text())
    assert meta["arch"] == "resnet18-cifar" and meta["num_classes"] == 2 and meta["suite"] == "suite"
    assert main(["bench", "--suite", str(data / "suite.toml"), "--model", str(run / "last.safetensors"),
                 "--detectors", "energy", "--out", str(tmp_path / "b"), "--device", "cpu"]) == 0
    assert main(["train", "--suite", str(data / "suite.toml"), "--epochs", "1", "--out", str(tmp_path / "r2")]) == 2
