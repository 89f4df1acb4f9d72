"""Networks oodlab trains itself, built as :class:`Classifier` objects, and their checkpoints.

A checkpoint is ``NAME.safetensors`` (weights) beside ``NAME.json`` (architecture and metadata), so
loading never unpickles anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..registry import Registry
from ..runtime import atomic_path, atomic_write_text, file_sha256, save_safetensors, tensors_sha256
from .adapter import Classifier

__all__ = ["build", "ARCHS", "save_checkpoint", "load_checkpoint", "checkpoint_fingerprint", "state_fingerprint",
           "CheckpointError"]

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match its metadata."""


def _conv(i: int, o: int) -> list[nn.Module]:
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> Classifier:
    """Four 3x3 conv blocks and global average pooling, for 28x28 inputs; z is 128-d.

    Shaped like a small ResNet's end: the body's last conv block gives a (4w, 7, 7) map and the
    pool is a global average, so z is a dense, non-negative average of ReLU maps, the kind of
    feature ASH, ReAct and DICE were designed for. Trains to about 92-93% on Fashion-MNIST in a
    few CPU minutes.
    """
    body = nn.Sequential(*_conv(in_channels, width), nn.MaxPool2d(2),
                         *_conv(width, 2 * width), *_conv(2 * width, 2 * width), nn.MaxPool2d(2),
                         *_conv(2 * width, 4 * width))
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if in_channels == 1 else (CIFAR_MEAN, CIFAR_STD)
    return Classifier(body, pool, nn.Linear(4 * width, num_classes), mean * (in_channels // len(mean)),
                      std * (in_channels // len(std)))


class _BasicBlock(nn.Module):
    def __init__(self, i: int, o: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o)
        self.conv2, self.bn2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        self.shortcut = nn.Sequential()
        if stride != 1 or i != o:
            self.shortcut = nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> Classifier:
    """The CIFAR ResNet-18 (3x3 stem, no max-pool) used by OpenOOD and the papers; z is 512-d."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
    i = 64
    for o, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(i, o, stride), _BasicBlock(o, o, 1)]
        i = o
    return Classifier(nn.Sequential(*layers), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
                      nn.Linear(512, num_classes), CIFAR_MEAN, CIFAR_STD)


def _torchvision(name: str) -> Callable[..., Classifier]:
    def build_tv(num_classes: int = 1000, in_channels: int = 3) -> Classifier:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        return Classifier.from_torchvision_resnet(model, IMAGENET_MEAN, IMAGENET_STD, probe=torch.rand(2, 3, 64, 64))

    build_tv.__doc__ = f"torchvision's {name} (ImageNet normalisation), weights from an oodlab checkpoint."
    return build_tv


ARCHS: Registry[Callable[..., Classifier]] = Registry("architecture", {
    "smallcnn": small_cnn,
    "resnet18-cifar": resnet18_cifar,
    "tv-resnet18": _torchvision("resnet18"),
    "tv-resnet50": _torchvision("resnet50"),
})


def build(arch: str, num_classes: int, in_channels: int) -> Classifier:
    """A freshly initialised classifier of architecture ``arch`` (see :data:`ARCHS`)."""
    return ARCHS.get_named(arch)(num_classes=num_classes, in_channels=in_channels)


def save_checkpoint(model: Classifier, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar; ``meta`` must hold arch, num_classes, in_channels."""
    path = Path(path).with_suffix(".safetensors")
    for key in ("arch", "num_classes", "in_channels"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata needs {key!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:  # an interrupted save never leaves a half-written checkpoint
        save_safetensors(tmp, state)
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True))
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier saved at ``path``; returns ``(model in eval mode, metadata)``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} (and its .json sidecar) not found; train one with `oodlab train`")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc}); restore it or re-train the checkpoint") from exc
    missing = [k for k in ("arch", "num_classes", "in_channels") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} lacks {', '.join(missing)}; restore it or re-train the checkpoint")
    model = build(meta["arch"], meta["num_classes"], meta["in_channels"])
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({exc}); restore it or re-train") from exc
    mismatch = _state_mismatch(model.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{path} does not match architecture {meta['arch']!r} ({meta_path.name} says "
                              f"{meta['num_classes']} classes, {meta['in_channels']} channels): {mismatch}; use the "
                              ".json written with these weights, or re-train")
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def _state_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """How the weights ``got`` differ from those a model ``expected``, in a few words ("" when they fit)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(got[k].shape)} in the file, "
                     f"{tuple(expected[k].shape)} in the model)")
    return ", ".join(parts)


def checkpoint_fingerprint(path: str | Path) -> str:
    """Content hash of a checkpoint's weights (keys the feature cache)."""
    return file_sha256(Path(path).with_suffix(".safetensors"))[:16]


def state_fingerprint(model: nn.Module) -> str:
    """Content hash of a model's weights and buffers in memory (names, dtypes, shapes and values)."""
    return tensors_sha256(model.state_dict())[:16]
