"""IBP (Gowal et al. 2018): hand-computed bounds, spec folding, eps = 0, gradients, LeNet, registry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import certify
from certify import IBP
from certify.graph import build_graph
from certify.ibp import input_box, interval_bounds
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo.architectures import mnist_lenet


def hand_net() -> nn.Sequential:
    """2-2-2 ReLU net: h = W1 x + b1, z = W2 relu(h) + b2 (bounds worked out in the tests)."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([0.5, 0.0]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[2].bias.copy_(torch.tensor([0.25, 0.0]))
    return net.eval()


HAND_X = torch.zeros(2, 2)
HAND_Y = torch.tensor([0, 1])
HAND_THREAT = ThreatModel("Linf", 1.0, box=(-1.0, 1.0))  # the input set is the square [-1, 1]^2


def test_hand_computed_2_2_2_network():
    # h1 = x1 + x2 + 0.5 in [-1.5, 2.5], h2 = x1 - x2 in [-2, 2]; r = relu(h)
    graph = build_graph(hand_net(), (2,))
    bounds = interval_bounds(graph, *input_box(HAND_X, HAND_THREAT))
    lo, hi = bounds[1]
    assert torch.allclose(lo, torch.tensor([[-1.5, -2.0]] * 2)) and torch.allclose(hi, torch.tensor([[2.5, 2.0]] * 2))
    # y = 0: z0 - z1 = 2 r2 + 0.25 >= 0.25 with the spec folded into the last layer
    # (naive logit intervals would give z0_min - z1_max = 0.25 - 2.5 = -2.25);
    # y = 1: z1 - z0 = -2 r2 - 0.25 >= -4.25
    # (in float64 the proven rounding pad is ~1e-15; in float32 it may lower the bounds, never raise them)
    expected = torch.tensor([[0.0, 0.25], [-4.25, 0.0]], dtype=torch.float64)
    m = IBP()(hand_net().double(), HAND_X.double(), HAND_Y, HAND_THREAT).margin_lower
    assert m.dtype == torch.float64 and torch.allclose(m, expected, rtol=0, atol=1e-12)
    m32 = IBP()(hand_net(), HAND_X, HAND_Y, HAND_THREAT)
    assert (m32.margin_lower.double() <= expected).all() and m32.certified.tolist() == [True, False]


def test_eps_zero_gives_the_logit_margins():
    torch.manual_seed(0)
    model = mnist_lenet().eval().double()
    x, y = torch.rand(3, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 4, 9])
    m = IBP()(model, x, y, ThreatModel("Linf", 0.0)).margin_lower
    with torch.no_grad():
        z = model(x)
    exact = z.gather(1, y[:, None]) - z
    assert (m <= exact).all() and torch.allclose(m, exact, rtol=0, atol=1e-6)  # the float64 pad: ~3e-7 here


def test_margins_carry_gradients_to_the_parameters_for_certified_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 2])
    margin = IBP().bound_margins(model, x, y, ThreatModel("Linf", 0.1))
    assert margin.requires_grad
    torch.nn.functional.cross_entropy(-margin, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_certifier_call_leaves_mode_and_returns_statuses():
    torch.manual_seed(0)
    model = mnist_lenet().train()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    model.train()
    result = IBP()(model, x, y, ThreatModel("Linf", 1e-6))
    assert model.training and all(m.training for m in model.modules())
    assert result.certified.all() and result.status == ["certified", "certified"]
    wrong = (y + 1) % 10
    result = IBP()(model, x, wrong, ThreatModel("Linf", 1e-6))
    assert not result.certified.any() and result.status == ["not_certified"] * 2


def test_bounds_use_current_weights_and_inputs_no_stale_cache():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    x, y, threat = torch.rand(2, 3), torch.tensor([0, 1]), ThreatModel("Linf", 0.1)
    first = IBP()(model, x, y, threat).margin_lower
    assert not torch.allclose(IBP()(model, x.flip(0), y, threat).margin_lower, first)
    with torch.no_grad():
        model[2].weight.mul_(2.0)
    second = IBP()(model, x, y, threat).margin_lower
    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    fresh.load_state_dict(model.state_dict())
    assert not torch.allclose(first, second)
    assert torch.equal(second, IBP()(fresh, x, y, threat).margin_lower)


def test_registry_names():
    assert {"ibp", "crown", "alpha-crown"} <= set(certify.CERTIFIERS.names())
    assert isinstance(certify.CERTIFIERS.create("ibp"), IBP)


def test_bad_inputs_raise_user_input_errors():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(UserInputError):
        IBP()(model, torch.full((1, 2), 2.0), torch.tensor([0]), ThreatModel("Linf", 0.1))
    with pytest.raises(UserInputError):
        IBP()(model, torch.zeros(1, 2), torch.tensor([0, 1]), ThreatModel("Linf", 0.1))
