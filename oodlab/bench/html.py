"""A one-page, self-contained HTML report of one or several benchmark runs, from their saved files.

Everything comes from a run folder (results.json or results.jsonl, and scores/<key>.npz), never
from the model, so a report can be regenerated anywhere. The page holds the settings of every
run, the results table (best value per column in bold), the AUROC heat-map and, per detector, the
ROC curves and score histograms of each run side by side. Figures are embedded as base64 PNGs and
the page loads nothing from the network, so it reads offline and can be mailed as one file.

The output is deterministic: no clock is read and floats have fixed formats, so regenerating a
report from the same run gives the same bytes. The page is well-formed XML (XHTML syntax).
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import atomic_write_text
from .figures import auroc_heatmap, detector_figure, ood_color, save_png
from .report import KINDS, METRICS, _label, summary_rows
from .runner import load_rows, load_scores

__all__ = ["Run", "load_run", "write_report", "render_html"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 2000px;
       padding: 0 1.5em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
p.note { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
td.best { font-weight: bold; background: #e3f1e3; }
td.code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.92em; text-align: left; }
.runs { display: grid; grid-template-columns: repeat(auto-fit, minmax(720px, 1fr)); gap: 1em; }
figure { margin: 0.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


@dataclass(frozen=True)
class Run:
    """One results folder as written by ``oodlab bench``: its settings and result rows."""

    path: Path
    label: str
    settings: dict[str, Any]
    rows: list[dict[str, Any]]


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read a run folder: rows and settings from results.json, else rows from results.jsonl."""
    path = Path(path)
    summary = path / "results.json"
    if summary.is_file():
        info = json.loads(summary.read_text())
        settings, rows = info.get("settings", {}), info.get("rows", [])
    else:
        settings, rows = {}, load_rows(path)
    if not rows:
        raise FileNotFoundError(f"no results in {path}: run `oodlab bench --out {path}` first")
    return Run(path, label or path.name, settings, rows)


def _fmt(x: float) -> str:
    return f"{100 * x:.2f}" if math.isfinite(x) else "–"


def _img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{escape(alt)}"/>'


def _suite(run: Run) -> str:
    return str(run.settings.get("suite") or run.rows[0].get("suite", "?"))


def _entries(runs: list[Run]) -> list[tuple[Run, dict[str, Any], str]]:
    """(run, summary row, detector label) for every detector of every run, detectors grouped together."""
    by_label: dict[str, list[tuple[Run, dict[str, Any], str]]] = {}
    for run in runs:
        summ = summary_rows(run.rows)
        keys = [s["key"] for s in summ]
        for s in summ:
            label = _label(s, keys)
            by_label.setdefault(label, []).append((run, s, label))
    return [e for group in by_label.values() for e in group]


def _settings_table(runs: list[Run]) -> str:
    def cell(st: dict[str, Any], field: str) -> str:
        if field == "model":
            meta = st.get("model_meta") or {}
            return ", ".join(f"{k} {v}" for k, v in meta.items() if v is not None)
        if field in ("versions", "data"):
            return ", ".join(f"{k} {v}" for k, v in (st.get(field) or {}).items())
        value = st.get(field)
        return "–" if value is None else str(value)

    fields = [("suite", "suite"), ("checkpoint", "checkpoint"), ("model_id", "checkpoint fingerprint"),
              ("model", "model"), ("date", "date of run"), ("command", "command"), ("seconds", "run time (s)"),
              ("data", "data fingerprints"), ("versions", "versions")]
    head = "".join(f'<th class="name">{escape(r.label)}</th>' for r in runs)
    body = "".join(f'<tr><th class="name">{escape(title)}</th>'
                   + "".join(f'<td class="code">{escape(cell(r.settings, f))}</td>' for r in runs) + "</tr>"
                   for f, title in fields)
    return f'<table><tr><th class="name">setting</th>{head}</tr>{body}</table>'


def _params_table(entries: list[tuple[Run, dict[str, Any], str]], multi: bool) -> str:
    head = '<tr><th class="name">detector</th>' + ('<th class="name">run</th>' if multi else "") + \
           '<th class="name">key</th><th class="name">parameters</th></tr>'
    body = "".join(f'<tr><td class="name">{escape(label)}</td>' + (f'<td class="name">{escape(run.label)}</td>' if multi else "")
                   + f'<td class="code">{escape(s["key"])}</td>'
                   + f'<td class="code">{escape(json.dumps(s["params"], sort_keys=True, default=str))}</td></tr>'
                   for run, s, label in entries)
    return f"<table>{head}{body}</table>"


def _results_table(entries: list[tuple[Run, dict[str, Any], str]], oods: list[str], groups: dict[str, str],
                   multi: bool) -> str:
    """Per OOD set AUROC and FPR95, the four means and ID accuracy; the best of each column in bold."""
    higher = {m: m != "fpr95" for m in METRICS}
    columns = [(o, m, higher[m]) for o in oods for m in ("auroc", "fpr95")]
    columns += [("mean", m, higher[m]) for m in METRICS]
    kinds = [k for k in KINDS if entries and entries[0][1]["by_kind"]]
    columns += [(k, m, higher[m]) for k in kinds for m in ("auroc", "fpr95")] + [("id_acc", "", True)]

    def value(s: dict[str, Any], col: tuple[str, str, bool]) -> float:
        o, m, _ = col
        if o == "id_acc":
            return float(s["id_acc"])
        if o in KINDS:
            return float(s["by_kind"].get(o, {}).get(m, math.nan))
        return float(s["mean"][m] if o == "mean" else s["per_ood"].get(o, {}).get(m, math.nan))

    grid = [[value(s, c) for c in columns] for _, s, _ in entries]
    best = []
    for j, (_, _, up) in enumerate(columns):
        shown = [round(100 * row[j], 2) for row in grid if math.isfinite(row[j])]
        best.append((max(shown) if up else min(shown)) if shown else None)

    label = {"auroc": "AUROC ↑", "fpr95": "FPR95 ↓", "aupr_in": "AUPR-In ↑", "aupr_out": "AUPR-Out ↑"}
    first = '<th class="name" rowspan="2">detector</th>' + ('<th class="name" rowspan="2">run</th>' if multi else "")
    first += "".join(f'<th colspan="2">{escape(o)}' + (f" ({escape(groups[o])})" if groups.get(o) else "") + "</th>"
                     for o in oods)
    first += f'<th colspan="{len(METRICS)}">mean over OOD sets</th>'
    first += "".join(f'<th colspan="2">mean over {k} sets</th>' for k in kinds) + '<th rowspan="2">ID acc ↑</th>'
    second = "".join(f"<th>{label[m]}</th>" for o, m, _ in columns if o != "id_acc")
    body = []
    for (run, _, name), row in zip(entries, grid):
        cells = "".join(f'<td class="best">{_fmt(v)}</td>' if math.isfinite(v) and round(100 * v, 2) == b
                        else f"<td>{_fmt(v)}</td>" for v, b in zip(row, best))
        body.append(f'<tr><td class="name">{escape(name)}</td>'
                    + (f'<td class="name">{escape(run.label)}</td>' if multi else "") + f"{cells}</tr>")
    return f"<table><tr>{first}</tr><tr>{second}</tr>{''.join(body)}</table>"


def render_html(runs: list[Run], heatmap_png: bytes, detector_pngs: dict[tuple[str, str], bytes]) -> str:
    """The report page; ``detector_pngs`` maps (run label, detector key) to that detector's figure."""
    multi = len(runs) > 1
    entries = _entries(runs)
    oods = list(summary_rows(runs[0].rows)[0]["per_ood"])
    groups = {r["ood"]: r.get("group", "") for r in runs[0].rows}
    suite = _suite(runs[0])
    title = f"oodlab report: {suite}" + (f" ({', '.join(r.label for r in runs)})" if multi else "")
    figures = []
    for label in dict.fromkeys(label for _, _, label in entries):
        cells = "".join(f'<figure class="detector">{_img(detector_pngs[(run.label, s["key"])], f"{label}: {run.label}")}'
                        f'<figcaption>{escape(run.label)}: <code>{escape(s["key"])}</code></figcaption></figure>'
                        for run, s, lab in entries if lab == label)
        figures.append(f'<section><h3>{escape(label)}</h3><div class="runs">{cells}</div></section>')
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"/><title>{escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="note">ID ({escape(suite)} test set) is the positive class and a higher score means more in-distribution.
FPR95 is the fraction of OOD samples accepted at the first threshold that accepts 95% of ID samples.
Values in %. In the table, the best value of each column is in bold.</p>
<h2>Settings</h2>
{_settings_table(runs)}
<h2>Results</h2>
{_results_table(entries, oods, groups, multi)}
<h2>Detector parameters</h2>
{_params_table(entries, multi)}
<h2>AUROC per detector and OOD set</h2>
<figure class="heatmap">{_img(heatmap_png, "AUROC heat-map")}</figure>
<h2>ROC curves and score histograms</h2>
<p class="note">Left: ROC of ID against each OOD set (dots mark FPR95). Right: score densities, with the threshold
that accepts 95% of ID dashed; scores beyond each set's 0.5th/99.5th percentile are gathered in the edge bins.</p>
{''.join(figures)}
</body>
</html>
"""


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Draw the figures and write ``report.html`` for one run (in its folder by default) or several
    runs side by side (``out_dir`` required). Reads only saved files; returns the report's path."""
    if not run_dirs:
        raise ValueError("give at least one run folder")
    if len(run_dirs) > 1 and out_dir is None:
        raise ValueError("several runs need an output folder for the side-by-side report (--out DIR)")
    names = [Path(p).name for p in run_dirs]
    runs = [load_run(p, n if names.count(n) == 1 else str(p)) for p, n in zip(run_dirs, names)]
    suites = {_suite(r) for r in runs}
    if len(suites) > 1:
        raise ValueError(f"runs compare only on the same suite; these are on {', '.join(sorted(suites))}")
    out = Path(out_dir) if out_dir is not None else runs[0].path
    fig_dir = out / "figures"
    oods = list(summary_rows(runs[0].rows)[0]["per_ood"])
    colors = {o: ood_color(i) for i, o in enumerate(oods)}
    entries = _entries(runs)
    multi = len(runs) > 1
    folder = {r.label: fig_dir / f"run{i + 1}" if multi else fig_dir for i, r in enumerate(runs)}
    detector_pngs = {}
    for run, s, label in entries:
        npz = run.path / "scores" / f"{s['key']}.npz"
        if not npz.is_file():
            raise FileNotFoundError(f"{npz} is missing: rerun the same `oodlab bench --out {run.path}` to recompute it")
        fig = detector_figure(load_scores(run.path, s["key"]), f"{label} ({run.label})" if multi else label,
                              f"{_suite(run)} test", colors)
        detector_pngs[(run.label, s["key"])] = save_png(fig, folder[run.label] / f"{s['key']}.png").read_bytes()
    rows = [f"{label} · {run.label}" if multi else label for run, _, label in entries]
    values = np.array([[100 * s["per_ood"].get(o, {}).get("auroc", math.nan) for o in oods] + [100 * s["mean"]["auroc"]]
                       for _, s, _ in entries])
    heat = save_png(auroc_heatmap(rows, [*oods, "mean"], values, f"AUROC (%) on {_suite(runs[0])}"),
                    fig_dir / "auroc-heatmap.png")
    path = out / "report.html"
    atomic_write_text(path, render_html(runs, heat.read_bytes(), detector_pngs))
    return path
