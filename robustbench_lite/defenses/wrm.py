"""WRM: Wasserstein distributionally robust training (Sinha, Namkoong & Duchi 2018, arXiv 1710.10571).

The Lagrangian relaxation of the worst case over a Wasserstein ball: for each example the inner
problem ``max_x' loss(x', y) - gamma * ||x' - x||_2^2`` is solved by gradient ascent, and the model
is trained on the maximiser. For gamma above the loss's smoothness constant the inner problem is
strongly concave, which is why the paper uses smooth (ELU) networks: the zoo's WRM model uses the
``mnist-cnn-elu`` architecture. The certificate ``gamma * rho + E[phi_gamma]`` is in
:func:`robustbench_lite.metrics.wrm_certificate`.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_lite.errors import checked_int, checked_number

from .base import Defense, add_option


def wrm_maximize(model: nn.Module, x: Tensor, y: Tensor, *, gamma: float, steps: int = 15,
                 step_size: float | None = None, box: tuple[float, float] = (0.0, 1.0),
                 return_grad_norm: bool = False, start: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Projected gradient ascent on ``CE(model(x'), y) - gamma * ||x' - x||_2^2`` per example.

    Starts at x (or ``start``, clipped to the box); step ``step_size / sqrt(t + 1)`` (Sinha et al.'s
    decaying schedule), default ``step_size = 1 / (2 * gamma)``, the step at which the penalty's own
    gradient step lands on the penalty's maximiser; x' stays in ``box``. The model is used as given (callers freeze it).
    x (N, ...), y (N,) -> x' (N, ...), detached; with ``return_grad_norm`` also the (N,) norm of the
    objective's projected gradient at the last iterate (0 at a constrained stationary point).
    """
    gamma = checked_number("gamma", gamma, above=0)
    steps = checked_int("steps", steps, minimum=1)
    alpha = 1.0 / (2.0 * gamma) if step_size is None else checked_number("step_size", step_size, above=0)
    lo, hi = box
    x = x.detach()
    x_adv = x.clone() if start is None else start.detach().clamp(lo, hi)
    grad = torch.zeros_like(x)
    with torch.enable_grad():
        for t in range(int(steps) + (1 if return_grad_norm else 0)):
            x_adv.requires_grad_(True)
            objective = F.cross_entropy(model(x_adv), y, reduction="sum") - gamma * (x_adv - x).pow(2).sum()
            (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = x_adv.detach()
            if t == int(steps):
                break
            x_adv = (x_adv + alpha / math.sqrt(t + 1) * grad).clamp(lo, hi)
    if not return_grad_norm:
        return x_adv
    # the part of the gradient the box does not block
    blocked = ((x_adv <= lo) & (grad < 0)) | ((x_adv >= hi) & (grad > 0))
    return x_adv, grad.masked_fill(blocked, 0.0).flatten(1).norm(dim=1)


class WRM(Defense):
    """Train on ``argmax_x' CE(x') - gamma ||x' - x||^2`` (Sinha et al. 2018, Algorithm 1).

    Args:
        gamma: Lagrange penalty; larger gamma = smaller Wasserstein ball (2.0: mean ||x' - x||_2 about
            1 on MNIST for a standard CNN).
        steps: inner ascent steps (15, the paper's T_adv).
        step_size: inner ascent step (default 1 / (2 gamma)).

    ``loss(model, x, y)``: mean cross-entropy at the maximisers, x (N, C, H, W) in [0, 1], y (N,).
    """

    name = "wrm"

    def __init__(self, *, gamma: float = 2.0, steps: int = 15, step_size: float | None = None, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.gamma = checked_number("gamma", gamma, above=0)
        self.steps = checked_int("steps", steps, minimum=1)
        self.step_size = None if step_size is None else checked_number("step_size", step_size, above=0)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The inner maximiser, computed with the model frozen (eval mode, no parameter gradients)."""
        from attacks.base import frozen

        with frozen(model):
            return wrm_maximize(model, x, y, gamma=self.gamma, steps=self.steps, step_size=self.step_size)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, **batch) -> Tensor:
        return F.cross_entropy(model(self.perturb(model, x, y)), y)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        add_option(parser, "--gamma", type=float, default=2.0, help="WRM Lagrange penalty gamma (2.0)")
        add_option(parser, "--wrm-steps", type=int, default=15, help="WRM: inner ascent steps (15)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "WRM":
        return cls(gamma=args.gamma, steps=args.wrm_steps, seed=args.seed)
