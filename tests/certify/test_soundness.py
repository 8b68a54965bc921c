"""Soundness of IBP, CROWN and alpha-CROWN on random small networks of every supported layer.

For random networks, inputs, eps and norms, the margins ``logit_y - logit_j`` at random points of
the ball ∩ box, at corners (Linf) and at PGD-maximised points (targeted at each class j with the
margin loss) must never fall below any certifier's lower bound. A bound that a point violates is a
bug, never a tolerance to tune: the tolerance below only absorbs float32 rounding.
"""
from __future__ import annotations

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
CERTIFIERS = [IBP(), CROWN(), AlphaCROWN(alpha_steps=4)]


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        z = model(x)
    return z.gather(1, y[:, None]) - z


def candidate_points(model, x, y, threat, seed) -> list[torch.Tensor]:
    """Random points, corners (Linf) and targeted PGD points of the ball ∩ box, each (N, ...)."""
    g = torch.Generator().manual_seed(seed)
    pts = []
    for _ in range(8):
        u, z = torch.rand(x.shape, generator=g), torch.randn(x.shape, generator=g)
        pts.append(threat.project(x + threat.ops.random_in_ball(u, z, threat.eps), x))
    if threat.norm == "Linf":
        for _ in range(4):
            sign = torch.randint(0, 2, x.shape, generator=g) * 2.0 - 1.0
            pts.append(threat.project(x + threat.eps * sign, x))
    pgd = PGD(steps=15, rel_stepsize=0.2, loss="margin", seed=seed)
    for j in range(K):
        pts.append(pgd(model, x, y, threat, target=torch.full_like(y, j)).x_adv)
    return pts


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 10_000), norm=st.sampled_from(["Linf", "L2"]),
       eps=st.floats(0.0, 0.3), n=st.integers(1, 3))
def test_bounds_hold_at_random_corner_and_pgd_points(kind, seed, norm, eps, n):
    model, shape = random_net(kind, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, *shape, generator=g)
    x[0].clamp_(0.0, 0.05)  # one example near the box's edge
    y = torch.randint(0, K, (n,), generator=g)
    threat = ThreatModel(norm, eps * (3 if norm == "L2" else 1))
    bounds = {c.name: c(model, x, y, threat).margin_lower.detach() for c in CERTIFIERS}
    for pt in candidate_points(model, x, y, threat, seed):
        assert threat.contains(pt, x).all()
        m = margins(model, pt, y)
        for name, lower in bounds.items():
            gap = (lower - m).max().item()
            assert gap <= 1e-4 * (1 + m.abs().max().item()), f"{name} bound above a reachable margin by {gap}"
    assert (bounds["alpha-crown"] >= bounds["crown"] - 1e-5).all()
