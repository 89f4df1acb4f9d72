"""The :class:`Classifier` adapter: ``features(x) -> z`` and a linear ``head``, for any network.

Every post-hoc detector reads only ``z``, ``head.weight`` and ``head.bias``. A few (ODIN, ASH on a
feature map) go back to the input; they use :meth:`Classifier.feature_map` and
:meth:`Classifier.pool`, never a network's private attributes. Input normalisation lives inside the
classifier, so data sets stay in [0, 1] and input-space perturbations (ODIN) are in pixel units.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, fx, nn
from torch.fx.experimental.optimization import fuse

from ..data.base import ImageSet
from ..validate import number, shape

__all__ = ["Classifier", "AdapterError", "inference_input"]


def inference_input(x: Tensor, device: torch.device) -> Tensor:
    """A batch moved to ``device``, images (N, C, H, W) in channels-last layout, for :meth:`Classifier.for_inference`."""
    if x.dim() == 4:
        return x.to(device, memory_format=torch.channels_last, non_blocking=True)
    return x.to(device, non_blocking=True)


class AdapterError(ValueError):
    """The wrapped network does not split into features + linear head as claimed."""


class _Fn(nn.Module):
    """A module around a function of another module (keeps that module's parameters registered)."""

    def __init__(self, owner: nn.Module, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.owner = owner
        self._fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self._fn(x)


class _KeepTracer(fx.Tracer):
    """fx tracer that keeps the named modules whole (leaves), so hooks on them still fire after tracing."""

    def __init__(self, keep: set[str]) -> None:
        super().__init__()
        self.keep = keep

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.keep or super().is_leaf_module(m, qualname)


class Classifier(nn.Module):
    """``logits = head(pool(body(normalise(x))))`` with ``z = pool(body(...))`` the penultimate features.

    body: input -> last feature map (or any tensor); pool: that tensor -> z (N, D); head: nn.Linear(D, C).
    """

    def __init__(self, body: nn.Module, pool: nn.Module, head: nn.Linear,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise AdapterError(f"the head must be an nn.Linear, got {type(head).__name__}")
        for v in mean:
            number("mean", v)
        for v in std:
            number("std", v, 0.0, low_open=True)
        self.body, self.pool, self.head = body, pool, head
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        #: (channels, height, width) the network was built for, when known (model loaders set it); None:
        #: any size the network accepts
        self.input_shape: tuple[int, int, int] | None = shape("input_shape", input_shape, 3) if input_shape else None

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def feature_map(self, x: Tensor) -> Tensor:
        """The body's output before pooling (the last block's feature map for CNNs)."""
        return self.body(self.normalise(x))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features z (N, D): after pooling, before the head."""
        return self.pool(self.feature_map(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @property
    def in_channels(self) -> int | None:
        """Channels the model takes: its input shape's, else those of its per-channel normalisation, else
        those of its first convolution; None when nothing says."""
        if self.input_shape is not None:
            return self.input_shape[0]
        if self.mean.numel() > 1:
            return self.mean.numel()
        conv = next((m for m in self.body.modules() if isinstance(m, nn.Conv2d)), None)
        return conv.in_channels if conv is not None else None

    @staticmethod
    def item_shape(data: ImageSet) -> tuple[int, ...]:
        """The shape of ``data``'s items: its preprocessing's when its files are read with one (no decoding),
        else the first item's."""
        ds = data.dataset
        prep = getattr(ds, "prep", None) or getattr(getattr(ds, "dataset", None), "prep", None)
        return tuple(prep.input_shape) if prep is not None else tuple(ds[0][0].shape)

    @torch.no_grad()
    def check_input(self, data: ImageSet) -> None:
        """Refuse, in one line naming expected vs got, a data set whose images this model cannot take
        (wrong channel count or size), before any batch runs: reads the first image, and when the
        model's input size is unknown, sends that one image through the network."""
        if len(data) == 0:
            raise ValueError(f"{data.name} is empty: there are no images to extract features from")
        got = self.item_shape(data)
        if len(got) != 3:
            raise ValueError(f"{data.name} has items of shape {got}; the model takes images (channels, height, width)")
        if self.input_shape is not None:
            if got != self.input_shape:
                raise ValueError(f"{data.name} has images of shape {got} but the model takes {self.input_shape} "
                                 "(channels, height, width): read them with the model's preprocessing")
            return
        channels = self.in_channels
        if channels is not None and got[0] != channels:
            raise ValueError(f"{data.name} has images with {got[0]} channel(s) (shape {got}) but the model takes "
                             f"{channels}: convert them (grayscale / RGB) first")
        param = next(self.parameters(), None)
        x = torch.zeros(1, *got, device=param.device if param is not None else "cpu")
        was_training = self.training
        self.eval()
        try:
            self.head(self.pool(self.body(self.normalise(x))))
        except (RuntimeError, ValueError, AssertionError) as exc:
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ValueError(f"{data.name} has images of shape {got} that the model cannot take ({first}); "
                             "give images of the size and channels it was built for") from None
        finally:
            self.train(was_training)

    def for_inference(self, keep: Sequence[str] = ()) -> "Classifier":
        """An eval-mode copy that computes the same function faster: for feature extraction and scoring.

        Batch norms are folded into the convolutions before them (``torch.fx`` fusion; a body that
        fx cannot trace is kept as it is) and weights use the channels-last layout, which oneDNN's
        CPU convolutions run about twice as fast. Outputs agree with this model's up to float
        rounding. Feed it inputs from :func:`inference_input`. ``keep``: body layers (see :meth:`layer`)
        that :meth:`capture` will read; they are traced as single modules so that they stay addressable, and
        fusion is skipped when it would remove one of them (a batch norm folded into its convolution).
        """
        clf = copy.deepcopy(self).eval()
        try:
            traced = _KeepTracer(set(keep)).trace(clf.body)
            fused = fuse(fx.GraphModule(clf.body, traced), no_trace=True)
            names = dict(fused.named_modules())
            if all(path in names for path in keep):
                clf.body = fused
        except Exception:  # noqa: BLE001 - fx tracing fails in many ways on dynamic code; fusion is optional
            pass
        for path in keep:  # a kept layer is fused on its own when no other kept layer lies inside it
            if path in dict(clf.body.named_modules()) and not any(k.startswith(path + ".") for k in keep):
                try:
                    clf.body.set_submodule(path, fuse(clf.body.get_submodule(path)))
                except Exception:  # noqa: BLE001 - as above
                    pass
        return clf.to(memory_format=torch.channels_last)

    # -- intermediate layers ------------------------------------------------------------------------
    def layer(self, path: str) -> nn.Module:
        """The body's module at ``path`` (a name of ``body.named_modules()``, e.g. ``"4"`` or ``"4.1.conv2"``);
        ValueError naming the layers it has when there is none."""
        modules = dict(self.body.named_modules())
        if path not in modules or path == "":
            top = ", ".join(n for n, _ in self.body.named_children()) or "none"
            deeper = next((n for n in modules if "." in n), None)
            raise ValueError(f"the model has no layer {path!r}; its body's layers are {top}"
                             + (f" (deeper ones by dotted path, e.g. {deeper!r})" if deeper else ""))
        return modules[path]

    @torch.no_grad()
    def stages(self, input_shape: Sequence[int]) -> list[str]:
        """The body's top-level layers that end a stage: each one after which the feature map's spatial size
        changes, and the last. For torchvision ResNets: the stem's ReLU and layer1-layer4; these are the
        layers multi-layer detectors (Mahalanobis ensemble, Gram) read by default, as their papers do."""
        children = list(self.body.named_children())
        if not children:
            raise ValueError("the model's body has no named layers: give the detector's layers explicitly")
        sizes: dict[str, tuple[int, ...]] = {}
        hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[2:])))
                 for name, m in children]
        was_training = self.training
        self.eval()
        param = next(self.parameters(), None)
        try:
            self.feature_map(torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu"))
        finally:
            for h in hooks:
                h.remove()
            self.train(was_training)
        order = [name for name, _ in children if name in sizes]
        return [a for a, b in zip(order, order[1:]) if sizes[a] != sizes[b]] + order[-1:]

    @contextmanager
    def capture(self, reductions: Mapping[str, Callable[[Tensor], Tensor]]) -> Iterator[dict[str, Tensor]]:
        """While open, every forward pass stores ``reductions[path](output of layer path)`` under ``path`` in the
        dict it yields (the reduction runs inside the hook, before a later in-place operation can change the
        output). Paths are those of :meth:`layer`."""
        out: dict[str, Tensor] = {}
        hooks = [self.layer(path).register_forward_hook(
            lambda _m, _i, o, path=path, fn=fn: out.__setitem__(path, fn(o))) for path, fn in reductions.items()]
        try:
            yield out
        finally:
            for h in hooks:
                h.remove()

    # -- wrapping networks built elsewhere ------------------------------------------------------
    @classmethod
    def from_torchvision_resnet(cls, model: nn.Module, mean: Sequence[float] = (0.485, 0.456, 0.406),
                                std: Sequence[float] = (0.229, 0.224, 0.225), probe: Tensor | None = None) -> "Classifier":
        """Wrap a torchvision ResNet (``fc`` head after ``avgpool``); checked on ``probe`` (default: random 2x3x224x224)."""
        needed = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
        missing = [n for n in needed if not hasattr(model, n)]
        if missing:
            raise AdapterError(f"not a torchvision ResNet: missing {', '.join(missing)}")
        m = model
        body = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
        clf = cls(body, nn.Sequential(m.avgpool, nn.Flatten(1)), m.fc, mean, std)
        clf.verify(model, probe if probe is not None else torch.rand(2, 3, 224, 224), normalised_input=True)
        return clf

    @classmethod
    def from_final_linear(cls, model: nn.Module, probe: Tensor, mean: Sequence[float] = (0.0,),
                          std: Sequence[float] = (1.0,)) -> "Classifier":
        """Wrap any network whose output is computed by one ``nn.Linear``: z is that layer's input.

        The head is found by running ``probe`` with hooks on every ``nn.Linear`` (the one whose output
        *is* the model's output), the body is a copy of the network with that layer replaced by an
        identity, and the probe check then confirms ``head(z) == model(x)``. Networks with a
        non-linear head are refused (AdapterError). ``feature_map`` is then ``z`` itself.
        """
        outputs: dict[str, Tensor] = {}
        hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
                 for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model((probe - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1))
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        name = next((n for n, o in outputs.items() if o is out), None)
        if name is None:
            raise AdapterError("the model's output is not computed by one nn.Linear (its last step is something "
                               "else, or it returns several heads): post-hoc methods need logits = W z + b. "
                               "Wrap it by hand with Classifier(body, pool, head)")
        body = copy.deepcopy(model)
        head = body.get_submodule(name)
        body.set_submodule(name, nn.Identity())
        clf = cls(body, nn.Flatten(1), head, mean, std)
        clf.verify(model, probe, normalised_input=True)
        return clf

    @classmethod
    def from_forward_split(cls, model: nn.Module, probe: Tensor, mean: Sequence[float] = (0.0,),
                           std: Sequence[float] = (1.0,)) -> "Classifier":
        """Wrap a model with timm's ``forward_features`` / ``forward_head(pre_logits=True)`` / ``get_classifier()``.

        Refuses (AdapterError) when ``head(features(x)) != model(x)`` on ``probe``, as for distilled
        DeiT (two heads) or MobileNetV3 (layers between pooling and the classifier).
        """
        for attr in ("forward_features", "forward_head", "get_classifier"):
            if not hasattr(model, attr):
                raise AdapterError(f"model has no {attr}(); wrap it with Classifier(body, pool, head) instead")
        head = model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise AdapterError(f"model.get_classifier() is {type(head).__name__}, not one nn.Linear: "
                               "post-hoc methods need logits = W z + b")
        clf = cls(_Fn(model, model.forward_features), _Fn(model, lambda f: model.forward_head(f, pre_logits=True)),
                  head, mean, std)
        clf.verify(model, probe, normalised_input=True)
        return clf

    @torch.no_grad()
    def verify(self, model: nn.Module, probe: Tensor, normalised_input: bool = False, atol: float = 1e-4) -> None:
        """Check on ``probe`` that this adapter reproduces ``model``'s logits; raise AdapterError if not."""
        was_training = model.training
        model.eval()
        try:
            ref = model(probe if not normalised_input else self.normalise(probe))
            got = self(probe)
        finally:
            model.train(was_training)
        if not isinstance(ref, Tensor) or ref.shape != got.shape or not torch.allclose(ref, got, atol=atol, rtol=1e-4):
            raise AdapterError(
                "head(features(x)) does not reproduce model(x) on the probe batch: this network has layers "
                "between its features and its linear classifier (or several heads). Wrap it by hand with "
                "Classifier(body, pool, head) so that logits = head(pool(body(x)))."
            )
