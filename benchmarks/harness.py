"""The benchmarks' shared harness: the common flags, thread settings, timing with repeats, child processes, the
default model, result rows, markdown tables, and the sections of docs/results.md.

Each script in benchmarks/ holds only what it measures and calls :func:`write_section` with its markdown;
the section (with its command, date and machine) lands in ``docs/results/<name>.md`` and docs/results.md is
rebuilt from all sections, so no number in it is typed by hand. Run this file alone to rebuild without
re-measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from unittest import mock

if TYPE_CHECKING:
    from oodlab.data import ImageSet, Suite
    from oodlab.features import FeatureCache, Features
    from oodlab.models import Classifier

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ROOT / "docs" / "results"
ORDER = ["bench", "guard", "input_pipeline", "train_loop", "detectors", "crosscheck", "crosscheck_openood", "crosscheck_openood_resnet18", "search", "sweep", "intervals", "extraction",
         "flow", "train_outliers", "unleashing_mask", "claims", "reliability", "scale"]
PYOOD_VERSION = "0.4.0"  # the pytorch-ood release the benchmarks compare against


# -- arguments and threads ---------------------------------------------------------------------------
def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser(doc: str, *, threads: int | None = None, repeats: int | None = None, suite: str | None = None,
           write: bool = True) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with the flags benchmarks share: ``--no-write`` (alias
    ``--no-doc``) unless ``write`` is False, and ``--threads``, ``--repeats``, ``--suite`` where given a default."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if write:
        ap.add_argument("--no-write", "--no-doc", dest="no_write", action="store_true",
                        help="print only; leave docs/results alone")
    if threads is not None:
        ap.add_argument("--threads", type=_count, default=threads, help="CPU threads (torch, faiss, OpenMP)")
    if repeats is not None:
        ap.add_argument("--repeats", type=_count, default=repeats, help="timed runs of each measurement")
    if suite is not None:
        ap.add_argument("--suite", default=suite, help="an oodlab suite name or a suite .toml file")
    return ap


def threads(n: int) -> None:
    """Pin torch, faiss and (for processes started after this) OpenMP to ``n`` threads: on a loaded 2-core
    machine their defaults can stall."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(n)


def child_env(threads: int | None = None, path: Path | None = None, **extra: str) -> dict[str, str]:
    """``os.environ`` for a child process: oodlab quiet, ``threads`` OpenMP / MKL / OpenBLAS threads, ``path``
    first on ``PYTHONPATH`` (the tree whose oodlab the child imports), then ``extra`` (e.g. ``OODLAB_CACHE``)."""
    env = {**os.environ, "OODLAB_QUIET": "1"}
    if threads is not None:
        env.update(dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), str(threads)))
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), os.environ.get("PYTHONPATH")) if p)
    return {**env, **extra}


@contextmanager
def feature_cache(path: Path) -> Iterator[None]:
    """oodlab's feature cache (``OODLAB_CACHE``) at ``path`` inside the block."""
    with mock.patch.dict(os.environ, OODLAB_CACHE=str(path)):
        yield


# -- timing ------------------------------------------------------------------------------------------
def interleaved(*fns: Callable[[], object], repeats: int, warmup: int = 0) -> list[list[float]]:
    """Wall-clock seconds of each of ``fns`` over ``repeats`` rounds, one call of each per round in turn (so that
    the load of a shared machine hits all alike), after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    runs: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seconds in zip(fns, runs):
            t0 = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t0)
    return runs


def timed(fn: Callable[[], object], repeats: int = 5) -> tuple[float, float]:
    """(median, half the inter-quartile range) of ``repeats`` wall-clock runs of ``fn``, in seconds."""
    runs = interleaved(fn, repeats=repeats)[0]
    q = statistics.quantiles(runs, n=4) if len(runs) > 1 else [runs[0]] * 3
    return statistics.median(runs), (q[2] - q[0]) / 2


def run_timed(cmd: Sequence[str], **kwargs: Any) -> tuple[subprocess.CompletedProcess, float]:
    """``subprocess.run(cmd, check=True, **kwargs)`` and its wall-clock seconds."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, **kwargs)
    return done, time.perf_counter() - t0


# -- what is measured on -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DefaultModel:
    """A suite's default model (shipped, or trained on first use) and oodlab's feature cache."""

    suite: Suite
    checkpoint: Path
    model: Classifier
    meta: dict[str, Any]
    model_id: str  # the checkpoint's fingerprint
    cache: FeatureCache

    def features(self, data: ImageSet) -> Features:
        """``data``'s features through the model, from the cache (extracted on a miss)."""
        return self.cache.get(self.model, self.model_id, data)


def default_model(suite: str | Suite) -> DefaultModel:
    """The default model of ``suite`` (a name, a suite .toml file or a :class:`Suite`)."""
    from oodlab.data import load_suite
    from oodlab.features import FeatureCache
    from oodlab.models import checkpoint_fingerprint, load_checkpoint
    from oodlab.training.recipes import default_checkpoint

    suite = load_suite(suite) if isinstance(suite, str) else suite
    ckpt = default_checkpoint(suite)
    model, meta = load_checkpoint(ckpt)
    return DefaultModel(suite, ckpt, model, meta, checkpoint_fingerprint(ckpt), FeatureCache())


def pytorch_ood() -> ModuleType:
    """pytorch-ood :data:`PYOOD_VERSION` (the peer; used only in benchmarks/), or exit saying how to install it."""
    script = f"benchmarks/{Path(sys.argv[0]).name}"
    try:
        import pytorch_ood as po
    except ImportError:
        sys.exit(f"{script} needs pytorch-ood=={PYOOD_VERSION}, which is not installed: "
                 f"pip install 'pytorch-ood=={PYOOD_VERSION}' (or the bench extra: pip install -e '.[bench]'; "
                 "add --no-deps if it would replace your torch)")
    if po.__version__ != PYOOD_VERSION:
        sys.exit(f"{script} compares against pytorch-ood {PYOOD_VERSION}, found "
                 f"{po.__version__}: pip install 'pytorch-ood=={PYOOD_VERSION}'")
    return po


def commit() -> str | None:
    """This checkout's short commit, marked when oodlab/ has uncommitted changes; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "oodlab"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (" with uncommitted changes in oodlab/" if dirty else "")


def machine() -> str:
    """A one-line description of the machine a number was measured on."""
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    try:
        ram = f", {int(Path('/proc/meminfo').read_text().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, IndexError, ValueError):
        ram = ""
    return (f"{platform.machine()}, {os.cpu_count()} cores{ram}, {dev}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


# -- results: rows, tables, sections -----------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of a JSONL file, one per line (none when the file does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and close the file (the row is on disk even if the next run is interrupted)."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def mean_sd(values: Sequence[float], scale: float = 100) -> str:
    """``mean ± sd`` of ``values`` times ``scale``, 2 decimals (just the mean for one value)."""
    text = f"{scale * statistics.mean(values):.2f}"
    return text + (f" ± {scale * statistics.stdev(values):.2f}" if len(values) > 1 else "")


def escape(text: str) -> str:
    """``text`` for a markdown table cell: its pipes escaped."""
    return text.replace("|", "\\|")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def write_section(name: str, title: str, body: str, *, command: str | None = None) -> Path:
    """Write one section (its command, date and machine, then ``body``) and rebuild docs/results.md. The command
    defaults to the one that ran this script (``python benchmarks/<script> <its arguments>``)."""
    command = command or shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    SECTIONS.mkdir(parents=True, exist_ok=True)
    text = (f"## {title}\n\nCommand: `{command}`  \nMeasured: {time.strftime('%Y-%m-%d')} on {machine()}\n\n"
            f"{body.strip()}\n")
    path = SECTIONS / f"{name}.md"
    path.write_text(text)
    build()
    return path


def build() -> None:
    """Rebuild docs/results.md from every section in docs/results/, in :data:`ORDER`."""
    parts = sorted(SECTIONS.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    head = ("# Results of record\n\nGenerated by the scripts in `benchmarks/` (each section names its command); "
            "do not edit by hand. Metrics in %, ID = positive class, FPR95 = OOD accepted at 95% ID TPR.\n\n")
    (ROOT / "docs" / "results.md").write_text(head + "\n".join(p.read_text() for p in parts))


if __name__ == "__main__":
    build()
