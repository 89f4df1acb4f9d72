"""Extraction: run a model over a data set once, and the on-disk cache that keeps the result.

The cache key is (checkpoint fingerprint, data set fingerprint, name, precision of the forward
pass, storage dtype). An entry is a folder of shards (:mod:`oodlab.features.store`) written as the
extraction goes, so a killed extraction resumes at the first unfinished shard. A shard whose key or
checksum does not match, or that cannot be read, is rebuilt (with a warning), never used. Under
``torchrun`` every rank extracts its own contiguous block of shards into the shared cache.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .. import distributed
from ..data.base import BROKEN, ImageSet, batches
from ..models.adapter import Classifier, inference_input
from ..runtime import cache_dir, default_device, digest, disk_full, free_bytes, progress
from ..validate import integer
from .core import Features
from .layers import REDUCTIONS, split_tap
from .store import StoredFeatures, check_shard, write_shard

__all__ = ["extract", "batch_features", "layer_paths", "FeatureCache", "UnreadableImagesError", "autocast_dtype",
           "EXTRACT_BATCH", "SHARD_ITEMS"]

log = logging.getLogger(__name__)

#: Default images per forward pass: on a 2-core CPU the shipped model runs about 1.6x faster at 256 than at 512
#: (activations stay in cache; benchmarks/extraction.py); GPUs are saturated well before 256 at 224 px.
EXTRACT_BATCH = 256

#: Items of a data set per cache shard: a multiple of every usual batch size, ~200 MB at 2048-d + 1000 logits.
SHARD_ITEMS = 16384


class UnreadableImagesError(ValueError):
    """Some images of a data set could not be decoded and ``strict`` extraction was asked for."""


def autocast_dtype(device: torch.device, autocast: bool | None) -> torch.dtype | None:
    """The reduced precision extraction runs in: by default bfloat16 (float16 where the GPU lacks it) on
    CUDA and none (float32) on the CPU; ``autocast=True`` / ``False`` forces it on / off."""
    if autocast is None:
        autocast = device.type == "cuda"
    if not autocast:
        return None
    return torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16


def layer_paths(model: Classifier, layers: tuple[str, ...]) -> list[str]:
    """The body layers the taps ``layers`` read, checked against ``model`` (one line naming the layers it has)."""
    paths = sorted({split_tap(name)[0] for name in layers})
    for path in paths:
        model.layer(path)
    return paths


def batch_features(fast: Classifier, x: torch.Tensor, layers: tuple[str, ...] = (), dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(z, logits, layer features) of one batch ``x`` (from :func:`inference_input`) through the inference copy
    ``fast`` (made with ``keep=layer_paths(model, layers)``), under autocast to ``dtype`` when given: the one
    forward pass extraction and a guard run."""
    taps = {name: split_tap(name) for name in layers}
    reductions = {path: lambda out, path=path: {n: REDUCTIONS[r](out) for n, (p, r) in taps.items() if p == path}
                  for path in {p for p, _ in taps.values()}}
    with fast.capture(reductions) as seen, torch.no_grad():
        with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            z = fast.features(x)
            out = fast.head(z)
    return z, out, {name: value for found in seen.values() for name, value in found.items()}


@torch.no_grad()
def extract(model: Classifier, data: ImageSet, batch_size: int = EXTRACT_BATCH, device: torch.device | str | None = None,
            strict: bool = False, autocast: bool | None = None, start: int = 0, stop: int | None = None,
            layers: tuple[str, ...] = ()) -> Features:
    """Run ``model`` over items ``[start, stop)`` of ``data`` (default: all) once, on its fast inference copy
    in eval mode, collecting z, logits and labels (on CPU), and in the same pass the intermediate-layer
    features named by ``layers`` (taps ``"<layer>:<reduction>"``, :mod:`oodlab.features.layers`).

    Images that cannot be decoded are skipped with a warning that counts them and names the first
    (``Features.skipped``, indices in ``data``); with ``strict`` they raise :class:`UnreadableImagesError`.
    On CUDA the forward pass runs under bfloat16 autocast by default (see :func:`autocast_dtype`);
    the features are stored in float32 either way.
    """
    batch_size = integer("batch_size", batch_size, 1)
    model.check_input(data)
    stop = len(data) if stop is None else stop
    if not 0 <= start < stop <= len(data):
        raise ValueError(f"cannot extract items [{start}, {stop}) of {data.name}, which has {len(data)}")
    device = torch.device(device) if device is not None else default_device()
    paths = layer_paths(model, layers)
    fast = model.for_inference(keep=paths).to(device)
    dtype = autocast_dtype(device, autocast)
    zs, logits, labels = [], [], []
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for x, y in progress(batches(data, batch_size, start=start, stop=stop), desc=f"features {data.name}",
                         total=(stop - start + batch_size - 1) // batch_size, unit="batch"):
        z, out, seen = batch_features(fast, inference_input(x, device), layers, dtype)
        zs.append(z.float().cpu())
        logits.append(out.float().cpu())
        labels.append(torch.as_tensor(y).long())
        for name, value in seen.items():
            if captured[name] and value.shape[1:] != captured[name][0].shape[1:]:
                raise ValueError(f"layer {split_tap(name)[0]} of the model gives {tuple(value.shape[1:])} features for "
                                 f"some images of {data.name} and {tuple(captured[name][0].shape[1:])} for others: its "
                                 "output changes shape with the input; read the images at one size")
            captured[name].append(value.cpu())
    lab = torch.cat(labels)
    z, out = torch.cat(zs), torch.cat(logits)
    layer_feats = {name: torch.cat(parts) for name, parts in captured.items()}
    broken = (lab == BROKEN).nonzero().flatten()
    if len(broken):
        files = getattr(data.dataset, "files", None)
        first = f"{files[start + int(broken[0])]}" if files is not None else f"item {start + int(broken[0])}"
        msg = f"{len(broken)} of {len(lab)} images of {data.name} could not be read (first: {first})"
        if strict:
            raise UnreadableImagesError(f"{msg}; remove or repair them, or run without --strict to skip them")
        log.warning("%s; they are skipped", msg)
        keep = lab != BROKEN
        z, out, lab = z[keep], out[keep], lab[keep]
        layer_feats = {name: x[keep] for name, x in layer_feats.items()}
    return Features(z, out, lab if bool((lab >= 0).all()) else None, tuple((broken + start).tolist()), layer_feats)


class FeatureCache:
    """On-disk cache of features under ``root`` (default ``<cache_dir>/features``), one folder of shards
    per (model, data set, precision); ``storage=torch.float16`` halves the disk and read volume.
    ``shard_items`` (default ``$OODLAB_SHARD_ITEMS``, else :data:`SHARD_ITEMS`) sets the items per shard:
    the unit of resumption and of the split between ``torchrun`` ranks."""

    def __init__(self, root: str | Path | None = None, shard_items: int | None = None,
                 storage: torch.dtype = torch.float32) -> None:
        shard_items = integer("shard_items", shard_items if shard_items is not None
                              else int(os.environ.get("OODLAB_SHARD_ITEMS") or SHARD_ITEMS), 1)
        if storage not in (torch.float32, torch.float16):
            raise ValueError(f"storage must be torch.float32 or torch.float16, got {storage}")
        self.root = Path(root) if root is not None else cache_dir() / "features"
        self.shard_items = int(shard_items)
        self.storage = storage
        self.extractions = 0  # data sets this cache object ran a forward pass over (in whole or in part)

    def _key(self, model_id: str, data: ImageSet, precision: torch.dtype | None) -> dict[str, str]:
        key = {"model": model_id, "data": data.fingerprint, "name": data.name, "shard_items": str(self.shard_items)}
        if precision is not None:
            key["precision"] = str(precision)
        if self.storage != torch.float32:
            key["storage"] = str(self.storage)
        return key

    def entry(self, key: dict[str, str]) -> Path:
        """The folder of the entry with ``key``."""
        return self.root / f"{key['name']}-{digest(json.dumps(key, sort_keys=True), length=24)}"

    def get(self, model: Classifier, model_id: str, data: ImageSet, batch_size: int = EXTRACT_BATCH,
            device: torch.device | str | None = None, autocast: bool | None = None,
            lazy: bool = False, layers: tuple[str, ...] = ()) -> Features | StoredFeatures:
        """Features of ``data`` through ``model`` (``model_id`` identifies its weights), extracted only where
        the cache lacks them: in memory, or with ``lazy`` backed by the shards on disk.

        ``layers`` (taps, :mod:`oodlab.features.layers`) adds intermediate-layer features. Each tap is an entry of
        its own beside ``z``'s (its shards hold the tap as ``z``, with the logits and labels), so adding a
        detector that reads layers leaves the other entries, and every score cached on them, as they are; the
        shards any entry lacks are computed in one forward pass. Under ``torchrun`` each rank extracts the
        missing shards of its own contiguous block, then all ranks wait for each other and read the whole entry.
        """
        if len(data) == 0:
            raise ValueError(f"data set {data.name} is empty")
        dev = torch.device(device) if device is not None else default_device()
        key = self._key(model_id, data, autocast_dtype(dev, autocast))
        keys = {None: key, **{name: {**key, "layer": name} for name in dict.fromkeys(layers)}}
        for name in keys:
            if name is not None:
                model.layer(split_tap(name)[0])  # before any pass: one line naming the layers the model has
        entries = {name: self.entry(k) for name, k in keys.items()}
        bounds = [(s, min(s + self.shard_items, len(data))) for s in range(0, len(data), self.shard_items)]
        records: dict[str | None, dict[int, dict]] = {name: {} for name in keys}
        todo: dict[int, list[str | None]] = {}
        for k in distributed.block(len(bounds)):
            for name in keys:
                record = check_shard(entries[name], k, keys[name], bounds[k])
                if record is None:
                    todo.setdefault(k, []).append(name)
                else:
                    records[name][k] = record
        if todo:  # refuse a disk that cannot hold the shards before the forward passes, not after
            rows = sum(bounds[k][1] - bounds[k][0] for k in todo)
            need = rows * ((model.feature_dim + model.num_classes) * self.storage.itemsize + 8)
            if free_bytes(entries[None]) < need:
                raise disk_full(entries[None], need)
        for i, (k, names) in enumerate(todo.items()):
            log.info("extracting %s shard %d/%d", data.name, i + 1, len(todo))
            taps = tuple(n for n in names if n is not None)
            feats = extract(model, data, batch_size, dev, autocast=autocast, start=bounds[k][0], stop=bounds[k][1],
                            layers=taps)
            for name in names:
                part = feats if name is None else Features(feats.layers[name], feats.logits, feats.labels, feats.skipped)
                entries[name].mkdir(parents=True, exist_ok=True)
                records[name][k] = write_shard(entries[name], k, keys[name], bounds[k], part, self.storage)
        if todo:
            self.extractions += 1
        distributed.barrier()
        stored = {}
        for name in keys:
            for k in range(len(bounds)):
                if k not in records[name]:  # another rank's shard, just written: read its sidecar, skip the re-hash
                    record = check_shard(entries[name], k, keys[name], bounds[k], verify=False)
                    if record is None:
                        raise RuntimeError(f"shard {k} of {data.name} is missing from {entries[name]}: a rank failed; "
                                           "run again to resume")
                    records[name][k] = record
            stored[name] = StoredFeatures(entries[name], [records[name][k] for k in range(len(bounds))])
        main = stored.pop(None)
        main.layers = stored
        return main if lazy else main.load()
