import math

import pytest
import torch
from torch import nn

from oodlab.detectors import create, energy, score_with_model
from oodlab.detectors.ash import ash, kept_count
from oodlab.features import Features
from oodlab.models.adapter import Classifier

Z = torch.tensor([[1.0, 5.0, 3.0, 2.0], [0.0, 4.0, 0.0, 8.0]])


def head(w, b):
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data, lin.bias.data = w.clone(), b.clone()
    return lin


W = torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.0, 0.2, -0.3, 1.0]])
B = torch.tensor([0.1, -0.2])


def feats(z):
    return Features(z, z @ W.T + B)


def test_kept_count_rounds_half_to_even_like_numpy():
    assert kept_count(128, 90) == 13  # 128 - round(115.2)
    assert kept_count(10, 65) == 4  # round(6.5) = 6 (half to even), so 10 - 6
    assert kept_count(10, 75) == 2  # round(7.5) = 8
    assert kept_count(2048, 0) == 2048


def test_ash_p_keeps_the_top_values():
    out = ash(Z, 50, "p")
    assert torch.equal(out, torch.tensor([[0.0, 5, 3, 0], [0, 4, 0, 8]], dtype=torch.float64))


def test_ash_b_fill_value_is_s1_over_k():
    out = ash(Z, 50, "b")  # k = 2; s1 = 11 and 12
    assert torch.equal(out, torch.tensor([[0.0, 5.5, 5.5, 0], [0, 6, 0, 6]], dtype=torch.float64))


def test_ash_s_scale_is_exp_s1_over_s2():
    out = ash(Z, 50, "s")  # s1 = 11, s2 = 8; s1 = s2 = 12
    expected = torch.tensor([[0.0, 5, 3, 0], [0, 4, 0, 8]], dtype=torch.float64)
    expected[0] *= math.exp(11 / 8)
    expected[1] *= math.e
    assert torch.allclose(out, expected, rtol=1e-12)


def test_ash_does_not_edit_its_input():
    z = Z.clone()
    ash(z, 50, "s")
    assert torch.equal(z, Z)


def test_ash_s_of_an_all_zero_sample_is_zero_not_nan():
    assert torch.equal(ash(torch.zeros(1, 4), 50, "s"), torch.zeros(1, 4, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["p", "b", "s"])
def test_detector_scores_energy_of_the_shaped_features(variant):
    det = create(f"ash-{variant}", percentile=50).fit(feats(Z), head(W, B))
    shaped = ash(Z, 50, variant)
    expected = torch.logsumexp(shaped @ W.double().T + B.double(), dim=1)
    assert torch.allclose(det.score(feats(Z)), expected, rtol=1e-12)
    assert torch.allclose(det.logits(feats(Z)), shaped @ W.double().T + B.double(), rtol=1e-12)


def test_percentile_zero_limits():
    f, h = feats(Z), head(W, B)
    plain = energy(f.logits)
    assert torch.allclose(create("ash-p", percentile=0).fit(f, h).score(f), plain, rtol=1e-6)
    # ASH-S at 0 keeps everything and scales by exp(1); ASH-B at 0 replaces z by its mean
    zd = Z.double()
    assert torch.allclose(create("ash-s", percentile=0).fit(f, h).score(f),
                          energy(math.e * zd @ W.double().T + B.double()), rtol=1e-12)
    mean_z = zd.mean(1, keepdim=True).expand_as(zd)
    assert torch.allclose(create("ash-b", percentile=0).fit(f, h).score(f),
                          energy(mean_z @ W.double().T + B.double()), rtol=1e-12)


def test_percentile_that_keeps_nothing_is_refused():
    with pytest.raises(ValueError, match="percentile"):
        create("ash-s", percentile=100)
    det = create("ash-p", percentile=99).fit(feats(Z), head(W, B))  # 4 - round(3.96) = 0 kept
    with pytest.raises(ValueError, match="keeps no activation"):
        det.score(feats(Z))


def test_feature_map_mode_equals_pooled_mode_when_pool_is_flatten(make_images):
    # body: 8x8 input -> (N, 6, 1, 1) map; pool = flatten, so shaping the map is shaping z
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Conv2d(1, 6, 8), nn.ReLU()), nn.Flatten(1), nn.Linear(6, 3)).eval()
    data = make_images("x", 20, 5)
    x = data.dataset.images.float() / 255
    with torch.no_grad():
        z = model.features(x)
        f = Features(z, model.head(z))
    for name in ("ash-p", "ash-b", "ash-s"):
        pooled = create(name, percentile=50).fit(f, model.head).score(f)
        mapped = create(name, percentile=50, feature_map=True)
        assert "eval" not in mapped.feature_sets()
        mapped.fit(f, model.head)
        assert torch.allclose(score_with_model(mapped, model, data, batch_size=7, device="cpu"), pooled, rtol=1e-5)


def test_feature_map_mode_shapes_the_whole_map_before_pooling(tiny):
    det = create("ash-s", percentile=80, feature_map=True).fit(tiny.train, tiny.model.head)
    x = tiny.test_set.dataset.images[:5].float() / 255
    with torch.no_grad():
        fmap = tiny.model.feature_map(x)  # (5, 8, 4, 4): 128 values per sample, 26 kept
        shaped = ash(fmap, 80, "s").float().reshape(fmap.shape)
        assert int((shaped != 0).sum(dim=(1, 2, 3)).max()) <= 26
        expected = energy(tiny.model.head(tiny.model.pool(shaped)))
    assert torch.allclose(det.score_inputs(tiny.model, x), expected, rtol=1e-5)
    with pytest.raises(TypeError, match="needs the model"):
        det.score(tiny.test)


@pytest.mark.parametrize("arch, shape", [("smallcnn", (3, 1, 28, 28)), ("resnet18-cifar", (2, 3, 32, 32))])
def test_feature_map_mode_shapes_the_block_output_after_its_final_relu(arch, shape):
    """pytorch-ood's placement: the map ASH shapes is the last block's output after its ReLU (so never negative)."""
    from oodlab.detectors import REGISTRY
    from oodlab.models.zoo import build

    torch.manual_seed(0)
    model = build(arch, 4, shape[1]).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        fmap = model.feature_map(x)
        assert fmap.dim() == 4 and float(fmap.min()) == 0.0  # post-ReLU: zeros, no negative values
        expected = energy(model.head(model.pool(ash(fmap, 50, "p").float().reshape(fmap.shape))))
    det = create("ash-p", percentile=50, feature_map=True).fit(None, model.head)
    assert torch.allclose(det.score_inputs(model, x), expected, rtol=1e-5)
    for name in ("ash-p", "ash-b", "ash-s"):
        assert "after its final ReLU" in REGISTRY[name].notes
    import oodlab.detectors.ash as module

    assert "after its final ReLU" in module.__doc__ and "block-level ablation" in module.__doc__
