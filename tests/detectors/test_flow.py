"""Flow density detector: exact change of variables, Gaussian known answers, save/load, errors."""

import copy
import math

import pytest
import torch
from torch import nn

from oodlab.detectors import create, flow as flow_module, load_detector
from oodlab.detectors.flow import (_LUMixing, _PLUProduct, _adam_in_backward, _lu_factors, build_flow, glow_steps,
                                  initialize_actnorm)
from oodlab.features import Features
from oodlab.metrics import auroc


def feats(z: torch.Tensor) -> Features:
    return Features(z, torch.zeros(len(z), 2))


def head(d: int) -> nn.Linear:
    return nn.Linear(d, 2)


@pytest.fixture(scope="module")
def gaussian():
    """A correlated 4-d Gaussian with a non-zero mean: train/test samples and the true density."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    mvn = torch.distributions.MultivariateNormal(2 * torch.randn(4, generator=g, dtype=torch.float64),
                                                 a @ a.T + 0.5 * torch.eye(4, dtype=torch.float64))
    torch.manual_seed(2)
    return mvn, mvn.sample((4000,)).float(), mvn.sample((1000,)).float()


@pytest.fixture(scope="module")
def gaussian_flow(gaussian):
    _, train, _ = gaussian
    return create("flow", normalize="none", epochs=5, lr=3e-3, blocks=2).fit(feats(train), head(4))


def perturbed(flow: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def test_lu_mixing_maps_features_to_latent_by_plu():
    """normflows' Invertible1x1Conv (official code) applies W = P L U on the density side, log-det sum(log|diag U|)."""
    torch.manual_seed(0)
    layer = perturbed(_LUMixing(5).double())
    p = torch.zeros(5, 5, dtype=torch.float64)
    p[layer.order, torch.arange(5)] = 1.0  # x[..., order] == P^T x
    lower = torch.tril(layer.lu, -1) + torch.eye(5, dtype=torch.float64)
    upper = torch.triu(layer.lu, 1) + torch.diag(layer.sign * layer.log_s.exp())
    w = p @ lower @ upper
    assert not torch.allclose(w @ w.T, torch.eye(5, dtype=torch.float64), atol=1e-2)  # not a rotation: W != W^-T
    x = torch.randn(7, 5, dtype=torch.float64)
    y, ladj = layer().call_and_ladj(x)  # zuko's forward = feature -> latent
    torch.testing.assert_close(y, (w @ x.T).T)
    torch.testing.assert_close(ladj, upper.diagonal().abs().log().sum().expand(7))
    torch.testing.assert_close(ladj, torch.linalg.slogdet(w).logabsdet.expand(7))
    torch.testing.assert_close(layer().inv(y), x)


def test_dense_steps_apply_plu_like_the_flow():
    torch.manual_seed(0)
    flow = perturbed(build_flow("glow", 5, 1).double())
    layer = flow.transform.transforms[1]
    x = torch.randn(6, 5, dtype=torch.float64)
    y, ladj = glow_steps(flow)[1](x)
    torch.testing.assert_close(y, layer()(x))
    torch.testing.assert_close(ladj, layer.log_s.sum().expand(6))


def test_flow_saved_with_the_inverse_mixing_is_refused(gaussian, tmp_path):
    _, train, _ = gaussian
    det = create("flow", blocks=1).fit(feats(train[:300]), head(4))
    old = {k: v for k, v in det.state_dict().items() if not k.endswith("inv_order")}
    with pytest.raises(ValueError, match="older oodlab"):
        create("flow", blocks=1).load_state_dict(old)


def test_lu_mixing_starts_as_a_rotation():
    torch.manual_seed(0)
    layer = _LUMixing(6).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    y, ladj = layer().call_and_ladj(x)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    torch.testing.assert_close(ladj, torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)  # float32 init


@pytest.mark.parametrize("kind", ["glow", "realnvp", "maf"])
def test_log_density_is_the_change_of_variables_formula(kind):
    """log p(x) = log N(f(x); 0, I) + log|det df/dx|, with the Jacobian taken by autograd."""
    torch.manual_seed(0)
    flow = build_flow(kind, 5, 2).double()
    initialize_actnorm(flow, torch.randn(50, 5, dtype=torch.float64))
    flow = perturbed(flow)
    x = torch.randn(4, 5, dtype=torch.float64)
    dist = flow()
    for xi, lp in zip(x, dist.log_prob(x)):
        z = dist.transform(xi[None])[0]
        jac = torch.autograd.functional.jacobian(lambda v: dist.transform(v[None])[0], xi)
        expected = -0.5 * (z @ z) - 2.5 * math.log(2 * math.pi) + torch.linalg.slogdet(jac).logabsdet
        torch.testing.assert_close(lp, expected)


def test_actnorm_init_whitens_the_first_batch():
    torch.manual_seed(0)
    flow = build_flow("glow", 6, 3)
    x = 5 + 3 * torch.randn(250, 6)
    initialize_actnorm(flow, x)
    z = flow().transform(x)  # couplings start as the identity, so the last ActNorm sees a rotation of x
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(6), atol=1e-4, rtol=0)


def test_fitted_density_matches_the_gaussian(gaussian, gaussian_flow):
    mvn, _, test = gaussian
    s, true = gaussian_flow.score(feats(test)), mvn.log_prob(test.double())
    assert (s - true).abs().mean() < 0.15  # nats per sample; an untrained flow (lr 1e-9) is off by 0.67
    assert abs(float((s - true).mean())) < 0.05
    assert torch.corrcoef(torch.stack([s, true]))[0, 1] > 0.99
    assert gaussian_flow.train_nll[-1] < gaussian_flow.train_nll[0]


def test_shifted_gaussian_scores_lower(gaussian, gaussian_flow):
    mvn, _, test = gaussian
    shifted = test + 3 * mvn.covariance_matrix.diagonal().sqrt().float()
    s_id, s_ood = gaussian_flow.score(feats(test)), gaussian_flow.score(feats(shifted))
    assert s_ood.mean() < s_id.mean() - 5
    assert auroc(s_id.numpy(), s_ood.numpy()) > 0.99


@pytest.mark.parametrize("config", [{}, {"kind": "realnvp", "normalize": "standard"}, {"kind": "maf", "normalize": "none"}])
def test_save_load_gives_identical_scores(gaussian, config, tmp_path):
    _, train, test = gaussian
    det = create("flow", blocks=2, batch_size=500, **config).fit(feats(train[:1000]), head(4))
    again = load_detector(det.save(tmp_path / "flow"))
    assert again.config() == det.config()
    assert torch.equal(again.score(feats(test)), det.score(feats(test)))
    assert again.train_nll == det.train_nll


def test_fit_is_seeded_and_leaves_the_global_rng_alone(gaussian):
    _, train, test = gaussian
    lin = head(4)
    fit = lambda seed: create("flow", blocks=2, seed=seed).fit(feats(train[:1000]), lin).score(feats(test))  # noqa: E731
    rng = torch.get_rng_state()
    first = fit(0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(fit(0), first)
    assert not torch.equal(fit(1), first)


def test_l2_normalisation_ignores_the_feature_norm(gaussian):
    _, train, test = gaussian
    l2 = create("flow", blocks=2).fit(feats(train[:1000]), head(4))
    torch.testing.assert_close(l2.score(feats(3 * test)), l2.score(feats(test)), atol=1e-5, rtol=0)
    raw = create("flow", blocks=2, normalize="none").fit(feats(train[:1000]), head(4))
    assert not torch.allclose(raw.score(feats(3 * test)), raw.score(feats(test)))


def test_standardisation_uses_train_statistics(gaussian):
    _, train, _ = gaussian
    det = create("flow", blocks=1, normalize="standard").fit(feats(train), head(4))
    torch.testing.assert_close(det.state["norm.mean"], train.double().mean(0))
    torch.testing.assert_close(det.state["norm.std"], train.double().std(0, unbiased=False) + 1e-6)


def test_nan_feature_gives_a_clear_error(gaussian, gaussian_flow):
    _, train, test = gaussian
    bad = test.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        gaussian_flow.score(feats(bad))
    with pytest.raises(ValueError, match="NaN or inf"):
        create("flow").fit(feats(torch.cat([train[:300], bad])), head(4))


def test_non_finite_log_density_is_refused(gaussian, gaussian_flow):
    _, _, test = gaussian
    state = gaussian_flow.state_dict()
    key = next(k for k in state if k.endswith("log_scale"))
    state[key] = torch.full_like(state[key], -1e4)  # exp(1e4) overflows even in float64
    det = create("flow", **gaussian_flow.config()).load_state_dict(state)
    with pytest.raises(RuntimeError, match="NaN/inf log-density"):
        det.score(feats(test))


def test_divergence_is_reported(gaussian):
    _, train, _ = gaussian
    with pytest.raises(RuntimeError, match="diverged"):
        create("flow", normalize="none", lr=1e4, epochs=3).fit(feats(100 * train), head(4))


def test_paper_defaults_and_validation():
    assert create("flow").config() == {"epochs": 1, "batch_size": 250, "lr": 1e-4, "blocks": 10, "kind": "glow",
                                       "normalize": "l2", "seed": 0}
    for bad in ({"epochs": 0}, {"batch_size": 1}, {"lr": 0.0}, {"blocks": 0}, {"kind": "glwo"}, {"normalize": "L2"}):
        with pytest.raises(ValueError):
            create("flow", **bad)
    with pytest.raises(ValueError, match="at least 2 feature dimensions"):
        create("flow").fit(Features(torch.randn(10, 1), torch.zeros(10, 2)), nn.Linear(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lu_product_gradients_are_autograds(dtype):
    """The hand-written backward of P L U x (which saves U x instead of both factors) gives autograd's gradients
    of the product with the assembled factors."""
    torch.manual_seed(0)
    layer = perturbed(_LUMixing(6).to(dtype))
    x = torch.randn(9, 6, dtype=dtype, requires_grad=True)
    g = torch.randn(9, 6, dtype=dtype)
    ours = torch.autograd.grad((layer()(x) * g).sum(), (x, layer.lu, layer.log_s))
    lower, upper = _lu_factors(layer.lu, layer.log_s, layer.sign)
    plain = (lower @ (upper @ x.mT)).mT[..., layer.inv_order]
    theirs = torch.autograd.grad((plain * g).sum(), (x, layer.lu, layer.log_s))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert float(ours[1].diagonal().abs().max()) == 0.0  # the packed diagonal is unused
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x, lu, ls: _PLUProduct.apply(x, lu, ls, layer.sign, layer.order,
                                                                             layer.inv_order),
                                        (x.detach().requires_grad_(), layer.lu.detach().clone().requires_grad_(),
                                         layer.log_s.detach().clone().requires_grad_()))


def test_adam_in_backward_is_adam_after_backward():
    """Stepping each parameter from its gradient hook gives exactly the weights of one Adam stepped after backward."""
    torch.manual_seed(0)
    fused = build_flow("glow", 6, 2)
    plain = copy.deepcopy(fused)
    initialize_actnorm(fused, torch.randn(64, 6))
    plain.load_state_dict(fused.state_dict())
    start = [p.detach().clone() for p in fused.parameters()]
    hooks = _adam_in_backward(fused, 1e-2)
    adam = torch.optim.Adam(plain.parameters(), lr=1e-2, foreach=False)
    for step in range(5):
        x = torch.randn(32, 6, generator=torch.Generator().manual_seed(step))
        (-fused().log_prob(x).mean()).backward()
        adam.zero_grad()
        (-plain().log_prob(x).mean()).backward()
        adam.step()
        assert all(p.grad is None for p in fused.parameters())
    for hook in hooks:
        hook.remove()
    assert not any(torch.equal(a, b) for a, b in zip(fused.parameters(), start))  # every parameter was trained
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_flow_saved_with_separate_lu_factors_loads_as_the_same_density(gaussian, gaussian_flow):
    """oodlab saved L and U as two D x D parameters before packing them into one: such a state still loads."""
    _, _, test = gaussian
    old = {}
    for key, value in gaussian_flow.state_dict().items():
        if key.endswith(".lu"):
            g = torch.Generator().manual_seed(len(old))
            junk = torch.randn(value.shape, generator=g)  # the unused triangles held other values
            old[key[:-2] + "lower"] = torch.tril(value, -1) + torch.triu(junk)
            old[key[:-2] + "upper"] = torch.triu(value, 1) + torch.tril(junk)
        else:
            old[key] = value
    again = create("flow", **gaussian_flow.config()).load_state_dict(old)
    assert torch.equal(again.score(feats(test)), gaussian_flow.score(feats(test)))


def test_lean_fit_recomputing_activations_gives_the_same_flow(gaussian, monkeypatch):
    """Large flows are fitted lean (activations recomputed in backward, heap trimmed): the same weights, bit for bit."""
    _, train, _ = gaussian
    lin = head(4)
    plain = create("flow", blocks=2, epochs=2).fit(feats(train[:1000]), lin)
    monkeypatch.setattr(flow_module, "LEAN_PARAMETERS", 0)
    lean = create("flow", blocks=2, epochs=2).fit(feats(train[:1000]), lin)
    assert plain.state.keys() == lean.state.keys()
    for key in plain.state:
        torch.testing.assert_close(lean.state[key], plain.state[key], rtol=0, atol=0, msg=key)
    assert lean.train_nll[-1] < lean.train_nll[0]
