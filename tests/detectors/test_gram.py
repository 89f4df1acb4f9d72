"""Gram matrices (Sastry & Oore 2020): the layer statistic, the fit's class ranges and the score, by brute force."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
from oodlab.detectors import create
from oodlab.features.layers import gram_sums
from oodlab.models.adapter import Classifier


def test_gram_sums_are_the_row_sums_of_the_full_gram_matrices():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g).double()
    want = []
    for p in (1, 2, 3):
        f = (x ** p).reshape(3, 4, -1)
        rows = (f @ f.transpose(1, 2)).sum(2)  # the C x C Gram matrix, summed over a row
        want.append(rows.sign() * rows.abs() ** (1 / p))
    torch.testing.assert_close(gram_sums(x, 3).double(), torch.cat(want, 1), rtol=1e-6, atol=1e-5)


def net(seed=0):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)))
    return Classifier(body, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), nn.Linear(6, 3)).eval()


def images(name, n, seed, labelled=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, 8, 8, generator=g) * 255 * scale).clamp(0, 255).to(torch.uint8)
    return ImageSet(name, ArrayDataset(x, torch.arange(n) % 3 if labelled else None), tensor_fingerprint(x),
                    3 if labelled else None)


def test_score_is_the_normalised_deviation_from_the_predicted_class_range_over_msp():
    model = net()
    train, test = images("train", 120, 1), images("ood", 30, 2, labelled=False, scale=1.5)
    det = create("gram", layers="0,1", powers=2, val_fraction=0.1, seed=3).fit_on(model, train, device="cpu")
    got = det.score_on(model, test, device="cpu")

    def stats(data):  # every layer's statistic by hand: run the body's two blocks, full Gram matrices
        x = data.dataset.images.float() / 255
        with torch.no_grad():
            h1 = model.body[0](x)
            h2 = model.body[1](h1)
            logits = model.head(model.pool(h2))
        out = []
        for h in (h1, h2):
            parts = []
            for p in (1, 2):
                f = (h.double() ** p).reshape(len(h), h.shape[1], -1)
                rows = (f @ f.transpose(1, 2)).sum(2)
                parts.append(rows.sign() * rows.abs() ** (1 / p))
            out.append(torch.cat(parts, 1))
        return out, logits.double()

    tr, _ = stats(train)
    te, logits = stats(test)
    labels = train.dataset.labels
    gen, held = torch.Generator().manual_seed(3), torch.zeros(120, dtype=torch.bool)
    for c in range(3):  # the held-out 10% of each class, drawn as documented
        rows = (labels == c).nonzero().flatten()
        held[rows[torch.randperm(len(rows), generator=gen)[:4]]] = True
    pred = logits.argmax(1)
    total = torch.zeros(30, dtype=torch.float64)
    for g_tr, g_te in zip(tr, te):
        lo = torch.stack([g_tr[~held & (labels == c)].min(0).values for c in range(3)])
        hi = torch.stack([g_tr[~held & (labels == c)].max(0).values for c in range(3)])
        dev = lambda g, k: (F.relu(lo[k] - g) / (lo[k] + 1e-6).abs() + F.relu(g - hi[k]) / (hi[k] + 1e-6).abs()).sum(1)  # noqa: E731
        norm = dev(g_tr[held], labels[held]).mean()
        total += dev(g_te, pred) / (norm if norm > 0 else 1.0)
    want = -total / torch.softmax(logits, 1).max(1).values
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert (got < 0).any()  # the OOD images leave the ID ranges somewhere


def test_bad_parameters_are_one_line():
    with pytest.raises(ValueError, match="powers"):
        create("gram", powers=0)
    with pytest.raises(ValueError, match="val_fraction"):
        create("gram", val_fraction=1.0)
    model = net()
    with pytest.raises(ValueError, match="no layer '5'; its body's layers are 0, 1"):
        create("gram", layers="5").fit_on(model, images("train", 30, 1), device="cpu")
