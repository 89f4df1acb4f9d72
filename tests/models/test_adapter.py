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
