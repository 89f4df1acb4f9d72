"""Per-epoch OOD tracking: the held-out split, known-answer metrics, the hook and its plot."""

import json

import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from oodlab.detectors.base import energy
from oodlab.models.adapter import Classifier
from oodlab.training import TrainConfig, train
from oodlab.training.erm import CrossEntropy
from oodlab.training.tracking import best_epoch, holdout_suite, ood_metrics, plot_tracking, split_holdout, tracking_hook


def _brightness_model(sign: float) -> Classifier:
    """logits = (b + sign * 10 * mean pixel, 0, 0) with b = 10 for sign < 0: class 0 always wins, and
    Energy and MSP both rise (sign > 0) or both fall (sign < 0) with the brightness."""
    head = nn.Linear(784, 3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[0] = sign * 10.0 / 784
        head.bias[0] = 10.0 if sign < 0 else 0.0
    return Classifier(nn.Flatten(), nn.Identity(), head)


def test_split_is_disjoint_complete_and_fixed(tiny_suite):
    data = tiny_suite.id_test
    val, rest = split_holdout(data, 0.25, seed=1)
    assert (len(val), len(rest)) == (12, 36) and val.fingerprint != rest.fingerprint
    rows = lambda s: {tuple(im.flatten().tolist()) for im in s.dataset.images}  # noqa: E731
    assert rows(val) | rows(rest) == rows(data) and not rows(val) & rows(rest)
    again, _ = split_holdout(data, 0.25, seed=1)
    assert torch.equal(again.dataset.images, val.dataset.images)
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(data, 1.0)


def test_holdout_suite_splits_test_and_ood_sets_only(tiny_suite):
    val, test = holdout_suite(tiny_suite)
    assert val.id_train is tiny_suite.id_train and test.id_train is tiny_suite.id_train
    for name, data in tiny_suite.ood.items():
        assert len(val.ood[name]) + len(test.ood[name]) == len(data) and len(val.ood[name]) == round(0.2 * len(data))
    assert len(val.id_test) + len(test.id_test) == len(tiny_suite.id_test)


@pytest.mark.parametrize("sign,auroc,fpr95", [(1.0, 0.0, 1.0), (-1.0, 1.0, 0.0)])
def test_ood_metrics_known_answers(tiny_suite, sign, auroc, fpr95):
    # OOD images (noise, stripes) are brighter than the ID squares on dark noise: sign=+1 ranks every
    # OOD sample above every ID sample, sign=-1 below.
    m = ood_metrics(_brightness_model(sign), tiny_suite, device="cpu")
    labels = tiny_suite.id_test.dataset.labels
    assert m["val_acc"] == pytest.approx(float((labels == 0).double().mean()))
    for det in ("energy", "msp"):
        for name in ("noise", "stripes"):
            assert m[f"{det}_auroc/{name}"] == auroc and m[f"{det}_fpr95/{name}"] == fpr95
        assert m[f"{det}_auroc"] == auroc


def test_ood_metrics_match_sklearn(tiny_suite):
    torch.manual_seed(3)
    model = Classifier(nn.Flatten(), nn.Sequential(nn.Linear(784, 8), nn.ReLU()), nn.Linear(8, 3))
    m = ood_metrics(model, tiny_suite, device="cpu")
    with torch.no_grad():
        s_id = energy(model(tiny_suite.id_test.dataset.images.float() / 255))
        s_ood = energy(model(tiny_suite.ood["noise"].dataset.images.float() / 255))
    expected = roc_auc_score([1] * len(s_id) + [0] * len(s_ood), torch.cat([s_id, s_ood]).numpy())
    assert m["energy_auroc/noise"] == pytest.approx(expected, abs=1e-12)


def test_best_epoch():
    rows = [{"epoch": 1, "energy_auroc": 0.8}, {"epoch": 2, "energy_auroc": 0.9}, {"epoch": 3, "energy_auroc": 0.9},
            {"epoch": 4}]
    rows[1]["val_acc"], rows[2]["val_acc"], rows[0]["val_acc"] = 0.7, 0.8, 0.9
    assert best_epoch(rows) == 2 and best_epoch(rows, min_acc=0.75) == 3 and best_epoch(rows, min_acc=0.85) == 1
    with pytest.raises(ValueError, match="track-ood"):
        best_epoch([{"epoch": 1}])


def test_hook_records_each_epoch_and_plots(tiny_suite, tmp_path):
    val, _ = holdout_suite(tiny_suite, 0.5)
    torch.manual_seed(0)
    model = Classifier(nn.Flatten(), nn.Sequential(nn.Linear(784, 16), nn.ReLU()), nn.Linear(16, 3))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1, augment=False)
    meta = {"arch": "mlp", "num_classes": 3, "in_channels": 1}
    train(model, tiny_suite.id_train, CrossEntropy(), cfg, tmp_path, meta, hooks=[tracking_hook(val, tmp_path, "cpu")],
          device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["val_acc"] == pytest.approx(ood_metrics(model, val, device="cpu")["val_acc"])
    assert all(0 <= r["energy_auroc"] <= 1 and "msp_fpr95/stripes" in r for r in rows)
    with Image.open(tmp_path / "ood_tracking.png") as png:
        assert png.size[0] > 1000


def test_plot_tracking_draws_history(tmp_path):
    rows = [{"epoch": e, "val_acc": 0.8, "train_acc": 0.9, "energy_auroc": 0.9 - 0.01 * e, "msp_auroc": 0.8,
             "energy_fpr95": 0.3, "msp_fpr95": 0.5} for e in (1, 2, 3)]
    with Image.open(plot_tracking(rows, tmp_path / "p.png", "t")) as png:
        assert png.format == "PNG"
