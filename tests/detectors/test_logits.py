"""MSP, MaxLogit and Energy: known answers, and MSP's float64 guard against saturation ties."""

import math

import torch
from torch import nn

from oodlab.detectors import create
from oodlab.features import Features
from oodlab.metrics import fpr_at_tpr


def _head(c: int = 3, d: int = 2) -> nn.Linear:
    return nn.Linear(d, c)


def _feats(logits: torch.Tensor) -> Features:
    return Features(torch.zeros(len(logits), 2), logits)


def test_known_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    f = _feats(logits)
    msp = create("msp").fit(f, _head()).score(f)
    assert torch.allclose(msp, torch.tensor([math.exp(2) / (math.exp(2) + 2), 1 / 3], dtype=torch.float64))
    assert torch.equal(create("maxlogit").fit(f, _head()).score(f), torch.tensor([2.0, 1.0], dtype=torch.float64))
    energy = create("energy").fit(f, _head()).score(f)
    assert torch.allclose(energy, torch.tensor([math.log(math.exp(2) + 2), 1 + math.log(3)], dtype=torch.float64))
    t = create("energy", temperature=2.0).fit(f, _head()).score(f)
    assert torch.allclose(t, 2 * torch.logsumexp(logits.double() / 2, 1))


def test_msp_float64_breaks_float32_ties():
    # Confident ID samples with margins 19..28.5: in float32 every softmax max rounds to 1.0 (one big tie).
    margins = torch.arange(19.0, 29.0, 0.5)
    id_logits = torch.stack([margins, torch.zeros(20), torch.zeros(20)], 1)
    assert bool((torch.softmax(id_logits, 1).max(1).values == 1.0).all())
    msp = create("msp").fit(_feats(id_logits), _head())
    s_id = msp.score(_feats(id_logits))
    assert len(set(s_id.tolist())) == 20  # float64 keeps them apart
    # An OOD sample with margin 19.25: at 95% TPR (19 of 20 ID accepted, threshold = margin 19.5) it is
    # rejected in float64; with float32 scores it ties with every ID sample and is accepted.
    ood = torch.tensor([[19.25, 0.0, 0.0]])
    assert fpr_at_tpr(s_id.numpy(), msp.score(_feats(ood)).numpy()) == 0.0
    f32_id, f32_ood = torch.softmax(id_logits, 1).max(1).values, torch.softmax(ood, 1).max(1).values
    assert fpr_at_tpr(f32_id.numpy(), f32_ood.numpy()) == 1.0
