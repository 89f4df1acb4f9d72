"""How image files become model inputs: channels, resize of the shorter side, centre crop, [0, 1] tensor.

Normalisation (mean / std) is not here: it lives inside the :class:`~oodlab.models.Classifier`, so
that data sets stay in [0, 1] and input perturbations are in pixel units.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["Preprocessing", "IMAGENET"]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """``channels`` (1 = grey, 3 = RGB), shorter side resized to ``resize`` (default ``size``), centre crop ``size``."""

    size: int
    channels: int = 3
    resize: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.size < 1 or (self.resize is not None and self.resize < self.size):
            raise ValueError(f"need size >= 1 and resize >= size, got size={self.size}, resize={self.resize}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def transform(self):
        """A torchvision transform from a PIL image to a float tensor (C, size, size) in [0, 1]."""
        from torchvision import transforms as T

        mode = T.Grayscale(1) if self.channels == 1 else T.Lambda(_rgb)
        interp = getattr(T.InterpolationMode, self.interpolation.upper())
        return T.Compose([mode, T.Resize(self.resize or self.size, interpolation=interp), T.CenterCrop(self.size),
                          T.ToTensor()])

    def fingerprint(self, identity: str) -> str:
        """Identity of a data set seen through this preprocessing (keys the feature cache)."""
        text = f"{identity}|size={self.size}|channels={self.channels}"
        if self.resize is not None or self.interpolation != "bilinear":
            text += f"|resize={self.resize}|{self.interpolation}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, object]:
        return {"size": self.size, "channels": self.channels, "resize": self.resize or self.size,
                "interpolation": self.interpolation}


def _rgb(image):
    return image.convert("RGB")


#: OpenOOD v1.5's ImageNet evaluation: RGB, resize 256 (bilinear), centre crop 224.
IMAGENET = Preprocessing(224, 3, 256, "bilinear")
