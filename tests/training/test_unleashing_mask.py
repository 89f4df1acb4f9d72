"""Unleashing Mask: the flooded loss, the constraint estimate, UM and UMAP (checkpoints, resume, CLI)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from oodlab.cli import main
from oodlab.data.base import batches
from oodlab.models import build, load_checkpoint
from oodlab.models.adapter import Classifier
from oodlab.training import OBJECTIVES, TrainConfig, train
from oodlab.training.erm import CrossEntropy
from oodlab.training.loop import Objective
from oodlab.training.unleashing_mask import (ConstraintEstimate, UnleashingMask, estimate_constraint, flooded,
                                             maskable_weights, top_fraction_mask, write_atypical_report)

META = {"arch": "smallcnn", "num_classes": 3, "in_channels": 1}


def _mlp() -> Classifier:
    """No dropout, no batch norm: a training-mode forward is deterministic and per-sample."""
    torch.manual_seed(0)
    return Classifier(nn.Flatten(), nn.Sequential(nn.Linear(784, 16), nn.ReLU()), nn.Linear(16, 3))


def _batch(suite, n=48):
    return next(batches(suite.id_train, n))


def _trained_mlp(suite, steps=30):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch(suite)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A smallcnn fitted to the tiny suite (2 epochs of ERM), saved as a checkpoint."""
    from helpers import make_tiny_suite

    suite = make_tiny_suite()
    torch.manual_seed(0)
    model = build("smallcnn", 3, 1)
    out = tmp_path_factory.mktemp("erm")
    return train(model, suite.id_train, CrossEntropy(), TrainConfig(epochs=2, batch_size=16, lr=0.05, augment=False),
                 out, META, device="cpu")


def test_flooded_equals_loss_above_and_mirrors_below():
    loss = torch.tensor([0.1, 0.5, 0.9, 2.0], dtype=torch.float64)
    assert torch.allclose(flooded(loss, 0.5), torch.tensor([0.9, 0.5, 0.9, 2.0], dtype=torch.float64))  # 2c - 0.1 = 0.9


def test_flooded_gradient_flips_sign_below_the_constraint():
    for value, expected in ((0.8, 1.0), (0.2, -1.0)):
        loss = torch.tensor(value, requires_grad=True)
        flooded(loss, 0.5).backward()
        assert loss.grad.item() == expected


@pytest.mark.parametrize("shape,keep,kept", [((32, 1, 3, 3), 0.965, 278), ((100,), 0.8, 80), ((10, 16), 0.5, 80),
                                            ((7,), 0.01, 1)])
def test_mask_keeps_exactly_the_requested_fraction_of_the_largest(shape, keep, kept):
    scores = torch.randn(shape)
    mask = top_fraction_mask(scores, keep)
    assert mask.shape == scores.shape and int(mask.sum()) == kept and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert scores[mask == 1].min() >= scores[mask == 0].max() if kept < scores.numel() else True


def test_mask_rejects_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_mask(torch.randn(10), 1.5)


def test_um_step_with_constraint_above_the_loss_raises_it(tiny_suite):
    x, y = _batch(tiny_suite)
    for offset, goes_up in ((0.5, True), (None, False)):
        model = _trained_mlp(tiny_suite)
        ce0 = F.cross_entropy(model(x), y).item()
        c = ce0 + offset if offset is not None else 0.0
        um = OBJECTIVES["um"](model=model, suite=tiny_suite, config=TrainConfig(), constraint=c)
        loss, _ = um.loss(model, x, y)
        assert loss.item() == pytest.approx(2 * c - ce0 if goes_up else ce0, rel=1e-5)
        opt = torch.optim.SGD(um.parameters(model), lr=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ce1 = F.cross_entropy(model(x), y).item()
        assert (ce1 > ce0) if goes_up else (ce1 < ce0)


class _PenalisedCE(Objective):
    """A stand-in for OE-style objectives: CE on the ID rows plus a non-negative term (``scale`` < 1 breaks the contract)."""

    name = "penalised"

    def __init__(self, scale: float = 1.0, penalty: float = 0.3) -> None:
        self.scale, self.penalty = scale, penalty

    def loss(self, model, x, y):
        logits = model(torch.cat([x, x.flip(3)]))
        return self.scale * F.cross_entropy(logits[: len(y)], y) + self.penalty * logits[len(y):].pow(2).mean(), {}


def test_um_floods_only_the_cross_entropy_of_a_base_objective(tiny_suite):
    model = _trained_mlp(tiny_suite)
    x, y = _batch(tiny_suite)
    ce = F.cross_entropy(model(x), y).item()
    extra = 0.3 * model(x.flip(3)).pow(2).mean().item()
    c = ce + 0.25
    loss, _ = UnleashingMask(tiny_suite.id_train, _PenalisedCE(), constraint=c).loss(model, x, y)
    assert loss.item() == pytest.approx(extra + 2 * c - ce, rel=1e-5)
    with pytest.raises(RuntimeError, match="not CE"):
        UnleashingMask(tiny_suite.id_train, _PenalisedCE(scale=0.5, penalty=0.0), constraint=c).loss(model, x, y)


def test_um_with_outlier_exposure_base(tiny_suite):
    model = _trained_mlp(tiny_suite)
    x, y = _batch(tiny_suite, 16)
    aux = tiny_suite.ood["noise"]
    cfg = TrainConfig(batch_size=16, augment=False)
    ce = F.cross_entropy(model(x), y).item()
    twin = OBJECTIVES["oe"](model=model, suite=tiny_suite, config=cfg, aux=aux)  # draws the same outliers
    um = OBJECTIVES["um"](model=model, suite=tiny_suite, config=cfg, aux=aux, base="oe", constraint=ce + 1.0)
    assert um.loss(model, x, y)[0].item() == pytest.approx(twin.loss(model, x, y)[0].item() + 2.0, rel=1e-5)


def test_estimate_constraint_is_the_masked_models_mean_ce(tiny_suite):
    model = _trained_mlp(tiny_suite)
    data = tiny_suite.id_train
    x, y = next(batches(data, len(data)))
    full = F.cross_entropy(model(x), y).item()
    same = estimate_constraint(model, data, keep=1.0, augmented=False)
    assert same.constraint == pytest.approx(full, rel=1e-5) and same.full_loss == pytest.approx(full, rel=1e-5)
    assert torch.allclose(same.loss_rise, torch.zeros(len(data)), atol=1e-5)

    est = estimate_constraint(model, data, keep=0.5, augmented=False, seed=3)
    gen = torch.Generator().manual_seed(3)  # reference: the same random masks, drawn layer by layer
    masked = {n: w * top_fraction_mask(torch.rand(w.shape, generator=gen), 0.5) for n, w in maskable_weights(model).items()}
    reference = F.cross_entropy(torch.func.functional_call(model, masked, (x,)), y).item()
    assert est.constraint == pytest.approx(reference, rel=1e-5) and est.constraint > est.full_loss
    assert est.loss_rise.mean().item() == pytest.approx(est.constraint - est.full_loss, rel=1e-4)
    assert estimate_constraint(model, data, keep=0.5, augmented=True, seed=3).constraint != pytest.approx(reference)


def test_atypical_report_lists_the_largest_rises(tiny_suite, tmp_path):
    est = estimate_constraint(_trained_mlp(tiny_suite), tiny_suite.id_train, keep=0.5, augmented=False)
    png = write_atypical_report(est, tiny_suite.id_train, tmp_path, k=10)
    report = json.loads((tmp_path / "atypical.json").read_text())
    assert report["indices"] == torch.argsort(est.atypicality(), descending=True)[:10].tolist()
    assert report["labels"] == tiny_suite.id_train.dataset.labels[report["indices"]].tolist()
    assert report["constraint"] == est.constraint and png.stat().st_size > 1000


def test_atypicality_is_centred_per_class():
    est = ConstraintEstimate(0.0, 0.0, torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0, 15.0]), torch.tensor([0, 0, 0, 2, 2, 2]), 0.9)
    assert est.atypicality().tolist() == [-1.0, 0.0, 1.0, -2.0, -1.0, 3.0]
    assert est.atypical(2).tolist() == [5, 2]  # not the three class-2 samples with the largest raw rises


def test_untrained_model_is_refused(tiny_suite, tmp_path):
    model = _mlp()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))  # confidently wrong on two classes of three
    um = OBJECTIVES["um"](model=model, suite=tiny_suite, config=TrainConfig())
    with pytest.raises(ValueError, match="chance level"):
        um.begin(model, tmp_path)


def test_options_are_checked(tiny_suite):
    model = _mlp()
    with pytest.raises(ValueError, match="UMAP"):
        OBJECTIVES["um"](model=model, suite=tiny_suite, config=TrainConfig(), keep=0.5)
    with pytest.raises(ValueError, match="score_init"):
        OBJECTIVES["umap"](model=model, suite=tiny_suite, config=TrainConfig(), score_init="zeros")
    with pytest.raises(ValueError, match="cannot itself be um"):
        OBJECTIVES["umap"](model=model, suite=tiny_suite, config=TrainConfig(), base="um")
    with pytest.raises(ValueError, match="unknown base objective"):
        OBJECTIVES["um"](model=model, suite=tiny_suite, config=TrainConfig(), base="nope")
    with pytest.raises(ValueError, match=">= 0"):
        OBJECTIVES["um"](model=model, suite=tiny_suite, config=TrainConfig(), constraint=-1.0)


def _umap_run(suite, init, out, hooks=None):
    model, _ = load_checkpoint(init)
    umap = OBJECTIVES["umap"](model=model, suite=suite, config=TrainConfig(), constraint=0.05)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1, augment=False)
    return train(model, suite.id_train, umap, cfg, out, META, test_set=suite.id_test, hooks=hooks, device="cpu")


@pytest.fixture(scope="module")
def umap_ckpt(trained_ckpt, tmp_path_factory):
    from helpers import make_tiny_suite

    return _umap_run(make_tiny_suite(), trained_ckpt, tmp_path_factory.mktemp("umap"))


def test_umap_learns_a_mask_and_saves_a_plain_classifier(tiny_suite, trained_ckpt, umap_ckpt):
    masked, meta = load_checkpoint(umap_ckpt)
    original = load_file(str(trained_ckpt))
    state = masked.state_dict()
    for name in maskable_weights(masked):
        w, w0 = state[name], original[name]
        kept = w != 0
        assert int(kept.sum()) == round(0.8 * w.numel()) and torch.equal(w[kept], w0[kept])
    assert torch.equal(state["body.1.weight"], original["body.1.weight"])  # batch-norm affine weights stay frozen
    assert meta["objective_config"]["keep"] == 0.8 and meta["objective_config"]["constraint"] == 0.05
    history = [json.loads(line) for line in (umap_ckpt.parent / "history.jsonl").read_text().splitlines()]
    assert min(h["loss"] for h in history) >= 0.05  # the flooded loss never goes below the constraint
    # the model holds the masked weights, so the loop's per-epoch test accuracy is the checkpoint's
    x, y = next(batches(tiny_suite.id_test, 48))
    assert float((masked(x).argmax(1) == y).double().mean()) == pytest.approx(meta["metrics"]["test_acc"])


def test_umap_magnitude_init_starts_from_magnitude_pruning(tiny_suite, trained_ckpt, tmp_path):
    model, _ = load_checkpoint(trained_ckpt)
    original = {n: w.detach().clone() for n, w in maskable_weights(model).items()}
    umap = OBJECTIVES["umap"](model=model, suite=tiny_suite, config=TrainConfig(), constraint=0.1, score_init="magnitude")
    umap.begin(model, tmp_path)
    for name, w in maskable_weights(model).items():
        assert torch.equal(w, original[name] * top_fraction_mask(original[name].abs(), 0.8))


def test_umap_resume_equals_uninterrupted(tiny_suite, trained_ckpt, umap_ckpt, tmp_path):
    def crash(model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        _umap_run(tiny_suite, trained_ckpt, tmp_path, hooks=[crash])
    resumed = _umap_run(tiny_suite, trained_ckpt, tmp_path)
    a, b = load_file(str(umap_ckpt)), load_file(str(resumed))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_cli_um_estimates_reports_and_tracks(tiny_suite, trained_ckpt, tmp_path, monkeypatch):
    import oodlab.data.suites as suites
    import oodlab.training.tracking as tracking

    monkeypatch.setitem(suites.SUITES, "fashionmnist", lambda data_root=None: tiny_suite)
    monkeypatch.setattr(tracking, "load_suite", lambda name, root=None: tiny_suite)
    out = tmp_path / "um"
    args = ["train", "--method", "um", "--from", str(trained_ckpt), "--epochs", "1", "--batch-size", "16",
            "--no-augment", "--out", str(out)]
    rc = main([*args, "--track-ood"])
    assert rc == 0
    report = json.loads((out / "atypical.json").read_text())
    meta = json.loads((out / "last.json").read_text())
    assert meta["objective"] == "um" and meta["objective_config"]["constraint"] == report["constraint"] > 0
    assert (out / "atypical.png").exists() and (out / "ood_tracking.png").exists()
    assert 0.0 <= meta["metrics"]["energy_auroc"] <= 1.0 and "msp_fpr95/noise" in meta["metrics"]
    assert main([*args, "--constraint", "0.5"]) == 2  # another constraint than the run's: refuses to resume
