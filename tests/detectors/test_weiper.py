"""WeiPer (MSP_W) and WeiPer+KLD against references written here from the paper's and the official code's
definitions (loops over copies, bins and samples), worked examples, and refused parameters."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodlab.detectors import create
from oodlab.detectors import weiper as wp
from oodlab.features import Features


def linear(w, b):
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data, lin.bias.data = w.clone(), b.clone()
    return lin


def feats(z, w, b):
    return Features(z, z @ w.T + b)


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    c, d = 4, 12
    w, b = torch.randn(c, d, generator=g), 0.1 * torch.randn(c, generator=g)
    labels = torch.arange(400) % c
    train = F.relu(torch.randn(400, d, generator=g) + 2 * F.one_hot(labels, d).float())
    query = torch.cat([F.relu(torch.randn(30, d, generator=g) + 2 * F.one_hot(torch.arange(30) % c, d).float()),
                       F.relu(3 * torch.randn(20, d, generator=g))])
    return w, b, train, query


def reference_perturbation(w, r, delta, seed):
    """Copy i, row c: w_c + delta * ||w_c|| * n / ||n||, n the i-th standard normal (C, D) draw of the seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(r):
        n = torch.randn(w.shape, generator=g).double().numpy()
        wn = w.double().numpy()
        out.append(wn + delta * np.linalg.norm(wn, axis=1, keepdims=True) * n / np.linalg.norm(n, axis=1, keepdims=True))
    return out


def reference_msp_w(copies, b, q):
    scores = np.zeros(len(q))
    for p in copies:
        logits = q @ p.T + b
        e = np.exp(logits - logits.max(1, keepdims=True))
        scores += (e / e.sum(1, keepdims=True)).max(1)
    return scores / len(copies)


def test_perturbation_moves_every_projection_by_delta_times_its_norm(setup):
    w, b, _, _ = setup
    p = wp.perturbed_head(w, 5, 1.8, seed=3).double().view(5, *w.shape)
    moved = (p - w.double()).norm(dim=2)
    assert torch.allclose(moved, 1.8 * w.double().norm(dim=1).expand(5, -1), rtol=1e-5)
    assert not torch.allclose(p[0], p[1])
    assert np.allclose(p.numpy(), np.stack(reference_perturbation(w, 5, 1.8, 3)), atol=1e-5)
    assert torch.equal(wp.perturbed_head(w, 5, 1.8, 3), wp.perturbed_head(w, 5, 1.8, 3))
    assert not torch.equal(wp.perturbed_head(w, 5, 1.8, 3), wp.perturbed_head(w, 5, 1.8, 4))


def test_weiper_is_the_mean_msp_of_the_perturbed_heads(setup):
    w, b, _, q = setup
    det = create("weiper", n_repeats=7, perturbation_distance=2.1, seed=5).fit(None, linear(w, b))
    ref = reference_msp_w(reference_perturbation(w, 7, 2.1, 5), b.double().numpy(), q.double().numpy())
    assert np.allclose(det.score(feats(q, w, b)).numpy(), ref, atol=1e-5)


def test_weiper_without_perturbation_is_msp(setup):
    w, b, _, q = setup
    det = create("weiper", n_repeats=3, perturbation_distance=0.0).fit(None, linear(w, b))
    msp = torch.softmax((q @ w.T + b).double(), 1).max(1).values
    assert torch.allclose(det.score(feats(q, w, b)), msp, atol=1e-6)


def test_fit_is_deterministic_and_seeded(setup):
    w, b, train, _ = setup
    a = create("weiper-kld", n_repeats=4).fit(feats(train, w, b), linear(w, b))
    again = create("weiper-kld", n_repeats=4).fit(feats(train, w, b), linear(w, b))
    other = create("weiper-kld", n_repeats=4, seed=1).fit(feats(train, w, b), linear(w, b))
    assert all(torch.equal(a.state[k], again.state[k]) for k in a.state)
    assert not torch.equal(a.state["perturbed"], other.state["perturbed"])


def test_smoothing_is_the_official_replicate_padded_same_convolution():
    h = torch.tensor([[1.0, 0, 0, 0, 0]], dtype=torch.float64)
    assert wp.smooth(h, 1).tolist() == h.tolist()
    assert torch.allclose(wp.smooth(h, 3), torch.tensor([[2 / 3, 1 / 3, 0, 0, 0]], dtype=torch.float64))
    assert torch.allclose(wp.smooth(h, 4), torch.tensor([[0.5, 0.25, 0, 0, 0]], dtype=torch.float64))
    x = torch.rand(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for size in range(1, 9):  # the operator the official UniformKernel uses, applied to each row
        conv = nn.Conv1d(1, 1, size, padding="same", padding_mode="replicate", bias=False).double()
        conv.weight.data.fill_(1 / size)
        with torch.no_grad():
            assert torch.allclose(wp.smooth(x, size), conv(x[:, None])[:, 0]), size


def test_symmetric_kl_is_both_kl_divergences_after_eps():
    from scipy.stats import entropy

    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.2, 0.6], [0.5, 0.5, 0.0]], dtype=torch.float64)
    got = wp.symmetric_kl(p, q, 0.01)
    pe = (p + 0.01).numpy()
    for i, row in enumerate(q.numpy()):
        qe = row + 0.01
        assert got[i].item() == pytest.approx(entropy(pe, qe) + entropy(qe, pe), rel=1e-12)
    assert got[1].item() == pytest.approx(0.0, abs=1e-15)


def test_worked_example_bins_and_training_density():
    # one unperturbed copy, so the perturbed logits are the logits; 3 bins over [0, 3]: edges 0, 1, 2, 3 (3 + 1e-8
    # is 3 in float32, so the training maximum, as in the official code, falls in no bin)
    w, b = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]), torch.zeros(2)
    z = torch.tensor([[0.0, 1, 2, 3], [0.5, 0.5, 2.5, 1.5]])
    det = create("weiper-kld", n_repeats=1, perturbation_distance=0.0, n_bins=3, smoothing=1,
                 smoothing_perturbed=1).fit(feats(z, w, b), linear(w, b))
    assert det.state["latent_range"].tolist() == [0.0, 3.0]
    assert wp.bin_edges(torch.tensor(0.0), torch.tensor(3.0), 3).tolist() == [0.0, 1.0, 2.0, 3.0]
    # values per bin [0,1): 0, .5, .5   [1,2): 1, 1.5   [2,3): 2, 2.5   (3 dropped) -> over 8 values
    assert det.state["latent_density"].tolist() == [3 / 8, 2 / 8, 2 / 8]
    # logits: (0, 3) and (0.5, 1.5): range [0, 3]; bins [0,1): 0, .5  [1,2): 1.5  [2,3): none  (3 dropped)
    assert det.state["weiper_range"].tolist() == [0.0, 3.0]
    assert det.state["weiper_density"].tolist() == [2 / 4, 1 / 4, 0.0]
    q = torch.tensor([[0.2, 1.2, 1.4, 9.0]])  # 9 lies beyond the range: in no bin
    hz = torch.tensor([1 / 4, 2 / 4, 0.0], dtype=torch.float64)
    hw = torch.tensor([1 / 2, 0.0, 0.0], dtype=torch.float64)  # logits (0.2, 9.0)
    msp = torch.softmax(torch.tensor([[0.2, 9.0]], dtype=torch.float64), 1).max().item()
    want = (0.1 * msp - wp.symmetric_kl(det.state["latent_density"], hz[None], 0.01)
            - 2.5 * wp.symmetric_kl(det.state["weiper_density"], hw[None], 0.025))
    assert det.score(feats(q, w, b)).item() == pytest.approx(want.item(), rel=1e-12)


def reference_histogram(values, lo, hi, n_bins):
    """Fractions of ``values`` in [e_k, e_k+1), the edges in float32 as the official linspace makes them."""
    steps = np.arange(n_bins + 1, dtype=np.float32) / np.float32(n_bins)
    edges = np.float32(lo) + steps * ((np.float32(hi) + np.float32(1e-8)) - np.float32(lo))
    out = np.zeros(n_bins)
    for v in values.astype(np.float32):
        for k in range(n_bins):
            if edges[k] <= v < edges[k + 1]:
                out[k] += 1
    return out / len(values)


def reference_smooth(h, s):
    left = (s - 1) // 2
    return np.array([np.mean([h[min(max(i - left + j, 0), len(h) - 1)] for j in range(s)]) for i in range(len(h))])


def reference_kl(p, q, eps):
    p, q = (p + eps) / (p + eps).sum(), (q + eps) / (q + eps).sum()
    return float(np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p)))


def test_weiper_kld_matches_a_brute_force_reference(setup):
    w, b, train, q = setup
    r, delta, n_bins, s1, s2, l1, l2 = 3, 1.5, 12, 3, 4, 2.5, 0.4
    det = create("weiper-kld", n_repeats=r, perturbation_distance=delta, n_bins=n_bins, smoothing=s1,
                 smoothing_perturbed=s2, lambda_1=l1, lambda_2=l2, seed=2).fit(feats(train, w, b), linear(w, b))
    big = det.state["perturbed"]  # the stored perturbed head (checked in the tests above), as the input here
    zt, zq = train.numpy(), q.numpy()
    lt = F.linear(train, big, b.repeat(r)).numpy()  # float32 logits: the values the bins are taken of
    lq = F.linear(q, big, b.repeat(r)).numpy()
    zlo, zhi, wlo, whi = zt.min(), zt.max(), lt.min(), lt.max()
    assert det.state["latent_range"].tolist() == [zlo, zhi] and det.state["weiper_range"].tolist() == [wlo, whi]
    p_z = np.mean([reference_histogram(row, zlo, zhi, n_bins) for row in zt], axis=0)
    p_w = np.mean([reference_histogram(row, wlo, whi, n_bins) for row in lt], axis=0)
    assert np.allclose(det.state["latent_density"].numpy(), p_z, atol=1e-15)
    assert np.allclose(det.state["weiper_density"].numpy(), p_w, atol=1e-15)
    ref = []
    for zi, li in zip(zq, lq):
        kz = reference_kl(p_z, reference_smooth(reference_histogram(zi, zlo, zhi, n_bins), s1), 0.01)
        kw = reference_kl(p_w, reference_smooth(reference_histogram(li, wlo, whi, n_bins), s2), 0.025)
        blocks = li.astype(np.float64).reshape(r, 4)
        msp = np.mean([np.exp(x - np.logaddexp.reduce(x)).max() for x in blocks])
        ref.append(l2 * msp - kz - l1 * kw)
    assert np.allclose(det.score(feats(q, w, b)).numpy(), ref, rtol=1e-9, atol=1e-9)


def test_chunking_changes_nothing(setup, monkeypatch):
    w, b, train, q = setup
    whole = create("weiper-kld", n_repeats=3).fit(feats(train, w, b), linear(w, b))
    monkeypatch.setattr(wp, "CELLS", 40)  # 3 rows per chunk
    chunked = create("weiper-kld", n_repeats=3).fit(feats(train, w, b), linear(w, b))
    assert all(torch.equal(whole.state[k], chunked.state[k]) for k in whole.state)
    assert torch.equal(whole.score(feats(q, w, b)), chunked.score(feats(q, w, b)))
    assert torch.allclose(create("weiper", n_repeats=3).fit(None, linear(w, b)).score(feats(q, w, b)),
                          whole._msp(whole._perturbed_logits(q)))


def test_weiper_kld_separates_in_from_out(setup):
    w, b, train, q = setup
    det = create("weiper-kld", n_repeats=10, n_bins=30).fit(feats(train, w, b), linear(w, b))
    s = det.score(feats(q, w, b))
    assert s[:30].mean() > s[30:].mean()


def test_weiper_kld_refuses_export():
    assert "histograms" in create("weiper-kld").export_refusal
    assert create("weiper").export_refusal is None


@pytest.mark.parametrize("name, params, match", [
    ("weiper", {"n_repeats": 0}, "n_repeats must be an integer >= 1"),
    ("weiper", {"perturbation_distance": -1}, "perturbation_distance must be a finite number >= 0"),
    ("weiper", {"seed": 1.5}, "seed must be an integer"),
    ("weiper-kld", {"n_bins": 0}, "n_bins must be an integer >= 1"),
    ("weiper-kld", {"smoothing": 101}, r"smoothing must be an integer in \[1, 100\]"),
    ("weiper-kld", {"smoothing_perturbed": 0}, "smoothing_perturbed must be an integer"),
    ("weiper-kld", {"lambda_1": float("nan")}, "lambda_1 must be a finite number"),
    ("weiper-kld", {"lambda_2": "high"}, "lambda_2 must be a finite number"),
    ("weiper-kld", {"eps": 0}, "eps must be a finite number > 0"),
    ("weiper-kld", {"eps_perturbed": -0.1}, "eps_perturbed must be a finite number > 0"),
])
def test_bad_parameters_are_refused_in_one_line(name, params, match):
    with pytest.raises(ValueError, match=match) as info:
        create(name, **params)
    assert "\n" not in str(info.value)
