"""Result tables: the terminal summary and results.json / results.csv / results.md in a run folder."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..runtime import atomic_path, atomic_write_text

__all__ = ["METRICS", "INTERVALS", "KINDS", "summary_rows", "format_summary", "markdown", "write_tables"]

METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")
INTERVALS = ("auroc_lo", "auroc_hi", "fpr95_lo", "fpr95_hi")  # 95% bootstrap bounds (rows written before: absent)
_LABEL = {"auroc": "AUROC", "fpr95": "FPR95", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out"}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _pct_or_dash(x: float | None) -> str:
    return "–" if x is None else _pct(x)


KINDS = ("natural", "synthetic")


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per detector (in first-seen order): per-OOD metrics, their means and ID accuracy.

    ``mean`` is over every OOD set; where the suite has synthetic (noise) sets, ``by_kind`` holds the
    means over the natural and over the synthetic sets apart (rows without a ``kind`` count as natural).
    """
    order: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = order.setdefault(r["key"], {"detector": r["detector"], "key": r["key"], "params": r["params"],
                                        "id_acc": r["id_acc"], "per_ood": {}, "kinds": {}})
        s["per_ood"][r["ood"]] = {m: r[m] for m in METRICS}
        s["kinds"][r["ood"]] = r.get("kind", "natural")
    for s in order.values():
        s["mean"] = _mean(s["per_ood"].values())
        kinds = s.pop("kinds")
        s["by_kind"] = ({k: _mean(v for o, v in s["per_ood"].items() if kinds[o] == k) for k in KINDS}
                        if len(set(kinds.values())) == 2 else {})
    return list(order.values())


def _mean(values) -> dict[str, float]:
    values = list(values)
    return {m: sum(v[m] for v in values) / len(values) for m in METRICS}


def _kind_cells(s: dict[str, Any], sep: str) -> list[str]:
    return [f"{_pct(s['by_kind'][k]['auroc'])}{sep}{_pct(s['by_kind'][k]['fpr95'])}" for k in KINDS if s["by_kind"]]


def _label(s: dict[str, Any], keys: list[str]) -> str:
    """Detector name, with its key when the same detector appears with several settings."""
    return s["key"] if sum(k.rsplit("-", 1)[0] == s["detector"] for k in keys) > 1 else s["detector"]


def _grid(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(b) for b in body)])


def format_summary(rows: list[dict[str, Any]]) -> str:
    """Terminal table: AUROC / FPR95 per OOD set (in %), the four means and ID accuracy."""
    summ = summary_rows(rows)
    if not summ:
        return "(no results)"
    oods = list(summ[0]["per_ood"])
    keys = [s["key"] for s in summ]
    header = ["detector", *(f"{o} AUROC/FPR95" for o in oods), *(f"mean {_LABEL[m]}" for m in METRICS),
              *(f"{k} AUROC/FPR95" for k in KINDS if summ[0]["by_kind"]), "ID acc"]
    body = [[_label(s, keys), *(f"{_pct(s['per_ood'][o]['auroc'])}/{_pct(s['per_ood'][o]['fpr95'])}" for o in oods),
             *(_pct(s["mean"][m]) for m in METRICS), *_kind_cells(s, "/"), _pct(s["id_acc"])] for s in summ]
    return _grid(header, body)


def markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """results.md: the summary table and the full per-OOD table, metrics in %."""
    summ = summary_rows(rows)
    keys = [s["key"] for s in summ]
    oods = list(summ[0]["per_ood"]) if summ else []
    out = io.StringIO()
    out.write(f"# oodlab bench: {settings.get('suite', '?')}\n\n")
    out.write(f"Checkpoint `{settings.get('checkpoint', '?')}` (fingerprint {settings.get('model_id', '?')}). "
              "ID is the positive class; higher score = more ID; FPR95 = OOD accepted at 95% ID TPR. Values in %.\n\n")
    kinds = [k for k in KINDS if summ and summ[0]["by_kind"]]
    if kinds:
        out.write("Natural and synthetic: means over the natural OOD sets and over the generated-noise ones, apart.\n\n")
    out.write("| detector | " + " | ".join(f"{o} AUROC / FPR95" for o in oods) + " | mean AUROC | mean FPR95 | "
              + "".join(f"{k} AUROC / FPR95 | " for k in kinds) + "ID acc |\n")
    out.write("|---" * (len(oods) + 4 + len(kinds)) + "|\n")
    for s in summ:
        cells = [f"{_pct(s['per_ood'][o]['auroc'])} / {_pct(s['per_ood'][o]['fpr95'])}" for o in oods]
        out.write(f"| {_label(s, keys)} | " + " | ".join(cells)
                  + f" | {_pct(s['mean']['auroc'])} | {_pct(s['mean']['fpr95'])} | "
                  + "".join(f"{c} | " for c in _kind_cells(s, " / ")) + f"{_pct(s['id_acc'])} |\n")
    out.write("\n## All metrics\n\n`auroc_lo`–`auroc_hi` and `fpr95_lo`–`fpr95_hi`: 95% intervals: DeLong's for AUROC (logit "
              "scale), a percentile bootstrap for FPR95 (1,000 resamples of the ID and the OOD scores, each resampled "
              "separately; seed 0).\n\n"
              "| detector | OOD set | group | kind | AUROC | FPR95 | AUPR-In | AUPR-Out | auroc_lo | auroc_hi | fpr95_lo | "
              "fpr95_hi |\n" + "|---" * 12 + "|\n")
    for r in rows:
        out.write(f"| {r['key']} | {r['ood']} | {r['group']} | {r.get('kind', 'natural')} | "
                  + " | ".join(_pct(r[m]) for m in METRICS) + " | "
                  + " | ".join(_pct_or_dash(r.get(m)) for m in INTERVALS) + " |\n")
    out.write("\n## Detector settings\n\n")
    for s in summ:
        out.write(f"- `{s['key']}`: {json.dumps(s['params'], sort_keys=True, default=str)}\n")
    return out.getvalue()


def write_tables(out_dir: str | Path, rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """Write results.json (settings + rows), results.csv (one row per detector x OOD set) and results.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps({"settings": settings, "rows": rows}, indent=2, default=str))
    fields = ["detector", "key", "ood", "group", "kind", *METRICS, *INTERVALS, "id_acc", "fit_s", "score_s", "params"]
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "params": json.dumps(r["params"], sort_keys=True, default=str)})
    atomic_write_text(out / "results.md", markdown(rows, settings))
