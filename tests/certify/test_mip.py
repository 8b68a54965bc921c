"""MIP (Tjeng et al. 2019) complete verifier: hand-computed minima, agreement with brute force (activation
pattern enumeration, dense grids), checked counterexamples, MIP >= CROWN, the LP path's verified bound,
the certification slack, statuses and parameter checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _exact import conv_net, exact_min_margins, grid_min_margins, hand_net, random_net, tiny_net
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse
from scipy.optimize import linprog
from torch import nn

from certify import CERTIFIERS, CROWN, MIP
from certify.convex import interval
from certify.mip import verified_bound
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel

X0 = torch.tensor([[0.5, 0.5]])


def full(**kw) -> MIP:
    """Every class solved, from interval bounds only: the MIP's own numbers."""
    return MIP(crown_first=False, early_stop=False, **kw)


@pytest.mark.parametrize("norm,eps,truth", [("Linf", 0.5, 1.0), ("L2", 0.25, 1.5)])
def test_hand_computed_minimum(norm, eps, truth):
    # margin 2 - z1 - z2 with z = relu(x1 + x2 - 1, x1 - x2): its minimum is 1 on [0, 1]^2 (Linf 0.5)
    # and 1.5 on the disc of radius 0.25 (at x = (0.75, 0.5)); the LP relaxation gives only 0.5 / 1.25
    res = full(exact=True, bounds=interval)(hand_net(), X0, torch.tensor([0]), ThreatModel(norm, eps))
    assert res.status == ["certified"] and res.info["certified_by"] == ["mip"]
    bound = res.margin_lower[0, 1].item()
    assert truth - 1e-4 <= bound <= truth
    assert torch.isnan(res.counterexample).all() and res.info["refuted"] == [False]


@pytest.mark.parametrize("make,shape", [(lambda s: random_net((2, 3, 4, 3), s), (2,)),
                                        (conv_net, (1, 1, 2))])
def test_linf_minimum_equals_activation_pattern_enumeration(make, shape):
    # dense: one refuted, one certified example; conv: one MILP (2 binaries), one LP (no unstable ReLU)
    for seed, point, eps in ((1, (0.7, 0.2), 0.2), (2, (0.5, 0.5), 0.1)):
        model = make(seed)
        x = torch.tensor([point]).reshape(1, *shape)
        y = int(model(x).argmax())
        exact = exact_min_margins(model, np.array(point), eps, y, shape)
        res = full()(model, x, torch.tensor([y]), ThreatModel("Linf", eps))
        bound = res.margin_lower[0].double().numpy()
        assert (bound <= exact + 1e-6).all(), (seed, bound, exact)  # sound (float32 rounding of the output)
        assert (bound >= exact - 1e-4).all(), (seed, bound, exact)  # exact
        assert res.status == ["certified" if np.delete(exact, y).min() > 0 else "not_certified"]


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.12)])
def test_verdicts_agree_with_a_dense_grid_and_counterexamples_are_real(norm, eps):
    torch.manual_seed(0)
    counts = {"certified": 0, "refuted": 0}
    threat = ThreatModel(norm, eps)
    for seed in range(4):
        model = random_net((2, 12, 12, 3), seed)
        x = torch.rand(8, 2)
        y = model(x).argmax(1)
        res = MIP()(model, x, y, threat)
        for i in range(8):
            grid = np.delete(grid_min_margins(model, x[i].double().numpy(), eps, int(y[i]), norm, 151), int(y[i]))
            if res.status[i] == "certified":
                assert grid.min() > 0, (seed, i)  # sound
                counts["certified"] += 1
            if grid.min() < 0:  # complete: a broken example is refuted with a checked point
                assert res.info["refuted"][i] and res.status[i] == "not_certified", (seed, i)
            if grid.min() > 0.05:  # well above the grid's resolution: must be certified
                assert res.status[i] == "certified", (seed, i, grid)
            point = res.counterexample[i]
            assert torch.isnan(point).all() != res.info["refuted"][i]
            if res.info["refuted"][i]:
                counts["refuted"] += 1
                delta = (point.double() - x[i].double()).norm(p=float("inf") if norm == "Linf" else 2)
                assert delta <= eps + 1e-6 and 0 <= point.min() and point.max() <= 1
                assert model(point[None]).argmax(1).item() != y[i].item()
    assert counts["certified"] >= 10 and counts["refuted"] >= 3, counts  # both verdicts were exercised


def test_mip_minimum_is_at_least_every_crown_bound_dense_and_conv():
    torch.manual_seed(1)
    for model, x in ((random_net((2, 10, 10, 3), 5), torch.rand(6, 2)), (conv_net(3), torch.rand(6, 1, 1, 2))):
        threat = ThreatModel("Linf", 0.15)
        y = model(x).argmax(1)
        crown = CROWN().bound_margins(model, x, y, threat).double()
        res = full()(model, x, y, threat)
        assert (res.margin_lower.double() >= crown - 1e-5).all()
        for record in res.info["problems"]:
            i, j = record["example"], record["class"]
            assert record["dual_bound"] + record["slack"] >= crown[i, j].item() - 1e-5
            assert record["optimum"] >= crown[i, j].item() - 1e-5  # the MILP's minimiser attains it
            assert record["point_margin"] >= crown[i, j].item() - 1e-6  # the network's own margin there


def test_clean_misclassified_example_is_its_own_counterexample():
    model = random_net((2, 8, 3), 0)
    x = torch.rand(4, 2)
    y = (model(x).argmax(1) + 1) % 3  # every label wrong
    res = MIP()(model, x, y, ThreatModel("Linf", 0.05))
    assert res.status == ["not_certified"] * 4 and res.info["refuted"] == [True] * 4
    assert torch.equal(res.counterexample, x)


def test_near_zero_margin_is_undecided_not_certified():
    # the hand net's margin (class 0 vs 1) shifted down to a minimum of 1e-9: positive, but within the slack
    model = hand_net()
    with torch.no_grad():
        model = model.double()
        model[2].bias[0] -= 1.0 - 1e-9
    res = full(bounds=interval)(model, X0.double(), torch.tensor([0]), ThreatModel("Linf", 0.5))
    assert res.status == ["not_certified"] and res.info["refuted"] == [False]
    record = res.info["problems"][0]
    assert record["bound"] <= 0 < record["point_margin"] < 1e-6


def test_example_without_unstable_relus_is_an_lp_with_a_verified_bound():
    model = tiny_net((2, 6, 3), 0)
    x = torch.tensor([[0.4, 0.7]])
    y = model(x).argmax(1)
    res = full()(model, x, y, ThreatModel("Linf", 1e-4))
    assert res.status == ["certified"]
    assert all(r["rigorous"] and r["binaries"] == 0 for r in res.info["problems"])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.floats(-3, 3))
def test_verified_bound_holds_for_any_multipliers(seed, scale):
    rng = np.random.default_rng(seed)
    m, n = 4, 5
    A = sparse.csr_array(rng.normal(size=(m, n)))
    lower, upper = -rng.random(n), rng.random(n)
    center = (lower + upper) / 2
    activity = A @ center
    rl = np.where(rng.random(m) < 0.5, activity - rng.random(m), -np.inf)
    ru = np.where(rng.random(m) < 0.5, activity + rng.random(m), np.inf)
    objective = rng.normal(size=n)
    lp = linprog(objective, A_ub=np.vstack([A.toarray(), -A.toarray()]),
                 b_ub=np.concatenate([np.where(np.isfinite(ru), ru, 1e9), np.where(np.isfinite(rl), -rl, 1e9)]),
                 bounds=np.stack([lower, upper], 1), method="highs")
    assert lp.status == 0
    y = scale * rng.normal(size=m)
    assert verified_bound(objective, A, rl, ru, lower, upper, y) <= lp.fun + 1e-9


def test_statuses_and_size_limits():
    torch.manual_seed(0)
    model = random_net((2, 12, 12, 3), 1)
    x = torch.rand(3, 2)
    y = model(x).argmax(1)
    threat = ThreatModel("Linf", 0.1)
    res = full(max_unstable=0)(model, x, y, threat)
    assert all(s.startswith("skipped: too large: ") and s.endswith("exceed max_unstable=0") for s in res.status)
    res = full(time_limit=1e-9)(model, x, y, threat)
    assert res.status == ["timeout"] * 3 and not res.certified.any()
    res = MIP(max_inputs=1)(model, x, y, threat)
    assert all(s.startswith("skipped: too large: 2 inputs exceed") for s in res.status)
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 3))
    res = MIP()(pooled, torch.rand(1, 1, 4, 4), torch.tensor([0]), ThreatModel("Linf", 0.1))
    assert res.status[0].startswith("skipped:") and "maxpool" in res.status[0]
    assert isinstance(CERTIFIERS.create("mip"), MIP)


@pytest.mark.parametrize("kw", [{"max_unstable": -1}, {"tolerance": 1e-3}, {"max_cuts": 1.5}, {"time_limit": 0}])
def test_parameter_checks(kw):
    with pytest.raises(UserInputError):
        MIP(**kw)
