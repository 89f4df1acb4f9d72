"""Models by name: oodlab checkpoints, ``torchvision:NAME``, ``timm:NAME`` and ``openood:NAME``, each with its
preprocessing.

``load_model(spec, weights)`` returns a :class:`LoadedModel`: the :class:`Classifier` (checked on a
probe batch), the id that keys the feature cache (weights + preprocessing), metadata, and the
:class:`~oodlab.data.preprocessing.Preprocessing` its inputs need. Weights files are read without
unpickling code (safetensors, or ``torch.load(..., weights_only=True)``). ``--weights`` may also
name released weights instead of a file: torchvision's (``IMAGENET1K_V1``, ``DEFAULT``), taken from
torch's hub cache, else through torchvision's own download; timm's ``pretrained``, through timm and
the Hugging Face cache. Offline and not cached, the error names the file to place and where.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..data.preprocessing import IMAGENET, Preprocessing
from ..runtime import atomic_path, cache_dir, digest, file_sha256, save_safetensors
from .adapter import AdapterError, Classifier
from .zoo import IMAGENET_MEAN, IMAGENET_STD, CheckpointError, checkpoint_fingerprint, load_checkpoint

__all__ = ["LoadedModel", "load_model", "read_state_dict", "arch_preprocessing", "MODEL_SOURCES"]

MODEL_SOURCES = ("an oodlab checkpoint (PATH.safetensors)", "torchvision:NAME", "timm:NAME", "openood:NAME")


@dataclass
class LoadedModel:
    """A classifier ready for oodlab, the id that keys its cached features, and how to feed it."""

    model: Classifier
    model_id: str
    prep: Preprocessing
    spec: str
    meta: dict[str, Any] = field(default_factory=dict)  # oodlab checkpoint metadata (arch ...) where there is one

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.prep.input_shape


def arch_preprocessing(arch: str, in_channels: int | None = None) -> Preprocessing:
    """The inputs an oodlab architecture takes: 28x28 grey for smallcnn, 32x32 RGB for the CIFAR ResNet,
    ImageNet's for the torchvision ones."""
    if arch == "smallcnn":
        return Preprocessing(28, in_channels or 1)
    if arch == "resnet18-cifar":
        return Preprocessing(32, in_channels or 3)
    return IMAGENET


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a PyTorch file read with ``weights_only=True``.

    A PyTorch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` (training checkpoints) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):
            reason = "it holds pickled objects other than tensors"
        raise CheckpointError(f"cannot read weights {path}: {reason} (oodlab reads safetensors or plain PyTorch "
                              "state dicts, never pickled code)") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


def _load_weights(net: nn.Module, state: dict[str, torch.Tensor], path: Path, spec: str) -> None:
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise CheckpointError(f"{path} does not fit {spec}: {detail}") from exc


def _head_classes(net: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The class count of the weights when they differ from ``net``'s head (its last nn.Linear)."""
    last = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        return None
    name, head = last[-1]
    w = state.get(f"{name}.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 2 and w.shape[0] != head.out_features else None


def _torchvision(name: str, weights: Path | None, num_classes: int | None) -> tuple[nn.Module, Preprocessing,
                                                                                    tuple, tuple, Path]:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"torchvision has no classification model {name!r}; see torchvision.models.list_models()")
    net = torchvision.models.get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}))
    enum = torchvision.models.get_model_weights(name)
    default = enum.DEFAULT if hasattr(enum, "DEFAULT") else next(iter(enum))
    prep, mean, std = IMAGENET, IMAGENET_MEAN, IMAGENET_STD
    tf = default.transforms()
    if hasattr(tf, "crop_size"):
        prep = Preprocessing(tf.crop_size[0], 3, tf.resize_size[0], tf.interpolation.value)
        mean, std = tuple(tf.mean), tuple(tf.std)
    weights = _torchvision_weights(name, enum, weights)
    return net, prep, mean, std, weights


def _torchvision_weights(name: str, enum, weights: Path | None) -> Path:
    """A weights file for ``torchvision:name``: the given file; released weights by enum name (``IMAGENET1K_V1``,
    ``DEFAULT``) from torch's hub cache, else downloaded by torchvision where the machine is online; with no
    ``weights``, the DEFAULT ones only when already cached (nothing is downloaded unasked)."""
    if weights is not None and (weights.is_file() or weights.suffix in (".pth", ".pt", ".safetensors", ".bin")):
        return weights
    tag = "DEFAULT" if weights is None else str(weights)
    try:
        released = enum.DEFAULT if tag == "DEFAULT" and hasattr(enum, "DEFAULT") else enum[tag]
    except KeyError:
        raise ValueError(f"torchvision:{name} has no released weights {tag!r} (and no such file); its weights: "
                         f"{', '.join(w.name for w in enum)}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(released.url)
    if cached.is_file():
        return cached
    if weights is None:
        raise FileNotFoundError(f"no weights for torchvision:{name}: pass --weights FILE (a state dict) or a released "
                                f"name such as {released.name}, or put torchvision's {cached.name} into {cached.parent}")
    try:
        torch.hub.load_state_dict_from_url(released.url, progress=False, check_hash=True)
    except Exception as exc:  # offline, refused, or a broken download: say which file to place where
        raise FileNotFoundError(f"torchvision:{name} weights {released} are not cached and could not be "
                                f"downloaded ({type(exc).__name__}): put {cached.name} into {cached.parent}, or "
                                "pass --weights FILE (a state dict)") from None
    return cached


def _timm(name: str, weights: Path | None, num_classes: int | None) -> tuple[nn.Module, Preprocessing, tuple, tuple, Path]:
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError as exc:
        raise ValueError("timm models need timm: pip install timm") from exc
    if weights is None:
        raise ValueError(f"timm:{name} needs --weights FILE (a state dict) or --weights pretrained")
    try:
        net = timm.create_model(name, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))
    except RuntimeError as exc:
        raise ValueError(f"timm has no model {name!r} ({exc})") from exc
    if str(weights) == "pretrained":  # timm's released weights, from the Hugging Face cache or its download
        try:
            released = timm.create_model(name, pretrained=True)
        except Exception as exc:
            raise FileNotFoundError(f"timm:{name}'s pretrained weights are not in the Hugging Face cache and could not "
                                    f"be downloaded ({type(exc).__name__}); pass --weights FILE (a state dict)") from None

        weights = cache_dir() / "weights" / f"timm-{name}.safetensors"
        weights.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights) as tmp:
            save_safetensors(tmp, released.state_dict())
    cfg = resolve_data_config({}, model=net)
    _, height, width = cfg["input_size"]
    if height != width:
        raise ValueError(f"timm:{name} takes {height}x{width} inputs; oodlab's image pipeline crops squares")
    prep = Preprocessing(height, 3, int(height / cfg.get("crop_pct", 0.875)), cfg.get("interpolation", "bicubic"))
    return net, prep, tuple(cfg["mean"]), tuple(cfg["std"]), weights


def _openood(name: str, weights: Path | None) -> tuple[nn.Module, Preprocessing, tuple, tuple, Path]:
    """OpenOOD's released ``name`` (``resnet18_32x32[:NORM]`` / ``resnet18_224x224[:NORM]``) with its state dict."""
    from .openood_nets import NORMALISATIONS, OPENOOD_NETS, build_openood, default_normalisation

    name, _, norm = name.partition(":")
    if name not in OPENOOD_NETS:
        raise ValueError(f"OpenOOD has no released network {name!r} that oodlab loads; available: "
                         f"{', '.join(OPENOOD_NETS)}")
    if weights is None:
        raise ValueError(f"openood:{name} needs --weights FILE: OpenOOD's s*/best.ckpt (a plain state dict)")
    state = read_state_dict(weights)
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise CheckpointError(f"{weights} is not an OpenOOD {name} checkpoint: it has no fc.weight")
    net, prep = build_openood(name, int(fc.shape[0]))
    norm = norm or default_normalisation(int(fc.shape[0]))
    if norm not in NORMALISATIONS:
        raise ValueError(f"openood:{name}:{norm}: unknown normalisation; use one of {', '.join(NORMALISATIONS)}")
    mean, std = NORMALISATIONS[norm]
    print(f"openood:{name}: {fc.shape[0]}-class head, {norm} mean {mean} / std {std} (OpenOOD's); another with "
          f"openood:{name}:{'|'.join(NORMALISATIONS)}", file=sys.stderr)
    return net, prep, mean, std, weights


def load_model(spec: str | Path, weights: str | Path | None = None, device: str | torch.device = "cpu",
               num_classes: int | None = None) -> LoadedModel:
    """The model named by ``spec``: an oodlab checkpoint path, ``torchvision:NAME``, ``timm:NAME`` or
    ``openood:NAME`` (OpenOOD's released ``resnet18_32x32`` / ``resnet18_224x224``).

    ``weights`` is a state-dict file, or released weights by name (see the module docstring).
    ``num_classes`` builds a head of that size (default: the weights').
    """
    text = str(spec)
    kind, _, name = text.partition(":")
    if kind not in ("torchvision", "timm", "openood") or not name:
        if weights is not None:
            raise ValueError("--weights is for torchvision:NAME, timm:NAME and openood:NAME models; an oodlab "
                             "checkpoint holds its own")
        model, meta = load_checkpoint(text, device)
        prep = arch_preprocessing(meta["arch"], meta["in_channels"])
        model.input_shape = prep.input_shape  # extract() then refuses images of another shape in one line
        return LoadedModel(model, checkpoint_fingerprint(text), prep, text, meta)
    wpath = Path(weights) if weights is not None else None
    if kind == "openood":
        net, prep, mean, std, wpath = _openood(name, wpath)
    else:
        loader = _torchvision if kind == "torchvision" else _timm
        net, prep, mean, std, wpath = loader(name, wpath, num_classes)
    state = read_state_dict(wpath)
    if kind != "openood" and num_classes is None and (found := _head_classes(net, state)) is not None:
        net = loader(name, wpath, found)[0]  # a fine-tuned head
    _load_weights(net, state, wpath, text)
    net.eval()
    probe = torch.rand(2, *prep.input_shape, generator=torch.Generator().manual_seed(0))
    if kind == "timm":
        model = Classifier.from_forward_split(net, probe, mean, std)
    elif all(hasattr(net, a) for a in ("fc", "avgpool", "layer4", "maxpool")):
        model = Classifier.from_torchvision_resnet(net, mean, std, probe=probe)
    else:
        try:
            model = Classifier.from_final_linear(net, probe, mean, std)
        except AdapterError as exc:
            raise AdapterError(f"{text}: {exc}") from exc
    model.input_shape = prep.input_shape
    model_id = digest(text, file_sha256(wpath), json.dumps(prep.describe(), sort_keys=True))
    return LoadedModel(model.to(device).eval(), model_id, prep, text, {"source": text, "weights": str(wpath.resolve())})
