"""Soundness of IBP, CROWN and alpha-CROWN on random small networks of every supported layer.

For random networks, inputs, eps (0 included) and norms, the margins ``logit_y - logit_j`` of the
exact network (computed in float64) at random points of the ball ∩ box, at corners (Linf) and at
PGD-maximised points (targeted at each class with the margin loss) must never fall below any
certifier's lower bound, with no gap allowed: the certifiers' bounds are proven under rounding
(:mod:`certify.rounding`), so a bound that a point violates is a bug.
"""
from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attacks import PGD
from certify import CROWN, IBP, AlphaCROWN
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo.architectures import Normalize

K = 3  # classes


class Residual(nn.Module):
    """``x + f(x)``: traced by torch.fx into an addition node."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def _bn(layer: nn.Module, g: torch.Generator) -> nn.Module:
    c = layer.num_features
    layer.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
    layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    layer.weight.data.copy_(torch.randn(c, generator=g))
    layer.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return layer


def random_net(kind: str, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A small random network of the given kind and its per-example input shape."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        net = nn.Sequential(Normalize((0.4,), (0.7,)), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(),
                            nn.Sequential(nn.Linear(12, 10), nn.ReLU()), nn.Linear(10, K))
        shape = (1, 4, 4)
    elif kind == "conv":  # Normalize, conv, BN2d, max-pool with padding, avg-pool, strided conv
        net = nn.Sequential(
            Normalize((0.3, 0.6), (0.5, 0.8)),
            nn.Conv2d(2, 3, 3, padding=1), _bn(nn.BatchNorm2d(3), g), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(4, 4, 2, stride=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(4, 6), _bn(nn.BatchNorm1d(6), g), nn.ReLU(), nn.Linear(6, K))
        shape = (2, 8, 8)
    elif kind == "lenet":  # LeNet-like: conv + 2x2 max-pool blocks
        net = nn.Sequential(
            Normalize((0.13,), (0.31,)),
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, K))
        shape = (1, 8, 8)
    elif kind == "lenet-odd":  # 2x2 pools on odd sizes: the last row and column belong to no window
        net = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4, K))
        shape = (1, 9, 9)
    elif kind == "pool":  # max-pool straight on the input: bounds nearly tight, so a slack relaxation shows
        net = nn.Sequential(Normalize((0.5,), (0.5,)), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, K))
        shape = (1, 4, 4)
    else:  # residual blocks, ReLU after the sum
        net = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
            Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))),
            nn.ReLU(), nn.Flatten(),
            Residual(nn.Sequential(nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48))), nn.ReLU(),
            nn.Linear(48, K))
        shape = (1, 4, 4)
    return net.eval(), shape


KINDS = ["mlp", "conv", "lenet", "lenet-odd", "residual", "pool"]
CERTIFIERS = [IBP(), CROWN()]
ALPHA = AlphaCROWN(alpha_steps=2)  # on a third of the examples (each costs about two CROWN passes)


def exact_margins(model64: nn.Module, pts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logit_y - logit_j (N, K) of the network in float64 (its exact value up to ~1e-15)."""
    with torch.no_grad():
        z = model64(pts.double())
    return z.gather(1, y[:, None]) - z


def inside(x: torch.Tensor, pts: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Points of the ball ∩ box for certain: pulled towards x by a factor 1 - 2^-20, then projected (float64)."""
    x = x.double()
    pts = threat.project(x + (pts.double() - x) * (1 - 2.0 ** -20), x)
    assert threat.contains(pts, x, tol=0.0).all()
    return pts


def candidate_points(model64, x, y, threat, seed) -> list[torch.Tensor]:
    """Random points, corners (Linf) and targeted PGD points (float64) of the ball ∩ box, each (N, ...)."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    pts = []
    for _ in range(4):
        u, z = torch.rand(x.shape, generator=g, dtype=x.dtype), torch.randn(x.shape, generator=g, dtype=x.dtype)
        pts.append(x + threat.ops.random_in_ball(u, z, threat.eps))
    if threat.norm == "Linf":
        for _ in range(2):
            pts.append(x + threat.eps * (torch.randint(0, 2, x.shape, generator=g) * 2.0 - 1.0))
    n = x.shape[0]
    targets = torch.arange(K).repeat_interleave(n)
    pgd = PGD(steps=5, rel_stepsize=0.3, loss="margin", seed=seed)
    adv = pgd(model64, x.repeat(K, *[1] * (x.dim() - 1)), y.repeat(K), threat, target=targets).x_adv
    pts += list(adv.split(n))
    return [inside(x, p, threat) for p in pts]


def check_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, seed: int) -> None:
    """Every certifier's margin_lower is at most the network's exact margin at every candidate point."""
    model64 = copy.deepcopy(model).double()
    bounds = {c.name: c(model, x, y, threat) for c in CERTIFIERS + ([ALPHA] if seed % 3 == 0 else [])}
    for pt in candidate_points(model64, x, y, threat, seed):
        m = exact_margins(model64, pt, y)
        for name, result in bounds.items():
            gap = (result.margin_lower.double() - m).max().item()
            assert gap <= 0, f"{name} bound above a reachable margin by {gap}"
            assert not (result.certified & (m.scatter(1, y[:, None], 1.0).amin(1) <= 0)).any(), name
    if x.dtype == torch.float64 and "alpha-crown" in bounds:  # one pass, one pad: never below CROWN's
        assert (bounds["alpha-crown"].margin_lower >= bounds["crown"].margin_lower).all()


def draw(kind: str, seed: int, norm: str, eps: float, n: int, dtype: torch.dtype):
    model, shape = random_net(kind, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, *shape, generator=g)
    x[0].clamp_(0.0, 0.05)  # one example near the box's edge
    y = torch.randint(0, K, (n,), generator=g)
    return model.to(dtype), x.to(dtype), y, ThreatModel(norm, eps * (3 if norm == "L2" else 1))


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 10_000), norm=st.sampled_from(["Linf", "L2"]),
       eps=st.one_of(st.just(0.0), st.floats(1e-6, 0.3)), n=st.integers(1, 3))
def test_float64_bounds_hold_at_random_corner_and_pgd_points(kind, seed, norm, eps, n):
    """In float64 the proven rounding pad is ~1e-10: the bounds themselves are tested, with no gap."""
    check_bounds(*draw(kind, seed, norm, eps, n, torch.float64), seed)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 10_000), norm=st.sampled_from(["Linf", "L2"]),
       eps=st.one_of(st.just(0.0), st.floats(1e-6, 0.3)), n=st.integers(1, 3))
def test_float32_bounds_hold_against_the_exact_network(kind, seed, norm, eps, n):
    """float32 networks: every margin_lower, certified or not, lies below the exact (float64) margins."""
    check_bounds(*draw(kind, seed, norm, eps, n, torch.float32), seed)
