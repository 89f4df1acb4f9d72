import pytest
import torch
from torch import nn

from oodlab.detectors import create, energy
from oodlab.detectors.dice import dice_mask
from oodlab.features.stats import mean_features
from oodlab.features import core
from oodlab.features import Features

# Contributions V = W * m are all distinct: -4, -0.5, 0.025, 1, 1.5, 2, 2.2, 2.5, 3, 12
W = torch.tensor([[1.0, -2.0, 3.0, 0.5, 10.0], [2.2, 1.5, -1.0, 3.0, 0.1]])
B = torch.tensor([0.3, -0.1])
M = torch.tensor([1.0, 2.0, 0.5, 4.0, 0.25])
TRAIN_Z = torch.stack([M + torch.tensor([0.5, 1, 0.25, 1, 0.25]), M - torch.tensor([0.5, 1, 0.25, 1, 0.25])])
QUERY = torch.tensor([[0.0, 1.0, 2.0, 4.5, 1.0], [3.0, 0.0, 0.5, 0.0, 0.0]])


def head():
    lin = nn.Linear(5, 2)
    lin.weight.data, lin.bias.data = W.clone(), B.clone()
    return lin


def feats(z):
    return Features(z, z @ W.T + B, torch.zeros(len(z), dtype=torch.long))


@pytest.mark.parametrize("p, kept", [(90, 1), (50, 5), (10, 9), (0, 10)])
def test_number_of_kept_weights(p, kept):
    assert int(dice_mask(W, M, p).sum()) == kept


def test_mask_keeps_the_largest_contributions_by_signed_value():
    # p = 50: threshold 1.75 (linear interpolation between 1.5 and 2)
    expected = torch.tensor([[False, False, False, True, True], [True, True, False, True, False]])
    assert torch.equal(dice_mask(W, M, 50), expected)
    assert not dice_mask(W, M, 50)[W * M < 0].any()
    assert dice_mask(W, M, 10)[W * M < 0].sum() == 1  # a low p keeps the -0.5 contribution


def test_fit_uses_the_mean_training_feature():
    det = create("dice", p=50).fit(feats(TRAIN_Z), head())
    assert torch.equal(det.state["mean"], M.double())
    assert torch.equal(det.state["mask"], dice_mask(W, M, 50))


def test_score_is_energy_of_the_masked_head_with_the_bias_kept():
    det = create("dice", p=50).fit(feats(TRAIN_Z), head())
    masked = W.double() * dice_mask(W, M, 50)
    expected_logits = QUERY.double() @ masked.T + B.double()
    assert torch.allclose(det.logits(feats(QUERY)), expected_logits, rtol=1e-12)
    assert torch.allclose(det.score(feats(QUERY)), torch.logsumexp(expected_logits, 1), rtol=1e-12)
    # second query row only meets pruned weights: its logits are the bias
    assert torch.allclose(det.logits(feats(QUERY))[1], torch.tensor([0.3, 2.2 * 3.0 - 0.1], dtype=torch.float64))


def test_p_zero_equals_energy():
    det = create("dice", p=0).fit(feats(TRAIN_Z), head())
    f = feats(QUERY)
    assert torch.allclose(det.score(f), energy(f.logits), rtol=1e-6)


def test_dice_react_clips_first_and_keeps_the_unclipped_mean():
    det = create("dice-react", p=50, react_percentile=90).fit(feats(TRAIN_Z), head())
    # training entries sorted: 0, .25, .5, .5, .75, 1, 1.5, 3, 3, 5 -> 90th percentile = 3 + 0.1 * 2
    assert float(det.state["clip"]) == pytest.approx(3.2)
    assert torch.equal(det.state["mean"], M.double())
    masked = W.double() * dice_mask(W, M, 50)
    expected = torch.logsumexp(QUERY.double().clamp(max=3.2) @ masked.T + B.double(), 1)
    assert torch.allclose(det.score(feats(QUERY)), expected, rtol=1e-12)
    assert not torch.allclose(create("dice", p=50).fit(feats(TRAIN_Z), head()).score(feats(QUERY)), expected)


def test_dice_react_defaults_are_the_official_imagenet_demo():
    """p = 10 (demo-imagenet.sh), clip by ReAct's 90th-percentile rule unless an absolute threshold is given."""
    det = create("dice-react").fit(feats(TRAIN_Z), head())
    assert (det.p, det.react_percentile, det.threshold) == (10.0, 90.0, None)
    assert float(det.state["clip"]) == pytest.approx(3.2)
    assert torch.equal(det.state["mask"], dice_mask(W, M, 10))  # 10 % of the contributions pruned
    assert int(det.state["mask"].sum()) == 9  # of the 10 contributions only the smallest (-4) is pruned
    demo = create("dice-react", p=10, threshold=1.0).fit(feats(TRAIN_Z), head())
    assert float(demo.state["clip"]) == 1.0
    expected = torch.logsumexp(QUERY.double().clamp(max=1.0) @ (W.double() * dice_mask(W, M, 10)).T + B.double(), 1)
    assert torch.allclose(demo.score(feats(QUERY)), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="threshold"):
        create("dice-react", threshold=float("nan"))


def test_streaming_mean_matches_the_plain_mean(monkeypatch):
    z = torch.rand(1001, 7)
    monkeypatch.setattr(core, "CHUNK_BYTES", 8 * 7 * 64)
    assert torch.allclose(mean_features(Features(z, torch.zeros(len(z), 2))), z.double().mean(0), rtol=1e-12)


def test_bad_p_is_refused():
    with pytest.raises(ValueError, match="p"):
        create("dice", p=100)
