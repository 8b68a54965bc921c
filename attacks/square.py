"""Square Attack (Andriushchenko, Croce, Flammarion & Hein 2020, arXiv 1912.00049), Linf and L2.

A score-based black-box attack: random search that, at every query, changes the perturbation on one
square window (the side follows the paper's p-schedule) and keeps the change when the loss improves.
Untargeted it minimises the margin ``z_y - max_{j != y} z_j``; targeted the cross-entropy of the
target (the paper's choices, as in the reference implementation of AutoAttack).

Differences from the reference (``pyautoattack/square.py``), none of which change the algorithm:
- per-example randomness (window position, signs, the L2 pattern's orientation) comes from
  :class:`~robustbench_lite.seeding.ExampleRNG`, drawn in blocks of iterations, so an example's
  result depends only on its own seed, never on the batch it is in;
- a Linf window that would leave the point unchanged takes the opposite sign (the original code
  resamples until the window changes), so no query is spent on an unchanged point;
- every query is counted and the budget ``n_queries`` bounds the queries of each example, the clean
  check and the initial point included;
- ``rescale_schedule`` (True, the paper's) stretches the p-schedule to ``n_queries``; AutoAttack's
  standard suite runs Square with it off, and so does our cascade;
- ``run(..., start=)`` optionally adds a warm start (one more query of the same budget): an example
  begins from whichever of it and the paper's initial point has the higher loss.

Speed: the Linf window is a mask planned with the block's noise (window rows and columns, +-2 eps
per channel), so a query costs a handful of elementwise passes next to the model's forward; the
search runs under ``torch.inference_mode``.

Shapes: x (N, C, H, W) (or (N, D) / (N, C, L), treated as images of height 1), y (N,) int64.
"""
from __future__ import annotations

import functools
import logging
import math

import torch
from torch import Tensor

from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import ExampleRNG
from robustbench_lite.threat import ThreatModel

from .base import Attack, AttackResult, QueryOracle, select_rows
from .losses import ce_loss, cw_margin_loss

log = logging.getLogger(__name__)

#: (upper bound of the rescaled iteration, divisor of p_init): the paper's halving schedule of p
P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))
#: iterations whose per-example random numbers are drawn at once (one generator seed per block)
NOISE_BLOCK = 128
_STREAM_INIT = 1
_STREAM_BLOCKS = 1 << 20
_TINY = 1e-12


def p_fraction(iteration: int, n_queries: int, p_init: float, rescale: bool = True) -> float:
    """Fraction of pixels the window covers at ``iteration``.

    The paper's schedule is written for 10,000 queries; ``rescale`` stretches it to ``n_queries`` (the
    paper's code and pyautoattack's default). AutoAttack's ``standard`` version runs its Square with
    ``resc_schedule=False``: the 10,000-query schedule read at the raw iteration, cut at ``n_queries``.
    """
    scaled = int(iteration / n_queries * 10000) if rescale else int(iteration)
    for bound, divisor in P_SCHEDULE:
        if scaled <= bound:
            return p_init / divisor
    return p_init / 512


def as_images(x: Tensor) -> Tensor:
    """View a batch as (N, C, H, W): (N, D) -> (N, 1, 1, D), (N, C, L) -> (N, C, 1, L)."""
    if x.dim() == 2:
        return x.view(x.shape[0], 1, 1, x.shape[1])
    if x.dim() == 3:
        return x.view(x.shape[0], x.shape[1], 1, x.shape[2])
    if x.dim() == 4:
        return x
    raise UserInputError(
        f"black-box attacks take inputs of shape (N, D), (N, C, L) or (N, C, H, W); got {tuple(x.shape)}")


def settle(threat: ThreatModel, x_adv: Tensor, x: Tensor, rounds: int = 4) -> Tensor:
    """Project into the threat set until the projection leaves the point unchanged.

    ``Attack.__call__`` projects what an attack returns; a point that is already a fixed point of
    the projection comes back bit for bit, so the prediction a black-box attack saw is kept.
    """
    out = threat.project(x_adv, x)
    for _ in range(rounds):
        again = threat.project(out, x)
        if torch.equal(again, out):
            break
        out = again
    return out


def signs(u: Tensor) -> Tensor:
    """+-1 from U[0, 1) noise."""
    return torch.where(u < 0.5, -1.0, 1.0).to(u.dtype)


def positions(u: Tensor, size: int, s: int | Tensor) -> Tensor:
    """Window corners in {0, ..., size - s} from U[0, 1) noise, int64; ``s`` an int or a tensor of sides
    broadcasting with ``u``. (Noise is >= 0, so only the top needs the clamp, against float rounding.)"""
    return (u * (size - s + 1)).long().clamp_(max=size - s)


def window_index(corner_h: Tensor, corner_w: Tensor, s: int) -> tuple[Tensor, Tensor, Tensor]:
    """Advanced-indexing tensors of the s x s windows at per-example corners (for get/set_window)."""
    steps = torch.arange(s, device=corner_h.device)
    batch = torch.arange(corner_h.shape[0], device=corner_h.device)[:, None, None]
    return batch, (corner_h[:, None] + steps)[:, :, None], (corner_w[:, None] + steps)[:, None, :]


def get_window(t: Tensor, index: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """(n, C, s, s) windows of a (n, C, H, W) tensor at the :func:`window_index` corners."""
    batch, rows, cols = index
    return t[batch, :, rows, cols].permute(0, 3, 1, 2)


def set_window(t: Tensor, index: tuple[Tensor, Tensor, Tensor], values: Tensor) -> None:
    """Write (n, C, s, s) ``values`` into ``t`` at the :func:`window_index` corners, in place."""
    batch, rows, cols = index
    t[batch, :, rows, cols] = values.permute(0, 2, 3, 1)


def _nested_squares(a: int, b: int, device: torch.device) -> Tensor:
    """(a, b) pattern, unit L2 norm: sum over centred squares of Chebyshev radius k >= r of 1 / (k + 1)^2."""
    if a == 0:
        return torch.zeros(0, b, device=device)
    rings = max(a // 2 + 1, b // 2 + 1)
    radius = torch.maximum((torch.arange(a, device=device) - a // 2).abs()[:, None],
                           (torch.arange(b, device=device) - b // 2).abs()[None, :])
    weights = 1.0 / (torch.arange(rings, device=device, dtype=torch.float32) + 1) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[r] = sum_{k >= r} weights[k]
    pattern = tail[radius]
    return pattern / pattern.norm().clamp_min(_TINY)


@functools.lru_cache(maxsize=256)
def l2_pattern(s: int, device: torch.device) -> Tensor:
    """The paper's L2 update pattern (Sec. 3.2): two opposite unit-norm nested-square halves, unit L2 norm.

    Cached per (s, device): callers must not modify the returned tensor in place."""
    top = _nested_squares(s // 2, s, device)
    bottom = -_nested_squares(s - s // 2, s, device)
    pattern = torch.cat([top, bottom], dim=0)
    return pattern / pattern.norm().clamp_min(_TINY)


class Square(Attack):
    """Square Attack, score-based black-box, Linf and L2, untargeted and targeted (``target=``).

    Args:
        n_queries: query budget per example (5000, AutoAttack's standard); the clean check and the
            initial point count; an example stops as soon as it is misclassified (or hits the target).
        p_init: initial fraction of pixels a window covers (0.8, AutoAttack's standard for Linf and L2).
        loss: "margin" or "ce"; None takes the paper's choice (margin untargeted, CE targeted).
        rescale_schedule: stretch the p-schedule to ``n_queries`` (True, the paper's); AutoAttack's
            standard suite uses False (see :func:`p_fraction`).
        seed: used only when the caller passes no per-example seeds.

    >>> attack = Square(n_queries=1000)
    >>> # result = attack(model, x, y, ThreatModel("Linf", 0.3)); result.queries
    """

    name = "square"
    black_box = True
    supports_targeted = True

    def __init__(self, *, n_queries: int = 5000, p_init: float = 0.8, loss: str | None = None,
                 rescale_schedule: bool = True, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if isinstance(n_queries, bool) or int(n_queries) != n_queries or n_queries < 1:
            raise UserInputError(f"n_queries must be a positive integer, got {n_queries!r}")
        if not 0 < float(p_init) <= 1:
            raise UserInputError(f"p_init must be in (0, 1], got {p_init!r}")
        if loss not in (None, "margin", "ce"):
            raise UserInputError(f"unknown Square loss {loss!r}: choose 'margin' or 'ce'")
        self.n_queries = int(n_queries)
        self.p_init = float(p_init)
        self.loss = loss
        self.rescale_schedule = bool(rescale_schedule)

    # --- scoring ----------------------------------------------------------------------------
    def _objective(self, scores: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """Loss to ascend, (n,)."""
        name = self.loss or ("ce" if target is not None else "margin")
        return (ce_loss if name == "ce" else cw_margin_loss)(scores, y, target)

    @staticmethod
    def _fooled(scores: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        pred = scores.argmax(dim=1)
        return pred == target if target is not None else pred != y

    # --- the attack -------------------------------------------------------------------------
    def run(self, model: QueryOracle, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None, start: Tensor | None = None) -> AttackResult:
        """As :meth:`Attack.run`. ``start`` (N, ...) in the threat set, optional: a warm start (e.g. the
        best point of earlier white-box attacks); each example then begins from whichever of ``start``
        and the paper's initial point has the higher loss, one query more out of the same budget."""
        oracle = model
        images = as_images(x)
        n = images.shape[0]

        def query(points: Tensor) -> Tensor:
            return oracle(points.reshape(points.shape[0], *x.shape[1:]))

        scores = query(images)
        if scores.dim() != 2 or scores.shape[1] < 2:
            raise UserInputError(f"Square needs scores of shape (N, classes >= 2); got {tuple(scores.shape)}")
        used = torch.ones(n, dtype=torch.int64, device=x.device)
        done = self._fooled(scores, y, target)
        best = images.clone()
        n_starts = 1 if start is None else 2
        if threat.eps == 0 or self.n_queries < 1 + n_starts or bool(done.all()):
            return AttackResult(x_adv=best.view_as(x), success=done, flags=self._flags(done, used))

        todo = (~done).nonzero().flatten()
        goal = None if target is None else target[todo]
        first = self._initial_point(images[todo], threat, rng.subset(todo))
        scores = query(first)
        best_loss = self._objective(scores, y[todo], goal)
        fooled = self._fooled(scores, y[todo], goal)
        if start is not None:
            warm = as_images(start)[todo]
            scores = query(warm)
            warm_loss = self._objective(scores, y[todo], goal)
            warm_fooled = self._fooled(scores, y[todo], goal)
            take = (warm_fooled & ~fooled) | (~fooled & (warm_loss > best_loss))
            first = torch.where(take[:, None, None, None], warm, first)
            best_loss, fooled = torch.where(take, warm_loss, best_loss), fooled | warm_fooled
        used[todo] += n_starts
        best[todo] = first
        done[todo] = fooled
        iterations = max(self.n_queries - 1 - n_starts, 0)
        keep = ~fooled
        with torch.inference_mode():  # scores only: no autograd bookkeeping on 5000 forwards
            current = self._search(query, images[todo[keep]], first[keep], best_loss[keep], y[todo[keep]],
                                   None if goal is None else goal[keep], threat, rng.subset(todo[keep]),
                                   iterations, used, done, todo[keep])
        best[todo[keep]] = current
        log.debug("square: %d/%d examples fooled, %d queries", int(done.sum()), n, int(used.sum()))
        x_adv = settle(threat, best, images)
        return AttackResult(x_adv=x_adv.view_as(x), success=done, flags=self._flags(done, used))

    def _search(self, query, clean: Tensor, current: Tensor, current_loss: Tensor, labels: Tensor,
                goal: Tensor | None, threat: ThreatModel, rng: ExampleRNG, iterations: int, used: Tensor,
                done: Tensor, idx: Tensor) -> Tensor:
        """The random search on the compact set of examples still standing (rows of ``idx``).

        Updates ``used`` and ``done`` in place; returns the final point of every row of ``idx`` (the
        fooling point for the rows that succeeded).
        """
        out = current.clone()
        linf = threat.ops.name == "Linf"
        width = 2 + clean.shape[1] if linf else 5 + clean.shape[1]
        if linf:  # the box-clipped corners of the ball, once, instead of per window
            lo, hi = threat.box
            extra = ((clean - threat.eps).clamp_min(lo), (clean + threat.eps).clamp_max(hi))
        else:
            extra = (clean,)
        rows = torch.arange(idx.numel(), device=clean.device)
        plan: tuple[Tensor, ...] = ()
        p_at = [p_fraction(it, self.n_queries, self.p_init, self.rescale_schedule) for it in range(iterations)]
        for it in range(iterations):
            if rows.numel() == 0:
                break
            if it % NOISE_BLOCK == 0:  # this block's random numbers, and what can be derived from them at once
                noise = rng.subset(rows).uniform((NOISE_BLOCK, width), stream=_STREAM_BLOCKS + it // NOISE_BLOCK)
                plan = (self._linf_plan(noise, p_at[it:it + NOISE_BLOCK], clean.shape, threat.eps) if linf
                        else (noise,))
            k = it % NOISE_BLOCK
            candidate = (self._linf_step(extra, current, plan, k) if linf
                         else self._l2_step(extra[0], current, plan[0][:, k], p_at[it], threat))
            scores = query(candidate)
            loss = self._objective(scores, labels, goal)
            fooled = self._fooled(scores, labels, goal)
            better = fooled | (loss > current_loss)
            current = select_rows(better, candidate, current)
            current_loss = torch.where(better, loss, current_loss)
            if bool(fooled.any()):
                out[rows[fooled]] = current[fooled]
                done[idx[rows[fooled]]] = True
                used[idx[rows[fooled]]] += it + 1
                stay = ~fooled
                rows, current, labels = rows[stay], current[stay], labels[stay]
                current_loss = current_loss[stay]
                extra, plan = tuple(t[stay] for t in extra), tuple(t[stay] for t in plan)
                goal = None if goal is None else goal[stay]
        out[rows] = current
        used[idx[rows]] += iterations
        return out

    def _flags(self, done: Tensor, used: Tensor) -> dict[str, float]:
        if not bool(done.any()):
            return {}
        return {"median_queries_successful": float(used[done].float().median())}

    # --- initial points (Sec. 3.1 and 3.2 of the paper) -------------------------------------
    def _initial_point(self, images: Tensor, threat: ThreatModel, rng: ExampleRNG) -> Tensor:
        n, c, h, w = images.shape
        eps, (lo, hi) = threat.eps, threat.box
        if threat.ops.name == "Linf":
            stripes = signs(rng.uniform((c, 1, w), stream=_STREAM_INIT))  # vertical stripes of +-eps
            return (images + eps * stripes).clamp(lo, hi)
        s = max(h // 5, 1)
        tiles_h, tiles_w = h // s, w // s
        off_h, off_w = (h - tiles_h * s) // 2, (w - tiles_w * s) // 2
        u = rng.uniform((tiles_h, tiles_w, c + 1), stream=_STREAM_INIT)
        base = l2_pattern(s, images.device)
        delta = torch.zeros_like(images)
        for i in range(tiles_h):
            for j in range(tiles_w):
                flip = u[:, i, j, c] < 0.5  # the pattern's orientation, per example
                tile = torch.where(flip[:, None, None], base.t(), base)[:, None]
                rows, cols = slice(off_h + i * s, off_h + (i + 1) * s), slice(off_w + j * s, off_w + (j + 1) * s)
                delta[:, :, rows, cols] += tile * signs(u[:, i, j, :c])[:, :, None, None]
        delta = delta / threat.ops.norm(delta).clamp_min(_TINY).view(-1, 1, 1, 1)
        return (images + eps * delta).clamp(lo, hi)

    # --- one random-search step --------------------------------------------------------------
    @staticmethod
    def _linf_plan(u: Tensor, p_at: list[float], shape: torch.Size, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """A block of Linf windows from (n, B, 2 + C) noise, for B iterations at once: the rows (n, B, H)
        and columns (n, B, W) each window covers and the per-channel side of the ball it moves to
        (n, B, C), 1 for ``x + eps`` and 0 for ``x - eps``; all 0/1 floats (see :meth:`_linf_step`)."""
        _, c, h, w = shape
        sides = [min(max(int(round(math.sqrt(p * h * w))), 1), h, w) for p in p_at]
        side = torch.tensor(sides + [1] * (u.shape[1] - len(sides)), device=u.device)

        def covered(noise: Tensor, size: int) -> Tensor:
            corner = positions(noise, size, side)[:, :, None]
            along = torch.arange(size, device=u.device)
            return ((along >= corner) & (along < corner + side[:, None])).to(u.dtype)

        return covered(u[:, :, 0], h), covered(u[:, :, 1], w), (signs(u[:, :, 2:2 + c]) > 0).to(u.dtype)

    @staticmethod
    def _linf_step(bounds: tuple[Tensor, Tensor], best: Tensor, plan: tuple[Tensor, Tensor, Tensor],
                   k: int) -> Tensor:
        """Set one s x s window to a corner of the ball: +-eps per channel (Alg. 1, Linf sampler).

        ``bounds`` are the box-clipped ``x -+ eps``; ``plan`` is :meth:`_linf_plan`'s block, ``k`` the
        iteration in it. Where the window would leave the point unchanged it takes the opposite corner
        (the original resamples until the window changes: the opposite corner always does). Written in
        float arithmetic on 0/1 masks, every select an exact ``lerp`` with weight 0 or 1: a few passes
        over small images, no gather or scatter, and no boolean-mask ``where`` (several times slower
        on CPU than a float pass). Values are finite, so ``lerp(a, b, 0) == a``, ``lerp(a, b, 1) == b``.
        """
        lower, upper = bounds
        in_rows, in_cols, up = plan
        window = (in_rows[:, k, :, None] * in_cols[:, k, None, :])[:, None]  # (n, 1, h, w)
        side = up[:, k]  # (n, C)
        target = torch.lerp(lower, upper, side[:, :, None, None])
        changes = ((target - best).abs_() * window).flatten(1).sum(dim=1) > 0
        side = torch.lerp(1 - side, side, changes[:, None].to(side.dtype))
        target = torch.lerp(lower, upper, side[:, :, None, None])
        return torch.lerp(best, target, window)

    @staticmethod
    def _l2_step(images: Tensor, best: Tensor, u: Tensor, p: float, threat: ThreatModel) -> Tensor:
        """Move L2 mass from window 2 into window 1 with the paper's pattern (Alg. 3, L2 sampler).

        ``images`` are the clean points, ``u`` this iteration's (n, 5 + C) noise, ``p`` its window fraction."""
        n, c, h, w = images.shape
        eps, (lo, hi) = threat.eps, threat.box
        s = max(int(round(math.sqrt(p * h * w))), 3)
        s = min(s + (s % 2 == 0), h, w)
        h1, w1 = positions(u[:, 0], h, s), positions(u[:, 1], w, s)
        h2, w2 = positions(u[:, 2], h, s), positions(u[:, 3], w, s)
        delta = best - images
        first, second = window_index(h1, w1, s), window_index(h2, w2, s)
        window = get_window(delta, first)
        window_norm = window.flatten(2).norm(dim=2)[:, :, None, None]
        image_norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        both = images.new_zeros(n, 1, h, w)  # the union of the two windows
        ones = images.new_ones(n, 1, s, s)
        set_window(both, first, ones)
        set_window(both, second, ones)
        both_norm = (delta * both).flatten(2).norm(dim=2)[:, :, None, None]

        base = l2_pattern(s, images.device)
        pattern = torch.where((u[:, 4] < 0.5)[:, None, None], base.t(), base)[:, None]
        new = pattern * signs(u[:, 5:5 + c])[:, :, None, None] + window / (window_norm + _TINY)
        budget = ((eps ** 2 - image_norm ** 2).clamp_min(0) / c + both_norm ** 2).sqrt()
        new = new / (new.flatten(2).norm(dim=2)[:, :, None, None] + _TINY) * budget
        set_window(delta, second, torch.zeros_like(new))
        set_window(delta, first, new)
        scale = eps / delta.flatten(1).norm(dim=1).clamp_min(_TINY)
        return (images + delta * scale.view(-1, 1, 1, 1)).clamp(lo, hi)
