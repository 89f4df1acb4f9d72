"""`oodlab extract` fills the feature cache with every data set a sweep reads, each once; a bench after it
extracts nothing."""

import pytest
import torch

from helpers import make_tiny_suite
from oodlab.cli import main


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    from oodlab.data import suites
    from oodlab.models import build, save_checkpoint

    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite(n_train=90, n_test=45))
    monkeypatch.setenv("OODLAB_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    meta = {"arch": "smallcnn", "num_classes": 3, "in_channels": 1, "suite": "tiny"}
    return save_checkpoint(build("smallcnn", 3, 1).eval(), tmp_path / "model", meta)


def test_extract_then_a_sweep_of_every_detector_extracts_nothing(tiny, tmp_path, capsys, monkeypatch):
    from oodlab.features import extraction

    calls = []
    real = extraction.extract
    monkeypatch.setattr(extraction, "extract", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    args = ["--suite", "tiny", "--model", str(tiny), "--device", "cpu", "--batch-size", "16"]
    assert main(["extract", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    # ID train, ID test, the held-out ID set and both OOD sets: each once
    assert sorted(set(calls)) == sorted(calls) == sorted(["tiny-train", "tiny-test", "tiny-train-held-out", "noise",
                                                          "stripes"])
    assert [line.split()[0] for line in out[:-1]] == ["tiny-train", "tiny-test", "tiny-train-held-out", "noise",
                                                      "stripes"]
    assert all("images/s" in line for line in out[:-1]) and out[-1].startswith("214 images in")  # 90 + 45 + 9 held out + 40 + 30
    assert main(["extract", *args]) == 0  # a second time: everything cached
    assert all("(cached)" in line for line in capsys.readouterr().out.splitlines()[:-1])
    calls.clear()
    assert main(["bench", *args, "--detectors", "energy,knn,mahalanobis,vim,react,temp-scaling,flow", "--param",
                 "knn.k=3", "--param", "flow.batch_size=16", "--out", str(tmp_path / "run")]) == 0
    assert calls == []  # every feature the sweep read came from the cache
