"""The Guard object: decisions, the false-alarm guarantee, save/load and the errors a user can cause."""

import json

import pytest
import torch

from oodlab.detectors import create
from oodlab.features import Features
from oodlab.guard import Guard, GuardError
from oodlab.models.zoo import small_cnn


def _images(data):
    return torch.stack([data.dataset[i][0] for i in range(len(data))])


@pytest.fixture
def guard(tiny):
    det = create("energy").fit(tiny.train, tiny.model.head)
    return Guard(tiny.model, det, (1, 8, 8), device="cpu").calibrate(tiny.test_set, alpha=0.2)


def test_call_and_predict_agree_and_follow_the_rule(guard, tiny):
    out = guard.predict(tiny.ood_set)
    again = guard(_images(tiny.ood_set))
    for a, b in zip((out.logits, out.score, out.p_value, out.is_ood), (again.logits, again.score, again.p_value, again.is_ood)):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.pred, out.logits.argmax(1))
    assert torch.equal(out.is_ood, out.p_value <= 0.2)
    assert torch.equal(out.is_ood, out.score < guard.threshold)
    cal = guard.predict(tiny.test_set)  # on its own calibration set, at most alpha are flagged
    assert cal.is_ood.double().mean() <= 0.2


def test_tpr_rule_and_bh_screening(guard, tiny):
    guard.calibrate(tiny.test_set, tpr=0.9)
    assert guard.predict(tiny.test_set).is_ood.double().mean() <= 0.1 + 1e-12
    out = guard.predict(tiny.ood_set, fdr=0.1)
    from oodlab.guard import benjamini_hochberg

    assert torch.equal(out.is_ood, benjamini_hochberg(out.p_value, 0.1))


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_false_alarm_guarantee_over_random_splits(alpha):
    """Exchangeable ID scores: over 400 random calibration/test splits the mean flag rate is <= alpha."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4000, generator=g, dtype=torch.float64)
    model = small_cnn()
    guard = Guard(model, create("energy").fit(None, model.head), (1, 28, 28))
    rates = []
    for _ in range(400):
        perm = torch.randperm(len(scores), generator=g)
        cal, test = scores[perm[:2000]], scores[perm[2000:]]
        guard.calibrate(cal, alpha=alpha)
        rates.append(float(guard.decide(torch.zeros(len(test), 10), test).is_ood.double().mean()))
    rates = torch.tensor(rates)
    se = float(rates.std() / len(rates) ** 0.5)
    assert rates.mean() <= alpha + 3 * se
    assert rates.mean() >= alpha - 2 / 2001 - 3 * se  # and not needlessly conservative


def test_save_load_round_trip_and_refusals(guard, tiny, tmp_path):
    folder = guard.save(tmp_path / "g")
    with pytest.raises(GuardError, match="saved without its model"):
        Guard.load(folder)
    back = Guard.load(folder, model=tiny.model, device="cpu")
    assert back.rule == {"alpha": 0.2} and back.k == guard.k and back.threshold == guard.threshold
    assert torch.equal(back.predict(tiny.ood_set).score, guard.predict(tiny.ood_set).score)

    other = type(tiny.model)(tiny.model.body, tiny.model.pool, torch.nn.Linear(16, 3), mean=(0.5,), std=(0.25,))
    with pytest.raises(GuardError, match="not those the guard"):
        Guard.load(folder, model=other)

    cal = folder / "calibration.safetensors"
    data = bytearray(cal.read_bytes())
    data[-1] ^= 1
    cal.write_bytes(bytes(data))
    with pytest.raises(GuardError, match="calibration.safetensors was altered"):
        Guard.load(folder, model=tiny.model)
    cal.unlink()
    with pytest.raises(GuardError, match="lacks calibration.safetensors"):
        Guard.load(folder, model=tiny.model)
    (folder / "guard.json").write_text("{")
    with pytest.raises(GuardError, match="not valid JSON"):
        Guard.load(folder, model=tiny.model)
    (folder / "guard.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(GuardError, match="lacks detector"):
        Guard.load(folder, model=tiny.model)
    edited = {"format": 1, "detector": "energy", "rule": {}, "k": 1, "input_shape": [1, 8, 8], "model": {}, "files": {}}
    (folder / "guard.json").write_text(json.dumps(edited))
    with pytest.raises(GuardError, match="edited into a shape"):
        Guard.load(folder, model=tiny.model)


def test_oodlab_models_travel_inside_the_folder(tmp_path):
    model = small_cnn(num_classes=3).eval()
    z = torch.rand(50, 128)
    feats = Features(z, model.head(z).detach(), torch.arange(50) % 3)
    det = create("mahalanobis").fit(feats, model.head)
    meta = {"arch": "smallcnn", "num_classes": 3, "in_channels": 1}
    guard = Guard(model, det, (1, 28, 28), model_meta=meta).calibrate(feats, alpha=0.1)
    back = Guard.load(guard.save(tmp_path / "g"))
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(back(x).score, guard(x).score)


def test_bad_inputs_get_clear_errors(guard, tiny):
    x = _images(tiny.test_set)[:4]
    with pytest.raises(ValueError, match=r"takes \(1, 8, 8\)"):
        guard(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        guard(torch.where(torch.arange(4)[:, None, None, None] == 1, float("nan"), x))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        guard(x * 255)
    with pytest.raises(ValueError, match="float tensor"):
        guard(x[0])
    with pytest.raises(ValueError, match="empty"):
        guard.calibrate(torch.zeros(0))
    with pytest.raises(ValueError, match="alpha must be a finite number in"):
        guard.calibrate(tiny.test_set, alpha=1.5)
    with pytest.raises(ValueError, match="not both"):
        guard.calibrate(tiny.test_set, alpha=0.1, tpr=0.9)
    with pytest.raises(ValueError, match="cannot give alpha=0.01"):
        guard.calibrate(tiny.test_set, alpha=0.01)  # 60 scores: every p-value >= 1/61
    unfitted = create("knn")
    with pytest.raises(GuardError, match="not fitted"):
        Guard(tiny.model, unfitted, (1, 8, 8))
    with pytest.raises(GuardError, match="not calibrated"):
        Guard(tiny.model, create("energy").fit(None, tiny.model.head), (1, 8, 8))(x)


def test_drift_report(guard, tiny):
    ok = guard.flag_rate_report(tiny.test_set)
    assert not ok.drift and ok.n == len(tiny.test_set)
    drifted = guard.flag_rate_report(tiny.ood_set)  # OOD presented as if it were ID
    assert drifted.drift and drifted.rate > 2 * drifted.expected


def test_a_detector_of_intermediate_layers_guards_and_says_why_it_does_not_export(tiny, tmp_path):
    det = create("mds-ensemble").fit_on(tiny.model, tiny.train_set, device="cpu")
    guard = Guard(tiny.model, det, (1, 8, 8), device="cpu").calibrate(tiny.test_set, alpha=0.2)
    out, again = guard.predict(tiny.ood_set), guard(_images(tiny.ood_set))  # the batch path captures the layers too
    assert torch.allclose(out.score, again.score.double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.score, det.score(tiny.ood))
    loaded = Guard.load(guard.save(tmp_path / "g"), model=tiny.model, device="cpu")
    assert loaded.detector.layers == det.layers and torch.equal(loaded.predict(tiny.ood_set).score, out.score)
    with pytest.raises(Exception, match="it reads intermediate layers, which the exported graph does not compute"):
        guard.export(tmp_path / "g.onnx")
