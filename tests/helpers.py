"""Small data sets and subprocess settings shared by tests."""

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for an ``oodlab`` subprocess: this checkout first on PYTHONPATH (not whatever oodlab is
    installed), one thread (so results match an in-process run on one thread), quiet progress bars."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "OODLAB_QUIET": "1", **extra}


def make_tiny_suite(n_train: int = 96, n_test: int = 48, seed: int = 0):
    """A 3-class 28x28 suite: class c is a bright square in corner c on faint noise; OOD = noise and stripes."""
    from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
    from oodlab.data.suites import Suite

    g = torch.Generator().manual_seed(seed)

    def id_set(n: int, name: str) -> ImageSet:
        labels = torch.arange(n) % 3
        x = torch.randint(0, 40, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
        for i, c in enumerate(labels.tolist()):
            r, q = divmod(c, 2)
            x[i, 0, r * 14 + 2 : r * 14 + 12, q * 14 + 2 : q * 14 + 12] = 230
        return ImageSet(name, ArrayDataset(x, labels), tensor_fingerprint(x, labels), 3)

    noise = torch.randint(0, 256, (40, 1, 28, 28), generator=g, dtype=torch.uint8)
    stripes = torch.zeros(30, 1, 28, 28, dtype=torch.uint8)
    stripes[:, :, ::3] = 200
    ood = {"noise": ImageSet("noise", ArrayDataset(noise), tensor_fingerprint(noise)),
           "stripes": ImageSet("stripes", ArrayDataset(stripes), tensor_fingerprint(stripes))}
    return Suite("tiny", id_set(n_train, "tiny-train"), id_set(n_test, "tiny-test"), ood,
                 {"near": ["stripes"], "far": ["noise"]}, 3, (1, 28, 28))
