"""The guard: a classifier, a fitted detector and an ID calibration, as one object and one folder.

``Guard(model, detector, input_shape).calibrate(id_val, alpha=0.05)`` turns OOD scores into
decisions with a guaranteed false-alarm rate (see :mod:`oodlab.guard.conformal`). The calibration
set must be held-out ID data that neither the classifier nor the detector was fitted on: scores of
training images are more confident than those of new ID images, so calibrating on them would
flag more than alpha of new ID inputs.

A saved guard is data, not code: ``guard.json`` (detector name and config, rule, input
preprocessing, model fingerprint, a SHA-256 of every other file), ``detector.safetensors/.json``,
``calibration.safetensors`` and, for oodlab architectures, the model checkpoint itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from typing_extensions import Self

from ..data.base import ImageSet
from ..data.preprocessing import Preprocessing
from ..detectors.base import Detector, load_detector
from ..features import Features, extract
from ..features.extraction import batch_features, layer_paths
from ..models.adapter import Classifier, inference_input
from ..models.zoo import load_checkpoint, save_checkpoint, state_fingerprint
from .. import validate
from ..runtime import check_writable, default_device, file_sha256, save_safetensors, sha256_hex, writing
from .conformal import (FlagRateReport, benjamini_hochberg, flag_rate_test, p_values, rank_for_alpha, rank_for_tpr,
                        sorted_calibration)

__all__ = ["Guard", "GuardOutput", "GuardError"]

FORMAT = 1


class GuardError(ValueError):
    """A guard folder is missing, incomplete or altered, or a guard is used before calibration."""


@dataclass(frozen=True)
class GuardOutput:
    """Per input: the model's logits and class, the OOD score (higher = more ID), p-value and flag.

    ``skipped``: indices of images of the data set that could not be read (they have no row).
    """

    logits: Tensor
    pred: Tensor
    score: Tensor
    p_value: Tensor
    is_ood: Tensor
    skipped: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.score)


class Guard:
    """Guard a classifier: flag inputs whose detector score is too low for the ID calibration data.

    ``input_shape`` is (channels, height, width) of the images the model takes, in [0, 1] (the
    classifier normalises them itself), or a :class:`Preprocessing` that also says how image files
    are resized and cropped. The reported logits and class are the model's own; the detector only
    decides the flag. ``model_meta`` lets :meth:`load` rebuild the model: an oodlab checkpoint's
    metadata (the model then travels inside the folder) or ``{"source": "torchvision:NAME", "weights": FILE}``.
    """

    def __init__(self, model: Classifier, detector: Detector, input_shape: Sequence[int] | Preprocessing,
                 model_meta: dict[str, Any] | None = None, device: torch.device | str | None = None) -> None:
        if not isinstance(model, Classifier) or not isinstance(detector, Detector):
            raise ValueError(f"Guard(model, detector, ...) takes a Classifier and a fitted Detector, got "
                             f"{type(model).__name__} and {type(detector).__name__}")
        if not detector.fitted:
            raise GuardError(f"{detector.name} is not fitted: fit it on ID training features before guarding")
        if isinstance(input_shape, Preprocessing):
            self.prep = input_shape
        else:
            shape = validate.shape("input_shape (channels, size, size)", input_shape, 3)
            if shape[1] != shape[2]:
                raise ValueError(f"input_shape must be (channels, size, size) with square images, got {shape}")
            self.prep = Preprocessing(shape[1], shape[0])
        shape = self.prep.input_shape
        self.model, self.detector, self.input_shape = model.eval(), detector, shape
        self.model_meta = dict(model_meta) if model_meta else None
        self.device = torch.device(device) if device is not None else default_device()
        self.calibration: Tensor | None = None  # sorted float64 ID scores
        self.calibration_source = ""  # what the calibration scores came from (recorded in guard.json)
        self.rule: dict[str, float] = {}
        self.k = 0
        self._fast: Classifier | None = None

    # -- calibration ----------------------------------------------------------------------------
    def calibrate(self, id_val: ImageSet | Features | Tensor, alpha: float | None = None,
                  tpr: float | None = None) -> Self:
        """Store the scores of held-out ID data and the rule: ``alpha`` (default 0.05) or ``tpr``.

        ``id_val`` is an :class:`ImageSet`, its :class:`Features`, or the detector's scores on it.
        """
        if alpha is not None and tpr is not None:
            raise ValueError("give alpha (false-alarm rate) or tpr (fraction of ID accepted), not both")
        scores = id_val if isinstance(id_val, Tensor) else self._scores(id_val)[1]
        cal = sorted_calibration(scores)
        if tpr is not None:
            self.k, self.rule = rank_for_tpr(len(cal), tpr), {"tpr": float(tpr)}
        else:
            alpha = 0.05 if alpha is None else alpha
            self.k, self.rule = rank_for_alpha(len(cal), alpha), {"alpha": float(alpha)}
        self.calibration = cal
        self.calibration_source = (f"{id_val.name} ({len(id_val)} images, fingerprint {id_val.fingerprint})"
                                   if isinstance(id_val, ImageSet) else f"{type(id_val).__name__} of {len(cal)} inputs")
        return self

    @property
    def threshold(self) -> float:
        """The score below which an input is flagged: the k-th smallest calibration score."""
        return float(self._calibrated()[self.k - 1])

    def _calibrated(self) -> Tensor:
        if self.calibration is None:
            raise GuardError("the guard is not calibrated: call calibrate(id_val, alpha=...) first")
        return self.calibration

    # -- decisions ------------------------------------------------------------------------------
    def decide(self, logits: Tensor, scores: Tensor, fdr: float | None = None) -> GuardOutput:
        """Decisions from the model's logits and the detector's scores (BH over the batch when ``fdr``)."""
        cal = self._calibrated()
        p = p_values(cal, scores)
        flags = benjamini_hochberg(p, fdr) if fdr is not None else ~(scores.double() >= self.threshold)
        return GuardOutput(logits, logits.argmax(1), scores.double(), p, flags)

    @torch.no_grad()
    def __call__(self, x: Tensor, fdr: float | None = None) -> GuardOutput:
        """Decisions for a batch of images ``x`` (N, C, H, W) in [0, 1]."""
        self._check_batch(x)
        layers = self.detector.taps
        if self._fast is None:
            self._fast = self.model.for_inference(keep=layer_paths(self.model, layers)).to(self.device)
        xd = inference_input(x, self.device)
        z, logits, seen = batch_features(self._fast, xd, layers)
        logits = logits.float().cpu()
        scores = self.detector.score_batch(self._fast, xd, Features(z.float().cpu(), logits,
                                                                    layers={k: v.cpu() for k, v in seen.items()}))
        return self.decide(logits, scores, fdr)

    def predict(self, images: ImageSet | Features, fdr: float | None = None, strict: bool = False) -> GuardOutput:
        """Decisions for a whole data set (its features are extracted in batches).

        Unreadable images are skipped and listed in ``skipped``; with ``strict`` they raise.
        """
        logits, scores, skipped = self._scores(images, strict)
        return dataclasses.replace(self.decide(logits, scores, fdr), skipped=skipped)

    def flag_rate_report(self, stream: ImageSet | Features | Tensor, level: float = 0.01) -> FlagRateReport:
        """Realised flag rate on presumed-ID inputs (images, features or the detector's scores) vs the promise.

        A small p-value (``report.drift``) means the stream is no longer exchangeable with the
        calibration data: the false-alarm guarantee has stopped holding; recalibrate.
        """
        scores = stream if isinstance(stream, Tensor) else self._scores(stream)[1]
        flags = ~(scores.double() >= self.threshold)
        return flag_rate_test(flags, len(self._calibrated()), self.k, level)

    def _scores(self, data: ImageSet | Features, strict: bool = False) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        if isinstance(data, Features):
            return data.logits, self.detector.score_on(self.model, None, data, device=self.device), data.skipped
        if not isinstance(data, ImageSet):
            raise TypeError(f"expected an ImageSet or Features, got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError(f"{data.name} is empty")
        first = data.dataset[0][0]
        if tuple(first.shape) != self.input_shape:
            raise ValueError(f"{data.name} has images of shape {tuple(first.shape)}; this guard's model takes "
                             f"{self.input_shape} (channels, height, width)")
        feats = extract(self.model, data, device=self.device, strict=strict,
                        layers=self.detector.layer_taps(self.model, data))
        return feats.logits, self.detector.score_on(self.model, data, feats, device=self.device), feats.skipped

    def _check_batch(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4:
            raise ValueError(f"expected a float tensor of images (N, C, H, W), got "
                             f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"images of shape {tuple(x.shape[1:])}; this guard's model takes {self.input_shape} "
                             "(channels, height, width): resize / convert them first")
        if len(x) == 0:
            raise ValueError("the batch is empty")
        if not torch.isfinite(x).all():
            raise ValueError(f"{int((~torch.isfinite(x)).flatten(1).any(1).sum())} images contain NaN or inf values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"pixel values lie in [{lo:.3g}, {hi:.3g}]; the guard takes images in [0, 1] and "
                             "normalises them itself (divide uint8 images by 255, do not standardise)")

    # -- one folder -----------------------------------------------------------------------------
    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the guard into ``directory`` atomically (a crash leaves the old folder or none). An existing guard
        folder is replaced; anything else already at ``directory`` is refused unless ``overwrite``."""
        cal = self._calibrated()
        directory = check_guard_out(directory, overwrite)
        with writing(directory):
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            with writing(directory):
                self.detector.save(tmp / "detector")
                save_safetensors(tmp / "calibration.safetensors", {"scores": cal})
                model_file = None
                if self.model_meta and "arch" in self.model_meta:
                    save_checkpoint(self.model, tmp / "model", self.model_meta)
                    model_file = "model.safetensors"
                info = {
                    "format": FORMAT, "detector": self.detector.name, "config": self.detector.config(),
                    "rule": self.rule, "k": self.k, "n_calibration": len(cal), "threshold": self.threshold,
                    "calibration_source": self.calibration_source,
                    "input_shape": list(self.input_shape),
                    "preprocessing": {**self.prep.describe(), "range": [0, 1], "mean": self.model.mean.flatten().tolist(),
                                      "std": self.model.std.flatten().tolist()},
                    "model": {"fingerprint": state_fingerprint(self.model), "meta": self.model_meta, "file": model_file},
                    "files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir())},
                }
                info = json.loads(json.dumps(info, default=str))  # what guard.json will read back as
                info["sha256"] = _info_sha256(info)  # guard.json covers itself: every file of the folder is checked
                (tmp / "guard.json").write_text(json.dumps(info, indent=2, sort_keys=True))
                _replace_dir(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: Classifier | None = None,
             device: torch.device | str | None = None) -> "Guard":
        """Read a guard folder; refuses altered files and a model that is not the one it was built with.

        ``model`` is needed only for guards of models that are not oodlab architectures.
        """
        directory = Path(directory)
        info = _read_info(directory)
        for name, digest in info["files"].items():
            path = directory / name
            if not path.is_file():
                raise GuardError(f"guard folder {directory} lacks {name}; rebuild it with `oodlab guard build`")
            if file_sha256(path) != digest:
                raise GuardError(f"{path} was altered or truncated (checksum mismatch); rebuild the guard "
                                 "with `oodlab guard build`")
        try:
            detector = load_detector(directory / "detector")
            cal = load_file(str(directory / "calibration.safetensors"))["scores"]
        except (SafetensorError, KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise GuardError(f"guard folder {directory} is unreadable ({exc}); rebuild it") from exc
        meta = info["model"].get("meta") or {}
        if model is None:
            if info["model"].get("file"):
                model, _ = load_checkpoint(directory / info["model"]["file"])
            elif meta.get("source"):
                from ..models.loaders import load_model

                model = load_model(meta["source"], meta.get("weights")).model
            else:
                raise GuardError(f"the guard in {directory} was saved without its model (not an oodlab "
                                 "architecture): pass model= to Guard.load")
        if state_fingerprint(model) != info["model"]["fingerprint"]:
            raise GuardError(f"this model's weights (fingerprint {state_fingerprint(model)}) are not those the guard "
                             f"in {directory} was calibrated for ({info['model']['fingerprint']}); rebuild the guard "
                             "for this model")
        p = info.get("preprocessing", {})
        prep = Preprocessing(int(info["input_shape"][1]), int(info["input_shape"][0]), p.get("resize"),
                             p.get("interpolation", "bilinear"), p.get("reader", "pil"))
        guard = cls(model, detector, prep, info["model"].get("meta"), device)
        guard.calibration, guard.rule, guard.k = cal.double(), dict(info["rule"]), int(info["k"])
        guard.calibration_source = info.get("calibration_source", "")
        return guard

    def export(self, path: str | Path, format: str = "onnx") -> Path:
        """One model file whose forward maps images in [0, 1] to ``(logits, score, p_value, is_ood)``."""
        from .export import export_guard

        return export_guard(self, Path(path), format)


_REQUIRED = ("format", "detector", "rule", "k", "input_shape", "model", "files")


def check_guard_out(directory: str | Path, overwrite: bool = False) -> Path:
    """``directory`` if a guard may be written there: new, or a guard folder (replaced); anything else (a user's
    folder or file) only with ``overwrite``. Cheap: commands call it before any work."""
    directory = Path(directory)
    if directory.exists() and not overwrite and not (directory.is_dir() and (directory / "guard.json").is_file()):
        kind = "folder" if directory.is_dir() else "file"
        raise GuardError(f"{directory} is an existing {kind} that is not a guard folder; choose another --out, or "
                         "pass --overwrite to replace it")
    check_writable(directory)
    return directory


def _info_sha256(info: dict[str, Any]) -> str:
    return sha256_hex([json.dumps({k: v for k, v in info.items() if k != "sha256"}, sort_keys=True)])


def _read_info(directory: Path) -> dict[str, Any]:
    meta = directory / "guard.json"
    if not meta.is_file():
        raise GuardError(f"{directory} is not a guard folder (no guard.json); build one with `oodlab guard build`")
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GuardError(f"{meta} is not valid JSON ({exc}); rebuild the guard") from exc
    missing = [k for k in _REQUIRED if not isinstance(info, dict) or k not in info]
    if missing:
        raise GuardError(f"{meta} lacks {', '.join(missing)}; rebuild the guard with `oodlab guard build`")
    if info["format"] != FORMAT:
        raise GuardError(f"{meta} has format {info['format']}; this oodlab reads format {FORMAT}")
    if (not isinstance(info["model"], dict) or "fingerprint" not in info["model"] or not isinstance(info["files"], dict)
            or not isinstance(info["rule"], dict) or not isinstance(info["input_shape"], list)):
        raise GuardError(f"{meta} was edited into a shape oodlab did not write; rebuild the guard with `oodlab guard build`")
    if "sha256" in info:
        if info["sha256"] != _info_sha256(info):
            raise GuardError(f"{meta} was edited (checksum mismatch); rebuild the guard with `oodlab guard build`")
    else:  # written before guard.json covered itself
        warnings.warn(f"{meta} has no checksum of its own (an older guard): its other files are checked, it is not; "
                      "rebuild the guard to cover it", stacklevel=3)
    n = info.get("n_calibration")
    if not isinstance(info["k"], int) or not isinstance(n, int) or not 1 <= info["k"] <= n:
        raise GuardError(f"{meta}: k = {info['k']!r} is not a rank among its {n} calibration scores; rebuild the guard")
    return info


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an old one with two renames."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
