"""Images per second of the folder pipeline: decode + resize 256 + centre crop 224 of ImageNet-sized JPEGs.

    python benchmarks/input_pipeline.py [--images 5000] [--folder DIR] [--workers 0 1 2] [--repeats 2] [--no-write]

Generates a folder of JPEGs of ImageNet-like sizes (seeded; reused when ``--folder`` already holds
them), then times one full pass of

- oodlab's pipeline (:func:`oodlab.data.base.batches` over a folder set, batch 512) with the PIL
  reader and with the ``torchvision.io`` reader, at each worker count;
- OpenOOD's evaluation loader settings rebuilt here (a PIL dataset with RGB, Resize(256),
  CenterCrop(224), ToTensor, Normalize; DataLoader with batch 200), at the same worker counts and
  at OpenOOD's default of 4 workers.

Each figure is the best of ``--repeats`` passes (page cache warm after the first). Writes the
"input_pipeline" section of docs/results.md.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from harness import interleaved, parser, table, threads, write_section


def make_folder(folder: Path, n: int) -> Path:
    """``n`` JPEGs (quality 90) of random sizes around ImageNet's mean (~400 x 350), smooth random content."""
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("*.jpg"))
    if len(have) >= n:
        return folder
    g = np.random.default_rng(0)
    for i in range(n):
        w, h = int(g.integers(250, 560)), int(g.integers(220, 500))
        small = (g.uniform(size=(h // 16 + 1, w // 16 + 1, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        noise = g.normal(0, 12, size=(h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


class _OpenOODStyle(Dataset):
    """The settings of OpenOOD's ImageNet evaluation loader, written from their description."""

    def __init__(self, files: list[Path]) -> None:
        from torchvision import transforms as T

        self.files = files
        self.tf = T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.Resize(256, T.InterpolationMode.BILINEAR),
                             T.CenterCrop(224), T.ToTensor(),
                             T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as im:
            return self.tf(im), -1


def _rate(loader, n: int, repeats: int) -> float:
    """Images per second of the best of ``repeats`` passes over ``loader()``."""
    def one_pass() -> None:
        assert sum(len(x) for x, _ in loader()) == n

    return n / min(interleaved(one_pass, repeats=repeats)[0])


def main() -> None:
    ap = parser(__doc__, repeats=2)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--folder", help="where the generated JPEGs live (default: a folder under the temp dir)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    threads(1)

    from oodlab.data.preprocessing import Preprocessing
    from oodlab.data.base import batches
    from oodlab.data.sources import folder as folder_source

    folder = make_folder(Path(args.folder or Path(tempfile.gettempdir()) / f"oodlab-jpegs-{args.images}"), args.images)
    files = sorted(folder.glob("*.jpg"))[: args.images]
    sizes = [Image.open(f).size for f in files[:200]]
    sets = {reader: folder_source.load(folder, prep=Preprocessing(224, 3, 256, "bilinear", reader))
            for reader in ("pil", "torchvision")}
    openood = _OpenOODStyle(files)
    rows = []
    for w in sorted(set(args.workers) | {4}):
        cells = []
        for reader in ("pil", "torchvision"):
            if w in args.workers:
                cells.append(f"{_rate(lambda: batches(sets[reader], 512, workers=w), len(files), args.repeats):.0f}")
            else:
                cells.append("–")
        loader = lambda: DataLoader(openood, batch_size=200, shuffle=False, num_workers=w)  # noqa: E731
        cells.append(f"{_rate(loader, len(files), args.repeats):.0f}")
        rows.append([w, *cells])
        print(*rows[-1], flush=True)
    mean_w = np.mean([s[0] for s in sizes])
    mean_h = np.mean([s[1] for s in sizes])
    body = (f"{len(files)} generated JPEGs (quality 90, mean size {mean_w:.0f} x {mean_h:.0f}), decode + resize 256 + "
            f"centre crop 224 to float tensors, images/s (best of {args.repeats} passes; {os.cpu_count()} CPU cores, "
            "torch on 1 thread in the main process). OpenOOD's settings: PIL, batch 200, Normalize in the worker; "
            "its default is 4 workers.\n\n"
            + table(["workers", "oodlab, PIL reader", "oodlab, torchvision.io reader", "OpenOOD's loader settings"], rows)
            + "\n")
    print(body)
    if not args.no_write:
        write_section("input_pipeline", "Input pipeline: decoding and resizing a JPEG folder", body,
                      command=f"python benchmarks/input_pipeline.py --images {args.images} --workers "
                      f"{' '.join(map(str, args.workers))}")


if __name__ == "__main__":
    main()
