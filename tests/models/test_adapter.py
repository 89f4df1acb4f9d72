"""The Classifier adapter reproduces wrapped models exactly, or refuses; checkpoints round-trip."""

import pytest
import torch
from torch import nn

from oodlab.models import AdapterError, CheckpointError, Classifier, build, load_checkpoint, save_checkpoint


def test_torchvision_resnet_wrapped_exactly():
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    clf = Classifier.from_torchvision_resnet(net, probe=torch.rand(2, 3, 64, 64)).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        ref = net((x - clf.mean) / clf.std)
        assert torch.allclose(clf(x), ref, atol=1e-5)
        assert clf.features(x).shape == (3, 512) and clf.feature_map(x).shape == (3, 512, 2, 2)


class _Split(nn.Module):
    """A timm-like model; ``extra`` puts a layer between pooling and the classifier (MobileNetV3-style)."""

    def __init__(self, extra: bool) -> None:
        super().__init__()
        self.conv, self.fc, self.extra = nn.Conv2d(3, 8, 3), nn.Linear(8, 4), extra
        self.mid = nn.Linear(8, 8)

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, f, pre_logits=False):
        z = f.mean((2, 3))
        if pre_logits:
            return z
        return self.fc(self.mid(z) if self.extra else z)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_forward_split_accepts_consistent_model():
    clf = Classifier.from_forward_split(_Split(extra=False), torch.rand(2, 3, 16, 16))
    assert clf.feature_dim == 8 and clf.num_classes == 4


def test_forward_split_refuses_hidden_layers():
    with pytest.raises(AdapterError, match="does not reproduce"):
        Classifier.from_forward_split(_Split(extra=True), torch.rand(2, 3, 16, 16))


def test_head_must_be_linear():
    with pytest.raises(AdapterError, match="nn.Linear"):
        Classifier(nn.Identity(), nn.Identity(), nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("arch,shape", [("smallcnn", (1, 28, 28)), ("resnet18-cifar", (3, 32, 32))])
def test_checkpoint_round_trip(arch, shape, tmp_path):
    model = build(arch, 5, shape[0]).eval()
    path = save_checkpoint(model, tmp_path / "m", {"arch": arch, "num_classes": 5, "in_channels": shape[0]})
    loaded, meta = load_checkpoint(path)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["arch"] == arch


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    model = build("smallcnn", 5, 1)
    path = save_checkpoint(model, tmp_path / "m", {"arch": "smallcnn", "num_classes": 5, "in_channels": 1})
    path.with_suffix(".json").write_text('{"arch": "smallcnn", "num_classes": 7, "in_channels": 1}')
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(path)


def _with_bn_statistics(model: nn.Module) -> nn.Module:
    """Give every batch norm non-trivial running statistics and affine terms, so folding them matters."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model


@pytest.mark.parametrize("arch, shape", [("smallcnn", (1, 28, 28)), ("tv-resnet18", (3, 64, 64))])
def test_for_inference_folds_batch_norms_and_keeps_the_function(arch, shape):
    from oodlab.models.adapter import inference_input

    model = _with_bn_statistics(build(arch, num_classes=5, in_channels=shape[0])).train()
    fast = model.for_inference()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # all folded into convolutions
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and model.training  # original untouched
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        ref = model.eval()(x)
        got = fast(inference_input(x, torch.device("cpu")))
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
        assert torch.allclose(fast.features(x), model.features(x), atol=1e-4, rtol=1e-4)


def test_for_inference_keeps_a_body_fx_cannot_trace():
    class Dynamic(nn.Module):  # control flow on values: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else self.conv(x)

    model = _with_bn_statistics(Classifier(Dynamic(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
                                           nn.Linear(4, 3)))
    fast = model.for_inference()
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) and not fast.training
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fast(x), model.eval()(x), atol=1e-6)
