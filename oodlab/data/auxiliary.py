"""Resolve an auxiliary-outlier source (``--aux``) into an :class:`ImageSet` shaped like a suite's inputs.

Outlier Exposure, Energy-OE and GReg train against unlabeled outliers. ``"photos"`` gives random
crops of the photographs bundled with scikit-image and scikit-learn (works offline, disjoint from
the test OOD sets); any folder of images (300K Random Images, an ImageNet-21k subset...) works too.
"""

from __future__ import annotations

from pathlib import Path

from .base import ImageSet
from .preprocessing import Preprocessing
from .sources import folder, photos
from .suites import Suite

__all__ = ["aux_source"]


def aux_source(spec: str | Path | ImageSet | None, suite: Suite) -> ImageSet:
    """The auxiliary outliers named by ``spec`` at the suite's input size.

    ``spec``: ``"photos"`` (50,000 crops) or ``"photos:N"`` (N crops), a folder of images, an
    :class:`ImageSet` (used as is), or None for the suite's own auxiliary set.
    """
    channels, size, _ = suite.input_shape
    if isinstance(spec, ImageSet):
        return spec
    if spec is None:
        if suite.aux is None:
            raise ValueError(f"suite {suite.name} has no auxiliary outliers of its own; pass --aux photos "
                             "or --aux FOLDER (a folder of images disjoint from the test OOD sets)")
        return suite.aux
    text = str(spec)
    if text == "photos" or text.startswith("photos:"):
        count = text.partition(":")[2]
        if count and not count.isdigit():
            raise ValueError(f"--aux {text!r}: write photos:N with N a whole number of crops, e.g. photos:20000")
        return photos.load(int(count) if count else 50_000, size=size, channels=channels)
    if Path(text).is_dir():
        return folder.load(text, name=f"aux-{Path(text).name}", prep=Preprocessing(size, channels))
    raise ValueError(f"unknown auxiliary source {text!r}: use 'photos', 'photos:N' or an existing folder of images")
