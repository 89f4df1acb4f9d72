"""Suites from your own data: a small TOML file or command-line flags.

A suite file::

    name = "my-suite"             # optional (default: the file's name)
    root = "/data/my-suite"       # optional; relative paths are read from here (default: the file's folder)
    num_classes = 10              # optional when ID train is a class-folder tree or a labelled list

    [id]
    train = "train"               # a folder of class sub-folders (ImageFolder) ...
    test = "lists/test.txt"       # ... or an image list, '<path relative to root> <label>' per line
    val = "val"                   # optional: held-out ID data for calibrating a guard

    [ood.near]
    ninco = "ninco"               # OOD sets: plain folders (searched recursively) or image lists
    [ood.far]
    textures = { list = "lists/textures.txt", root = "/data/images_classic" }

List entries must stay under their root (no absolute paths, no ``..``) unless the file says
``allow_outside_root = true`` at the top.

Images are read with the model's preprocessing, so the same file serves any model.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ..validate import integer
from .base import DataMissingError, ImageSet
from .preprocessing import Preprocessing
from .sources import folder
from .suites import Suite

__all__ = ["suite_from_spec", "load_suite_file", "suite_from_flags"]

_TOP = {"name", "root", "num_classes", "id", "ood", "allow_outside_root"}
_ID = {"train", "test", "val"}
_GROUPS = {"near", "far"}
_SET = {"folder", "list", "root"}


class SuiteSpecError(ValueError):
    """A suite file or the suite flags are malformed."""


def _unknown(where: str, keys: set[str], allowed: set[str]) -> None:
    extra = sorted(keys - allowed)
    if extra:
        raise SuiteSpecError(f"{where}: unknown key {extra[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _image_set(entry: Any, name: str, base: Path, prep: Preprocessing, where: str, labelled: bool,
               classes: list[str] | None, num_classes: int | None, outside: bool = False) -> ImageSet:
    if isinstance(entry, str):
        entry = {"list": entry} if entry.endswith(".txt") else {"folder": entry}
    if not isinstance(entry, dict):
        raise SuiteSpecError(f"{where}: {name} must be a path or a table with 'folder' or 'list'")
    _unknown(f"{where}: {name}", set(entry), _SET)
    root = base / entry["root"] if "root" in entry else base
    if ("folder" in entry) == ("list" in entry):
        raise SuiteSpecError(f"{where}: {name} needs exactly one of 'folder' and 'list'")
    if "list" in entry:
        return folder.load_list(root / entry["list"], root, name, prep, num_classes, allow_outside_root=outside)
    return folder.load(root / entry["folder"], name, prep, labelled=labelled, classes=classes)


def suite_from_spec(spec: dict[str, Any], prep: Preprocessing, base: str | Path = ".", where: str = "suite") -> Suite:
    """A :class:`Suite` from a parsed suite file (or the same structure built from flags)."""
    base = Path(base)
    _unknown(where, set(spec), _TOP)
    ids = spec.get("id")
    if not isinstance(ids, dict) or "train" not in ids or "test" not in ids:
        raise SuiteSpecError(f"{where}: needs an [id] table with 'train' and 'test'")
    _unknown(f"{where}: [id]", set(ids), _ID)
    oods = spec.get("ood")
    if not isinstance(oods, dict) or not any(oods.get(g) for g in _GROUPS):
        raise SuiteSpecError(f"{where}: needs at least one OOD set under [ood.near] or [ood.far]")
    _unknown(f"{where}: [ood]", set(oods), _GROUPS)
    root = base / spec["root"] if "root" in spec else base
    num_classes = integer(f"{where}: num_classes", spec.get("num_classes"), 1, allow_none=True)
    outside = spec.get("allow_outside_root", False)
    if not isinstance(outside, bool):
        raise SuiteSpecError(f"{where}: allow_outside_root must be true or false, got {outside!r}")
    train = _image_set(ids["train"], "id-train", root, prep, where, True, None, num_classes, outside)
    classes = getattr(train.dataset, "classes", None) or None  # class folders: test and val map by name
    num_classes = num_classes or train.num_classes or 1 + max(train.dataset.labels)  # type: ignore[attr-defined]
    test = _image_set(ids["test"], "id-test", root, prep, where, True, classes, num_classes, outside)
    val = _image_set(ids["val"], "id-val", root, prep, where, True, classes, num_classes, outside) if "val" in ids else None
    sets: dict[str, ImageSet] = {}
    groups: dict[str, list[str]] = {"near": [], "far": []}
    for group in ("near", "far"):
        for name, entry in (oods.get(group) or {}).items():
            if name in sets:
                raise SuiteSpecError(f"{where}: OOD set {name!r} appears twice")
            sets[name] = _image_set(entry, name, root, prep, where, False, None, None, outside)
            groups[group].append(name)
    return Suite(spec.get("name", "custom"), train, test, sets, groups, int(num_classes), prep.input_shape, id_val=val)


def load_suite_file(path: str | Path, prep: Preprocessing) -> Suite:
    """The suite described by the TOML file ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataMissingError(f"suite file {path} does not exist")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SuiteSpecError(f"{path}: not valid TOML ({exc})") from exc
    spec.setdefault("name", path.stem)
    return suite_from_spec(spec, prep, path.parent, str(path))


def suite_from_flags(id_train: str, id_test: str, ood: list[str], prep: Preprocessing, id_val: str | None = None,
                     name: str = "custom") -> Suite:
    """A suite from ``--id-train DIR --id-test DIR --ood near:NAME=DIR ...`` (lists work too)."""
    groups: dict[str, dict[str, str]] = {"near": {}, "far": {}}
    for item in ood:
        group, _, rest = item.partition(":")
        key, eq, path = rest.partition("=")
        if group not in groups or not eq or not key or not path:
            raise SuiteSpecError(f"--ood expects near:NAME=PATH or far:NAME=PATH, got {item!r}")
        groups[group][key] = path
    ids = {"train": id_train, "test": id_test, **({"val": id_val} if id_val else {})}
    return suite_from_spec({"name": name, "id": ids, "ood": groups}, prep, ".", "suite flags")
