"""Fast Minimum-Norm attack (Pintor et al. 2021, arXiv 2102.12827), Linf and L2, untargeted and targeted.

Per example FMN looks for the smallest perturbation that changes the class. It keeps a radius
``eps_k`` and takes normalized gradient steps on the logit margin inside the ball of that radius:
while the iterate is adversarial the radius shrinks to ``min(eps_k (1 - gamma), best norm)``; once an
adversarial was seen but the iterate is not, it grows by ``(1 + gamma)``; before any was seen it is the
linear estimate of the distance to the boundary, ``||delta|| + |margin| / ||grad||_*`` (dual norm),
inflated by ``(1 + gamma)`` so that on a (locally) linear model the iterate crosses the boundary
instead of landing on it, where the tie keeps it from ever counting as adversarial.
Step size alpha and gamma are cosine-annealed (alpha from 1 to 0.01, gamma from 0.05 to 0.001).

``AttackResult.distance`` holds the smallest adversarial norm found (inf where none); ``x_adv`` is that
point when it lies within the threat model's eps, so ``success`` is "broken at eps".
:class:`FMNT` batches the top-k other classes as targets (the role FAB-T plays in AutoAttack).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import ExampleRNG
from robustbench_lite.threat import ThreatModel

from .base import Attack, AttackResult
from .losses import cw_margin_loss, gradient_health, health_flags, loss_and_grad, top_other_classes
from .pgd import goal_reached

_TINY = 1e-12


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _cosine(start: float, end: float, step: int, steps: int) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * step / steps)) / 2


def fmn_rows(model: nn.Module, x0: Tensor, y: Tensor, target: Tensor | None, group: Tensor, threat: ThreatModel,
             steps: int, alpha_init: float, alpha_final: float, gamma_init: float, gamma_final: float,
             stop_at: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FMN on R rows. Returns per row the best adversarial point (x0 where none), its norm (inf where
    none), and the zero-/non-finite-gradient masks. With ``stop_at`` a group stops once any of its rows
    has an adversarial point of norm <= stop_at."""
    n_rows = x0.shape[0]
    lo, hi = threat.box
    ops = threat.ops
    dual = 1.0 if math.isinf(ops.p) else ops.p / (ops.p - 1)
    best_x = x0.clone()
    best_norm = torch.full((n_rows,), math.inf, device=x0.device, dtype=x0.dtype)
    zero = torch.zeros(n_rows, dtype=torch.bool, device=x0.device)
    bad = torch.zeros_like(zero)
    worst = ops.norm(torch.maximum(x0 - lo, hi - x0))
    idx = torch.arange(n_rows, device=x0.device)
    delta = torch.zeros_like(x0)
    radius = torch.full((n_rows,), math.inf, device=x0.device, dtype=x0.dtype)
    seen = torch.zeros_like(zero)
    x0a, ya, ta, ga = x0, y, target, group
    for i in range(steps):
        alpha = _cosine(alpha_init, alpha_final, i, steps)
        gamma = _cosine(gamma_init, gamma_final, i, steps)
        x_adv = x0a + delta
        logits, margin, grad = loss_and_grad(model, x_adv, ya, ta, cw_margin_loss)
        is_adv = goal_reached(logits.argmax(dim=1), ya, ta)
        z, b = gradient_health(grad, zero_check=i == 0)
        if i == 0:
            zero[idx] = z & ~is_adv
        if b.any():
            bad[idx[b]] = True
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        norm = ops.norm(x_adv - x0a)
        better = is_adv & (norm < best_norm[idx])
        if better.any():
            best_norm[idx[better]] = norm[better]
            best_x[idx[better]] = x_adv[better]
        seen |= is_adv
        if stop_at is not None:
            done_rows = best_norm[idx] <= stop_at
            if done_rows.any():
                keep = ~torch.isin(ga, ga[done_rows])
                idx, x0a, ya, ga, delta, grad = idx[keep], x0a[keep], ya[keep], ga[keep], delta[keep], grad[keep]
                ta = None if ta is None else ta[keep]
                margin, is_adv, seen, radius, norm = margin[keep], is_adv[keep], seen[keep], radius[keep], norm[keep]
                if idx.numel() == 0:
                    break
        to_boundary = margin.abs() / grad.flatten(1).norm(p=dual, dim=1).clamp_min(_TINY)
        radius = torch.where(is_adv, torch.minimum(radius * (1 - gamma), best_norm[idx]),
                             torch.where(seen, radius * (1 + gamma), (norm + to_boundary) * (1 + gamma)))
        radius = torch.minimum(radius, worst[idx])
        step = grad / _view(grad.flatten(1).norm(p=2, dim=1).clamp_min(_TINY), grad)
        delta = ops.clip(delta + alpha * step, radius)
        delta = (x0a + delta).clamp(lo, hi) - x0a
    return best_x, best_norm, zero, bad


class FMN(Attack):
    """Fast Minimum-Norm attack (Pintor et al. 2021); targeted with ``target=``.

    Args:
        steps: iterations (100).
        alpha_init, alpha_final: step size, cosine-annealed (1.0 -> 0.01).
        gamma_init, gamma_final: radius adaptation factor, cosine-annealed (0.05 -> 0.001).
        bounded: stop an example as soon as an adversarial point within the threat's eps is found
            (for cascades; ``distance`` is then only an upper bound of the minimal norm).
        seed: unused (FMN is deterministic); kept for the common signature.

    Shapes: x (N, C, H, W), y (N,), target (N,) or None; ``distance`` (N,) in the threat's norm.

    >>> attack = FMN(steps=100)
    >>> # result.distance.median() is the median minimal perturbation
    """

    name = "fmn"
    supports_targeted = True

    def __init__(self, *, steps: int = 100, alpha_init: float = 1.0, alpha_final: float = 0.01,
                 gamma_init: float = 0.05, gamma_final: float = 0.001, bounded: bool = False, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if int(steps) < 1:
            raise UserInputError(f"steps must be >= 1, got {steps}")
        if not (alpha_init > 0 and alpha_final > 0):
            raise UserInputError("alpha_init and alpha_final must be > 0")
        if not (0 < gamma_final <= gamma_init < 1):
            raise UserInputError("need 0 < gamma_final <= gamma_init < 1")
        self.steps = int(steps)
        self.alpha_init, self.alpha_final = float(alpha_init), float(alpha_final)
        self.gamma_init, self.gamma_final = float(gamma_init), float(gamma_final)
        self.bounded = bool(bounded)

    def _targets(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                 clean_logits: Tensor | None) -> Tensor | None:
        """(N, k) targets, or None for the untargeted attack."""
        return None if target is None else target[:, None]

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None, clean_logits: Tensor | None = None) -> AttackResult:
        targets = self._targets(model, x, y, target, clean_logits)
        k = 1 if targets is None else targets.shape[1]
        group = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
        rows_x, rows_norm, z, b = fmn_rows(
            model, x.repeat_interleave(k, dim=0), y.repeat_interleave(k), None if targets is None else targets.flatten(),
            group, threat, self.steps, self.alpha_init, self.alpha_final, self.gamma_init, self.gamma_final,
            threat.eps if self.bounded else None)
        rows_norm = rows_norm.view(-1, k)
        distance, best_row = rows_norm.min(dim=1)
        x_best = rows_x.view(x.shape[0], k, *x.shape[1:])[torch.arange(x.shape[0], device=x.device), best_row]
        within = distance <= threat.eps
        x_adv = torch.where(_view(within, x), x_best, x)
        flags = health_flags(z.view(-1, k).any(dim=1), b.view(-1, k).any(dim=1))
        return AttackResult(x_adv=x_adv, success=within, distance=distance, flags=flags)


class FMNT(FMN):
    """Untargeted robustness by targeted FMN towards each of the top-k other classes, batched.

    Targets are the ``n_target_classes`` highest-scoring other classes at the clean input (capped at
    the number of classes - 1); ``distance`` is the smallest over targets. Other arguments as :class:`FMN`.
    """

    name = "fmn-t"
    supports_targeted = False

    def __init__(self, *, steps: int = 100, n_target_classes: int = 9, alpha_init: float = 1.0,
                 alpha_final: float = 0.01, gamma_init: float = 0.05, gamma_final: float = 0.001,
                 bounded: bool = False, seed: int = 0) -> None:
        super().__init__(steps=steps, alpha_init=alpha_init, alpha_final=alpha_final, gamma_init=gamma_init,
                         gamma_final=gamma_final, bounded=bounded, seed=seed)
        if int(n_target_classes) < 1:
            raise UserInputError(f"n_target_classes must be >= 1, got {n_target_classes}")
        self.n_target_classes = int(n_target_classes)

    def _targets(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                 clean_logits: Tensor | None) -> Tensor | None:
        return top_other_classes(model, x, y, self.n_target_classes, clean_logits, "FMN-T")
