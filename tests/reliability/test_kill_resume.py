"""kill -9 in the middle of `oodlab train`, then the same command: the final weights equal an uninterrupted run's."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from helpers import make_tiny_suite, subprocess_env
from oodlab.cli import main
from oodlab.data import suites

TESTS = Path(__file__).resolve().parents[1]
DRIVER = ("import sys; sys.path.insert(0, {tests!r}); from helpers import make_tiny_suite; "
          "from oodlab.data import suites; suites.SUITES['tiny'] = lambda data_root=None: make_tiny_suite(); "
          "from oodlab.cli import main; sys.exit(main({args!r}))")


def test_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["train", "--suite", "tiny", "--epochs", "6", "--batch-size", "8", "--device", "cpu"]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess runs on 1 thread: the same summation order
    try:
        assert main([*args, "--out", str(tmp_path / "clean")]) == 0
        run = tmp_path / "killed"
        code = DRIVER.format(tests=str(TESTS), args=[*args, "--out", str(run)])
        proc = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env())
        deadline = time.time() + 300
        while not (run / "epoch-003.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (run / "epoch-006.json").exists(), "the run finished before it could be killed"
        assert main([*args, "--out", str(run)]) == 0  # the same command resumes
    finally:
        torch.set_num_threads(threads)
    clean, resumed = load_file(str(tmp_path / "clean" / "last.safetensors")), load_file(str(run / "last.safetensors"))
    assert clean.keys() == resumed.keys() and all(torch.equal(clean[k], resumed[k]) for k in clean)
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    """A writer killed between writing its temporary file and the rename leaves it behind; the next write of that
    file removes it. Temporary files of live writers, and of writers on other machines, are left alone."""
    target = tmp_path / "state.safetensors"
    code = ("import sys, time; from oodlab.runtime import atomic_path\n"
            f"with atomic_path({str(target)!r}) as tmp:\n"
            "    tmp.write_bytes(b'half'); print(tmp, flush=True); time.sleep(600)")
    killed = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        stale, busy = Path(killed.stdout.readline().strip()), Path(live.stdout.readline().strip())
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        foreign = stale.with_name(".state.999999-1-elsewhere.tmp.safetensors")  # a dead pid, on another machine
        foreign.write_bytes(b"another machine's write in progress")
        assert stale.exists() and busy.exists() and foreign.exists()
        from oodlab.runtime import atomic_write_text

        atomic_write_text(target, "whole")
        assert not stale.exists() and busy.exists() and foreign.exists() and target.read_text() == "whole"
    finally:
        live.kill()
        live.wait()
