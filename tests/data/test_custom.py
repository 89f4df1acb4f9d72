"""Suites from the user's data: TOML files, flags, image lists and the ImageNet-1K (OpenOOD v1.5) layout."""

import pytest
import torch
from PIL import Image

from oodlab.data import IMAGENET, DataMissingError, Preprocessing, custom, load_suite
from oodlab.data.base import BROKEN, batches
from oodlab.data.custom import load_suite_file, suite_from_flags
from oodlab.data.sources import folder

PREP = Preprocessing(16, 3, 20)


def _img(path, value, size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 40)).save(path)


@pytest.fixture
def tree(tmp_path):
    for split, n in (("train", 3), ("test", 2), ("val", 2)):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(n):
                _img(tmp_path / split / cls / f"{i}.png", 60 * c + i)
    for i in range(3):
        _img(tmp_path / "ood" / "a" / f"{i}.jpg", 200)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "far.txt").write_text("ood/a/0.jpg -1\nood/a/1.jpg -1\n")
    (tmp_path / "lists" / "test.txt").write_text("test/dog/0.png 1\ntest/cat/1.png 0\n")
    return tmp_path


def test_toml_suite(tree):
    (tree / "suite.toml").write_text('num_classes = 2\n[id]\ntrain = "train"\ntest = "lists/test.txt"\nval = "val"\n'
                                     '[ood.near]\nfolder_ood = "ood"\n[ood.far]\nlisted = "lists/far.txt"\n')
    s = load_suite_file(tree / "suite.toml", PREP)
    assert s.name == "suite" and s.num_classes == 2 and s.input_shape == (3, 16, 16)
    assert s.groups == {"near": ["folder_ood"], "far": ["listed"]} and len(s.ood["listed"]) == 2
    assert [int(s.id_train.dataset[i][1]) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert [int(s.id_test.dataset[i][1]) for i in range(2)] == [1, 0]
    x, y = s.ood["folder_ood"].dataset[0]
    assert x.shape == (3, 16, 16) and int(y) == -1
    assert s.calibration_split() == (s.id_val, s.id_test)
    other = load_suite_file(tree / "suite.toml", Preprocessing(8, 1))
    assert other.id_train.fingerprint != s.id_train.fingerprint  # preprocessing is part of the identity


def test_flags_suite_maps_test_classes_by_name(tree):
    (tree / "test" / "dog" / "0.png").rename(tree / "test" / "dog" / "z.png")
    s = suite_from_flags(str(tree / "train"), str(tree / "test"), [f"far:x={tree / 'ood'}"], PREP)
    assert s.num_classes == 2 and sorted(int(s.id_test.dataset[i][1]) for i in range(4)) == [0, 0, 1, 1]
    _img(tree / "test" / "bird" / "0.png", 9)
    with pytest.raises(ValueError, match="class folders the training set lacks: bird"):
        suite_from_flags(str(tree / "train"), str(tree / "test"), [f"far:x={tree / 'ood'}"], PREP)
    with pytest.raises(ValueError, match="near:NAME=PATH"):
        suite_from_flags(str(tree / "train"), str(tree / "val"), ["x=1"], PREP)


@pytest.mark.parametrize("text,message", [
    ('[id]\ntrain = "train"\ntest = "val"\n[ood.far]\nx = "ood"\nextra = 1\n[other]\n', "unknown key 'other'"),
    ('[id]\ntrain = "train"\n[ood.far]\nx = "ood"\n', "needs an \\[id\\] table with 'train' and 'test'"),
    ('[id]\ntrain = "train"\ntest = "val"\n', "at least one OOD set"),
    ('[id]\ntrain = "train"\ntest = "val"\n[ood.far]\nx = { folder = "ood", size = 3 }\n', "unknown key 'size'"),
    ('[id]\ntrain = "train"\ntest = "val"\n[ood.far]\nx = "nowhere"\n', "does not exist"),
    ('[id\n', "not valid TOML"),
])
def test_suite_file_errors_name_the_file(tree, text, message):
    (tree / "bad.toml").write_text(text)
    with pytest.raises((ValueError, DataMissingError), match=message):
        load_suite_file(tree / "bad.toml", PREP)


def test_image_list_checks(tree):
    lst = tree / "l.txt"
    lst.write_text("test/cat/0.png 0\ntest/cat/9.png 0\n")
    with pytest.raises(DataMissingError, match="1 files listed in .* are missing, e.g. .*9.png"):
        folder.load_list(lst, tree, prep=PREP)
    lst.write_text("test/cat/0.png 7\n")
    with pytest.raises(ValueError, match=r"label \d+ is outside \[0, 2\)"):
        folder.load_list(lst, tree, prep=PREP, num_classes=2)
    lst.write_text("test/cat/0.png 0\n")
    with pytest.raises(ValueError, match="lists 1 images; this benchmark expects 5"):
        folder.load_list(lst, tree, prep=PREP, expected=5)
    lst.write_text("test/cat/0.png\n")
    with pytest.raises(ValueError, match="l.txt:1: expected"):
        folder.load_list(lst, tree, prep=PREP)


def test_corrupt_image_is_a_marked_item_not_a_crash(tree):
    (tree / "ood" / "a" / "1.jpg").write_bytes(b"not a jpeg")
    data = folder.load(tree / "ood", prep=PREP)
    labels = torch.cat([y for _, y in batches(data, 2, workers=2)])
    assert labels.tolist() == [-1, BROKEN, -1]
    assert "UnidentifiedImageError" in data.dataset.error(1) or "cannot identify" in data.dataset.error(1)


def test_readers_agree_and_fall_back(tree):
    """torchvision.io (default) and PIL give nearly the same tensors; formats torchvision cannot decode go to PIL."""
    tv = Preprocessing(16, 3, 20)
    pil = Preprocessing(16, 3, 20, reader="pil")
    assert tv.reader == "torchvision" and tv.fingerprint("x") != pil.fingerprint("x")
    path = tree / "train" / "cat" / "0.png"
    a, b = tv.load(path), pil.load(path)
    assert a.shape == b.shape == (3, 16, 16) and (a - b).abs().max() <= 3 / 255
    Image.open(path).save(tree / "x.bmp")
    assert torch.allclose(tv.load(tree / "x.bmp"), b)  # BMP: decoded by PIL
    assert IMAGENET.reader == "pil"  # OpenOOD's ImageNet pipeline, as it reads images
