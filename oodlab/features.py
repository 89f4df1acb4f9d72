"""Features: one data set seen through one model, ``(z, logits, labels)``, extracted once and cached.

The cache key is (checkpoint fingerprint, data set fingerprint, model tag); files are safetensors
with a JSON sidecar that records the key and a SHA-256 of the tensor file. A cache entry whose
key or checksum does not match, or that cannot be read, is rebuilt (with a warning), never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .data.base import BROKEN, ImageSet, batches
from .models.adapter import Classifier, inference_input
from .runtime import atomic_path, atomic_write_text, cache_dir, default_device, file_sha256, progress
from .validate import integer, tensor

__all__ = ["Features", "extract", "FeatureCache", "UnreadableImagesError"]

log = logging.getLogger(__name__)


class UnreadableImagesError(ValueError):
    """Some images of a data set could not be decoded and ``strict`` extraction was asked for."""


@dataclass(frozen=True)
class Features:
    """Penultimate features ``z`` (N, D), ``logits`` (N, C) and ``labels`` (N,) or None for OOD data.

    ``skipped`` lists the indices (in the data set) of images that could not be read: their rows are
    absent, so row ``i`` belongs to the ``i``-th readable item.
    """

    z: Tensor
    logits: Tensor
    labels: Tensor | None = None
    skipped: tuple[int, ...] = ()

    def __post_init__(self) -> None:  # shapes and dtypes only: NaN / inf are checked where they are read (fit, score)
        tensor("z", self.z, "ND")
        tensor("logits", self.logits, "NC")
        if self.z.shape[0] != self.logits.shape[0] or 0 in (self.z.shape[1], self.logits.shape[1]):
            raise ValueError(f"z must be (N, D) and logits (N, C) with the same N and D, C >= 1; got "
                             f"{tuple(self.z.shape)} and {tuple(self.logits.shape)}")
        if self.labels is not None:
            tensor("labels", self.labels, "N", floating=False)
            if self.labels.shape != (self.z.shape[0],):
                raise ValueError(f"labels must be ({self.z.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.z.shape[0]

    def accuracy(self) -> float:
        """Top-1 accuracy of ``logits`` against ``labels``."""
        if self.labels is None:
            raise ValueError("these features have no labels (OOD data)")
        return float((self.logits.argmax(1) == self.labels).float().mean())


def autocast_dtype(device: torch.device, autocast: bool | None) -> torch.dtype | None:
    """The reduced precision extraction runs in: by default bfloat16 (float16 where the GPU lacks it) on
    CUDA and none (float32) on the CPU; ``autocast=True`` / ``False`` forces it on / off."""
    if autocast is None:
        autocast = device.type == "cuda"
    if not autocast:
        return None
    return torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16


@torch.no_grad()
def extract(model: Classifier, data: ImageSet, batch_size: int = 512, device: torch.device | str | None = None,
            strict: bool = False, autocast: bool | None = None) -> Features:
    """Run ``model`` over ``data`` once (its fast inference copy, in eval mode), collecting z, logits and labels (on CPU).

    Images that cannot be decoded are skipped with a warning that counts them and names the first
    (``Features.skipped``); with ``strict`` they raise :class:`UnreadableImagesError` instead.
    On CUDA the forward pass runs under bfloat16 autocast by default (see :func:`autocast_dtype`);
    the features are stored in float32 either way.
    """
    batch_size = integer("batch_size", batch_size, 1)
    model.check_input(data)
    device = torch.device(device) if device is not None else default_device()
    fast = model.for_inference().to(device)
    dtype = autocast_dtype(device, autocast)
    zs, logits, labels = [], [], []
    for x, y in progress(batches(data, batch_size), desc=f"features {data.name}",
                         total=(len(data) + batch_size - 1) // batch_size, unit="batch"):
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            z = fast.features(inference_input(x, device))
            out = fast.head(z)
        zs.append(z.float().cpu())
        logits.append(out.float().cpu())
        labels.append(torch.as_tensor(y).long())
    lab = torch.cat(labels)
    z, out = torch.cat(zs), torch.cat(logits)
    broken = (lab == BROKEN).nonzero().flatten()
    if len(broken):
        files = getattr(data.dataset, "files", None)
        first = f"{files[int(broken[0])]}" if files is not None else f"item {int(broken[0])}"
        msg = f"{len(broken)} of {len(lab)} images of {data.name} could not be read (first: {first})"
        if strict:
            raise UnreadableImagesError(f"{msg}; remove or repair them, or run without --strict to skip them")
        log.warning("%s; they are skipped", msg)
        keep = lab != BROKEN
        z, out, lab = z[keep], out[keep], lab[keep]
    return Features(z, out, lab if bool((lab >= 0).all()) else None, tuple(broken.tolist()))


class FeatureCache:
    """On-disk cache of :class:`Features` under ``root`` (default ``<cache_dir>/features``)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "features"
        self.extractions = 0  # forward passes over a data set done by this cache object

    def _key(self, model_id: str, data: ImageSet, precision: torch.dtype | None) -> dict[str, str]:
        key = {"model": model_id, "data": data.fingerprint, "name": data.name}
        if precision is not None:
            key["precision"] = str(precision)
        return key

    def _paths(self, key: dict[str, str]) -> tuple[Path, Path]:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        base = self.root / f"{key['name']}-{digest}"
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def get(self, model: Classifier, model_id: str, data: ImageSet, batch_size: int = 512,
            device: torch.device | str | None = None, autocast: bool | None = None) -> Features:
        """Cached features of ``data`` through ``model`` (``model_id`` identifies its weights; the
        precision of the forward pass, see :func:`extract`, is part of the key)."""
        dev = torch.device(device) if device is not None else default_device()
        key = self._key(model_id, data, autocast_dtype(dev, autocast))
        tensors, meta = self._paths(key)
        cached = self._read(tensors, meta, key)
        if cached is not None:
            return cached
        feats = extract(model, data, batch_size, dev, autocast=autocast)
        self._write(feats, tensors, meta, key)
        self.extractions += 1
        return feats

    def _read(self, tensors: Path, meta: Path, key: dict[str, str]) -> Features | None:
        if not tensors.exists() and not meta.exists():
            return None
        try:
            info = json.loads(meta.read_text())
            if info.get("key") != key:
                raise ValueError("key mismatch (stale entry)")
            if info.get("sha256") != file_sha256(tensors):
                raise ValueError("checksum mismatch (corrupted file)")
            t = load_file(str(tensors))
            feats = Features(t["z"], t["logits"], t.get("labels"), tuple(info.get("skipped", ())))
            if len(feats) != info.get("n"):
                raise ValueError("length mismatch")
            return feats
        except Exception as exc:  # any unreadable entry is rebuilt, never used
            log.warning("feature cache entry %s is unusable (%s); rebuilding it", tensors.name, exc)
            tensors.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            return None

    def _write(self, feats: Features, tensors: Path, meta: Path, key: dict[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        t = {"z": feats.z.contiguous(), "logits": feats.logits.contiguous()}
        if feats.labels is not None:
            t["labels"] = feats.labels.contiguous()
        with atomic_path(tensors) as tmp:
            save_file(t, str(tmp))
        atomic_write_text(meta, json.dumps({"key": key, "sha256": file_sha256(tensors), "n": len(feats),
                                    "skipped": list(feats.skipped)}, sort_keys=True))
