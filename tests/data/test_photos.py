"""Auxiliary outliers: photo crops (seeded, right shape, real texture) and the ``--aux`` resolver."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_tiny_suite
from oodlab.data.auxiliary import aux_source
from oodlab.data.sources import photos


def test_photo_list_is_fixed_and_loads():
    images = photos.photos()
    assert len(images) == len(photos.SKIMAGE_PHOTOS) + len(photos.SKLEARN_PHOTOS) == 18
    assert all(im.dtype == np.uint8 and min(im.shape[:2]) >= 100 for im in images)


def test_crops_are_seeded_shaped_and_textured():
    a, b, c = photos.load(200, seed=0), photos.load(200, seed=0), photos.load(200, seed=1)
    x = a.dataset.images
    assert x.shape == (200, 1, 28, 28) and x.dtype == torch.uint8
    assert a.fingerprint == b.fingerprint and torch.equal(x, b.dataset.images)
    assert a.fingerprint != c.fingerprint
    assert bool((a.dataset.labels == -1).all())  # unlabeled outliers
    spread = x.float().flatten(1).std(1)
    assert float(spread.median()) > 10  # real photo content, not flat grey
    assert len({bytes(img.numpy()) for img in x}) == 200  # no duplicate crops


def test_colour_crops_for_cifar_like_inputs():
    x = photos.load(20, size=32, channels=3).dataset.images
    assert x.shape == (20, 3, 32, 32)
    assert float((x[:, 0].float() - x[:, 2].float()).abs().mean()) > 1  # colour photos keep their colour


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="channels 1 or 3"):
        photos.load(10, channels=2)


def test_aux_source_resolves_photos_folders_and_sets(tmp_path):
    suite = make_tiny_suite()
    aux = aux_source("photos:50", suite)
    assert aux.name == "photos" and aux.dataset.images.shape == (50, 1, 28, 28)
    assert aux_source(aux, suite) is aux
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    folder = aux_source(str(tmp_path), suite)
    x, y = folder.dataset[2]
    assert len(folder) == 3 and x.shape == (1, 28, 28) and int(y) == -1
    assert torch.allclose(x, torch.full_like(x, 120 / 255), atol=1 / 255)


def test_aux_source_errors_name_the_fix(tmp_path):
    suite = make_tiny_suite()
    with pytest.raises(ValueError, match="--aux photos"):
        aux_source(None, suite)
    with pytest.raises(ValueError, match="photos:N"):
        aux_source("photos:many", suite)
    with pytest.raises(ValueError, match="existing folder"):
        aux_source(str(tmp_path / "missing"), suite)
