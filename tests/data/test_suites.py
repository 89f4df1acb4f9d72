"""Named suites: composition, near/far grouping and the class split."""

import dataclasses

import pytest
import torch

from oodlab.data import DataMissingError, SUITES, load_suite
from oodlab.data.sources import glyphs


def test_registry_names():
    assert {"fashionmnist", "fashionmnist-split", "cifar10", "cifar100"} <= set(SUITES)
    with pytest.raises(ValueError, match="available"):
        load_suite("nope")


def test_fashionmnist_suites():
    s = load_suite("fashionmnist")
    assert (len(s.id_train), len(s.id_test), s.num_classes) == (60000, 10000, 10)
    fonts = ["fonts"] if glyphs.system_font_files() else []  # Debian's font packages (setup.sh installs them as root)
    natural = ["mnist", "digits", "glyphs", *fonts, "faces", "terrain"]
    assert list(s.ood) == [*natural, "gaussian", "uniform"] == s.groups["far"]
    assert s.synthetic == ("gaussian", "uniform") and s.kind_of("gaussian") == "synthetic"
    assert [n for n in s.ood if s.kind_of(n) == "natural"] == natural
    split = load_suite("fashionmnist-split")
    assert split.num_classes == 6 and split.groups["near"] == ["fashionmnist-6to9"]
    assert int(split.id_train.dataset.labels.max()) == 5 and len(split.id_train) == 36000
    assert len(split.ood["fashionmnist-6to9"]) == 4000 and split.group_of("digits") == "far"
    assert split.kind_of("fashionmnist-6to9") == "natural" and split.synthetic == s.synthetic
    # near-OOD images are exactly the test images of classes 6-9
    test = s.id_test.dataset
    assert torch.equal(split.ood["fashionmnist-6to9"].dataset.images, test.images[test.labels >= 6])


def test_cifar_suite_names_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("oodlab.data.sources.torchvision_sets.load", lambda *a, **k: None)
    with pytest.raises(DataMissingError, match="tin"):
        load_suite("cifar10", data_root=tmp_path)


def test_fonts_left_out_with_a_warning_where_their_packages_are_missing(monkeypatch):
    monkeypatch.setattr("oodlab.data.sources.glyphs.system_font_files", lambda root=None: [])
    with pytest.warns(UserWarning, match="'fonts' left out.*fonts-liberation2"):
        s = load_suite("fashionmnist")
    assert "fonts" not in s.ood and {"mnist", "terrain", "gaussian"} <= set(s.ood)


def test_synthetic_sets_must_be_ood_sets():
    s = load_suite("fashionmnist")
    with pytest.raises(ValueError, match=r"synthetic sets \['noise'\]"):
        dataclasses.replace(s, synthetic=("noise",))
