"""Every exportable detector: the ONNX (onnxruntime) and TorchScript guards equal the Python guard."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from oodlab.detectors import REGISTRY, ExportError, available, create
from oodlab.guard import Guard
from tiny_fixtures import image_set

EXPORTABLE = [n for n in available() if create(n).export_refusal is None]


def _images(data):
    return torch.stack([data.dataset[i][0] for i in range(len(data))])


def _guard(name, tiny):
    """Calibrated on its own ID set, so that no evaluated score ties with a calibration score."""
    det = create(name).fit(tiny.train, tiny.model.head)
    return Guard(tiny.model, det, (1, 8, 8), device="cpu").calibrate(image_set("val", 200, 4), alpha=0.2)


def test_every_detector_with_tensor_arithmetic_exports():
    assert {"msp", "maxlogit", "energy", "react", "ash-p", "ash-b", "ash-s", "dice", "dice-react", "mahalanobis",
            "vim", "knn", "flow"} <= set(EXPORTABLE)


@pytest.mark.parametrize("name", EXPORTABLE)
def test_exported_guard_equals_oodlab(name, tiny, tmp_path):
    guard = _guard(name, tiny)
    onnx_path = guard.export(tmp_path / f"{name}.onnx", "onnx")
    ts_path = guard.export(tmp_path / f"{name}.pt", "torchscript")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(ts_path))
    for data in (tiny.test_set, tiny.ood_set):
        want = guard.predict(data)
        x = _images(data)
        tol = 1e-4 * float(want.score.abs().mean())
        for got in (session.run(None, {"images": x.numpy()}), [t.numpy() for t in scripted(x)]):
            logits, score, p, flag = got
            np.testing.assert_allclose(score, want.score.numpy(), rtol=1e-4, atol=tol)
            np.testing.assert_allclose(logits, want.logits.numpy(), rtol=1e-4, atol=1e-5)
            assert np.array_equal(flag, want.is_ood.numpy())
            assert np.array_equal(p, want.p_value.numpy())
        one = session.run(None, {"images": x[:1].numpy()})  # the batch dimension is free
        np.testing.assert_allclose(one[1], want.score.numpy()[:1], rtol=1e-4, atol=tol)


def test_nan_input_is_flagged_by_the_exported_graph(tiny, tmp_path):
    guard = _guard("energy", tiny)
    session = ort.InferenceSession(str(guard.export(tmp_path / "g.onnx")), providers=["CPUExecutionProvider"])
    x = _images(tiny.test_set)[:4].clone()
    x[1] = float("nan")
    flags = session.run(None, {"images": x.numpy()})[3]
    assert flags[1] and flags.tolist() == [bool(f) or i == 1 for i, f in enumerate(guard(x[[0, 0, 2, 3]]).is_ood)]


@pytest.mark.parametrize("name,reason", [("odin", "must see the input"), ("ash-s", "must see the input"),
                                         ("flow", "export supports kind='glow'")])
def test_detectors_that_cannot_export_are_refused_by_name(name, reason, tiny, tmp_path):
    params = {"ash-s": {"feature_map": True}, "flow": {"kind": "realnvp", "blocks": 2}}.get(name, {})
    det = create(name, **params).fit(tiny.train, tiny.model.head)
    guard = Guard(tiny.model, det, (1, 8, 8), device="cpu").calibrate(tiny.test_set, alpha=0.2)
    with pytest.raises(ExportError, match=f"{name} cannot be exported: .*{reason}"):
        guard.export(tmp_path / "g.onnx")
    assert not (tmp_path / "g.onnx").exists()
    assert REGISTRY[name].name == name
