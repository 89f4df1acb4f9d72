"""Small shared facilities: device choice, seeding, cache location, progress bars, and the one place that hashes
and checks files: :func:`digest` / :func:`sha256_hex` / :func:`tensors_sha256` for every content identity,
:func:`atomic_path` for every write, :func:`save_checked` / :func:`load_checked` for safetensors that carry
their own checksum (fitted-detector and score caches)."""

from __future__ import annotations

import csv
import ctypes
import errno
import ctypes.util
import hashlib
import json
import os
import random
import re
import shutil
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["default_device", "seed_everything", "cache_dir", "progress", "write_csv", "sha256_hex", "digest",
           "file_sha256", "tensors_sha256", "cached_json", "IntegrityError", "save_checked", "load_checked", "save_safetensors",
           "atomic_path", "atomic_write_text", "append_whole", "writing", "DiskFullError", "disk_full", "free_bytes",
           "check_writable", "available_memory", "release_free_heap"]


def default_device() -> torch.device:
    """CUDA when present, else CPU (override with ``OODLAB_DEVICE``)."""
    import torch

    if env := os.environ.get("OODLAB_DEVICE"):
        return torch.device(env)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cache_dir() -> Path:
    """Root of oodlab's caches: ``$OODLAB_CACHE`` or ``~/.cache/oodlab``."""
    return Path(os.environ.get("OODLAB_CACHE") or Path.home() / ".cache" / "oodlab")


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr; silent when ``OODLAB_QUIET`` is set (tests, scripts) and on ranks other than 0."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", bool(os.environ.get("OODLAB_QUIET")) or int(os.environ.get("RANK") or 0) > 0)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else, or the question cannot be asked
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Delete the temporary files of ``path`` left by writers on this machine that were killed mid-write
    (their process is gone). Writers on other machines sharing the folder are never touched."""
    if os.name != "posix":
        return
    prefix, suffix = f".{path.stem}.", f".tmp{path.suffix}"
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid, _, rest = name[len(prefix):-len(suffix)].partition("-")
        if pid.isdigit() and rest.partition("-")[2] == _HOST and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


class DiskFullError(OSError):
    """The device a file was being written to is full (or over quota); nothing half-written was left there."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def _is_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _existing_folder(path: Path) -> Path:
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_bytes(path: str | Path) -> int:
    """Bytes free for writing on the device that holds (or will hold) ``path``."""
    return shutil.disk_usage(_existing_folder(Path(path).absolute())).free


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def disk_full(path: str | Path, need: int | None = None) -> DiskFullError:
    """The one-line error for a full device under ``path``: where, how much is free (and ``need``), what to do."""
    path = Path(path).absolute()
    folder, free = _existing_folder(path), free_bytes(path)
    try:
        in_cache = path.resolve().is_relative_to(cache_dir().resolve())
    except OSError:
        in_cache = False
    advice = ("free space there, or set OODLAB_CACHE to a folder on a disk with room" if in_cache
              else "free space there, or write to a folder on a disk with room")
    needs = f"; about {_size(need)} are needed" if need is not None else ""
    what = f"for {path.name}" if need is not None else f"while writing {path.name}; nothing half-written was kept"
    return DiskFullError(f"no space left on the device holding {folder} ({_size(free)} free{needs}) {what}: "
                         f"{advice}")


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Within the block, a full device is a :class:`DiskFullError` naming ``path`` (the outermost block names it;
    the block cleans up)."""
    try:
        yield
    except OSError as exc:
        if _is_full(exc):
            raise disk_full(path) from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            why = "is on a read-only file system" if exc.errno == errno.EROFS else "may not be written to"
            raise OSError(exc.errno, f"cannot write {path}: {_existing_folder(Path(path).absolute())} {why}; "
                                     "choose a folder you can write to") from None
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path``, unique to this process, thread and machine, renamed to ``path`` when
    the block succeeds: readers see the old file or the new one, never half of one, and two writers
    never share a temporary file (the last rename wins). Temporary files of ``path`` that a killed
    process on this machine left behind are removed first; a full device is a :class:`DiskFullError`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}-{_HOST}.tmp{path.suffix}")
    try:
        with writing(path):
            yield tmp
            tmp.replace(path)
    finally:
        with suppress(OSError):  # a read-only folder refuses even the unlink of a file that is not there
            tmp.unlink(missing_ok=True)


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                     ) -> None:
    """``safetensors.torch.save_file``, with its I/O failures raised as the ``OSError`` they are (so a full
    disk is a full disk to :func:`atomic_path`, not a serialisation error)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata=dict(metadata) if metadata is not None else None)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def append_whole(path: str | Path, text: str) -> None:
    """Append ``text`` with one write of an O_APPEND file (processes sharing the folder never interleave); when
    the write fails part way (a full disk), the file is cut back to what it was: never half a line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        data = text.encode()
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        except OSError:
            os.ftruncate(fd, size)
            with writing(path):
                raise
    finally:
        os.close(fd)


def _read_only_ancestor(path: str | Path) -> Path | None:
    """The nearest existing folder at or above ``path`` when it cannot be written to, else None (a cheap check
    before any work that will write there)."""
    parent = Path(path).resolve()
    while not parent.exists():
        parent = parent.parent
    return None if os.access(parent, os.W_OK) else parent


def check_writable(path: str | Path, flag: str = "--out", file: bool = False) -> None:
    """Refuse, before any work, an output ``path`` under a folder that cannot be written to, or (``file``) that is
    an existing folder where a file is to be written (one line)."""
    if file and Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a folder; give the name of the file to write (e.g. {Path(path) / 'out.csv'})")
    if (locked := _read_only_ancestor(path)) is not None:
        raise ValueError(f"{flag} {path}: {locked} is read-only; choose a folder you can write to")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return Path(path)


def sha256_hex(chunks: Iterable[bytes | str]) -> str:
    """SHA-256 (hex) of the concatenated ``chunks`` (strings as UTF-8): every content hash of oodlab is this."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.encode() if isinstance(c, str) else c)
    return h.hexdigest()


def digest(*parts: str, length: int = 16) -> str:
    """A short identity of ``parts`` (joined by ``|``): the first ``length`` hex digits of their SHA-256."""
    return sha256_hex(["|".join(parts)])[:length]


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    with open(path, "rb") as f:
        return sha256_hex(iter(lambda: f.read(1 << 20), b""))


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of named tensors: names, dtypes, shapes and bytes, in name order (device independent)."""
    import torch

    def chunks():
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            yield f"{name}|{t.dtype}|{tuple(t.shape)}|"
            yield t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return sha256_hex(chunks())


def cached_json(kind: str, key: Iterable[bytes | str], compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``compute()`` (a dict of numbers), kept as JSON in ``cache_dir()/kind/`` under the SHA-256 of ``key``:
    what depends only on content (intervals and metrics of exact scores) is computed once. An entry that cannot
    be read is computed again."""
    path = cache_dir() / kind / f"{sha256_hex(key)[:24]}.json"
    try:
        found = json.loads(path.read_text())
        if isinstance(found, dict) and found and all(isinstance(v, (int, float)) for v in found.values()):
            return {k: float(v) for k, v in found.items()}
    except (OSError, ValueError):  # none yet, or unreadable
        pass
    value = compute()
    with suppress(OSError):  # a cache that cannot be written costs time, not the result
        atomic_write_text(path, json.dumps(value))
    return value


class IntegrityError(ValueError):
    """A file oodlab wrote is unreadable, lacks its checksum, or was altered since it was written."""


def save_checked(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` as safetensors whose metadata holds their SHA-256 (and ``meta``), atomically."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_safetensors(tmp, tensors, {**(meta or {}), "sha256": tensors_sha256(tensors)})
    return Path(path)


def load_checked(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a file written by :func:`save_checked`; :class:`IntegrityError` (one line) when it is
    unreadable, has no checksum, or was altered."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise IntegrityError(f"{path} is unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") \
            from None
    if "sha256" not in meta:
        raise IntegrityError(f"{path}: no checksum")
    if meta["sha256"] != tensors_sha256(tensors):
        raise IntegrityError(f"{path}: checksum mismatch (altered file)")
    return tensors, meta


def available_memory() -> int:
    """Bytes of memory free for new allocations (Linux ``MemAvailable``; else free physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


_LIBC: Any = None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    Tensors below glibc's adaptive mmap threshold (up to 32 MiB) live on the heap, and a loop that frees
    and re-allocates them in varying sizes leaves free pages scattered through it that still count as
    resident: a flow step at 2048 dimensions ratchets the resident size up by ~0.5 GB a step without it.
    """
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            _LIBC = libc if libc is not None and hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
