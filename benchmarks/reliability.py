"""Every way a user can break a run, tried for real: the one line they see, the exit code, and what is lost.

    python benchmarks/reliability.py [--no-doc]

Builds a small suite of your-own-data folders (28x28 PNGs, a suite TOML file) and trains a checkpoint on it
with ``oodlab train``, all in a temporary folder, then runs each case: damaged and edited files, bad numbers
on the command line and at the Python API, images the model cannot take, an altered feature cache, a
truncated results.jsonl, ``kill -9`` during training and during each stage of ``oodlab bench``, and two
benches sharing one cache and one results folder. Command-line cases call ``oodlab``'s entry point and
record what it prints on stderr and its exit code; API cases record the exception; kills run in a
subprocess, are killed at a chosen point (a wrapper in this script's driver waits there) and the same
command is run again. "Data lost" is checked, not assumed: rows, scores and weights are compared with an
uninterrupted run's. Prints a markdown table and writes the "reliability" section of docs/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from results_doc import ROOT, write_section

os.environ.setdefault("OODLAB_QUIET", "1")
os.environ.setdefault("OODLAB_WORKERS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from oodlab.specs import RunSpec
from oodlab.bench import load_rows, load_scores  # noqa: E402
from oodlab.cli import main  # noqa: E402

VOLATILE = ("fit_s", "score_s", "fit_cached")
DRIVER = """
import sys, time
from pathlib import Path

def pause():
    Path({marker!r}).write_text("reached")
    time.sleep(600)

def on_call(owner, attr, n):
    orig, calls = getattr(owner, attr), [0]
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            pause()
        return orig(*args, **kwargs)
    setattr(owner, attr, wrapped)

{patch}
from oodlab.cli import main
sys.exit(main({args!r}))
"""


class Lab:
    """The temporary folder, the suite file and the trained checkpoint every case starts from."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        g = np.random.default_rng(0)
        for split, n in (("train", 32), ("test", 12)):
            for c, cls in enumerate(("circle", "square", "bar")):
                folder = self.data / split / cls
                folder.mkdir(parents=True)
                for i in range(n):
                    img = g.integers(0, 40, (28, 28), dtype=np.uint8)
                    r, q = divmod(c, 2)
                    img[r * 14 + 2: r * 14 + 12, q * 14 + 2: q * 14 + 12] = 230
                    Image.fromarray(img).save(folder / f"{i:03d}.png")
        stripes = np.tile((np.arange(28) % 3 == 0)[:, None] * 200, (1, 28)).astype(np.uint8)
        for name, make in (("noise", lambda: g.integers(0, 256, (28, 28), dtype=np.uint8)), ("stripes", lambda: stripes)):
            (self.data / name).mkdir()
            for i in range(24):
                Image.fromarray(make()).save(self.data / name / f"{i:03d}.png")
        self.suite = root / "suite.toml"
        self.suite.write_text(f'name = "shapes"\nroot = {str(self.data)!r}\n\n[id]\ntrain = "train"\ntest = "test"\n\n'
                              '[ood.near]\nstripes = "stripes"\n\n[ood.far]\nnoise = "noise"\n')
        self.run_dir = root / "train-run"
        assert _cli(["train", "--suite", str(self.suite), "--arch", "smallcnn", "--epochs", "1", "--batch-size", "16",
                     "--no-augment", "--device", "cpu", "--out", str(self.run_dir)])[1] == 0
        self.ckpt = self.run_dir / "last.safetensors"
        self.images = root / "to-score"
        self.images.mkdir()
        for i in range(4):
            Image.fromarray(g.integers(0, 256, (28, 28), dtype=np.uint8)).save(self.images / f"img{i}.png")
        self.n = 0

    def fresh(self, name: str) -> Path:
        """A new empty folder for one case (and its own feature cache)."""
        self.n += 1
        path = self.root / f"case{self.n:02d}-{name}"
        path.mkdir()
        os.environ["OODLAB_CACHE"] = str(path / "cache")
        return path

    def copy_ckpt(self, dest: Path) -> Path:
        for suffix in (".safetensors", ".json"):
            dest.with_suffix(suffix).write_bytes(self.ckpt.with_suffix(suffix).read_bytes())
        return dest.with_suffix(".safetensors")

    def bench_args(self, out: Path, ckpt: Path | None = None, *extra: str) -> list[str]:
        return ["bench", "--suite", str(self.suite), "--checkpoint", str(ckpt or self.ckpt), "--detectors",
                "energy,knn,flow", "--param", "knn.k=5", "--param", "flow.batch_size=16", "--batch-size", "16",
                "--device", "cpu", "--out", str(out), *extra]


def _cli(argv: list[str]) -> tuple[str, int]:
    """Run ``oodlab ARGV`` in this process: (everything written to stderr, Python's and C libraries', exit code)."""
    with tempfile.TemporaryFile() as f:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return f.read().decode(errors="replace"), code


def _api(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the point is to show what the user gets
        return f"{type(exc).__name__}: {exc}"
    return "(no error)"


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _same_results(a: Path, b: Path) -> bool:
    ra, rb = load_rows(a), load_rows(b)
    if _strip(ra) != _strip(rb) or not ra:
        return False
    for key in {r["key"] for r in ra}:
        sa, sb = load_scores(a, key), load_scores(b, key)
        if sa.keys() != sb.keys() or not all(np.array_equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def _env(cache: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OODLAB_CACHE": str(cache), "OODLAB_QUIET": "1", "OMP_NUM_THREADS": "1"}


def _subprocess(argv: list[str], cache: Path, patch: str = "", marker: Path | None = None) -> subprocess.Popen:
    code = DRIVER.format(marker=str(marker), patch=patch, args=argv)
    return subprocess.Popen([sys.executable, "-c", code], env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _complete(argv: list[str], cache: Path) -> tuple[str, int]:
    proc = _subprocess(argv, cache)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"oodlab {argv[0]} failed ({proc.returncode}): {err[-2000:]}")
    return err, proc.returncode


KILLED = "(killed: no message); the same command then resumes and runs to the end"


def _shell(code: int) -> str:
    """An exit status as a shell shows it (a process killed by signal N exits 128 + N)."""
    return f"{128 - code} (SIGKILL)" if code < 0 else str(code)


def _kill_at(argv: list[str], cache: Path, patch: str, marker: Path) -> int:
    proc = _subprocess(argv, cache, patch, marker)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    reached = marker.exists()
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if not reached:
        raise RuntimeError(f"the run never reached the kill point ({' '.join(argv[:1])}, {patch})")
    return proc.returncode


# -- the cases ---------------------------------------------------------------------------------------
Case = tuple[str, str, str, str]  # case, message, exit code, data lost


def cli_cases(lab: Lab) -> list[Case]:
    out: list[Case] = []

    def cli(name: str, argv: list[str], lost: str | Callable[[], str]) -> None:
        msg, code = _cli(argv)
        out.append((name, msg, str(code), lost() if callable(lost) else lost))

    d = lab.fresh("truncated-ckpt")
    ck = lab.copy_ckpt(d / "model")
    ck.write_bytes(ck.read_bytes()[:100])
    cli("`oodlab bench` with a truncated checkpoint", lab.bench_args(d / "out", ck),
        lambda: "none: nothing written" if not (d / "out").exists() else "an out folder was created")

    d = lab.fresh("ckpt-json-keys")
    ck = lab.copy_ckpt(d / "model")
    ck.with_suffix(".json").write_text(json.dumps({"arch": "smallcnn"}))
    cli("`oodlab bench`, checkpoint JSON missing keys", lab.bench_args(d / "out", ck), "none: nothing written")

    d = lab.fresh("ckpt-arch")
    ck = lab.copy_ckpt(d / "model")
    meta = json.loads(ck.with_suffix(".json").read_text())
    ck.with_suffix(".json").write_text(json.dumps({**meta, "arch": "resnet18-cifar", "in_channels": 3}))
    cli("`oodlab bench`, checkpoint of another architecture", lab.bench_args(d / "out", ck), "none: nothing written")

    d = lab.fresh("detector-files")
    det = d / "knn"
    assert _cli(["fit", "knn", "--suite", str(lab.suite), "--model", str(lab.ckpt), "--param", "k=5", "--out", str(det),
                 "--device", "cpu"])[1] == 0
    det_json = det.with_suffix(".json")
    info = json.loads(det_json.read_text())
    score = ["score", str(det), str(lab.images), "--model", str(lab.ckpt), "--out", str(d / "s.csv")]
    det_json.write_text(json.dumps({**info, "config": {**info["config"], "k": "five"}}))
    cli("`oodlab score`, detector JSON edited (`\"k\": \"five\"`)", score, "none: nothing written")
    det_json.write_text(json.dumps({**info, "config": {**info["config"], "fraction": [1]}}))
    cli("`oodlab score`, detector JSON edited (`\"fraction\": [1]`)", score, "none: nothing written")
    det_json.write_text(json.dumps(info))
    raw = det.with_suffix(".safetensors").read_bytes()
    det.with_suffix(".safetensors").write_bytes(raw[:50])
    cli("`oodlab score` with a truncated detector file", score, "none: nothing written")
    det.with_suffix(".safetensors").write_bytes(raw)
    bad = lab.images / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    try:
        def rows() -> str:
            lines = (d / "s.csv").read_text().splitlines()
            broken = [ln for ln in lines if ln.startswith(str(bad))]
            return (f"none: {len(lines) - 1} rows, the broken file's with an empty score and its error"
                    if len(lines) == 6 and broken and broken[0].split(",")[1] == "" else "rows missing")

        cli("`oodlab score`, a corrupt PNG in the folder", score, rows)
        cli("`oodlab score --strict`, a corrupt PNG in the folder", [*score, "--strict"], "none: nothing written")
    finally:
        bad.unlink()

    d = lab.fresh("train-state")
    run = d / "run"
    argv = ["train", "--suite", str(lab.suite), "--arch", "smallcnn", "--epochs", "1", "--batch-size", "16",
            "--no-augment", "--device", "cpu", "--out", str(run)]
    assert _cli(argv)[1] == 0

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"epoch": Evil()}, run / "train_state.pt")
    argv[argv.index("--epochs") + 1] = "2"
    cli("`oodlab train` resuming a malicious train_state.pt (pickle)", argv,
        lambda: "none: the finished epoch is kept; the pickle never runs" if not Path("pwned").exists()
        and (run / "epoch-001.safetensors").exists() else "the pickle ran")

    d = lab.fresh("numbers")
    train = ["train", "--suite", str(lab.suite), "--arch", "smallcnn", "--device", "cpu", "--out", str(d / "r")]
    for flag, value in (("--lr", "nan"), ("--lr", "-1"), ("--weight-decay", "inf"), ("--epochs", "0")):
        cli(f"`oodlab train {flag} {value}`", [*train, flag, value], "none: nothing written")
    for extra in (["--param", "knn.k=0"], ["--param", "knn.fraction=nan"], ["--param", "flow.lr=inf"],
                  ["--param", "knn.k=[5]"], ["--batch-size", "0"], ["--fit-subset", "0"]):
        cli(f"`oodlab bench {' '.join(extra)}`", lab.bench_args(d / "out", None, *extra),  # the last flag wins
            lambda: "none: nothing written" if not (d / "out").exists() else "an out folder was created")
    cli("`oodlab bench --detectors energy,mahalanobis++`",
        ["bench", "--suite", str(lab.suite), "--model", str(lab.ckpt), "--detectors", "energy,mahalanobis++",
         "--out", str(d / "out")], "none: nothing written")

    # an altered feature cache entry: the next bench rebuilds it (one warning) and gets the same rows
    d = lab.fresh("cache")
    bench = lambda o: ["bench", "--suite", str(lab.suite), "--model", str(lab.ckpt), "--detectors",  # noqa: E731
                       "energy,knn", "--param", "knn.k=5", "--device", "cpu", "--out", str(d / o)]
    assert _cli(bench("first"))[1] == 0
    test_features = [f for f in (d / "cache").rglob("id-test*/shard-*.safetensors")]
    fitted = list((d / "cache" / "detectors").iterdir())
    for entry in [*test_features, *fitted]:
        raw = bytearray(entry.read_bytes())
        raw[-3] ^= 0x01
        entry.write_bytes(bytes(raw))
    cli("cache entries altered on disk (one byte in ID test's features and in knn's fitted state), "
        "`oodlab bench` again", bench("second"),
        lambda: "none: both recomputed; rows and scores equal" if _same_results(d / "first", d / "second")
        else "rows differ")

    # a truncated last line of results.jsonl: the same bench resumes and recomputes the cut row
    d = lab.fresh("jsonl")
    assert _cli(bench("clean"))[1] == 0
    assert _cli(bench("out"))[1] == 0
    jsonl = d / "out" / "results.jsonl"
    text = jsonl.read_text()
    jsonl.write_text(text[: len(text) - 40])
    cli("results.jsonl with its last line cut short, same `oodlab bench` again", bench("out"),
        lambda: "none: the cut row is recomputed; rows and scores equal" if _same_results(d / "clean", d / "out")
        else "rows differ")
    guard = ["guard", "build", "energy", "--suite", str(lab.suite), "--model", str(lab.ckpt), "--device", "cpu",
             "--out", str(d / "g")]
    for flag, value in (("--alpha", "nan"), ("--alpha", "1.5"), ("--tpr", "0")):
        cli(f"`oodlab guard build {flag} {value}`", [*guard, flag, value], "none: nothing written")
    return out


def api_cases(lab: Lab) -> list[Case]:
    from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
    from oodlab.detectors import create, load_detector
    from oodlab.features import Features, extract
    from oodlab.guard import Guard
    from oodlab.metrics import evaluate
    from oodlab.models import load_checkpoint
    from oodlab.models.loaders import load_model
    from oodlab.specs import resolve
    from oodlab.training import TrainConfig

    out: list[Case] = []
    api = "raises"

    def case(name: str, fn: Callable[[], object], lost: str = "none: refused before any work") -> None:
        out.append((name, _api(fn), api, lost))

    loaded, suite = resolve(RunSpec(str(lab.ckpt), data=str(lab.suite), device="cpu"))
    model = loaded.model
    train = extract(model, suite.id_train, device="cpu")
    test = extract(model, suite.id_test, device="cpu")
    nan_z = train.z.clone()
    nan_z[0, 0] = math.nan
    inf_logits = test.logits.clone()
    inf_logits[1, 0] = math.inf

    def images(name: str, shape: tuple[int, ...]) -> ImageSet:
        x = torch.zeros(4, *shape, dtype=torch.uint8)
        return ImageSet(name, ArrayDataset(x), tensor_fingerprint(x))

    case("`create('react', percentile='high')`", lambda: create("react", percentile="high"))
    case("`create('knn', k=0)`", lambda: create("knn", k=0))
    case("`create('odin', temperature=float('nan'))`", lambda: create("odin", temperature=math.nan))
    case("`create('flow', kind='nvp')`", lambda: create("flow", kind="nvp"))
    case("`Features(numpy_array, logits)`", lambda: Features(train.z.numpy(), train.logits))
    case("`Features(z, logits)` with different N", lambda: Features(train.z, test.logits))
    case("`create('knn').fit(train)`, NaN in z", lambda: create("knn", k=5).fit(Features(nan_z, train.logits,
                                                                                          train.labels), model.head))
    case("`det.score(feats)`, inf in logits", lambda: create("energy").fit(None, model.head).score(
        Features(test.z, inf_logits)))
    case("`det.fit(empty features)`", lambda: create("mahalanobis").fit(Features(train.z[:0], train.logits[:0]),
                                                                          model.head))
    case("`evaluate([0.9, nan], ood)`", lambda: evaluate([0.9, math.nan], [0.1]))
    case("`evaluate([], ood)`", lambda: evaluate([], [0.1]))
    case("`evaluate(logits, ood)` (2-D)", lambda: evaluate(test.logits, [0.1]))
    case("`extract(model, rgb images)`", lambda: extract(model, images("rgb-set", (3, 28, 28)), device="cpu"))
    case("`extract(model, 32x32 images)`", lambda: extract(model, images("cifar-set", (1, 32, 32)), device="cpu"))
    empty = ImageSet("empty-set", ArrayDataset(torch.zeros(0, 1, 28, 28, dtype=torch.uint8)), "0")
    case("`extract(model, empty set)`", lambda: extract(model, empty, device="cpu"))
    case("`TrainConfig(epochs=0)`", lambda: TrainConfig(epochs=0))
    case("`TrainConfig(momentum=1.5)`", lambda: TrainConfig(momentum=1.5))
    energy = create("energy").fit(None, model.head)
    case("`Guard(...).calibrate(scores, alpha=nan)`",
         lambda: Guard(model, energy, loaded.prep).calibrate(energy.score(test), alpha=math.nan))
    case("`Guard(model, detector, input_shape=(1, 28))`", lambda: Guard(model, energy, (1, 28)))

    d = lab.fresh("api-files")
    path = create("knn", k=5).fit(train, model.head).save(d / "knn")
    meta = path.with_suffix(".json")
    meta.write_text(json.dumps({"detector": "knn", "config": {"k": [5], "fraction": 1.0}}))
    case("`load_detector(file)`, JSON config edited (`\"k\": [5]`)", lambda: load_detector(path))
    ck = lab.copy_ckpt(d / "model")
    ck.with_suffix(".json").write_text(json.dumps({"arch": "resnet18-cifar", "num_classes": 3, "in_channels": 3}))
    case("`load_checkpoint(file)` of another architecture", lambda: load_checkpoint(ck))
    case("`load_model(file)` of another architecture", lambda: load_model(ck))

    return out


def kill_cases(lab: Lab) -> list[Case]:
    out: list[Case] = []
    # training: kill -9 after epoch 2 of 4 is saved
    d = lab.fresh("kill-train")
    argv = ["train", "--suite", str(lab.suite), "--arch", "smallcnn", "--epochs", "4", "--batch-size", "16",
            "--no-augment", "--device", "cpu"]
    _complete([*argv, "--out", str(d / "clean")], d / "cache")
    code = _kill_at([*argv, "--out", str(d / "run")], d / "cache",
                    "import oodlab.training.loop as loop; on_call(loop, 'save_checkpoint', 3)", d / "marker")
    err, again = _complete([*argv, "--out", str(d / "run")], d / "cache")
    from safetensors.torch import load_file

    a, b = load_file(str(d / "clean" / "last.safetensors")), load_file(str(d / "run" / "last.safetensors"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out.append(("`kill -9` during `oodlab train` (epoch 3 of 4), same command again",
                KILLED + (f"; the re-run prints: {err.strip()}" if err.strip() else ""), f"{_shell(code)} then {again}",
                "epoch 3's unsaved progress, recomputed: final weights equal an uninterrupted run's" if same
                else "final weights differ"))

    d = lab.fresh("kill-bench")
    _complete(lab.bench_args(d / "clean"), d / "clean-cache")
    points = [("feature extraction (batch 9 of 13)",
               "from oodlab.models.adapter import Classifier; on_call(Classifier, 'features', 9)",
               "the half-extracted data set, recomputed"),
              ("the flow's fit (step 4 of 6)", "import torch; on_call(torch.Tensor, 'backward', 4)",
               "the flow's partial fit (it has no resumable state), refitted from the start"),
              ("report writing (figure 3 of 4)", "import oodlab.bench.html as html; on_call(html, 'save_png', 3)",
               "none: only the report is redrawn")]
    for i, (where, patch, lost) in enumerate(points):
        o, cache = d / f"out{i}", d / f"cache{i}"
        code = _kill_at(lab.bench_args(o), cache, patch, d / f"marker{i}")
        err, again = _complete(lab.bench_args(o), cache)
        ok = _same_results(d / "clean", o) and (o / "report.html").is_file()
        out.append((f"`kill -9` during `oodlab bench` {where}, same command again",
                    KILLED + (f"; the re-run prints: {err.strip()}" if err.strip() else ""),
                    f"{_shell(code)} then {again}", f"{lost}; rows and scores equal an uninterrupted run's" if ok
                    else "rows or scores differ"))

    # two benches on one cache and one out folder at the same time
    procs = [_subprocess(lab.bench_args(d / "shared"), d / "shared-cache") for _ in range(2)]
    for p in procs:
        p.communicate(timeout=600)
    codes = [p.returncode for p in procs]
    leftovers = [p for p in d.rglob("*") if ".tmp" in p.name]
    ok = _same_results(d / "clean", d / "shared") and not leftovers
    out.append(("two `oodlab bench` at once on one cache and one out folder", "(no message)",
                " and ".join(map(str, codes)), "none: each row once, every cache entry whole" if ok else "rows differ"))
    return out


def _cell(text: str, root: Path) -> str:
    lines = [ln.strip() for ln in text.replace(str(root), "DIR").splitlines() if ln.strip()]
    return " / ".join(lines).replace("|", "\\|").replace("<", "&lt;") or "(nothing)"


def table(cases: list[Case], root: Path) -> str:
    rows = ["| case | message (what the user sees) | exit code | data lost |", "|---|---|---|---|"]
    rows += [f"| {c} | {_cell(m, root)} | {code} | {lost} |" for c, m, code, lost in cases]
    return "\n".join(rows)


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-doc", action="store_true", help="print the table only; leave docs/results.md alone")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        cwd = os.getcwd()
        os.chdir(root)
        try:
            lab = Lab(root)
            cases = cli_cases(lab) + api_cases(lab) + kill_cases(lab)
        finally:
            os.chdir(cwd)
        text = table(cases, root)
    seconds = time.perf_counter() - t0
    print(text)
    refused = [m for _, m, code, _ in cases if code == "2"]
    one_line = sum(1 for m in refused if m.count("\n") == 1)
    print(f"\n{len(cases)} cases in {seconds:.0f} s; {one_line} of the {len(refused)} refused commands (exit 2) print "
          "one line, the other prints the unreadable image's warnings first")
    if not args.no_doc:
        body = (f"{len(cases)} cases, each run for real in a temporary folder on a suite of 28x28 PNG folders (a suite "
                "TOML file) and a checkpoint trained on it; `DIR` stands for that folder. Command-line errors are "
                "one line on stderr with exit code 2 (`--debug` or `OODLAB_DEBUG=1` shows the traceback); API errors "
                "are one-line `ValueError`s (or subclasses). \"Data lost\" is checked against an uninterrupted run "
                "(rows, per-sample scores, final weights). The same cases are tests in `tests/reliability/`.\n\n"
                + text + f"\n\nAll cases: {seconds:.0f} s.")
        write_section("reliability", "Reliability: bad inputs, damaged files, kill -9, concurrent runs",
                      "python benchmarks/reliability.py", body)


if __name__ == "__main__":
    run()
