"""CADRef: a worked example by hand, a per-sample brute force for every logit score, and bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodlab.detectors import create
from oodlab.features import Features


def head2():
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        head.bias.zero_()
    return head


def feats(z, head, labels=None):
    with torch.no_grad():
        return Features(z, head(z), labels)


def test_worked_example():
    """Train [2,0],[4,0] -> class 0 (mean [3,0]); [0,2],[0,4] -> class 1 (mean [0,3]); max logits 2,4,2,4 (mean 3).

    z = [2,1]: logits [1,-1], c = 0, S = 1; (z - mu_0) * sign(w_0) = [-1,1] * [1,-1] = [-1,-1]; E+ = 0,
    E- = 2/3, score = -(0 + (2/3)/3) = -2/9.  z = [5,1]: logits [4,-4], S = 4; [2,1] * [1,-1] = [2,-1];
    E+ = 2/6, E- = 1/6, score = -(1/12 + 1/18) = -5/36."""
    head = head2()
    train = feats(torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 2.0], [0.0, 4.0]]), head)
    det = create("cadref", logit_score="maxlogit").fit(train, head)
    s = det.score(feats(torch.tensor([[2.0, 1.0], [5.0, 1.0]]), head))
    assert s.tolist() == pytest.approx([-2 / 9, -5 / 36], abs=1e-12)
    assert det.state["means"].tolist() == [[3.0, 0.0], [0.0, 3.0]]


def _brute(train_z, train_logits, test_z, test_logits, w, method):
    def conf(lg):
        lg = lg.double()
        if method == "energy":
            return torch.logsumexp(lg, 0)
        if method == "maxlogit":
            return lg.max()
        p = F.softmax(lg, 0)
        if method == "msp":
            return p.max()
        m = max(10, len(lg) // 10)
        top = torch.sort(p).values[-m:]
        return 1 / torch.sum(top ** 0.1 * (1 - top) ** 0.1)

    c = w.shape[0]
    groups = {k: [] for k in range(c)}
    for z, lg in zip(train_z, train_logits):
        groups[int(torch.argmax(lg))].append(z.double())
    means = {k: torch.stack(v).mean(0) for k, v in groups.items()}
    mean_conf = sum(float(conf(lg)) for lg in train_logits) / len(train_logits)
    out = []
    for z, lg in zip(test_z, test_logits):
        k = int(torch.argmax(lg))
        z = z.double()
        sg = torch.sign(w[k].double())
        pos = sum(max(float(v), 0.0) for v in (z - means[k]) * sg) / float(z.abs().sum())
        neg = sum(max(-float(v), 0.0) for v in (z - means[k]) * sg) / float(z.abs().sum())
        out.append(-(pos / float(conf(lg)) + neg / mean_conf))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("method", ["energy", "msp", "maxlogit", "gen"])
def test_matches_a_per_sample_brute_force(method):
    g = torch.Generator().manual_seed(1)
    head = nn.Linear(14, 12)
    with torch.no_grad():
        head.weight.copy_(2 * torch.eye(12, 14) + 0.5 * torch.randn(12, 14, generator=g))
        head.bias.copy_(torch.randn(12, generator=g) + 20)  # positive energies, as on real models
    labels = torch.arange(400) % 12
    z = F.relu(torch.randn(400, 14, generator=g) + 3 * F.one_hot(labels, 14).float())
    train = feats(z, head, labels)
    assert len(train.logits.argmax(1).unique()) == 12  # every class predicted: no fallback involved
    test = feats(F.relu(torch.randn(50, 14, generator=g) * 2), head)
    det = create("cadref", logit_score=method).fit(train, head)
    expected = _brute(train.z, train.logits, test.z, test.logits, head.weight.detach(), method)
    assert torch.allclose(det.score(test), expected, rtol=1e-10, atol=1e-12)


def test_a_class_never_predicted_takes_its_labelled_mean():
    head = head2()
    z = torch.tensor([[2.0, 0.0], [4.0, 0.0], [3.0, 1.0]])  # all predicted as class 0
    det = create("cadref").fit(feats(z, head, torch.tensor([0, 0, 1])), head)
    assert det.state["means"][1].tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match="never predicted"):
        create("cadref").fit(feats(z, head), head)


@pytest.mark.parametrize("params, message", [
    ({"logit_score": "Energy"}, "logit_score must be one of"),
    ({"logit_score": 1}, "logit_score must be one of"),
])
def test_bad_parameters_fail_in_one_line(params, message):
    with pytest.raises(ValueError, match=message) as info:
        create("cadref", **params)
    assert "\n" not in str(info.value)
