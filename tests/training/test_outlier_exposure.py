"""Outlier Exposure and Energy-OE: the losses against hand-computed values, the outlier stream, training."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodlab.cli import main
from oodlab.data import suites
from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
from oodlab.models.adapter import Classifier
from oodlab.training import OBJECTIVES, TrainConfig, train
from oodlab.training.outlier_exposure import (EnergyOE, OutlierBatches, OutlierExposure, default_margins,
                                              energy_hinge_loss, oe_loss)
from helpers import make_tiny_suite


def _aux(n: int = 40, seed: int = 1) -> ImageSet:
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return ImageSet("aux", ArrayDataset(x), tensor_fingerprint(x))


def _linear(num_classes: int = 3) -> Classifier:
    return Classifier(nn.Flatten(1), nn.Identity(), nn.Linear(28 * 28, num_classes))


def test_oe_loss_by_hand():
    # [0, 0]: softmax (1/2, 1/2) is uniform -> CE = log 2.
    # [ln 3, 0]: softmax (3/4, 1/4) -> CE to uniform = -(log 3/4 + log 1/4) / 2 = log 4 - log(3) / 2.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2) + math.log(4) - math.log(3) / 2) / 2
    assert float(oe_loss(logits)) == pytest.approx(expected, abs=1e-6)
    assert float(oe_loss(torch.full((4, 10), 7.0))) == pytest.approx(math.log(10), abs=1e-6)  # its minimum


def test_energy_hinge_loss_by_hand():
    # One class: E = -logit. ID energies -9, -14 with m_in = -12 -> hinge 3, 0 -> mean(9, 0) = 4.5.
    # Outlier energies -3, -8 with m_out = -5 -> hinge 0, 3 -> mean(0, 9) = 4.5.
    loss = energy_hinge_loss(torch.tensor([[9.0], [14.0]]), torch.tensor([[3.0], [8.0]]), m_in=-12, m_out=-5)
    assert float(loss) == pytest.approx(9.0)
    # Two equal logits l: E = -(l + log 2); l = 12 - log 2 gives E = -12 exactly at the margin -> no loss.
    at_margin = torch.full((1, 2), 12 - math.log(2))
    assert float(energy_hinge_loss(at_margin, torch.tensor([[-10.0, -10.0]]), -12, -5)) == pytest.approx(0.0, abs=1e-10)


def test_objective_losses_match_the_formulas():
    model, aux = _linear(), _aux()
    cfg = TrainConfig(batch_size=4, augment=False, seed=3)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 0])
    for objective, extra in ((OutlierExposure(aux, cfg, lam=0.5), lambda li, lo: 0.5 * oe_loss(lo)),
                             (EnergyOE(aux, cfg, m_in=-1.0, m_out=0.5, lam=0.1),
                              lambda li, lo: 0.1 * energy_hinge_loss(li, lo, -1.0, 0.5))):
        reference = OutlierBatches(aux, 8, seed=3, shift=None)  # aux_ratio 2 -> 8 outliers per 4 ID images
        loss, logs = objective.loss(model, x, y)
        loss = loss.detach()
        with torch.no_grad():
            logits_in, logits_out = model(x), model(reference.next())
        assert float(loss) == pytest.approx(float(F.cross_entropy(logits_in, y) + extra(logits_in, logits_out)), rel=1e-6)
        assert logs["correct"] == float((logits_in.argmax(1) == y).sum())


def test_outlier_batches_are_full_seeded_and_cycle():
    aux = _aux(10)
    stream = OutlierBatches(aux, 4, seed=0, shift=None)
    first = [stream.next() for _ in range(5)]  # 10 images = 2 full batches per pass; the 2-image rest is skipped
    assert all(b.shape == (4, 1, 28, 28) for b in first)
    pool = aux.dataset.images.float() / 255
    assert all(any(torch.equal(img, p) for p in pool) for b in first for img in b)
    stream.start_epoch(0)
    assert torch.equal(stream.next(), first[0])  # same epoch -> same draws (resumable)
    stream.start_epoch(1)
    assert not torch.equal(stream.next(), first[0])
    with pytest.raises(ValueError, match="at least one batch"):
        OutlierBatches(aux, 11)


def test_margins_and_validation():
    assert default_margins("cifar10") == (-23.0, -5.0) and default_margins("cifar100") == (-27.0, -5.0)
    assert default_margins("something-else") == (-25.0, -7.0)
    with pytest.raises(ValueError, match="m_in < m_out"):
        EnergyOE(_aux(), TrainConfig(batch_size=4), m_in=-5, m_out=-10)


def test_energy_oe_training_separates_outliers(tmp_path):
    """A few epochs on the tiny suite: ID energies fall below the margin, outliers' rise above theirs."""
    suite, aux = make_tiny_suite(), _aux(64)
    model = _linear()
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.01, augment=False)
    objective = OBJECTIVES["energy-oe"](model=model, suite=suite, config=cfg, aux=aux, m_in=-6.0, m_out=-2.0)
    train(model, suite.id_train, objective, cfg, tmp_path, {"arch": "linear", "num_classes": 3, "in_channels": 1},
          device="cpu")
    model.eval()
    with torch.no_grad():
        e_in = -torch.logsumexp(model(suite.id_test.dataset.images.float() / 255), 1)
        e_out = -torch.logsumexp(model(_aux(64, seed=9).dataset.images.float() / 255), 1)
    assert float(e_in.median()) < -5 and float(e_out.median()) > -3
    meta = json.loads((tmp_path / "last.json").read_text())
    assert meta["objective"] == "energy-oe" and meta["objective_config"]["m_in"] == -6.0
    assert meta["objective_config"]["aux_fingerprint"] == aux.fingerprint


def test_cli_trains_and_fine_tunes_with_outliers(monkeypatch, tmp_path):
    monkeypatch.setitem(suites.SUITES, "tiny", lambda data_root=None: make_tiny_suite(n_train=32, n_test=8))
    common = ["--suite", "tiny", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    assert main(["train", *common, "--method", "oe", "--aux", "photos:200", "--out", str(tmp_path / "oe")]) == 0
    assert main(["train", *common, "--method", "energy-oe", "--aux", "photos:200", "--option", "m_in=-8",
                 "--from", str(tmp_path / "oe" / "last.safetensors"), "--out", str(tmp_path / "ft")]) == 0
    meta = json.loads((tmp_path / "ft" / "last.json").read_text())
    assert meta["init_from"].endswith("last.safetensors") and meta["objective_config"]["m_in"] == -8
    assert meta["objective_config"]["aux"] == "photos" and meta["objective_config"]["aux_size"] == 200
    assert main(["train", *common, "--method", "oe", "--out", str(tmp_path / "none")]) == 2  # no --aux: clear error
    assert main(["train", *common, "--method", "oe", "--aux", "photos:200", "--option", "lamda=1",
                 "--out", str(tmp_path / "typo")]) == 2
