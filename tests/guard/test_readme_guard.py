"""The README's "Guard a deployed model" commands, run as written on the shipped default model."""

import csv
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from oodlab.cli import main
from oodlab.data import load_suite

README = Path(__file__).resolve().parents[2] / "README.md"


def _guard_commands() -> list[list[str]]:
    section = README.read_text().split("## Guard a deployed model", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].split() for line in block.splitlines() if line.strip()]


def test_readme_guard_commands_run(tmp_path, monkeypatch):
    suite = load_suite("fashionmnist")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):  # two Fashion-MNIST test images, two glyphs (OOD)
        src = suite.id_test if i < 2 else suite.ood["glyphs"]
        Image.fromarray((src.dataset[i][0][0].numpy() * 255).astype(np.uint8)).save(images / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    commands = _guard_commands()
    assert [c[:3] for c in commands] == [["oodlab", "guard", "build"], ["oodlab", "guard", "check"],
                                         ["oodlab", "guard", "export"]]
    for cmd in commands:
        args = [str(images) if a == "path/to/images" else a for a in cmd[1:]]
        assert main(args) == 0, cmd
    rows = list(csv.DictReader(open(tmp_path / "flags.csv")))
    assert len(rows) == 4 and all(0 < float(r["p_value"]) <= 1 for r in rows)
    session = ort.InferenceSession(str(tmp_path / "my-guard" / "guard.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([np.asarray(Image.open(images / f"{i}.png"), dtype=np.float32)[None] / 255 for i in range(4)])
    logits, score, p, flag = session.run(None, {"images": x})
    np.testing.assert_allclose(score, [float(r["score"]) for r in rows], rtol=1e-4)
    assert flag.astype(int).tolist() == [int(r["is_ood"]) for r in rows]
    assert logits.argmax(1).tolist() == [int(r["class"]) for r in rows]
