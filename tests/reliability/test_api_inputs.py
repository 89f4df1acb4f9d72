"""Bad input at the Python API: each case is refused before any work with one ValueError of one line that names
the value (NaN / inf / wrong type / wrong shape / wrong channel count / empty), or is repaired without loss (an
altered feature cache entry, a truncated results.jsonl)."""

import inspect
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers import make_tiny_suite
from tiny_fixtures import image_set, tiny_classifier
from oodlab.bench import BenchContext, load_rows, load_scores, run_detectors
from oodlab.data.base import ArrayDataset, ImageSet, tensor_fingerprint
from oodlab.detectors.base import fit_with_model
from oodlab.detectors import REGISTRY, available, create, load_detector, score_with_model
from oodlab.features import FeatureCache, Features, extract
from oodlab.metrics import evaluate
from oodlab.models import CheckpointError, build, load_checkpoint, save_checkpoint
from oodlab.models.loaders import load_model

FEATURE_PATH = [n for n in available() if "eval" in create(n).feature_sets()]
MODEL_PATH = [n for n in available() if "eval" not in create(n).feature_sets()]
# fit(features, head): every detector but those that learn from images through the model (fit_with_model)
FITS_FEATURES = [n for n in available() if n in FEATURE_PATH or not REGISTRY[n].needs_train]
INF_ALLOWED = {("react", "threshold"), ("dice-react", "threshold")}  # float("inf"): no clipping
VOLATILE = ("fit_s", "score_s", "fit_cached")  # timings, and whether the fit came from the cache


def one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def _bad_values(name: str) -> list[tuple[str, str, object]]:
    """(parameter, label, bad value) for every constructor parameter of a registered detector."""
    out = []
    for p in list(inspect.signature(REGISTRY[name].__init__).parameters.values())[1:]:
        d = p.default
        if p.name == "layers":  # layer paths: text, or a list of names
            bad = {"float": 1.5, "list": [1.5], "empty": [], "bool": True}
        elif (name, p.name) == ("mds-ensemble", "alpha"):  # one weight per layer
            bad = {"str": "high", "number": 1.0, "nan": [math.nan], "empty": []}
        elif isinstance(d, bool):
            bad = {"str": "yes", "int": 1, "none": None}
        elif isinstance(d, str):
            bad = {"int": 5, "unknown": "nope", "list": ["glow"]}
        else:  # a number (or None for "automatic")
            bad = {"nan": math.nan, "str": "high", "list": [1.0], "bool": True, "neg-inf": -math.inf}
            if (name, p.name) not in INF_ALLOWED:
                bad["inf"] = math.inf
        out += [(p.name, label, v) for label, v in bad.items()]
    return out


CONSTRUCTOR_CASES = [(n, p, label, v) for n in available() for p, label, v in _bad_values(n)]


def test_every_detector_parameter_is_covered():
    with_params = {n for n, *_ in CONSTRUCTOR_CASES}
    assert with_params == {n for n in available() if len(inspect.signature(REGISTRY[n].__init__).parameters) > 1}


@pytest.mark.parametrize("name,param,label,value", CONSTRUCTOR_CASES,
                         ids=[f"{n}-{p}-{label}" for n, p, label, _ in CONSTRUCTOR_CASES])
def test_constructor_refuses_bad_numbers_and_types(name, param, label, value):
    with pytest.raises(ValueError) as exc:
        create(name, **{param: value})
    one_line(exc, f"bad parameters for {name}", param.split()[0])


@pytest.mark.parametrize("name,params", [("react", {"percentile": 101}), ("ash-b", {"percentile": 100}),
                                         ("knn", {"k": 0}), ("knn", {"k": 2.5}), ("msp", {"temperature": 0}),
                                         ("odin", {"eps": -0.1}), ("dice", {"p": -1}), ("nnguide", {"fraction": 0}),
                                         ("flow", {"batch_size": 1}), ("vim", {"dim": 0}), ("gen", {"M": 0}),
                                         ("knn", {"kk": 3})])
def test_constructor_refuses_out_of_range(name, params):
    with pytest.raises(ValueError) as exc:
        create(name, **params)
    one_line(exc, f"bad parameters for {name}", next(iter(params))[:2])


def test_good_values_pass_unchanged():
    assert create("react", threshold=math.inf).threshold == math.inf
    assert create("knn", k=np.int64(3), fraction=np.float32(0.5)).config() == {"k": 3, "fraction": 0.5, "index": "flat",
                                                                             "nprobe": 16}
    assert json.dumps(create("flow", epochs=2.0).config())  # a whole float is an integer; configs stay JSON
    assert create("ash-b", percentile=65).percentile == 65  # not converted: the detector key stays the same


# -- Features ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    ((np.zeros((3, 4), np.float32), torch.zeros(3, 2)), "z must be a torch.Tensor of shape (N, D), got ndarray"),
    ((torch.zeros(3), torch.zeros(3, 2)), "z must be a torch.Tensor of shape (N, D), got shape (3,)"),
    ((torch.zeros(3, 4), torch.zeros(3, 2, 1)), "logits must be a torch.Tensor of shape (N, C)"),
    ((torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 2)), "z must hold floating-point values"),
    ((torch.zeros(3, 4), torch.zeros(2, 2)), "same N"),
    ((torch.zeros(3, 0), torch.zeros(3, 2)), "D, C >= 1"),
    ((torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(3)), "labels must hold integer class ids"),
    ((torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long)), "labels must be (3,)"),
])
def test_features_refuse_wrong_shapes_and_types(args, needle):
    with pytest.raises(ValueError) as exc:
        Features(*args)
    one_line(exc, needle)


def test_features_hold_nan_which_fit_and_score_refuse(tiny):
    """Construction checks shapes only (cheap on memory-mapped caches); NaN / inf are refused where they are read."""
    z = tiny.test.z.clone()
    z[3, 0] = math.nan
    bad = Features(z, tiny.test.logits)
    with pytest.raises(ValueError) as exc:
        create("energy").fit(tiny.train, tiny.model.head).score(bad)
    one_line(exc, "features contain NaN or inf values (in 1 rows")


# -- fit / score over every registered detector ---------------------------------------------------
def _with(feats: Features, what: str) -> Features:
    z, logits = feats.z.clone(), feats.logits.clone()
    if what == "nan-z":
        z[1, 2] = math.nan
    elif what == "inf-logits":
        logits[0, 1] = math.inf
    elif what == "empty":
        return Features(z[:0], logits[:0], None if feats.labels is None else feats.labels[:0])
    return Features(z, logits, feats.labels)


@pytest.mark.parametrize("what,needle", [("nan-z", "contain NaN or inf"), ("inf-logits", "contain NaN or inf"),
                                         ("empty", "are empty (0 samples)")])
@pytest.mark.parametrize("name", FITS_FEATURES)
def test_fit_refuses_bad_training_features(name, what, needle, tiny):
    with pytest.raises(ValueError) as exc:
        create(name).fit(_with(tiny.train, what), tiny.model.head)
    one_line(exc, "training features", needle)


@pytest.mark.parametrize("name", FITS_FEATURES)
def test_fit_refuses_a_head_that_is_not_linear_or_not_finite(name, tiny):
    with pytest.raises(ValueError) as exc:
        create(name).fit(tiny.train, nn.Sequential(tiny.model.head))
    one_line(exc, "head must be the classifier's nn.Linear")
    head = nn.Linear(16, 3)
    with torch.no_grad():
        head.bias[0] = math.nan
    with pytest.raises(ValueError) as exc:
        create(name).fit(tiny.train, head)
    one_line(exc, "NaN or inf")
    with pytest.raises(ValueError) as exc:
        create(name).fit(tiny.train.z, tiny.model.head)
    one_line(exc, "takes Features")


@pytest.fixture(scope="module")
def fitted(tiny):
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            det = create(name)
            cache[name] = (fit_with_model(det, tiny.model, tiny.test_set, device="cpu") if name not in FITS_FEATURES
                           else det.fit_on(tiny.model, tiny.train_set, tiny.train, device="cpu"))
        return cache[name]

    return get


@pytest.mark.parametrize("what,needle", [("nan-z", "contain NaN or inf"), ("inf-logits", "contain NaN or inf"),
                                         ("empty", "are empty (0 samples)")])
@pytest.mark.parametrize("name", FEATURE_PATH)
def test_score_refuses_bad_features(name, what, needle, tiny, fitted):
    with pytest.raises(ValueError) as exc:
        fitted(name).score(_with(tiny.test, what))
    one_line(exc, needle)


@pytest.mark.parametrize("name", FEATURE_PATH)
def test_score_refuses_wrong_width_and_non_features(name, tiny, fitted):
    with pytest.raises(ValueError) as exc:
        fitted(name).score(Features(tiny.test.z[:, :-1], tiny.test.logits))
    one_line(exc, "fitted on 16-d features, got 15-d")
    with pytest.raises(ValueError) as exc:
        fitted(name).score(tiny.test.z)
    one_line(exc, "takes Features")


@pytest.mark.parametrize("name", MODEL_PATH)
def test_model_path_scoring_refuses_wrong_channels(name, tiny, fitted):
    rgb = _images("rgb", (3, 8, 8))
    with pytest.raises(ValueError) as exc:
        score_with_model(fitted(name), tiny.model, rgb, device="cpu")
    one_line(exc, "rgb has images with 3 channel(s) (shape (3, 8, 8)) but the model takes 1")


# -- evaluate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sid,sood,needle", [
    ([1.0, math.nan], [0.0], "ID scores contain 1 NaN/inf value(s) of 2"),
    ([1.0], [0.0, -math.inf], "OOD scores contain 1 NaN/inf"),
    ([], [0.0], "ID scores are empty"),
    ([1.0], np.zeros(0), "OOD scores are empty"),
    (np.zeros((4, 2)), [0.0], "ID scores must be a 1-D array (one score per sample), got shape (4, 2)"),
    ([1.0, 2.0], np.float64(0.5), "OOD scores must be a 1-D array (one score per sample), got shape ()"),
    (["a", "b"], [0.0], "ID scores must be numbers"),
    ([1.0, 2.0], [[0.1, 0.2], [0.3]], "OOD scores must be numbers"),
])
def test_evaluate_refuses_bad_scores(sid, sood, needle):
    with pytest.raises(ValueError) as exc:
        evaluate(sid, sood)
    one_line(exc, needle)


def test_evaluate_takes_tensors_and_lists():
    a = evaluate(torch.tensor([3.0, 2.0, 1.5]), torch.tensor([0.0, 1.0]))
    assert a == evaluate([3.0, 2.0, 1.5], np.array([0.0, 1.0])) and a["auroc"] == 1.0


# -- extract -------------------------------------------------------------------------------------
def _images(name: str, shape: tuple[int, ...], n: int = 10) -> ImageSet:
    x = torch.randint(0, 255, (n, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageSet(name, ArrayDataset(x), tensor_fingerprint(x))


@pytest.mark.parametrize("shape,needle", [
    ((3, 8, 8), "rgb has images with 3 channel(s) (shape (3, 8, 8)) but the model takes 1: convert them"),
    ((1, 10, 10), "rgb has images of shape (1, 10, 10) that the model cannot take (mat1 and mat2 shapes"),
    ((1, 2, 2), "rgb has images of shape (1, 2, 2) that the model cannot take"),
])
def test_extract_refuses_images_the_model_cannot_take(tiny, shape, needle):
    with pytest.raises(ValueError) as exc:
        extract(tiny.model, _images("rgb", shape), device="cpu")
    one_line(exc, needle)


def test_extract_names_expected_vs_got_when_the_input_shape_is_known(tiny):
    model = tiny_classifier()
    model.input_shape = (1, 8, 8)
    with pytest.raises(ValueError) as exc:
        extract(model, _images("big", (1, 10, 10)), device="cpu")
    one_line(exc, "big has images of shape (1, 10, 10) but the model takes (1, 8, 8)")


def test_extract_refuses_a_loaded_checkpoint_on_images_of_another_size(tmp_path):
    """A model loaded by name knows its input (28x28 here): an adaptive-pooling CNN would silently run on 32x32."""
    ckpt = save_checkpoint(build("smallcnn", 3, 1), tmp_path / "m", {"arch": "smallcnn", "num_classes": 3, "in_channels": 1})
    loaded = load_model(ckpt)
    with pytest.raises(ValueError) as exc:
        extract(loaded.model, _images("cifar-like", (1, 32, 32)), device="cpu")
    one_line(exc, "cifar-like has images of shape (1, 32, 32) but the model takes (1, 28, 28)")
    rgb_model = build("smallcnn", 3, 3)  # per-channel normalisation: 3 channels
    with pytest.raises(ValueError) as exc:
        extract(rgb_model, _images("gray", (1, 28, 28)), device="cpu")
    one_line(exc, "gray has images with 1 channel(s) (shape (1, 28, 28)) but the model takes 3")


@pytest.mark.parametrize("kwargs,needle", [({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
                                           ({"batch_size": "16"}, "batch_size must be an integer >= 1, got '16'"),
                                           ({"batch_size": math.nan}, "batch_size must be an integer")])
def test_extract_refuses_bad_batch_size(tiny, kwargs, needle):
    with pytest.raises(ValueError) as exc:
        extract(tiny.model, tiny.test_set, device="cpu", **kwargs)
    one_line(exc, needle)


def test_extract_refuses_an_empty_set(tiny):
    empty = ImageSet("nothing", ArrayDataset(torch.zeros(0, 1, 8, 8, dtype=torch.uint8)), "0")
    with pytest.raises(ValueError) as exc:
        extract(tiny.model, empty, device="cpu")
    one_line(exc, "nothing is empty")


def test_extract_probe_leaves_the_model_as_it_was(tiny):
    model = tiny_classifier().train()
    f = extract(model, image_set("ok", 12, 5), batch_size=5, device="cpu")
    assert model.training and len(f) == 12


# -- files edited or damaged ----------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in available() if len(inspect.signature(REGISTRY[n].__init__).parameters) > 1])
def test_detector_file_with_edited_config_is_refused_on_load(name, tiny, fitted, tmp_path):
    path = fitted(name).save(tmp_path / name)
    meta = path.with_suffix(".json")
    info = json.loads(meta.read_text())
    for param in info["config"]:
        # a layer path is any name until a model is at hand: only a value of the wrong kind is refused on load
        for value in ({"a": 1},) if param == "layers" else ("high", [1], {"a": 1}):
            meta.write_text(json.dumps({**info, "config": {**info["config"], param: value}}))
            with pytest.raises(ValueError) as exc:
                load_detector(path)
            one_line(exc, str(meta), f"bad parameters for {name}: {param}", "fix the file or fit the detector again")
    meta.write_text(json.dumps(info))
    assert json.loads(json.dumps(load_detector(path).config())) == info["config"]  # tuples come back as lists


@pytest.mark.parametrize("edit,needle", [({"detector": ["knn"]}, "unknown detector ['knn']"),
                                         ({"detector": "knn", "config": {"k": 5, "nope": 1}}, "unexpected keyword")])
def test_detector_file_with_edited_name_or_keys(edit, needle, fitted, tmp_path):
    path = fitted("knn").save(tmp_path / "knn")
    meta = path.with_suffix(".json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), **edit}))
    with pytest.raises(ValueError) as exc:
        load_detector(path)
    one_line(exc, str(meta), needle)


def test_checkpoint_of_another_architecture_at_the_api(tmp_path):
    ckpt = save_checkpoint(build("smallcnn", 3, 1), tmp_path / "m", {"arch": "smallcnn", "num_classes": 3, "in_channels": 1})
    ckpt.with_suffix(".json").write_text(json.dumps({"arch": "resnet18-cifar", "num_classes": 3, "in_channels": 3}))
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError) as exc:
            load(ckpt)
        one_line(exc, str(ckpt), "does not match architecture 'resnet18-cifar'")
    ckpt.with_suffix(".json").write_text(json.dumps({"arch": "smallcnn", "num_classes": 10, "in_channels": 1}))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    one_line(exc, "does not match architecture 'smallcnn'",
             "2 of another shape (e.g. head.weight: (3, 128) in the file, (10, 128) in the model)")


def _flip_byte(files):
    big = max((f for f in files if f.suffix != ".json"), key=lambda f: f.stat().st_size)
    raw = bytearray(big.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    big.write_bytes(bytes(raw))


def _truncate(files):
    for f in files:
        if f.suffix != ".json":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _garbage_meta(files):
    for f in files:
        if f.suffix == ".json":
            f.write_text('{"key": ')


def _edited_meta(files):
    for f in files:
        if f.suffix == ".json":
            info = json.loads(f.read_text())
            f.write_text(json.dumps({**info, "rows": 3}))


@pytest.mark.parametrize("alter", [_flip_byte, _truncate, _garbage_meta, _edited_meta])
def test_altered_feature_cache_entry_is_rebuilt_with_equal_results(alter, tiny, tmp_path, caplog):
    root = tmp_path / "cache"
    good = FeatureCache(root).get(tiny.model, "m", tiny.test_set, device="cpu")
    alter([f for f in root.rglob("*") if f.is_file()])
    cache = FeatureCache(root)
    again = cache.get(tiny.model, "m", tiny.test_set, device="cpu")
    assert cache.extractions == 1 and "rebuilding" in caplog.text
    assert torch.equal(again.z, good.z) and torch.equal(again.logits, good.logits) and torch.equal(again.labels, good.labels)
    det = create("knn", k=5).fit(tiny.train, tiny.model.head)
    assert torch.equal(det.score(again), det.score(good))
    third = FeatureCache(root)
    third.get(tiny.model, "m", tiny.test_set, device="cpu")
    assert third.extractions == 0  # the rebuilt entry is whole


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.mark.parametrize("cut", ["last-line", "last-bytes"])
def test_truncated_results_jsonl_resumes_and_recomputes_the_broken_row(cut, tmp_path, caplog):
    suite = make_tiny_suite()
    torch.manual_seed(0)
    model = build("smallcnn", 3, 1).eval()
    dets = lambda: [create("energy"), create("knn", k=5)]  # noqa: E731
    clean = run_detectors(BenchContext(suite, model, "m", tmp_path / "clean", FeatureCache(tmp_path / "c"),
                                       batch_size=32, device="cpu"), dets())
    out = tmp_path / "out"
    run_detectors(BenchContext(suite, model, "m", out, FeatureCache(tmp_path / "c"), batch_size=32, device="cpu"), dets())
    jsonl = out / "results.jsonl"
    text = jsonl.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    keep = len(text) - len(last) - 1 + (len(last) // 2 if cut == "last-line" else len(last) - 2)
    jsonl.write_text(text[:keep])  # the last row cut in half (or only its closing brace lost)
    assert len(load_rows(out)) == len(clean) - 1
    rows = run_detectors(BenchContext(suite, model, "m", out, FeatureCache(tmp_path / "c"), batch_size=32,
                                      device="cpu"), dets())
    assert "cut short" in caplog.text
    assert _strip(rows) == _strip(clean)  # the lost row is back, nothing doubled
    assert _strip(load_rows(out)) == _strip(clean)
    for key in {r["key"] for r in clean}:
        a, b = load_scores(tmp_path / "clean", key), load_scores(out, key)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_altered_fit_and_score_cache_entries_are_recomputed(tmp_path, caplog):
    """The fitted-detector and score caches beside the features carry a checksum too: an altered
    entry (a flipped byte inside a tensor, which safetensors alone would load) is recomputed, never used."""
    suite = make_tiny_suite()
    torch.manual_seed(0)
    model = build("smallcnn", 3, 1).eval()
    dets = lambda: [create("knn", k=5), create("odin")]  # noqa: E731
    ctx = lambda out: BenchContext(suite, model, "m", tmp_path / out, FeatureCache(tmp_path / "cache" / "features"),  # noqa: E731
                                   batch_size=32, device="cpu")
    first = run_detectors(ctx("a"), dets())
    entries = [f for kind in ("detectors", "scores") for f in (tmp_path / "cache" / kind).iterdir()]
    assert len(entries) == 1 + 2 * 3  # knn's fit; knn's and odin's scores of ID test and two OOD sets
    for f in entries:
        raw = bytearray(f.read_bytes())
        raw[-3] ^= 0x01  # the last tensor's data, not the header
        f.write_bytes(bytes(raw))
    again = run_detectors(ctx("b"), dets())
    assert caplog.text.count("checksum mismatch (altered file)") == 7
    assert _strip(again) == _strip(first)
    assert {r["fit_cached"] for r in again if r["detector"] == "knn"} == {False}  # refitted
    for key in {r["key"] for r in first}:
        a, b = load_scores(tmp_path / "a", key), load_scores(tmp_path / "b", key)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    caplog.clear()
    run_detectors(ctx("c"), dets())
    assert "unusable" not in caplog.text  # the recomputed entries are whole
