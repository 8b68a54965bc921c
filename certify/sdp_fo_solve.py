"""First-order optimisation of the SDP dual (Dathathri et al. 2020, arXiv 2010.11645, the SDP-FO method).

Two phases on the rows of one :class:`~certify.sdp_fo_problem.LiftedProblem`, each projected Adam ascent
on the dual value with a step that decays geometrically to ``decay`` times its start (by steps or by the
time budget, whichever is further along), starting from CROWN's multipliers:

1. the LP dual (no quadratic multipliers): ``const - sum |2 m|``, the box's exact minimum of the linear
   Lagrangian; one forward and one backward pass per step, no eigenvalue; the best iterate is kept;
2. the SDP dual ``const - kappa_0 - sum(kappa) + (n + 1) min(0, lambda_min(M + K))`` from the LP's best
   point (kappa the box's, so the start is the LP value), the smallest eigenvalues by block Lanczos
   warm-started from the previous step's Ritz vectors (:func:`certify.eigen.lanczos_min`). Its ascent
   direction is that of ``v^T (M + K) v`` at the Ritz vectors, explicit in the multipliers given ``J v`` (one
   more forward pass). The LAST iterate is returned: a Ritz value over-estimates, so the iterate with the
   best estimate is the one whose eigenvalue was most likely missed; with the step decayed the last one's
   estimate and its verified value agree.

Steps are preconditioned by each multiplier's natural unit: the mean CROWN multiplier of the row for the
linear constraints, that over ``h = u / 2`` for the product constraint ``z (z - s) = 0`` (per neuron), and the
box's ``|m_k|`` (plus its mean) for ``kappa``. Every value here is an estimate (float32, Ritz values):
:mod:`certify.sdp_fo_verify` turns the returned multipliers into sound bounds.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .eigen import lanczos_min
from .sdp_fo_problem import LiftedProblem, Multipliers, Parts

#: the penalty's weight on the block's other negative Ritz values (the first has weight 1)
OTHER_EIGENVALUES = 0.1


class _Adam:
    """Projected Adam ascent (Kingma & Ba 2015) with per-coordinate steps; no torch.optim (importing it pulls
    in torch._dynamo, seconds per process)."""

    def __init__(self, params: list[Tensor], steps: list[Tensor], betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.params, self.steps, self.betas = params, steps, betas
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def ascend(self, grads: list[Tensor | None], factor: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, g, m, v, step in zip(self.params, grads, self.m, self.v, self.steps):
            if g is None:
                continue
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.add_(factor * step * (m / c1) / ((v / c2).sqrt() + 1e-12))


class _Schedule:
    """Geometric decay of the step to ``decay`` by the last step or the deadline, whichever comes first."""

    def __init__(self, steps: int, deadline: float, decay: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.steps, self.deadline, self.decay, self.clock, self.start = steps, deadline, decay, clock, clock()

    def factor(self, step: int) -> float:
        span = max(1e-9, self.deadline - self.start)
        progress = max(step / max(1, self.steps), (self.clock() - self.start) / span)
        return self.decay ** min(1.0, progress)


def _project(problem: LiftedProblem, mult: Multipliers) -> None:
    with torch.no_grad():
        for t in mult.lower + mult.upper:
            t.clamp_(min=0)
        for t, u in zip(mult.relu, problem.unstable):
            t.clamp_(min=0).mul_(u)
        for t, u in zip(mult.triangle, problem.unstable):
            t.clamp_(min=0).mul_(u)
        for t, u in zip(mult.product, problem.unstable):
            t.mul_(u)
        mult.kappa.clamp_(min=0).mul_(problem.mask)
        mult.ball.clamp_(min=0)
        if problem.center is None:
            mult.ball.zero_()


def _rows(t: Tensor, like: Tensor) -> Tensor:
    """(B,) viewed to broadcast against ``like`` (B, ...)."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def _keep_best(best: Multipliers, current: Multipliers, better: Tensor) -> Multipliers:
    """Rows ``better`` (B,) of ``current`` replace those of ``best``."""
    return Multipliers(*[[torch.where(_rows(better, a), a.detach(), b) for a, b in zip(x, y)] if isinstance(x, list)
                         else torch.where(_rows(better, x), x.detach(), y)
                         for x, y in zip(_fields(current), _fields(best))])


def _fields(mult: Multipliers) -> list:
    return [mult.lower, mult.upper, mult.relu, mult.triangle, mult.product, mult.kappa, mult.kappa0, mult.ball]


@dataclass
class PhaseResult:
    """Value per row (B,) of the returned multipliers (the LP's best, the SDP's last iterate), the SDP's
    smallest Ritz vectors there (B, 1 + N), steps run and whether the deadline stopped the phase."""

    value: Tensor
    mult: Multipliers
    vector: Tensor | None
    steps: int
    timed_out: bool


def row_scale(mult: Multipliers) -> Tensor:
    """(B,) the mean magnitude of the nonzero CROWN multipliers of each row (the unit of every step)."""
    total = sum(t.abs().flatten(1).sum(1) for t in mult.relu + mult.triangle)
    count = sum((t != 0).flatten(1).sum(1) for t in mult.relu + mult.triangle)
    return (total / count.clamp(min=1)).clamp(min=1e-6)


def _linear_steps(problem: LiftedProblem, mult: Multipliers, lr: float) -> tuple[list[Tensor], list[Tensor], Tensor]:
    scale = row_scale(mult) * lr
    params = mult.lower + mult.upper + mult.relu + mult.triangle
    return params, [_rows(scale, p).expand_as(p) for p in params], scale


def lp_phase(problem: LiftedProblem, mult: Multipliers, steps: int, lr: float, decay: float, deadline: float,
             target: float = math.inf, clock: Callable[[], float] = time.perf_counter) -> PhaseResult:
    """Projected Adam on the LP dual from ``mult``; stops early once every row's value exceeds ``target``."""
    mult = mult.map(lambda t: t.detach().clone())
    params, step_sizes, _ = _linear_steps(problem, mult, lr)
    adam, schedule = _Adam(params, step_sizes), _Schedule(steps, deadline, decay, clock)
    best_value = torch.full((problem.rows,), -math.inf, dtype=problem.dtype)
    best, done, timed_out = mult.map(lambda t: t.clone()), 0, False
    for step in range(steps + 1):
        if clock() > deadline:
            timed_out = True
            break
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            parts = problem.parts(mult)
            with torch.no_grad():
                two_m = problem.linear_coefficient(parts)
                w = -torch.sign(two_m) * problem.mask
                t_pre, t_logits = problem.jvp(w)
            value = problem.box_value(parts, t_pre, t_logits, w)
            grads = torch.autograd.grad(value.sum(), params, allow_unused=True) if step < steps else None
        better = value.detach() > best_value
        best_value = torch.where(better, value.detach(), best_value)
        best = _keep_best(best, mult, better)
        done = step
        if grads is None or bool((best_value > target).all()):
            break
        adam.ascend(list(grads), schedule.factor(step))
        _project(problem, mult)
    best.kappa, best.kappa0 = torch.zeros_like(best.kappa), torch.zeros_like(best.kappa0)
    return PhaseResult(best_value, best, None, done, timed_out)


def _repeat(parts: Parts, p: int) -> Parts:
    rep = lambda t: t.repeat_interleave(p, 0)  # noqa: E731
    return Parts(rep(parts.const), [rep(t) for t in parts.cot_pre], rep(parts.cot_logits), rep(parts.direct),
                 rep(parts.diag), [rep(t) for t in parts.coupling])


def _sdp_steps(problem: LiftedProblem, mult: Multipliers, lr: float) -> tuple[list[Tensor], list[Tensor]]:
    """Parameters and their preconditioned step sizes (see the module docstring)."""
    params, steps, scale = _linear_steps(problem, mult, lr)
    for t, h, u in zip(mult.product, problem.h, problem.unstable):
        mean_h = h.flatten(1).sum(1) / u.flatten(1).sum(1).clamp(min=1)
        params.append(t)
        steps.append(_rows(scale, h) / torch.maximum(h, _rows(0.1 * mean_h, h)).clamp(min=1e-12) * u)
    box = mult.kappa
    params += [mult.kappa, mult.kappa0, mult.ball]
    steps += [(lr * (box + box.sum(1, keepdim=True) / problem.n[:, None].clamp(min=1)) + scale[:, None]) * problem.mask,
              lr * mult.kappa0 / problem.n.clamp(min=1).sqrt() + scale, scale]
    return params, steps


class SDPDual:
    """Projected Adam on the SDP dual from LP multipliers (kappa made the box's), resumable.

    Block Lanczos (``block`` vectors, ``iters`` block steps) is warm-started from the previous step's Ritz
    vectors. The ascent direction is that of ``(n + 1) (min(0, theta_1) + w sum_i>1 min(0, theta_i))`` with
    ``w = OTHER_EIGENVALUES``: the block's other negative Ritz values are pushed up too (a smaller, still
    valid penalty; equal at a PSD point), which avoids zigzagging between the nearly equal smallest
    eigenvalues of a nearly optimal dual. :meth:`advance` runs until the step budget, the deadline, or every
    row's estimate staying above a target for ``patience`` steps; it can be called again (an estimate that
    did not verify: optimise on).
    """

    def __init__(self, problem: LiftedProblem, mult: Multipliers, steps: int, lr: float, decay: float, iters: int,
                 block: int, deadline: float, generator: torch.Generator,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.problem, self.steps, self.iters, self.generator = problem, steps, iters, generator
        self.mult = problem.box_kappa(mult.map(lambda t: t.detach().clone()))
        self.params, step_sizes = _sdp_steps(problem, self.mult, lr)
        self.clock = clock
        self.adam, self.schedule = _Adam(self.params, step_sizes), _Schedule(steps, deadline, decay, clock)
        self.p = max(1, min(block, int(problem.n.min().item()) + 1))
        self.rep = problem.select(torch.arange(problem.rows).repeat_interleave(self.p))
        self.mask = torch.cat([torch.ones_like(problem.mask[:, :1]), problem.mask], 1)
        self.vectors = torch.zeros(problem.rows, self.p, self.mask.shape[1], dtype=problem.dtype)
        self.weights = torch.full((self.p,), OTHER_EIGENVALUES, dtype=problem.dtype)
        self.weights[0] = 1.0
        self.step = 0
        self.timed_out = False
        self.result = PhaseResult(torch.full((problem.rows,), -math.inf, dtype=problem.dtype),
                                  self.mult.map(lambda t: t.clone()), self.vectors[:, 0].clone(), 0, False)

    @property
    def done(self) -> bool:
        return self.step > self.steps or self.timed_out

    def advance(self, deadline: float, target: float = math.inf, patience: int = 20,
                until: int | None = None) -> PhaseResult:
        """Steps until done, step ``until``, or every estimate above ``target`` for ``patience`` steps in a row;
        the result holds the last iterate (see the module docstring)."""
        problem, rep, p = self.problem, self.rep, self.p
        above = 0
        while not self.done and (until is None or self.step <= until):
            if self.clock() > deadline and self.step > 0:
                self.timed_out = True
                break
            with torch.no_grad():
                parts = _repeat(problem.parts(self.mult), p)
                two_m = rep.linear_coefficient(parts)
                kappa0, kappa = self.mult.kappa0.repeat_interleave(p), self.mult.kappa.repeat_interleave(p, 0)
                _, self.vectors = lanczos_min(lambda v: rep.matvec(parts, two_m, kappa0, kappa, v), self.vectors,
                                              self.mask, self.iters, self.generator)
                flat = self.vectors.reshape(-1, self.mask.shape[1])
                t_pre, t_logits = rep.jvp(flat[:, 1:])
            for t in self.params:
                t.requires_grad_(True)
            with torch.enable_grad():
                own = problem.parts(self.mult)
                quad = rep.quadratic(_repeat(own, p), self.mult.kappa0.repeat_interleave(p),
                                     self.mult.kappa.repeat_interleave(p, 0), flat, t_pre, t_logits).reshape(-1, p)
                base = own.const - self.mult.kappa0 - self.mult.kappa.sum(1)
                estimate = base + (problem.n + 1) * quad[:, 0].clamp(max=0)
                ascent = base + (problem.n + 1) * (quad.clamp(max=0) * self.weights).sum(1)
                last = self.step >= self.steps
                grads = None if last else torch.autograd.grad(ascent.sum(), self.params, allow_unused=True)
            self.result = PhaseResult(estimate.detach(), self.mult.map(lambda t: t.detach().clone()),
                                      self.vectors[:, 0].clone(), self.step, False)
            self.step += 1
            above = above + 1 if bool((estimate > target).all()) else 0
            if grads is None or above >= patience:
                break
            self.adam.ascend(list(grads), self.schedule.factor(self.step))
            _project(problem, self.mult)
        self.result.timed_out = self.timed_out
        return self.result


__all__ = ["PhaseResult", "SDPDual", "lp_phase", "row_scale"]
