"""CROWN and alpha-CROWN: hand-computed and exact cases, patch vs dense walk, chunking, batching."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify import CROWN, IBP, AlphaCROWN, intermediate_bounds, patches
from certify.crown import Propagator
from certify.rows import count_groups
from certify.graph import build_graph
from certify.layers import MaxPoolOp, maxpool_relaxation
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo.architectures import mnist_cnn, mnist_lenet
from test_ibp import HAND_THREAT, HAND_X, HAND_Y, hand_net
from test_soundness import KINDS, random_net


def test_hand_computed_2_2_2_network():
    # h2 = x1 - x2 in [-2, 2]: CROWN's adaptive lower slope is 1 (u >= -l), so for y = 0
    # z0 - z1 = 2 r2 + 0.25 >= 2 h2 + 0.25 >= -3.75 (looser than IBP's 0.25 here: no order is assumed);
    # for y = 1, -2 r2 - 0.25 >= -2 (h2 / 2 + 1) - 0.25 >= -4.25, the exact minimum.
    # (float64: the proven rounding pad is ~1e-15)
    net, x = hand_net().double(), HAND_X.double()
    m = CROWN()(net, x, HAND_Y, HAND_THREAT).margin_lower
    assert torch.allclose(m, torch.tensor([[0.0, -3.75], [-4.25, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    # alpha-CROWN moves the slope to 0 and reaches the exact minimum 0.25
    m = AlphaCROWN(alpha_steps=10)(net, x, HAND_Y, HAND_THREAT).margin_lower
    assert torch.allclose(m, torch.tensor([[0.0, 0.25], [-4.25, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert (m <= torch.tensor([[0.0, 0.25], [-4.25, 0.0]], dtype=torch.float64)).all()
    pre = intermediate_bounds(hand_net(), HAND_X, HAND_THREAT)  # proven, float64, from a float32 model
    assert len(pre) == 1 and pre[0][0].dtype == torch.float64
    assert (pre[0][0] <= torch.tensor([[-1.5, -2.0]] * 2, dtype=torch.float64)).all()
    assert (pre[0][1] >= torch.tensor([[2.5, 2.0]] * 2, dtype=torch.float64)).all()
    assert torch.allclose(pre[0][0], torch.tensor([[-1.5, -2.0]] * 2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(pre[0][1], torch.tensor([[2.5, 2.0]] * 2, dtype=torch.float64), rtol=0, atol=1e-12)


def _grid_minimum(net: nn.Sequential, x0: torch.Tensor, y: int, eps: float) -> torch.Tensor:
    """Minimum of the exact (float64) margins over a dense 301 x 301 grid of the (2-D) Linf ball ∩ box, (K,).

    Every grid point lies in the ball (pulled towards x0 by 2^-20), so the minimum is >= the true one and
    every sound lower bound must lie below it, with no gap.
    """
    x0 = x0.double()
    lo, hi = (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1)
    t = torch.linspace(0, 1, 301, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(lo[0] + t * (hi[0] - lo[0]), lo[1] + t * (hi[1] - lo[1]), indexing="ij"), -1)
    grid = x0 + (grid.reshape(-1, 2) - x0) * (1 - 2.0 ** -20)
    with torch.no_grad():
        z = copy.deepcopy(net).double()(grid)
    return (z[:, y:y + 1] - z).amin(0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.01, 0.5))
def test_two_dimensional_inputs_against_a_dense_grid(seed, eps):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x0 = torch.rand(1, 2)
    threat = ThreatModel("Linf", eps)
    grid_min = _grid_minimum(net, x0[0], 1, eps)
    for cert in (IBP(), CROWN(), AlphaCROWN(alpha_steps=5)):
        bound = cert(net, x0, torch.tensor([1]), threat).margin_lower[0]
        assert (bound.double() <= grid_min).all(), cert.name


def test_linear_network_bounds_are_exact():
    torch.manual_seed(0)  # float64: the proven rounding pad is ~1e-15
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3)).eval().double()
    x, y, eps = torch.full((1, 3), 0.5, dtype=torch.float64), torch.tensor([2]), 0.1
    w = net[1].weight @ net[0].weight
    c = w[2] - w  # margin coefficients (3, 3)
    with torch.no_grad():
        z = net(x)
    exact = (z[:, 2:3] - z)[0] - eps * c.abs().sum(1)
    crown = CROWN()(net, x, y, ThreatModel("Linf", eps)).margin_lower[0]
    assert (crown <= exact).all() and torch.allclose(crown, exact, rtol=0, atol=1e-12)
    # IBP is exact only through one affine layer (the folded spec), not through two
    ibp = IBP()(net, x, y, ThreatModel("Linf", eps)).margin_lower[0]
    assert (ibp <= exact).all() and (ibp < exact - 1e-3).any()
    single = nn.Sequential(nn.Linear(3, 3)).eval().double()
    with torch.no_grad():
        single[0].weight.copy_(w)
        single[0].bias.copy_(net(torch.zeros(1, 3, dtype=torch.float64))[0])
    assert torch.allclose(IBP()(single, x, y, ThreatModel("Linf", eps)).margin_lower[0], exact, rtol=0, atol=1e-12)
    exact_l2 = (z[:, 2:3] - z)[0] - eps * c.norm(dim=1)
    assert torch.allclose(CROWN()(net, x, y, ThreatModel("L2", eps)).margin_lower[0], exact_l2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_eps_zero_equals_logits_and_eps_positive_separates_bounds(norm):
    torch.manual_seed(1)
    model, shape = random_net("conv", 1)
    model, x, y = model.double(), torch.rand(2, *shape, dtype=torch.float64), torch.tensor([0, 2])
    with torch.no_grad():
        z = model(x)
    for cert in (CROWN(), AlphaCROWN(alpha_steps=2)):
        m = cert(model, x, y, ThreatModel(norm, 0.0)).margin_lower
        exact = z.gather(1, y[:, None]) - z
        assert (m <= exact).all() and torch.allclose(m, exact, rtol=0, atol=1e-9)
    for lo, hi in intermediate_bounds(model, x, ThreatModel(norm, 0.05)):
        assert (lo < hi).all()
    m = CROWN()(model, x, y, ThreatModel(norm, 0.05)).margin_lower
    off = torch.ones_like(m, dtype=torch.bool).scatter(1, y[:, None], False)
    assert (m[off] < (z.gather(1, y[:, None]) - z)[off]).all()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_patch_walk_equals_dense_walk(norm, monkeypatch):
    torch.manual_seed(0)
    model, shape = random_net("conv", 3)
    x, threat = torch.rand(2, *shape), ThreatModel(norm, 0.08)
    graph = build_graph(model, shape)
    with torch.no_grad():
        with_patches = Propagator(graph, x, threat)
        with_patches.compute_bounds()
        monkeypatch.setattr(patches, "eligible", lambda g, s: False)
        dense = Propagator(graph, x, threat)
        dense.compute_bounds()
    for i in with_patches.boxes:
        assert torch.allclose(with_patches.boxes[i][0], dense.boxes[i][0], atol=1e-5)
        assert torch.allclose(with_patches.boxes[i][1], dense.boxes[i][1], atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 10_000), norm=st.sampled_from(["Linf", "L2"]),
       eps=st.floats(0.01, 0.3))
def test_optimised_walks_equal_the_plain_reference(kind, seed, norm, eps):
    # the fast path (patches with all channels of a position as rows, ReLU + max-pool folded into one
    # step, GEMM transposed convs) against the plain one (dense A, one row per neuron, one step per layer),
    # in float64: in float32 the two summation orders can differ enough to flip a relaxation's choice (a
    # max-pool candidate, a ReLU slope) and give another valid bound (lenet, seed 706, L2, eps 0.0625)
    model, shape = random_net(kind, seed)
    model = model.double()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(3, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)
    threat = ThreatModel(norm, eps * (3 if norm == "L2" else 1))
    graph = build_graph(model, shape)
    with torch.no_grad():
        fast, plain = Propagator(graph, x, threat), Propagator(graph, x, threat, plain=True)
        fast.compute_bounds()
        plain.compute_bounds()
        assert not plain.fused and (bool(fast.fused) == (kind in ("lenet", "lenet-odd")))
        for i, (lo, hi) in plain.boxes.items():
            assert torch.allclose(fast.boxes[i][0], lo, rtol=0, atol=1e-9)
            assert torch.allclose(fast.boxes[i][1], hi, rtol=0, atol=1e-9)
        assert torch.allclose(fast.margins(y), plain.margins(y), rtol=0, atol=1e-9)
        # alpha-CROWN's slopes reach the folded ReLU too
        alphas = {i: torch.rand(3, 3, *r.lower_slope.shape[1:], generator=g, dtype=torch.float64)
                  for i, r in plain.relax.items() if r.kind == "relu"}
        assert torch.allclose(fast.margins(y, alphas), plain.margins(y, alphas), rtol=0, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 50), min_size=1, max_size=12))
def test_example_groups_cover_every_example_with_rows_once(counts):
    groups = count_groups(torch.tensor(counts))
    members = torch.cat(groups).tolist() if groups else []
    assert sorted(members) == [i for i, c in enumerate(counts) if c > 0]
    for g in groups:
        values = [counts[i] for i in g.tolist()]
        assert max(values) <= 1.5 * min(values) and g.tolist() == sorted(g.tolist())


def test_cost_in_forward_passes_is_reported():
    torch.manual_seed(0)
    model, x = mnist_lenet().eval(), torch.rand(3, 1, 28, 28)
    y = torch.tensor([0, 1, 2])
    ibp = IBP()(model, x, y, ThreatModel("Linf", 0.05)).forward_equivalents
    crown = CROWN()(model, x, y, ThreatModel("Linf", 0.05)).forward_equivalents
    alpha = AlphaCROWN(alpha_steps=2)(model, x, y, ThreatModel("Linf", 0.05)).forward_equivalents
    # centre and radius, the spec's 10 rows through the last (small) layer, one pass of rounding error bounds
    assert 3.0 <= ibp < 4.0
    assert crown > 10 * ibp and alpha > crown


def test_memory_chunking_and_batching_do_not_change_bounds():
    torch.manual_seed(0)
    model, shape = random_net("lenet", 5)
    x, y, threat = torch.rand(4, *shape), torch.tensor([0, 1, 2, 0]), ThreatModel("Linf", 0.05)
    full = CROWN()(model, x, y, threat).margin_lower
    tiny = CROWN(memory_mb=0.01)(model, x, y, threat).margin_lower
    one_by_one = torch.cat([CROWN()(model, x[i:i + 1], y[i:i + 1], threat).margin_lower for i in range(4)])
    assert torch.allclose(full, tiny, atol=1e-5)
    assert torch.allclose(full, one_by_one, atol=1e-5)


def test_alpha_crown_never_looser_than_crown():
    model, shape = random_net("mlp", 7)  # float64: one pass, the same proven pad for both
    model, x = model.double(), torch.rand(3, *shape, dtype=torch.float64)
    y, threat = torch.tensor([0, 1, 2]), ThreatModel("Linf", 0.1)
    crown = CROWN()(model, x, y, threat).margin_lower
    alpha = AlphaCROWN(alpha_steps=10)(model, x, y, threat).margin_lower
    assert (alpha >= crown).all() and (alpha > crown + 1e-4).any()


def test_lenet_and_mnist_cnn_are_certifiable():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 28, 28)
    for model in (mnist_lenet().eval(), mnist_cnn().eval()):
        with torch.no_grad():
            z = model(x)
        y = z.argmax(1)
        with torch.no_grad():
            z64 = model.double()(x.double())
            model.float()
        clean = z64.gather(1, y[:, None]) - z64
        threat = ThreatModel("Linf", 1e-6)
        for cert in (IBP(), CROWN()):
            result = cert(model, x, y, threat)
            assert (result.margin_lower.double() <= clean).all(), cert.name  # proven, float32 rows included
            clear = clean.scatter(1, y[:, None], 1.0).amin(1) > 1e-2
            assert clear.any() and result.certified[clear].all(), cert.name
            # the float32 pad on these nets is larger than the margins: certified rows were recomputed in float64
            assert torch.allclose(result.margin_lower[clear].double(), clean[clear], atol=1e-2), cert.name
        assert CROWN()(model, x, y, ThreatModel("Linf", 0.02)).margin_lower.shape == (2, 10)


def test_crown_margins_are_differentiable():
    model, shape = random_net("lenet", 2)
    x, y = torch.rand(2, *shape), torch.tensor([0, 1])
    margin = CROWN().bound_margins(model, x, y, ThreatModel("Linf", 0.05))
    margin.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), kernel=st.sampled_from([(2, 2), (3, 3), (2, 3)]),
       stride=st.sampled_from([(1, 1), (2, 2), (2, 1)]), pad=st.sampled_from([(0, 0), (1, 1)]))
def test_maxpool_relaxation_holds_on_its_box(seed, kernel, stride, pad):
    pad = tuple(min(p, k // 2) for p, k in zip(pad, kernel))
    g = torch.Generator().manual_seed(seed)
    # dyadic bounds and points (multiples of 1/64, float64): every sum below is exact, so no allowance
    pool = MaxPoolOp(kernel, stride, pad, (1, 1), (2, 5, 5))
    lo = torch.randint(-64, 64, (1, 2, 5, 5), generator=g).double() / 64
    hi = lo + torch.randint(0, 2, (1, 2, 5, 5), generator=g) * torch.randint(0, 128, (1, 2, 5, 5), generator=g) / 64
    relax = maxpool_relaxation(pool, lo, hi)
    pts = lo + torch.floor((hi - lo) * 64 * torch.rand(200, 2, 5, 5, generator=g, dtype=torch.float64)) / 64
    corners = torch.where(torch.rand(100, 2, 5, 5, generator=g) < 0.5, lo, hi)
    for p in (pts, corners):
        y = pool.forward(p)
        win = pool.windows(p).nan_to_num(neginf=0.0)
        lower = (relax.lower_slope * win).sum(-1)
        upper = (relax.upper_slope * win).sum(-1) + relax.upper_intercept
        assert (lower <= y).all() and (y <= upper).all()


def test_parameter_checks():
    for kwargs in ({"alpha_steps": -1}, {"alpha_steps": 1.5}, {"alpha_lr": 0}, {"memory_mb": 0}):
        with pytest.raises(UserInputError):
            CROWN(**kwargs)
    with pytest.raises(TypeError):
        CROWN(3)  # keyword-only


def test_residual_and_functional_relu_networks_are_bounded():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(x + self.b(torch.nn.functional.relu(self.a(x))))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), Block(), Block(), nn.Linear(4, 2)).eval()
    x, y, threat = torch.rand(3, 2), torch.tensor([0, 1, 0]), ThreatModel("Linf", 0.2)
    bound = CROWN()(model, x, y, threat).margin_lower.double()
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=2)), dtype=torch.float64)
    exact = copy.deepcopy(model).double()
    for c in corners:  # the exact network (float64) at the corners, pulled into the ball by 2^-20
        pt = threat.project(x.double() + 0.2 * (1 - 2.0 ** -20) * c, x.double())
        with torch.no_grad():
            z = exact(pt)
        assert (bound <= z.gather(1, y[:, None]) - z).all()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), sign=st.sampled_from([-1.0, 1.0]), eps=st.floats(0.01, 0.3))
def test_max_pool_network_against_its_closed_form_minimum(seed, sign, eps):
    # margin = sum_k c_k max(window_k) + const over disjoint windows: its exact minimum over the box is
    # sum_k c_k * (max_k l if c_k > 0 else max_k u). With c > 0 and equal widths CROWN is exact.
    # (float64, where the proven rounding pad is ~1e-15)
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)).eval().double()
    with torch.no_grad():
        net[2].weight.copy_(torch.stack([sign * torch.rand(4, generator=g), torch.zeros(4)]))
        net[2].bias.zero_()
    x = 0.3 + 0.4 * torch.rand(1, 1, 4, 4, generator=g, dtype=torch.float64)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    pool = nn.MaxPool2d(2)
    c = net[2].weight[0]
    exact = (c * torch.where(c > 0, pool(lo).flatten(), pool(hi).flatten())).sum()
    for cert in (CROWN(), AlphaCROWN(alpha_steps=3), IBP()):
        bound = cert(net, x, torch.tensor([0]), ThreatModel("Linf", eps)).margin_lower[0, 1]
        assert bound <= exact, cert.name
        if sign > 0 and eps <= 0.3:  # no clipping (x in [0.3, 0.7]): the selected entry has the largest l
            assert torch.isclose(bound, exact, rtol=0, atol=1e-12), cert.name
