"""Folders and lists of image files (Textures, Places365, iNaturalist, OpenImage-O, ImageNet, your own).

``load(root)`` takes every image under ``root`` (recursively); with ``labelled=True`` the first-level
sub-folders are the classes, as in torchvision's ImageFolder. ``load_list(list_file, root)`` reads
an OpenOOD-style image list, one ``<path relative to root> <label>`` per line (label -1 = none).

An image that cannot be decoded does not stop a run of thousands: its item is a black image with
label :data:`~oodlab.data.base.BROKEN`, and :func:`~oodlab.features.extract` reports and skips it
(or refuses, with ``strict``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..base import BROKEN, UNLABELED, DataMissingError, ImageSet
from ..preprocessing import Preprocessing
from ...runtime import sha256_hex

__all__ = ["load", "load_list", "ImageFiles", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
log = logging.getLogger(__name__)


class ImageFiles(Dataset):
    """Image files with labels, decoded and preprocessed on access; ``files`` is the list of paths and
    ``classes`` the class names by label (class folders), where known."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], prep: Preprocessing,
                 classes: Sequence[str] = ()) -> None:
        self.files, self.labels, self.prep, self.classes = list(files), list(labels), prep, list(classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        try:
            return self.prep.load(self.files[i]), torch.tensor(self.labels[i])
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's decoding errors (UnidentifiedImageError is an OSError)
            log.warning("cannot read image %s (%s); skipping it", self.files[i], exc)
            return torch.zeros(self.prep.input_shape), torch.tensor(BROKEN)

    def error(self, i: int) -> str:
        """Why item ``i`` cannot be read (re-opens the file)."""
        try:
            self.prep.load(self.files[i])
        except (OSError, ValueError, SyntaxError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return "unreadable"


def _fingerprint(root: Path, files: list[Path], labels: list[int], kind: str, prep: Preprocessing) -> str:
    """Identity of listed files: path, size, mtime, and inode + ctime, so that other contents under the same names,
    sizes and mtimes (a copy, a file rewritten and its mtime set back) are another data set. ctime cannot be set by
    a user and the numbers come from the one stat() per file already made: no file is read."""
    def lines():
        for p, y in zip(files, labels):
            st = p.stat()
            rel = p.relative_to(root) if p.is_relative_to(root) else p
            yield f"{rel}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}|{y}\n"
    return prep.fingerprint(f"{kind}:v2:{sha256_hex(lines())}")


def image_files(root: Path) -> list[Path]:
    """Every image file under ``root``, through symbolic links too (each real folder once), sorted."""
    seen: set[str] = set()
    out: list[Path] = []
    for folder_path, sub_folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder_path)
        if real in seen:  # a link back up the tree: its files are listed already
            sub_folders[:] = []
            continue
        seen.add(real)
        out += [Path(folder_path) / n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in out if p.is_file())


def load(root: str | Path, name: str | None = None, prep: Preprocessing | None = None, labelled: bool = False,
         classes: Sequence[str] | None = None) -> ImageSet:
    """All images under ``root`` as one set named ``name`` (default: the folder's name).

    ``labelled``: sub-folders are classes, sorted by name, or mapped through ``classes`` (the
    training set's class names) so that a test folder gets the same label for the same class.
    """
    root = Path(root)
    prep = prep or Preprocessing(32, 3)
    if not root.is_dir():
        raise DataMissingError(f"image folder {root} does not exist; pass the folder that holds the images")
    files = image_files(root)
    if not files:
        raise DataMissingError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    names: list[str] = []
    if labelled:
        found = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        if not found:
            raise DataMissingError(f"{root} has no class sub-folders; a labelled (ImageFolder) set needs "
                                   "<root>/<class>/<image> files")
        names = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise ValueError(f"{root} has class folders the training set lacks: {', '.join(unknown[:5])}")
        index = {c: i for i, c in enumerate(names)}
        files = [p for p in files if len(p.relative_to(root).parts) > 1]
        labels = [index[p.relative_to(root).parts[0]] for p in files]
    else:
        labels = [UNLABELED] * len(files)
    fp = _fingerprint(root, files, labels, f"folder:{labelled}", prep)
    return ImageSet(name or root.name, ImageFiles(files, labels, prep, names), fp, len(names) or None)


def load_list(list_file: str | Path, root: str | Path | Sequence[str | Path], name: str | None = None,
              prep: Preprocessing | None = None, num_classes: int | None = None,
              expected: int | None = None, ood: bool = False, allow_outside_root: bool = False) -> ImageSet:
    """An OpenOOD-style image list: ``<path> <label>`` per line, paths relative to ``root``.

    ``root`` may be several folders: the first one holding the list's first image is used for all.
    Every file must exist and every label lie in ``[0, num_classes)`` or be -1 (no label);
    ``expected`` checks the line count. ``ood``: an OOD list, whose labels are ignored (as OpenOOD does).
    An entry that leaves its root (an absolute path, ``..``) is refused unless ``allow_outside_root``: a list
    from someone else cannot make oodlab open any file. The list must be UTF-8; a line listed twice warns.
    """
    list_file = Path(list_file)
    prep = prep or Preprocessing(32, 3)
    if not list_file.is_file():
        raise DataMissingError(f"image list {list_file} does not exist")
    raw = list_file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{list_file}:{line_no}: not UTF-8 (byte {raw[exc.start]:#04x}); save the list as UTF-8") from None
    entries: list[tuple[str, int]] = []
    lines: list[int] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        try:
            entries.append((parts[0], -1 if ood else int(parts[1])))
        except (IndexError, ValueError):
            raise ValueError(f"{list_file}:{n}: expected '<relative path> <integer label>', got {line!r}") from None
        if len(parts) < 2:
            raise ValueError(f"{list_file}:{n}: expected '<relative path> <label>', got {line!r}")
        if not -1 <= entries[-1][1] < 2**31:
            raise ValueError(f"{list_file}:{n}: label {entries[-1][1]} is not a class index (0 ... 2^31 - 1) or -1")
        rel = Path(parts[0])
        if not allow_outside_root and (rel.is_absolute() or ".." in rel.parts):
            raise ValueError(f"{list_file}:{n}: {parts[0]!r} leaves the list's root; a list names files under its "
                             "root (set allow_outside_root = true in the suite file to allow it)")
        lines.append(n)
    if not entries:
        raise DataMissingError(f"image list {list_file} is empty")
    if expected is not None and len(entries) != expected:
        raise ValueError(f"{list_file} lists {len(entries)} images; this benchmark expects {expected} "
                         "(an incomplete or different version of the list)")
    roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
    base = next((r for r in roots if (r / entries[0][0]).is_file()), None)
    if base is None:
        raise DataMissingError(f"{entries[0][0]} (first entry of {list_file}) is in none of "
                               f"{', '.join(map(str, roots))}; pass the data root that holds it")
    files = [base / p for p, _ in entries]
    if len(set(files)) < len(files):
        import collections

        twice = next(f for f, c in collections.Counter(files).items() if c > 1)
        log.warning("%s repeats %d entries (e.g. %s): each image counts as often as it is listed", list_file,
                    len(files) - len(set(files)), twice)
    missing = [i for i, f in enumerate(files) if not f.is_file()]
    if missing:
        raise DataMissingError(f"{len(missing)} files listed in {list_file} are missing, e.g. {files[missing[0]]} "
                               f"(line {lines[missing[0]]})")
    labels = [y for _, y in entries]
    bad = [i for i, y in enumerate(labels) if y < -1 or (num_classes is not None and y >= num_classes)]
    if bad:
        raise ValueError(f"{list_file}:{lines[bad[0]]}: label {labels[bad[0]]} is outside [0, {num_classes}) and -1 "
                         f"({len(bad)} such lines)")
    if any(y < 0 for y in labels) and any(y >= 0 for y in labels):
        raise ValueError(f"{list_file} mixes labelled and unlabelled (-1) images")
    fp = _fingerprint(base, files, labels, f"list:{list_file.name}", prep)
    return ImageSet(name or list_file.stem, ImageFiles(files, labels, prep), fp,
                    num_classes if labels[0] >= 0 else None)
