"""A one-page, self-contained HTML report of one or several benchmark runs, from their saved files.

Everything comes from a run folder (results.json or results.jsonl, and scores/<key>.npz), never
from the model, so a report can be regenerated anywhere. The page holds the settings of every
run, the results table (best value per column in bold), and, drawn in the browser as SVG by a script
in the page from the data embedded with it: the AUROC heat-map, the ROC curves of the detectors a reader
picks on one OOD set, and per detector its ROC curves and score histograms on the OOD sets picked. For each
detector and set the page embeds the ROC curve (its exact vertices, thinned to at most 200 evenly spread
along the curve) and the score histogram (60 bins between the 0.5th and 99.5th percentiles of all sets;
tails go to the edge bins), not every score, so 34 detectors x 8 sets stay about 1 MB. Nothing is
loaded from the network: the file reads offline and can be mailed. ``URL#detectors=a,b&sets=x,y``
preselects what is drawn. PNG figures for papers come from ``oodlab report --png`` (matplotlib).

The output is deterministic: no clock is read and floats have fixed formats, so regenerating a
report from the same run gives the same bytes. The page is well-formed XML (XHTML syntax).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import atomic_write_text
from ..metrics import auroc, fpr_at_tpr, roc_curve
from .figures import ID_COLOR, hist_edges, ood_color, threshold_at_tpr
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
#pick { display: flex; flex-wrap: wrap; gap: 0.3em 1.2em; font-size: 0.9em; margin: 0.5em 0; }
#pick fieldset { border: 1px solid #ddd; } #pick label { white-space: nowrap; margin-right: 0.8em; }
svg { background: #fff; border: 1px solid #eee; font: 11px system-ui, sans-serif; }
svg .axis { stroke: #999; } svg .grid { stroke: #eee; } svg text { fill: #333; }
.panels { display: flex; flex-wrap: wrap; gap: 0.8em; }
#heatmap td { color: #000; text-align: center; min-width: 3.5em; } #heatmap td.dark { color: #fff; }
"""

_JS = r"""
(function () {
  var D = JSON.parse(document.getElementById("oodlab-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  function el(tag, attrs, parent, text) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function picked(name) {
    return Array.prototype.filter.call(document.querySelectorAll("input[name=" + name + "]"),
      function (b) { return b.checked; }).map(function (b) { return b.value; });
  }
  function frame(svg, w, h, xlab, ylab, x0, x1, y0, y1) {
    var m = {l: 46, r: 10, t: 10, b: 36}, pw = w - m.l - m.r, ph = h - m.t - m.b;
    var X = function (v) { return m.l + (v - x0) / (x1 - x0) * pw; };
    var Y = function (v) { return m.t + ph - (v - y0) / (y1 - y0) * ph; };
    for (var i = 0; i <= 4; i++) {
      var gx = x0 + (x1 - x0) * i / 4, gy = y0 + (y1 - y0) * i / 4;
      el("line", {x1: X(gx), x2: X(gx), y1: m.t, y2: m.t + ph, "class": "grid"}, svg);
      el("line", {x1: m.l, x2: m.l + pw, y1: Y(gy), y2: Y(gy), "class": "grid"}, svg);
      el("text", {x: X(gx), y: h - 22, "text-anchor": "middle"}, svg, +gx.toPrecision(3));
      el("text", {x: m.l - 4, y: Y(gy) + 4, "text-anchor": "end"}, svg, +gy.toPrecision(3));
    }
    el("rect", {x: m.l, y: m.t, width: pw, height: ph, fill: "none", "class": "axis"}, svg);
    el("text", {x: m.l + pw / 2, y: h - 6, "text-anchor": "middle"}, svg, xlab);
    el("text", {x: 12, y: m.t + ph / 2, transform: "rotate(-90 12 " + (m.t + ph / 2) + ")",
                "text-anchor": "middle"}, svg, ylab);
    return {X: X, Y: Y};
  }
  function line(svg, xs, ys, f, attrs) {
    var d = xs.map(function (x, i) { return (i ? "L" : "M") + f.X(x).toFixed(1) + " " + f.Y(ys[i]).toFixed(1); });
    attrs.d = d.join(""); attrs.fill = "none";
    return el("path", attrs, svg);
  }
  function legend(svg, items, x, y) {
    items.forEach(function (it, i) {
      el("line", {x1: x, x2: x + 16, y1: y + 12 * i, y2: y + 12 * i, stroke: it[1], "stroke-width": 2}, svg);
      el("text", {x: x + 20, y: y + 12 * i + 4}, svg, it[0]);
    });
  }
  function roc(svg, curves) {
    var f = frame(svg, 420, 320, "false positive rate (OOD accepted)", "true positive rate (ID accepted)", 0, 1, 0, 1);
    line(svg, [0, 1], [0, 1], f, {stroke: "#bbb", "stroke-dasharray": "3 3"});
    curves.forEach(function (c) {
      line(svg, c.roc[0], c.roc[1], f, {stroke: c.color, "stroke-width": 1.8, "class": "roc",
                                        "data-detector": c.detector, "data-set": c.set});
      el("circle", {cx: f.X(c.fpr95), cy: f.Y(0.95), r: 3, fill: c.color}, svg);
    });
    legend(svg, curves.map(function (c) { return [c.name + ": AUROC " + (100 * c.auroc).toFixed(1) + ", FPR95 " +
                                                  (100 * c.fpr95).toFixed(1), c.color]; }), 200, 200);
  }
  function hist(svg, e, sets) {
    var w = (e.hi - e.lo) / e.id_hist.length, top = 0, all = [["id", e.id_hist, D.id_color]];
    sets.forEach(function (s) { all.push([s, e.sets[s].hist, D.colors[s]]); });
    var dens = all.map(function (a) {
      var n = a[1].reduce(function (p, q) { return p + q; }, 0) || 1;
      var d = a[1].map(function (c) { return c / n / w; });
      top = Math.max(top, Math.max.apply(null, d)); return d;
    });
    var f = frame(svg, 480, 320, "score (higher = more in-distribution)", "density", e.lo, e.hi, 0, top * 1.05 || 1);
    all.forEach(function (a, k) {
      var xs = [], ys = [];
      dens[k].forEach(function (v, i) { xs.push(e.lo + i * w, e.lo + (i + 1) * w); ys.push(v, v); });
      line(svg, xs, ys, f, {stroke: a[2], "stroke-width": k ? 1.6 : 2.2, "class": "hist", "data-set": a[0]});
    });
    line(svg, [e.thr, e.thr], [0, top * 1.05 || 1], f, {stroke: "#000", "stroke-dasharray": "5 3"});
    legend(svg, all.map(function (a) { return [a[0] === "id" ? "ID: " + D.id_name : a[0], a[2]]; }), 330, 20);
  }
  function color(v, lo) {  /* AUROC in % -> a viridis-like ramp */
    var t = Math.max(0, Math.min(1, (v - lo) / (100 - lo)));
    var stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    var i = Math.min(3, Math.floor(t * 4)), u = t * 4 - i, a = stops[i], b = stops[i + 1];
    return ["rgb(" + a.map(function (c, j) { return Math.round(c + (b[j] - c) * u); }).join(",") + ")", t < 0.5];
  }
  function heatmap(entries, sets) {
    var tb = document.getElementById("heatmap"); tb.textContent = "";
    var head = document.createElement("tr"), th = document.createElement("th");
    th.textContent = "detector"; th.className = "name"; head.appendChild(th);
    sets.concat(["mean"]).forEach(function (s) { var h = document.createElement("th"); h.textContent = s; head.appendChild(h); });
    tb.appendChild(head);
    var lo = 50;
    entries.forEach(function (e) { sets.forEach(function (s) { lo = Math.min(lo, Math.floor(100 * e.sets[s].auroc)); }); });
    entries.forEach(function (e) {
      var tr = document.createElement("tr"), name = document.createElement("td");
      name.className = "name"; name.textContent = e.name; tr.appendChild(name);
      sets.map(function (s) { return e.sets[s].auroc; }).concat([e.mean_auroc]).forEach(function (v) {
        var td = document.createElement("td"), c = color(100 * v, lo);
        td.textContent = (100 * v).toFixed(1); td.style.background = c[0]; if (c[1]) td.className = "dark";
        tr.appendChild(td);
      });
      tb.appendChild(tr);
    });
  }
  function draw() {
    var dets = picked("detector"), sets = picked("set");
    var entries = D.entries.filter(function (e) { return dets.indexOf(e.id) >= 0; });
    heatmap(entries, sets);
    var which = document.getElementById("compare-set").value, cmp = document.getElementById("compare");
    cmp.textContent = "";
    roc(cmp, entries.map(function (e, i) {
      var c = e.sets[which];
      return {roc: c.roc, auroc: c.auroc, fpr95: c.fpr95, color: D.palette[i % D.palette.length], name: e.name,
              detector: e.id, set: which};
    }));
    Array.prototype.forEach.call(document.querySelectorAll("section.detector"), function (sec) {
      var e = D.entries[+sec.getAttribute("data-entry")], on = dets.indexOf(e.id) >= 0;
      sec.style.display = on ? "" : "none";
      var r = sec.querySelector("svg.roc-panel"), h = sec.querySelector("svg.hist-panel");
      r.textContent = ""; h.textContent = "";
      if (!on) return;
      roc(r, sets.map(function (s) {
        var c = e.sets[s];
        return {roc: c.roc, auroc: c.auroc, fpr95: c.fpr95, color: D.colors[s], name: s, detector: e.id, set: s};
      }));
      hist(h, e, sets);
    });
  }
  var hash = {};
  location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
    var p = kv.split("="); if (p[1] !== undefined) hash[p[0]] = decodeURIComponent(p[1]).split(",");
  });
  var pick = document.getElementById("pick");
  [["detector", D.entries.map(function (e) { return [e.id, e.name]; }), hash.detectors],
   ["set", D.oods.map(function (s) { return [s, s]; }), hash.sets]].forEach(function (g) {
    var fs = document.createElement("fieldset"), lg = document.createElement("legend");
    lg.textContent = g[0] === "set" ? "OOD sets" : "detectors"; fs.appendChild(lg);
    g[1].forEach(function (o) {
      var lab = document.createElement("label"), box = document.createElement("input");
      box.type = "checkbox"; box.name = g[0]; box.value = o[0];
      box.checked = !g[2] || g[2].indexOf(o[0]) >= 0 || g[2].indexOf(o[1]) >= 0;
      box.addEventListener("change", draw); lab.appendChild(box); lab.appendChild(document.createTextNode(" " + o[1]));
      fs.appendChild(lab);
    });
    pick.appendChild(fs);
  });
  var sel = document.getElementById("compare-set");
  D.oods.forEach(function (s) { var o = document.createElement("option"); o.value = s; o.textContent = s; sel.appendChild(o); });
  if (hash.compare) sel.value = hash.compare[0];
  sel.addEventListener("change", draw);
  draw();
  document.body.setAttribute("data-drawn", "yes");
})();
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


def _thin(xs: np.ndarray, ys: np.ndarray, most: int = 200) -> list[list[float]]:
    """At most ``most`` points of a curve, evenly spread along it (first and last kept), rounded for the page."""
    keep = np.unique(np.linspace(0, xs.size - 1, min(most, xs.size)).round().astype(int))
    return [[round(float(v), 4) for v in xs[keep]], [round(float(v), 4) for v in ys[keep]]]


def _curves(scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """What the page draws of one detector: per OOD set its ROC curve, AUROC, FPR95 and histogram, ID's histogram
    and the threshold that accepts 95% of ID."""
    sid = np.asarray(scores["id"], dtype=np.float64)
    oods = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items() if k != "id"}
    edges = hist_edges([sid, *oods.values()])
    counts = lambda s: [int(c) for c in np.histogram(np.clip(s, edges[0], edges[-1]), edges)[0]]  # noqa: E731
    sets = {}
    for name, sood in oods.items():
        sets[name] = {"roc": _thin(*roc_curve(sid, sood)),
                      "auroc": round(auroc(sid, sood), 6), "fpr95": round(fpr_at_tpr(sid, sood), 6),
                      "hist": counts(sood)}
    return {"lo": round(float(edges[0]), 6), "hi": round(float(edges[-1]), 6), "id_hist": counts(sid),
            "thr": round(threshold_at_tpr(sid), 6), "sets": sets}


def _data_script(data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # inert inside <script>
    return f'<script type="application/json" id="oodlab-data">{text}</script>'


def render_html(runs: list[Run], curves: dict[tuple[str, str], dict[str, Any]]) -> str:
    """The report page; ``curves`` maps (run label, detector key) to that detector's :func:`_curves`."""
    multi = len(runs) > 1
    entries = _entries(runs)
    oods = list(summary_rows(runs[0].rows)[0]["per_ood"])
    groups = {r["ood"]: r.get("group", "") for r in runs[0].rows}
    suite = _suite(runs[0])
    title = f"oodlab report: {suite}" + (f" ({', '.join(r.label for r in runs)})" if multi else "")
    data = {"oods": oods, "colors": {o: ood_color(i) for i, o in enumerate(oods)}, "id_color": ID_COLOR,
            "id_name": f"{suite} test", "palette": [ood_color(i) for i in range(9)],
            "entries": [{"id": f"{label} · {run.label}" if multi else label,
                         "name": f"{label} · {run.label}" if multi else label, "key": s["key"], "run": run.label,
                         "mean_auroc": round(float(s["mean"]["auroc"]), 6), **curves[(run.label, s["key"])]}
                        for run, s, label in entries]}
    sections = "".join(
        f'<section class="detector" data-entry="{i}"><h3>{escape(e["name"])}</h3><p class="note">'
        f'<code>{escape(e["key"])}</code></p><div class="panels"><svg class="roc-panel" width="420" height="320"/>'
        f'<svg class="hist-panel" width="480" height="320"/></div></section>'
        for i, e in enumerate(data["entries"]))
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
<h2>Pick what to compare</h2>
<div id="pick"></div>
<h2>AUROC per detector and OOD set</h2>
<table id="heatmap"></table>
<h2>ROC curves of the detectors picked</h2>
<p>on <select id="compare-set"></select></p>
<svg id="compare" width="420" height="320"/>
<h2>ROC curves and score histograms per detector</h2>
<p class="note">Left: ROC of ID against each OOD set picked (dots mark FPR95). Right: score densities, with the
threshold that accepts 95% of ID dashed; scores beyond the 0.5th/99.5th percentile of all sets are gathered in the
edge bins.</p>
{sections}
{_data_script(data)}
<script>//<![CDATA[
{_JS}
//]]></script>
</body>
</html>
"""


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None, png: bool = False) -> Path:
    """Write ``report.html`` for one run (in its folder by default) or several runs side by side (``out_dir``
    required), and with ``png`` the matplotlib figures under ``figures/`` too. Reads only saved files; returns
    the report's path."""
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
    entries = _entries(runs)
    scores = {}
    for run, s, _ in entries:
        npz = run.path / "scores" / f"{s['key']}.npz"
        if not npz.is_file():
            raise FileNotFoundError(f"{npz} is missing: rerun the same `oodlab bench --out {run.path}` to recompute it")
        scores[(run.label, s["key"])] = load_scores(run.path, s["key"])
    if png:
        _write_pngs(runs, entries, scores, out / "figures")
    path = out / "report.html"
    atomic_write_text(path, render_html(runs, {k: _curves(v) for k, v in scores.items()}))
    return path


def _write_pngs(runs: list[Run], entries: list[tuple[Run, dict[str, Any], str]],
                scores: dict[tuple[str, str], dict[str, np.ndarray]], fig_dir: Path) -> None:
    """The figures for papers: one PNG per detector (ROC + histograms) and the AUROC heat-map."""
    from .figures import auroc_heatmap, detector_figure, save_png

    oods = list(summary_rows(runs[0].rows)[0]["per_ood"])
    colors = {o: ood_color(i) for i, o in enumerate(oods)}
    multi = len(runs) > 1
    folder = {r.label: fig_dir / f"run{i + 1}" if multi else fig_dir for i, r in enumerate(runs)}
    for run, s, label in entries:
        fig = detector_figure(scores[(run.label, s["key"])], f"{label} ({run.label})" if multi else label,
                              f"{_suite(run)} test", colors)
        save_png(fig, folder[run.label] / f"{s['key']}.png")
    rows = [f"{label} · {run.label}" if multi else label for run, _, label in entries]
    values = np.array([[100 * s["per_ood"].get(o, {}).get("auroc", math.nan) for o in oods] + [100 * s["mean"]["auroc"]]
                       for _, s, _ in entries])
    save_png(auroc_heatmap(rows, [*oods, "mean"], values, f"AUROC (%) on {_suite(runs[0])}"),
             fig_dir / "auroc-heatmap.png")
