"""The benchmark runner: suite x model x detectors -> result rows, written as they finish.

Features of every data set are extracted once (and cached on disk), then every detector runs on
them, so a sweep of N detectors costs one forward pass per data set, not N. Detectors that must
see the input go back to the model for the evaluation sets only (the detector decides:
:meth:`Detector.fit_on` / :meth:`Detector.score_on`). A data set no detector of the run reads is not
extracted at all (:meth:`Detector.feature_sets`): the ID training set only when some detector fits
on its features and has not been fitted on them before, the held-out ID set likewise for detectors
that fit on it, the OOD sets only when some detector scores features.

Next to the feature cache, fitted detector states (keyed by model, training set and detector
settings), the per-sample scores of every detector (keyed by model, the exact features or images,
detector settings and fit data) and the confidence intervals (keyed by the scores) are cached too,
so a second run on the same model fits, scores and resamples nothing again. Fitting and model-path scoring are deterministic for a device and thread count;
each entry carries a SHA-256 of its tensors, and one that cannot be read or was altered is
recomputed (with a warning), never used.

Each finished detector appends its rows to ``results.jsonl`` and its per-sample scores to
``scores/<key>.npz``; a re-run with the same output folder skips what is already there, so an
interrupted benchmark resumes instead of starting over. A detector counts as done only when every
OOD set has its row, so a row lost to a truncated file is recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.suites import Suite
from ..detectors.base import Detector, fit_data
from .. import distributed
from ..features import FeatureCache, FeatureSource
from ..features.extraction import EXTRACT_BATCH
from ..metrics import confidence_intervals, evaluate
from ..models.adapter import Classifier
from ..runtime import (IntegrityError, append_whole, atomic_path, cached_json, digest, load_checked, progress,
                       save_checked)

__all__ = ["BenchContext", "detector_key", "run_detectors", "load_rows", "load_scores"]

log = logging.getLogger(__name__)


@dataclass
class BenchContext:
    """Everything a run needs besides the detectors: the suite, the model and where to write."""

    suite: Suite
    model: Classifier
    model_id: str
    out_dir: Path
    cache: FeatureCache
    batch_size: int = EXTRACT_BATCH
    device: torch.device | str | None = None

    def features(self, train: bool = True, ood: bool = True, layers: tuple[str, ...] = ()
                 ) -> tuple[FeatureSource | None, FeatureSource, dict[str, FeatureSource | None]]:
        """(ID train, ID test, {OOD name: features}), from the cache when possible and read from its shards
        on disk (never all in memory); ``train`` / ``ood`` False leave those sets unextracted (None).
        ID test is always read: it gives the ID accuracy. ``layers``: the intermediate-layer features to
        extract with them, in the same pass. Under ``torchrun`` every rank extracts its part."""
        get = lambda data: self.cache.get(self.model, self.model_id, data, self.batch_size, self.device,  # noqa: E731
                                          lazy=True, layers=layers)
        return (get(self.suite.id_train) if train else None, get(self.suite.id_test),
                {k: get(v) if ood else None for k, v in self.suite.ood.items()})


def detector_key(det: Detector) -> str:
    """File-safe identity of a detector and its hyperparameters, e.g. ``ash-s-1a2b3c4d``."""
    cfg = json.dumps(det.config(), sort_keys=True, default=str)
    return f"{det.name}-{digest(cfg, length=8)}"


def load_rows(out_dir: Path) -> list[dict[str, Any]]:
    """Rows already written to ``out_dir/results.jsonl``: a truncated line is ignored, and a row that two
    processes sharing the folder both wrote (the same detector, model and OOD set) is kept once."""
    path = Path(out_dir) / "results.jsonl"
    rows, seen = [], set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            ident = (row.get("key"), row.get("model_id"), row.get("ood"))
            if ident not in seen:
                seen.add(ident)
                rows.append(row)
    return rows


def load_scores(out_dir: Path, key: str) -> dict[str, np.ndarray]:
    """Per-sample scores of one detector: ``{"id": ..., "<ood name>": ...}`` (float64)."""
    with np.load(Path(out_dir) / "scores" / f"{key}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _cached(ctx: BenchContext, kind: str, *parts: str) -> Path:
    return Path(ctx.cache.root).parent / kind / digest(ctx.model_id, *parts, length=24)


def _fit_path(ctx: BenchContext, det: Detector) -> Path:
    data = fit_data(det, ctx.suite)  # ID train, or the held-out ID set for fits_on = "val"
    return _cached(ctx, "detectors", data.fingerprint if data is not None else "-",
                   detector_key(det)).with_suffix(".safetensors")


def _load_checked(path: Path, what: str, redo: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache entry (:func:`~oodlab.runtime.save_checked`); None, with a warning, when there is none
    or it is unusable: an unusable entry is recomputed, never used."""
    if not path.is_file():
        return None
    try:
        return load_checked(path)[0]
    except IntegrityError as exc:
        log.warning("%s cache entry %s is unusable (%s); %s", what, path.name, exc, redo)
        return None


def _load_fit(ctx: BenchContext, det: Detector) -> bool:
    """Restore ``det``'s state fitted earlier on this model's training features; True if there was one."""
    if fit_data(det, ctx.suite) is None:  # it reads only the head: nothing worth caching
        return False
    state = _load_checked(_fit_path(ctx, det), "fitted-detector", "refitting")
    if state is None:
        return False
    det.load_state_dict(state)
    return True


def _save_fit(ctx: BenchContext, det: Detector) -> None:
    save_checked(_fit_path(ctx, det), det.state_dict())


def _score(det: Detector, ctx: BenchContext, feats: FeatureSource | None, data) -> torch.Tensor:
    """Scores of one data set, cached by content: keyed by the detector's settings, what it was fitted on, and the
    exact features it scores (their cache entry) or, for the model path, the images and the batch."""
    fitted_on = fit_data(det, ctx.suite)  # a fitted detector's scores depend on what it was fitted on
    fit_part = [fitted_on.fingerprint] if fitted_on else []
    if "eval" in det.feature_sets():
        entry = getattr(feats, "entry", None)
        if entry is None:  # features not from the cache: nothing identifies them
            return det.score_on(ctx.model, data, feats, device=ctx.device)
        layers = [Path(feats.layer(name).entry).name for name in det.taps]  # the layer features it reads too
        parts = ("features", Path(entry).name, *layers, str(ctx.cache.storage), detector_key(det), *(fit_part or ["-"]))
    else:
        parts = (data.fingerprint, detector_key(det), str(det.model_batch), *fit_part)
    path = _cached(ctx, "scores", *parts).with_suffix(".safetensors")
    cached = _load_checked(path, "score", "recomputing")
    if cached is not None:
        return cached["scores"]
    scores = det.score_on(ctx.model, data, feats, device=ctx.device)
    save_checked(path, {"scores": scores})
    return scores


def _intervals(score_id: np.ndarray, score_ood: np.ndarray) -> dict[str, float]:
    """:func:`~oodlab.metrics.confidence_intervals` of two score arrays (95%: DeLong for AUROC, 1,000 bootstrap
    draws of seed 0 for FPR95), cached by their content: the same scores always give the same intervals."""
    key = ["intervals-v2|", score_id.astype(np.float64).tobytes(), b"|", score_ood.astype(np.float64).tobytes()]
    return cached_json("intervals", key, lambda: confidence_intervals(score_id, score_ood))


def run_detectors(ctx: BenchContext, detectors: list[Detector],
                  notes: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Fit and score every detector, append rows per detector, skip detectors already done. ``notes``
    (by detector name) are recorded in each of its rows under ``search`` (what a parameter search chose).

    Under ``torchrun`` every rank takes part in the extraction; then only rank 0 fits, scores and
    writes (the other ranks return an empty list)."""
    out = Path(ctx.out_dir)
    for det in detectors:  # layers=None becomes the model's stages before any key is taken
        det.layer_taps(ctx.model, ctx.suite.id_test)
    todo_at, cached_at = distributed.broadcast_object(_plan(ctx, detectors) if distributed.is_main() else None)
    todo = [detectors[i] for i in todo_at]
    if todo:
        cached = {id(detectors[i]) for i in cached_at}
        layers = tuple(dict.fromkeys(name for d in todo for name in d.taps))
        train, test, oods = ctx.features(train=any("train" in d.feature_sets() and id(d) not in cached for d in todo),
                                         ood=any("eval" in d.feature_sets() for d in todo), layers=layers)
        held = _held_out_features(ctx, [d for d in todo if id(d) not in cached], layers)
        if distributed.is_main():
            for det in progress(todo, desc="detectors", unit="detector", leave=True):
                _run_one(ctx, det, held if "val" in det.feature_sets() else train, test, oods, id(det) in cached,
                         (notes or {}).get(det.name))
    if not distributed.is_main():
        return []
    keys = {detector_key(d) for d in detectors}
    return [r for r in load_rows(out) if r["key"] in keys and r["model_id"] == ctx.model_id]


def _plan(ctx: BenchContext, detectors: list[Detector]) -> tuple[list[int], list[int]]:
    """(detectors whose rows are not all in ``results.jsonl`` yet, those of them whose fit is cached and now
    loaded), as indices. Rank 0 alone reads and writes the results folder and the fits; it sends the plan to
    the other ranks, so every rank takes the same collective steps."""
    out = Path(ctx.out_dir)
    _end_last_line(out / "results.jsonl")
    have: dict[tuple[str, str], set[str]] = {}
    for r in load_rows(out):
        have.setdefault((r["key"], r["model_id"]), set()).add(r["ood"])
    # a detector is done when every OOD set has its row: one cut short (truncated file) is recomputed
    todo = [i for i, d in enumerate(detectors)
            if not set(ctx.suite.ood) <= have.get((detector_key(d), ctx.model_id), set())]
    return todo, [i for i in todo if _load_fit(ctx, detectors[i])]


def _held_out_features(ctx: BenchContext, detectors: list[Detector], layers: tuple[str, ...] = ()) -> FeatureSource | None:
    """Features of the suite's held-out ID set (:meth:`Suite.held_out`) when a detector fits on its features;
    every rank takes part in the extraction, as for the other sets."""
    if not any("val" in d.feature_sets() for d in detectors):
        return None
    return ctx.cache.get(ctx.model, ctx.model_id, ctx.suite.held_out(), ctx.batch_size, ctx.device, lazy=True,
                         layers=layers)


def _run_one(ctx: BenchContext, det: Detector, train: FeatureSource | None, test: FeatureSource,
             oods: dict[str, FeatureSource | None], fit_cached: bool, note: dict[str, Any] | None) -> None:
    key = detector_key(det)
    t0 = time.perf_counter()
    if not fit_cached:
        data = fit_data(det, ctx.suite)
        det.fit_on(ctx.model, data, train if det.feature_sets() - {"eval"} else None, device=ctx.device)
        if data is not None:
            _save_fit(ctx, det)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = {"id": _score(det, ctx, test, ctx.suite.id_test).numpy()}
    for name, feats in oods.items():
        scores[name] = _score(det, ctx, feats, ctx.suite.ood[name]).numpy()
    score_s = time.perf_counter() - t0
    id_acc = _accuracy(det, test)
    with atomic_path(ctx.out_dir / "scores" / f"{key}.npz") as tmp:
        np.savez_compressed(tmp, **scores)
    base = {"detector": det.name, "key": key, "params": det.config(), "model_id": ctx.model_id,
            "suite": ctx.suite.name, "id_acc": id_acc, "fit_s": round(fit_s, 4), "fit_cached": fit_cached,
            "score_s": round(score_s, 4), **({"approximate": True} if det.approximate else {}),
            **({"search": note} if note is not None else {})}
    rows = [{**base, "ood": name, "group": ctx.suite.group_of(name), "kind": ctx.suite.kind_of(name),
             **evaluate(scores["id"], scores[name]),
             **_intervals(scores["id"], scores[name])}
            for name in oods]
    append_whole(ctx.out_dir / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))


def _accuracy(det: Detector, test: FeatureSource) -> float:
    """ID top-1 accuracy of the logits ``det`` classifies with, chunk by chunk (NaN without labels)."""
    if test.labels is None:
        return float("nan")
    right = sum(int((det.logits(c).argmax(1) == c.labels).sum()) for c in test.chunks())
    return right / len(test)


def _end_last_line(path: Path) -> None:
    """End a last line cut short (a truncated or half-copied results.jsonl) so the next row starts on its own line."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
    except OSError:  # no file yet, or an empty one (seek before the start)
        return
    if last != b"\n":
        log.warning("%s ends in a line cut short; it is ignored and its rows are recomputed", path)
        append_whole(path, "\n")
