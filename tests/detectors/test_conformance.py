"""One contract check run over every registered detector (like scikit-learn's check_estimator)."""

import pytest
import torch

from oodlab.detectors import REGISTRY, NotFittedError, available, create, load_detector


def scores(det, feats, data, model):
    return det.score_on(model, data, feats, device="cpu")


def fit(det, tiny):
    """Fit on the tiny ID training set (for ``fits_on = "val"`` detectors it stands in for held-out ID data)."""
    return det.fit_on(tiny.model, tiny.train_set, tiny.train, device="cpu")


@pytest.mark.parametrize("name", available())
def test_detector_contract(name, tiny, tmp_path):
    det = create(name)
    assert det.name == name and not det.fitted
    with pytest.raises(NotFittedError):
        scores(det, tiny.test, tiny.test_set, tiny.model)

    assert tiny.ood.labels is None  # fitting sees ID training features only; OOD sets are unlabelled
    assert fit(det, tiny) is det

    s_id = scores(det, tiny.test, tiny.test_set, tiny.model)
    s_ood = scores(det, tiny.ood, tiny.ood_set, tiny.model)
    for s, n in ((s_id, len(tiny.test)), (s_ood, len(tiny.ood))):
        assert s.dtype == torch.float64 and s.shape == (n,)
        assert torch.isfinite(s).all()
    assert s_id.std() > 0  # a score that is constant over samples says nothing
    assert torch.equal(scores(det, tiny.test, tiny.test_set, tiny.model), s_id)  # deterministic

    logits = det.logits(tiny.test)
    assert logits.shape == tiny.test.logits.shape and torch.isfinite(logits).all()

    path = det.save(tmp_path / name)
    again = load_detector(path)
    assert type(again) is type(det) and again.config() == det.config()
    assert torch.equal(scores(again, tiny.ood, tiny.ood_set, tiny.model), s_ood)


@pytest.mark.parametrize("name", [n for n in available() if "eval" in create(n).feature_sets()])
def test_wrong_feature_width_is_refused(name, tiny):
    det = fit(create(name), tiny)
    narrow = type(tiny.test)(tiny.test.z[:, :-1], tiny.test.logits)
    with pytest.raises(ValueError, match="fitted on"):
        det.score(narrow)


def test_paper_defaults():
    defaults = {"ash-p": {"percentile": 60.0, "feature_map": False}, "ash-b": {"percentile": 65.0, "feature_map": False},
                "ash-s": {"percentile": 90.0, "feature_map": False}, "dice": {"p": 90.0},
                "dice-react": {"p": 10.0, "react_percentile": 90.0, "threshold": None}, "react": {"percentile": 90.0, "threshold": None},
                "odin": {"temperature": 1000.0, "eps": 0.0014}, "mahalanobis": {"normalize": False}, "knn": {"k": 50, "fraction": 1.0, "index": "flat", "nprobe": 16},
                "vim": {"dim": None}, "scale": {"percentile": 85.0}, "gen": {"gamma": 0.1, "M": 100},
                "rmds": {"normalize": False}, "gradnorm": {"temperature": 1.0}, "nnguide": {"k": 100, "fraction": 0.01},
                "fdbd": {"distance_as_normalizer": True}, "residual": {"dim": None}, "she": {}, "nci": {"alpha": 1e-4},
                "klm": {"nearest": True}, "temp-scaling": {"temperature": None},
                "vra": {"low": 60.0, "high": 90.0, "gamma": 0.0, "per_dimension": True, "zero_below": True},
                "adascale-a": {"p_min": 60.0, "p_max": 85.0, "lmbda": 10.0, "k1": 1.0, "k2": 5.0, "o": 0.05, "eps": 0.5,
                               "num_samples": 5000},
                "adascale-l": {"p_min": 75.0, "p_max": 85.0, "lmbda": 10.0, "k1": 1.0, "k2": 5.0, "o": 0.05, "eps": 0.5,
                               "num_samples": 5000},
                "entropy": {}, "weighted-energy": {"weights": None},
                "openmax": {"tail_size": 20, "alpha": 3, "distance": "euclidean", "eu_weight": 0.5, "translate": 1.0},
                "weiper": {"n_repeats": 100, "perturbation_distance": 1.8, "seed": 0},
                "weiper-kld": {"n_repeats": 100, "perturbation_distance": 1.8, "n_bins": 100, "smoothing": 4,
                               "smoothing_perturbed": 15, "lambda_1": 2.5, "lambda_2": 0.1, "eps": 0.01,
                               "eps_perturbed": 0.025, "seed": 0},
                "neco": {"dim": None, "max_logit": True, "raw_norm": False, "standardize": True},
                "mds-ensemble": {"layers": None, "alpha": None, "feature_type": "mean"},
                "gram": {"layers": None, "powers": 5, "val_fraction": 0.1, "msp_weighted": True, "seed": 0}, "rankfeat": {},
                "cadref": {"logit_score": "energy"}, "grood": {"noise": "mean", "k": 1, "fraction": 1.0, "seed": 0},
                "gmm": {"components": 50, "covariance": "tied", "dim": 50, "reg": 1e-6, "max_samples": 100_000, "seed": 0}}
    for name, config in defaults.items():
        assert create(name).config() == config, name
    assert {n for n in available() if REGISTRY[n].fits_on == "val"} == {"klm", "temp-scaling", "adascale-a",
                                                                       "adascale-l"}
