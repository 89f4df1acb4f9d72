"""Models by name: torchvision and timm classifiers from weights files, checked and refused as they should be."""

import pytest
import torch

from oodlab.models import AdapterError, CheckpointError
from oodlab.models.loaders import load_model, read_state_dict


def _save(net, path):
    torch.save(net.state_dict(), path)
    return path


def test_torchvision_resnet_with_a_fine_tuned_head(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=3).eval()
    loaded = load_model("torchvision:resnet18", _save(net, tmp_path / "r18.pth"))
    assert loaded.model.num_classes == 3 and loaded.input_shape == (3, 224, 224)
    assert loaded.prep.resize == 256 and loaded.prep.interpolation == "bilinear"
    x = torch.rand(2, 3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net((x - mean) / std), atol=1e-5)
        assert loaded.model.feature_map(x).shape == (2, 512, 7, 7)  # ResNets keep their feature map
    again = load_model("torchvision:resnet18", tmp_path / "r18.pth")
    assert again.model_id == loaded.model_id
    other = load_model("torchvision:resnet18", _save(torchvision.models.resnet18(num_classes=3), tmp_path / "b.pth"))
    assert other.model_id != loaded.model_id  # the cache key follows the weights


def test_any_torchvision_model_with_a_final_linear(tmp_path):
    import torchvision

    net = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    loaded = load_model("torchvision:mobilenet_v3_small", _save(net, tmp_path / "m.pth"))
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        z = loaded.model.features(x)
        assert z.shape == (2, 1024) and torch.allclose(loaded.model.head(z), loaded.model(x))
    squeeze = torchvision.models.squeezenet1_0().eval()  # its classifier is a convolution
    with pytest.raises(AdapterError, match="not computed by one nn.Linear"):
        load_model("torchvision:squeezenet1_0", _save(squeeze, tmp_path / "s.pth"))


def test_timm_models(tmp_path):
    import timm
    net = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    loaded = load_model("timm:resnet18", _save(net, tmp_path / "t.pth"))
    assert loaded.model.num_classes == 3 and loaded.prep.size == 224 and loaded.prep.interpolation == "bicubic"
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3).eval()
    with pytest.raises(AdapterError, match="not one nn.Linear"):  # two heads (class and distillation)
        load_model("timm:deit_tiny_distilled_patch16_224", _save(deit, tmp_path / "deit.pth"))
    with pytest.raises(ValueError, match="needs --weights"):
        load_model("timm:resnet18")


def test_weights_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"fc.weight": Evil()}, bad)
    with pytest.raises(CheckpointError, match="never pickled code"):
        read_state_dict(bad)
    with pytest.raises(FileNotFoundError, match="no weights for torchvision:resnet18"):
        load_model("torchvision:resnet18", None)  # nothing in torchvision's cache here, nothing downloaded
    with pytest.raises(ValueError, match="no classification model"):
        load_model("torchvision:nope", bad)
