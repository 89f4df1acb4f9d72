"""OpenOOD v1.5's released networks under their own parameter names, so its ``s*/best.ckpt`` load as they are.

``resnet18_32x32`` (CIFAR-10 / CIFAR-100) is the CIFAR ResNet-18: 3x3 stem without max-pool,
``layer1..4`` of two basic blocks whose projections are named ``shortcut.0`` / ``shortcut.1``,
global average pooling and ``fc`` (512-d features). ``resnet18_224x224`` (ImageNet-200) is
torchvision's ResNet-18 with its names. The head size is read from the weights' ``fc.weight``.
Inputs are normalised as OpenOOD's benchmark of that head size: 10 classes CIFAR-10's mean / std,
100 classes CIFAR-100's, otherwise ImageNet's; a third part of the name overrides it
(``openood:resnet18_32x32:cifar100``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.preprocessing import IMAGENET, Preprocessing
from .zoo import _BasicBlock

__all__ = ["OPENOOD_NETS", "NORMALISATIONS", "build_openood", "default_normalisation"]

#: OpenOOD's per-benchmark mean / std (its evaluation_api preprocessor).
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class ResNet18Cifar(nn.Module):
    """The 32x32 ResNet-18 with OpenOOD's module names (``conv1``, ``bn1``, ``layer1..4``, ``avgpool``, ``fc``)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        stages, i = [], 64
        for o, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_BasicBlock(i, o, stride), _BasicBlock(o, o, 1)))
            i = o
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _resnet18_224(num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


#: name -> (builder taking the class count, preprocessing OpenOOD applies on its benchmarks)
OPENOOD_NETS = {
    "resnet18_32x32": (ResNet18Cifar, Preprocessing(32, 3, 32, "bilinear", reader="pil")),
    "resnet18_224x224": (_resnet18_224, IMAGENET),
}


def default_normalisation(num_classes: int) -> str:
    """The benchmark whose mean / std OpenOOD feeds a head of ``num_classes`` classes."""
    return {10: "cifar10", 100: "cifar100"}.get(num_classes, "imagenet")


def build_openood(name: str, num_classes: int) -> tuple[nn.Module, Preprocessing]:
    """An untrained OpenOOD network ``name`` (a key of :data:`OPENOOD_NETS`) with a ``num_classes`` head, and the
    preprocessing of its benchmarks."""
    builder, prep = OPENOOD_NETS[name]
    return builder(num_classes), prep
