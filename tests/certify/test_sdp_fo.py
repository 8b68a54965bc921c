"""First-order SDP (``sdp-fo``): the matrix-free Lagrangian is the network's at true points, the products
match the dense matrix, CROWN's multipliers give CROWN's bound, soundness on random small conv, dense and
residual nets (sampled, corner and PGD points, float64 margins, no slack), never above the exact SDP
optimum of the same relaxation and close to it after enough steps, statuses, records, parameter checks."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import scs
import torch
from _exact import tiny_net
from hypothesis import given, settings
from hypothesis import strategies as st
from test_soundness import Residual, candidate_points, exact_margins
from torch import nn

from certify import CERTIFIERS, CROWN, SDPFO
from certify.base import spec_matrix
from certify.convex import crown_bounds, lower_to_dense, make_relaxations
from certify.crown import bounds_and_margins, intermediate_bounds
from certify.graph import build_graph
from certify.sdp_fo_problem import LiftedProblem, Multipliers
from certify.sdp_fo_verify import dense_matrix, drift, linear_bounds, project, sdp_bounds
from certify.sdp_problem import build
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo.architectures import Normalize

K = 3


def net(kind: str, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    """Small ReLU networks of the three kinds the SDP lifts: dense, convolutional, residual."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(Normalize((0.4,), (0.7,)), nn.Flatten(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 6),
                             nn.ReLU(), nn.Linear(6, K)).eval(), (1, 3, 3)
    if kind == "conv":  # strided convs, eval BatchNorm, average pooling: the zoo CNN's kinds of layers
        bn = nn.BatchNorm2d(3)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
        return nn.Sequential(Normalize((0.3,), (0.5,)), nn.Conv2d(1, 3, 3, stride=2, padding=1), bn, nn.ReLU(),
                             nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                             nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, K)).eval(), (1, 8, 8)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
                         Residual(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32, K)).eval(), (1, 4, 4)


def problem(model: nn.Module, x: torch.Tensor, y: int, threat: ThreatModel, dtype=torch.float64) -> LiftedProblem:
    """Rows: every class j != y of one example, with the certifier's proven float64 bounds."""
    rows = [j for j in range(K) if j != y]
    bounds = intermediate_bounds(model, x, threat)
    graph = build_graph(copy.deepcopy(model).to(dtype), tuple(x.shape[1:]))
    rep = lambda t: t.to(dtype).expand(len(rows), *t.shape[1:])  # noqa: E731
    return LiftedProblem(graph, rep(x), [(rep(lo), rep(hi)) for lo, hi in bounds], threat,
                         spec_matrix(torch.tensor([y]), K)[0][rows].to(dtype))


def random_multipliers(p: LiftedProblem, seed: int) -> Multipliers:
    g = torch.Generator().manual_seed(seed)
    r = lambda t: torch.rand(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
    m = p.crown_multipliers()
    return project(p, Multipliers([r(t) for t in m.lower], [r(t) for t in m.upper], [r(t) for t in m.relu],
                                  [r(t) for t in m.triangle], [r(t) - 0.5 for t in m.product], r(m.kappa) * 0,
                                  r(m.kappa0) * 0, r(m.ball)))


@pytest.mark.parametrize("kind", ["mlp", "conv", "residual"])
@pytest.mark.parametrize("norm,eps", [("Linf", 0.15), ("L2", 0.4)])
def test_lagrangian_is_the_networks_at_true_points(kind, norm, eps):
    # const + [1; w]^T M [1; w] at the lifted coordinates of a true input equals c^T logits minus every
    # multiplied constraint evaluated on the network itself: the matrix-free pieces are the relaxation's
    model, shape = net(kind, 1)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(2))
    y = int(model(x).argmax())
    threat = ThreatModel(norm, eps)
    p = problem(model, x, y, threat)
    mult = random_multipliers(p, 3)
    parts = p.parts(mult)
    graph = p.graph
    for row in range(p.rows):
        a, idx = dense_matrix(p, mult, row)
        for t in range(3):
            g = torch.Generator().manual_seed(10 + t)
            pt = threat.project(x + threat.ops.random_in_ball(torch.rand(x.shape, generator=g),
                                                              torch.randn(x.shape, generator=g), eps), x).double()
            with torch.no_grad():
                values = graph.forward(pt)
            s = [values[i][0] for i in p.pre]
            z = [values[i][0] for i in p.relus]
            w_in = torch.where(p.half[row] > 0, (pt[0] - p.mid[row]) / p.half[row].clamp(min=1e-300), 0.0)
            w = p.join([w_in[None]] + [torch.where(p.unstable[i][row] > 0, z[i] / p.h[i][row].clamp(min=1e-300) - 1,
                                                   0.0)[None] for i in range(len(z))])[0]
            v = torch.cat([torch.ones(1, dtype=torch.float64), w[idx]]).numpy()
            direct = float((p.spec[row] * values[graph.output][0]).sum())
            for i in range(len(z)):
                direct -= float((mult.lower[i][row] * (s[i] - p.lower[i][row])).sum()
                                + (mult.upper[i][row] * (p.upper[i][row] - s[i])).sum()
                                + (mult.relu[i][row] * (z[i] - s[i])).sum()
                                + (mult.triangle[i][row] * (p.slope[i][row] * s[i] + p.icpt[i][row] - z[i])).sum()
                                + (mult.product[i][row] * z[i] * (z[i] - s[i])).sum())
            if norm == "L2":
                direct += float(mult.ball[row] * (((pt - x.double()) ** 2).sum() - eps ** 2))
            assert float(parts.const[row]) + v @ a @ v == pytest.approx(direct, rel=1e-9, abs=1e-9)


def float64_ops(graph) -> None:
    """The graph's layers (folded in float32, with their float32 folding errors) converted to float64 in
    place: evaluated in float64, their distance from the exact network is their folding error."""
    for node in graph.nodes:
        if node.kind == "affine":
            for key, value in list(vars(node.op).items()):
                if torch.is_tensor(value):
                    setattr(node.op, key, value.double())
            if node.op.param_error is not None:
                node.op.param_error = tuple(None if t is None else t.double() for t in node.op.param_error)


@pytest.mark.parametrize("kind", ["mlp", "conv"])  # the residual net folds nothing
def test_drift_bounds_the_folded_layers_distance_from_the_exact_network(kind):
    # lift true points with the exact network's own values (unstable neurons' outputs): the problem's
    # pre-activations and logits on float32-folded layers (Normalize's 1/std, BatchNorm, average pooling)
    # lie within drift() of the exact network's (float64 folding, ~1e-16, is the reference)
    model, shape = net(kind, 11)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(12))
    y = int(model(x).argmax())
    threat = ThreatModel("Linf", 0.1)
    exact = problem(model, x, y, threat)
    folded = problem(model, x, y, threat, dtype=torch.float32)
    float64_ops(folded.graph)
    p = LiftedProblem(folded.graph, exact.mid[:1] * 0 + x.double(), [(lo[:1], hi[:1]) for lo, hi in
                      zip(exact.lower, exact.upper)], threat, exact.spec[:1])
    drift_pre, drift_logits = drift(p)
    seen = 0.0
    for t in range(4):
        g = torch.Generator().manual_seed(20 + t)
        pt = threat.project(x + threat.ops.random_in_ball(torch.rand(x.shape, generator=g),
                                                          torch.randn(x.shape, generator=g), 0.1), x).double()
        with torch.no_grad():
            values = exact.graph.forward(pt)
        z = [values[i] for i in exact.relus]
        w_in = torch.where(p.half > 0, (pt - p.mid) / p.half.clamp(min=1e-300), 0.0)
        w = p.join([w_in] + [torch.where(p.unstable[i] > 0, z[i] / p.h[i].clamp(min=1e-300) - 1, 0.0)
                             for i in range(len(z))])
        t_pre, t_logits = p.jvp(w)
        for i, pre in enumerate(exact.pre):
            gap = (p.s0[i] + t_pre[i] - values[pre]).abs()
            assert (gap <= drift_pre[i] + 1e-12).all()  # 1e-12: the float64 reference's own rounding
            seen = max(seen, float(gap.detach().max()))
        assert ((p.logits0 + t_logits - values[exact.graph.output]).abs() <= drift_logits + 1e-12).all()
    assert seen > 1e-9  # float32 folding did move the pre-activations: the check is not empty


@pytest.mark.parametrize("kind", ["conv", "residual"])
def test_products_match_the_dense_matrix(kind):
    model, shape = net(kind, 4)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(5))
    p = problem(model, x, int(model(x).argmax()), ThreatModel("Linf", 0.2))
    mult = random_multipliers(p, 6)
    g = torch.Generator().manual_seed(7)
    mult.kappa, mult.kappa0 = torch.rand(p.mask.shape, generator=g, dtype=torch.float64) * p.mask, torch.rand(p.rows, dtype=torch.float64)
    v = torch.randn(p.rows, 1 + p.width, generator=g, dtype=torch.float64) * torch.cat([torch.ones(p.rows, 1), p.mask], 1)
    with torch.no_grad():
        parts = p.parts(mult)
        two_m = p.linear_coefficient(parts)
        product = p.matvec(parts, two_m, mult.kappa0, mult.kappa, v)
        t_pre, t_logits = p.jvp(v[:, 1:])
        quad = p.quadratic(parts, mult.kappa0, mult.kappa, v, t_pre, t_logits)
    for row in range(p.rows):
        a, idx = dense_matrix(p, mult, row)
        a[np.diag_indices(len(a))] += torch.cat([mult.kappa0[row:row + 1], mult.kappa[row, idx]]).numpy()
        loc = torch.cat([torch.tensor([0]), 1 + idx])
        assert np.allclose(product[row, loc].numpy(), a @ v[row, loc].numpy(), atol=1e-10)
        assert float(product[row].abs().sum()) == pytest.approx(float(product[row, loc].abs().sum()))  # lifted only
        assert float(quad[row]) == pytest.approx(v[row, loc].numpy() @ a @ v[row, loc].numpy(), rel=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "conv", "residual"])
def test_crowns_multipliers_give_crowns_bound(kind):
    model, shape = net(kind, 8)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(9))
    y = int(model(x).argmax())
    threat = ThreatModel("Linf", 0.1)
    p = problem(model, x, y, threat)
    crown = bounds_and_margins(model, x, torch.tensor([y]), threat)[1][0, [j for j in range(K) if j != y]]
    bound = linear_bounds(p, p.crown_multipliers())
    assert torch.allclose(bound, crown, atol=1e-9, rtol=1e-9)  # the same bound (float64 CROWN), up to rounding pads
    quadratic = p.crown_multipliers()
    quadratic.product[0] = quadratic.product[0] + p.unstable[0]
    assert (linear_bounds(p, quadratic) == -np.inf).all() if bool(p.unstable[0].any()) else True


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["mlp", "conv", "residual"]), seed=st.integers(0, 10_000),
       norm=st.sampled_from(["Linf", "L2"]), eps=st.floats(0.02, 0.3), early_stop=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_sound_at_sampled_corner_and_pgd_points(kind, seed, norm, eps, early_stop, dtype):
    # every bound, certified or not, below the exact (float64) margins at random, corner and targeted PGD
    # points of the ball and box, with no gap: the bounds are proven under rounding (certify/rounding.py)
    model, shape = net(kind, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, *shape, generator=g)
    x[0].clamp_(0.0, 0.05)  # one example at the box's edge
    y = torch.randint(0, K, (2,), generator=g)
    threat = ThreatModel(norm, eps * (2 if norm == "L2" else 1))
    model, x = model.to(dtype), x.to(dtype)
    res = SDPFO(steps=40, lp_steps=20, early_stop=early_stop)(model, x, y, threat)
    assert res.margin_lower.dtype == dtype
    crown = bounds_and_margins(model, x, y, threat)[1]
    solved = {(p["example"], p["class"]) for p in res.info["problems"]}
    for i, j in solved:  # never looser than the cascade's start where it ran
        assert res.margin_lower[i, j].double() >= crown[i, j] - 1e-6 * (1 + abs(crown[i, j]))
    model64 = copy.deepcopy(model).double()
    for pt in candidate_points(model64, x, y, threat, seed):
        m = exact_margins(model64, pt, y)
        assert (res.margin_lower.double() <= m).all()
        assert not (res.certified & (m.scatter(1, y[:, None], 1.0).amin(1) <= 0)).any()


def inner_sdp(a: np.ndarray) -> float:
    """min <A, P> over P >= 0, P_00 = 1, P_kk <= 1 (Clarabel): the dual function's quadratic part."""
    import cvxpy as cp

    p = cp.Variable(a.shape, PSD=True)
    prob = cp.Problem(cp.Minimize(cp.trace(a @ p)), [p[0, 0] == 1, cp.diag(p)[1:] <= 1])
    prob.solve(solver=cp.CLARABEL)
    return float(prob.value)


@pytest.mark.parametrize("norm", ["Linf", "L2"])  # the dense MLP: Clarabel on the conv net's matrix takes minutes
def test_verified_bound_is_the_dual_function_and_never_above_it(norm):
    # for ANY multipliers the verified bound is at most const + min_P <M, P> (the Lagrangian's minimum over
    # the lifted set), and with the best diagonal run to convergence it is that minimum (strong duality of
    # the inner SDP): with no sweep (a random factor's diagonal, A + K far from PSD) it must still stay below
    model, shape = net("mlp", 13)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(14))
    threat = ThreatModel(norm, 0.2 if norm == "Linf" else 0.5)
    p = problem(model, x, int(model(x).argmax()), threat)
    mult = random_multipliers(p, 15)
    tight, _ = sdp_bounds(p, mult, sweeps=2000)
    rough, details = sdp_bounds(p, mult, sweeps=0)
    near, _ = sdp_bounds(p, mult, sweeps=1)  # within ~1e-3 of the minimum: a wrong eigenvalue term shows here
    for row in range(p.rows):
        a, _ = dense_matrix(p, mult, row)
        value = float(p.parts(mult).const[row]) + inner_sdp(a)
        assert float(rough[row]) <= value and details[row]["lambda_lower"] < -1e-3  # a real eigenvalue term
        assert float(near[row]) <= value + 1e-7 and float(tight[row]) <= value + 1e-7  # Clarabel's tolerance
        assert float(tight[row]) == pytest.approx(value, abs=1e-4 * (1 + abs(value)))


def exact_sdp(model: nn.Module, x: torch.Tensor, y: int, threat: ThreatModel) -> dict[int, float]:
    """SCS's primal value (an upper bound of the exact optimum, within its tolerance) of the reduced SDP
    with the same intermediate bounds, per class."""
    dense = lower_to_dense(model, tuple(x.shape[1:]))
    pre = [(lo.detach().double().numpy(), hi.detach().double().numpy()) for lo, hi in crown_bounds(model, x, threat)]
    rel = make_relaxations(dense, x.reshape(1, -1).double().numpy(), threat, pre)[0]
    prob = build(dense, rel)
    out = {}
    for j in (j for j in range(K) if j != y):
        c = np.eye(K)[y] - np.eye(K)[j]
        solver = scs.SCS({"A": prob.A, "b": prob.b, "c": prob.objective(c)}, prob.cone, eps_abs=1e-8, eps_rel=1e-8,
                         max_iters=200000, verbose=False)
        sol = solver.solve()
        out[j] = float(sol["info"]["pobj"]) + 1e-6 * (1 + abs(sol["info"]["pobj"]))
    return out


def _gains(widths: tuple[int, ...], seed: int, eps: float, steps: int) -> list[float]:
    """Per class: (sdp-fo - CROWN) / (exact SDP - CROWN), after checking sdp-fo <= the exact optimum."""
    model = tiny_net(widths, seed)
    x = torch.rand(1, widths[0], generator=torch.Generator().manual_seed(seed))
    y = int(model(x).argmax())
    threat = ThreatModel("Linf", eps)
    exact = exact_sdp(model, x, y, threat)
    res = SDPFO(steps=steps, lp_steps=50, early_stop=False)(model, x, torch.tensor([y]), threat)
    crown = CROWN()(model, x, torch.tensor([y]), threat).margin_lower[0]
    gains = []
    for j, value in exact.items():
        bound = float(res.margin_lower[0, j])
        assert bound <= value  # a dual point of the same relaxation: never above its optimum
        assert value > float(crown[j]) + 0.05  # these cases have a real SDP gain to reach
        gains.append((bound - float(crown[j])) / (value - float(crown[j])))
    return gains


# nets where the exact SDP is 0.08-0.12 above CROWN (the same intermediate bounds) on both classes
CASES = [((4, 8, 6, K), 4, 0.5), ((4, 8, 6, K), 8, 0.5), ((3, 6, 5, K), 3, 0.5)]


def test_never_above_the_exact_sdp_and_within_5_percent_after_200_steps():
    # measured: 97-99 % of the gain after 200 steps, >= 99 % after 1000 (the slow test below)
    assert min(_gains(*CASES[0], steps=200)) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_reaches_the_exact_sdp_within_1_5_percent_after_1000_steps(case):
    assert min(_gains(*case, steps=1000)) >= 0.985


def test_statuses_records_and_the_cascade():
    # Linf 0.8 on these nets: CROWN certifies nothing; the LP dual certifies every example of seed 0, the
    # SDP is needed for those of seed 2 (found by a scan; the assertions below hold whatever the stage)
    x = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    threat = ThreatModel("Linf", 0.8)
    stages = set()
    for seed in (0, 2):
        model, _ = net("mlp", seed)
        y = model(x).argmax(1)
        res = SDPFO(steps=60, lp_steps=20)(model, x, y, threat)
        crown = CROWN()(model, x, y, threat).margin_lower
        for i, (status, by) in enumerate(zip(res.status, res.info["certified_by"])):
            solved = {p["class"] for p in res.info["problems"] if p["example"] == i}
            assert all(crown[i, j] <= 0 for j in solved)  # classes CROWN proves get no solve
            assert (status == "certified") == (by is not None) == bool(res.certified[i])
            if status == "certified":
                assert (res.margin_lower[i, [j for j in range(K) if j != int(y[i])]] > 0).all()
                stages.add(by)
        for p in res.info["problems"]:
            assert p["stage"] in ("crown", "lp", "sdp") and p["bound"] >= p["crown_bound"]
            assert p["stage"] != "sdp" or p["bound"] == p["sdp_bound"] and p["eigen"] in ("cholesky", "eigvalsh")
        assert res.forward_equivalents > 0
    assert stages == {"lp", "sdp"}
    assert isinstance(CERTIFIERS.create("sdp-fo"), SDPFO) and SDPFO.skip_refuted


def test_timeout_skipped_and_misclassified():
    model, _ = net("mlp", 2)
    x = torch.rand(3, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    logits = model(x)
    y = logits.argmax(1)
    y[2] = logits[2].argmin()  # misclassified: never certified, no solve
    threat = ThreatModel("Linf", 0.8)
    res = SDPFO(timeout=1e-6)(model, x, y, threat)  # the SDP is needed here and gets no step
    assert res.status[2] == "not_certified" and not any(p["example"] == 2 for p in res.info["problems"])
    assert res.status[:2] == ["timeout", "timeout"] and not res.certified.any()
    cpu = SDPFO(timeout=1e-6, clock="cpu")  # the budget counted in CPU seconds runs out the same way
    assert cpu.config()["clock"] == "cpu" and cpu(model, x, y, threat).status[:2] == ["timeout", "timeout"]
    small = SDPFO(max_dense=3, steps=5, lp_steps=5)(model, x[:2], y[:2], threat)
    assert all(s.startswith("skipped: SDP of ") and s.endswith("max_dense=3") for s in small.status)
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, K)).eval()
    xp = torch.rand(2, 1, 2, 2)
    res = SDPFO()(pooled, xp, pooled(xp).argmax(1), ThreatModel("Linf", 0.5))
    assert all(s == "certified" or s.startswith("skipped: the SDP lifts ReLU networks only") for s in res.status)
    assert any(s.startswith("skipped") for s in res.status)


def test_budget_is_read_on_the_chosen_clock(monkeypatch):
    """Every deadline (LP phase, SDP phase, dense check) reads the certifier's clock: a clock that never
    advances never runs out, however small the timeout."""
    import certify.sdp_fo as sdp_fo_module
    model, _ = net("mlp", 2)
    x = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    threat = ThreatModel("Linf", 0.8)
    monkeypatch.setitem(sdp_fo_module.CLOCKS, "cpu", lambda: 0.0)
    res = SDPFO(timeout=1e-6, clock="cpu", steps=6, lp_steps=5)(model, x, y, threat)
    assert "timeout" not in res.status
    solved = [p for p in res.info["problems"] if "sdp_steps" in p]
    assert solved and all(p["lp_steps"] > 0 and p["sdp_steps"] > 0 for p in solved)


@pytest.mark.parametrize("kw", [{"steps": -1}, {"lp_steps": 1.5}, {"lanczos_iters": -1}, {"block": 0}, {"lr": 0},
                                {"decay": 1.5}, {"timeout": 0}, {"verify_share": 2.0}, {"max_dense": 1},
                                {"stop_margin": -1.0}, {"seed": -1}, {"memory_mb": float("nan")}, {"clock": "gpu"}])
def test_parameter_checks(kw):
    with pytest.raises(UserInputError):
        SDPFO(**kw)
