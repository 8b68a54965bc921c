"""SDP certifier (SDP-cert with triangle cuts): hand-computed bounds, soundness against exact minima
(also when SCS is stopped after a few iterations), SDP >= LP >= CROWN on the same intermediate bounds,
timeout and skipped statuses, DPP reuse, parameter checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _exact import exact_min_margins, grid_min_margins, hand_net, tiny_net
from hypothesis import given, settings
from hypothesis import strategies as st

from certify import CERTIFIERS, CROWN, LP, SDP
from certify.convex import crown_bounds, interval, lower_to_dense, make_relaxations
from certify.dual import sdp_bound
from certify.lp import duals_of
from certify.sdp import SDPProblem, coordinate_scale
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel

X0 = torch.tensor([[0.5, 0.5]])


def sdp(**kw) -> SDP:
    """Accurate settings for the tests (the default tolerance is loose: fine, but less tight)."""
    kw.setdefault("crown_first", False)
    kw.setdefault("early_stop", False)
    kw.setdefault("eps", 1e-5)
    kw.setdefault("max_iters", 20000)
    kw.setdefault("chunk_iters", 20000)
    return SDP(**kw)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.5), ("L2", 0.25)])
def test_hand_computed_2_2_2(norm, eps):
    threat = ThreatModel(norm, eps)
    # margin 1 + z1 + z2: every relaxation is exact, the minimum is 1 (both ReLUs off)
    res = sdp(bounds=interval)(hand_net(sign=1.0), X0, torch.tensor([0]), threat)
    assert 1.0 - 1e-3 <= res.margin_lower[0, 1].item() <= 1.0
    # margin 2 - z1 - z2: true minimum 1, LP 0.5 (Linf) / 1.25 (L2) by hand; the SDP lies between
    lp_value, true = {"Linf": (0.5, 1.0), "L2": (1.25, 1.5)}[norm]
    res = sdp(bounds=interval)(hand_net(), X0, torch.tensor([0]), threat)
    assert lp_value - 1e-3 <= res.margin_lower[0, 1].item() <= true
    assert res.status == ["certified"]


def test_hand_computed_sdp_value_by_its_dual():
    # Linf eps 0.5: an accurate SCS solve of the primal; the verified dual bound may not exceed the
    # primal value (weak duality), must be close to it, and lies between the LP (0.5) and the truth (1)
    model = hand_net()
    threat = ThreatModel("Linf", 0.5)
    net = lower_to_dense(model, (2,))
    rel = make_relaxations(net, X0.double().numpy(), threat, interval(model, X0, threat))[0]
    problem = SDPProblem(net, "Linf")
    problem.set(net, rel, np.array([1.0, -1.0]))
    problem.problem.solve(solver="SCS", eps_abs=1e-7, eps_rel=1e-7, max_iters=100000)
    primal = problem.problem.value + float(net.biases[-1] @ np.array([1.0, -1.0]))
    verified = sdp_bound(net, rel, np.array([1.0, -1.0]), duals_of(problem.families))
    assert verified <= primal + 1e-5
    assert verified == pytest.approx(primal, abs=1e-3)
    assert 0.5 - 1e-4 <= verified <= 1.0


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.02, 0.4), px=st.floats(0, 1), py=st.floats(0, 1))
def test_sound_against_exact_minimum_linf(seed, eps, px, py):
    model = tiny_net((2, 3, 3, 3), seed)
    x = torch.tensor([[px, py]], dtype=torch.float32)
    y = int(model(x).argmax())
    exact = exact_min_margins(model, x[0].double().numpy(), eps, y)
    for cert in (sdp(eps=1e-4), sdp(max_iters=5, chunk_iters=5), sdp(max_iters=20, chunk_iters=7)):
        res = cert(model, x, torch.tensor([y]), ThreatModel("Linf", eps))
        assert (res.margin_lower[0].double().numpy() <= exact).all()


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.05, 0.5))
def test_sound_against_grid_l2(seed, eps):
    model = tiny_net((2, 4, 3), seed)
    x = torch.tensor([[0.3, 0.6]])
    y = int(model(x).argmax())
    truth = grid_min_margins(model, x[0].double().numpy(), eps, y, "L2")
    for cert in (sdp(eps=1e-4), sdp(max_iters=10, chunk_iters=10)):
        res = cert(model, x, torch.tensor([y]), ThreatModel("L2", eps))
        assert (res.margin_lower[0].double().numpy() <= truth).all()


@pytest.mark.parametrize("norm,eps", [("Linf", 0.2), ("L2", 0.5)])
def test_sdp_at_least_lp_at_least_crown(norm, eps):
    model = tiny_net((4, 6, 5, 3), 7)
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)
    threat = ThreatModel(norm, eps)
    crown = CROWN()(model, x, y, threat).margin_lower  # the same intermediate bounds as the default
    lp = LP(crown_first=False, early_stop=False)(model, x, y, threat).margin_lower
    assert (lp >= crown - 1e-5).all()  # slack only in the "tighter" direction
    # the SDP's own verified bound (not the certifier's LP floor), SCS solved accurately
    net = lower_to_dense(model, (4,))
    pre = [(lo.detach().double().numpy(), hi.detach().double().numpy()) for lo, hi in crown_bounds(model, x, threat)]
    rels = make_relaxations(net, x.double().numpy(), threat, pre)
    problem = SDPProblem(net, norm, scale=coordinate_scale(rels[0]))
    gaps = []
    for i, rel in enumerate(rels):
        for j in range(3):
            if j == int(y[i]):
                continue
            c = np.eye(3)[int(y[i])] - np.eye(3)[j]
            problem.set(net, rel, c)
            problem.problem.solve(solver="SCS", eps_abs=1e-6, eps_rel=1e-6, max_iters=50000)
            gaps.append(sdp_bound(net, rel, c, duals_of(problem.families)) - lp[i, j].item())
    assert min(gaps) >= -1e-3 and max(gaps) > 1e-3  # SDP >= LP, strictly somewhere


def test_timeout_status_and_solver_status_recorded():
    model = tiny_net((4, 8, 8, 3), 1)
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    res = SDP(time_limit=1e-4, crown_first=False)(model, x, y, ThreatModel("Linf", 0.5))
    assert res.status == ["timeout"] and not res.certified.any()
    assert res.info["problems"] and all("iterations" in p["solver_status"] for p in res.info["problems"])


def test_skipped_statuses():
    model = tiny_net((4, 6, 3), 0)
    x = torch.rand(2, 4)
    res = SDP(max_neurons=5)(model, x, torch.tensor([0, 1]), ThreatModel("Linf", 0.1))
    assert all(s == "skipped: 6 hidden neurons exceed max_neurons=5" for s in res.status)
    assert not res.certified.any() and torch.isnan(res.margin_lower).all()
    res = SDP(max_inputs=2)(model, x, torch.tensor([0, 1]), ThreatModel("Linf", 0.1))
    assert all(s.startswith("skipped: 4 inputs exceed") for s in res.status)


def test_problem_is_built_once_and_reused_as_dpp():
    model = tiny_net((3, 4, 3), 0)
    cert = sdp(eps=1e-3, max_iters=500, chunk_iters=500)
    threat = ThreatModel("L2", 0.3)
    x = torch.rand(3, 3, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    cert(model, x[:1], y[:1], threat)
    problem, _ = next(iter(cert._problems.values()))
    assert problem.problem.is_dpp()
    compiled = problem.problem._cache.param_prog
    assert compiled is not None
    cert(model, x[1:], y[1:], threat)
    assert cert.builds == 1 and problem.problem._cache.param_prog is compiled


def test_certified_examples_are_consistent_and_registered():
    model = tiny_net((4, 6, 3), 4)
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(5))
    y = model(x).argmax(1)
    res = SDP()(model, x, y, ThreatModel("Linf", 0.01))
    for i, s in enumerate(res.status):
        others = [j for j in range(3) if j != int(y[i])]
        assert (s == "certified") == bool((res.margin_lower[i, others] > 0).all()) == bool(res.certified[i])
    assert isinstance(CERTIFIERS.create("sdp"), SDP)


@pytest.mark.parametrize("kw", [{"eps": 0}, {"eps": 2.0}, {"max_iters": 0}, {"chunk_iters": -1},
                                {"time_limit": -1.0}, {"max_neurons": 0}])
def test_parameter_checks(kw):
    with pytest.raises(UserInputError):
        SDP(**kw)
