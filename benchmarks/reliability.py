"""Every way a user can break a run, tried for real: the one line they see, the exit code, and what is lost.

    python benchmarks/reliability.py [--no-write]

Builds a small suite of your-own-data folders (28x28 PNGs, a suite TOML file) and trains a checkpoint on it
with ``oodlab train``, all in a temporary folder, then runs each case: damaged and edited files, bad numbers
on the command line and at the Python API, images the model cannot take, an altered feature cache, a
truncated results.jsonl, ``kill -9`` during training and during each stage of ``oodlab bench``, two
benches sharing one cache and one results folder; then the newer surfaces: every image encoding and bit depth,
decompression bombs, edited guard folders, names that are paths, lists outside their root or in Latin-1,
outputs that are files, other people's folders, read-only or full file systems (small tmpfs mounts), cache keys
that metadata cannot fool, and a ``torchrun`` rank that fails. For those, any file created outside the case's
outputs and cache, or removed, is reported. Command-line cases call ``oodlab``'s entry point and
record what it prints on stderr and its exit code; API cases record the exception; kills run in a
subprocess, are killed at a chosen point (a wrapper in this script's driver waits there) and the same
command is run again. "Data lost" is checked, not assumed: rows, scores and weights are compared with an
uninterrupted run's. Prints a markdown table and writes the "reliability" section of docs/results.md.
"""

from __future__ import annotations

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

from harness import ROOT, child_env, escape, interleaved, parser, table, threads, write_section

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
                try:
                    code = main(argv)
                except SystemExit as exc:  # argparse's own refusal of a flag
                    code = exc.code
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


def _subprocess(argv: list[str], cache: Path, patch: str = "", marker: Path | None = None) -> subprocess.Popen:
    code = DRIVER.format(marker=str(marker), patch=patch, args=argv)
    return subprocess.Popen([sys.executable, "-c", code], env=child_env(1, ROOT, OODLAB_CACHE=str(cache)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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
              ("report writing (detector 3 of 3)", "import oodlab.bench.html as html; on_call(html, '_curves', 3)",
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


def _listing(root: Path, *keep: Path) -> set[str]:
    """Every file under ``root`` except those under ``keep`` (the outputs and caches a case may write)."""
    return {str(p) for p in root.rglob("*") if p.is_file() and not any(p.is_relative_to(k) for k in keep)}


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def _unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def surface_cases(lab: Lab) -> list[Case]:
    """The surfaces added for OpenOOD parity and own data: decoding, guard folders, names that are paths, output
    folders, full disks, cache keys, torchrun. "Data lost" also says whether any file appeared outside the case's
    outputs and cache, or any file that was there before went missing."""
    out: list[Case] = []

    def cli(name: str, argv: list[str], lost: str | Callable[[], str], d: Path, *keep: Path) -> None:
        before = _listing(lab.root, d / "cache", *keep)
        msg, code = _cli(argv)
        after = _listing(lab.root, d / "cache", *keep)
        verdict = lost() if callable(lost) else lost
        if after - before:
            verdict += f"; FILES OUTSIDE ITS OUTPUTS: {sorted(after - before)[:2]}"
        if before - after:
            verdict += f"; FILES REMOVED: {sorted(before - after)[:2]}"
        out.append((name, msg, str(code), verdict))

    g = np.random.default_rng(1)
    d = lab.fresh("decoding")
    det = d / "energy"
    assert _cli(["fit", "energy", "--suite", str(lab.suite), "--model", str(lab.ckpt), "--out", str(det),
                 "--device", "cpu"])[1] == 0
    imgs = d / "encodings"
    imgs.mkdir()
    base = g.integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(base).save(imgs / "a-8bit.png")
    Image.fromarray(base.astype(np.uint16) * 257).save(imgs / "b-16bit.png")
    Image.fromarray(base).convert("P").save(imgs / "c-palette.gif")
    Image.fromarray(base).save(imgs / "d-grey.webp", lossless=True)
    Image.fromarray(base).convert("LA").save(imgs / "e-grey-alpha.png")
    Image.fromarray(base).convert("CMYK").save(imgs / "f-cmyk.tiff")
    Image.fromarray(np.stack([base] * 3, -1)).save(imgs / "g-rgb.png")

    def scores(csv_file: Path, column: int = 1) -> dict[str, float]:
        rows = [ln.split(",") for ln in csv_file.read_text().splitlines()[1:]]
        return {Path(r[0]).name: float(r[column]) if r[column] else math.nan for r in rows}

    def same_scores(csv_file: Path, column: int = 1) -> str:
        sc = scores(csv_file, column)
        gap16 = abs(sc["b-16bit.png"] - sc["a-8bit.png"])
        worst = max(abs(v - sc["a-8bit.png"]) for v in sc.values())
        return (f"none: {len(sc)} of 7 scored; 16-bit PNG = its 8-bit twin (|diff| {gap16:.1e}); every encoding within "
                f"{worst:.2g} of it")

    cli("`oodlab score` on one picture as 8-bit, 16-bit, palette GIF, grey WebP, grey+alpha, CMYK TIFF, RGB",
        ["score", str(det), str(imgs), "--model", str(lab.ckpt), "--out", str(d / "s.csv"), "--device", "cpu"],
        lambda: same_scores(d / "s.csv"), d, d / "s.csv")
    guard = d / "guard"
    assert _cli(["guard", "build", "energy", "--suite", str(lab.suite), "--model", str(lab.ckpt), "--alpha", "0.2",
                 "--out", str(guard), "--device", "cpu"])[1] == 0
    cli("`oodlab guard check` on the same mixed-encoding folder",
        ["guard", "check", str(guard), str(imgs), "--out", str(d / "flags.csv"), "--device", "cpu"],
        lambda: same_scores(d / "flags.csv", 2), d, d / "flags.csv")
    bomb = d / "bomb"
    bomb.mkdir()
    Image.new("L", (20000, 20000)).save(bomb / "huge.png", optimize=False)
    Image.fromarray(base).save(bomb / "fine.png")
    t0 = time.perf_counter()

    def bomb_rows() -> str:
        rows = (d / "b.csv").read_text().splitlines()
        huge = next(r for r in rows if "huge.png" in r)
        return (f"none: the fine image scored, the 400 Mpixel one in its error row, never decoded "
                f"({time.perf_counter() - t0:.2f} s in all)" if len(rows) == 3 and "over the limit" in huge
                else "not refused")

    cli("`oodlab score`, a 20000 x 20000 PNG (decompression bomb) beside a normal image",
        ["score", str(det), str(bomb), "--model", str(lab.ckpt), "--out", str(d / "b.csv"), "--device", "cpu"],
        bomb_rows, d, d / "b.csv")

    # guard folders
    d = lab.fresh("guard-folder")
    g1 = d / "g"
    assert _cli(["guard", "build", "energy", "--suite", str(lab.suite), "--model", str(lab.ckpt), "--alpha", "0.2",
                 "--out", str(g1), "--device", "cpu"])[1] == 0
    info = json.loads((g1 / "guard.json").read_text())
    check = ["guard", "check", str(g1), str(lab.images), "--out", str(d / "f.csv"), "--device", "cpu"]
    (g1 / "guard.json").write_text(json.dumps({**info, "k": 0}))
    cli("`guard.json` edited (`k` set to 0), `oodlab guard check`", check, "none: nothing written", d)
    (g1 / "guard.json").write_text(json.dumps({k: v for k, v in {**info, "k": 10**9}.items() if k != "sha256"}))
    cli("`guard.json` edited (`k` = 10^9, its checksum removed), `oodlab guard check`", check, "none: nothing written", d)
    (g1 / "guard.json").write_text(json.dumps(info))
    cli("`oodlab guard check --out` naming a folder", [*check[:-4], "--out", str(d), "--device", "cpu"],
        "none: nothing written", d)
    mine = d / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    build = ["guard", "build", "energy", "--suite", str(lab.suite), "--model", str(lab.ckpt), "--alpha", "0.2",
             "--device", "cpu", "--out"]
    cli("`oodlab guard build --out` a folder of the user's files", [*build, str(mine)],
        lambda: "none: notes.txt kept" if (mine / "notes.txt").read_text() == "keep me" else "notes.txt lost", d)
    (d / "a-file").write_text("data")
    cli("`oodlab guard build --out` an existing file", [*build, str(d / "a-file")],
        lambda: "none: the file kept, no hidden copy" if (d / "a-file").read_text() == "data"
        and not list(d.glob(".a-file*")) else "the file was moved", d)
    t0 = time.perf_counter()
    cli("`oodlab guard build --alpha 1.5` (checked before any work)", [*build, str(d / "g2"), "--alpha", "1.5"],
        lambda: f"none: refused after {time.perf_counter() - t0:.2f} s, nothing written", d)
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), d / "r18.pth")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        ok = _cli(["guard", "build", "energy", "--suite", str(lab.suite), "--model", "torchvision:resnet18", "--weights",
                   "r18.pth", "--alpha", "0.2", "--out", "rel", "--device", "cpu"])[1] == 0
    finally:
        os.chdir(cwd)
    (d / "elsewhere").mkdir()
    os.chdir(d / "elsewhere")
    try:
        cli("a guard built with `--weights r18.pth` (relative), checked from another folder",
            ["guard", "check", str(d / "rel"), str(lab.images), "--out", "flags.csv", "--device", "cpu"],
            lambda: "none: all 4 images checked" if ok and len((d / "elsewhere" / "flags.csv").read_text()
                                                             .splitlines()) == 5 else "failed", d, d / "elsewhere")
    finally:
        os.chdir(cwd)

    # names that are paths, lists outside their root
    d = lab.fresh("names")
    for name in ("../../escaped", "id"):
        toml = d / f"suite-{len(out)}.toml"
        toml.write_text(f'root = {str(lab.data)!r}\n[id]\ntrain = "train"\ntest = "test"\n[ood.far]\n"{name}" = "noise"\n')
        cli(f"an OOD set named `{name}` in a suite file, `oodlab bench`",
            ["bench", "--suite", str(toml), "--model", str(lab.ckpt), "--detectors", "energy", "--out", str(d / "o")],
            lambda: "none: nothing written" if not (d / "o").exists() and not (lab.root.parent / "escaped").exists()
            else "files written", d)
    (d / "lists").mkdir()
    (d / "imgs").mkdir()
    for i in range(2):
        (d / "imgs" / f"{i}.png").write_bytes((lab.data / "noise" / f"{i:03d}.png").read_bytes())
    (d / "lists" / "ood.txt").write_text("imgs/0.png 0\n/etc/passwd 0\n")
    for allow in ("", "allow_outside_root = true\n"):
        toml = d / f"list-suite-{len(out)}.toml"
        toml.write_text(f'{allow}root = {str(d)!r}\n[id]\ntrain = {str(lab.data / "train")!r}\ntest = '
                        f'{str(lab.data / "test")!r}\n[ood.far]\nmine = "lists/ood.txt"\n')
        cli(f"an image list naming `/etc/passwd` (absolute, outside its root){' with allow_outside_root' if allow else ''}"
            ", `oodlab bench`",
            ["bench", "--suite", str(toml), "--model", str(lab.ckpt), "--detectors", "energy", "--out",
             str(d / f"o{len(out)}")],
            "none: nothing written" if not allow else "none: the user allowed it; /etc/passwd is an unreadable image "
            "(its error row), the other image is scored", d, d / f"o{len(out)}")
    latin = d / "lists" / "latin.txt"
    latin.write_bytes(b"noise/000.png 0\nnoise/f\xfcr.png 0\n")
    dup = d / "lists" / "dup.txt"
    dup.write_text("noise/000.png 0\nnoise/000.png 0\nnoise/001.png 0\n")
    huge = d / "lists" / "huge.txt"
    huge.write_text("noise/000.png 99999999999999999999999\n")
    for what, lst in (("in Latin-1", latin), ("listing one image twice", dup), ("with a label too large for int64", huge)):
        toml = d / f"enc-{len(out)}.toml"
        toml.write_text(f'root = {str(lab.data)!r}\n[id]\ntrain = "train"\ntest = "test"\n[ood.far]\nmine = '
                        f'{{ list = {str(lst)!r} }}\n')
        o = d / f"o{len(out)}"
        cli(f"an image list {what}, `oodlab bench`",
            ["bench", "--suite", str(toml), "--model", str(lab.ckpt), "--detectors", "energy", "--out", str(o)],
            "none: nothing written" if lst != dup else "none: the run goes on (rows for the 3 entries)", d, o)

    # output folders
    d = lab.fresh("outputs")
    (d / "afile").write_text("mine")
    cli("`oodlab bench --out` an existing file", lab.bench_args(d / "afile"),
        lambda: "none: the file kept" if (d / "afile").read_text() == "mine" else "the file changed", d)
    (d / "user").mkdir()
    (d / "user" / "notes.txt").write_text("my notes")
    cli("`oodlab bench --out` a folder of the user's files", lab.bench_args(d / "user"),
        lambda: "none: notes.txt kept" if (d / "user" / "notes.txt").read_text() == "my notes" else "lost", d)
    ro = d / "read-only"
    if _mount(ro, "size=1m,ro"):
        try:
            for name, argv in (("oodlab bench --out", lab.bench_args(ro / "run")),
                               ("oodlab guard export --out", ["guard", "export", str(d / "g"), "--out", str(ro / "g.onnx")]),
                               ("oodlab train --out", ["train", "--suite", str(lab.suite), "--epochs", "1", "--out",
                                                       str(ro / "t")])):
                cli(f"`{name}` under a read-only file system", argv, "none: nothing written", d)
        finally:
            _unmount(ro)
    small = d / "small-disk"
    if _mount(small, "size=64k"):
        try:
            os.environ["OODLAB_CACHE"] = str(small / "cache")
            cli("`oodlab bench` with its feature cache on a full disk (64 KiB)", lab.bench_args(d / "o-cache"),
                lambda: f"none: the set that did not fit was refused before its forward pass; "
                f"{len(list(small.rglob('shard-*.json')))} finished shards kept, nothing in --out"
                if not (d / "o-cache").exists() and not [p for p in small.rglob(".*") if p.is_file()]
                else "files written", d, small)
            os.environ["OODLAB_CACHE"] = str(d / "cache")
            cli("`oodlab bench --out` on a full disk (64 KiB)", lab.bench_args(small / "o"),
                lambda: "none: refused before any work" if not (small / "o").exists() else "files written", d, small)
            import oodlab.bench.api as bench_api

            real = bench_api.free_bytes
            bench_api.free_bytes = lambda p: 1 << 40  # past the estimate: the disk fills during the run
            try:
                cli("`oodlab bench --out` on a disk that fills during the run (64 KiB)", lab.bench_args(small / "o2"),
                    lambda: "none: only whole rows and whole score files were written; the same command resumes"
                    if all(ln.endswith("}") for ln in ((small / "o2" / "results.jsonl").read_text().splitlines()
                                                       if (small / "o2" / "results.jsonl").exists() else []))
                    and not [p for p in small.rglob(".*") if p.is_file()] else "half-written files", d, small)
            finally:
                bench_api.free_bytes = real
            cli("`oodlab guard build --out` on a full disk (64 KiB)", [*build, str(small / "g")],
                lambda: "none: no folder, no temporary folder" if not [p for p in small.iterdir() if p.name == "g" or
                                                                       p.name.startswith(".g.")] else "files left",
                d, small)
        finally:
            _unmount(small)

    # cache keys, symlinks, cheap checks
    d = lab.fresh("cache-keys")
    a, b = d / "a", d / "b"
    for folder, value in ((a, 10), (b, 200)):
        folder.mkdir()
        for i in range(4):
            Image.new("L", (28, 28), value + i).save(folder / f"x{i}.png")
            os.utime(folder / f"x{i}.png", ns=(10**18, 10**18))
    det = d / "energy"
    assert _cli(["fit", "energy", "--suite", str(lab.suite), "--model", str(lab.ckpt), "--out", str(det),
                 "--device", "cpu"])[1] == 0
    score = lambda folder, csv_name: ["score", str(det), str(folder), "--model", str(lab.ckpt), "--out",  # noqa: E731
                                      str(d / csv_name), "--device", "cpu"]
    assert _cli(score(a, "a.csv"))[1] == 0
    cli("two folders with the same file names, sizes and mtimes but other pixels, scored one after the other",
        score(b, "b.csv"), lambda: "none: each its own cache entry (inode and ctime in the key); scores differ"
        if sorted(scores(d / "a.csv").values()) != sorted(scores(d / "b.csv").values()) else "the entry was shared",
        d, d / "a.csv", d / "b.csv")
    top = d / "top"
    top.mkdir()
    for i in range(5):
        Image.new("L", (28, 28), 20 * i).save(top / f"t{i}.png")
    (d / "real").mkdir()
    for i in range(5):
        Image.new("L", (28, 28), 20 * i + 5).save(d / "real" / f"r{i}.png")
    os.symlink(d / "real", top / "linked")
    cli("`oodlab score` on a folder with a symlinked sub-folder", score(top, "top.csv"),
        lambda: f"none: {len(scores(d / 'top.csv'))} of 10 reachable images scored", d, d / "top.csv")
    cli("`oodlab train --fit-subset 0`", ["train", "--suite", str(lab.suite), "--fit-subset", "0", "--out",
                                          str(d / "t")], "none: nothing written", d)
    (d / "same").mkdir()
    for p in (lab.data / "test" / "bar").iterdir():
        (d / "same" / p.name).write_bytes(p.read_bytes())
    toml = d / "copies.toml"
    toml.write_text(f'root = {str(lab.data)!r}\n[id]\ntrain = "train"\ntest = "test"\n[ood.far]\ncopies = '
                    f'{str(d / "same")!r}\nnoise = "noise"\n')
    cli("an OOD set whose images are copies of ID test images (other names), `oodlab bench`",
        ["bench", "--suite", str(toml), "--model", str(lab.ckpt), "--detectors", "energy", "--out", str(d / "o"),
         "--device", "cpu"], "none: the run goes on, warned", d, d / "o")

    # torchrun: one rank cannot read a folder
    d = lab.fresh("torchrun")
    driver = d / "driver.py"
    driver.write_text("import os, sys\nfrom oodlab.cli import main\nfrom oodlab.features import extraction\n"
                      "if os.environ.get('RANK') == '1':  # this rank cannot read the ID training folder\n"
                      "    def unreadable(*a, **k):\n"
                      f"        raise PermissionError('cannot read folder {lab.data}/train: Permission denied')\n"
                      "    extraction.extract = unreadable\nsys.exit(main())\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(driver), *lab.bench_args(d / "o")], env=child_env(1, ROOT, OODLAB_CACHE=str(d / "cache")),
                          capture_output=True, text=True, timeout=600)
    lines = sorted(ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.startswith("oodlab bench"))
    out.append(("`torchrun --nproc-per-node 2 oodlab bench`, rank 1 cannot read a folder", "\n".join(lines),
                f"{proc.returncode} (torchrun's)", "none: no results file written or read"
                if not (d / "o").exists() else "results written"))
    return out


def identity_cost(root: Path, n: int = 20_000) -> str:
    """What a folder's cache identity costs: ``folder.load`` (walk, one ``stat`` per file for path, size, mtime,
    inode and ctime, SHA-256 of it all) on ``n`` small files in 100 class folders, extrapolated to 1.28M."""
    from oodlab.data.preprocessing import Preprocessing
    from oodlab.data.sources import folder

    tree = root / "identity"
    png = (root / "data" / "noise" / "000.png").read_bytes()
    for i in range(n):
        cls = tree / f"c{i % 100:03d}"
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{i:06d}.png").write_bytes(png)
    best = min(interleaved(lambda: folder.load(tree, prep=Preprocessing(28, 1), labelled=True), repeats=3)[0])
    return (f"A folder's cache identity is its files' path, size, mtime, inode and ctime (one `stat` each; a file "
            f"rewritten in place gets a new ctime, a copy a new inode), not a hash of their bytes: `folder.load` of "
            f"{n:,} files takes {best:.2f} s here (best of 3, warm file-system cache), so about "
            f"{best * 1_281_167 / n:.0f} s for ImageNet-1K's 1,281,167 training images, against the hours a content "
            "hash of ~140 GB would read.")


def _cell(text: str, root: Path) -> str:
    lines = [ln.strip() for ln in text.replace(str(root), "DIR").splitlines() if ln.strip()]
    return escape(" / ".join(lines)).replace("<", "&lt;") or "(nothing)"


def run() -> None:
    args = parser(__doc__).parse_args()
    threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        cwd = os.getcwd()
        os.chdir(root)
        try:
            lab = Lab(root)
            cases = cli_cases(lab) + api_cases(lab) + kill_cases(lab) + surface_cases(lab)
            identity = identity_cost(root)
        finally:
            os.chdir(cwd)
        text = table(["case", "message (what the user sees)", "exit code", "data lost"],
                     [(c, _cell(m, root), code, lost) for c, m, code, lost in cases])
    seconds = time.perf_counter() - t0
    print(text)
    refused = [m for _, m, code, _ in cases if code == "2"]
    one_line = sum(1 for m in refused if m.count("\n") == 1)
    print(f"\n{len(cases)} cases in {seconds:.0f} s; {one_line} of the {len(refused)} refused commands (exit 2) print "
          "one line, the other prints the unreadable image's warnings first")
    if not args.no_write:
        body = (f"{len(cases)} cases, each run for real in a temporary folder on a suite of 28x28 PNG folders (a suite "
                "TOML file) and a checkpoint trained on it; `DIR` stands for that folder. Command-line errors are "
                "one line on stderr with exit code 2 (`--debug` or `OODLAB_DEBUG=1` shows the traceback); API errors "
                "are one-line `ValueError`s (or subclasses). \"Data lost\" is checked against an uninterrupted run "
                "(rows, per-sample scores, final weights). The same cases are tests in `tests/reliability/`.\n\n"
                + text + f"\n\nAll cases: {seconds:.0f} s.\n\n{identity}")
        write_section("reliability", "Reliability: bad inputs, damaged files, full disks, kill -9, concurrent runs, "
                      "torchrun", body)


if __name__ == "__main__":
    run()
