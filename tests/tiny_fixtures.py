"""A tiny classifier and its features on random 8x8 images, shared by the detector and guard tests.

The features hold the intermediate-layer features every registered detector reads by default (and the spatial
mean of every layer of the body), so those detectors run on them as on a sweep's cache."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
from oodlab.detectors import available, create
from oodlab.features import Features, extract
from oodlab.features.layers import tap
from oodlab.models.adapter import Classifier


@dataclass
class Tiny:
    model: Classifier
    train: Features
    test: Features
    ood: Features
    test_set: ImageSet
    ood_set: ImageSet
    train_set: ImageSet | None = None  # the images of ``train`` (model-path fits)


def image_set(name: str, n: int, seed: int, num_classes: int | None = 3, bright: bool = False) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 128, (n, 1, 8, 8), generator=g, dtype=torch.uint8) + (127 if bright else 0)
    labels = torch.arange(n) % num_classes if num_classes else None
    return ImageSet(name, ArrayDataset(images, labels), tensor_fingerprint(images), num_classes)


def tiny_classifier(seed: int = 0) -> Classifier:
    """Conv -> 4x4 map (the feature map), then flatten + linear + ReLU -> z (16-d), head -> 3 classes."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
    pool = nn.Sequential(nn.Flatten(1), nn.Linear(8 * 4 * 4, 16), nn.ReLU())
    return Classifier(body, pool, nn.Linear(16, 3), mean=(0.5,), std=(0.25,)).eval()


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    model = tiny_classifier()
    train_set, test_set = image_set("train", 300, 1), image_set("test", 60, 2)
    ood_set = image_set("ood", 40, 3, num_classes=None, bright=True)
    layers = tuple(dict.fromkeys([tap(name) for name, _ in model.body.named_children()]
                                 + [t for n in available() for t in create(n).layer_taps(model, train_set)]))
    get = lambda s: extract(model, s, batch_size=64, device="cpu", layers=layers)  # noqa: E731
    return Tiny(model, get(train_set), get(test_set), get(ood_set), test_set, ood_set, train_set)


@pytest.fixture(scope="session")
def make_images():
    """``make_images(name, n, seed, num_classes=3, bright=False)``: a random 1x8x8 ImageSet."""
    return image_set
