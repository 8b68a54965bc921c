"""A small model trained on scikit-learn's 8x8 digits inside the tests (about a second on one core)."""
from __future__ import annotations

import functools

import torch
from sklearn.datasets import load_digits
from torch import nn

from robustbench_lite.zoo.architectures import digits_mlp


@functools.lru_cache(maxsize=None)
def digits(classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, 1, 8, 8) in [0, 1], y (N,) int64, only the first ``classes`` digits."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    keep = y < classes
    return x[keep], y[keep]


@functools.lru_cache(maxsize=None)
def trained_mlp(classes: int = 10, steps: int = 300, seed: int = 0) -> nn.Module:
    """digits_mlp trained full-batch with Adam on all but the last 200 examples."""
    x, y = digits(classes)
    torch.manual_seed(seed)
    with torch.enable_grad():
        return _train(digits_mlp(num_classes=classes), x, y, steps)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[:-200]), y[:-200]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def held_out(classes: int = 10, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` held-out examples the model classifies correctly."""
    x, y = digits(classes)
    x, y = x[-200:], y[-200:]
    model = trained_mlp(classes)
    with torch.no_grad():
        ok = model(x).argmax(dim=1) == y
    return x[ok][:n], y[ok][:n]
