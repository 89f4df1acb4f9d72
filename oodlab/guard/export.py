"""A guard as one model file: ONNX (run with onnxruntime) or TorchScript (``torch.jit.load``).

The graph is preprocess -> features -> head -> detector score -> p-value -> flag, with the
detector's state and the calibration scores folded in as constants, so the deployed artefact
computes what the tested guard computes. Only detectors whose score is tensor arithmetic
(:meth:`~oodlab.detectors.base.Detector.tensor_score`) export; the others are refused by name.

Inputs are a float32 batch (N, C, H, W) in [0, 1] with the guard's C, H, W (N is free). The graph
cannot raise, so an input with NaN gets a NaN score and is flagged (``is_ood`` is ``not score >=
threshold``); validate inputs before the call where that matters.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..detectors.base import ExportError
from ..runtime import atomic_path

if TYPE_CHECKING:
    from .core import Guard

__all__ = ["GuardGraph", "export_guard", "FORMATS"]

FORMATS = ("onnx", "torchscript")
OUTPUTS = ("logits", "score", "p_value", "is_ood")


class GuardGraph(nn.Module):
    """``images -> (logits, score, p_value, is_ood)`` for one calibrated guard (float32 in, float64 scores)."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        det = guard.detector
        if (reason := det.export_refusal) is not None:
            raise ExportError(f"{det.name} cannot be exported: {reason}")
        self.model = guard.model.for_inference().cpu()
        self.detector = det
        cal = guard._calibrated()
        self.n, self.block = len(cal), max(1, math.ceil(math.sqrt(len(cal))))
        # #{cal <= s} in two steps, since ONNX has no binary search: whole blocks of `block` sorted scores
        # (their last members), then one block; NaN padding never counts. ~40x faster than n comparisons.
        padded = torch.full(((self.n // self.block + 1) * self.block,), float("nan"), dtype=torch.float64)
        padded[: self.n] = cal
        self.register_buffer("block_last", cal[self.block - 1 :: self.block].clone())
        self.register_buffer("blocks", padded.view(-1, self.block))
        self.register_buffer("threshold", torch.tensor(guard.threshold, dtype=torch.float64))
        self.constants = list(det.export_constants().items())
        for name, value in self.constants:
            self.register_buffer(f"detector_{name}", value)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        z = self.model.features(images)
        logits = self.model.head(z)
        score = self.detector.export_score(z, logits, {k: getattr(self, f"detector_{k}") for k, _ in self.constants})
        whole = (self.block_last[None, :] <= score[:, None]).sum(1)
        count = whole * self.block + (self.blocks[whole] <= score[:, None]).sum(1)
        p_value = (count + 1).double() / (self.n + 1)
        return logits, score, p_value, ~(score >= self.threshold)


def export_guard(guard: Guard, path: Path, format: str = "onnx") -> Path:
    """Write ``guard`` as one ``format`` file at ``path`` (atomically) and return the path."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    graph = GuardGraph(guard).eval().requires_grad_(False)
    example = torch.rand(2, *guard.input_shape)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporters' notes on tracing; the result is checked by the tests
        if format == "torchscript":
            torch.jit.save(torch.jit.trace(graph, (example,), check_trace=False), str(tmp))
        else:
            _onnx(graph, example, tmp)
    return path


def _onnx(graph: GuardGraph, example: Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as exc:
        raise ExportError("ONNX export needs the deploy extra: pip install 'oodlab[deploy]'") from exc
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=["images"], output_names=list(OUTPUTS),
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False)
    program.save(str(path), external_data=False)
