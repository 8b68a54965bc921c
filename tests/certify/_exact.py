"""Ground truth for the LP/SDP/MIP certifier tests: tiny ReLU networks on 2-D inputs.

``exact_min_margins`` enumerates every activation pattern: on each one the network is affine, so
the minimum of a margin over the pattern's polytope intersected with the box is an LP (HiGHS).
Every returned value is the network's own margin at a point of the threat set, so it is >= the true
minimum; a sound lower bound must lie below it with no slack.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linprog
from torch import nn

from certify.convex import lower_to_dense


def tiny_net(widths: tuple[int, ...], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def hand_net(sign: float = -1.0) -> nn.Sequential:
    """The 2-2-2 case: z = relu(x1 + x2 - 1, x1 - x2), logits = (sign * (z1 + z2) + 1.5 - sign / 2, 0).

    sign = -1: margin 2 - z1 - z2, true minimum 1 on [0,1]^2, while the triangles add up to
    z1 + z2 <= x1 + 1/2, so the LP bound is 0.5. sign = +1: margin 1 + z1 + z2, every relaxation
    is exact (min 1 where both ReLUs are off).
    """
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([-1.0, 0.0]))
        net[2].weight.copy_(torch.tensor([[sign, sign], [0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([1.5 - sign / 2, 0.0]))
    return net


def random_net(widths: tuple[int, ...], seed: int, gain: float = 3.0) -> nn.Sequential:
    """A dense ReLU net whose weights (gain / sqrt(fan-in) Gaussians) and unit-Gaussian biases give
    several decision regions inside [0, 1]^2, so balls of radius ~0.1 cross decision boundaries."""
    g = torch.Generator().manual_seed(seed)
    net = tiny_net(widths, seed)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * gain / layer.in_features ** 0.5)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return net


def conv_net(seed: int) -> nn.Sequential:
    """A conv net on (1, 1, 2) inputs (two pixels), so brute force over 2 input dims still applies."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, (1, 2)), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    return net


def margins_at(model: nn.Module, pts: np.ndarray, y: int, input_shape: tuple[int, ...] = (2,)) -> np.ndarray:
    """logit_y - logit_j (P, K) of the model itself (float64 copy) at flattened points (P, 2)."""
    with torch.no_grad():
        x = torch.as_tensor(pts, dtype=torch.float64).reshape(-1, *input_shape)
        logits = model.double()(x).numpy()
        model.float()
    return logits[:, [y]] - logits


def exact_min_margins(model: nn.Module, x0: np.ndarray, eps: float, y: int,
                      input_shape: tuple[int, ...] = (2,)) -> np.ndarray:
    """Achievable minima (K,) of logit_y - logit_j over the Linf ball of x0 (2,) in [0, 1]^2."""
    net = lower_to_dense(model, input_shape)
    box = list(zip(np.maximum(x0 - eps, 0), np.minimum(x0 + eps, 1)))
    k = net.num_classes
    best = margins_at(model, x0[None], y, input_shape)[0]
    for pattern in itertools.product([0.0, 1.0], repeat=sum(net.hidden)):
        a, c = np.eye(2), np.zeros(2)  # current layer's value = a x + c
        rows, rhs, used = [], [], 0
        for w, b in zip(net.weights[:-1], net.biases[:-1]):
            sa, sc = w @ a, w @ c + b
            on = np.array(pattern[used:used + len(b)])
            used += len(b)
            sign = np.where(on > 0, -1.0, 1.0)  # active: s >= 0 -> -s <= 0; inactive: s <= 0
            rows.append(sign[:, None] * sa)
            rhs.append(-sign * sc)
            a, c = on[:, None] * sa, on * sc
        la, lc = net.weights[-1] @ a, net.weights[-1] @ c + net.biases[-1]
        for j in range(k):
            if j == y:
                continue
            res = linprog(la[y] - la[j], A_ub=np.vstack(rows), b_ub=np.concatenate(rhs), bounds=box, method="highs")
            if res.status == 0:
                pt = np.clip(res.x, [b[0] for b in box], [b[1] for b in box])
                best[j] = min(best[j], margins_at(model, pt[None], y, input_shape)[0, j])
    return best


def grid_min_margins(model: nn.Module, x0: np.ndarray, eps: float, y: int, norm: str, n: int = 201) -> np.ndarray:
    """Minima (K,) of the margins over a dense grid of the ball (Linf or L2) in [0, 1]^2."""
    t = np.linspace(-eps, eps, n)
    pts = np.stack(np.meshgrid(t, t), -1).reshape(-1, 2)
    if norm == "L2":
        pts = pts[np.linalg.norm(pts, axis=1) <= eps]
    pts = np.clip(x0 + pts, 0, 1)
    return margins_at(model, pts, y).min(axis=0)
