"""Confidence intervals at the cost of a metric: time per row and coverage.

    python benchmarks/intervals.py [--reps 400] [--no-write]

Times one row's 95% intervals (10,000 ID x 5,000 OOD Gaussian scores, 1,000 resamples) with today's
:func:`oodlab.metrics.confidence_intervals` (DeLong for AUROC, O(1) bootstrap draws for FPR95) against the
resampling bootstrap it replaced (:func:`oodlab.metrics.bootstrap_metrics` plus percentiles), and measures
coverage: the share of 400 repetitions whose interval holds the true AUROC and FPR95 of unit Gaussians
``shift`` apart (AUROC = Phi(shift / sqrt 2), FPR95 = 1 - Phi(shift - z_0.95)), for both methods.
Prints the tables and writes the "intervals" section of docs/results.md.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from harness import parser, table, threads, timed, write_section

from oodlab import metrics


def resampling(sid: np.ndarray, sood: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The intervals as oodlab computed them before: percentiles of 1,000 full resamples."""
    aurocs, fprs = metrics.bootstrap_metrics(sid, sood, 1000, seed)
    (a_lo, a_hi), (f_lo, f_hi) = np.percentile(aurocs, [2.5, 97.5]), np.percentile(fprs, [2.5, 97.5])
    return {"auroc_lo": a_lo, "auroc_hi": a_hi, "fpr95_lo": f_lo, "fpr95_hi": f_hi}


def coverage(method, shift: float, reps: int, n: int = 1000, m: int = 500) -> tuple[float, float, float, float]:
    phi, z95 = NormalDist().cdf, NormalDist().inv_cdf(0.95)
    true_auroc, true_fpr = phi(shift / np.sqrt(2)), 1 - phi(shift - z95)
    rng = np.random.default_rng(11)
    hits, widths = np.zeros(2), np.zeros(2)
    for rep in range(reps):
        ci = method(rng.normal(shift, 1, n), rng.normal(0, 1, m), seed=rep)
        hits += [ci["auroc_lo"] <= true_auroc <= ci["auroc_hi"], ci["fpr95_lo"] <= true_fpr <= ci["fpr95_hi"]]
        widths += [ci["auroc_hi"] - ci["auroc_lo"], ci["fpr95_hi"] - ci["fpr95_lo"]]
    return (*(hits / reps), *(widths / reps))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--reps", type=int, default=400, help="repetitions per coverage cell")
    args = ap.parse_args()
    threads(2)
    rng = np.random.default_rng(0)
    sid, sood = rng.normal(1, 1, 10_000), rng.normal(0, 1, 5_000)
    new, new_iqr = timed(lambda: metrics.confidence_intervals(sid, sood), 20)
    old, old_iqr = timed(lambda: resampling(sid, sood), 5)
    timing = table(["method", "seconds per row (median of runs, ± half IQR)", "speed-up"],
                   [["resampling bootstrap (before), 1,000 resamples", f"{old:.4f} ± {old_iqr:.4f}", "1x"],
                    ["DeLong + O(1) bootstrap draws (now), 1,000 draws", f"{new:.5f} ± {new_iqr:.5f}",
                     f"{old / new:.0f}x"]])
    a, b = metrics.confidence_intervals(sid, sood), resampling(sid, sood)
    same = table(["method", "AUROC interval", "FPR95 interval"],
                 [["resampling bootstrap (before)", f"[{b['auroc_lo']:.4f}, {b['auroc_hi']:.4f}]",
                   f"[{b['fpr95_lo']:.4f}, {b['fpr95_hi']:.4f}]"],
                  ["DeLong + O(1) draws (now)", f"[{a['auroc_lo']:.4f}, {a['auroc_hi']:.4f}]",
                   f"[{a['fpr95_lo']:.4f}, {a['fpr95_hi']:.4f}]"]])
    rows = []
    for shift in (1.5, 3.0):
        for name, method in (("now", metrics.confidence_intervals), ("before", resampling)):
            ca, cf, wa, wf = coverage(method, shift, args.reps)
            rows.append([shift, name, f"{100 * ca:.1f}%", f"{100 * cf:.1f}%", f"{wa:.4f}", f"{wf:.4f}"])
    cover = table(["shift", "method", "AUROC coverage", "FPR95 coverage", "mean AUROC width", "mean FPR95 width"],
                  rows)
    body = (f"One row (10,000 ID x 5,000 OOD scores, unit Gaussians 1 apart, 2 threads):\n\n{timing}\n\n"
            f"The same row's intervals by both methods:\n\n{same}\n\nCoverage of 95% intervals over {args.reps} "
            "repetitions (1,000 ID x 500 OOD scores each; a 95% interval should cover the truth in 93-97% of 400):"
            f"\n\n{cover}")
    print(body)
    if not args.no_write:
        write_section("intervals", "Confidence intervals: time per row and coverage", body)


if __name__ == "__main__":
    main()
