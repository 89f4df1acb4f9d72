"""Every error a user can cause reaches them as one line naming the file or value (issue table cases)."""

import json

import pytest
import torch
from PIL import Image

from helpers import make_tiny_suite
from oodlab.cli import main
from oodlab.data import suites
from oodlab.detectors import create
from oodlab.features import Features
from oodlab.models import build, save_checkpoint

META = {"arch": "smallcnn", "num_classes": 3, "in_channels": 1}


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite())
    return save_checkpoint(build("smallcnn", 3, 1), tmp_path / "m", META)


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_truncated_checkpoint(ckpt, capsys):
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    code = main(["bench", "--suite", "tiny", "--checkpoint", str(ckpt), "--detectors", "energy"])
    _one_line_error(capsys, code, "is truncated or not a safetensors file", str(ckpt))


def test_checkpoint_json_missing_keys(ckpt, capsys):
    ckpt.with_suffix(".json").write_text(json.dumps({"arch": "smallcnn"}))
    code = main(["bench", "--suite", "tiny", "--checkpoint", str(ckpt), "--detectors", "energy"])
    _one_line_error(capsys, code, "lacks num_classes, in_channels")


def test_checkpoint_of_another_architecture(ckpt, capsys):
    ckpt.with_suffix(".json").write_text(json.dumps({**META, "arch": "resnet18-cifar", "in_channels": 3}))
    code = main(["bench", "--suite", "tiny", "--checkpoint", str(ckpt), "--detectors", "energy"])
    _one_line_error(capsys, code, "does not match architecture 'resnet18-cifar'")


def test_truncated_detector_and_edited_config(ckpt, tmp_path, capsys):
    model = build("smallcnn", 3, 1)
    z = torch.rand(20, 128)
    path = create("knn", k=2).fit(Features(z, model.head(z).detach()), model.head).save(tmp_path / "det")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("L", (28, 28), 90).save(imgs / "a.png")
    info = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**info, "config": {"k": "five"}}))
    code = main(["score", str(path), str(imgs), "--checkpoint", str(ckpt), "--out", str(tmp_path / "s.csv")])
    _one_line_error(capsys, code, "bad parameters for knn")
    path.with_suffix(".json").write_text(json.dumps(info))
    path.write_bytes(path.read_bytes()[:50])
    code = main(["score", str(path), str(imgs), "--checkpoint", str(ckpt), "--out", str(tmp_path / "s.csv")])
    _one_line_error(capsys, code, "is truncated or not a safetensors file", "fit the detector again")


def test_malicious_train_state_is_refused_in_one_line(ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--suite", "tiny", "--epochs", "1", "--batch-size", "16", "--out", str(run),
                 "--device", "cpu"]) == 0

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"epoch": Evil()}, run / "train_state.pt")
    code = main(["train", "--suite", "tiny", "--epochs", "2", "--batch-size", "16", "--out", str(run), "--device", "cpu"])
    _one_line_error(capsys, code, "train_state.pt is not a training state oodlab wrote")
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--weight-decay", "nan")])
def test_non_finite_or_negative_numbers_are_refused(ckpt, tmp_path, capsys, flag, value):
    code = main(["train", "--suite", "tiny", flag, value, "--out", str(tmp_path / "r"), "--device", "cpu"])
    _one_line_error(capsys, code, "must be a finite number")
    assert not (tmp_path / "r" / "epoch-001.safetensors").exists()


def test_debug_shows_the_traceback(ckpt):
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        main(["--debug", "bench", "--suite", "tiny", "--checkpoint", str(ckpt), "--detectors", "energy"])
