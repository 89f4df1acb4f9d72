"""The shared training loop: it learns, checkpoints every epoch, resumes, and is seeded."""

import json

import pytest
import torch
from safetensors.torch import load_file

from oodlab.training import TrainConfig, train
from oodlab.training.erm import CrossEntropy
from oodlab.training.loop import augment, evaluate_accuracy
from oodlab.models import build

META = {"arch": "smallcnn", "num_classes": 3, "in_channels": 1}


def _run(suite, out, epochs, seed=0):
    torch.manual_seed(seed)
    model = build("smallcnn", 3, 1)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.05, seed=seed, augment=False)
    ckpt = train(model, suite.id_train, CrossEntropy(), cfg, out, META, test_set=suite.id_test, device="cpu")
    return model, ckpt


def test_learns_and_writes_checkpoints(tiny_suite, tmp_path):
    model, ckpt = _run(tiny_suite, tmp_path, epochs=3)
    assert evaluate_accuracy(model, tiny_suite.id_test, device=torch.device("cpu")) >= 0.9
    assert {p.name for p in tmp_path.glob("epoch-*.safetensors")} == {f"epoch-00{i}.safetensors" for i in (1, 2, 3)}
    hist = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3] and hist[-1]["test_acc"] >= 0.9
    assert hist[-1]["loss"] < hist[0]["loss"]
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert meta["epoch"] == 3 and meta["arch"] == "smallcnn"


def test_resume_equals_uninterrupted(tiny_suite, tmp_path):
    _, full = _run(tiny_suite, tmp_path / "full", epochs=3)

    def crash(model, epoch):
        if epoch == 3:
            raise KeyboardInterrupt  # killed during epoch 3, after epoch 2 was saved
        return {}

    torch.manual_seed(0)
    model = build("smallcnn", 3, 1)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=0, augment=False)
    with pytest.raises(KeyboardInterrupt):
        train(model, tiny_suite.id_train, CrossEntropy(), cfg, tmp_path / "cut", META, hooks=[crash], device="cpu")
    assert not (tmp_path / "cut" / "epoch-003.safetensors").exists()
    _, resumed = _run(tiny_suite, tmp_path / "cut", epochs=3)
    a, b = load_file(str(full)), load_file(str(resumed))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert len((tmp_path / "cut" / "history.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_other_settings(tiny_suite, tmp_path):
    _run(tiny_suite, tmp_path, epochs=1)
    with pytest.raises(ValueError, match="other settings"):
        _run(tiny_suite, tmp_path, epochs=1, seed=5)


def test_resume_under_other_thread_count_warns(tiny_suite, tmp_path):
    def crash(model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return {}

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=0, augment=False)
        with pytest.raises(KeyboardInterrupt):
            train(build("smallcnn", 3, 1), tiny_suite.id_train, CrossEntropy(), cfg, tmp_path, META,
                  hooks=[crash], device="cpu")
        assert json.loads((tmp_path / "last.json").read_text())["compute"] == "cpu, 1 thread"
        torch.set_num_threads(2)
        with pytest.warns(UserWarning, match="trained on cpu, 1 thread and resumes on cpu, 2 threads"):
            _run(tiny_suite, tmp_path, epochs=2)
        assert json.loads((tmp_path / "last.json").read_text())["compute"] == "cpu, 2 threads"
    finally:
        torch.set_num_threads(threads)


def test_seeded(tiny_suite, tmp_path):
    _, a = _run(tiny_suite, tmp_path / "a", epochs=1)
    _, b = _run(tiny_suite, tmp_path / "b", epochs=1)
    wa, wb = load_file(str(a)), load_file(str(b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_augment_keeps_content():
    x = torch.zeros(8, 1, 10, 10)
    x[:, :, 4:6, 4:6] = 1.0
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # shifts by <=2 keep the blob


def test_bad_config():
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError):
        TrainConfig(schedule="linear")
