"""Outputs under a read-only folder: every command refuses in one line before any work and creates nothing.

The folder is a read-only tmpfs mounted in ``tmp_path`` where the test may mount one (root ignores permission
bits, not a read-only file system), else a folder without write permission.
"""

import errno
import subprocess

import pytest

from oodlab.cli import main
from oodlab.runtime import atomic_write_text


@pytest.fixture
def locked(tmp_path):
    root = tmp_path / "locked"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(root)],
                             capture_output=True).returncode == 0
    if not mounted:
        root.chmod(0o555)
    yield root
    if mounted:
        subprocess.run(["umount", str(root)], check=True)
    else:
        root.chmod(0o755)


@pytest.mark.parametrize("argv, out", [
    (["bench", "--detectors", "msp", "--out", "{d}/run"], "{d}/run"),
    (["train", "--epochs", "1", "--out", "{d}/run"], "{d}/run"),
    (["fit", "energy", "--out", "{d}/energy"], "{d}/energy"),
    (["score", "{d}/energy", "{d}", "--model", "default", "--out", "{d}/s.csv"], "{d}/s.csv"),
    (["guard", "build", "energy", "--alpha", "0.1", "--out", "{d}/g"], "{d}/g"),
    (["guard", "check", "{d}/g", "{d}", "--out", "{d}/flags.csv"], "{d}/flags.csv"),
    (["guard", "export", "{d}/g", "--out", "{d}/g.onnx"], "{d}/g.onnx"),
    (["report", "{d}", "--out", "{d}/side.html"], "{d}/side.html"),
], ids=lambda v: v[0] if isinstance(v, list) and v[0] != "guard" else None)
def test_an_output_under_a_read_only_folder_is_refused_in_one_line(argv, out, locked, capsys, monkeypatch):
    import oodlab.specs

    monkeypatch.setattr(oodlab.specs, "resolve_model", lambda *a, **k: pytest.fail("did work before the check"))
    d = str(locked)
    assert main([a.format(d=d) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"{out.format(d=d)}: {d} is read-only; choose a folder you can write "
                                             "to"), err
    assert list(locked.iterdir()) == []


def test_a_write_into_a_read_only_folder_through_the_api_is_one_line(locked):
    with pytest.raises(OSError) as info:
        atomic_write_text(locked / "notes.txt", "x")
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    assert str(locked / "notes.txt") in str(info.value) and "\n" not in str(info.value)
    assert list(locked.iterdir()) == []
