"""The forward pass against the hardware: the default model's extraction speed beside a roofline estimate.

    python benchmarks/extraction.py [--no-write]

The peak is measured, not taken from a data sheet: the best GFLOP/s of float32 matrix products
(2048 x 2048, the best case for this CPU's vector units) on the threads the benchmarks use. The model's
cost is counted by ``torch.utils.flop_counter`` (multiply-adds as 2 FLOPs). Then images/s of the shipped
Fashion-MNIST model on 28x28 inputs already in memory, for each step oodlab takes (the plain model, batch
norms folded into the convolutions and channels-last weights, ``inference_mode``, the batch size,
``torch.compile`` with its compile time counted), and ``oodlab extract`` end to end on the suite. Prints
the tables and writes the "extraction" section of docs/results.md.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness import ROOT, child_env, parser, run_timed, table, threads, write_section

from oodlab.models import load_checkpoint
from oodlab.models.adapter import inference_input
from oodlab.training.recipes import shipped_checkpoint

THREADS = 2


def peak_gflops(seconds: float = 3.0) -> float:
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def rate(fn, batch: torch.Tensor, seconds: float = 3.0) -> float:
    fn(batch)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0)


def main() -> None:
    args = parser(__doc__).parse_args()
    threads(THREADS)
    model, _ = load_checkpoint(shipped_checkpoint("fashionmnist"))
    model.eval()
    fast = model.for_inference()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.rand(64, 1, 28, 28))
    flops = counter.get_total_flops() / 64
    peak = peak_gflops()
    roof = peak * 1e9 / flops

    def plain(x):
        with torch.no_grad():
            return model.head(model.features(x))

    def folded(x):
        with torch.no_grad():
            return fast.head(fast.features(inference_input(x, torch.device("cpu"))))

    def folded_im(x):
        with torch.inference_mode():
            return fast.head(fast.features(inference_input(x, torch.device("cpu"))))

    rows = []
    for name, fn, bs in (("plain model, no_grad, NCHW", plain, 512), ("folded batch norms + channels-last (oodlab)",
                                                                        folded, 512),
                         ("... + inference_mode", folded_im, 512), ("... batch 256", folded_im, 256),
                         ("... batch 128", folded_im, 128), ("... batch 64", folded_im, 64)):
        r = rate(fn, torch.rand(bs, 1, 28, 28))
        rows.append([name, bs, f"{r:,.0f}", f"{r * flops / 1e9:.0f}", f"{100 * r / roof:.0f}%"])
    from torch._inductor import config as inductor

    inductor.force_disable_caches = True  # a first compile, as a user's first run pays it
    t0 = time.perf_counter()
    compiled = torch.compile(fast)
    with torch.inference_mode():
        compiled(inference_input(torch.rand(128, 1, 28, 28), torch.device("cpu")))
    compile_s = time.perf_counter() - t0

    def comp(x):
        with torch.inference_mode():
            return compiled(inference_input(x, torch.device("cpu")))

    r = rate(comp, torch.rand(128, 1, 28, 28))
    rows.append([f"... torch.compile (compile {compile_s:.0f} s once)", 128, f"{r:,.0f}", f"{r * flops / 1e9:.0f}",
                 f"{100 * r / roof:.0f}%"])
    ends = []
    for bs in (512, 256):
        with tempfile.TemporaryDirectory() as cache:
            done, seconds = run_timed([sys.executable, "-m", "oodlab.cli", "extract", "--batch-size", str(bs)],
                                      env=child_env(THREADS, OODLAB_CACHE=cache), cwd=ROOT, capture_output=True, text=True)
            total = int(done.stdout.splitlines()[-1].split()[0])
            ends.append([bs, total, f"{seconds:.1f}", f"{total / seconds:,.0f}"])
    body = (f"Model: the shipped Fashion-MNIST `smallcnn`, {flops / 1e6:.1f} MFLOP per 28x28 image. Peak: "
            f"{peak:.0f} GFLOP/s (best float32 2048x2048 matrix product on {THREADS} threads), so the roofline is "
            f"{roof:,.0f} images/s.\n\n"
            + table(["forward pass (inputs in memory)", "batch", "images/s", "GFLOP/s", "of the roofline"], rows)
            + "\n\n`oodlab extract` end to end on the fashionmnist suite (a new process, an empty cache: decoding, "
            "the forward pass, writing and hashing the shards):\n\n"
            + table(["--batch-size", "images", "seconds", "images/s"], ends))
    print(body)
    if not args.no_write:
        write_section("extraction", "The forward pass against the hardware", body)


if __name__ == "__main__":
    main()
