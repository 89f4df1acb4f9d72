"""Small shared facilities: device choice, seeding, cache location, progress bars."""

from __future__ import annotations

import csv
import hashlib
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["default_device", "seed_everything", "cache_dir", "progress", "write_csv", "file_sha256"]


def default_device() -> torch.device:
    """CUDA when present, else CPU (override with ``OODLAB_DEVICE``)."""
    if env := os.environ.get("OODLAB_DEVICE"):
        return torch.device(env)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cache_dir() -> Path:
    """Root of oodlab's caches: ``$OODLAB_CACHE`` or ``~/.cache/oodlab``."""
    return Path(os.environ.get("OODLAB_CACHE") or Path.home() / ".cache" / "oodlab")


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr; silent when ``OODLAB_QUIET`` is set (tests, scripts)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", bool(os.environ.get("OODLAB_QUIET")))
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(path)
    return path


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
