import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodlab.bench import load_scores, run_bench
from oodlab.specs import RunSpec
from oodlab.bench.html import Run, _entries, load_run, write_report
from oodlab.cli import main
from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
from oodlab.data.suites import Suite
from oodlab.metrics import evaluate
from oodlab.models.zoo import save_checkpoint, small_cnn

DETECTORS = ["msp", "maxlogit", "energy"]


def _images(name: str, n: int, scale: int, labels: bool = True) -> ImageSet:
    g = torch.Generator().manual_seed(len(name) * 1000 + n)
    x = (torch.rand(n, 1, 28, 28, generator=g) * scale).to(torch.uint8)
    y = torch.randint(0, 3, (n,), generator=g) if labels else None
    return ImageSet(name, ArrayDataset(x, y), tensor_fingerprint(x, name), 3 if labels else None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny runs of the same suite with two differently initialised models (think ERM vs GReg)."""
    root = tmp_path_factory.mktemp("runs")
    oods = {"bright": _images("bright", 40, 255, False), "dark": _images("dark", 30, 40, False)}
    suite = Suite("tiny", _images("train", 48, 160), _images("test", 50, 160), oods,
                  {"near": ["dark"], "far": ["bright"]}, 3, (1, 28, 28))
    out = []
    for seed, name in ((0, "erm"), (1, "greg")):
        torch.manual_seed(seed)
        ckpt = save_checkpoint(small_cnn(3), root / f"{name}.safetensors", {"arch": "smallcnn", "num_classes": 3, "in_channels": 1})
        run_bench(RunSpec(ckpt, data=suite), detectors=DETECTORS, out_dir=root / name, verbose=False)
        out.append(root / name)
    return out[0], out[1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in (".md", ".csv", ".json", ".html", ".png")}


def _page(path: Path) -> ET.Element:
    return ET.fromstring(path.read_text(encoding="utf-8"))  # strict XML: unbalanced tags fail here


def _data(page: ET.Element) -> dict:
    return json.loads(page.find(".//script[@id='oodlab-data']").text)


def _results_table(page: ET.Element) -> list[list[ET.Element]]:
    table = page.findall(".//table")[1]
    return [list(tr) for tr in table.findall("tr")[2:]]


def test_bench_writes_report_with_a_row_and_a_panel_per_detector(runs):
    run = runs[0]
    page = _page(run / "report.html")
    body = _results_table(page)
    assert [cells[0].text for cells in body] == DETECTORS
    assert len(page.findall(".//section[@class='detector']")) == len(DETECTORS)
    assert page.find(".//table[@id='heatmap']") is not None and not (run / "figures").exists()  # no PNGs by default
    rows = load_run(run).rows
    energy_bright = next(r for r in rows if r["detector"] == "energy" and r["ood"] == "bright")
    assert body[2][1].text == f"{100 * energy_bright['auroc']:.2f}"
    assert body[2][2].text == f"{100 * energy_bright['fpr95']:.2f}"
    data = _data(page)
    energy = next(e for e in data["entries"] if e["name"] == "energy")
    assert energy["sets"]["bright"]["auroc"] == round(energy_bright["auroc"], 6)
    # the embedded ROC curve is the exact one, thinned: its first and last points, monotone, area = AUROC
    scores = load_scores(run, energy["key"])
    fpr, tpr = map(np.array, energy["sets"]["bright"]["roc"])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    assert np.trapezoid(tpr, fpr) == pytest.approx(energy_bright["auroc"], abs=0.01)
    assert sum(energy["id_hist"]) == len(scores["id"]) and sum(energy["sets"]["dark"]["hist"]) == len(scores["dark"])


def test_report_is_self_contained(runs):
    text = (runs[0] / "report.html").read_text(encoding="utf-8")
    page = ET.fromstring(text)
    assert [s.get("src") for s in page.findall(".//script")] == [None, None] and page.findall(".//link") == []
    assert [el for el in page.iter() for attr in ("src", "href") if el.get(attr) is not None] == []
    assert text.replace('"http://www.w3.org/2000/svg"', "").count("http") == 0  # the SVG namespace is a name
    assert "url(" not in text and "@import" not in text and "fetch(" not in text and "XMLHttpRequest" not in text


def test_best_value_per_column_is_highlighted(runs):
    body = _results_table(_page(runs[0] / "report.html"))
    values = np.array([[float(c.text) for c in cells[1:]] for cells in body])
    best = [[c.get("class") == "best" for c in cells[1:]] for cells in body]
    lower_is_better = [1, 3, 5]  # FPR95 of each OOD set, then the mean FPR95
    for j in range(values.shape[1]):
        target = values[:, j].min() if j in lower_is_better else values[:, j].max()
        assert [b[j] for b in best] == list(values[:, j] == target)


def test_report_png_draws_the_figures_for_papers(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    assert main(["report", str(run), "--png"]) == 0
    pngs = sorted((run / "figures").glob("*.png"))
    assert len(pngs) == len(DETECTORS) + 1
    for png in pngs:
        with Image.open(png) as im:
            expected = (660, 300) if png.name == "auroc-heatmap.png" else (1200, 480)  # 3 detectors x (2 OOD + mean)
            assert im.format == "PNG" and im.size == expected


def test_saved_scores_reproduce_the_table(runs):
    run = runs[0]
    for row in load_run(run).rows:
        scores = load_scores(run, row["key"])
        assert evaluate(scores["id"], scores[row["ood"]]) == {m: row[m] for m in ("auroc", "fpr95", "aupr_in", "aupr_out")}


def test_report_command_regenerates_byte_identical_files(runs, capsys):
    run = runs[0]
    before = _snapshot(run)
    assert {"results.md", "results.csv", "results.json", "report.html"} <= set(before)
    for path in ("report.html", "results.md"):
        (run / path).unlink()
    assert main(["report", str(run)]) == 0
    assert _snapshot(run) == before
    assert "report.html" in capsys.readouterr().out


def test_side_by_side_report(runs, tmp_path):
    out = tmp_path / "erm-vs-greg"
    assert main(["report", *map(str, runs), "--out", str(out), "--png"]) == 0
    page = _page(out / "report.html")
    body = _results_table(page)
    assert [(c[0].text, c[1].text) for c in body] == [(d, r) for d in DETECTORS for r in ("erm", "greg")]
    greg_msp = next(r for r in load_run(runs[1]).rows if r["detector"] == "msp" and r["ood"] == "dark")
    assert body[1][4].text == f"{100 * greg_msp['auroc']:.2f}"
    assert len(page.findall(".//section[@class='detector']")) == 2 * len(DETECTORS)
    assert [e["name"] for e in _data(page)["entries"]] == [f"{d} · {r}" for d in DETECTORS for r in ("erm", "greg")]
    settings = page.findall(".//table")[0]
    assert [th.text for th in settings.find("tr")] == ["setting", "erm", "greg"]
    assert sorted(p.name for p in (out / "figures" / "run2").glob("*.png")) == sorted(
        f"{r['key']}.png" for r in load_run(runs[1]).rows if r["ood"] == "dark")
    with Image.open(out / "figures" / "auroc-heatmap.png") as im:
        assert im.size == (682, 430)  # 6 rows x 3 columns, widened for "maxlogit · greg"
    first = _snapshot(out)
    write_report(list(runs), out, png=True)
    assert _snapshot(out) == first


def _chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert browser, "the report's browser test needs Chromium: `bash setup.sh test` installs it as root " \
                    "(apt-get install chromium)"
    return browser


def _drawn(path: Path, fragment: str = "") -> str:
    """The page's DOM after its script ran, in headless Chromium, offline (file URL, no network)."""
    out = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--user-data-dir=" + str(path.parent / ".chromium"), "--dump-dom",
                          path.resolve().as_uri() + fragment], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_report_draws_every_detectors_curves_in_a_real_browser(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    dom = _drawn(run / "report.html")
    curves = re.findall(r'<path[^>]*class="roc"[^>]*>', dom)
    drawn = {(re.search(r'data-detector="([^"]+)"', c)[1], re.search(r'data-set="([^"]+)"', c)[1]) for c in curves}
    # the per-detector panels (every detector x every OOD set) and the comparison on the first OOD set
    assert drawn == {(d, o) for d in DETECTORS for o in ("bright", "dark")}
    assert len(curves) == 2 * len(DETECTORS) + len(DETECTORS)
    for c in curves:  # a real curve, not an empty path
        assert re.search(r' d="M[\d.]+ [\d.]+(L[\d.]+ [\d.]+){5,}', c), c
    assert len(re.findall(r'class="hist"', dom)) == len(DETECTORS) * 3  # ID + 2 OOD sets each
    heat = re.search(r'<table id="heatmap">(.*?)</table>', dom, re.S)[1]
    assert len(re.findall(r"<td[^>]*background", heat)) == len(DETECTORS) * 3  # 2 sets + the mean, coloured
    # a reader's pick (here through the address): only those detectors and sets are drawn
    dom = _drawn(run / "report.html", "#detectors=energy,msp&sets=dark&compare=dark")
    drawn = {(re.search(r'data-detector="([^"]+)"', c)[1], re.search(r'data-set="([^"]+)"', c)[1])
             for c in re.findall(r'<path[^>]*class="roc"[^>]*>', dom)}
    assert drawn == {("energy", "dark"), ("msp", "dark")}
    assert 'data-drawn="yes"' in re.search(r"<body[^>]*>", dom)[0]


def test_report_refuses_what_it_cannot_compare(runs, tmp_path):
    with pytest.raises(ValueError, match="--out"):
        write_report(list(runs))
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    info = json.loads((other / "results.json").read_text())
    info["settings"]["suite"] = "cifar10"
    (other / "results.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="same suite"):
        write_report([runs[0], other], tmp_path / "cmp")
    (other / "results.json").unlink()
    next((other / "scores").glob("energy-*.npz")).unlink()
    with pytest.raises(FileNotFoundError, match="energy-.*npz is missing"):
        write_report([other])
    with pytest.raises(FileNotFoundError, match="no results"):
        load_run(tmp_path / "empty")
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_labels_name_a_detector_by_key_only_when_it_has_several_settings():
    base = {"params": {}, "id_acc": 0.9, "ood": "x", "group": "far", "auroc": 0.5, "fpr95": 1.0, "aupr_in": 0.5, "aupr_out": 0.5}
    keys = [("dice", "dice-11111111"), ("dice-react", "dice-react-22222222"), ("energy", "energy-33333333"),
            ("energy", "energy-44444444")]
    run = Run(Path("r"), "r", {}, [{**base, "detector": d, "key": k} for d, k in keys])
    assert [label for _, _, label in _entries([run])] == ["dice", "dice-react", "energy-33333333", "energy-44444444"]
