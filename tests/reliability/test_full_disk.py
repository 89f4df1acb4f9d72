"""A full disk under the cache, under ``--out`` and under a guard folder: one line, nothing half-written, the
finished shards and rows kept, and the same command resumes once there is room.

Each case runs twice: on a real size-limited file system (a tmpfs mounted in ``tmp_path``, where the test may
mount one; else injected as below), and with ENOSPC injected at the writers (safetensors, numpy, ``os.write``) for paths under that folder,
and free space is reported as what is left of the same budget.
"""

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_tiny_suite
from oodlab import runtime
from oodlab.cli import main

DETECTORS = "energy,knn,mahalanobis"


class SmallDisk:
    """A folder on a device with ``room`` bytes free (mounted tmpfs, or an injected budget)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, mount: bool) -> None:
        self.root, self.mp = root, monkeypatch
        root.mkdir()
        self.mounted = mount and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)],
                                                capture_output=True).returncode == 0
        self.budget = 8 << 20
        if not self.mounted:
            self._inject()

    def leave(self, room: int) -> None:
        """Fill the device so that about ``room`` bytes stay free."""
        filler = self.root / "filler"
        filler.unlink(missing_ok=True)
        if self.mounted:
            free = runtime.free_bytes(self.root)
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, free - room))
        else:
            self.budget = room + sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def _used(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def _inject(self) -> None:
        import safetensors.torch

        def inside(path) -> bool:
            return Path(path).absolute().is_relative_to(self.root.absolute())

        def full(path, size: int) -> None:
            if inside(path) and self._used() + size > self.budget:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        real_save, real_npz, real_write = safetensors.torch.save_file, np.savez_compressed, os.write

        def save_file(tensors, filename, metadata=None):
            full(filename, sum(t.numel() * t.element_size() for t in tensors.values()))
            return real_save(tensors, filename, metadata=metadata)

        def savez(file, **arrays):
            full(file, sum(a.nbytes for a in arrays.values()) // 2)
            return real_npz(file, **arrays)

        def write(fd, data):
            full(os.readlink(f"/proc/self/fd/{fd}"), len(data))
            return real_write(fd, data)

        free = runtime.free_bytes
        self.mp.setattr(safetensors.torch, "save_file", save_file)
        self.mp.setattr(np, "savez_compressed", savez)
        self.mp.setattr(os, "write", write)
        import oodlab.bench.api
        import oodlab.features.extraction

        for module in (runtime, oodlab.features.extraction, oodlab.bench.api):  # each names it on import
            self.mp.setattr(module, "free_bytes", lambda p: self.budget - self._used() if inside(p) else free(p))

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.root)], check=True)


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request, tmp_path, monkeypatch):
    d = SmallDisk(tmp_path / "disk", monkeypatch, mount=request.param == "tmpfs")
    yield d
    d.close()


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny suite registered as ``tiny``, a random smallcnn checkpoint, shards of 16 items, quiet bars."""
    from oodlab.data import suites
    from oodlab.models import build, save_checkpoint

    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite(n_train=90, n_test=45))
    monkeypatch.setenv("OODLAB_SHARD_ITEMS", "16")
    torch.manual_seed(0)
    meta = {"arch": "smallcnn", "num_classes": 3, "in_channels": 1, "suite": "tiny"}
    return save_checkpoint(build("smallcnn", 3, 1).eval(), tmp_path / "model", meta)


def _bench(ckpt: Path, out: Path, cache: Path, monkeypatch) -> int:
    monkeypatch.setenv("OODLAB_CACHE", str(cache))
    return main(["bench", "--suite", "tiny", "--model", str(ckpt), "--detectors", DETECTORS, "--out", str(out),
                 "--device", "cpu", "--batch-size", "8"])


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_cache_without_room_is_refused_before_any_forward_pass(disk, tiny, tmp_path, capsys, monkeypatch):
    from oodlab.features import extraction

    disk.leave(20_000)
    monkeypatch.setattr(extraction, "extract", lambda *a, **k: pytest.fail("extracted on a disk without room"))
    assert _bench(tiny, tmp_path / "out", disk.root / "cache", monkeypatch) == 2
    line = _one_line(capsys)
    assert line.startswith(f"oodlab bench: error: no space left on the device holding {disk.root}")
    assert "B are needed" in line and line.endswith("set OODLAB_CACHE to a folder on a disk with room")
    assert not (tmp_path / "out").exists() and not [p for p in disk.root.rglob("*") if p.is_file() and
                                                    p.name != "filler"]


def test_a_cache_that_fills_up_keeps_its_finished_shards_and_resumes(disk, tiny, tmp_path, capsys, monkeypatch):
    from oodlab.features import extraction

    monkeypatch.setattr(extraction, "free_bytes", lambda p: 1 << 40)  # the estimate is passed; the disk fills later
    disk.leave(60_000)
    cache = disk.root / "cache"
    assert _bench(tiny, tmp_path / "out", cache, monkeypatch) == 2
    line = _one_line(capsys)
    assert line.startswith(f"oodlab bench: error: no space left on the device holding {cache}/features/")
    assert "while writing shard-" in line and "nothing half-written was kept" in line
    shards = sorted(cache.rglob("shard-*.safetensors"))
    sidecars = sorted(cache.rglob("shard-*.json"))
    assert shards and [p.with_suffix(".json") for p in shards] == sidecars  # whole shards only
    assert not [p for p in cache.rglob(".*") if p.is_file()]  # no temporary file left
    kept = {p: p.stat().st_mtime_ns for p in shards}
    assert not (tmp_path / "out").exists()

    disk.leave(4 << 20)  # room again: the same command resumes
    assert _bench(tiny, tmp_path / "out", cache, monkeypatch) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished shards are not rewritten
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2


def test_an_out_folder_without_room_is_refused_before_any_work(disk, tiny, tmp_path, capsys, monkeypatch):
    disk.leave(50_000)
    assert _bench(tiny, disk.root / "out", tmp_path / "cache", monkeypatch) == 2
    line = _one_line(capsys)
    assert line.startswith(f"oodlab bench: error: no space left on the device holding {disk.root}")
    assert line.endswith("write to a folder on a disk with room")
    assert not (disk.root / "out").exists() and not (tmp_path / "cache").exists()


def test_an_out_folder_that_fills_up_keeps_whole_rows_and_resumes(disk, tiny, tmp_path, capsys, monkeypatch):
    import oodlab.bench.api as api

    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    assert _bench(tiny, reference, cache, monkeypatch) == 0
    capsys.readouterr()
    monkeypatch.setattr(api, "free_bytes", lambda p: 1 << 40)  # past the estimate: the disk fills during the run
    disk.leave(3_000)  # room for the first detector's scores, not for every file of the run
    out = disk.root / "out"
    assert _bench(tiny, out, cache, monkeypatch) == 2
    line = _one_line(capsys)
    assert line.startswith(f"oodlab bench: error: no space left on the device holding {out}")
    assert "nothing half-written was kept" in line
    text = (out / "results.jsonl").read_text() if (out / "results.jsonl").exists() else ""
    assert text == "" or text.endswith("\n")
    rows = [json.loads(x) for x in text.splitlines()]  # every line whole
    assert not [p for p in out.rglob(".*") if p.is_file()]

    disk.leave(4 << 20)
    assert _bench(tiny, out, cache, monkeypatch) == 0
    done = (out / "results.jsonl").read_text().splitlines()
    assert len(done) == 3 * 2 and [json.loads(x) for x in done[: len(rows)]] == rows
    ref = {(r["key"], r["ood"]): r["auroc"] for r in map(json.loads, (reference / "results.jsonl").read_text()
                                                         .splitlines())}
    assert {(r["key"], r["ood"]): r["auroc"] for r in map(json.loads, done)} == ref


def test_a_guard_folder_on_a_full_disk_is_not_left_half_written(disk, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OODLAB_CACHE", str(tmp_path / "cache"))
    disk.leave(2_000)
    before = _files(disk.root)
    assert main(["guard", "build", "energy", "--suite", "tiny", "--model", str(tiny), "--alpha", "0.2", "--out",
                 str(disk.root / "g"), "--device", "cpu"]) == 2
    line = _one_line(capsys)
    assert re.fullmatch(f"oodlab guard: error: no space left on the device holding {re.escape(str(disk.root))} "
                        r"\(\d+ kB free\) while writing g; nothing half-written was kept: free space there, or write "
                        "to a folder on a disk with room", line), line
    assert _files(disk.root) == before  # no folder, no temporary folder


def test_an_append_cut_short_by_a_full_disk_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n')
    real = os.write

    def half(fd, data):
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(runtime.DiskFullError, match="no space left on the device holding"):
        runtime.append_whole(path, '{"b": 2}\n{"c": 3}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"a": 1}\n'
