"""SDP certifier (SDP-cert with triangle cuts, reduced to the unstable neurons): hand-computed bounds,
soundness against exact minima (also when SCS is stopped after a few iterations, and from garbage
multipliers), SDP >= LP >= CROWN on the same intermediate bounds, the reduction, the cascade's records,
timeout and skipped statuses, workspace reuse, parameter checks."""
from __future__ import annotations

import numpy as np
import pytest
import scs
import torch
from _exact import exact_min_margins, grid_min_margins, hand_net, tiny_net
from hypothesis import given, settings
from hypothesis import strategies as st

from certify import CERTIFIERS, CROWN, LP, SDP
from certify.convex import crown_bounds, interval, lower_to_dense, make_relaxations
from certify.dual import psd_box_bound
from certify.sdp_problem import build, svec, unsvec
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel

X0 = torch.tensor([[0.5, 0.5]])


def sdp(**kw) -> SDP:
    """Accurate settings for the tests (the default tolerance is loose: fine, but less tight)."""
    kw.setdefault("crown_first", False)
    kw.setdefault("early_stop", False)
    kw.setdefault("eps", 1e-6)
    kw.setdefault("max_iters", 50000)
    return SDP(**kw)


def relaxation(model, x, threat, bounds=crown_bounds):
    net = lower_to_dense(model, tuple(x.shape[1:]))
    pre = [(torch.as_tensor(lo).detach().double().numpy(), torch.as_tensor(hi).detach().double().numpy())
           for lo, hi in bounds(model, x, threat)]
    return net, make_relaxations(net, x.reshape(len(x), -1).double().numpy(), threat, pre)


def scs_solve(problem, c, eps=1e-7, iters=100000):
    solver = scs.SCS({"A": problem.A, "b": problem.b, "c": problem.objective(c)}, problem.cone,
                     eps_abs=eps, eps_rel=eps, max_iters=iters, verbose=False)
    return solver.solve()


@pytest.mark.parametrize("norm,eps", [("Linf", 0.5), ("L2", 0.25)])
def test_hand_computed_2_2_2(norm, eps):
    threat = ThreatModel(norm, eps)
    # margin 1 + z1 + z2: every relaxation is exact, the minimum is 1 (both ReLUs off)
    res = sdp(bounds=interval)(hand_net(sign=1.0), X0, torch.tensor([0]), threat)
    bound = res.margin_lower[0, 1].item()
    assert bound <= 1.0  # sound: the exact minimum is 1
    assert bound >= 1.0 - 1e-3  # tight up to the solver's tolerance: every relaxation is exact here
    # margin 2 - z1 - z2: true minimum 1, LP 0.5 (Linf) / 1.25 (L2) by hand; the SDP lies between,
    # strictly above the LP
    lp_value, true = {"Linf": (0.5, 1.0), "L2": (1.25, 1.5)}[norm]
    res = sdp(bounds=interval)(hand_net(), X0, torch.tensor([0]), threat)
    assert lp_value + 0.1 <= res.margin_lower[0, 1].item() <= true
    assert res.status == ["certified"] and res.info["certified_by"] == ["sdp"]


def test_hand_computed_sdp_value_by_its_dual():
    # Linf eps 0.5: an accurate SCS solve; the verified dual bound may not exceed the primal value
    # (weak duality), must be close to it, and lies between the LP (0.5) and the truth (1)
    model = hand_net()
    threat = ThreatModel("Linf", 0.5)
    net, (rel,) = relaxation(model, X0, threat, interval)
    problem = build(net, rel)
    assert problem.n == 4 and problem.unstable == [2]  # two inputs and both ReLUs are free
    c = np.array([1.0, -1.0])
    out = scs_solve(problem, c)
    primal = out["info"]["pobj"]
    verified = problem.verified_bound(c, out["y"])
    assert verified <= primal + 1e-5
    assert verified == pytest.approx(primal, abs=1e-4)
    assert 0.5 + 0.1 <= verified <= 1.0


def _lifted_point(net, rel, problem, x):
    """[1; w] of a true input x: free inputs and unstable neurons normalised to [-1, 1]."""
    lo, hi = rel.input_lower, rel.input_upper
    free = hi > lo
    parts = [(x[free] - (lo[free] + hi[free]) / 2) / ((hi[free] - lo[free]) / 2)]
    for s, a, b in zip(net.preactivations(x[None])[:-1], rel.pre_lower, rel.pre_upper):
        unstable = (a < 0) & (b > 0)
        parts.append(2 * np.maximum(s[0], 0)[unstable] / b[unstable] - 1)
    return np.concatenate([[1.0], *parts])


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.01, 0.3), norm=st.sampled_from(["Linf", "L2"]))
def test_true_points_satisfy_the_reduced_relaxation(seed, eps, norm):
    # the reduction is sound: every input of the threat set, lifted, is feasible for every
    # constraint (SCS's b - A svec(P) in the cone) and the logits' affine forms are the network's
    model = tiny_net((3, 6, 5, 3), seed)
    x = torch.rand(1, 3, generator=torch.Generator().manual_seed(seed))
    threat = ThreatModel(norm, eps)
    net, (rel,) = relaxation(model, x, threat)
    problem = build(net, rel)
    unstable = [int(((lo < 0) & (hi > 0)).sum()) for lo, hi in zip(rel.pre_lower, rel.pre_upper)]
    assert problem.n == 3 + sum(unstable) and problem.unstable == unstable  # stable neurons are substituted
    rng = np.random.default_rng(seed)
    x0 = x[0].double().numpy()
    for _ in range(20):
        d = rng.uniform(-1, 1, 3)
        d = eps * (d if norm == "Linf" else d / np.linalg.norm(d) * rng.uniform() ** (1 / 3))
        pt = np.clip(x0 + d, 0, 1)
        v = _lifted_point(net, rel, problem, pt)
        slack = problem.b - problem.A @ svec(np.outer(v, v))
        z, k = problem.cone["z"], problem.cone["l"]
        assert np.abs(slack[:z]).max() <= 1e-9 and slack[z:z + k].min() >= -1e-9
        assert np.allclose(problem.logits @ v, net.preactivations(pt[None])[-1][0], atol=1e-9)


def test_a_point_input_interval_is_a_constant():
    model = tiny_net((3, 6, 5, 3), 2)
    x = torch.tensor([[0.1, 0.4, 0.7]])
    net, (rel,) = relaxation(model, x, ThreatModel("Linf", 0.05))
    n = build(net, rel).n
    rel.input_upper[0] = rel.input_lower[0]
    problem = build(net, rel)
    assert problem.n == n - 1
    v = _lifted_point(net, rel, problem, np.array([rel.input_lower[0], 0.42, 0.69]))
    assert np.allclose(problem.logits @ v, net.preactivations(np.array([[rel.input_lower[0], 0.42, 0.69]]))[-1][0])


def test_svec_matches_scs_convention():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    G, P = a + a.T, a @ a.T
    assert svec(G) @ svec(P) == pytest.approx(np.sum(G * P))
    assert np.allclose(unsvec(svec(G), 4), G)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.02, 0.4), px=st.floats(0, 1), py=st.floats(0, 1))
def test_sound_against_exact_minimum_linf(seed, eps, px, py):
    model = tiny_net((2, 3, 3, 3), seed)
    x = torch.tensor([[px, py]], dtype=torch.float32)
    y = int(model(x).argmax())
    exact = exact_min_margins(model, x[0].double().numpy(), eps, y)
    for cert in (sdp(eps=1e-4), sdp(max_iters=5), sdp(max_iters=20, eps=1e-2)):
        res = cert(model, x, torch.tensor([y]), ThreatModel("Linf", eps))
        assert (res.margin_lower[0].double().numpy() <= exact).all()


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.0, 10.0))
def test_verified_bound_is_sound_for_garbage_multipliers(seed, noise):
    # soundness must not rest on the solver: any multipliers, however wrong, give a valid bound
    model = tiny_net((2, 4, 3, 3), seed)
    x = torch.tensor([[0.4, 0.6]])
    y = int(model(x).argmax())
    threat = ThreatModel("Linf", 0.2)
    exact = exact_min_margins(model, x[0].double().numpy(), 0.2, y)
    net, (rel,) = relaxation(model, x, threat)
    problem = build(net, rel)
    rng = np.random.default_rng(seed)
    for j in (j for j in range(3) if j != y):
        c = np.eye(3)[y] - np.eye(3)[j]
        out = scs_solve(problem, c, eps=1e-3, iters=200)
        for mult in (out["y"], out["y"] + noise * rng.normal(size=out["y"].shape), None):
            assert problem.verified_bound(c, mult) <= exact[j]
        bad = out["y"].copy()
        bad[3] = np.nan
        assert problem.verified_bound(c, bad) <= exact[j]


def test_psd_box_bound_closed_form():
    # min over the box of 2 w (M_01 = 1) with no quadratic part is -2 (w = -1); M_00 adds on
    M = np.array([[0.5, 1.0], [1.0, 0.0]])
    assert psd_box_bound(M) == pytest.approx(-1.5, abs=1e-9) and psd_box_bound(M) <= -1.5
    # -W_11 with W_11 <= 1: the PSD part shifted by its eigenvalue costs exactly 1
    assert psd_box_bound(np.array([[0.0, 0.0], [0.0, -1.0]])) == pytest.approx(-1.0, abs=1e-9)
    assert psd_box_bound(np.full((3, 3), np.nan)) == -np.inf


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.05, 0.5))
def test_sound_against_grid_l2(seed, eps):
    model = tiny_net((2, 4, 3), seed)
    x = torch.tensor([[0.3, 0.6]])
    y = int(model(x).argmax())
    truth = grid_min_margins(model, x[0].double().numpy(), eps, y, "L2")
    for cert in (sdp(eps=1e-4), sdp(max_iters=10)):
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
    # the SDP's own verified bound (recorded next to the LP's, which the certifier takes as a floor)
    res = sdp()(model, x, y, threat)
    gaps = [p["sdp_bound"] - lp[p["example"], p["class"]].item() for p in res.info["problems"]]
    assert len(gaps) == 4 and min(gaps) >= -1e-4 and max(gaps) > 1e-3  # SDP >= LP, strictly somewhere
    assert (res.margin_lower >= lp - 1e-6).all()
    # and at the default loose tolerance the verified SDP bound is still no looser than the LP
    loose = SDP(crown_first=False, early_stop=False)(model, x, y, threat)
    assert all(p["sdp_bound"] >= p["lp_bound"] - 1e-3 for p in loose.info["problems"])


def test_cascade_records_the_stage_and_solves_only_what_is_left():
    model = tiny_net((4, 8, 8, 3), 3)
    x = torch.rand(4, 4, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    threat = ThreatModel("Linf", 0.05)
    res = SDP()(model, x, y, threat)
    crown = CROWN()(model, x, y, threat).margin_lower
    for i, by in enumerate(res.info["certified_by"]):
        assert (by is not None) == (res.status[i] == "certified")
        solved = {p["class"] for p in res.info["problems"] if p["example"] == i}
        assert all(crown[i, j] <= 0 for j in solved)  # classes CROWN certified get no LP/SDP
        if by == "crown":
            assert not solved
    for p in res.info["problems"]:
        assert p["stage"] in ("lp", "sdp") and ("sdp_bound" in p) == (p["lp_bound"] <= 0)


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
    assert all(s == "skipped: too large: 6 hidden neurons exceed max_neurons=5" for s in res.status)
    assert not res.certified.any() and torch.isnan(res.margin_lower).all()
    res = SDP(max_inputs=2)(model, x, torch.tensor([0, 1]), ThreatModel("Linf", 0.1))
    assert all(s.startswith("skipped: too large: 4 inputs exceed") for s in res.status)


def test_an_example_too_large_for_the_sdp_keeps_the_lp_and_says_why():
    model = tiny_net((4, 8, 8, 3), 1)
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    threat = ThreatModel("Linf", 0.3)
    small = SDP(max_lifted=4, crown_first=False)(model, x, y, threat)
    full = SDP(crown_first=False)(model, x, y, threat)
    lp = LP(crown_first=False)(model, x, y, threat)
    assert all("sdp_bound" not in p for p in small.info["problems"])  # every example has > 4 variables
    for i, status in enumerate(small.status):
        if lp.certified[i]:
            assert status == "certified" and small.info["certified_by"][i] in ("interval", "lp")
        else:
            assert status.startswith("skipped: SDP of ") and status.endswith("exceeds max_lifted=4")
    assert small.certified.tolist() == lp.certified.tolist()
    assert (full.certified >= lp.certified).all() and (full.certified > lp.certified).any()  # the SDP adds some
    assert any(status.startswith("skipped: SDP") for status in small.status)


def test_lp_compiled_once_per_network_and_scs_factorised_once_per_example():
    model = tiny_net((3, 6, 4), 0)
    cert = sdp(eps=1e-3, max_iters=500)
    threat = ThreatModel("Linf", 0.3)
    x = torch.rand(3, 3, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    cert(model, x[:1], y[:1], threat)
    problems = next(iter(cert._problems.values()))
    compiled = problems.lp.problem._cache.param_prog
    assert problems.lp.problem.is_dpp() and compiled is not None
    assert problems.example.solved == 3  # one SCS workspace for every class of the example
    res = cert(model, x[1:], y[1:], threat)
    assert cert.builds == 1 and problems.lp.problem._cache.param_prog is compiled
    setups = [p["setup_seconds"] for p in res.info["problems"]]
    assert [s > 0 for s in setups] == [True, False, False] * 2


def test_certified_examples_are_consistent_and_registered():
    model = tiny_net((4, 6, 3), 4)
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(5))
    y = model(x).argmax(1)
    res = SDP()(model, x, y, ThreatModel("Linf", 0.01))
    for i, s in enumerate(res.status):
        others = [j for j in range(3) if j != int(y[i])]
        assert (s == "certified") == bool((res.margin_lower[i, others] > 0).all()) == bool(res.certified[i])
    assert isinstance(CERTIFIERS.create("sdp"), SDP)


@pytest.mark.parametrize("kw", [{"eps": 0}, {"eps": 2.0}, {"max_iters": 0}, {"max_iters": 1.5}, {"first_iters": -1},
                                {"max_lifted": 0}, {"time_limit": -1.0}, {"max_neurons": 0}])
def test_parameter_checks(kw):
    with pytest.raises(UserInputError):
        SDP(**kw)
