"""Features on disk in shards: written while they are extracted, read one shard at a time.

A cache entry is a folder of shards, each covering a fixed range of the data set's items
(``shard_items`` of them; the last may be shorter), so the split does not depend on how many
processes extracted it. Shard ``k`` is ``shard-0000k.safetensors`` (``z``, ``logits`` in the
storage dtype, ``labels`` int64) with a JSON sidecar holding the entry's key, its item range, its
row count, the unreadable items it skipped, whether every value is finite, and the SHA-256 of the
tensor file. Both are written atomically, tensor file first, so a sidecar always describes a
complete shard; a shard whose sidecar is missing, stale or does not match the file is rebuilt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from ..runtime import atomic_path, atomic_write_text, file_sha256, save_safetensors
from .core import Features, chunk_rows, missing_layer

__all__ = ["StoredFeatures", "shard_paths", "write_shard", "check_shard", "write_features"]

log = logging.getLogger(__name__)


def shard_paths(entry: Path, k: int) -> tuple[Path, Path]:
    """(tensor file, sidecar) of shard ``k`` of the entry folder ``entry``."""
    base = entry / f"shard-{k:05d}"
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def write_shard(entry: Path, k: int, key: dict[str, str], items: tuple[int, int], feats: Features,
                storage: torch.dtype) -> dict:
    """Write shard ``k`` (``feats`` of items ``[items[0], items[1])``) and return its sidecar record."""
    tensors, meta = shard_paths(entry, k)
    labels = feats.labels if feats.labels is not None else torch.full((len(feats),), -1, dtype=torch.long)
    with atomic_path(tensors) as tmp:
        save_safetensors(tmp, {"z": feats.z.to(storage), "logits": feats.logits.to(storage), "labels": labels.long()})
    record = {"key": key, "items": list(items), "rows": len(feats), "dim": feats.dim, "classes": feats.num_classes,
              "skipped": list(feats.skipped), "finite": feats.all_finite(), "dtype": str(storage),
              "sha256": file_sha256(tensors)}
    atomic_write_text(meta, json.dumps(record, sort_keys=True))
    return record


def check_shard(entry: Path, k: int, key: dict[str, str], items: tuple[int, int], verify: bool = True) -> dict | None:
    """The sidecar of shard ``k`` if the shard is complete and belongs to ``key`` (and, with ``verify``,
    its file matches the recorded SHA-256); else None, after removing what is there (with a warning)."""
    tensors, meta = shard_paths(entry, k)
    if not tensors.exists() and not meta.exists():
        return None
    try:
        record = json.loads(meta.read_text())
        if record.get("key") != key or record.get("items") != list(items):
            raise ValueError("key mismatch (stale entry)")
        if verify and record.get("sha256") != file_sha256(tensors):
            raise ValueError("checksum mismatch (corrupted file)")
        if verify:
            with safe_open(str(tensors), "pt") as f:
                if list(f.get_slice("z").get_shape()) != [record["rows"], record["dim"]]:
                    raise ValueError("row count or width mismatch (edited sidecar)")
        return record
    except Exception as exc:  # any unusable shard is rebuilt, never used
        log.warning("feature cache shard %s/%s is unusable (%s); rebuilding it", entry.name, tensors.name, exc)
        tensors.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        return None


def write_features(entry: str | Path, shards: Iterable[Features], key: dict[str, str] | None = None,
                   storage: torch.dtype = torch.float32) -> StoredFeatures:
    """Write ``shards`` (each one :class:`Features`, in order) as the entry folder ``entry`` and open it:
    how features made outside an extraction (e.g. synthetic ones) get into the on-disk format. Their
    intermediate-layer features go to entries of their own beside it (``ENTRY.layer-<name>``), as the cache
    keeps them."""
    entry = Path(entry)
    key = key or {"name": entry.name}
    records, start = [], 0
    layers: dict[str, list[dict]] = {}
    for k, feats in enumerate(shards):
        entry.mkdir(parents=True, exist_ok=True)
        records.append(write_shard(entry, k, key, (start, start + len(feats)), feats, storage))
        for name, x in feats.layers.items():
            sub = _layer_entry(entry, name)
            sub.mkdir(parents=True, exist_ok=True)
            layers.setdefault(name, []).append(write_shard(sub, k, {**key, "layer": name}, (start, start + len(feats)),
                                                           Features(x, feats.logits, feats.labels, feats.skipped),
                                                           storage))
        start += len(feats)
    stored = StoredFeatures(entry, records)
    stored.layers = {name: StoredFeatures(_layer_entry(entry, name), recs) for name, recs in layers.items()}
    return stored


def _layer_entry(entry: Path, name: str) -> Path:
    return entry.with_name(f"{entry.name}.layer-{name.replace(':', '-')}")


class StoredFeatures:
    """Features backed by the shards of a cache entry; nothing but the labels is held in memory.

    Implements the reading side of :class:`~oodlab.features.core.Features` (``chunks``, ``take``,
    ``shuffled_batches``, ``labels``, ``accuracy``, ``all_finite``); :meth:`load` reads everything
    into one :class:`Features` when that is wanted.
    """

    def __init__(self, entry: Path, records: list[dict]) -> None:
        if not records:
            raise ValueError(f"feature cache entry {entry} holds no shard")
        self.entry = Path(entry)
        self.records = records
        self._offsets = [0]
        for r in records:
            self._offsets.append(self._offsets[-1] + int(r["rows"]))
        self._labels: Tensor | None = None
        #: tap name -> the entry holding that intermediate layer's features (:meth:`FeatureCache.get` sets them)
        self.layers: dict[str, StoredFeatures] = {}

    def layer(self, name: str) -> StoredFeatures:
        """The features of intermediate layer ``name`` as ``z`` (their own entry, with the same logits and labels)."""
        if name not in self.layers:
            raise ValueError(missing_layer(name, self.layers))
        return self.layers[name]

    def __len__(self) -> int:
        return self._offsets[-1]

    def __repr__(self) -> str:
        return f"StoredFeatures({self.entry.name}: {len(self)} x {self.dim}, {len(self.records)} shards)"

    @property
    def dim(self) -> int:
        return int(self.records[0]["dim"])

    @property
    def num_classes(self) -> int:
        return int(self.records[0]["classes"])

    @property
    def skipped(self) -> tuple[int, ...]:
        return tuple(i for r in self.records for i in r["skipped"])

    @property
    def labels(self) -> Tensor | None:
        """Class ids (N,) for ID data, None when any item is unlabelled (read once, 8 bytes a row)."""
        if self._labels is None:
            parts = []
            for k in range(len(self.records)):
                with safe_open(str(shard_paths(self.entry, k)[0]), "pt") as f:
                    parts.append(f.get_tensor("labels"))
            self._labels = torch.cat(parts)
        return self._labels if bool((self._labels >= 0).all()) else None

    def all_finite(self) -> bool:
        return all(r["finite"] for r in self.records)

    def shard(self, k: int) -> Features:
        """Shard ``k`` in memory, float32."""
        t = load_file(str(shard_paths(self.entry, k)[0]))
        labels = t["labels"] if bool((t["labels"] >= 0).all()) else None
        return Features(t["z"].float(), t["logits"].float(), labels)

    def chunks(self, rows: int | None = None) -> Iterator[Features]:
        """Row blocks of at most ``rows`` rows, in order, reading one shard at a time."""
        rows = rows or chunk_rows(self.dim)
        for k in range(len(self.records)):
            yield from self.shard(k).chunks(rows)

    def take(self, idx: Tensor) -> Features:
        """The rows at ``idx``, in that order, reading only the shards that hold them."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        order = idx.argsort()
        sorted_idx = idx[order]
        offsets = torch.tensor(self._offsets)
        owner = torch.bucketize(sorted_idx, offsets[1:], right=True)
        parts = []
        for k in owner.unique().tolist():
            local = sorted_idx[owner == k] - self._offsets[k]
            parts.append(self.shard(k).take(local))
        z = torch.cat([p.z for p in parts]) if parts else torch.zeros(0, self.dim)
        logits = torch.cat([p.logits for p in parts]) if parts else torch.zeros(0, self.num_classes)
        inverse = order.argsort()
        labels = self.labels
        return Features(z[inverse], logits[inverse], labels[idx] if labels is not None else None)

    def shuffled_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        """Batches of ``z`` over shuffled shards: the shard order and the rows within each shard are
        permuted by ``generator``; rows left over at a shard's end open the next shard's first batch.
        With one shard this is exactly :meth:`Features.shuffled_batches` (one permutation of all rows)."""
        carry = torch.zeros(0, self.dim)
        shards = torch.randperm(len(self.records), generator=generator).tolist() if len(self.records) > 1 else [0]
        for k in shards:
            z = self.shard(k).z
            z = torch.cat([carry, z[torch.randperm(len(z), generator=generator)]])
            full = len(z) // batch_size * batch_size
            if full:
                yield from z[:full].split(batch_size)
            carry = z[full:]
        if len(carry):
            yield carry

    def accuracy(self) -> float:
        labels = self.labels
        if labels is None:
            raise ValueError("these features have no labels (OOD data)")
        right = sum(int((c.logits.argmax(1) == c.labels).sum()) for c in self.chunks())
        return right / len(self)

    def load(self) -> Features:
        """All shards in one in-memory :class:`Features`."""
        parts = [self.shard(k) for k in range(len(self.records))]
        labels = self.labels
        return Features(torch.cat([p.z for p in parts]), torch.cat([p.logits for p in parts]), labels, self.skipped,
                        {name: entry.load().z for name, entry in self.layers.items()})
