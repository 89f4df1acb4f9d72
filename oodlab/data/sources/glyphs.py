"""Letters rendered from TrueType fonts: deterministic notMNIST-like OOD sets.

``glyphs``: the DejaVu, STIX and Computer Modern faces that ship inside matplotlib's wheel, so every
machine with the same matplotlib renders the same images. ``fonts``: other faces, from the Debian
packages ``fonts-liberation2`` and ``fonts-freefont-ttf`` (``setup.sh`` installs them when run as
root): 24 faces more, none of them in ``glyphs``.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch

from ..base import ArrayDataset, DataMissingError, ImageSet, tensor_fingerprint

__all__ = ["load", "load_fonts", "font_files", "system_font_files"]

_MPL_FACES = ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono", "STIXGeneral", "cmr10", "cmb10", "cmss10", "cmti10", "cmtt10")
_SYSTEM_FONTS = Path("/usr/share/fonts/truetype")
_SYSTEM_FAMILIES = ("liberation2", "freefont")  # the Debian packages of the ``fonts`` set


def font_files() -> list[Path]:
    """matplotlib's font files of the ``glyphs`` set, in a fixed order."""
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return sorted(p for p in ttf.glob("*.ttf") if p.stem.startswith(_MPL_FACES) and "Display" not in p.stem)


def system_font_files(root: Path = _SYSTEM_FONTS) -> list[Path]:
    """The font files of the ``fonts`` set found under ``root``, in a fixed order (empty without the packages)."""
    return [p for family in _SYSTEM_FAMILIES for p in sorted((root / family).glob("*.ttf"))]


def _render(font_path: Path, letter: str, size: int = 28, box: int = 20) -> np.ndarray:
    """White letter on black, scaled so its bounding box fits ``box`` pixels, centred like MNIST."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), 64)
    canvas = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(canvas).text((32, 16), letter, fill=255, font=font)
    bbox = canvas.getbbox()
    if bbox is None:
        return np.zeros((size, size), np.uint8)
    crop = canvas.crop(bbox)
    scale = box / max(crop.size)
    w, h = max(1, round(crop.width * scale)), max(1, round(crop.height * scale))
    crop = crop.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.new("L", (size, size), 0)
    out.paste(crop, ((size - w) // 2, (size - h) // 2))
    return np.asarray(out, dtype=np.uint8)


def _letters(name: str, fonts: list[Path]) -> ImageSet:
    images = [img for font in fonts for letter in string.ascii_letters if (img := _render(font, letter)).any()]
    x = torch.from_numpy(np.stack(images)).unsqueeze(1)
    return ImageSet(name, ArrayDataset(x), tensor_fingerprint(x))


def load() -> ImageSet:
    """``glyphs``: every upper- and lower-case Latin letter in every matplotlib face, 1x28x28 (~1,100 images)."""
    return _letters("glyphs", font_files())


def load_fonts(root: Path = _SYSTEM_FONTS) -> ImageSet:
    """``fonts``: every Latin letter in the Liberation and FreeFont faces, 1x28x28 (1,248 images with both
    packages); :class:`DataMissingError` when neither is installed."""
    files = system_font_files(root)
    if not files:
        raise DataMissingError(f"no fonts of {', '.join(_SYSTEM_FAMILIES)} under {root}: install the Debian packages "
                               "fonts-liberation2 and fonts-freefont-ttf (setup.sh does, as root)")
    return _letters("fonts", files)
