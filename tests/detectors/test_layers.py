"""Intermediate layers: captured in the extraction's one pass, cached beside z, read by the Mahalanobis ensemble."""

import pytest
import torch
from torch import nn

from oodlab.data.base import ImageSet
from oodlab.detectors import create
from oodlab.features import FeatureCache, extract
from oodlab.features.layers import split_tap, tap
from oodlab.models import build


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build("smallcnn", 3, 1).eval()


def _means_by_hand(model, x):
    """The spatial mean of every top-level layer's output, running the body's children one by one."""
    out, h = {}, model.normalise(x)
    with torch.no_grad():
        for name, m in model.body.named_children():
            h = m(h)
            out[name] = h.mean((2, 3)).clone()
    return out


def test_layers_are_captured_in_the_same_pass_and_match_a_manual_forward(model, tiny_suite):
    data = tiny_suite.id_test
    x = data.dataset.images.float() / 255
    feats = extract(model, data, batch_size=16, device="cpu", layers=("2:mean", "9:mean", "13:stat"))
    by_hand = _means_by_hand(model, x)
    torch.testing.assert_close(feats.layers["2:mean"], by_hand["2"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.layers["9:mean"], by_hand["9"], atol=1e-5, rtol=1e-5)
    assert feats.layers["13:stat"].shape == (len(data), 2 * 128)
    torch.testing.assert_close(feats.layers["13:stat"][:, :128], feats.z, atol=1e-5, rtol=1e-5)  # z: the last map's mean
    plain = extract(model, data, batch_size=16, device="cpu")
    assert torch.equal(plain.z, feats.z) and torch.equal(plain.logits, feats.logits)  # capturing changes nothing else


def test_stages_are_the_layers_before_each_change_of_resolution(model):
    assert model.stages((1, 28, 28)) == ["2", "9", "13"]
    assert build("resnet18-cifar", 10, 3).stages((3, 32, 32)) == ["4", "6", "8", "10"]
    assert build("tv-resnet18", 10, 3).stages((3, 64, 64)) == ["2", "4", "5", "6", "7"]  # stem, layer1-4


def test_unknown_layer_and_reduction_are_one_line(model, tiny_suite):
    with pytest.raises(ValueError, match=r"no layer '99'; its body's layers are 0, 1, 2, .*, 13$"):
        extract(model, tiny_suite.id_test, device="cpu", layers=("99:mean",))
    with pytest.raises(ValueError, match="unknown layer reduction 'max'; choose one of mean, stat, flat, gram1 ... gram10"):
        split_tap("2:max")
    with pytest.raises(ValueError, match="layers must be layer paths"):
        create("mds-ensemble", layers=[1.5])
    with pytest.raises(ValueError, match="alpha has 1 weights for 2 layers"):
        create("mds-ensemble", layers="2,9", alpha=[1.0])
    with pytest.raises(ValueError, match="feature_type must be one of mean, stat, flat"):
        create("mds-ensemble", feature_type="max")
    assert create("mds-ensemble", layers=(2, 9)).layers == ("2", "9")  # what --param mds-ensemble.layers=2,9 gives


def test_a_layer_whose_features_change_shape_with_the_input_is_refused():
    fully_conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    from oodlab.models.adapter import Classifier

    clf = Classifier(fully_conv, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), nn.Linear(4, 2)).eval()

    class Sizes(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.rand(1, 8 + 4 * i, 8 + 4 * i), 0

    data = ImageSet("sizes", Sizes(), "sizes", 2)
    assert extract(clf, data, batch_size=1, device="cpu", layers=("1:mean",)).layers["1:mean"].shape == (2, 4)
    with pytest.raises(ValueError, match=r"layer 1 of the model gives \(576,\) features for some images of sizes "
                                         r"and \(256,\) for others: its output changes shape with the input"):
        extract(clf, data, batch_size=1, device="cpu", layers=("1:flat",))


def test_layer_features_are_cached_beside_z_and_leave_its_entry_alone(model, tiny_suite, tmp_path):
    cache = FeatureCache(tmp_path, shard_items=20)
    data = tiny_suite.id_test
    plain = cache.get(model, "m", data, device="cpu", lazy=True)
    z_files = {p: p.stat().st_mtime_ns for p in plain.entry.iterdir()}
    with_layers = cache.get(model, "m", data, device="cpu", lazy=True, layers=("2:mean", "9:mean"))
    assert cache.extractions == 2 and with_layers.entry == plain.entry
    assert {p: p.stat().st_mtime_ns for p in plain.entry.iterdir()} == z_files  # z's entry was not rewritten
    again = FeatureCache(tmp_path, shard_items=20)
    reread = again.get(model, "m", data, device="cpu", lazy=True, layers=("9:mean", "2:mean"))
    assert again.extractions == 0
    fresh = extract(model, data, device="cpu", layers=("2:mean", "9:mean"))
    for name in ("2:mean", "9:mean"):
        assert torch.equal(reread.layer(name).load().z, fresh.layers[name])
        assert torch.equal(reread.layer(name).load().labels, fresh.labels)
    assert torch.equal(reread.load().layers["9:mean"], fresh.layers["9:mean"])
    with pytest.raises(ValueError, match=r"hold no layer features '4:mean' \(they hold: 2:mean, 9:mean\)"):
        reread.layer("4:mean")


def _gaussian_score_by_hand(train_z, labels, z, num_classes):
    means = torch.stack([train_z[labels == c].mean(0) for c in range(num_classes)])
    centred = train_z - means[labels]
    cov = centred.T @ centred / len(train_z)
    prec = torch.linalg.pinv(cov, hermitian=True)
    d = torch.stack([((z - m) @ prec * (z - m)).sum(1) for m in means], 1)
    return -d.min(1).values


def test_mahalanobis_ensemble_is_the_weighted_sum_of_per_layer_mahalanobis_scores(model, tiny_suite):
    train_set, test_set = tiny_suite.id_train, tiny_suite.ood["noise"]
    det = create("mds-ensemble", alpha=[0.5, 1.0, 2.0])
    det.fit_on(model, train_set, device="cpu")
    assert det.layers == ("2", "9", "13") and det.config()["layers"] == ("2", "9", "13")  # the model's stages
    got = det.score_on(model, test_set, device="cpu")
    xtr = train_set.dataset.images.float() / 255
    xte = test_set.dataset.images.float() / 255
    tr, te = _means_by_hand(model, xtr), _means_by_hand(model, xte)
    labels = train_set.dataset.labels
    want = sum(a * _gaussian_score_by_hand(tr[n].double(), labels, te[n].double(), 3)
               for a, n in zip((0.5, 1.0, 2.0), ("2", "9", "13")))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    # one layer, the penultimate map's mean (= z): the ensemble is plain Mahalanobis
    one = create("mds-ensemble", layers="13").fit_on(model, train_set, device="cpu")
    torch.testing.assert_close(one.score_on(model, test_set, device="cpu"),
                               create("mahalanobis").fit_on(model, train_set, device="cpu").score_on(model, test_set,
                                                                                                  device="cpu"),
                               rtol=1e-5, atol=1e-5)


def test_a_bench_with_the_ensemble_extracts_each_set_once_and_reuses_the_other_entries(model, tiny_suite, tmp_path,
                                                                                      monkeypatch):
    from oodlab.bench import BenchContext, run_detectors
    from oodlab.features import extraction

    cache = FeatureCache(tmp_path / "features")
    run_detectors(BenchContext(tiny_suite, model, "m", tmp_path / "out", cache, device="cpu"),
                  [create("energy"), create("mahalanobis")])
    sets = 2 + len(tiny_suite.ood)  # ID train, ID test, every OOD set
    assert cache.extractions == sets
    passes = []
    real = extraction.extract
    monkeypatch.setattr(extraction, "extract", lambda *a, **k: passes.append((a[1].name, k["layers"])) or real(*a, **k))
    rows = run_detectors(BenchContext(tiny_suite, model, "m", tmp_path / "out2", cache, device="cpu"),
                         [create("energy"), create("mahalanobis"), create("mds-ensemble", layers="2,13")])
    # one pass per set, for the two new layer entries only; the fit of Mahalanobis came from the fit cache
    assert sorted(passes) == sorted((n, ("2:mean", "13:mean")) for n in
                                    [tiny_suite.id_train.name, tiny_suite.id_test.name, *(d.name for d in tiny_suite.ood.values())])
    assert {r["detector"] for r in rows} == {"energy", "mahalanobis", "mds-ensemble"}
    assert all(r["fit_cached"] for r in rows if r["detector"] == "mahalanobis")
    assert tap("2") == "2:mean"
