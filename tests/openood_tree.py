"""A generated stand-in of OpenOOD v1.5's data tree: lists with OpenOOD's file names, a few small images each."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oodlab.data.openood import BENCHMARKS


def make_openood_tree(root: Path, benchmark: str, per_set: int = 3, seed: int = 0) -> dict[str, list[str]]:
    """Write ``root/benchmark_imglist/<lists>/*.txt`` and the images they name; returns {list file: image paths}.

    ID lists cycle through the classes; OOD lists carry OpenOOD's -1 (test_cifar100 carries CIFAR-100 class
    ids, as OpenOOD's own list does, to check that OOD labels are ignored). Each set's images have their own
    brightness so that sets differ."""
    b = BENCHMARKS[benchmark]
    rng = np.random.default_rng(seed)
    lists = root / "benchmark_imglist" / b.lists
    lists.mkdir(parents=True, exist_ok=True)
    roles = ["train", "val", "test", "ood_val", *b.near, *b.far, *b.csid]
    written = {}
    for k, role in enumerate(roles):
        file = b.list_file(role)
        sub = "images_classic" if (b.images == "images_classic" or role == "textures") else "images_largescale"
        labelled = role in ("train", "val", "test") or role in b.csid
        lines, paths = [], []
        for i in range(per_set):
            rel = f"{file.removesuffix('.txt')}/{i}.png"
            pixels = (rng.random((36, 40, 3)) * 60 + 20 * (k % 10)).astype(np.uint8)
            (root / sub / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / sub / rel)
            label = i % b.num_classes if labelled else (50 + i if role == "cifar100" else -1)
            lines.append(f"{rel} {label}")
            paths.append(rel)
        (lists / file).write_text("\n".join(lines) + "\n")
        written[file] = paths
    return written


def _bn(state, prefix, c, g):
    state[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    state[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=g)
    state[f"{prefix}.running_mean"] = 0.1 * torch.randn(c, generator=g)
    state[f"{prefix}.running_var"] = 0.5 + torch.rand(c, generator=g)
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(7)


def resnet18_32x32_state(num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of OpenOOD's openood/networks/resnet18_32x32.py (names and shapes), random values."""
    g = torch.Generator().manual_seed(seed)
    conv = lambda o, i, k: torch.randn(o, i, k, k, generator=g) * (2 / (i * k * k)) ** 0.5  # noqa: E731
    state = {"conv1.weight": conv(64, 3, 3)}
    _bn(state, "bn1", 64, g)
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), 1):
        for block in (0, 1):
            p = f"layer{stage}.{block}"
            stride_in = cin if block == 0 else cout
            state[f"{p}.conv1.weight"] = conv(cout, stride_in, 3)
            _bn(state, f"{p}.bn1", cout, g)
            state[f"{p}.conv2.weight"] = conv(cout, cout, 3)
            _bn(state, f"{p}.bn2", cout, g)
            if block == 0 and stage > 1:
                state[f"{p}.shortcut.0.weight"] = conv(cout, cin, 1)
                _bn(state, f"{p}.shortcut.1", cout, g)
        cin = cout
    state["fc.weight"] = 0.05 * torch.randn(num_classes, 512, generator=g)
    state["fc.bias"] = 0.05 * torch.randn(num_classes, generator=g)
    return state
