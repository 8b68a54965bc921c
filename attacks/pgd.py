"""Projected gradient descent (Madry et al. 2018, arXiv 1706.06083) for Linf and L2 balls.

One loop serves every norm: the threat model supplies the random start, the steepest-ascent
direction and the projection. Defaults follow the paper's MNIST setting: 40 steps of 0.01 for
eps = 0.3 (step = eps / 30), a uniform random start, one restart. FGSM (:mod:`attacks.fgsm`) is this
loop with one step. Examples stop costing passes as soon as they are broken.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import ExampleRNG
from robustbench_lite.threat import ThreatModel

from .base import Attack, AttackResult
from .losses import get_loss, gradient_health, health_flags, loss_and_grad


def goal_reached(pred: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """(N,) bool: the prediction is the target (targeted) or is not the label (untargeted)."""
    return pred == target if target is not None else pred != y


class PGD(Attack):
    """PGD with a chosen loss, random start, restarts and EOT; targeted with ``target=``.

    Args:
        steps: gradient steps per restart (40).
        rel_stepsize: step size as a fraction of eps (0.01 / 0.3, Madry's MNIST setting);
            ignored when ``abs_stepsize`` is given.
        abs_stepsize: step size in input units.
        random_start: start from a uniform point of the ball (True).
        restarts: independent restarts; an example counts as broken if any restart breaks it.
        loss: "ce" (cross-entropy), "margin" (Carlini-Wagner margin) or "dlr" (Croce & Hein 2020).
        eot_iter: gradients averaged per step (expectation over transformation, Athalye et al. 2018);
            1 for deterministic models.
        early_stop: stop an example at its first successful iterate and return that iterate (True);
            False runs every step and returns the last iterate, the max-loss point Madry et al.'s
            adversarial training trains on.
        seed: used only when the caller passes no per-example seeds.

    Shapes: x (N, C, H, W) in the box, y (N,) int64, target (N,) or None. Returns
    :class:`AttackResult`; ``flags`` counts examples whose gradient was zero at the start
    (``zero_gradient``) or ever not finite (``nan_gradient``).

    >>> attack = PGD(steps=10)
    >>> # result = attack(model, x, y, ThreatModel("Linf", 0.3))
    """

    name = "pgd"
    supports_targeted = True

    def __init__(self, *, steps: int = 40, rel_stepsize: float = 0.01 / 0.3, abs_stepsize: float | None = None,
                 random_start: bool = True, restarts: int = 1, loss: str = "ce", eot_iter: int = 1,
                 early_stop: bool = True, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if int(steps) < 1:
            raise UserInputError(f"steps must be >= 1, got {steps}")
        if int(restarts) < 1:
            raise UserInputError(f"restarts must be >= 1, got {restarts}")
        if int(eot_iter) < 1:
            raise UserInputError(f"eot_iter must be >= 1, got {eot_iter}")
        if not rel_stepsize > 0 or (abs_stepsize is not None and not abs_stepsize > 0):
            raise UserInputError("step size must be > 0")
        get_loss(loss)
        self.steps = int(steps)
        self.rel_stepsize = float(rel_stepsize)
        self.abs_stepsize = None if abs_stepsize is None else float(abs_stepsize)
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.loss = loss
        self.eot_iter = int(eot_iter)
        self.early_stop = bool(early_stop)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None) -> AttackResult:
        step = self.abs_stepsize if self.abs_stepsize is not None else self.rel_stepsize * threat.eps
        best = x.clone()
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        zero = torch.zeros_like(done)
        bad = torch.zeros_like(done)
        for restart in range(self.restarts):
            todo = (~done).nonzero().flatten()
            if todo.numel() == 0:
                break
            x0 = x[todo]
            if self.random_start and threat.eps > 0:
                sub = rng.subset(todo)
                start = threat.ops.random_in_ball(sub.uniform(x0.shape[1:], stream=2 * restart),
                                                  sub.normal(x0.shape[1:], stream=2 * restart + 1), threat.eps)
                x_start = threat.project(x0 + start, x0)
            else:
                x_start = x0.clone()
            tgt = None if target is None else target[todo]
            found, hit, z, b = self._ascend(model, x0, y[todo], tgt, x_start, threat, step,
                                            score_last=restart < self.restarts - 1)
            best[todo] = found
            done[todo] = hit
            bad[todo] |= b
            if restart == 0:
                zero[todo] = z
        return AttackResult(x_adv=best, success=done, flags=health_flags(zero, bad))

    def _ascend(self, model: nn.Module, x0: Tensor, y: Tensor, target: Tensor | None, x_adv: Tensor,
                threat: ThreatModel, step: float, score_last: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``steps`` ascent steps from ``x_adv``; rows leave the batch once they reach the goal.

        Returns the first successful iterate per row (else the last iterate), the success mask,
        and the zero-gradient (first step) and non-finite-gradient masks.
        """
        loss = get_loss(self.loss)
        n = x0.shape[0]
        found = x_adv.clone()
        hit = torch.zeros(n, dtype=torch.bool, device=x0.device)
        zero = torch.zeros_like(hit)
        bad = torch.zeros_like(hit)
        idx = torch.arange(n, device=x0.device)
        xa, x0a, ya, ta = x_adv, x0, y, target
        for it in range(self.steps):
            logits, _, grad = loss_and_grad(model, xa, ya, ta, loss, self.eot_iter)
            now = goal_reached(logits.argmax(dim=1), ya, ta)
            z, b = gradient_health(grad, zero_check=it == 0)
            bad[idx] |= b
            if it == 0:
                zero[idx] = z & ~now
            if b.any():
                grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            if self.early_stop and now.any():
                found[idx[now]] = xa[now]
                hit[idx[now]] = True
                keep = ~now
                idx, xa, x0a, ya, grad = idx[keep], xa[keep], x0a[keep], ya[keep], grad[keep]
                ta = None if ta is None else ta[keep]
                if idx.numel() == 0:
                    return found, hit, zero, bad
            with torch.no_grad():
                xa = threat.project(xa + step * threat.ops.ascent_direction(grad), x0a)
        found[idx] = xa
        if score_last:  # the final restart's last iterate is scored by Attack.__call__
            with torch.no_grad():
                hit[idx] = goal_reached(model(xa).argmax(dim=1), ya, ta)
        return found, hit, zero, bad
