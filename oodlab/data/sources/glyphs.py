"""Letters rendered from TrueType fonts: a deterministic notMNIST-like OOD set.

By default the fonts are the DejaVu, STIX and Computer Modern faces that ship inside matplotlib's
wheel, so every machine with the same matplotlib renders the same images. ``system_fonts=True``
adds the fonts found under ``/usr/share/fonts/truetype`` for more variety.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch

from ..base import ArrayDataset, ImageSet, tensor_fingerprint

__all__ = ["load", "font_files"]

_MPL_FACES = ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono", "STIXGeneral", "cmr10", "cmb10", "cmss10", "cmti10", "cmtt10")
_SYSTEM_FONTS = Path("/usr/share/fonts/truetype")


def font_files(system_fonts: bool = False) -> list[Path]:
    """The font files used, in a fixed order."""
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    files = sorted(p for p in ttf.glob("*.ttf") if p.stem.startswith(_MPL_FACES) and "Display" not in p.stem)
    if system_fonts and _SYSTEM_FONTS.is_dir():
        files += sorted(_SYSTEM_FONTS.rglob("*.ttf"))
    return files


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


def load(system_fonts: bool = False) -> ImageSet:
    """Every upper- and lower-case Latin letter in every font, 1x28x28 (about 1,100 images by default)."""
    images = [
        img
        for font in font_files(system_fonts)
        for letter in string.ascii_letters
        if (img := _render(font, letter)).any()
    ]
    x = torch.from_numpy(np.stack(images)).unsqueeze(1)
    return ImageSet("glyphs", ArrayDataset(x), tensor_fingerprint(x))
