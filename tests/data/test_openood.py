"""OpenOOD v1.5's four benchmarks read from its lists as DATA_INFO defines them, on a generated stand-in tree."""

import dataclasses

import pytest
import torch

from openood_tree import make_openood_tree
from oodlab.data import DataMissingError, load_suite
from oodlab.data import openood

GROUPS = {
    "cifar10": ({"near": ["cifar100", "tin"], "far": ["mnist", "svhn", "texture", "places365"]}, ["cifar10c"], "val_tin"),
    "cifar100": ({"near": ["cifar10", "tin"], "far": ["mnist", "svhn", "texture", "places365"]}, [], "val_tin"),
    "imagenet200": ({"near": ["ssb_hard", "ninco"], "far": ["inaturalist", "textures", "openimage_o"]},
                    ["imagenet_v2", "imagenet_c", "imagenet_r"], "val_openimage_o"),
    "imagenet1k": ({"near": ["ssb_hard", "ninco"], "far": ["inaturalist", "textures", "openimage_o"]},
                   ["imagenet_v2", "imagenet_c", "imagenet_r", "imagenet_es"], "val_openimage_o"),
}
LIST_NAMES = {  # OpenOOD's own list file names, as in its benchmark_imglist zip
    "cifar10": {"train_cifar10.txt", "val_cifar10.txt", "test_cifar10.txt", "val_tin.txt", "test_cifar100.txt",
                "test_tin.txt", "test_mnist.txt", "test_svhn.txt", "test_texture.txt", "test_places365.txt",
                "test_cifar10c.txt"},
    "imagenet200": {"train_imagenet200.txt", "val_imagenet200.txt", "test_imagenet200.txt", "val_openimage_o.txt",
                    "test_ssb_hard.txt", "test_ninco.txt", "test_inaturalist.txt", "test_textures.txt",
                    "test_openimage_o.txt", "test_imagenet200_v2.txt", "test_imagenet200_c.txt", "test_imagenet200_r.txt"},
}


@pytest.fixture
def patched_counts(monkeypatch):
    """ImageNet-1K's list lengths are checked: patch them to the stand-in's 3 images per list."""
    b = openood.BENCHMARKS["imagenet1k"]
    monkeypatch.setitem(openood.BENCHMARKS, "imagenet1k", dataclasses.replace(b, counts=tuple((f, 3) for f, _ in b.counts)))


@pytest.mark.parametrize("benchmark", list(GROUPS))
def test_benchmark_reads_every_list_as_data_info_says(benchmark, tmp_path, patched_counts):
    written = make_openood_tree(tmp_path, benchmark)
    if benchmark in LIST_NAMES:
        assert set(written) == LIST_NAMES[benchmark]
    s = load_suite(benchmark, tmp_path)
    groups, csid, ood_val = GROUPS[benchmark]
    assert s.name == benchmark and s.groups == groups and list(s.csid) == csid and s.ood_val.name == ood_val
    assert s.num_classes == openood.BENCHMARKS[benchmark].num_classes
    assert [len(x) for x in (s.id_train, s.id_val, s.id_test, s.ood_val)] == [3, 3, 3, 3]
    size = 32 if benchmark.startswith("cifar") else 224
    assert s.input_shape == (3, size, size) and s.id_test.dataset[0][0].shape == (3, size, size)
    assert [int(s.id_test.dataset[i][1]) for i in range(3)] == [0, 1, 2]  # ID labels as listed
    assert all(int(d.dataset[i][1]) == -1 for d in s.ood.values() for i in range(3))  # OOD labels ignored, as OpenOOD
    # each set is the files its own list names
    first = {name: str(d.dataset.files[0]) for name, d in s.ood.items()}
    assert all(first[name].endswith(f"test_{name}/0.png") for name in first)
    assert str(s.ood["ssb_hard" if "imagenet" in benchmark else "tin"].dataset.files[0]).count("images_largescale" if
                                                                                                "imagenet" in benchmark else "images_classic") == 1
    if "imagenet" in benchmark:  # textures of the ImageNet benchmarks live in images_classic
        assert "images_classic" in str(s.ood["textures"].dataset.files[0])
        assert s.csid["imagenet_c"].dataset[0][0].shape == (3, 224, 224)  # no resize: ImageNet-C is 224 already


def test_full_spectrum_appends_csid_to_id_test(tmp_path):
    make_openood_tree(tmp_path, "imagenet200")
    s = load_suite("imagenet200", tmp_path)
    fs = s.full_spectrum()
    assert fs.name == "imagenet200-fsood" and len(fs.id_test) == 3 + 3 * 3 and fs.ood.keys() == s.ood.keys()
    assert torch.equal(fs.id_test.dataset[3][0], s.csid["imagenet_v2"].dataset[0][0])
    assert fs.id_test.fingerprint != s.id_test.fingerprint
    make_openood_tree(tmp_path / "c100", "cifar100")
    with pytest.raises(ValueError, match="no covariate-shifted ID sets"):
        load_suite("cifar100", tmp_path / "c100").full_spectrum()


def test_bad_lists_are_one_line_errors(tmp_path, patched_counts):
    make_openood_tree(tmp_path, "cifar10")
    lists = tmp_path / "benchmark_imglist" / "cifar10"
    good = (lists / "test_cifar10.txt").read_text()
    (lists / "test_cifar10.txt").write_text(good + "test_cifar10/missing.png 1\n")
    with pytest.raises(DataMissingError, match=r"test_cifar10.txt are missing, e.g. .*missing.png \(line 4\)"):
        load_suite("cifar10", tmp_path)
    (lists / "test_cifar10.txt").write_text(good.replace(" 1\n", " 12\n", 1))
    with pytest.raises(ValueError, match=r"test_cifar10.txt:2: label 12 is outside \[0, 10\)"):
        load_suite("cifar10", tmp_path)
    make_openood_tree(tmp_path / "in", "imagenet1k")
    monkey = openood.BENCHMARKS["imagenet1k"]
    openood.BENCHMARKS["imagenet1k"] = dataclasses.replace(monkey, counts=(("test_ninco.txt", 5_879),))
    try:
        with pytest.raises(ValueError, match="test_ninco.txt lists 3 images; this benchmark expects 5879"):
            load_suite("imagenet1k", tmp_path / "in")
    finally:
        openood.BENCHMARKS["imagenet1k"] = monkey
    with pytest.raises(DataMissingError, match="benchmark_imglist/imagenet/"):
        load_suite("imagenet1k", tmp_path / "empty")


def test_cifar_without_lists_falls_back_to_torchvision_and_says_so(tmp_path, monkeypatch):
    import oodlab.data.suites as suites

    monkeypatch.setattr(suites.torchvision_sets, "load", lambda *a, **k: (_ for _ in ()).throw(DataMissingError("no cifar")))
    with pytest.warns(UserWarning, match="not OpenOOD's split"), pytest.raises(DataMissingError, match="no cifar"):
        load_suite("cifar10", tmp_path)
