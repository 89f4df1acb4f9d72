"""Reliability of the surfaces added for OpenOOD parity: names that are paths, reserved names, cheap checks first,
weights given by a relative path, and an OpenOOD list with bad entries."""

import os

import pytest
import torch

from openood_tree import make_openood_tree, resnet18_32x32_state
from oodlab.cli import main


def _suite_file(tmp_path, ood_name):
    from PIL import Image

    for sub in ("train/a", "train/b", "test/a", "test/b", "ood"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("L", (28, 28), 40 * i + 10).save(tmp_path / sub / f"{i}.png")
    path = tmp_path / "suite.toml"
    path.write_text(f'[id]\ntrain = "train"\ntest = "test"\n[ood.far]\n"{ood_name}" = "ood"\n')
    return path


@pytest.mark.parametrize("name, message", [("../../escaped", "cannot be a data set name"),
                                           ("id", "may not be named 'id'"), (".cache", "cannot be a data set name")])
def test_set_names_that_are_paths_or_reserved_are_refused_before_any_file(name, message, tmp_path, capsys):
    import torchvision

    suite = _suite_file(tmp_path / "data", name)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=2).state_dict(), tmp_path / "w.pth")
    cache = tmp_path / "cache"
    os.environ["OODLAB_CACHE"] = str(cache)
    try:
        assert main(["bench", "--suite", str(suite), "--model", "torchvision:resnet18", "--weights",
                     str(tmp_path / "w.pth"), "--out", str(tmp_path / "out")]) == 2
    finally:
        os.environ.pop("OODLAB_CACHE")
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists() and not cache.exists()


def test_guard_build_checks_alpha_before_any_work(tmp_path, capsys, monkeypatch):
    import oodlab.guard.build as build

    monkeypatch.setattr(build, "resolve", lambda *a, **k: pytest.fail("resolved the model before checking alpha"))
    assert main(["guard", "build", "energy", "--alpha", "1.5", "--out", str(tmp_path / "g")]) == 2
    assert "alpha" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_guard_with_relative_weights_works_from_another_directory(tmp_path, monkeypatch, capsys):
    make_openood_tree(tmp_path / "data", "cifar10", per_set=6)
    torch.save(resnet18_32x32_state(10), tmp_path / "best.ckpt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OODLAB_CACHE", str(tmp_path / "cache"))
    assert main(["guard", "build", "energy", "--suite", "cifar10", "--data-root", "data", "--model",
                 "openood:resnet18_32x32", "--weights", "best.ckpt", "--alpha", "0.5", "--out", "g",
                 "--device", "cpu"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    images = tmp_path / "data" / "images_classic" / "test_svhn"
    assert main(["guard", "check", str(tmp_path / "g"), str(images), "--out", "flags.csv", "--device", "cpu"]) == 0
    assert (elsewhere / "flags.csv").read_text().count("\n") == 7  # header + 6 images


@pytest.fixture(scope="module")
def built_guard(tmp_path_factory):
    """An energy guard of the shipped default model (fashionmnist), saved once."""
    out = tmp_path_factory.mktemp("g") / "guard"
    assert main(["guard", "build", "energy", "--alpha", "0.1", "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_guard_json_is_covered_by_the_checksums(built_guard, tmp_path, capsys):
    import json
    import shutil

    g = tmp_path / "g"
    shutil.copytree(built_guard, g)
    info = json.loads((g / "guard.json").read_text())
    info["k"] = 0  # the edit that made `guard check` flag every image
    (g / "guard.json").write_text(json.dumps(info))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image

    Image.new("L", (28, 28), 30).save(imgs / "a.png")
    assert main(["guard", "check", str(g), str(imgs), "--out", str(tmp_path / "f.csv")]) == 2
    err = capsys.readouterr().err
    assert "guard.json was edited (checksum mismatch)" in err and err.count("\n") == 1
    assert not (tmp_path / "f.csv").exists()
    del info["sha256"]  # an edited guard that drops its own checksum still cannot pass a k outside its ranks
    info["k"] = 10**9
    (g / "guard.json").write_text(json.dumps(info))
    assert main(["guard", "check", str(g), str(imgs), "--out", str(tmp_path / "f.csv")]) == 2
    assert "is not a rank among its" in capsys.readouterr().err


def test_guard_out_never_removes_a_users_files(built_guard, tmp_path, capsys):
    import shutil

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert main(["guard", "build", "energy", "--out", str(user), "--device", "cpu"]) == 2
    assert "not a guard folder" in capsys.readouterr().err and (user / "notes.txt").read_text() == "keep me"
    afile = tmp_path / "a-file"
    afile.write_text("data")
    assert main(["guard", "build", "energy", "--out", str(afile), "--device", "cpu"]) == 2
    assert afile.read_text() == "data" and not list(tmp_path.glob(".a-file*"))
    again = tmp_path / "again"
    shutil.copytree(built_guard, again)  # an existing guard folder is replaced
    assert main(["guard", "build", "energy", "--alpha", "0.2", "--out", str(again), "--device", "cpu"]) == 0
    assert '"alpha": 0.2' in (again / "guard.json").read_text()
    assert main(["guard", "build", "energy", "--out", str(user), "--overwrite", "--device", "cpu"]) == 0
    assert (user / "guard.json").is_file() and not (user / "notes.txt").exists()


def test_bench_out_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    import oodlab.bench.api as api

    monkeypatch.setattr(api, "resolve", lambda *a, **k: pytest.fail("worked before checking --out"))
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["bench", "--detectors", "energy", "--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "mine"
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("my own notes")
    assert main(["bench", "--detectors", "energy", "--out", str(user)]) == 2
    err = capsys.readouterr().err
    assert "holds other files (notes.txt)" in err and err.count("\n") == 1
    assert (user / "notes.txt").read_text() == "my own notes"


def test_unexpected_errors_are_one_line_with_the_way_to_the_traceback(tmp_path, capsys, monkeypatch):
    import errno

    import oodlab.bench.api as api

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(api, "resolve", full_disk)
    assert main(["bench", "--detectors", "energy", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == "oodlab bench: error: [Errno 28] No space left on device\n"
    monkeypatch.setattr(api, "resolve", lambda *a, **k: [][1])  # a bug, not the user's doing
    assert main(["bench", "--detectors", "energy", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oodlab bench: error: IndexError: list index out of range") and "--debug" in err
    assert err.count("\n") == 1


def _list_tree(tmp_path, lines: bytes):
    from PIL import Image

    for i in range(3):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.new("L", (8, 8), 50 * i).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "list.txt").write_bytes(lines)
    return tmp_path / "list.txt"


def test_image_lists_stay_under_their_root_and_say_what_is_wrong(tmp_path, caplog):
    from oodlab.data.preprocessing import Preprocessing
    from oodlab.data.sources import folder

    prep = Preprocessing(8, 1)
    outside = _list_tree(tmp_path, b"imgs/0.png 0\n/etc/passwd 1\n")
    with pytest.raises(ValueError, match=r"list.txt:2: '/etc/passwd' leaves the list's root"):
        folder.load_list(outside, tmp_path, prep=prep)
    up = _list_tree(tmp_path, b"imgs/0.png 0\n../x/1.png 1\n")
    with pytest.raises(ValueError, match="leaves the list's root"):
        folder.load_list(up, tmp_path / "imgs", prep=prep)
    latin = _list_tree(tmp_path, "imgs/0.png 0\nimgs/f\u00fcr.png 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"list.txt:2: not UTF-8 \(byte 0xfc\)"):
        folder.load_list(latin, tmp_path, prep=prep)
    huge = _list_tree(tmp_path, b"imgs/0.png 99999999999999999999999\n")
    with pytest.raises(ValueError, match="list.txt:1: label 99999999999999999999999 is not a class index"):
        folder.load_list(huge, tmp_path, prep=prep)
    twice = _list_tree(tmp_path, b"imgs/0.png 0\nimgs/0.png 0\nimgs/1.png 1\n")
    data = folder.load_list(twice, tmp_path, prep=prep)
    assert len(data) == 3 and "list.txt repeats 1 entries (e.g." in caplog.text


def test_folders_follow_symlinks_once_and_cache_keys_see_content(tmp_path):
    import os

    from PIL import Image

    from oodlab.data.preprocessing import Preprocessing
    from oodlab.data.sources import folder

    real = tmp_path / "real"
    real.mkdir()
    for i in range(5):
        Image.new("L", (8, 8), 40 * i).save(real / f"{i}.png")
    top = tmp_path / "top"
    top.mkdir()
    for i in range(5):
        Image.new("L", (8, 8), 40 * i + 1).save(top / f"t{i}.png")
    os.symlink(real, top / "linked")
    os.symlink(top, real / "back")  # a link back up the tree
    data = folder.load(top, prep=Preprocessing(8, 1))
    assert len(data) == 10  # the 5 reachable through the link too, and the loop walked once
    # same names, sizes and mtimes, other contents: another data set for the cache
    a, b = tmp_path / "a", tmp_path / "b"
    for d, value in ((a, 10), (b, 200)):
        d.mkdir()
        Image.new("L", (8, 8), value).save(d / "x.png")
        os.utime(d / "x.png", ns=(1_000_000_000, 1_000_000_000))
    assert (a / "x.png").stat().st_size == (b / "x.png").stat().st_size
    fa = folder.load(a, name="s", prep=Preprocessing(8, 1)).fingerprint
    fb = folder.load(b, name="s", prep=Preprocessing(8, 1)).fingerprint
    assert fa != fb


def test_an_ood_set_that_is_the_id_test_set_is_named(tmp_path):
    import dataclasses

    from helpers import make_tiny_suite

    s = make_tiny_suite()
    with pytest.warns(UserWarning, match="OOD set 'same' shares 48 of its 48 images with ID test"):
        dataclasses.replace(s, ood={**s.ood, "same": s.id_test}, groups={"near": ["stripes", "same"], "far": ["noise"]})


def test_ood_images_that_are_copies_of_id_test_images_are_counted_by_content(tmp_path):
    import dataclasses
    import shutil

    from PIL import Image

    from helpers import make_tiny_suite
    from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
    from oodlab.data.preprocessing import Preprocessing
    from oodlab.data.sources import folder

    s = make_tiny_suite()
    mixed = torch.cat([s.id_test.dataset.images[[3, 7, 11, 20, 21]], s.ood["noise"].dataset.images[:10]])
    copies = ImageSet("copies", ArrayDataset(mixed), tensor_fingerprint(mixed))  # another fingerprint, 5 copies
    with pytest.warns(UserWarning, match="OOD set 'copies' shares 5 of its 15 images with ID test"):
        dataclasses.replace(s, ood={**s.ood, "copies": copies}, groups={"near": ["stripes", "copies"],
                                                                           "far": ["noise"]})
    # files: 3 renamed copies and 2 files of the same size with other pixels
    test, ood = tmp_path / "test" / "a", tmp_path / "ood"
    test.mkdir(parents=True)
    ood.mkdir()
    for i in range(6):
        Image.new("L", (16, 16), 30 * i).save(test / f"{i}.png")
    for i in range(3):
        shutil.copy(test / f"{i}.png", ood / f"copy-{i}.png")
    for i in range(2):
        Image.new("L", (16, 16), 30 * i + 1).save(ood / f"other-{i}.png")
    assert {p.stat().st_size for p in ood.glob("other-*")} <= {p.stat().st_size for p in test.iterdir()}
    prep = Preprocessing(16, 1)
    id_test, ood_set = folder.load(tmp_path / "test", prep=prep, labelled=True), folder.load(ood, prep=prep)
    with pytest.warns(UserWarning, match="OOD set 'ood' shares 3 of its 5 images with ID test"):
        dataclasses.replace(s, id_test=id_test, ood={**s.ood, "ood": ood_set},
                            groups={"near": ["stripes", "ood"], "far": ["noise"]})


def test_refused_commands_create_and_remove_no_file(tmp_path, capsys, monkeypatch):
    """The file system under ``tmp_path`` (the cache aside) is the same before and after each refused command."""
    suite = _suite_file(tmp_path / "data", "../../escaped")
    monkeypatch.setenv("OODLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("my notes")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "out.txt").write_text("data/ood/0.png 0\n/etc/passwd 0\n")
    outside = tmp_path / "outside.toml"
    outside.write_text(f'root = {str(tmp_path)!r}\n[id]\ntrain = "data/train"\ntest = "data/test"\n[ood.far]\n'
                       'mine = "lists/out.txt"\n')

    def listing() -> dict[str, bytes]:
        return {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts}

    before = listing()
    for argv in (["bench", "--detectors", "energy", "--out", str(tmp_path / "afile")],
                 ["bench", "--detectors", "energy", "--out", str(tmp_path / "user")],
                 ["bench", "--suite", str(suite), "--detectors", "energy", "--out", str(tmp_path / "o1")],
                 ["bench", "--suite", str(outside), "--detectors", "energy", "--out", str(tmp_path / "o2")],
                 ["guard", "build", "energy", "--out", str(tmp_path / "user")],
                 ["guard", "build", "energy", "--out", str(tmp_path / "afile")],
                 ["guard", "check", str(tmp_path / "user"), str(tmp_path / "data"), "--out", str(tmp_path / "user")]):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.count("\n") == 1, argv
        assert listing() == before, argv
    assert not (tmp_path.parent / "escaped").exists()
