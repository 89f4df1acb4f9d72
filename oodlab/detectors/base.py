"""The detector contract, the registry by name, and the one features-or-model dispatch.

A detector follows scikit-learn's estimator habits: the constructor validates and stores its
hyperparameters (the paper's defaults), :meth:`Detector.fit` learns from **ID data only** and returns
``self``, :meth:`Detector.score` gives one float64 score per sample with **higher = more ID**.
Learned state is a flat ``dict[str, Tensor]`` saved as safetensors + JSON, never pickled.

Most detectors read only cached :class:`~oodlab.features.Features` and the head (``needs =
"features"``); the few that must see the input (``needs = "model"``) implement
:meth:`Detector.score_inputs` (and, when they learn from ID images, :meth:`Detector.fit_inputs`).
Callers never branch on that: :meth:`Detector.fit_on` and :meth:`Detector.score_on` take the model,
the images and (when the caller has them) their features, and take the path the detector needs;
:meth:`Detector.feature_sets` says which cached feature sets a run must extract for it, and
:func:`fit_data` which ID images it fits on (ID train; the suite's held-out ID data for ``fits_on =
"val"`` methods such as KL-Matching, as their papers and OpenOOD do; none for ``needs_train = False``).
Model-path passes run in batches of :attr:`Detector.model_batch`.

Feature-path detectors whose score is plain tensor arithmetic implement
:meth:`Detector.tensor_score` (one batch of ``z`` and logits in, scores out, no Python branching on
the data): :meth:`Detector.score` runs it chunk by chunk, and a guard exports it into one ONNX /
TorchScript graph. The others say why in ``export_refusal``.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from typing_extensions import Self

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..data.base import ImageSet, batches
from ..features import FeatureCache, Features, FeatureSource, StoredFeatures, chunk_rows, extract
from ..features.layers import tap
from ..models.adapter import Classifier, inference_input
from ..registry import Registry
from ..runtime import atomic_path, atomic_write_text, default_device, progress, save_safetensors

if TYPE_CHECKING:
    from ..data.suites import Suite

__all__ = ["Detector", "NotFittedError", "ExportError", "REGISTRY", "register", "create", "available", "load_detector",
           "score_with_model", "fit_with_model", "fit_data", "fit_detector", "energy", "layer_list"]


class NotFittedError(RuntimeError):
    """``score`` was called before ``fit``."""


class ExportError(ValueError):
    """The detector's score is not tensor arithmetic that an exported graph can hold."""


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` in float64 (higher = more ID)."""
    return temperature * torch.logsumexp(logits.double() / temperature, dim=1)


class Detector(ABC):
    """Base class: subclasses set ``name``, implement ``_score`` and optionally ``_fit``/``logits``."""

    name: ClassVar[str]
    needs: ClassVar[str] = "features"
    needs_train: ClassVar[bool] = True  # False: fit reads only the head, so no training features are needed
    fits_on: ClassVar[str] = "train"  # "val": fit reads held-out ID data (Suite.held_out), not ID train
    score_chunk: ClassVar[int] = 65536  # rows per call of tensor_score in score(): bounds memory, not results
    model_batch: ClassVar[int] = 256  # images per model-path pass (fit_on / score_on): bounds memory, not results
    notes: ClassVar[str] = ""  # what a user must know about a variant or placement (shown by `oodlab list`)
    #: detectors that read intermediate layers: how each layer's output is reduced (:mod:`oodlab.features.layers`);
    #: they take a ``layers`` parameter (None: the model's stages, :meth:`Classifier.stages`)
    layer_reduction: ClassVar[str | None] = None
    layers: tuple[str, ...] | None = None

    def __init__(self) -> None:
        self.state: dict[str, Tensor] = {}
        self.fit_device = default_device()  # set by fit from its caller

    # -- public contract ----------------------------------------------------------------------
    def fit(self, train: FeatureSource | None, head: nn.Linear, *, device: torch.device | str | None = None) -> Self:
        """Learn ID statistics from ``train`` (ID training features, in memory or
        :class:`~oodlab.features.StoredFeatures` on disk: fits read them chunk by chunk) and the
        classifier's ``head``. ``train`` may be None for detectors with ``needs_train = False``.
        ``device``: where a fit that trains something (the flow) computes (default: CUDA when present).
        For ``fits_on = "val"`` detectors ``train`` is held-out ID data (see :func:`fit_data`).
        """
        if self.needs == "model" and self.needs_train:
            raise TypeError(f"{self.name} learns from ID images through the model: use fit_with_model(detector, model, data)")
        if not isinstance(head, nn.Linear):
            raise ValueError(f"head must be the classifier's nn.Linear (model.head), got {type(head).__name__}")
        if not torch.isfinite(head.weight).all() or (head.bias is not None and not torch.isfinite(head.bias).all()):
            raise ValueError("the head's weight or bias contains NaN or inf values; check the checkpoint")
        if train is not None and not isinstance(train, (Features, StoredFeatures)):
            raise ValueError(f"{self.name}.fit takes Features or StoredFeatures, got {type(train).__name__}")
        if train is None:
            if self.needs_train:
                raise ValueError(f"{self.name} learns from ID training features: pass them to fit")
        else:
            _check_features(train, "training features")
            if head.in_features != train.dim:
                raise ValueError(f"head expects {head.in_features}-d features but z is {train.dim}-d")
        self.state = _head_state(head)
        self.fit_device = torch.device(device) if device is not None else default_device()
        if train is not None:
            self._fit(train)
        return self

    def score(self, feats: FeatureSource) -> Tensor:
        """ID-ness score per sample, float64 (N,), higher = more in-distribution (chunk by chunk)."""
        self._check_fitted()
        if self.needs == "model":
            raise TypeError(f"{self.name} needs the model: use score_with_model(detector, model, data)")
        if not isinstance(feats, (Features, StoredFeatures)):
            raise ValueError(f"{self.name}.score takes Features or StoredFeatures, got {type(feats).__name__}")
        _check_features(feats, "features")
        if feats.dim != self.state["weight"].shape[1]:
            raise ValueError(f"{self.name} was fitted on {self.state['weight'].shape[1]}-d features, got {feats.dim}-d")
        s = self._score(feats).double()
        if s.shape != (len(feats),):
            raise AssertionError(f"{self.name} returned scores of shape {tuple(s.shape)}")
        return s

    def fit_on(self, model: Classifier, data: ImageSet | None, features: FeatureSource | None = None, *,
               device: torch.device | str | None = None) -> Self:
        """Fit on the ID images ``data`` (what :func:`fit_data` names; None when the detector reads only the
        head) through the path it needs: their ``features`` (extracted here when not given) and the head, or
        the images through ``model`` for model-path detectors that learn from images."""
        if self.needs == "model" and self.needs_train:
            if data is None:
                raise ValueError(f"{self.name} learns from ID images through the model: pass them")
            return fit_with_model(self, model, data, self.model_batch, device)
        if not self.needs_train:
            return self.fit(None, model.head, device=device)
        taps = self.layer_taps(model, data)
        if features is None:
            if data is None:
                raise ValueError(f"{self.name} learns from ID training features: pass the images or their features")
            features = extract(model, data, device=device, layers=taps)
        return self.fit(features, model.head, device=device)

    def score_on(self, model: Classifier, data: ImageSet | None, features: FeatureSource | None = None, *,
                 device: torch.device | str | None = None) -> Tensor:
        """Scores of the images ``data`` through the path the detector needs: their ``features`` (extracted
        here when not given), or the images through ``model``. Model-path detectors must see every image:
        features with unreadable images (``skipped``) are refused."""
        if self.needs == "model":
            if data is None:
                raise ValueError(f"{self.name} must see the images: pass an ImageSet, not features")
            if features is not None and features.skipped:
                raise ValueError(f"{len(features.skipped)} images of {data.name} could not be read and {self.name} "
                                 "must see every image: remove them, or use --strict to list the first")
            return score_with_model(self, model, data, self.model_batch, device)
        if features is None:
            if data is None:
                raise ValueError(f"{self.name} scores features: pass the images or their features")
            features = extract(model, data, device=device, layers=self.layer_taps(model, data))
        return self.score(features)

    def score_batch(self, model: Classifier, x: Tensor, features: Features) -> Tensor:
        """Scores of one batch of inputs ``x`` already on ``model``'s device, whose ``features`` (z, logits and the
        layer features :attr:`taps` names, on the CPU) the caller computed: what a guard runs per batch."""
        if self.needs == "model":
            return self.score_inputs(model, x).double().cpu()
        return self.score(features)

    def layer_taps(self, model: Classifier, data: ImageSet | None = None) -> tuple[str, ...]:
        """The intermediate-layer features this detector reads through ``model`` (taps ``"<layer>:<reduction>"``;
        none for detectors of ``z`` and the logits), checked against the layers ``model`` has. ``layers = None``
        becomes the model's stages for ``data``'s image shape, once: from then on :meth:`config` names them."""
        if self.layer_reduction is None:
            return ()
        if self.layers is None:
            shape = model.input_shape or (model.item_shape(data) if data is not None else None)
            if shape is None:
                raise ValueError(f"{self.name} reads the model's stages by default: pass the images, or give layers")
            self.layers = tuple(model.stages(shape))
        for path in self.layers:
            model.layer(path)
        return self.taps

    @property
    def taps(self) -> tuple[str, ...]:
        """Names of the layer features :meth:`fit` and :meth:`score` read (set ``layers`` or call :meth:`layer_taps`)."""
        if self.layer_reduction is None:
            return ()
        if self.layers is None:
            raise ValueError(f"{self.name} reads the model's stages by default, which only the model knows: fit it "
                             "through fit_on(model, data), or give layers=")
        return tuple(tap(path, self.layer_reduction) for path in self.layers)

    def feature_sets(self) -> frozenset[str]:
        """The cached feature sets a run extracts for this detector: ``"train"`` / ``"val"`` when its fit reads
        the features of ID train / the held-out ID set, ``"eval"`` when it scores features."""
        reads = set()
        if self.needs == "features":
            reads.add("eval")
            if self.needs_train:
                reads.add(self.fits_on)
        return frozenset(reads)

    def requirements(self) -> str:
        """What the detector reads, in words (``oodlab list``, ``oodlab fit``)."""
        what = "needs the model (it must see the input image)" if self.needs == "model" else "needs features"
        if self.layer_reduction is not None:
            where = ", ".join(self.layers) if self.layers is not None else "the model's stages (default)"
            what += f" of intermediate layers ({self.layer_reduction} of {where}; --param {self.name}.layers=A,B)"
        if not self.needs_train:
            return what + ", no training features"
        if self.fits_on == "val":
            return what + ", fits on held-out ID data (the suite's ID validation set, else a seeded 10% of ID train)"
        return what

    def logits(self, feats: Features) -> Tensor:
        """Logits this method classifies with (differs from the model's when it edits z or the head)."""
        return feats.logits

    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        """Scores of one batch as tensor arithmetic (what :meth:`score` runs per chunk and a guard exports)."""
        raise ExportError(f"{self.name} cannot be exported: {self.export_refusal}")

    def export_constants(self) -> dict[str, Tensor]:
        """Tensors the exported score reads (:meth:`export_score`), computed once when a guard is exported: by
        default none, and the exported score is :meth:`tensor_score`."""
        return {}

    def export_score(self, z: Tensor, logits: Tensor, constants: dict[str, Tensor]) -> Tensor:
        """The score an exported guard computes from :meth:`export_constants`: :meth:`tensor_score` unless a
        detector gives a form the runtimes run faster (its docstring says how far the two may differ)."""
        return self.tensor_score(z, logits)

    @property
    def export_refusal(self) -> str | None:
        """Why this detector cannot be exported as tensor arithmetic, or None when it can."""
        if self.needs == "model":
            return "it must see the input image, not only the features"
        if self.layer_reduction is not None:
            return "it reads intermediate layers, which the exported graph does not compute"
        if type(self).tensor_score is Detector.tensor_score:
            return "its score is not plain tensor arithmetic"
        return None

    def score_inputs(self, model: Classifier, x: Tensor) -> Tensor:
        """Scores for a batch of inputs ``x`` (only for ``needs = "model"`` detectors)."""
        raise TypeError(f"{self.name} scores cached features; call score(features)")

    def images_to_fit(self, data: ImageSet) -> ImageSet:
        """The part of ``data`` that :func:`fit_with_model` shows :meth:`fit_inputs` (default: all of it)."""
        return data

    def fit_inputs(self, model: Classifier, batches: Iterable[Tensor]) -> None:
        """Learn state from batches of ID inputs through ``model`` (only for model-path detectors with
        ``needs_train``; :func:`fit_with_model` calls it after storing the head)."""
        raise TypeError(f"{self.name} fits on features; call fit(features, head)")

    @property
    def approximate(self) -> bool:
        """True when the score is an approximation of the method's (e.g. an IVF neighbour search)."""
        return False

    @property
    def fitted(self) -> bool:
        return bool(self.state)

    @property
    def weight(self) -> Tensor:
        return self.state["weight"]

    @property
    def bias(self) -> Tensor:
        return self.state["bias"]

    def config(self) -> dict[str, Any]:
        """Hyperparameters: the constructor's arguments by name."""
        params = inspect.signature(type(self).__init__).parameters
        return {p: getattr(self, p) for p in params if p != "self"}

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Tensor]) -> Self:
        self.state = {k: v.clone() for k, v in state.items()}
        return self

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` (fitted state) and ``path.json`` (name + config)."""
        self._check_fitted()
        path = Path(path).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_safetensors(tmp, self.state)
        atomic_write_text(path.with_suffix(".json"), json.dumps({"detector": self.name, "config": self.config()}, indent=2))
        return path

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- hooks -------------------------------------------------------------------------------
    def _fit(self, train: FeatureSource) -> None:
        """Learn extra state from ID training features (default: nothing beyond the head)."""

    def _score(self, feats: FeatureSource) -> Tensor:
        """Default: :meth:`tensor_score` over chunks of at most :attr:`score_chunk` rows."""
        if type(self).tensor_score is Detector.tensor_score:
            raise TypeError(f"{type(self).__name__} must implement tensor_score, _score or score_inputs")
        return torch.cat([self.tensor_score(c.z, c.logits) for c in feats.chunks(min(self.score_chunk, chunk_rows(feats.dim)))])

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise NotFittedError(f"{self.name} is not fitted: call fit(train_features, head) first")


def _head_state(head: nn.Linear) -> dict[str, Tensor]:
    """The head's weight and bias (zeros without one) as float32 CPU copies: every fitted state starts with them."""
    return {"weight": head.weight.detach().float().cpu().clone(),
            "bias": (head.bias.detach() if head.bias is not None else torch.zeros(head.out_features)).float().cpu().clone()}


def layer_list(value: Any) -> tuple[str, ...] | None:
    """A ``layers`` parameter: None (the model's stages), or layer paths as a sequence or a comma list (``"2,9"``;
    the CLI's ``--param det.layers=2,9`` gives the tuple ``(2, 9)``), as a tuple of names."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if isinstance(items, int) and not isinstance(items, bool):
        items = [items]
    if not isinstance(items, (list, tuple)) or not items or not all(
            isinstance(v, str) and v or isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"layers must be layer paths such as '2,9' or ['layer3', 'layer4'], got {value!r} "
                         "(quote a dotted path on the command line: layers='\"4.10\"')")
    return tuple(str(v) for v in items)


def _check_features(feats: FeatureSource, what: str) -> None:
    if len(feats) == 0:
        raise ValueError(f"{what} are empty (0 samples): pass at least one")
    if not feats.all_finite():
        where = ""
        if isinstance(feats, Features):
            bad = int((~torch.isfinite(feats.z)).any(1).sum()) + int((~torch.isfinite(feats.logits)).any(1).sum())
            where = f" (in {bad} rows of z / logits)"
        raise ValueError(f"{what} contain NaN or inf values{where}; check the model and the input data")


REGISTRY: Registry[type[Detector]] = Registry("detector")


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    return REGISTRY.add(cls.name, cls)


def available() -> list[str]:
    """Registered detector names, sorted."""
    return REGISTRY.names()


def create(name: str, **params: Any) -> Detector:
    """A new detector by registry name, e.g. ``create("ash-b", percentile=65)``."""
    cls = REGISTRY.get_named(name)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:  # a wrong keyword, or a value the constructor refused
        raise ValueError(f"bad parameters for {name}: {exc}") from exc


def load_detector(path: str | Path) -> Detector:
    """Load a detector written by :meth:`Detector.save` (no pickle involved)."""
    path = Path(path).with_suffix(".safetensors")
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        raise FileNotFoundError(f"detector {path} (and its .json) not found; fit one with `oodlab fit`")
    try:
        info = json.loads(meta.read_text())
        name, config = info["detector"], info["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta} is not a detector description ({exc!r}); fit the detector again") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{meta}: 'config' must be a mapping of parameters; fit the detector again")
    try:
        det = create(name, **config)
    except (ValueError, TypeError) as exc:  # edited by hand: a wrong type or range, an unknown name or parameter
        raise ValueError(f"{meta}: {exc}; fix the file or fit the detector again") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is truncated or not a safetensors file ({exc}); fit the detector again") from exc
    return det.load_state_dict(state)


def score_with_model(detector: Detector, model: Classifier, data: ImageSet, batch_size: int = 256,
                     device: torch.device | str | None = None) -> Tensor:
    """Scores of a ``needs = "model"`` detector over a whole data set, batch by batch, on the model's fast
    inference copy (:meth:`Classifier.for_inference`); float64, on the CPU."""
    detector._check_fitted()
    model.check_input(data)
    device = torch.device(device) if device is not None else default_device()
    fast = model.for_inference().to(device)
    out = [detector.score_inputs(fast, inference_input(x, device)).double().cpu()
           for x, _ in progress(batches(data, batch_size), desc=f"{detector.name} {data.name}",
                                total=(len(data) + batch_size - 1) // batch_size, unit="batch")]
    return torch.cat(out)


def fit_with_model(detector: Detector, model: Classifier, data: ImageSet, batch_size: int = 256,
                   device: torch.device | str | None = None) -> Detector:
    """Fit a model-path detector that learns from ID images (``needs = "model"`` and ``needs_train``): the head
    is stored as in :meth:`Detector.fit`, then :meth:`Detector.fit_inputs` sees ``data`` batch by batch on the
    model's fast inference copy. Returns the detector."""
    if not (detector.needs == "model" and detector.needs_train):
        raise TypeError(f"{detector.name} does not learn from images through the model; call fit(features, head)")
    if len(data) == 0:
        raise ValueError(f"{data.name} is empty: {detector.name} needs ID images to fit on")
    model.check_input(data)
    data = detector.images_to_fit(data)
    detector.state = _head_state(model.head)
    device = torch.device(device) if device is not None else default_device()
    fast = model.for_inference().to(device)
    detector.fit_inputs(fast, (inference_input(x, device) for x, _ in
                               progress(batches(data, batch_size), desc=f"fit {detector.name} {data.name}",
                                        total=(len(data) + batch_size - 1) // batch_size, unit="batch")))
    return detector


def fit_data(detector: Detector, suite: Suite) -> ImageSet | None:
    """The ID images ``detector`` fits on: None (it reads only the head), ``suite.id_train``, or for
    ``fits_on = "val"`` the suite's held-out ID data (:meth:`Suite.held_out`)."""
    if not detector.needs_train:
        return None
    if detector.fits_on == "val":
        return suite.held_out()
    if detector.fits_on != "train":
        raise ValueError(f"{detector.name}: fits_on must be 'train' or 'val', got {detector.fits_on!r}")
    return suite.id_train


def fit_detector(detector: Detector, model: Classifier, model_id: str, suite: Suite, cache: FeatureCache | None = None,
                 batch_size: int = 512, device: torch.device | str | None = None) -> Detector:
    """Fit ``detector`` for ``model`` on what it reads from ``suite`` (:func:`fit_data`): features from the
    (on-disk, streamed) ``cache``, or images through the model for model-path fits. Returns the detector."""
    data = fit_data(detector, suite)
    feats = None
    if detector.feature_sets() - {"eval"}:
        feats = (cache or FeatureCache()).get(model, model_id, data, batch_size, device, lazy=True,
                                              layers=detector.layer_taps(model, data))
    return detector.fit_on(model, data, feats, device=device)
