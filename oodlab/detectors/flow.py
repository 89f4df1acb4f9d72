"""Flow density: log-likelihood of the features under a normalizing flow (Cook, Lavoie & Waslander 2024).

Post-hoc: L2-normalise the penultimate features of the frozen classifier, fit a small normalizing
flow to the ID training features by maximum likelihood for one epoch, and score a sample by its
log-density ``log p(z)`` (higher = more ID).

The default flow is the official one (TRAILab/FeatureDensityEstimation, built there with normflows):
10 Glow-style blocks and a standard-normal base. Read from the feature side towards the base, as
its ``log_prob`` evaluates it, each block applies

1. an affine coupling ``x_b -> (x_b - t(x_a)) * exp(-s(x_a))`` with the fixed mask "even dimensions
   condition, odd dimensions move" in every block, and separate ``s`` and ``t`` nets
   ``D -> D -> D`` with a ReLU, last layer zero-initialised, no clamp on ``s``;
2. an LU-parametrised invertible 1x1 convolution ``x -> W x`` with
   ``W = P L (U + diag(sign * exp(log_s)))`` (``P`` and ``sign`` fixed, log-det ``sum(log_s)``),
   initialised as a random rotation. This is normflows' direction: its ``Invertible1x1Conv``
   applies ``P L U`` on the density side (feature -> latent) and ``W^-1`` only when sampling;
3. an ActNorm ``x -> (x - shift) * exp(-log_scale)``, initialised on the first training batch so its
   output has zero mean and unit variance (Glow's data-dependent init).

Read from the base towards the features (normflows' sampling order) a block is ActNorm -> 1x1
mixing -> coupling, the order in which the official code lists it.

zuko provides the flow machinery (lazy transforms, coupling split/merge, composition, the base
distribution and the log-density); the three block pieces are small wrappers because zuko has no
ActNorm, its affine coupling soft-clamps the log-scale and shares one net for ``s`` and ``t``, and
its LU map has no permutation and solves one system per sample. ``kind="realnvp"`` and
``kind="maf"`` use zuko's stock flows instead.

Learning rate: the default is 1e-4, ten times the paper's 1e-5 (a deviation; ``lr=1e-5`` gives the
paper's setting), chosen on held-out ID likelihood only: the paper's value was set for ImageNet's
5,120 steps per epoch, and one epoch of a small data set leaves the flow far from fitted at it
(the sweep is ``benchmarks/flow.py``, its numbers in docs/results.md).

Memory: the fit streams the training features in shuffled batches, so it does not grow with the
rows; it is the flow's own ``blocks * 3 D^2`` parameters (each LU mixing packs its two triangles
into one D x D matrix), held three times while training (weights and Adam's two moments). Gradients
never exist all at once (each parameter takes its Adam step as backward completes it), the LU
mixing's backward rebuilds its triangles instead of keeping them, and on the CPU a large flow (over
:data:`LEAN_PARAMETERS`) recomputes each layer's activations in backward; all of these give the same
weights as the plain loop (measured peaks: docs/results.md, "Scale"). Scoring runs in float64 with
the float32 weights cast as they are used. The fit runs on the device its caller gives
(:meth:`Detector.fit`'s ``device``).

Deviations from the official code, all deliberate:

- Scores are computed in float64 (training in float32, as the official code), so far-away OOD
  features get a very low but finite log-density instead of overflowing.
- A NaN or infinite log-density raises an error; the official evaluation replaces it by 0. Its
  AUROC also fits a logistic regression to the scores first, which can flip their direction; ours
  uses ``log p(z)`` as it is (higher = ID).
- The coupling nets read only the conditioning half ``x_a`` (the official nets read the masked
  full vector, whose zeroed entries never contribute); their first layer is initialised with the
  official fan-in ``D`` so the function and its initial distribution are the same.
- A zero feature vector stays at the origin under L2 normalisation (the official training code
  divides by its zero norm and gets NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import zuko
from torch import Tensor, nn
from torch.distributions import AffineTransform, Transform, constraints
from torch.utils.checkpoint import checkpoint
from typing_extensions import Self
from zuko.distributions import DiagNormal
from zuko.lazy import Flow, LazyTransform, UnconditionalDistribution
from zuko.transforms import CouplingTransform

from ..features import Features, FeatureSource
from ..runtime import progress, release_free_heap
from .base import Detector, register
from ..validate import choice, integer, number

__all__ = ["FlowDensity", "build_flow", "glow_steps", "glow_log_prob", "initialize_actnorm", "FLOW_KINDS", "NORMALIZATIONS"]

FLOW_KINDS = ("glow", "realnvp", "maf")
NORMALIZATIONS = ("l2", "standard", "none")
_EPS = 1e-6  # ActNorm's and the standardisation's guard against zero variance (dead units)
#: A flow with more parameters than this is fitted lean on the CPU, where its memory is the host's: activations
#: recomputed in backward and the heap trimmed as it goes (the same weights, ~30% more time a step). The default
#: flow (10 blocks) is over it from D = 1,160 on.
LEAN_PARAMETERS = 40_000_000


class _ActNorm(LazyTransform):
    """Per-dimension affine map ``(x - shift) * exp(-log_scale)`` with data-dependent init."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Make the output of this layer zero-mean, unit-variance on the batch ``x``."""
        self.shift.copy_(x.mean(0))
        self.log_scale.copy_(torch.log(x.std(0) + _EPS))

    def forward(self, c: Tensor | None = None) -> Transform:
        scale = torch.exp(-self.log_scale)
        return AffineTransform(-self.shift * scale, scale, event_dim=1)


def _lu_factors(lu: Tensor, log_s: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """``L`` (unit lower) and ``U`` (upper, diagonal ``sign * exp(log_s)``) from the packed matrix ``lu``."""
    eye = torch.eye(lu.shape[0], dtype=lu.dtype, device=lu.device)
    return torch.tril(lu, -1) + eye, torch.triu(lu, 1) + torch.diag(sign * log_s.exp())


class _PLUProduct(torch.autograd.Function):
    """Rows ``x -> P L U x`` (``L``, ``U`` as :func:`_lu_factors` builds them), differentiable in ``x``, ``lu`` and
    ``log_s``, with the factors' unit and exponential diagonals applied as vectors.

    Autograd would keep both assembled D x D factors of every block for the backward pass (335 MB at
    D = 2048 over 10 blocks) and make six D x D temporaries a block; this keeps ``x`` and ``U x``,
    and makes two D x D temporaries forward (the two triangles) and four backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, lu: Tensor, log_s: Tensor, sign: Tensor, order: Tensor, inv_order: Tensor) -> Tensor:
        x_t, diag = x.mT, (sign * log_s.exp())[:, None]
        ux = torch.addmm(diag * x_t, torch.triu(lu, 1), x_t)  # U x
        ctx.save_for_backward(x, ux, lu, log_s, sign, order)
        return torch.addmm(ux, torch.tril(lu, -1), ux).mT[..., inv_order]  # P L (U x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, ux, lu, log_s, sign, order = ctx.saved_tensors
        grad_lux = grad[..., order].mT  # through P
        grad_ux = torch.addmm(grad_lux, torch.tril(lu, -1).mT, grad_lux)  # L^T g
        grad_lu = (grad_lux @ ux.mT).tril_(-1)
        grad_upper = grad_ux @ x
        diag = sign * log_s.exp()
        grad_log_s = grad_upper.diagonal() * diag
        grad_lu += grad_upper.triu_(1)
        grad_x = torch.addmm(diag[:, None] * grad_ux, torch.triu(lu, 1).mT, grad_ux)  # U^T g'
        return grad_x.mT, grad_lu, grad_log_s, None, None, None


class _PLU(Transform):
    """``x -> W x = P L U x`` (unit lower ``L``, upper ``U``, permutation ``P``); the inverse is two solves.

    The density side (what training and scoring evaluate) is matrix products; the triangular solves
    are only needed to sample. zuko's :class:`~zuko.transforms.LULinearTransform` has no permutation
    and solves one small system per sample.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, mixing: _LUMixing) -> None:
        super().__init__()
        self.mixing = mixing

    def _call(self, x: Tensor) -> Tensor:
        m, rows = self.mixing, x.reshape(-1, x.shape[-1])
        return _PLUProduct.apply(rows, m.lu, m.log_s, m.sign, m.order, m.inv_order).reshape(x.shape)

    def _inverse(self, y: Tensor) -> Tensor:
        lower, upper = _lu_factors(self.mixing.lu, self.mixing.log_s, self.mixing.sign)
        x = torch.linalg.solve_triangular(lower, y[..., self.mixing.order].mT, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, x, upper=True).mT

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.mixing.log_s.sum().expand(x.shape[:-1])


class _LUMixing(LazyTransform):
    """Glow's invertible 1x1 convolution ``x -> W x``, ``W = P L (U + diag(sign * exp(log_s)))``, feature -> latent.

    ``P`` and ``sign`` are fixed; ``W`` starts as a random rotation, as in normflows (official code),
    whose ``Invertible1x1Conv`` applies this ``W`` on the density side. The strictly lower part of
    ``L`` and the strictly upper part of ``U`` are one packed D x D parameter ``lu`` (as LAPACK packs
    an LU factorisation; its diagonal is unused and stays zero), so Adam keeps one matrix of moments
    per block, not two half-empty ones.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        rotation = torch.linalg.qr(torch.randn(features, features)).Q
        perm, lower, upper = torch.lu_unpack(*torch.linalg.lu_factor(rotation))
        diag = upper.diagonal()
        order = perm.argmax(0)
        self.register_buffer("order", order)  # x[..., order] == P^T x
        self.register_buffer("inv_order", torch.argsort(order))  # x[..., inv_order] == P x
        self.register_buffer("sign", diag.sign())
        self.lu = nn.Parameter(torch.tril(lower, -1) + torch.triu(upper, 1))
        self.log_s = nn.Parameter(diag.abs().log())

    def forward(self, c: Tensor | None = None) -> Transform:
        return _PLU(self)

    def dense(self, dtype: torch.dtype) -> Tensor:
        """``W^T`` in ``dtype``, built there from the parameters, so that ``x @ dense == (W x^T)^T`` for rows ``x``."""
        eye = torch.eye(len(self.order), dtype=dtype, device=self.lu.device)
        return _PLUProduct.apply(eye, self.lu.to(dtype), self.log_s.to(dtype), self.sign.to(dtype), self.order,
                                 self.inv_order)


def _coupling_net(inputs: int, outputs: int, features: int) -> nn.Module:
    net = zuko.nn.MLP(inputs, outputs, hidden_features=(features,))
    bound = 1.0 / math.sqrt(features)  # nn.Linear's init for the official D-wide masked input
    with torch.no_grad():
        net[0].weight.uniform_(-bound, bound)
        net[0].bias.uniform_(-bound, bound)
        net[-1].weight.zero_()
        net[-1].bias.zero_()
    return net


class _AffineCoupling(LazyTransform):
    """``x_b -> (x_b - t(x_a)) * exp(-s(x_a))``; even dimensions are ``x_a``, odd ones ``x_b``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        mask = torch.arange(features) % 2 == 0
        self.register_buffer("mask", mask)
        a = (features + 1) // 2  # the even dimensions (no .item(): the flow can be built on the meta device)
        self.s = _coupling_net(a, features - a, features)
        self.t = _coupling_net(a, features - a, features)

    def _affine(self, x_a: Tensor) -> Transform:
        scale = torch.exp(-self.s(x_a))
        return AffineTransform(-self.t(x_a) * scale, scale, event_dim=1)

    def forward(self, c: Tensor | None = None) -> Transform:
        return CouplingTransform(self._affine, self.mask)


def build_flow(kind: str, features: int, blocks: int) -> Flow:
    """An untrained flow over ``features`` dimensions (``kind`` in :data:`FLOW_KINDS`).

    Initialisation draws from torch's global generator; seed it (or fork it) for reproducibility.
    """
    if kind not in FLOW_KINDS:
        raise ValueError(f"unknown flow kind {kind!r}; choose one of {', '.join(FLOW_KINDS)}")
    if features < 2:
        raise ValueError(f"a coupling flow needs at least 2 feature dimensions, got {features}")
    if kind == "realnvp":
        return zuko.flows.RealNVP(features, transforms=blocks, hidden_features=(features,))
    if kind == "maf":
        return zuko.flows.MAF(features, transforms=blocks, hidden_features=(features,))
    layers: list[LazyTransform] = []
    for _ in range(blocks):
        layers += [_AffineCoupling(features), _LUMixing(features), _ActNorm(features)]
    base = UnconditionalDistribution(DiagNormal, torch.zeros(features), torch.ones(features), buffer=True)
    return Flow(layers, base)


Step = Callable[[Tensor], tuple[Tensor, Tensor]]


@torch.no_grad()
def glow_steps(flow: Flow, dtype: torch.dtype | None = None) -> list[Step]:
    """The default flow's blocks, feature side to base, as plain tensor maps ``x -> (y, log|det J|)``.

    The same function as ``flow().log_prob`` builds from zuko transforms, but each LU mixing is
    one dense matrix (``P L U`` assembled once), so the whole density is matrix products and
    element-wise maps: fast, and exportable to ONNX. The steps run in the dtype of their input; the
    dense matrices are assembled in ``dtype`` (default: the flow's), and the coupling nets' weights
    are cast as they are used, so a float64 scorer of a float32 flow holds no float64 copy of them
    (at D = 2048: 0.67 GB saved) and computes exactly what a float64 copy would.
    """
    dtype = dtype or next(flow.parameters()).dtype
    steps: list[Step] = []
    for layer in flow.transform.transforms:
        if isinstance(layer, _AffineCoupling):
            idx_a, idx_b = layer.mask.nonzero().squeeze(-1), (~layer.mask).nonzero().squeeze(-1)
            merge = torch.argsort(torch.cat([idx_a, idx_b]))

            def coupling(x: Tensor, layer=layer, idx_a=idx_a, idx_b=idx_b, merge=merge) -> tuple[Tensor, Tensor]:
                x_a, x_b = x[:, idx_a], x[:, idx_b]
                s = _cast_as_used(layer.s, x_a)
                return torch.cat([x_a, (x_b - _cast_as_used(layer.t, x_a)) * torch.exp(-s)], 1)[:, merge], -s.sum(1)

            steps.append(coupling)
        elif isinstance(layer, _LUMixing):
            dense, ladj = layer.dense(dtype), layer.log_s.to(dtype).sum()
            steps.append(lambda x, dense=dense, ladj=ladj: (x @ dense, ladj.expand(x.shape[0])))
        elif isinstance(layer, _ActNorm):
            shift, log_scale = layer.shift.to(dtype), layer.log_scale.to(dtype)
            steps.append(lambda x, shift=shift, log_scale=log_scale: ((x - shift) * torch.exp(-log_scale),
                                                                     (-log_scale.sum()).expand(x.shape[0])))
        else:
            raise TypeError(f"not a block of the default flow: {type(layer).__name__}")
    return steps


def _cast_as_used(net: nn.Sequential, x: Tensor) -> Tensor:
    """``net(x)`` in ``x``'s dtype, each linear layer's weights cast to it as the layer is applied."""
    for module in net:
        linear = isinstance(module, (nn.Linear, zuko.nn.Linear))
        x = F.linear(x, module.weight.to(x.dtype), module.bias.to(x.dtype)) if linear else module(x)
    return x


def _adam_in_backward(flow: nn.Module, lr: float, trim: bool = False) -> list[torch.utils.hooks.RemovableHandle]:
    """Give every parameter of ``flow`` its own Adam, stepped the moment backward completes its gradient.

    Adam's update is element-wise, so this is the same optimisation as one Adam stepped after the
    backward pass, but no more than a few gradients exist at once: at D = 2048 that saves the 0.5 GB
    a full set of gradients takes (PyTorch's "optimizer step in backward" pattern). ``trim`` hands
    the freed heap back to the system after each update (see :func:`~oodlab.runtime.release_free_heap`).
    """
    def step_with(optimizer: torch.optim.Optimizer) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            optimizer.step()
            param.grad = None
            if trim:
                release_free_heap()
        return hook

    # foreach=False: the single-tensor update, which needs one parameter's temporaries
    return [p.register_post_accumulate_grad_hook(step_with(torch.optim.Adam([p], lr=lr, foreach=False)))
            for p in flow.parameters()]


def _log_prob_recomputed(flow: Flow, x: Tensor) -> Tensor:
    """``flow().log_prob(x)``, with each layer's activations recomputed during backward instead of kept.

    Activation checkpointing (``torch.utils.checkpoint``): the forward pass keeps only each layer's
    input, and backward runs one layer's forward again before its gradients; the freed heap is handed
    back after each layer. The gradients are the same; at D = 2048 and batch 250 a step holds ~0.2 GB
    less, for ~30% more time.
    """
    ladj = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for layer in flow.transform.transforms:
        x, layer_ladj = checkpoint(_call_and_ladj, layer, x, use_reentrant=False)
        ladj = ladj + layer_ladj
    return flow.base().log_prob(x) + ladj


def _call_and_ladj(layer: LazyTransform, x: Tensor) -> tuple[Tensor, Tensor]:
    y, ladj = layer().call_and_ladj(x)
    release_free_heap()  # the layer's temporaries leave no holes behind
    return y, ladj


def _packed_lu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A flow state with each LU mixing's ``lower`` and ``upper`` (as oodlab saved them before packing) packed
    into one ``lu``; the same density. A state already packed is returned as it is."""
    packed = {}
    for key, value in state.items():
        if key.endswith(".lower"):
            prefix = key[:-len("lower")]
            packed[prefix + "lu"] = torch.tril(value, -1) + torch.triu(state[prefix + "upper"], 1)
        elif not key.endswith(".upper"):
            packed[key] = value
    return packed


def glow_log_prob(steps: list[Step], x: Tensor) -> Tensor:
    """``log p(x)`` under a standard-normal base after ``steps`` (see :func:`glow_steps`)."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for step in steps:
        x, ladj = step(x)
        total = total + ladj
    return total - 0.5 * (x.square().sum(1) + x.shape[1] * math.log(2 * math.pi))


@torch.no_grad()
def initialize_actnorm(flow: Flow, x: Tensor) -> None:
    """Data-dependent init of every ActNorm in ``flow``, passing the batch ``x`` through it in order."""
    for layer in flow.transform.transforms:
        if isinstance(layer, _ActNorm):
            layer.initialize(x)
        x = layer()(x)


@register
class FlowDensity(Detector):
    """Score = log-density of the (normalised) features under a normalizing flow fitted to ID train.

    Parameters: ``epochs`` over the ID training features (paper: 1), ``batch_size`` (250), Adam
    learning rate ``lr`` (1e-4; paper 1e-5, see the module docstring), number of flow
    ``blocks`` (10), flow ``kind`` (``"glow"`` = official architecture, or zuko's ``"realnvp"`` /
    ``"maf"``), feature ``normalize`` (``"l2"`` to the unit sphere as in the paper, ``"standard"``
    per-dimension with ID-train mean/std, or ``"none"``) and the ``seed`` for initialisation and
    shuffling. Fitting is deterministic on CPU for a given seed.
    """

    name = "flow"
    score_chunk = 1024  # rows: a chunk's float64 activations (~10 D-wide rows each) take 0.17 GB at D = 2048

    def __init__(self, epochs: int = 1, batch_size: int = 250, lr: float = 1e-4, blocks: int = 10,
                 kind: str = "glow", normalize: str = "l2", seed: int = 0) -> None:
        super().__init__()
        self.epochs = integer("epochs", epochs, 1)
        self.batch_size = integer("batch_size", batch_size, 2)
        self.lr = float(number("lr", lr, 0.0, low_open=True))
        self.blocks = integer("blocks", blocks, 1)
        self.kind = choice("kind", kind, FLOW_KINDS)
        self.normalize = choice("normalize", normalize, NORMALIZATIONS)
        self.seed = integer("seed", seed, 0)
        self._flow: Flow | None = None
        self._steps: list[Step] | None = None

    @property
    def train_nll(self) -> list[float]:
        """Mean negative log-likelihood of the training batches, one value per epoch."""
        self._check_fitted()
        return self.state["train_nll"].tolist()

    def load_state_dict(self, state: dict[str, Tensor]) -> Self:
        if self.kind == "glow" and any(k.endswith(".order") and k[:-len("order")] + "inv_order" not in state for k in state):
            raise ValueError("this flow was saved by an older oodlab whose LU mixing applied W^-1 on the density side "
                             "(now W = P L U, as the official code); its parameters mean another density: fit it again")
        super().load_state_dict(_packed_lu(state) if self.kind == "glow" else state)
        self._flow, self._steps = None, None
        return self

    # -- fitting ------------------------------------------------------------------------------
    def _fit(self, train: FeatureSource) -> None:
        if len(train) < 2:
            raise ValueError(f"flow needs at least 2 training samples, got {len(train)}")
        if self.normalize == "standard":
            self._fit_standardization(train)
        device = self.fit_device
        shuffle = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            flow = build_flow(self.kind, train.dim, self.blocks).to(device)
        lean = device.type == "cpu" and sum(p.numel() for p in flow.parameters()) > LEAN_PARAMETERS
        hooks = _adam_in_backward(flow, self.lr, trim=lean)
        n = len(train)
        steps = (n + self.batch_size - 1) // self.batch_size
        history = []
        bar = progress(total=self.epochs * steps, desc=f"flow fit ({self.epochs} epoch(s))", unit="step")
        try:
            for epoch in range(self.epochs):
                total = 0.0
                for step, z in enumerate(train.shuffled_batches(self.batch_size, shuffle)):
                    x = self._normalized(z).to(device, torch.float32)
                    if epoch == 0 and step == 0:
                        initialize_actnorm(flow, x)
                    loss = -(_log_prob_recomputed(flow, x) if lean else flow().log_prob(x)).mean()
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"flow training diverged (loss {loss.item()}) at epoch {epoch + 1}, "
                                           f"step {step + 1}; lower lr (now {self.lr}) or train fewer epochs")
                    loss.backward()  # each parameter takes its Adam step as soon as its gradient is complete
                    release_free_heap()
                    total += loss.item() * len(x)
                    bar.update()
                    if step % 20 == 0:
                        bar.set_postfix(nll=f"{loss.item():.2f}")
                history.append(total / n)
        finally:
            bar.close()
            for hook in hooks:
                hook.remove()  # with them go the optimizers and their moments
            del hooks
        # the state takes the trained tensors themselves (no copy on the CPU): the flow is dropped here
        self.state.update({f"flow.{k}": v for k, v in flow.cpu().state_dict().items()})
        self.state["train_nll"] = torch.tensor(history, dtype=torch.float64)
        del flow
        release_free_heap()
        self._flow, self._steps = None, None  # rebuilt from the state when first scored

    def _fit_standardization(self, train: FeatureSource) -> None:
        total = torch.zeros(train.dim, dtype=torch.float64)
        squares = torch.zeros_like(total)
        for chunk in train.chunks():
            z = chunk.z.double()
            total += z.sum(0)
            squares += z.square().sum(0)
        mean = total / len(train)
        var = (squares / len(train) - mean.square()).clamp_min(0.0)
        self.state["norm.mean"] = mean
        self.state["norm.std"] = var.sqrt() + _EPS

    def _normalized(self, z: Tensor) -> Tensor:
        if self.normalize == "l2":
            return F.normalize(z.double(), dim=1)  # a zero vector stays at the origin
        if self.normalize == "standard":
            return (z.double() - self.state["norm.mean"]) / self.state["norm.std"]
        return z.double()

    # -- scoring ------------------------------------------------------------------------------
    def _module(self) -> Flow:
        """The fitted flow, rebuilt from the config around the tensors of ``state`` (float32, not copied)."""
        if self._flow is None:
            # the default flow is built on the meta device (no wasted random init); zuko's flows call .item()
            # while they are built, so they are built on the CPU and their random init is replaced
            device = "meta" if self.kind == "glow" else "cpu"
            with torch.random.fork_rng(devices=[]), torch.device(device):
                flow = build_flow(self.kind, self.weight.shape[1], self.blocks)
            flow.load_state_dict({k[len("flow."):]: v for k, v in self.state.items() if k.startswith("flow.")},
                                 assign=True)
            flow = flow.eval().requires_grad_(False)
            self._flow = flow if self.kind == "glow" else flow.double()  # glow_steps casts as it goes
        return self._flow

    @torch.no_grad()
    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        """``log p(z)`` in float64; the default flow runs as dense tensor maps (:func:`glow_steps`), zuko's kinds
        through zuko."""
        x = self._normalized(z)
        if self.kind != "glow":
            return self._module()().log_prob(x)
        if self._steps is None:
            self._steps = glow_steps(self._module(), torch.float64)
        return glow_log_prob(self._steps, x)

    @property
    def export_refusal(self) -> str | None:
        if self.kind != "glow":
            return f"flow kind {self.kind!r} runs through zuko's transforms; export supports kind='glow' (the default)"
        return super().export_refusal

    def _score(self, feats: Features) -> Tensor:
        scores = super()._score(feats)
        bad = ~torch.isfinite(scores)
        if bad.any():
            raise RuntimeError(f"the flow gave a NaN/inf log-density to {int(bad.sum())} of {len(scores)} samples; "
                               "refit with a lower lr or fewer epochs")
        return scores
