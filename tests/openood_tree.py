"""A generated stand-in of OpenOOD v1.5's data tree: lists with OpenOOD's file names, a few small images each."""

from pathlib import Path

import numpy as np
from PIL import Image

from oodlab.data.openood import BENCHMARKS


def make_openood_tree(root: Path, benchmark: str, per_set: int = 3, seed: int = 0) -> dict[str, list[str]]:
    """Write ``root/benchmark_imglist/<lists>/*.txt`` and the images they name; returns {list file: image paths}.

    ID lists cycle through the first classes; OOD lists carry OpenOOD's -1 (test_cifar100 carries CIFAR-100 class
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
            label = i % 2 if labelled else (50 + i if role == "cifar100" else -1)
            lines.append(f"{rel} {label}")
            paths.append(rel)
        (lists / file).write_text("\n".join(lines) + "\n")
        written[file] = paths
    return written
