"""oodlab against pytorch-ood 0.4: every method both implement, scored by both on the same cached features.

    python benchmarks/crosscheck.py [--suite fashionmnist] [--methods msp,vra,...] [--train-subset N]

The default model's features of the suite (ID train, ID test, every OOD set, and the held-out ID set
that KL-Matching and temperature scaling fit on) come from oodlab's feature cache; pytorch-ood's
detectors are fed the same tensors through their feature-, feature-map- and logit-level APIs
(``fit_features`` / ``predict_features``, ``fit_feature_maps`` / ``predict_feature_maps`` on the pooled
features as ``D x 1 x 1`` maps, ``fit_logits`` / ``predict_logits``), with the model's head as their
head, so any difference comes from the definitions, not from the data. AUROC (ID positive) of both
libraries' scores is computed by the same function (pytorch-ood scores are outlier scores, negated).
Rows run with matched settings where a method has options; rows marked "defaults" run each library
with its own defaults where those differ. Writes the "crosscheck" section of docs/results.md.

Needs ``pytorch-ood==0.4.0`` (the ``bench`` extra: ``pip install -e '.[bench]'``); install it with
``--no-deps`` if your torch is newer than it pins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness import PYOOD_VERSION, default_model, escape, parser, pytorch_ood, table, write_section

TOLERANCE = 0.1  # AUROC points (%) within which two implementations of one definition must agree


@dataclass
class Data:
    train: object  # oodlab Features
    val: object  # the held-out ID set (Suite.held_out)
    test: object
    oods: dict
    head: nn.Linear


@dataclass
class Case:
    method: str
    setting: str
    oodlab: Callable[[Data], dict[str, Tensor]]  # scores (higher = ID) per set: "id" and every OOD set
    pyood: Callable[[Data], dict[str, Tensor]]
    same: bool  # the two definitions (as configured) are the same
    note: str
    differs: str = "differs by definition"  # the verdict where they are not


def _sets(d: Data) -> dict:
    return {"id": d.test, **d.oods}


def oodlab_scores(name: str, fit_on: str = "train", **params) -> Callable[[Data], dict[str, Tensor]]:
    from oodlab.detectors import create

    def run(d: Data) -> dict[str, Tensor]:
        det = create(name, **params).fit(getattr(d, fit_on) if create(name).needs_train else None, d.head)
        return {k: det.score(f) for k, f in _sets(d).items()}
    return run


def _maps(z: Tensor) -> Tensor:
    return z[:, :, None, None]


def _map_head(head: nn.Linear) -> Callable[[Tensor], Tensor]:
    return lambda m: head(m.flatten(1))


def pyood_scores(make: Callable[[Data], Callable[[object], Tensor]]) -> Callable[[Data], dict[str, Tensor]]:
    """``make(data)`` fits a pytorch-ood detector and returns ``features -> outlier score``; scores are negated."""
    def run(d: Data) -> dict[str, Tensor]:
        with torch.no_grad():
            score = make(d)
        out = {}
        for k, f in _sets(d).items():
            s = score(f)
            out[k] = -(s.detach() if isinstance(s, Tensor) else torch.as_tensor(s)).double().cpu()
        return out
    return run


def cases(po) -> list[Case]:
    D = po.detector

    def logits_only(cls, **kw):
        return pyood_scores(lambda d: (lambda f, det=cls(None, **kw): det.predict_logits(f.logits)))

    def feature_maps(make):
        return pyood_scores(lambda d: (lambda f, det=make(d): det.predict_feature_maps(_maps(f.z))))

    def features(make):
        return pyood_scores(lambda d: (lambda f, det=make(d): det.predict_features(f.z)))

    def klm(d):
        det = D.KLMatching(None).fit_logits(d.val.logits)
        return lambda f: det.predict_logits(f.logits)

    def nll(d, t):
        return float(F.cross_entropy(d.val.logits.double() / t, d.val.labels))

    def ts(at_oodlab_t):
        def make(d):
            det = D.TemperatureScaling(None).fit_logits(d.val.logits, d.val.labels)
            _FIT["pytorch-ood T"] = (float(det.t), nll(d, float(det.t)))
            if at_oodlab_t:
                det.t.data.fill_(_FIT["oodlab T"][0])
            return lambda f: det.predict_logits(f.logits)
        return pyood_scores(make)

    def ts_oodlab(d):
        from oodlab.detectors import create

        det = create("temp-scaling").fit(d.val, d.head)
        _FIT["oodlab T"] = (det.fitted_temperature, nll(d, det.fitted_temperature))
        return {k: det.score(f) for k, f in _sets(d).items()}

    def fitted_maps(cls, **kw):
        def make(d):
            return cls(None, _map_head(d.head), **kw).fit_feature_maps(_maps(d.train.z), d.train.labels)
        return feature_maps(make)

    def gradnorm(param_filter):
        def make(d):
            det = D.GradNorm(d.head, param_filter=param_filter, micro_batch_size=256)
            return lambda f: torch.cat([det.predict(c) for c in f.z.split(4096)])
        return pyood_scores(make)

    w = lambda d: d.head.weight.detach()  # noqa: E731
    b = lambda d: d.head.bias.detach()  # noqa: E731
    ash = lambda variant, p: feature_maps(lambda d: D.ASH(None, _map_head(d.head), variant=variant, percentile=p))  # noqa: E731
    same_rule = "same definition"
    return [
        Case("MSP", "", oodlab_scores("msp"), logits_only(D.MaxSoftmax), True,
             f"{same_rule}; oodlab computes the softmax in float64, pytorch-ood in float32 (ties at 1.0)"),
        Case("MaxLogit", "", oodlab_scores("maxlogit"), logits_only(D.MaxLogit), True, same_rule),
        Case("Energy", "T=1", oodlab_scores("energy"), logits_only(D.EnergyBased), True, same_rule),
        Case("Entropy", "", oodlab_scores("entropy"), logits_only(D.Entropy), True,
             f"{same_rule}; oodlab exact in float64, pytorch-ood clips p at 1e-7 in float32"),
        Case("WeightedEBO", "class weights 1, 2, ..., C (VOS-style)",
             lambda d: oodlab_scores("weighted-energy", weights=[float(i + 1) for i in range(d.head.out_features)])(d),
             pyood_scores(lambda d: (lambda f, det=D.WeightedEBO(None, torch.arange(1.0, d.head.out_features + 1)):
                                     det.predict_logits(f.logits))), True, same_rule),
        Case("GEN", "gamma 0.1", oodlab_scores("gen"), logits_only(D.GEN), True,
             "oodlab sums the top M=100 (capped at C; official code, OpenOOD), pytorch-ood averages all C (M=None): "
             "the same ranking at C=10"),
        Case("KLMatching", "templates on held-out ID", oodlab_scores("klm", fit_on="val"), pyood_scores(klm), True,
             "-min_k KL(p || d_k) in both (paper, OpenOOD klm)"),
        Case("TemperatureScaling", "T fitted by each on held-out ID", ts_oodlab, ts(False), False,
             "the same objective (MSP at the T minimising the held-out NLL), but pytorch-ood's LBFGS (lr 0.01, 50 "
             "iterations, from T = 1; OpenOOD: from 1.5) stops short of the minimiser that oodlab finds exactly: "
             "{fit}", "differs by optimiser"),
        Case("TemperatureScaling", "pytorch-ood at oodlab's T", ts_oodlab, ts(True), True,
             "MSP of logits / T at the same T"),
        Case("ReAct", "p=90", oodlab_scores("react"), fitted_maps(D.ReAct, percentile=0.9), True,
             "clip at the 90th percentile of all ID-train activations (np.percentile in both)"),
        Case("DICE", "p=90", oodlab_scores("dice"),
             features(lambda d: D.DICE(None, w(d), b(d), p=0.9).fit_features(d.train.z, d.train.labels)), True,
             "mask W[c,j] m[j] > its 90th percentile"),
        Case("ASH-P", "p=60", oodlab_scores("ash-p"), ash("ash-p", 0.6), True,
             "pooled features (pytorch-ood's feature-map API on 1x1 maps)"),
        Case("ASH-B", "p=65", oodlab_scores("ash-b"), ash("ash-b", 0.65), True, "as ASH-P"),
        Case("ASH-S", "p=90", oodlab_scores("ash-s"), ash("ash-s", 0.9), True, "as ASH-P"),
        Case("SCALE", "p=85", oodlab_scores("scale"),
             feature_maps(lambda d: D.SCALE(None, _map_head(d.head), percentile=0.85)), True, same_rule),
        Case("VRA", "clip 1/99 per dimension", oodlab_scores("vra", low=1.0, high=99.0, zero_below=False),
             fitted_maps(D.VRA, lower_percentile=0.01, upper_percentile=0.99), True,
             "pytorch-ood's rule: clip both sides at per-dimension ID-train quantiles"),
        Case("VRA", "defaults", oodlab_scores("vra"), fitted_maps(D.VRA), False,
             "oodlab: the official rule (zeroQiaoba/VRA, clip2: 0 below the 60th, x + gamma between, the 90th above, "
             "per-dimension; gamma 0); pytorch-ood: clip to the 1st/99th per-dimension quantiles; OpenOOD: clip to "
             "the global 10th/90th"),
        Case("KNN", "k=50", oodlab_scores("knn"), features(lambda d: D.KNN(None, k=50).fit_features(d.train.z, d.train.labels)),
             True, "exact neighbours in both (faiss flat / sklearn)"),
        Case("Mahalanobis", "", oodlab_scores("mahalanobis"),
             features(lambda d: D.Mahalanobis(None).fit_features(d.train.z, d.train.labels)), True,
             "shared covariance; oodlab: float64 pseudo-inverse, pytorch-ood: float32 inverse of the scatter + 1e-6 I"),
        Case("RMD", "", oodlab_scores("rmds"), features(lambda d: D.RMD(None).fit_features(d.train.z, d.train.labels)),
             True, "as Mahalanobis, minus the class-agnostic Gaussian's distance"),
        Case("ViM", "dim=D/2", oodlab_scores("vim"),
             features(lambda d: D.ViM(None, d.train.z.shape[1] // 2, w(d), b(d)).fit_features(d.train.z, d.train.labels)),
             True, "uncentred second moment around u = -pinv(W) b (official assume_centered)"),
        Case("SHE", "", oodlab_scores("she"),
             features(lambda d: D.SHE(None, d.head).fit_features(d.train.z, d.train.labels)), True,
             "patterns from correctly classified ID train"),
        Case("fDBD", "", oodlab_scores("fdbd"), features(lambda d: D.fDBD(None, d.head).fit_features(d.train.z)), True,
             "mean boundary distance / ||z - mu||"),
        Case("NCI", "alpha=1e-4", oodlab_scores("nci"),
             features(lambda d: D.NCI(None, d.head, alpha=1e-4).fit_features(d.train.z)), True,
             "<w_yhat, z - mu> / ||z - mu|| + alpha ||z||_1 in both (OpenOOD's nci_postprocessor)"),
        Case("NCI", "defaults", oodlab_scores("nci"), features(lambda d: D.NCI(None, d.head).fit_features(d.train.z)),
             False, "alpha: oodlab 1e-4 (the paper's and OpenOOD's default), pytorch-ood 0 (no feature-norm term)"),
        Case("NNGuide", "k=10, full bank", oodlab_scores("nnguide", k=10, fraction=1.0),
             features(lambda d: D.NNGuide(None, d.head, k=10).fit_features(d.train.z, d.train.labels)), True,
             same_rule),
        Case("NNGuide", "defaults", oodlab_scores("nnguide"),
             features(lambda d: D.NNGuide(None, d.head).fit_features(d.train.z, d.train.labels)), False,
             "oodlab: seeded 1% bank, k=100 (official code, OpenOOD); pytorch-ood: the whole training set, k=10"),
        Case("GradNorm", "weight gradient", oodlab_scores("gradnorm"), gradnorm(lambda n: n == "weight"), True,
             "||softmax - u||_1 ||z||_1 (closed form) vs per-sample autograd of the head's weight"),
        Case("GradNorm", "defaults", oodlab_scores("gradnorm"), gradnorm(None), False,
             "pytorch-ood's default also sums the bias gradient: ||softmax - u||_1 (||z||_1 + 1); the official code "
             "and oodlab take the weight only"),
    ]


_FIT: dict[str, tuple[float, float]] = {}  # fitted temperatures and their held-out NLL


def load_data(suite_name: str, train_subset: int | None) -> tuple[Data, str]:
    default = default_model(suite_name)
    suite, get = default.suite, default.features
    train = get(suite.id_train)
    if train_subset:
        train = train.take(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:train_subset].sort().values)
    held = suite.held_out()
    data = Data(train, get(held), get(suite.id_test), {k: get(v) for k, v in suite.ood.items()},
                default.model.head.eval().float().cpu())
    about = (f"Suite `{suite_name}`, default checkpoint `{default.checkpoint.name}` ({default.model_id}): ID train "
             f"{len(train)} x {train.dim}, "
             f"held-out ID `{held.name}` ({len(held)}, for KL-Matching and temperature scaling), ID test "
             f"{len(data.test)}, OOD: " + ", ".join(f"{k} ({len(v)})" for k, v in data.oods.items()) + ".")
    return data, about


def main() -> None:
    ap = parser(__doc__, suite="fashionmnist")
    ap.add_argument("--methods", help="comma list of method names (default: all)")
    ap.add_argument("--train-subset", type=int, help="fit on a seeded subset of this many ID-train features")
    a = ap.parse_args()
    po = pytorch_ood()
    from oodlab.metrics import auroc

    data, about = load_data(a.suite, a.train_subset)
    todo = cases(po)
    if a.methods:
        wanted = {m.lower() for m in a.methods.split(",")}
        todo = [c for c in todo if c.method.lower() in wanted]
    oods = list(data.oods)
    summary, detail = [], []
    t_all = time.perf_counter()
    for c in todo:
        t0 = time.perf_counter()
        ours, theirs = c.oodlab(data), c.pyood(data)
        a_ours = {o: 100 * auroc(ours["id"].numpy(), ours[o].numpy()) for o in oods}
        a_theirs = {o: 100 * auroc(theirs["id"].numpy(), theirs[o].numpy()) for o in oods}
        delta = max(abs(a_ours[o] - a_theirs[o]) for o in oods)
        if c.same:
            verdict = f"**match** ({c.note})" if delta <= TOLERANCE else f"**MISMATCH** beyond {TOLERANCE} ({c.note})"
        else:
            verdict = f"{c.differs}: {c.note}"
        verdict = verdict.replace("{fit}", ", ".join(f"{k} = {t:.4f} (NLL {v:.6f})" for k, (t, v) in _FIT.items()))
        mean_o, mean_t = np.mean(list(a_ours.values())), np.mean(list(a_theirs.values()))
        summary.append([c.method, c.setting, f"{mean_o:.2f}", f"{mean_t:.2f}", f"{delta:.3f}", escape(verdict)])
        detail.append([c.method, c.setting, *(f"{a_ours[o]:.2f} / {a_theirs[o]:.2f}" for o in oods)])
        print(*summary[-1], f"({time.perf_counter() - t0:.1f} s)", flush=True)
    seconds = time.perf_counter() - t_all
    body = (f"{about} AUROC in %, the mean over the OOD sets; max |Δ| is the largest per-set difference between the "
            f"two libraries in AUROC points; a row whose definitions agree must stay within {TOLERANCE}. Both "
            f"libraries score the same cached float32 features with the same head; oodlab's detectors with their "
            f"paper defaults unless the setting says otherwise. {len(todo)} comparisons in {seconds:.0f} s.\n\n"
            + table(["method", "setting", "oodlab AUROC", "pytorch-ood AUROC", "max \\|Δ\\|", "verdict / note"], summary)
            + "\n\nPer OOD set (oodlab / pytorch-ood AUROC):\n\n" + table(["method", "setting", *oods], detail) + "\n")
    print("\n" + body)
    if not a.no_write and not a.methods:
        write_section("crosscheck", f"oodlab against pytorch-ood {PYOOD_VERSION} on the same features", body)


if __name__ == "__main__":
    main()
