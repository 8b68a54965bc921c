"""Projected gradient descent (Madry et al. 2018, arXiv 1706.06083) for Linf and L2 balls.

One loop serves every norm: the threat model supplies the random start, the steepest-ascent
direction and the projection. Defaults follow the paper's MNIST setting: 40 steps of 0.01 for
eps = 0.3 (step = eps / 30), a uniform random start, one restart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import ExampleRNG
from robustbench_lite.threat import ThreatModel

from .base import Attack, AttackResult


class PGD(Attack):
    """PGD with cross-entropy loss, random start and restarts; targeted with ``target=``.

    Args:
        steps: gradient steps per restart (40).
        rel_stepsize: step size as a fraction of eps (0.01 / 0.3, Madry's MNIST setting);
            ignored when ``abs_stepsize`` is given.
        abs_stepsize: step size in input units.
        random_start: start from a uniform point of the ball (True).
        restarts: independent restarts; an example counts as broken if any restart breaks it.
        loss: "ce" (cross-entropy) or "margin" (Carlini-Wagner margin on logits).
        seed: used only when the caller passes no per-example seeds.

    Shapes: x (N, C, H, W) in the box, y (N,) int64. Returns :class:`AttackResult`.

    >>> attack = PGD(steps=10)
    >>> # result = attack(model, x, y, ThreatModel("Linf", 0.3))
    """

    name = "pgd"
    supports_targeted = True

    def __init__(self, *, steps: int = 40, rel_stepsize: float = 0.01 / 0.3, abs_stepsize: float | None = None,
                 random_start: bool = True, restarts: int = 1, loss: str = "ce", seed: int = 0) -> None:
        super().__init__(seed=seed)
        if int(steps) < 1:
            raise UserInputError(f"steps must be >= 1, got {steps}")
        if int(restarts) < 1:
            raise UserInputError(f"restarts must be >= 1, got {restarts}")
        if not rel_stepsize > 0 or (abs_stepsize is not None and not abs_stepsize > 0):
            raise UserInputError("step size must be > 0")
        if loss not in ("ce", "margin"):
            raise UserInputError(f"unknown PGD loss {loss!r}: choose 'ce' or 'margin'")
        self.steps = int(steps)
        self.rel_stepsize = float(rel_stepsize)
        self.abs_stepsize = None if abs_stepsize is None else float(abs_stepsize)
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.loss = loss

    def _loss(self, logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
        """Summed loss to *ascend*: CE away from y, or towards the target (negated)."""
        if self.loss == "ce":
            ce = F.cross_entropy(logits, labels, reduction="sum")
            return -ce if targeted else ce
        true = logits.gather(1, labels[:, None]).squeeze(1)
        other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
        return (true - other).sum() if targeted else (other - true).sum()

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None) -> AttackResult:
        ops = threat.ops
        targeted = target is not None
        labels = target if targeted else y
        step = self.abs_stepsize if self.abs_stepsize is not None else self.rel_stepsize * threat.eps
        best = x.clone()
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        zero_grad = torch.zeros_like(done)
        for restart in range(self.restarts):
            todo = ~done
            if not todo.any():
                break
            x0, lab = x[todo], labels[todo]
            if self.random_start and threat.eps > 0:
                sub = rng.subset(todo)
                start = ops.random_in_ball(sub.uniform(x0.shape[1:], stream=2 * restart),
                                           sub.normal(x0.shape[1:], stream=2 * restart + 1), threat.eps)
                x_adv = threat.project(x0 + start, x0)
            else:
                x_adv = x0.clone()
            hit = torch.zeros(x0.shape[0], dtype=torch.bool, device=x.device)
            found = x0.clone()
            for it in range(self.steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                pred = logits.argmax(dim=1)
                new_hit = (pred == lab if targeted else pred != lab) & ~hit
                found[new_hit] = x_adv.detach()[new_hit]
                hit |= new_hit
                (grad,) = torch.autograd.grad(self._loss(logits, lab, targeted), x_adv)
                if it == 0:
                    zero_grad[todo] |= grad.flatten(1).abs().amax(dim=1) == 0
                with torch.no_grad():
                    x_adv = threat.project(x_adv + step * ops.ascent_direction(grad), x0)
            # the last iterate is scored by the caller's re-scoring pass; keep it where nothing hit
            found[~hit] = x_adv.detach()[~hit]
            with torch.no_grad():
                final_pred = model(found).argmax(dim=1) if restart < self.restarts - 1 else None
            idx = todo.nonzero().flatten()
            best[idx] = found
            if final_pred is not None:
                done[idx] = hit | (final_pred == lab if targeted else final_pred != lab)
        flags = {"zero_gradient": int(zero_grad.sum())} if zero_grad.any() else {}
        return AttackResult(x_adv=best, success=done, flags=flags)
