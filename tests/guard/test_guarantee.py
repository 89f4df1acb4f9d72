"""The false-alarm guarantee on real data: random calibration/test splits of the Fashion-MNIST test set."""

import pytest
import torch

from oodlab.data import load_suite
from oodlab.detectors import create
from oodlab.features import FeatureCache
from oodlab.guard import Guard
from oodlab.models import checkpoint_fingerprint, load_checkpoint
from oodlab.training.recipes import shipped_checkpoint


@pytest.fixture(scope="module")
def fashion():
    suite = load_suite("fashionmnist")
    ckpt = shipped_checkpoint("fashionmnist")
    model, meta = load_checkpoint(ckpt)
    test = FeatureCache().get(model, checkpoint_fingerprint(ckpt), suite.id_test, device="cpu")
    return model, meta, test


@pytest.mark.parametrize("detector", ["energy", "msp"])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_mean_id_flag_rate_is_at_most_alpha(fashion, detector, alpha):
    model, meta, test = fashion
    det = create(detector).fit(None, model.head)
    scores = det.score(test)
    guard = Guard(model, det, (1, 28, 28), meta)
    g = torch.Generator().manual_seed(0)
    n, rates = len(scores) // 2, []
    for _ in range(300):
        perm = torch.randperm(len(scores), generator=g)
        guard.calibrate(scores[perm[:n]], alpha=alpha)
        rates.append(float(guard.decide(test.logits[perm[n:]], scores[perm[n:]]).is_ood.double().mean()))
    rates = torch.tensor(rates)
    se = float(rates.std()) / len(rates) ** 0.5
    exact = guard.k / (n + 1)  # the expected rate under exchangeability, <= alpha
    assert exact <= alpha
    assert abs(float(rates.mean()) - exact) <= 4 * se + 1e-4  # MSP has ties at 1.0; they only make it safer
    assert float(rates.mean()) <= alpha + 3 * se
