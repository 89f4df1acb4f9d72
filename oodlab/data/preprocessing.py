"""How image files become model inputs: channels, resize of the shorter side, centre crop, [0, 1] tensor.

Normalisation (mean / std) is not here: it lives inside the :class:`~oodlab.models.Classifier`, so
that data sets stay in [0, 1] and input perturbations are in pixel units.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..runtime import digest

__all__ = ["Preprocessing", "IMAGENET", "max_pixels"]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
READERS = ("pil", "torchvision")


@dataclass(frozen=True)
class Preprocessing:
    """``channels`` (1 = grey, 3 = RGB), shorter side resized to ``resize`` (default ``size``), centre crop ``size``.

    ``reader`` decodes files: ``"torchvision"`` (the default: ``torchvision.io``'s decoders and
    tensor resizing with antialiasing, about twice as fast as PIL here, see docs/results.md; a
    file it cannot decode, such as BMP or TIFF, goes through PIL) or ``"pil"`` (PIL, as
    torchvision's ImageFolder and OpenOOD; :data:`IMAGENET` uses it). The two differ by a few grey
    levels, so the reader is part of the data's identity.
    """

    size: int
    channels: int = 3
    resize: int | None = None
    interpolation: str = "bilinear"
    reader: str = "torchvision"
    _tf: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.size < 1 or (self.resize is not None and self.resize < self.size):
            raise ValueError(f"need size >= 1 and resize >= size, got size={self.size}, resize={self.resize}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.reader not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}, got {self.reader!r}")

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

    def load(self, path: str | Path) -> Tensor:
        """One image file as a float tensor (C, size, size) in [0, 1], whatever its format and bit depth: 8- and
        16-bit samples are scaled by their range, palette / grey+alpha / CMYK converted to the model's channels, the
        first frame of an animation taken, EXIF orientation applied. An image of more than :func:`max_pixels`
        pixels is refused (a ValueError) before it is decoded."""
        from PIL import Image, ImageOps

        limit, pil_limit = max_pixels(), Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # oodlab's own limit below replaces PIL's bomb warning and error
        try:
            im = Image.open(path)  # reads the header only: the size is known before any decoding
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
        with im:
            if im.width * im.height > limit:
                raise ValueError(f"{im.width} x {im.height} = {im.width * im.height:,} pixels is over the limit of "
                                 f"{limit:,} (a decompression bomb?); raise OODLAB_MAX_PIXELS to read it")
            if self.reader == "torchvision":
                try:
                    return self._load_tensor(path, im.format)
                except (RuntimeError, ImportError):  # a format torchvision.io does not decode (or no decoder): PIL's
                    pass
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):  # 16- or 32-bit integer samples: scale their range to 8 bits, as 8-bit twins
                import numpy as np

                top = 65535.0 if im.mode.startswith("I;16") or np.asarray(im).max() <= 65535 else float(2**31 - 1)
                im = Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) / top * 255 + 0.5, 0, 255).astype(np.uint8))
            if self._tf is None:
                object.__setattr__(self, "_tf", self.transform())
            return self._tf(im)

    def _load_tensor(self, path: str | Path, fmt: str | None = None) -> Tensor:
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec; it still decodes
            from torchvision.io import ImageReadMode, decode_image, read_file

            # the WebP decoder has no grey mode (it warns and returns colour): read RGB, made grey below
            mode = ImageReadMode.GRAY if self.channels == 1 and fmt != "WEBP" else ImageReadMode.RGB
            img = decode_image(read_file(str(path)), mode=mode, apply_exif_orientation=True)
        if img.ndim == 4:  # an animation: its first frame
            img = img[0]
        if img.shape[0] != self.channels:  # decoders that ignore the mode (GIF): alpha dropped, then the model's channels
            img = img[:-1] if img.shape[0] in (2, 4) else img
            img = TF.rgb_to_grayscale(img) if self.channels == 1 and img.shape[0] == 3 else img.expand(self.channels, -1, -1)
        interp = getattr(InterpolationMode, self.interpolation.upper())
        if img.dtype != torch.uint8:  # 16-bit samples: scaled by their range before resizing
            img = img.float() / torch.iinfo(img.dtype).max
            img = TF.resize(img, [self.resize or self.size], interp, antialias=True)
            return TF.center_crop(img, [self.size, self.size]).clamp_(0, 1)
        img = TF.resize(img, [self.resize or self.size], interp, antialias=True)
        return TF.center_crop(img, [self.size, self.size]).float().div_(255)

    def fingerprint(self, identity: str) -> str:
        """Identity of a data set seen through this preprocessing (keys the feature cache)."""
        text = f"{identity}|size={self.size}|channels={self.channels}"
        if self.resize is not None or self.interpolation != "bilinear":
            text += f"|resize={self.resize}|{self.interpolation}"
        if self.reader != "pil":  # PIL was the only reader before; its fingerprints stay as they were
            text += f"|reader={self.reader}"
        return digest(text)

    def describe(self) -> dict[str, object]:
        return {"size": self.size, "channels": self.channels, "resize": self.resize or self.size,
                "interpolation": self.interpolation, "reader": self.reader}


def _rgb(image):
    return image.convert("RGB")


def max_pixels() -> int:
    """The largest image (width x height) oodlab decodes: ``$OODLAB_MAX_PIXELS``, else PIL's default limit."""
    import os

    from PIL import Image

    return int(os.environ.get("OODLAB_MAX_PIXELS") or Image.MAX_IMAGE_PIXELS or 89_478_485)  # PIL's: 89,478,485


#: OpenOOD v1.5's ImageNet evaluation: RGB, resize 256 (bilinear), centre crop 224.
IMAGENET = Preprocessing(224, 3, 256, "bilinear", "pil")
