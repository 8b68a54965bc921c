"""Auto-PGD (Croce & Hein 2020, arXiv 2003.01690): step-size-free PGD with momentum, Linf and L2.

Each example keeps its own step size (starting at 2 * eps), its best-loss point and its gradient
there. At checkpoints (the first after 22% of the iterations, then intervals shrinking by 3% down to
6%) the step size is halved where (1) at most ``rho`` of the steps since the last checkpoint
increased the loss, or (2) the step was not halved at the last checkpoint and the best loss has not
improved since; those examples restart from their best point. The update is
``z = P(x + eta * dir(grad))``, ``x' = P(x + a (z - x) + (1 - a)(x - x_prev))`` with a = 0.75
(a = 1 on the first step). All examples run batched; an example leaves the batch the moment one of its
iterates is adversarial, so broken points cost nothing more.

:class:`APGD` attacks with cross-entropy (or DLR, or the targeted losses when given ``target``);
:class:`APGDT` is untargeted APGD on the targeted DLR loss over the top-k other classes (k = 9, or the
number of other classes when there are fewer), all targets batched together.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import ExampleRNG
from robustbench_lite.threat import ThreatModel

from .base import Attack, AttackResult, margin_loss, select_rows
from .losses import (
    AttackLoss,
    dlr_loss,
    get_loss,
    gradient_health,
    health_flags,
    loss_and_grad,
    top_other_classes,
)
from .pgd import goal_reached

_TINY = 1e-12


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def sphere_start(threat: ThreatModel, x0: Tensor, rng: ExampleRNG, stream: int) -> Tensor:
    """A random point at distance eps (the reference's start: noise rescaled to the sphere), in the box."""
    noise = threat.ops.random_in_ball(rng.uniform(x0.shape[1:], stream=2 * stream),
                                      rng.normal(x0.shape[1:], stream=2 * stream + 1), 1.0)
    noise = noise * _view(threat.eps / threat.ops.norm(noise).clamp_min(_TINY), noise)
    return threat.project(x0 + noise, x0)


def checkpoint_schedule(steps: int) -> tuple[int, int, int]:
    """(first interval, interval decrement, minimal interval) as in the reference implementation."""
    return max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)


@dataclass
class _Rows:
    """APGD's per-row state (Croce & Hein 2020, Algorithm 1), compacted to the rows still running:
    ``idx`` their positions in the batch; ``x0`` clean points; ``x``, ``x_old`` the last two iterates;
    ``x_best`` / ``grad_best`` / ``loss_best`` the best point so far; ``step`` the step size; ``n_incr`` the
    loss increases since the last checkpoint; ``loss_best_last`` / ``reduced_last`` the last checkpoint's
    best loss and halving. ``group``: rows of one example's restarts or targets leave together."""

    idx: Tensor
    x0: Tensor
    y: Tensor
    loss_target: Tensor | None
    goal_target: Tensor | None
    group: Tensor
    x: Tensor
    x_old: Tensor
    grad: Tensor
    x_best: Tensor
    grad_best: Tensor
    loss_best: Tensor
    loss_prev: Tensor
    loss_best_last: Tensor
    step: Tensor
    n_incr: Tensor
    reduced_last: Tensor

    def keep(self, rows: Tensor) -> None:
        """Keep only ``rows`` (a bool mask) of every per-row tensor."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, value[rows])


def apgd_rows(model: nn.Module, x0: Tensor, y: Tensor, loss_target: Tensor | None, goal_target: Tensor | None,
              group: Tensor, x_start: Tensor, threat: ThreatModel, loss: AttackLoss, steps: int, rho: float,
              eot_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One APGD run on R rows; rows sharing a ``group`` id all stop when one of them succeeds.

    Returns, per row: the point (first adversarial iterate if successful, else the best-loss point),
    success, zero gradient at the start, non-finite gradient at any step.
    """
    n_rows = x0.shape[0]
    out_x = x_start.clone()
    out_hit = torch.zeros(n_rows, dtype=torch.bool, device=x0.device)
    zero = torch.zeros_like(out_hit)
    bad = torch.zeros_like(out_hit)

    logits, loss_now, grad = loss_and_grad(model, x_start, y, loss_target, loss, eot_iter)
    now = goal_reached(logits.argmax(dim=1), y, goal_target)
    z, b = gradient_health(grad)
    zero |= z & ~now
    bad |= b
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0) if b.any() else grad
    s = _Rows(  # per-row state, kept compacted to the rows still running
        idx=torch.arange(n_rows, device=x0.device), x0=x0, y=y, loss_target=loss_target, goal_target=goal_target,
        group=group, x=x_start, x_old=x_start, grad=grad, x_best=x_start, grad_best=grad,
        loss_best=loss_now, loss_prev=loss_now, loss_best_last=loss_now,
        step=torch.full((n_rows,), 2.0 * threat.eps, device=x0.device),
        n_incr=torch.zeros(n_rows, device=x0.device),
        reduced_last=torch.zeros(n_rows, dtype=torch.bool, device=x0.device),
    )

    def leave(now: Tensor) -> None:
        if not now.any():
            return
        out_x[s.idx[now]] = s.x[now]
        out_hit[s.idx[now]] = True
        s.keep(~torch.isin(s.group, s.group[now]))

    leave(now)
    interval, decrement, min_interval = checkpoint_schedule(steps)
    since_check = 0
    for i in range(steps):
        if s.idx.numel() == 0:
            break
        with torch.no_grad():
            x, x0r = s.x, s.x0
            momentum = x - s.x_old
            a = 0.75 if i > 0 else 1.0
            z = threat.project(x + _view(s.step, x) * threat.ops.ascent_direction(s.grad), x0r)
            s.x_old = x
            s.x = threat.project(x + a * (z - x) + (1 - a) * momentum, x0r)
        logits, loss_now, grad = loss_and_grad(model, s.x, s.y, s.loss_target, loss, eot_iter)
        _, b = gradient_health(grad, zero_check=False)
        if b.any():
            bad[s.idx[b]] = True
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        s.grad = grad
        improved = loss_now > s.loss_best
        s.x_best = select_rows(improved, s.x, s.x_best)
        s.grad_best = select_rows(improved, grad, s.grad_best)
        s.loss_best = torch.where(improved, loss_now, s.loss_best)
        s.n_incr = s.n_incr + (loss_now > s.loss_prev).float()
        s.loss_prev = loss_now
        leave(goal_reached(logits.argmax(dim=1), s.y, s.goal_target))
        since_check += 1
        if since_check == interval:
            oscillating = s.n_incr <= interval * rho
            stalled = ~s.reduced_last & (s.loss_best_last >= s.loss_best)
            halve = oscillating | stalled
            s.reduced_last = halve
            s.loss_best_last = s.loss_best
            s.step = torch.where(halve, s.step / 2, s.step)
            s.x = select_rows(halve, s.x_best, s.x)
            s.grad = select_rows(halve, s.grad_best, s.grad)
            s.n_incr = torch.zeros_like(s.n_incr)
            since_check = 0
            interval = max(interval - decrement, min_interval)
    out_x[s.idx] = s.x_best
    return out_x, out_hit, zero, bad


class APGD(Attack):
    """APGD (Croce & Hein 2020) with CE or DLR loss; with ``target=`` it ascends the targeted loss.

    Args:
        steps: iterations per restart (100, the reference's).
        restarts: random restarts on the examples not yet broken (1).
        loss: "ce", "dlr" or "margin".
        rho: checkpoint condition (1): the fraction of loss-increasing steps below which eta halves (0.75).
        eot_iter: gradients averaged per step (EOT, Athalye et al. 2018) for randomized models (1).
        seed: used only when the caller passes no per-example seeds.

    Shapes: x (N, C, H, W) in the box, y (N,) int64, target (N,) or None. Returns :class:`AttackResult`.

    >>> attack = APGD(loss="ce")
    >>> # result = attack(model, x, y, ThreatModel("Linf", 0.3))
    """

    name = "apgd"
    supports_targeted = True

    def __init__(self, *, steps: int = 100, restarts: int = 1, loss: str = "ce", rho: float = 0.75,
                 eot_iter: int = 1, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if int(steps) < 1:
            raise UserInputError(f"steps must be >= 1, got {steps}")
        if int(restarts) < 1:
            raise UserInputError(f"restarts must be >= 1, got {restarts}")
        if not 0 < float(rho) <= 1:
            raise UserInputError(f"rho must be in (0, 1], got {rho}")
        if int(eot_iter) < 1:
            raise UserInputError(f"eot_iter must be >= 1, got {eot_iter}")
        get_loss(loss)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.loss = loss
        self.rho = float(rho)
        self.eot_iter = int(eot_iter)

    def _restarts(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
                  loss: AttackLoss, targets: Tensor | None, goal_is_target: bool) -> AttackResult:
        """Restarts over the unbroken examples; ``targets`` (N, k) runs k batched targeted rows each."""
        best = x.clone()
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        zero, bad = torch.zeros_like(done), torch.zeros_like(done)
        k = 1 if targets is None else targets.shape[1]
        for restart in range(self.restarts):
            todo = (~done).nonzero().flatten()
            if todo.numel() == 0:
                break
            sub = rng.subset(todo)
            x0 = x[todo]
            starts = [sphere_start(threat, x0, sub, stream=restart * 64 + j) for j in range(k)]
            rows = torch.stack(starts, dim=1).flatten(0, 1)  # (n * k, ...), row = example * k + j
            row_x0 = x0.repeat_interleave(k, dim=0)
            row_y = y[todo].repeat_interleave(k)
            row_t = None if targets is None else targets[todo].flatten()
            group = torch.arange(todo.numel(), device=x.device).repeat_interleave(k)
            out_x, out_hit, z, b = apgd_rows(model, row_x0, row_y, row_t, row_t if goal_is_target else None,
                                             group, rows, threat, loss, self.steps, self.rho, self.eot_iter)
            # Rows are laid out example-major (row = example * k + j), so per-example reductions are
            # plain reshapes. (Scattering rows with duplicate indices - index_put_ with accumulate on
            # bools, or "successful rows written last" - is a data race under intra-op threads.)
            n = todo.numel()
            hit = out_hit.view(n, k)
            pick = hit.to(torch.int8).argmax(dim=1)  # the first successful target, else ...
            missed = ~hit.any(dim=1)
            if k > 1 and bool(missed.any()):  # ... the target whose best point has the highest margin
                rows_missed = missed.repeat_interleave(k)
                with torch.no_grad():
                    margin = margin_loss(model(out_x[rows_missed]), row_y[rows_missed]).view(-1, k)
                pick[missed] = margin.argmax(dim=1)
            best[todo] = out_x.view(n, k, *out_x.shape[1:])[torch.arange(n, device=x.device), pick]
            done[todo] = hit.any(dim=1)
            zero[todo] |= z.view(n, k).any(dim=1)
            bad[todo] |= b.view(n, k).any(dim=1)
        return AttackResult(x_adv=best, success=done, flags=health_flags(zero, bad))

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None) -> AttackResult:
        targets = None if target is None else target[:, None]
        return self._restarts(model, x, y, threat, rng, get_loss(self.loss), targets, goal_is_target=True)


class APGDT(APGD):
    """APGD-T: untargeted attack by APGD on the targeted DLR loss towards each of the top-k classes.

    Targets are the ``n_target_classes`` highest-scoring other classes at the clean input (capped at
    the number of classes - 1); all of them run as one batch, and an example stops as soon as any
    target run misclassifies it. Other arguments as :class:`APGD`.
    """

    name = "apgd-t"
    supports_targeted = False

    def __init__(self, *, steps: int = 100, restarts: int = 1, n_target_classes: int = 9, rho: float = 0.75,
                 eot_iter: int = 1, seed: int = 0) -> None:
        super().__init__(steps=steps, restarts=restarts, loss="dlr", rho=rho, eot_iter=eot_iter, seed=seed)
        if int(n_target_classes) < 1:
            raise UserInputError(f"n_target_classes must be >= 1, got {n_target_classes}")
        self.n_target_classes = int(n_target_classes)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None, clean_logits: Tensor | None = None) -> AttackResult:
        """As :meth:`Attack.run`; a cascade that already has ``clean_logits`` (N, K) passes them."""
        targets = top_other_classes(model, x, y, self.n_target_classes, clean_logits, "APGD-T")
        return self._restarts(model, x, y, threat, rng, dlr_loss, targets, goal_is_target=False)
