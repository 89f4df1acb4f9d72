"""The command line: each subcommand end to end on a tiny registered suite."""

import csv
import json

import pytest
import torch

from helpers import make_tiny_suite
from oodlab.cli import main
from oodlab.data import suites
from oodlab.detectors import available


@pytest.fixture
def tiny_registered(monkeypatch):
    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite())


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fashionmnist-split" in out and all(name in out for name in available()) and "erm" in out
    for name in ("ash-p", "ash-b", "ash-s"):  # where feature-map ASH shapes, since the official ablation differs
        line = next(row for row in out.splitlines() if row.strip().startswith(name + " "))
        assert "after its final ReLU (pytorch-ood's placement" in line and "official block-level ablation" in line
    for name in ("klm", "temp-scaling", "adascale-a", "adascale-l"):
        line = next(row for row in out.splitlines() if row.strip().startswith(name + " "))
        assert "fits on held-out ID data" in line


def test_train_bench_fit_score(tiny_registered, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--suite", "tiny", "--epochs", "2", "--batch-size", "16", "--no-augment",
                 "--out", str(run), "--device", "cpu"]) == 0
    ckpt = run / "last.safetensors"
    assert ckpt.exists() and json.loads((run / "last.json").read_text())["epoch"] == 2

    out = tmp_path / "bench"
    assert main(["bench", "--suite", "tiny", "--checkpoint", str(ckpt), "--detectors", "msp,energy",
                 "--param", "energy.temperature=2", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "msp" in printed and "energy" in printed and "ID acc" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["command"].startswith("oodlab bench --suite tiny")
    assert res["settings"]["detectors"]["energy"]["temperature"] == 2

    det = tmp_path / "det"
    assert main(["fit", "energy", "--suite", "tiny", "--checkpoint", str(ckpt), "--out", str(det), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["fit", "temp-scaling", "--suite", "tiny", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ts"),
                 "--device", "cpu"]) == 0
    assert "fits on held-out ID data (the suite's ID validation set, else a seeded 10% of ID train): " \
           "tiny-train-held-out (10 images)" in capsys.readouterr().err
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("L", (28, 28), 60 * i).save(imgs / f"{i}.png")
    scores = tmp_path / "scores.csv"
    assert main(["score", str(det) + ".safetensors", str(imgs), "--checkpoint", str(ckpt), "--out", str(scores),
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader(scores.open()))
    assert [r["file"].rsplit("/", 1)[-1] for r in rows] == ["0.png", "1.png", "2.png"]
    assert all(torch.isfinite(torch.tensor(float(r["score"]))) for r in rows)


def test_errors_are_messages_not_tracebacks(tiny_registered, tmp_path, capsys):
    assert main(["bench", "--suite", "nope"]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert main(["bench", "--suite", "tiny", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--param", "novalue"])


def test_train_refuses_options_the_method_does_not_take(tiny_registered, tmp_path, capsys):
    assert main(["train", "--suite", "tiny", "--method", "erm", "--constraint", "0.1", "--out", str(tmp_path)]) == 2
    assert "training method 'erm' takes no option 'constraint'" in capsys.readouterr().err
    assert main(["train", "--suite", "tiny", "--method", "um", "--option", "lambda_s=1", "--out", str(tmp_path)]) == 2
    assert "takes no option 'lambda_s'" in capsys.readouterr().err  # UM hands unknown options to its base, erm
    assert main(["train", "--suite", "tiny", "--method", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown training method 'nope'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_list_is_kept_and_printed_again_without_importing_torch(tmp_path):
    """A second `oodlab list` prints the same text from the cache, in a process that never imports torch."""
    import subprocess
    import sys

    from helpers import subprocess_env

    env = subprocess_env(OODLAB_CACHE=str(tmp_path / "cache"))
    first = subprocess.run([sys.executable, "-m", "oodlab", "list"], env=env, capture_output=True, text=True, check=True)
    probe = "import runpy, sys; sys.argv = ['oodlab', 'list']; "
    probe += "exec(\"try:\\n    runpy.run_module('oodlab', run_name='__main__')\\nexcept SystemExit: pass\"); "
    probe += "print('TORCH' if 'torch' in sys.modules else 'NO TORCH', file=sys.stderr)"
    second = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert second.stdout == first.stdout and "detectors:" in first.stdout
    assert second.stderr.strip() == "NO TORCH"
