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

Learning rate: the default is 1e-4, ten times the paper's 1e-5 (pass ``lr=1e-5`` for the paper's
setting). The paper's value was set for ImageNet, 5,120 steps of batch 250 per epoch; one epoch of
Fashion-MNIST is 240 steps, and at 1e-5 the flow ends far from fitted: its held-out ID likelihood
is much lower than at 1e-4, while 3e-4 is about as good as 1e-4 and 1e-3 is worse (the sweep is in
benchmarks/flow.py; it was chosen on held-out ID data only). On degenerate features (units that
never fire, or L2-normalised ones living on a sphere) a flow can raise the likelihood without
bound by squeezing the empty directions; a large rate then diverges or hurts OOD detection, which
is one of the over-training pitfalls the paper warns about.

Memory: the fit streams the training features in shuffled batches, so it does not grow with the
rows; it is the flow's own: about ``blocks * 4 D^2`` parameters (0.66M at D = 128, 168M at D = 2048),
held four times while training (weights, gradients and Adam's two moments: 2.7 GB in float32 at
D = 2048) plus one step's activations. Scoring runs a float64 copy built from the saved state.

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
from typing_extensions import Self
from zuko.distributions import DiagNormal
from zuko.lazy import Flow, LazyTransform, UnconditionalDistribution
from zuko.transforms import CouplingTransform

from ..features import Features, FeatureSource
from ..runtime import default_device, progress, release_free_heap
from .base import Detector, register
from ..validate import choice, integer, number

__all__ = ["FlowDensity", "build_flow", "glow_steps", "glow_log_prob", "initialize_actnorm", "FLOW_KINDS", "NORMALIZATIONS"]

FLOW_KINDS = ("glow", "realnvp", "maf")
NORMALIZATIONS = ("l2", "standard", "none")
_EPS = 1e-6  # ActNorm's and the standardisation's guard against zero variance (dead units)


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


class _PLU(Transform):
    """``x -> W x = P L U x`` (unit lower ``L``, upper ``U``, permutation ``P``); the inverse is two solves.

    The density side (what training and scoring evaluate) is three matrix products; the triangular
    solves are only needed to sample. zuko's :class:`~zuko.transforms.LULinearTransform` has no
    permutation and solves one small system per sample.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, order: Tensor, inv_order: Tensor, lower: Tensor, upper: Tensor, ladj: Tensor) -> None:
        super().__init__()
        self.order, self.inv_order, self.lower, self.upper, self.ladj = order, inv_order, lower, upper, ladj

    def _call(self, x: Tensor) -> Tensor:
        y = (self.lower @ (self.upper @ x.mT)).mT
        return y[..., self.inv_order]  # P y

    def _inverse(self, y: Tensor) -> Tensor:
        x = torch.linalg.solve_triangular(self.lower, y[..., self.order].mT, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(self.upper, x, upper=True).mT

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.ladj.expand(x.shape[:-1])


class _LUMixing(LazyTransform):
    """Glow's invertible 1x1 convolution ``x -> W x``, ``W = P L (U + diag(sign * exp(log_s)))``, feature -> latent.

    ``P`` and ``sign`` are fixed; ``W`` starts as a random rotation, as in normflows (official code),
    whose ``Invertible1x1Conv`` applies this ``W`` on the density side.
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
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(upper)
        self.log_s = nn.Parameter(diag.abs().log())

    def forward(self, c: Tensor | None = None) -> Transform:
        eye = torch.eye(len(self.order), dtype=self.lower.dtype, device=self.lower.device)
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * self.log_s.exp())
        return _PLU(self.order, self.inv_order, torch.tril(self.lower, -1) + eye, upper, self.log_s.sum())


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
        a = int(mask.sum())
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


def glow_steps(flow: Flow) -> list[Step]:
    """The default flow's blocks, feature side to base, as plain tensor maps ``x -> (y, log|det J|)``.

    The same function as ``flow().log_prob`` builds from zuko transforms, but each LU mixing is
    one dense matrix (``P L U`` assembled once), so the whole
    density is matrix products and element-wise maps: fast, and exportable to ONNX.
    """
    steps: list[Step] = []
    for layer in flow.transform.transforms:
        if isinstance(layer, _AffineCoupling):
            idx_a, idx_b = layer.mask.nonzero().squeeze(-1), (~layer.mask).nonzero().squeeze(-1)
            merge = torch.argsort(torch.cat([idx_a, idx_b]))

            def coupling(x: Tensor, layer=layer, idx_a=idx_a, idx_b=idx_b, merge=merge) -> tuple[Tensor, Tensor]:
                x_a, x_b = x[:, idx_a], x[:, idx_b]
                s = layer.s(x_a)
                return torch.cat([x_a, (x_b - layer.t(x_a)) * torch.exp(-s)], 1)[:, merge], -s.sum(1)

            steps.append(coupling)
        elif isinstance(layer, _LUMixing):
            transform = layer()
            dense = transform(torch.eye(len(layer.order), dtype=layer.lower.dtype)).detach()
            ladj = transform.ladj.detach()
            steps.append(lambda x, dense=dense, ladj=ladj: (x @ dense, ladj.expand(x.shape[0])))
        elif isinstance(layer, _ActNorm):
            steps.append(lambda x, layer=layer: ((x - layer.shift) * torch.exp(-layer.log_scale),
                                                 (-layer.log_scale.sum()).expand(x.shape[0])))
        else:
            raise TypeError(f"not a block of the default flow: {type(layer).__name__}")
    return steps


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
    score_chunk = 8192

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
        super().load_state_dict(state)
        self._flow, self._steps = None, None
        return self

    # -- fitting ------------------------------------------------------------------------------
    def _fit(self, train: FeatureSource) -> None:
        if len(train) < 2:
            raise ValueError(f"flow needs at least 2 training samples, got {len(train)}")
        if self.normalize == "standard":
            self._fit_standardization(train)
        device = default_device()
        shuffle = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            flow = build_flow(self.kind, train.dim, self.blocks).to(device)
        # foreach=False: Adam's update then needs one parameter's temporaries at a time, not all of them at once
        optimizer = torch.optim.Adam(flow.parameters(), lr=self.lr, foreach=False)
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
                    loss = -flow().log_prob(x).mean()
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"flow training diverged (loss {loss.item()}) at epoch {epoch + 1}, "
                                           f"step {step + 1}; lower lr (now {self.lr}) or train fewer epochs")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    release_free_heap()
                    total += loss.item() * len(x)
                    bar.update()
                    if step % 20 == 0:
                        bar.set_postfix(nll=f"{loss.item():.2f}")
                history.append(total / n)
        finally:
            bar.close()
        optimizer.zero_grad(set_to_none=True)
        del optimizer, loss  # the moments, gradients and last graph go before the state is copied out
        flow = flow.cpu().eval().requires_grad_(False)
        self.state.update({f"flow.{k}": v.detach().clone() for k, v in flow.state_dict().items()})
        self.state["train_nll"] = torch.tensor(history, dtype=torch.float64)
        del flow
        release_free_heap()
        self._flow, self._steps = None, None  # rebuilt in float64 from the state when first scored

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
        """The fitted flow in float64, rebuilt from the config and ``state`` after a load."""
        if self._flow is None:
            with torch.random.fork_rng(devices=[]):
                flow = build_flow(self.kind, self.weight.shape[1], self.blocks)
            flow.load_state_dict({k[len("flow."):]: v for k, v in self.state.items() if k.startswith("flow.")})
            self._flow = flow.eval().double().requires_grad_(False)
        return self._flow

    @torch.no_grad()
    def tensor_score(self, z: Tensor, logits: Tensor) -> Tensor:
        """``log p(z)``; the default flow runs as dense tensor maps (:func:`glow_steps`), zuko's kinds through zuko."""
        x = self._normalized(z)
        if self.kind != "glow":
            return self._module()().log_prob(x)
        if self._steps is None:
            self._steps = glow_steps(self._module())
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
