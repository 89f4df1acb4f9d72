"""The OpenOOD chain on CUDA against the CPU: openood: checkpoints on generated stand-ins of OpenOOD's CIFAR-10 and
ImageNet-200 trees, with --search and --fsood, and oodlab.openood_table; prints per benchmark the time on each
device, the largest AUROC difference (bfloat16 autocast on CUDA) and whether the search chose the same points.

    python benchmarks/openood_cuda.py        # on a machine with a GPU; writes report.json into $OUT or /tmp/out
"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ["OODLAB_QUIET"] = "1"
import torch
from openood_tree import make_openood_tree, resnet18_32x32_state
from oodlab.bench import run_bench
from oodlab.specs import RunSpec
import oodlab

out = Path(os.environ.get("OUT", "/tmp/out"))
out.mkdir(parents=True, exist_ok=True)
root = Path("/tmp/gpucheck")
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
make_openood_tree(root / "data", "cifar10", per_set=64)
make_openood_tree(root / "data", "imagenet200", per_set=16)
torch.save(resnet18_32x32_state(10, seed=0), root / "c10.ckpt")
import torchvision
torch.manual_seed(0)
torch.save(torchvision.models.resnet18(weights=None, num_classes=200).state_dict(), root / "in200.ckpt")
dets = "msp,energy,react,ash-b,scale,knn,vim,mahalanobis,odin,gen"
report = {}
for bench, model, w in (("cifar10", "openood:resnet18_32x32", root / "c10.ckpt"), ("imagenet200", "openood:resnet18_224x224", root / "in200.ckpt")):
    res = {}
    for dev in ("cuda", "cpu"):
        os.environ["OODLAB_CACHE"] = str(root / f"cache-{dev}")
        t0 = time.perf_counter()
        rows = run_bench(RunSpec(model, weights=str(w), data=bench, data_root=root / "data", device=dev),
                         detectors=dets.replace(",knn", "") if bench == "imagenet200" else dets,
                         params={"knn": {"k": 10}} if bench == "cifar10" else None,
                         out_dir=root / f"run-{bench}-{dev}", search=True, fsood=True, verbose=False)
        res[dev] = ({(r["key"].rsplit("-", 1)[0], r["ood"]): r["auroc"] for r in rows}, time.perf_counter() - t0,
                    {r["detector"]: r["params"] for r in rows})
    diffs = {f"{k[0]}/{k[1]}": round(100 * (res["cuda"][0][k] - res["cpu"][0].get(k, float("nan"))), 3) for k in res["cuda"][0]}
    report[bench] = {"seconds": {d: round(res[d][1], 1) for d in res}, "max_abs_auroc_diff_points": max(abs(v) for v in diffs.values()),
                     "diffs": diffs, "params_equal": res["cuda"][2] == res["cpu"][2], "params_cuda": res["cuda"][2],
                     "fsood_written": (root / f"run-{bench}-cuda" / "fsood" / "openood.csv").is_file()}
    print(bench, json.dumps({k: v for k, v in report[bench].items() if k != "diffs"}))
from oodlab.models.openood_nets import ResNet18Cifar
net = ResNet18Cifar(10); net.load_state_dict(resnet18_32x32_state(10, seed=0))
os.environ["OODLAB_CACHE"] = str(root / "cache-py")
t = oodlab.openood_table(net, "cifar10", "msp,energy", data_root=root / "data", out_dir=root / "py", device="cuda")
print(t if not hasattr(t, "to_string") else t.to_string())
(out / "report.json").write_text(json.dumps(report, indent=1, default=str))
