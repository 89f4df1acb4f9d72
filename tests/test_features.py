"""Feature extraction and the on-disk cache: reuse, staleness, corruption."""

import json

import pytest
import torch

from oodlab.features import FeatureCache, Features, extract
from oodlab.models import build



@pytest.fixture
def model():
    return build("smallcnn", 3, 1).eval()


def _count_calls(model, monkeypatch):
    calls = {"n": 0}
    orig = model.features

    def counted(x):
        calls["n"] += 1
        return orig(x)

    monkeypatch.setattr(model, "features", counted)
    return calls


def test_extract_matches_model(model, tiny_suite):
    f = extract(model, tiny_suite.id_test, batch_size=10, device="cpu")
    x = tiny_suite.id_test.dataset.images.float() / 255
    with torch.no_grad():
        assert torch.allclose(f.logits, model(x), atol=1e-5)
        assert torch.allclose(f.z, model.features(x), atol=1e-5)
    assert torch.equal(f.labels, tiny_suite.id_test.dataset.labels)
    assert extract(model, tiny_suite.ood["noise"], device="cpu").labels is None


def test_cache_reuses_features(model, tiny_suite, tmp_path, monkeypatch):
    calls = _count_calls(model, monkeypatch)
    cache = FeatureCache(tmp_path)
    a = cache.get(model, "m1", tiny_suite.id_test, batch_size=16, device="cpu")
    first = calls["n"]
    assert first == 3  # 48 samples / 16
    b = FeatureCache(tmp_path).get(model, "m1", tiny_suite.id_test, batch_size=16, device="cpu")
    assert calls["n"] == first  # no forward pass on the second run
    assert torch.equal(a.z, b.z) and torch.equal(a.labels, b.labels)
    FeatureCache(tmp_path).get(model, "m2", tiny_suite.id_test, batch_size=16, device="cpu")
    assert calls["n"] == 2 * first  # another checkpoint -> new extraction


def test_corrupted_cache_is_rebuilt(model, tiny_suite, tmp_path, monkeypatch, caplog):
    cache = FeatureCache(tmp_path)
    good = cache.get(model, "m", tiny_suite.id_test, device="cpu")
    (tensor_file,) = tmp_path.glob("*/shard-*.safetensors")
    raw = bytearray(tensor_file.read_bytes())
    raw[-5] ^= 0xFF
    tensor_file.write_bytes(bytes(raw))
    calls = _count_calls(model, monkeypatch)
    again = FeatureCache(tmp_path).get(model, "m", tiny_suite.id_test, device="cpu")
    assert calls["n"] > 0 and "checksum" in caplog.text
    assert torch.allclose(again.z, good.z)


def test_stale_cache_is_rebuilt(model, tiny_suite, tmp_path, monkeypatch, caplog):
    FeatureCache(tmp_path).get(model, "m", tiny_suite.id_test, device="cpu")
    (meta,) = tmp_path.glob("*/shard-*.json")
    info = json.loads(meta.read_text())
    info["key"]["data"] = "something-else"
    meta.write_text(json.dumps(info))
    calls = _count_calls(model, monkeypatch)
    FeatureCache(tmp_path).get(model, "m", tiny_suite.id_test, device="cpu")
    assert calls["n"] > 0 and "stale" in caplog.text


def test_interrupted_extraction_resumes_at_the_first_unfinished_shard(model, tiny_suite, tmp_path, monkeypatch):
    """48 items in shards of 16, batches of 8: a crash in shard 2 keeps shard 1; the re-run extracts shards 2-3."""
    whole = extract(model, tiny_suite.id_test, batch_size=8, device="cpu")
    calls = _count_calls(model, monkeypatch)
    orig = model.features

    def dies_on_third_batch(x):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a kill would stop it, mid-shard
        return orig(x)

    monkeypatch.setattr(model, "features", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path, shard_items=16).get(model, "m", tiny_suite.id_test, batch_size=8, device="cpu")
    assert len(list(tmp_path.glob("*/shard-*.json"))) == 1
    monkeypatch.setattr(model, "features", orig)
    calls = _count_calls(model, monkeypatch)
    again = FeatureCache(tmp_path, shard_items=16).get(model, "m", tiny_suite.id_test, batch_size=8, device="cpu")
    assert calls["n"] == 4  # shards 2 and 3, two batches each; shard 1 was kept
    assert torch.allclose(again.z, whole.z, atol=1e-6) and torch.equal(again.labels, whole.labels)


def test_lazy_features_read_from_shards(model, tiny_suite, tmp_path):
    cache = FeatureCache(tmp_path, shard_items=16)
    lazy = cache.get(model, "m", tiny_suite.id_test, batch_size=8, device="cpu", lazy=True)
    full = cache.get(model, "m", tiny_suite.id_test, batch_size=8, device="cpu")
    assert len(lazy.records) == 3 and len(lazy) == len(full) == 48 and lazy.dim == full.dim
    assert torch.equal(torch.cat([c.z for c in lazy.chunks(5)]), full.z)
    assert cache.extractions == 1


def test_features_validation():
    with pytest.raises(ValueError, match="same N"):
        Features(torch.zeros(3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="labels"):
        Features(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(2, dtype=torch.long))
    f = Features(torch.zeros(2, 4), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    assert f.accuracy() == 0.5


def test_bfloat16_autocast_agrees_with_float32(tiny):
    """The reduced-precision extraction (default on CUDA; forced here on the CPU) keeps scores and rankings."""
    from oodlab.detectors import create
    from oodlab.metrics import auroc

    full = extract(tiny.model, tiny.test_set, device="cpu")
    half = extract(tiny.model, tiny.test_set, device="cpu", autocast=True)
    ood_full = extract(tiny.model, tiny.ood_set, device="cpu")
    ood_half = extract(tiny.model, tiny.ood_set, device="cpu", autocast=True)
    assert half.z.dtype == torch.float32 and not torch.equal(half.z, full.z)  # it did run in bfloat16
    # bfloat16 keeps 8 bits of mantissa: features within 2% of their scale
    assert (half.z - full.z).abs().max() <= 0.02 * full.z.abs().max()
    det = create("energy").fit(None, tiny.model.head)
    a, b = det.score(full), det.score(half)
    assert (a - b).abs().max() <= 0.01 * a.abs().mean()
    assert abs(auroc(a.numpy(), det.score(ood_full).numpy()) - auroc(b.numpy(), det.score(ood_half).numpy())) <= 0.02
