"""OpenOOD's released checkpoints load as they are: parameter layout of its ResNet18_32x32 source, random values,
saved as best.ckpt, checked against an independent functional forward pass written here."""

import pytest
import torch
import torch.nn.functional as F

from openood_tree import resnet18_32x32_state
from oodlab.models.loaders import load_model
from oodlab.models.zoo import CheckpointError

CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100 = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))


def reference_forward(state, x, mean, std):
    """OpenOOD's forward written out: normalise, 3x3 stem (no max-pool), 4 stages of basic blocks, pool, fc."""
    def bn(t, p):
        return F.batch_norm(t, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"],
                            state[f"{p}.bias"], training=False, eps=1e-5)

    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = F.relu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"))
    for stage in range(1, 5):
        for block in (0, 1):
            p = f"layer{stage}.{block}"
            stride = 2 if block == 0 and stage > 1 else 1
            y = F.relu(bn(F.conv2d(out, state[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            y = bn(F.conv2d(y, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            short = bn(F.conv2d(out, state[f"{p}.shortcut.0.weight"], stride=stride), f"{p}.shortcut.1") \
                if f"{p}.shortcut.0.weight" in state else out
            out = F.relu(y + short)
    z = out.mean((2, 3))
    return z @ state["fc.weight"].T + state["fc.bias"], z


@pytest.mark.parametrize("classes, norm", [(10, CIFAR10), (100, CIFAR100)])
def test_resnet18_32x32_best_ckpt_loads_and_matches_an_independent_forward(classes, norm, tmp_path):
    state = resnet18_32x32_state(classes)
    assert len(state) == 122 and sum(v.numel() for k, v in state.items() if "num_batches" not in k and "running" not in k) \
        == 11_173_962 - 512 * 10 - 10 + 512 * classes + classes  # OpenOOD's count for 10 classes
    torch.save(state, tmp_path / "best.ckpt")
    loaded = load_model("openood:resnet18_32x32", tmp_path / "best.ckpt")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want_logits, want_z = reference_forward(state, x, *norm)
    with torch.no_grad():
        z = loaded.model.features(x)
        logits = loaded.model.head(z)
    torch.testing.assert_close(z, want_z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert loaded.model.num_classes == classes and loaded.input_shape == (3, 32, 32)
    assert loaded.prep.reader == "pil" and loaded.prep.resize == 32
    # the normalisation can be named: CIFAR-100's stats on a 10-class head give other logits
    other = load_model("openood:resnet18_32x32:cifar100" if classes == 10 else "openood:resnet18_32x32:cifar10",
                       tmp_path / "best.ckpt")
    with torch.no_grad():
        assert not torch.allclose(other.model(x), logits, atol=1e-3)


def test_resnet18_224x224_takes_torchvision_names(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=200).eval()
    torch.save(net.state_dict(), tmp_path / "best.ckpt")
    loaded = load_model("openood:resnet18_224x224", tmp_path / "best.ckpt")
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), net((x - mean) / std), rtol=1e-4, atol=1e-4)
    assert loaded.model.num_classes == 200 and loaded.input_shape == (3, 224, 224)


def test_other_networks_and_bad_names_are_one_line_errors(tmp_path):
    state = resnet18_32x32_state(10)
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.1")}, tmp_path / "cut.ckpt")
    with pytest.raises(CheckpointError, match="does not fit openood:resnet18_32x32"):
        load_model("openood:resnet18_32x32", tmp_path / "cut.ckpt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="no fc.weight"):
        load_model("openood:resnet18_32x32", tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="needs --weights"):
        load_model("openood:resnet18_32x32")
    with pytest.raises(ValueError, match="OpenOOD has no released network 'vit'"):
        load_model("openood:vit", tmp_path / "other.ckpt")
    torch.save(state, tmp_path / "best.ckpt")
    with pytest.raises(ValueError, match="unknown normalisation"):
        load_model("openood:resnet18_32x32:svhn", tmp_path / "best.ckpt")


def test_torchvision_weight_names_offline(tmp_path, monkeypatch):
    """``--weights IMAGENET1K_V1``: from torch's hub cache when there; offline and absent, one line naming the file."""
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(FileNotFoundError, match=r"put resnet18-f37072fd\.pth into .*hub/checkpoints"):
        load_model("torchvision:resnet18", "IMAGENET1K_V1")
    with pytest.raises(ValueError, match="no released weights 'IMAGENET9K'"):
        load_model("torchvision:resnet18", "IMAGENET9K")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert load_model("torchvision:resnet18", "IMAGENET1K_V1").model.num_classes == 1000


def test_timm_pretrained_goes_through_timm_and_offline_is_one_line(tmp_path, monkeypatch):
    import timm  # the test set-up installs timm; the core does not need it
    real = timm.create_model
    monkeypatch.setenv("OODLAB_CACHE", str(tmp_path / "cache"))

    def fake(name, pretrained=False, **kw):
        if pretrained:
            raise RuntimeError("offline: no Hugging Face cache entry")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake)
    with pytest.raises(FileNotFoundError, match="resnet18's pretrained weights are not in the Hugging Face cache"):
        load_model("timm:resnet18", "pretrained")
    released = real("resnet18", pretrained=False, num_classes=7)
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: released if pretrained
                        else real(name, pretrained=False, **kw))
    loaded = load_model("timm:resnet18", "pretrained")  # the "released" weights, stored as safetensors in the cache
    assert loaded.model.num_classes == 7 and (tmp_path / "cache" / "weights" / "timm-resnet18.safetensors").is_file()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(x)).all()
