"""Fast Adaptive Boundary attack (Croce & Hein 2020, arXiv 1907.02044), Linf and L2, and FAB-T.

FAB looks, per example, for the smallest perturbation that changes the class. At the iterate
``x_k`` it linearises the decision boundary of one class ``j`` (``f_j(x) = z_j - z_y``): the
hyperplane ``{z: f_j(x_k) + g_j . (z - x_k) = 0}``, ``g_j`` the input gradient. It projects both the
iterate and the original point ``x_0`` onto that hyperplane inside the input box (the smallest Lp
step, :func:`step_to_hyperplane`), giving ``d_k`` and ``d_0``, and moves to the convex combination

    x_{k+1} = clip((1 - a)(x_k + eta d_k) + a (x_0 + eta d_0)),   a = min(|d_k| / (|d_k| + |d_0|), a_max)

(eta > 1 overshoots the boundary; the ``x_0`` term keeps the iterate close to the original point).
Whenever the new iterate is misclassified it is kept if it is the closest so far and pulled back
towards ``x_0``: ``x_0 + beta (x_{k+1} - x_0)``.

- :class:`FAB` (untargeted, the paper's): ``j`` is the class whose linearised boundary is closest,
  ``|f_j| / ||g_j||_q`` (q the dual norm); this needs the gradient of every logit, one backward
  pass per class.
- :class:`FABT` (FAB-T, the targeted version AutoAttack runs, arXiv 2003.01690): one run per target
  class (the top-k other classes at the clean input), ``j`` fixed to the target, one backward pass per
  step; an example counts as broken when any run misclassifies it, as in the reference.

The budget is the reference's (``pyautoattack``: 100 iterations, 1 restart, alpha_max 0.1, eta 1.05,
beta 0.9, 9 targets; a restart after the first starts at distance eps / 2 from ``x_0``). Every
example's trajectory depends on that example alone, so rows run batched (all targets at once) and,
with ``bounded=True`` (the cascade's), an example stops costing passes the moment one of its runs
holds an adversarial point within eps: nothing later can change its "broken at eps".

``AttackResult.distance`` is the smallest adversarial norm found (inf where none); ``x_adv`` is
that point where it lies within the threat model's eps, else the clean input.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import ExampleRNG
from robustbench_lite.threat import ThreatModel

from .base import Attack, AttackResult, select_rows
from .losses import gradient_health, health_flags, input_gradient, top_other_classes

_TINY = 1e-12
#: the reference's floor on the two projection norms in the step's convex weight
_MIN_STEP = 1e-8
#: L2 coordinates whose gradient is below this move no mass (the reference's threshold)
_DEAD_WEIGHT = 1e-8
#: stream id of a restart's random start
_STREAM_START = 7


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


#: Newton steps of :func:`_level` before the rows still moving are solved by sorting their caps
_NEWTON_STEPS = 8


def _level(weight: Tensor, cap: Tensor, need: Tensor) -> Tensor:
    """Per row, the smallest ``lam >= 0`` with ``sum_i weight_i * min(lam, cap_i) >= need`` (inf if none).

    ``weight``, ``cap`` (M, D) >= 0, ``need`` (M,) >= 0. The left side ``h(lam)`` is concave, piecewise
    linear and nondecreasing, with kinks at the caps. Newton's method from ``lam = 0`` climbs it from
    below (each tangent lies above ``h``, so no step overshoots) and lands exactly on the root once it
    reaches the root's linear piece: the set of unsaturated coordinates stops changing. That takes 3-4
    steps on FAB's problems (a few elementwise passes each) where sorting every row's caps costs
    several times more; rows still moving after ``_NEWTON_STEPS`` are solved by :func:`_level_sorted`.
    """
    reachable = need < torch.linalg.vecdot(weight, cap)
    lam = torch.zeros_like(need)
    slope = None
    moving = reachable
    for _ in range(_NEWTON_STEPS + 1):
        # h and its slope at lam, each one product-sum (a difference of sums would cancel badly)
        new_slope = torch.linalg.vecdot(weight, (cap > lam[:, None]).to(cap.dtype))
        if slope is not None:
            moving = (new_slope != slope) & reachable
            if not bool(moving.any()):
                break
        slope = new_slope
        value = torch.linalg.vecdot(weight, torch.minimum(cap, lam[:, None]))
        lam = torch.where(moving, lam + (need - value).clamp_min(0) / slope.clamp_min(_TINY), lam)
    if bool(moving.any()):
        rows = moving.nonzero().flatten()
        lam[rows] = _level_sorted(weight[rows], cap[rows], need[rows])
    return torch.where(reachable, lam, torch.full_like(lam, math.inf))


def _level_sorted(weight: Tensor, cap: Tensor, need: Tensor) -> Tensor:
    """:func:`_level` by sorting: evaluate ``h`` at every kink, solve the linear piece reaching ``need``."""
    cap_sorted, order = cap.sort(dim=1)
    w_sorted = weight.gather(1, order)
    below = (w_sorted * cap_sorted).cumsum(dim=1)  # sum over caps up to and including k
    w_cum = w_sorted.cumsum(dim=1)
    total = w_cum[:, -1:]
    at_kink = below + cap_sorted * (total - w_cum).clamp_min(0)  # h at lam = cap_k
    k = torch.searchsorted(at_kink.contiguous(), need[:, None].contiguous())  # first kink reaching need
    prev = (k - 1).clamp_min(0)
    first = k == 0
    saturated = torch.where(first, torch.zeros_like(need[:, None]), below.gather(1, prev))
    free = total - torch.where(first, torch.zeros_like(need[:, None]), w_cum.gather(1, prev))
    lam = (need[:, None] - saturated) / free.clamp_min(_TINY)
    lam = torch.where(k >= cap.shape[1], torch.full_like(lam, math.inf), lam.clamp_min(0))
    return lam.squeeze(1)


def step_to_hyperplane(t: Tensor, w: Tensor, c: Tensor, box: tuple[float, float], linf: bool) -> Tensor:
    """The smallest Linf / L2 step ``d`` with ``w . d = c`` and ``t + d`` in the box, per row.

    ``t`` (S, R, D) or (R, D) points, ``w`` (R, D) normals shared by the S point sets, ``c`` (S, R) or
    (R,). Every coordinate moves in the direction ``sign(c w_i)`` that brings ``w . d`` towards ``c``:
    for Linf by ``min(lam, room_i)`` (room: the distance to the box side it moves to), for L2 by
    ``min(mu |w_i|, room_i)`` (the KKT form of the projection), with the smallest level reaching ``c``.
    Where no step inside the box reaches the hyperplane, every coordinate moves to its box side (the
    box corner closest to the hyperplane). Rows with ``c = 0`` or ``w = 0`` do not move.
    """
    lo, hi = box
    size = w.abs()
    if linf:
        sign_w, weight = torch.sign(w), size
    else:  # coordinates with a negligible gradient move no mass (the reference's threshold)
        live = (size >= _DEAD_WEIGHT).to(w.dtype)
        sign_w, weight = torch.sign(w) * live, size * size * live
    direction = sign_w * torch.sign(c)[..., None]
    room = torch.addcmul(torch.full_like(t, (hi - lo) / 2), direction, (hi + lo) / 2 - t)  # hi - t or t - lo
    cap = room if linf else room / size.clamp_min(_DEAD_WEIGHT)
    shape = cap.shape
    lam = _level(weight.expand(shape).reshape(-1, shape[-1]), cap.reshape(-1, shape[-1]), c.abs().reshape(-1))
    move = torch.minimum(cap, lam.view(*shape[:-1], 1))
    return direction * (move if linf else move * size)


def _untargeted_hyperplane(model: nn.Module, x: Tensor, y: Tensor, dual: float) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's choice: of the boundaries ``z_j - z_y = 0``, the one closest in its linearisation.

    Returns the logits (R, K), ``f`` (R,) and its gradient (R, ...): one forward, K backward passes.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    n, k = logits.shape
    grads = []
    for j in range(k):
        onehot = torch.zeros_like(logits)
        onehot[:, j] = 1
        grads.append(torch.autograd.grad(logits, x, grad_outputs=onehot, retain_graph=j < k - 1)[0])
    g = torch.stack(grads, dim=1)  # (R, K, ...)
    rows = torch.arange(n, device=x.device)
    f = logits.detach() - logits.detach()[rows, y][:, None]
    g = g - g[rows, y][:, None]
    distance = f.abs() / g.flatten(2).norm(p=dual, dim=2).clamp_min(_TINY)
    distance[rows, y] = math.inf
    j = distance.argmin(dim=1)
    return logits.detach(), f[rows, j], g[rows, j]


def _targeted_hyperplane(model: nn.Module, x: Tensor, y: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """FAB-T's boundary ``z_t - z_y = 0``: logits (R, K), ``f`` (R,), gradient (R, ...); one forward and
    one backward pass."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    f = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
    grad = input_gradient(f.sum(), x, model)
    return logits.detach(), f.detach(), grad


def fab_rows(model: nn.Module, x0: Tensor, y: Tensor, target: Tensor | None, group: Tensor, x_start: Tensor,
             threat: ThreatModel, steps: int, alpha_max: float, eta: float, beta: float,
             stop_at: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FAB on R rows from ``x_start``. Returns per row the closest adversarial point (x0 where none),
    its norm (inf where none) and the zero-/non-finite-gradient masks. With ``stop_at``, the rows of a
    ``group`` stop once one of them holds an adversarial point of norm <= stop_at."""
    n_rows = x0.shape[0]
    linf = threat.ops.name == "Linf"
    dual = 1.0 if linf else 2.0
    best_x = x0.clone()
    best_norm = torch.full((n_rows,), math.inf, device=x0.device, dtype=x0.dtype)
    zero = torch.zeros(n_rows, dtype=torch.bool, device=x0.device)
    bad = torch.zeros_like(zero)
    idx = torch.arange(n_rows, device=x0.device)
    x, x0a, ya, ta, ga = x_start.clone(), x0, y, target, group
    lo, hi = threat.box
    for i in range(steps):
        if ta is None:
            _, f, g = _untargeted_hyperplane(model, x, ya, dual)
        else:
            _, f, g = _targeted_hyperplane(model, x, ya, ta)
        z, b = gradient_health(g.flatten(1), zero_check=i == 0)
        if i == 0:
            zero[idx] = z
        if b.any():
            bad[idx[b]] = True
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        with torch.no_grad():
            w = g.flatten(1)
            points = torch.stack([x.flatten(1), x0a.flatten(1)])  # (2, R, D): the iterate and the original
            # the linearised boundary {v: w . v = w . x - f}, reached from x and from x0 inside the box
            c = torch.stack([-f, torch.linalg.vecdot(w, points[0] - points[1]) - f])
            d = step_to_hyperplane(points, w, c, (lo, hi), linf)
            size = threat.ops.norm(d.flatten(0, 1)).clamp_min(_MIN_STEP).view(2, -1)
            alpha = (size[0] / (size[0] + size[1])).clamp(0, alpha_max)
            moved = torch.add(points, d, alpha=eta)
            x = torch.lerp(moved[0], moved[1], alpha[:, None]).clamp_(lo, hi).view_as(x)
            with torch.inference_mode():  # a forward-only query: no autograd bookkeeping
                adv = model(x).argmax(dim=1) != ya  # success is misclassification, for FAB-T too
            if bool(adv.any()):
                norm = threat.ops.norm(x - x0a)
                better = adv & (norm < best_norm[idx])
                best_norm[idx[better]] = norm[better]
                best_x[idx[better]] = x[better]
                x = torch.lerp(x0a, x, torch.where(adv, beta, 1.0).to(x.dtype).view_as(_view(adv, x)))
                if stop_at is not None:
                    finished = best_norm[idx] <= stop_at
                    if bool(finished.any()):
                        keep = ~torch.isin(ga, ga[finished])
                        idx, x, x0a, ya, ga = idx[keep], x[keep], x0a[keep], ya[keep], ga[keep]
                        ta = None if ta is None else ta[keep]
                        if idx.numel() == 0:
                            break
    return best_x, best_norm, zero, bad


def fab_start(threat: ThreatModel, x0: Tensor, rng: ExampleRNG, restart: int) -> Tensor:
    """The reference's random start for restarts after the first: distance eps / 2 from x0, in the box
    (Linf: uniform noise scaled to Linf norm eps / 2; L2: Gaussian noise scaled to L2 norm eps / 2)."""
    if threat.ops.name == "Linf":
        noise = 2 * rng.uniform(x0.shape[1:], stream=_STREAM_START + 2 * restart) - 1
    else:
        noise = rng.normal(x0.shape[1:], stream=_STREAM_START + 2 * restart + 1)
    noise = noise * _view(0.5 * threat.eps / threat.ops.norm(noise).clamp_min(_TINY), noise)
    return (x0 + noise.to(x0.dtype)).clamp(*threat.box)


class FAB(Attack):
    """FAB (Croce & Hein 2020), untargeted: the closest linearised boundary at every step.

    Args:
        steps: iterations per restart (100).
        restarts: runs; the first starts at the clean input, later ones at distance eps / 2 (1).
        alpha_max: the largest weight of the original point in a step (0.1).
        eta: overshoot of the projection onto the boundary (1.05).
        beta: pull-back towards the original point after an adversarial iterate (0.9).
        bounded: stop an example as soon as an adversarial point within the threat's eps is found
            (for cascades; ``distance`` is then only an upper bound of the minimal norm).
        seed: used only when the caller passes no per-example seeds (restarts > 1).

    Shapes: x (N, C, H, W) in the box, y (N,); ``distance`` (N,) in the threat's norm.

    >>> attack = FAB(steps=100)
    >>> # result = attack(model, x, y, ThreatModel("L2", 1.0)); result.distance.median()
    """

    name = "fab"

    def __init__(self, *, steps: int = 100, restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, bounded: bool = False, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if int(steps) < 1:
            raise UserInputError(f"steps must be >= 1, got {steps}")
        if int(restarts) < 1:
            raise UserInputError(f"restarts must be >= 1, got {restarts}")
        if not 0 <= float(alpha_max) <= 1:
            raise UserInputError(f"alpha_max must be in [0, 1], got {alpha_max}")
        if not float(eta) >= 1:
            raise UserInputError(f"eta must be >= 1, got {eta}")
        if not 0 < float(beta) < 1:
            raise UserInputError(f"beta must be in (0, 1), got {beta}")
        self.steps, self.restarts = int(steps), int(restarts)
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)
        self.bounded = bool(bounded)

    def _targets(self, model: nn.Module, x: Tensor, y: Tensor, clean_logits: Tensor | None) -> Tensor | None:
        """(N, k) target classes, or None for the untargeted attack."""
        return None

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None, clean_logits: Tensor | None = None) -> AttackResult:
        """As :meth:`Attack.run`; a cascade that already has ``clean_logits`` (N, K) passes them."""
        targets = self._targets(model, x, y, clean_logits)
        k = 1 if targets is None else targets.shape[1]
        n = x.shape[0]
        distance = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
        x_best = x.clone()
        zero = torch.zeros(n, dtype=torch.bool, device=x.device)
        bad = torch.zeros_like(zero)
        for restart in range(self.restarts):
            todo = (distance > threat.eps).nonzero().flatten() if self.bounded else torch.arange(n, device=x.device)
            if todo.numel() == 0:
                break
            x0 = x[todo]
            start = x0 if restart == 0 else fab_start(threat, x0, rng.subset(todo), restart)
            rows_x, rows_norm, z, b = fab_rows(
                model, x0.repeat_interleave(k, dim=0), y[todo].repeat_interleave(k),
                None if targets is None else targets[todo].flatten(),
                torch.arange(todo.numel(), device=x.device).repeat_interleave(k), start.repeat_interleave(k, dim=0),
                threat, self.steps, self.alpha_max, self.eta, self.beta, threat.eps if self.bounded else None)
            # rows are example-major (row = example * k + j): per-example reductions are reshapes
            norm, pick = rows_norm.view(-1, k).min(dim=1)
            found = rows_x.view(todo.numel(), k, *x.shape[1:])[torch.arange(todo.numel(), device=x.device), pick]
            closer = norm < distance[todo]
            distance[todo[closer]] = norm[closer]
            x_best[todo[closer]] = found[closer]
            zero[todo] |= z.view(-1, k).any(dim=1)
            bad[todo] |= b.view(-1, k).any(dim=1)
        within = distance <= threat.eps
        x_adv = select_rows(within, x_best, x)
        return AttackResult(x_adv=x_adv, success=within, distance=distance, flags=health_flags(zero, bad))


class FABT(FAB):
    """FAB-T: untargeted robustness by FAB towards each of the top-k other classes (AutoAttack's FAB-T).

    Targets are the ``n_target_classes`` highest-scoring other classes at the clean input (capped at
    the number of classes - 1), all run as one batch; ``distance`` is the smallest over targets.
    Other arguments as :class:`FAB`.
    """

    name = "fab-t"

    def __init__(self, *, steps: int = 100, restarts: int = 1, n_target_classes: int = 9, alpha_max: float = 0.1,
                 eta: float = 1.05, beta: float = 0.9, bounded: bool = False, seed: int = 0) -> None:
        super().__init__(steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta, bounded=bounded,
                         seed=seed)
        if int(n_target_classes) < 1:
            raise UserInputError(f"n_target_classes must be >= 1, got {n_target_classes}")
        self.n_target_classes = int(n_target_classes)

    def _targets(self, model: nn.Module, x: Tensor, y: Tensor, clean_logits: Tensor | None) -> Tensor | None:
        return top_other_classes(model, x, y, self.n_target_classes, clean_logits, "FAB-T")
