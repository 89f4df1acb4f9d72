"""Where data lives: ``--data-root``, then ``$OODLAB_DATA``, then Debian's install location."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["search_roots", "download_root", "DEBIAN_DATASETS"]

DEBIAN_DATASETS = Path("/usr/share/datasets")


def search_roots(data_root: str | Path | None = None) -> list[Path]:
    """Folders to look in, most specific first (explicit root, ``$OODLAB_DATA``, Debian's datasets)."""
    roots = [Path(p) for p in (data_root, os.environ.get("OODLAB_DATA")) if p]
    return [*roots, DEBIAN_DATASETS]


def download_root(data_root: str | Path | None = None) -> Path:
    """Where torchvision downloads go: the explicit root, ``$OODLAB_DATA``, or ``~/.cache/oodlab/data``."""
    for p in (data_root, os.environ.get("OODLAB_DATA")):
        if p:
            return Path(p)
    return Path.home() / ".cache" / "oodlab" / "data"
