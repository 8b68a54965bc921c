"""LP (triangle relaxation) certifier: hand-computed bounds, soundness against exact minima, LP >= CROWN
with the same intermediate bounds, the verified dual bound, DPP reuse, statuses, parameter checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _exact import exact_min_margins, grid_min_margins, hand_net, tiny_net
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify import CERTIFIERS, CROWN, LP
from certify.convex import interval, lower_to_dense, make_relaxations
from certify.dual import lp_bound
from certify.lp import LPProblem
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel

X0 = torch.tensor([[0.5, 0.5]])


def lp(**kw) -> LP:
    kw.setdefault("crown_first", False)
    kw.setdefault("early_stop", False)
    return LP(**kw)


@pytest.mark.parametrize("norm,eps,expected", [("Linf", 0.5, (0.5, 0.5)), ("L2", 0.25, (1.25, 1.75 - 0.25 * 2 ** 0.5))])
def test_hand_computed_2_2_2(norm, eps, expected):
    # margin 2 - z1 - z2, pre-activations h1 = x1 + x2 - 1, h2 = x1 - x2 in [-r, r]; the triangles
    # z <= (h + r)/2 add up to z1 + z2 <= x1 - 1/2 + r. Linf eps 0.5: r = 1 (interval = CROWN),
    # max x1 = 1: LP bound 0.5 (true minimum 1). L2 eps 0.25: max x1 = 0.75; interval bounds
    # r = 0.25 give 1.25, CROWN's bounds over the disc r = 0.25 sqrt(2) give 1.75 - r (true 1.5).
    model = hand_net()
    threat = ThreatModel(norm, eps)
    for bounds, value in zip((interval, None), expected):
        res = lp(bounds=bounds)(model, X0, torch.tensor([0]), threat)
        assert res.margin_lower[0, 1].item() == pytest.approx(value, abs=1e-5)
        assert res.margin_lower[0, 1].item() <= value  # a proven bound: below the relaxation's optimum
        assert res.status == ["certified"] and res.certified.tolist() == [True]
    exact = lp(bounds=interval)(hand_net(sign=1.0), X0, torch.tensor([0]), threat)
    bound = exact.margin_lower[0, 1].item()
    assert bound <= 1.0  # sound: the exact minimum is 1
    assert bound >= 1.0 - 1e-5  # tight: every relaxation is exact on this net


def test_zero_multipliers_give_the_interval_bound_and_solver_multipliers_tighten_it():
    model = hand_net()
    threat = ThreatModel("Linf", 0.5)
    net = lower_to_dense(model, (2,))
    rel = make_relaxations(net, X0.double().numpy(), threat, interval(model, X0, threat))[0]
    c = np.array([1.0, -1.0])
    assert lp_bound(net, rel, c, None) == pytest.approx(0.0, abs=1e-5)  # 2 - u1+ - u2+
    problem = LPProblem(net, "Linf")
    problem.set(net, rel, c)
    problem.problem.solve(solver="CLARABEL")
    from certify.lp import duals_of

    duals = duals_of(problem.families)
    assert lp_bound(net, rel, c, duals) == pytest.approx(0.5, abs=1e-5)
    # garbage multipliers (negative, huge, nan) are repaired, never trusted: weak duality keeps every bound
    # below the LP's optimum, 0.5 (the network's own minimum, 1.0, would let a bound between them pass)
    rng = np.random.default_rng(0)
    for scale in (1e-3, 0.1, 3.0, 1e3, 1e9):
        for _ in range(10):
            noisy = {k: [v + rng.normal(0, scale, v.shape) for v in vs] for k, vs in duals.items()}
            noisy["triangle"][0][0] = np.nan
            assert lp_bound(net, rel, c, noisy) <= 0.5
    near = {k: [v * (1 + 1e-9) for v in vs] for k, vs in duals.items()}  # near-optimal: just below, not above
    assert 0.5 - 1e-5 <= lp_bound(net, rel, c, near) <= 0.5


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.02, 0.4), px=st.floats(0, 1), py=st.floats(0, 1))
def test_sound_against_exact_minimum_linf(seed, eps, px, py):
    model = tiny_net((2, 4, 4, 3), seed)
    x = torch.tensor([[px, py]], dtype=torch.float32)
    y = int(model(x).argmax())
    res = lp()(model, x, torch.tensor([y]), ThreatModel("Linf", eps))
    exact = exact_min_margins(model, x[0].double().numpy(), eps, y)
    assert (res.margin_lower[0].double().numpy() <= exact).all()


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.02, 0.5))
def test_sound_against_grid_l2(seed, eps):
    model = tiny_net((2, 5, 3), seed)
    x = torch.tensor([[0.4, 0.7]])
    y = int(model(x).argmax())
    res = lp()(model, x, torch.tensor([y]), ThreatModel("L2", eps))
    truth = grid_min_margins(model, x[0].double().numpy(), eps, y, "L2")
    assert (res.margin_lower[0].double().numpy() <= truth).all()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_lp_at_least_crown_with_the_same_intermediate_bounds(norm):
    model = tiny_net((6, 8, 8, 4), 3)
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    threat = ThreatModel(norm, 0.15 if norm == "Linf" else 0.4)
    crown = CROWN()(model, x, y, threat).margin_lower
    res = lp()(model, x, y, threat)
    assert (res.margin_lower >= crown - 1e-5).all()  # slack only in the "tighter" direction
    assert (res.margin_lower > crown + 1e-3).any()  # and the LP is strictly tighter somewhere


def test_highs_agrees_with_clarabel_and_rejects_l2():
    model = tiny_net((4, 6, 3), 0)
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    threat = ThreatModel("Linf", 0.1)
    a = lp(solver="HIGHS")(model, x, y, threat).margin_lower
    b = lp()(model, x, y, threat).margin_lower
    assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(UserInputError):
        lp(solver="HIGHS")(model, x, y, ThreatModel("L2", 0.1))


def test_problem_is_built_once_and_reused_as_dpp():
    model = tiny_net((4, 6, 3), 0)
    cert = lp()
    threat = ThreatModel("Linf", 0.1)
    x = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    cert(model, x[:2], model(x[:2]).argmax(1), threat)
    problem = next(iter(cert._problems.values()))
    assert problem.problem.is_dpp()
    compiled = problem.problem._cache.param_prog
    assert compiled is not None
    cert(model, x[2:], model(x[2:]).argmax(1), threat)
    assert cert.builds == 1 and problem.problem._cache.param_prog is compiled
    with torch.no_grad():  # another network (same shapes) gets its own problem: no stale reuse
        model[0].weight.add_(0.5)
    cert(model, x[2:], model(x[2:]).argmax(1), threat)
    assert cert.builds == 2


def test_skipped_statuses_and_registry():
    model = tiny_net((4, 6, 3), 0)
    x = torch.rand(2, 4)
    res = LP(max_inputs=3)(model, x, torch.tensor([0, 1]), ThreatModel("Linf", 0.1))
    assert all(s.startswith("skipped: too large: 4 inputs") for s in res.status)
    assert not res.certified.any() and torch.isnan(res.margin_lower).all()
    res = LP(max_neurons=5)(model, x, torch.tensor([0, 1]), ThreatModel("Linf", 0.1))
    assert all(s.startswith("skipped: too large: 6 hidden") for s in res.status)
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 3))
    res = LP()(pooled, torch.rand(1, 1, 4, 4), torch.tensor([0]), ThreatModel("Linf", 0.1))
    assert res.status[0].startswith("skipped:") and "maxpool" in res.status[0].lower()
    assert isinstance(CERTIFIERS.create("lp"), LP)


@pytest.mark.parametrize("kw", [{"solver": "glpk-nope"}, {"max_inputs": 0}, {"max_neurons": 2.5},
                                {"time_limit": 0}, {"time_limit": "1"}])
def test_parameter_checks(kw):
    with pytest.raises(UserInputError):
        LP(**kw)
