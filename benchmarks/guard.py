"""The guard on the default model: false alarms, OOD flag rates, exported = Python, and latency.

    python benchmarks/guard.py [--suite fashionmnist] [--alpha 0.05] [--splits 50] [--threads 1] [--no-write]

1. Flag rates per detector at ``--alpha``: each detector is fitted on ID train, calibrated on a
   seeded half of the ID test set and evaluated on the other half (the ID false-alarm rate) and on
   every OOD set (the fraction of OOD inputs caught). The ID rate is averaged over ``--splits``
   random calibration/evaluation splits (mean and sd), the OOD rates too.
2. Export check: every exportable detector's guard (split 0) written as ONNX (run by onnxruntime,
   CPU) and TorchScript, run over the held-out ID half and every OOD set: the largest per-sample
   score difference relative to ``|score| + mean |score|`` (relative for large scores, relative to
   the scale near zero), and the number of flags that differ from the Python guard's.
3. Latency of the guarded model against the bare model (logits only), batch 1 and 256, on
   ``--threads`` CPU threads: eager PyTorch, TorchScript and ONNX Runtime; medians of interleaved
   repeats. "OOD part" = guarded / bare - 1.
4. The same at ImageNet size: a torchvision ResNet-50 (random weights, 224 x 224 inputs, 2048-d
   features, 1000 classes; detectors fitted on random features of that shape, which sets the cost,
   not the quality), batch 1, eager and ONNX Runtime.

Writes the "guard" section of docs/results.md.
"""

from __future__ import annotations

import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness import default_model, interleaved, parser, table, threads, write_section

LATENCY_DETECTORS = ("energy", "react", "ash-s", "dice", "mahalanobis", "vim", "knn", "flow")


def _images(data) -> torch.Tensor:
    return torch.stack([data.dataset[i][0] for i in range(len(data))])


class _Bare(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model.for_inference()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def _export_bare(model, shape, folder: Path) -> tuple[Path, Path]:
    bare = _Bare(model).eval().requires_grad_(False)
    x = torch.rand(2, *shape)
    ts = folder / "bare.pt"
    torch.jit.save(torch.jit.trace(bare, (x,)), str(ts))
    onnx = folder / "bare.onnx"
    prog = torch.onnx.export(bare, (x,), dynamo=True, input_names=["images"], output_names=["logits"],
                             dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False)
    prog.save(str(onnx), external_data=False)
    return ts, onnx


def _runners(eager: nn.Module, ts: Path, onnx: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(ts))
    return {"eager": lambda x: eager(x), "torchscript": lambda x: scripted(x),
            "onnxruntime": lambda x: session.run(None, {"images": x.numpy()})}


def _median_pair(bare, guarded, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds per call of ``bare`` and ``guarded``, interleaved so that load hits both alike."""
    tb, tg = interleaved(lambda: bare(x), lambda: guarded(x), repeats=repeats, warmup=3)
    return statistics.median(tb), statistics.median(tg)


def main() -> None:
    ap = parser(__doc__, threads=1, suite="fashionmnist")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--splits", type=int, default=50)
    args = ap.parse_args()
    threads(args.threads)
    warnings.filterwarnings("ignore")

    import onnxruntime as ort

    from oodlab.bench.report import KINDS
    from oodlab.detectors import available, create
    from oodlab.guard import Guard

    default = default_model(args.suite)
    suite, ckpt, model, meta, mid = default.suite, default.checkpoint, default.model, default.meta, default.model_id
    train, test = default.features(suite.id_train), default.features(suite.id_test)
    oods = {k: default.features(v) for k, v in suite.ood.items()}
    names = [n for n in available() if create(n).export_refusal is None]
    n_test, half = len(test), len(test) // 2

    # 1. flag rates ---------------------------------------------------------------------------
    rate_rows, guards = [], {}
    held_out = torch.randperm(n_test, generator=torch.Generator().manual_seed(0))[half:].sort().values
    for name in names:
        det = create(name).fit(train, model.head)
        s_id = det.score(test)
        s_ood = {k: det.score(f) for k, f in oods.items()}
        id_rates, ood_rates = [], {k: [] for k in oods}
        for seed in range(args.splits):
            perm = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))
            guard = Guard(model, det, suite.input_shape, meta, "cpu").calibrate(s_id[perm[:half]], alpha=args.alpha)
            id_rates.append(float((s_id[perm[half:]] < guard.threshold).double().mean()))
            for k, s in s_ood.items():
                ood_rates[k].append(float((s < guard.threshold).double().mean()))
            if seed == 0:
                guards[name] = guard
        kinds = {kind: [np.mean(v) for k, v in ood_rates.items() if suite.kind_of(k) == kind] for kind in KINDS}
        rate_rows.append([name, f"{100 * np.mean(id_rates):.2f} ± {100 * np.std(id_rates):.2f}",
                          *(f"{100 * np.mean(v):.1f}" for v in ood_rates.values()),
                          *(f"{100 * np.mean(v):.1f}" for v in kinds.values() if v)])
    ood_names = list(oods)
    kind_names = [k for k in KINDS if any(suite.kind_of(o) == k for o in ood_names)]
    rates = table(["detector", "ID flagged (%), mean ± sd", *ood_names, *(f"{k} mean" for k in kind_names)], rate_rows)

    # 2. exported = Python ----------------------------------------------------------------------
    x_eval = {"id": _images(suite.id_test)[held_out], **{k: _images(v) for k, v in suite.ood.items()}}
    f_eval = {"id": type(test)(test.z[held_out], test.logits[held_out]), **oods}
    check_rows, files = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="oodlab-guard-bench-"))
    for name in names:
        guard = guards[name]
        onnx_path, ts_path = guard.export(tmp / f"{name}.onnx"), guard.export(tmp / f"{name}.pt", "torchscript")
        files[name] = (ts_path, onnx_path)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        scripted = torch.jit.load(str(ts_path))
        worst = {"onnx": 0.0, "ts": 0.0}
        flips = {"onnx": 0, "ts": 0}
        for key, x in x_eval.items():
            want = guard.decide(f_eval[key].logits, guard.detector.score(f_eval[key]))
            scale = float(want.score.abs().mean())
            chunks = x.split(1000)
            runs = (("onnx", [session.run(None, {"images": c.numpy()}) for c in chunks]),
                    ("ts", [[t.numpy() for t in scripted(c)] for c in chunks]))
            for tag, parts in runs:
                out = [np.concatenate([p[i] for p in parts]) for i in range(4)]
                rel = np.abs(out[1] - want.score.numpy()) / (np.abs(want.score.numpy()) + scale)
                worst[tag] = max(worst[tag], float(rel.max()))
                flips[tag] += int((out[3] != want.is_ood.numpy()).sum())
        check_rows.append([name, f"{worst['onnx']:.1e}", flips["onnx"], f"{worst['ts']:.1e}", flips["ts"]])
    n_eval = sum(len(x) for x in x_eval.values())
    check = table(["detector", "ONNX Runtime: max |Δscore| / (|score| + mean |score|)", "flags differing",
                   "TorchScript: same", "flags differing"], check_rows)

    # 3. latency --------------------------------------------------------------------------------
    bare_ts, bare_onnx = _export_bare(model, suite.input_shape, tmp)
    bare = _runners(_Bare(model).eval().requires_grad_(False), bare_ts, bare_onnx, args.threads)
    lat_rows = []
    from oodlab.guard.export import GuardGraph

    with torch.no_grad():
        for name in LATENCY_DETECTORS:
            guarded = _runners(GuardGraph(guards[name]).eval().requires_grad_(False), *files[name], args.threads)
            cells = []
            for batch, repeats in ((1, 300), (256, 30)):
                x = x_eval["id"][:batch].contiguous()
                for runtime in ("eager", "torchscript", "onnxruntime"):
                    tb, tg = _median_pair(bare[runtime], guarded[runtime], x, repeats)
                    cells.append(f"{1e3 * tb:.2f} / {1e3 * tg:.2f} ({100 * (tg / tb - 1):+.0f}%)")
            lat_rows.append([name, *cells])
    latency = table(["detector", *(f"{rt} b{b}" for b in (1, 256) for rt in ("eager", "TorchScript", "ONNX Runtime"))],
                    lat_rows)

    # 4. ImageNet size ---------------------------------------------------------------------------
    import torchvision

    from oodlab.features import Features
    from oodlab.models import Classifier

    torch.manual_seed(0)
    big = Classifier.from_torchvision_resnet(torchvision.models.resnet50().eval())
    zr = torch.rand(4000, 2048)
    fake = Features(zr, big.head(zr).detach(), torch.arange(4000) % 1000)
    big_ts, big_onnx = _export_bare(big, (3, 224, 224), tmp)
    big_bare = _runners(_Bare(big).eval().requires_grad_(False), big_ts, big_onnx, args.threads)
    big_rows = []
    with torch.no_grad():
        for name in ("energy", "react", "ash-s", "dice", "mahalanobis", "vim"):
            det = create(name).fit(fake, big.head)
            guard = Guard(big, det, (3, 224, 224), device="cpu").calibrate(torch.randn(5000, dtype=torch.float64))
            ts_p, onnx_p = guard.export(tmp / f"big-{name}.pt", "torchscript"), guard.export(tmp / f"big-{name}.onnx")
            guarded = _runners(GuardGraph(guard).eval().requires_grad_(False), ts_p, onnx_p, args.threads)
            x = torch.rand(1, 3, 224, 224)
            cells = []
            for runtime in ("eager", "onnxruntime"):
                tb, tg = _median_pair(big_bare[runtime], guarded[runtime], x, 20)
                cells.append(f"{1e3 * tb:.1f} / {1e3 * tg:.1f} ({100 * (tg / tb - 1):+.1f}%)")
            big_rows.append([name, *cells])
    big_table = table(["detector", "eager b1", "ONNX Runtime b1"], big_rows)

    body = (f"Default model `{Path(ckpt).name}` (fingerprint {mid}), suite `{args.suite}`, alpha = {args.alpha}. "
            f"Each detector is fitted on ID train ({len(train)}), calibrated on a random half of ID test "
            f"({half}) and evaluated on the other half and on every OOD set; {args.splits} random splits.\n\n"
            f"### False alarms on held-out ID and OOD inputs caught (%)\n\nThe guarantee is ID flagged <= "
            f"{100 * args.alpha:g}% on average over splits (exactly floor(alpha (n+1))/(n+1) = "
            f"{100 * np.floor(args.alpha * (half + 1)) / (half + 1):.2f}% under exchangeability).\n\n{rates}\n\n"
            f"### Exported guard = Python guard ({n_eval} inputs: held-out ID half and every OOD set)\n\n{check}\n\n"
            f"### Latency, ms per batch: bare model / guarded model (OOD part), {args.threads} CPU thread(s)\n\n"
            f"{latency}\n\n"
            f"### Latency at ImageNet size: ResNet-50, 224 x 224, batch 1, ms: bare / guarded (OOD part)\n\n"
            f"{big_table}\n")
    print(body)
    if not args.no_write:
        write_section("guard", f"Guard on {args.suite}: false alarms, flag rates, export, latency", body,
                      command=f"python benchmarks/guard.py --suite {args.suite} --alpha {args.alpha} "
                      f"--splits {args.splits} --threads {args.threads}")


if __name__ == "__main__":
    main()
