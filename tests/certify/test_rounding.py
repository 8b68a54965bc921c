"""Certified verdicts under floating-point rounding (certify/rounding.py): a network whose float32 margin
bound is positive while the exact one is not, the error bounds against float64, the folding errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from test_soundness import KINDS, random_net
from torch import nn

from certify import CERTIFIERS, CROWN, IBP
from certify.crown import Propagator
from certify.dual import _ball_min
from certify.graph import affine_segments, build_graph, fold_affine
from certify.ibp import margins_and_bounds
from certify.rounding import error_bounds, float64_model, fold_errors, margin_pad, unit_roundoff
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo.architectures import Normalize

#: x1 = 1, x2 = 0.8 * 2^-23 (float32), Linf eps = 0.1 * 2^-23: in float32, h = x1 + x2 rounds to 1 + 2^-23 at
#: every point of the ball, so r = 2^23 h - 2^23 is 1 and the margin r - 0.75 is 0.25; in exact arithmetic
#: r = 2^23 (x1 + x2 - 1) ranges over [0.6, 0.9] and the margin's minimum is -0.15.
FLIP_X = torch.tensor([[1.0, 0.8 * 2.0 ** -23]])
FLIP_THREAT = ThreatModel("Linf", 0.1 * 2.0 ** -23)


def flip_net() -> nn.Sequential:
    """Powers of two and sums of two terms only: every float32 result is the same in any summation order."""
    net = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        net[0].bias.zero_()
        net[2].weight.fill_(2.0 ** 23)
        net[2].bias.fill_(-2.0 ** 23)
        net[4].weight.copy_(torch.tensor([[1.0], [0.0]]))
        net[4].bias.copy_(torch.tensor([-0.75, 0.0]))
    return net.eval()


def test_no_certifier_certifies_a_margin_that_float32_rounding_makes_positive():
    net, y = flip_net(), torch.tensor([0])
    # the flip is real: float32 IBP says 0.25 > 0 ...
    assert IBP().bound_margins(net, FLIP_X, y, FLIP_THREAT)[0, 1].item() == 0.25
    with torch.no_grad():  # ... and the float32 forward pass agrees everywhere in the ball ...
        corner = FLIP_X - FLIP_THREAT.eps * torch.tensor([[1.0, 1.0]])
        assert net(corner)[0, 0] > net(corner)[0, 1]
        exact = float64_model(net)(FLIP_X.double() - FLIP_THREAT.eps)  # ... but exactly, the margin there is
    worst = (exact[0, 0] - exact[0, 1]).item()
    assert worst == pytest.approx(-0.15, abs=1e-6)  # -0.15 (x2 is 0.8 * 2^-23 rounded to float32)
    for name in CERTIFIERS.names():
        result = CERTIFIERS.create(name)(net, FLIP_X, y, FLIP_THREAT)
        assert not result.certified.any(), name
        assert result.margin_lower[0, 1].item() <= worst or result.status[0].startswith("skipped"), name


def test_a_float64_network_is_certified_in_one_pass_with_a_tiny_pad():
    net, y = float64_model(flip_net()), torch.tensor([0])
    x = FLIP_X.double() + torch.tensor([[0.0, 0.2 * 2.0 ** -23]], dtype=torch.float64)  # exact min +0.05
    for cert in (IBP(), CROWN()):
        result = cert(net, x, y, FLIP_THREAT)
        assert result.certified.all() and result.margin_lower.dtype == torch.float64
        assert 0.05 - 1e-6 < result.margin_lower[0, 1] <= 0.05  # the weights 2^23 make the pad ~1e-8


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 10_000), norm=st.sampled_from(["Linf", "L2"]),
       eps=st.floats(0.0, 0.2))
@example(kind="lenet-odd", seed=0, norm="L2", eps=0.125)  # where CROWN's max-pool choice flips: IBP must agree
def test_float32_error_bound_covers_the_distance_to_the_float64_bounds(kind, seed, norm, eps):
    """IBP's float32 bounds (margins and every node's box) are within their proven error of the same bounds
    in float64 (themselves within a ~1e-10 error of the exact ones): interval arithmetic is continuous in
    its inputs, so the two computations differ by rounding only. CROWN: the next test."""
    model, shape = random_net(kind, seed)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed))
    y, threat = torch.tensor([0, 2]), ThreatModel(norm, eps)
    graph, graph64, x64 = build_graph(model, shape), build_graph(float64_model(model), shape), x.double()
    with torch.no_grad():
        margin32, boxes32 = margins_and_bounds(graph, x, y, threat)
        margin64, boxes64 = margins_and_bounds(graph64, x64, y, threat)
    e32 = error_bounds(graph, boxes32, x, threat, unit_roundoff(torch.float32))
    e64 = error_bounds(graph64, boxes64, x64, threat, unit_roundoff(torch.float64))
    slack = margin_pad(e32[graph.output], y) + margin_pad(e64[graph.output], y)
    assert ((margin32.double() - margin64).abs() <= slack).all()
    for i in e32:
        if i != graph.output and boxes32[i] is not None:
            for a, b in zip(boxes32[i], boxes64[i]):
                assert ((a.double() - b).abs() <= e32[i].double() + e64[i].double()).all(), (kind, i)


def _same_relaxation_choices(p32: Propagator, p64: Propagator) -> bool:
    """True when both propagators chose the same relaxation everywhere: the same unstable ReLUs and lower
    slopes (0 or 1), the same max-pool entries below and candidates above (0/1 weights)."""
    for i, r in p32.relax.items():
        r64 = p64.relax[i]
        pairs = ([(r.unstable, r64.unstable), (r.lower_slope, r64.lower_slope)] if r.kind == "relu"
                 else [(r.lower_slope, r64.lower_slope), (r.upper_slope, r64.upper_slope)])
        if not all(torch.equal(a.double() if a.is_floating_point() else a, b) for a, b in pairs):
            return False
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 10_000), norm=st.sampled_from(["Linf", "L2"]),
       eps=st.floats(0.0, 0.2))
def test_float32_error_bound_covers_crowns_distance_to_float64_with_the_same_relaxations(kind, seed, norm, eps):
    """CROWN's float32 bounds (margins and every node's box, backward linear bounds through every layer)
    are within their proven error of float64 CROWN wherever both chose the same relaxations. Where a choice
    flips (a max-pool candidate or a ReLU slope at a near-tie: lenet-odd, seed 0, L2, eps 0.125; about one
    case in seven) both bounds are valid but of different relaxations, and only the soundness tests against
    the exact network apply (test_soundness.py)."""
    model, shape = random_net(kind, seed)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed))
    y, threat = torch.tensor([0, 2]), ThreatModel(norm, eps)
    graph, graph64, x64 = build_graph(model, shape), build_graph(float64_model(model), shape), x.double()
    with torch.no_grad():
        p32, p64 = Propagator(graph, x, threat), Propagator(graph64, x64, threat)
        p32.compute_bounds()
        p64.compute_bounds()
        assume(_same_relaxation_choices(p32, p64))
        margin32, margin64 = p32.margins(y), p64.margins(y)
    e32 = error_bounds(graph, p32.boxes, x, threat, unit_roundoff(torch.float32))
    e64 = error_bounds(graph64, p64.boxes, x64, threat, unit_roundoff(torch.float64))
    slack = margin_pad(e32[graph.output], y) + margin_pad(e64[graph.output], y)
    assert ((margin32.double() - margin64).abs() <= slack).all()
    for i in e32:
        if i != graph.output and p32.boxes[i] is not None:
            for a, b in zip(p32.boxes[i], p64.boxes[i]):
                assert ((a.double() - b).abs() <= e32[i].double() + e64[i].double()).all(), (kind, i)


def test_error_bound_covers_a_sum_that_rounds_down_at_every_step():
    """A layer's own sums: h = (1, d, ..., d) with d = 0.75 * 2^-24 (exact in float32, from a first layer
    that only copies), summed left to right by the next layer, rounds 1 + d down to 1 at each of its 255
    steps: 191 u below the exact sum, far more than the 2 u carried from the input through |W|; only each
    layer's fresh rounding term (gamma(n) |W| M) covers it. torch's own order is bounded too."""
    n, d = 256, 0.75 * 2.0 ** -24
    net = nn.Sequential(nn.Linear(2, n), nn.Linear(n, 2))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[0, 0] = 1.0
        net[0].weight[1:, 1] = 1.0
        net[0].bias.zero_()
        net[1].weight.zero_()
        net[1].weight[0] = 1.0
        net[1].bias.zero_()
    x, y, threat = torch.tensor([[1.0, d]]), torch.tensor([1]), ThreatModel("Linf", 0.0)
    graph = build_graph(net.eval(), (2,))
    with torch.no_grad():
        _, boxes = margins_and_bounds(graph, x, y, threat)
        h = net[0](x)[0]
        left_to_right = torch.zeros((), dtype=torch.float32)
        for term in h:
            left_to_right = left_to_right + term
        ours = net(x)[0, 0]
    exact = 1.0 + (n - 1) * d  # exact in float64
    assert left_to_right.item() == 1.0 and (exact - 1.0) / 2.0 ** -24 == pytest.approx(191.25)
    bound = error_bounds(graph, boxes, x, threat, unit_roundoff(torch.float32))[graph.output][0, 0].item()
    assert abs(left_to_right.item() - exact) <= bound and abs(ours.item() - exact) <= bound


def test_folding_errors_bound_the_float32_fold():
    """Normalize (1 / 0.3081 is not a float) and BatchNorm folded into the next layer in float32 differ
    from the float64 fold by no more than the two proven folding errors."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 3)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    model = nn.Sequential(Normalize((0.1307, 0.5), (0.3081, 0.7)), nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 5),
                          bn, nn.ReLU(), nn.Linear(5, 3)).eval()
    folds = []
    for net, u in ((model, unit_roundoff(torch.float32)), (float64_model(model), unit_roundoff(torch.float64))):
        out = []
        for ops, in_shape in affine_segments(build_graph(net, (2, 4, 4))):
            a, b = fold_affine(ops, in_shape)
            out.append((a[-1].reshape(a[-1].shape[1], -1).double(), b[-1].reshape(-1).double(),
                        *fold_errors(ops, a, b, u)))
        folds.append(out)
    rounded = False
    for (w32, b32, dw32, db32), (w64, b64, dw64, db64) in zip(*folds):
        assert ((w32 - w64).abs() <= dw32 + dw64).all() and ((b32 - b64).abs() <= db32 + db64).all()
        assert dw64.max() < 1e-14 * (1 + w64.abs().max())
        rounded |= bool((w32 != w64).any() and (b32 != b64).any())
    assert rounded  # the float32 folds really are rounded


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 6), eps=st.sampled_from([1e-9, 1e-5, 0.01, 0.3, 3.0]),
       scale=st.sampled_from([1e-12, 1e-6, 1.0, 1e6]))
def test_l2_ball_term_stays_below_every_point_of_ball_and_box(seed, d, eps, scale):
    """The verified minimum of coef^T x over ball ∩ box, whatever multiplier mu the search takes (up to
    1e12), is below coef^T x at points of the set: the ball's centre and points towards -coef."""
    rng = np.random.default_rng(seed)
    x0 = np.clip(rng.uniform(-0.2, 1.2, d), 0, 1)  # some coordinates on the box's faces
    coef = rng.normal(0, scale, d)
    rel = type("Rel", (), {"input_lower": np.maximum(x0 - eps, 0), "input_upper": np.minimum(x0 + eps, 1),
                           "center": x0, "radius": eps})()
    bound = _ball_min(coef, rel)
    direction = -coef / max(np.linalg.norm(coef), 1e-300)
    for t in (0.0, 0.5, 1 - 1e-9):
        pt = np.clip(x0 + t * eps * direction, rel.input_lower, rel.input_upper)
        assert bound <= float(coef @ pt)


def test_without_a_float32_error_model_positive_rows_are_proven_in_float64_and_the_rest_are_minus_inf(monkeypatch):
    """float32 on CUDA (TF32, FFT/Winograd convolutions) has no error model: the float32 pass only picks the
    examples to recompute in float64. Simulated here by the same answer on the CPU."""
    import certify.rounding as rounding

    exact = rounding.unit_roundoff
    monkeypatch.setattr(rounding, "unit_roundoff",
                        lambda dtype, device="cpu": None if dtype == torch.float32 else exact(dtype, device))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(6, 4)
    y = model(x).argmax(1).detach()
    y[:2] = (y[:2] + 1) % 3  # two examples that cannot be certified
    threat = ThreatModel("Linf", 0.01)
    for cert in (IBP(), CROWN()):
        raw = cert.bound_margins(model, x, y, threat).detach()
        result = cert(model, x, y, threat)
        positive = rounding.positive(raw, y)
        assert positive.any() and (~positive).any()
        assert torch.equal(result.certified, positive)  # every float32-positive row proven in float64
        assert torch.isinf(result.margin_lower[~positive].scatter(1, y[~positive, None], -math.inf)).all()
        assert torch.isfinite(result.margin_lower[positive]).all()
