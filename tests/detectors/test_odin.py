import numpy as np
import pytest
import torch
from torch import nn

from oodlab.detectors import create
from oodlab.features import Features
from oodlab.models.adapter import Classifier

MEAN, STD = 0.5, 0.25


def linear_classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Flatten(1), nn.Identity(), nn.Linear(64, 3), mean=(MEAN,), std=(STD,)).eval()


def official_style(model: Classifier, x: torch.Tensor, temperature: float, eps: float) -> np.ndarray:
    """ODIN as the official code does it, in the normalised input space, worked out by hand for a linear net."""
    w, b = model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()
    xn = ((x.double().numpy() - MEAN) / STD).reshape(len(x), -1)
    logits = xn @ w.T + b
    p = np.exp(logits / temperature - (logits / temperature).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(w.shape[0])[logits.argmax(1)]
    grad = (p - onehot) @ w / temperature  # d CE(logits / T, argmax) / d x_norm
    xn_pert = xn - eps * np.where(grad >= 0, 1.0, -1.0) / STD  # the official divide-by-std
    out = (xn_pert @ w.T + b) / temperature
    q = np.exp(out - out.max(1, keepdims=True))
    return (q / q.sum(1, keepdims=True)).max(1)


@pytest.mark.parametrize("temperature, eps", [(10.0, 0.01), (1000.0, 0.0014)])
def test_pixel_space_step_equals_the_official_normalised_step(temperature, eps):
    model = linear_classifier()
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = model.features(x)
    det = create("odin", temperature=temperature, eps=eps).fit(Features(z, model.head(z)), model.head)
    got = det.score_inputs(model, x).numpy()
    assert np.allclose(got, official_style(model, x, temperature, eps), rtol=1e-5, atol=1e-9)
    # and the perturbation matters: without it the score differs
    assert not np.allclose(got, official_style(model, x, temperature, 0.0), rtol=1e-5, atol=1e-9)


def test_batched_scores_equal_one_sample_at_a_time(tiny):
    det = create("odin").fit(tiny.train, tiny.model.head)
    x = tiny.test_set.dataset.images[:8].float() / 255
    batched = det.score_inputs(tiny.model, x)
    alone = torch.cat([det.score_inputs(tiny.model, x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(batched, alone, rtol=1e-6, atol=0)


def test_no_perturbation_at_unit_temperature_is_msp(tiny):
    det = create("odin", temperature=1.0, eps=0.0).fit(tiny.train, tiny.model.head)
    x = tiny.test_set.dataset.images.float() / 255
    with torch.no_grad():
        msp = torch.softmax(tiny.model(x).double(), 1).max(1).values
    assert torch.allclose(det.score_inputs(tiny.model, x), msp, rtol=1e-12)


def test_model_gradients_are_left_untouched(tiny):
    det = create("odin").fit(tiny.train, tiny.model.head)
    det.score_inputs(tiny.model, tiny.test_set.dataset.images[:4].float() / 255)
    assert all(p.grad is None for p in tiny.model.parameters())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        create("odin", temperature=0)
    with pytest.raises(ValueError, match="eps"):
        create("odin", eps=-1)
