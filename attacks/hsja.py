"""HopSkipJump (Chen, Jordan & Wainwright 2020, arXiv 1904.02144): decision-based, Linf and L2.

The attack sees only predicted labels. From an adversarial starting point it alternates (Alg. 2):
a binary search to the decision boundary, a Monte-Carlo estimate of the boundary's normal from the
signs of ``num_evals = init_num_evals * sqrt(t)`` random probes around the boundary point (eq. 9,
with the baseline of eq. 10), and a geometric step-size search along that direction (sign of it for
Linf). Constants follow the paper and its reference code: ``theta = gamma / d^(3/2)`` (L2) or
``gamma / d^2`` (Linf), probe radius ``delta = 0.1 * box width`` at t = 1 and ``gamma * dist / d``
after it, first step ``dist / sqrt(t)``.

As an attack in a threat set it stops an example as soon as its boundary point lies within eps
(``early_stop``); ``distance`` reports the smallest adversarial distance it reached (inf where no
adversarial start was found). Every query counts against ``n_queries`` per example; one query is
kept back to re-check a point the final projection into the threat set moved (a point just beyond
eps that is still adversarial once projected counts as a success at its projected distance).

The random start tries uniform noise, binary noise and strong Gaussian noise around the input in
turn (the reference draws uniform noise only, which fails whenever noise is classified as the
true class); a targeted attack needs noise the model puts in the target class, and reports failure
for the examples where ``init_tries`` draws find none.

Shapes: x (N, ...) in the box, y (N,) int64; labels-only oracle (see :class:`attacks.base.QueryOracle`).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import ExampleRNG
from robustbench_lite.threat import ThreatModel

from .base import Attack, AttackResult, QueryOracle
from .square import settle

log = logging.getLogger(__name__)

#: probe tensors are built in chunks of at most this many numbers
MAX_PROBE_ELEMENTS = 1 << 23
#: halvings of the step size before giving up on an iteration's move
MAX_HALVINGS = 25
#: relative tolerance of the blend search of the initialization (the reference's 0.001)
INIT_TOLERANCE = 1e-3
#: points up to this factor beyond eps are re-checked after projection (see ``_finish``)
NEAR_MISS = 1.05
_STREAM_INIT = 1
_STREAM_PROBES = 1 << 20
_TINY = 1e-12


class _Decisions:
    """Labels-only queries with a per-example budget; ``reserve`` queries are kept for the end."""

    def __init__(self, oracle: QueryOracle, y: Tensor, target: Tensor | None, budget: int, reserve: int) -> None:
        self.oracle, self.y, self.target = oracle, y, target
        self.budget, self.reserve = budget, reserve
        self.used = torch.zeros_like(y)

    def left(self, rows: Tensor, final: bool = False) -> Tensor:
        """Queries each example in ``rows`` may still make (the reserve only when ``final``)."""
        return self.budget - (0 if final else self.reserve) - self.used[rows]

    def __call__(self, points: Tensor, rows: Tensor) -> Tensor:
        """Whether each point is adversarial for its example ``rows[i]``: (m,) bool."""
        labels = self.oracle(points)
        self.used.index_add_(0, rows, torch.ones_like(rows))
        return labels == self.target[rows] if self.target is not None else labels != self.y[rows]


def _rows_view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class HopSkipJump(Attack):
    """HopSkipJumpAttack, decision-based black-box, Linf and L2, untargeted and targeted.

    Args:
        n_queries: query budget per example (5000), the clean check and the start included.
        init_num_evals: probes of the first gradient estimate (100); iteration t uses
            ``init_num_evals * sqrt(t)``, at most ``max_num_evals`` (10000).
        gamma: boundary tolerance constant of the paper (1.0).
        init_tries: random starting points tried per example (100).
        early_stop: stop an example once a point within eps is found (True); False keeps
            minimising the distance until the budget is spent.
        seed: used only when the caller passes no per-example seeds.

    Returns an :class:`AttackResult` whose ``distance`` (N,) is the adversarial distance reached
    (0 for inputs already misclassified, inf where no adversarial start was found).

    >>> attack = HopSkipJump(n_queries=2000)
    >>> # result = attack(model, x, y, ThreatModel("L2", 1.5)); result.distance.median()
    """

    name = "hsja"
    black_box = True
    labels_only = True
    supports_targeted = True

    def __init__(self, *, n_queries: int = 5000, init_num_evals: int = 100, max_num_evals: int = 10000,
                 gamma: float = 1.0, init_tries: int = 100, early_stop: bool = True, seed: int = 0) -> None:
        super().__init__(seed=seed)
        for label, value in (("n_queries", n_queries), ("init_num_evals", init_num_evals),
                             ("max_num_evals", max_num_evals), ("init_tries", init_tries)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise UserInputError(f"{label} must be a positive integer, got {value!r}")
        if not (math.isfinite(float(gamma)) and gamma > 0):
            raise UserInputError(f"gamma must be a positive number, got {gamma!r}")
        self.n_queries = int(n_queries)
        self.init_num_evals = int(init_num_evals)
        self.max_num_evals = max(int(max_num_evals), int(init_num_evals))
        self.gamma = float(gamma)
        self.init_tries = int(init_tries)
        self.early_stop = bool(early_stop)

    def run(self, model: QueryOracle, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None) -> AttackResult:
        n, d = x.shape[0], x[0].numel()
        linf = threat.ops.name == "Linf"
        theta = self.gamma / d ** 2 if linf else self.gamma / d ** 1.5
        search_cost = 2 + math.ceil(math.log2(1 / theta))  # one step query and one binary search
        decide = _Decisions(model, y, target, self.n_queries, reserve=1)

        best = x.clone()
        best_dist = torch.full((n,), math.inf, device=x.device)
        clean_adv = decide(x, torch.arange(n, device=x.device))
        best_dist[clean_adv] = 0.0
        rows = (~clean_adv).nonzero().flatten()
        start, found = self._initialize(x[rows], rows, decide, rng.subset(rows), threat)
        init_failed = int((~found).sum())
        if init_failed:
            log.debug("hsja: no adversarial start for %d of %d examples", init_failed, n)
        rows, start, sub_rng = rows[found], start[found], rng.subset(rows).subset(found)
        clean = x[rows]
        point = self._boundary(clean, start, rows, decide, threat, theta)
        dist, dist_moved = threat.distance(point, clean), threat.distance(start, clean)
        self._keep_best(best, best_dist, rows, point, dist)

        t = 0
        while rows.numel():
            evals = int(min(self.init_num_evals * math.sqrt(t + 1), self.max_num_evals))
            per_row = torch.minimum(decide.left(rows) - search_cost, torch.full_like(rows, evals))
            stay = per_row >= 1
            if self.early_stop:
                stay &= best_dist[rows] > threat.eps
            if not bool(stay.all()):
                rows, clean, point, dist = rows[stay], clean[stay], point[stay], dist[stay]
                dist_moved, per_row, sub_rng = dist_moved[stay], per_row[stay], sub_rng.subset(stay)
                if not rows.numel():
                    break
            t += 1  # iteration t of Alg. 2, the same for every example still running
            delta = (torch.full_like(dist, 0.1 * (threat.box[1] - threat.box[0])) if t == 1
                     else self.gamma * dist_moved / d)
            direction = self._normal(point, rows, delta, per_row, evals, t, sub_rng, decide, threat)
            update = direction.sign() if linf else direction
            step = self._step_size(point, update, dist / math.sqrt(t), rows, decide, threat)
            moved = self._move(point, update, step, threat)
            dist_moved = threat.distance(moved, clean)
            point = self._boundary(clean, moved, rows, decide, threat, theta)
            dist = threat.distance(point, clean)
            self._keep_best(best, best_dist, rows, point, dist)

        reached = torch.isfinite(best_dist) & (best_dist <= threat.eps)
        x_adv, success, best_dist = self._finish(best, best_dist, x, threat, decide)
        flags = {"iterations": t, "init_failed": init_failed, "projection_broke": int((reached & ~success).sum()),
                 "pulled_in": int((success & ~reached).sum())}
        finite = best_dist[torch.isfinite(best_dist)]
        if finite.numel():
            flags["median_distance"] = float(finite.median())
        return AttackResult(x_adv=x_adv, success=success, distance=best_dist, flags=flags)

    # --- pieces of Alg. 2 --------------------------------------------------------------------
    def _initialize(self, clean: Tensor, rows: Tensor, decide: _Decisions, rng: ExampleRNG,
                    threat: ThreatModel) -> tuple[Tensor, Tensor]:
        """An adversarial start per example: random noise, then a blend search towards the input."""
        lo, hi = threat.box
        noise, found = clean.clone(), torch.zeros(clean.shape[0], dtype=torch.bool, device=clean.device)
        shape = clean.shape[1:]
        for attempt in range(self.init_tries):
            todo = (~found & (decide.left(rows) > 0)).nonzero().flatten()
            if not todo.numel():
                break
            sub, kind = rng.subset(todo), attempt % 3
            u = sub.uniform(shape, stream=_STREAM_INIT + attempt)
            if kind == 0:  # uniform in the box (the reference's only start)
                candidate = lo + (hi - lo) * u
            elif kind == 1:  # binary noise of growing density
                density = (attempt // 3 + 1) / (self.init_tries // 3 + 2)
                candidate = torch.where(u < density, hi, lo).to(clean.dtype)
            else:  # the input under strong Gaussian noise, growing with the attempt
                sigma = (hi - lo) * (0.25 + attempt / self.init_tries)
                candidate = (clean[todo] + sigma * sub.normal(shape, stream=_STREAM_INIT + attempt)).clamp(lo, hi)
            hit = decide(candidate, rows[todo])
            noise[todo[hit]], found[todo[hit]] = candidate[hit], True
        low = torch.zeros(clean.shape[0], device=clean.device)
        high = torch.ones_like(low)
        start = noise.clone()
        while True:
            todo = (found & (high - low > INIT_TOLERANCE) & (decide.left(rows) > 0)).nonzero().flatten()
            if not todo.numel():
                break
            mid = (high[todo] + low[todo]) / 2
            blend = self._blend(clean[todo], noise[todo], mid, threat)
            hit = decide(blend, rows[todo])
            high[todo] = torch.where(hit, mid, high[todo])
            low[todo] = torch.where(hit, low[todo], mid)
            start[todo[hit]] = blend[hit]
        return start, found

    @staticmethod
    def _blend(clean: Tensor, other: Tensor, alpha: Tensor, threat: ThreatModel) -> Tensor:
        a = _rows_view(alpha, clean)
        return ((1 - a) * clean + a * other).clamp(*threat.box)

    def _boundary(self, clean: Tensor, adversarial: Tensor, rows: Tensor, decide: _Decisions, threat: ThreatModel,
                  theta: float) -> Tensor:
        """Binary search from the input to each adversarial point (the reference's ``binary_search_batch``).

        L2 searches the blend weight in [0, 1] to tolerance theta; Linf searches the clipping radius
        in [0, dist] to tolerance ``min(theta * dist, theta)``. Returns the last adversarial point.
        """
        n, linf = clean.shape[0], threat.ops.name == "Linf"
        low = torch.zeros(n, device=clean.device)
        if linf:
            high = (adversarial - clean).flatten(1).abs().amax(dim=1)
            tolerance = (high * theta).clamp_max(theta).clamp_min(_TINY)
        else:
            high = torch.ones(n, device=clean.device)
            tolerance = torch.full_like(high, theta)
        point = adversarial.clone()
        while True:
            todo = (((high - low) / tolerance > 1) & (decide.left(rows) > 0)).nonzero().flatten()
            if not todo.numel():
                return point
            mid = (high[todo] + low[todo]) / 2
            if linf:
                radius = _rows_view(mid, clean)
                probe = torch.minimum(torch.maximum(adversarial[todo], clean[todo] - radius), clean[todo] + radius)
            else:
                probe = self._blend(clean[todo], adversarial[todo], mid, threat)
            hit = decide(probe, rows[todo])
            high[todo] = torch.where(hit, mid, high[todo])
            low[todo] = torch.where(hit, low[todo], mid)
            point[todo[hit]] = probe[hit]

    def _normal(self, point: Tensor, rows: Tensor, delta: Tensor, per_row: Tensor, evals: int, t: int,
                rng: ExampleRNG, decide: _Decisions, threat: ThreatModel) -> Tensor:
        """Monte-Carlo estimate of the boundary normal at ``point`` (eq. 9 with the baseline of eq. 10)."""
        lo, hi = threat.box
        shape = point.shape[1:]
        chunk = max(1, MAX_PROBE_ELEMENTS // (evals * point[0].numel()))
        out = torch.empty_like(point)
        for first in range(0, point.shape[0], chunk):
            part = torch.arange(first, min(first + chunk, point.shape[0]), device=point.device)
            sub = rng.subset(part)
            # the same draw for every example whatever its own count, so a row depends on its seed only
            if threat.ops.name == "Linf":
                probes = 2 * sub.uniform((evals, *shape), stream=_STREAM_PROBES + t) - 1
            else:
                probes = sub.normal((evals, *shape), stream=_STREAM_PROBES + t)
            unit = (-1, evals, *([1] * len(shape)))
            probes = probes / probes.flatten(2).norm(dim=2).clamp_min(_TINY).view(unit)
            base, radius = point[part, None], delta[part].view(-1, 1, *([1] * len(shape)))
            samples = (base + radius * probes).clamp(lo, hi)
            probes = (samples - base) / radius
            counts = per_row[part]
            used = torch.arange(evals, device=point.device)[None] < counts[:, None]
            hit = decide(samples[used], rows[part].repeat_interleave(counts))
            sign = torch.zeros(used.shape, device=point.device)
            sign[used] = hit.to(sign.dtype) * 2 - 1
            mean = sign.sum(dim=1) / counts
            baseline = torch.where(mean.abs() == 1, torch.zeros_like(mean), mean)
            weights = (sign - baseline[:, None]) * used
            grad = (weights.view(unit) * probes).sum(dim=1) / _rows_view(counts, point[part])
            out[part] = grad / _rows_view(grad.flatten(1).norm(dim=1).clamp_min(_TINY), grad)
        return out

    @staticmethod
    def _move(point: Tensor, update: Tensor, step: Tensor, threat: ThreatModel) -> Tensor:
        return (point + _rows_view(step, point) * update).clamp(*threat.box)

    def _step_size(self, point: Tensor, update: Tensor, first: Tensor, rows: Tensor, decide: _Decisions,
                   threat: ThreatModel) -> Tensor:
        """Geometric search: halve the step from ``dist / sqrt(t)`` until the move stays adversarial."""
        step = first.clone()
        accepted = torch.zeros_like(step, dtype=torch.bool)
        for _ in range(MAX_HALVINGS):
            todo = (~accepted & (step > 0) & (decide.left(rows) > 0)).nonzero().flatten()
            if not todo.numel():
                break
            hit = decide(self._move(point[todo], update[todo], step[todo], threat), rows[todo])
            accepted[todo[hit]] = True
            step[todo[~hit]] /= 2
        return torch.where(accepted, step, torch.zeros_like(step))

    @staticmethod
    def _keep_best(best: Tensor, best_dist: Tensor, rows: Tensor, point: Tensor, dist: Tensor) -> None:
        better = dist < best_dist[rows]
        best[rows[better]] = point[better]
        best_dist[rows[better]] = dist[better]

    @staticmethod
    def _finish(best: Tensor, best_dist: Tensor, x: Tensor, threat: ThreatModel,
                decide: _Decisions) -> tuple[Tensor, Tensor, Tensor]:
        """Project into the threat set and re-check, with the reserved query, the points it moved.

        A point within eps that the projection moved must still be adversarial; a point just beyond
        eps (up to ``NEAR_MISS * eps``: the binary search stops within a tolerance of the boundary)
        may be adversarial once pulled in, and then its distance becomes that of the projected point. Returns the points, whether
        each is a verified adversarial point of the threat set, and the distances (N,).
        """
        x_adv = settle(threat, best, x)
        near = torch.isfinite(best_dist) & (best_dist <= NEAR_MISS * threat.eps)
        success = near & (best_dist <= threat.eps)
        moved = ((x_adv != best).flatten(1).any(dim=1) & near).nonzero().flatten()
        can = decide.left(moved, final=True) > 0
        success[moved[~can]] = False
        checked = moved[can]
        if checked.numel():
            success[checked] = decide(x_adv[checked], checked)
        best_dist = best_dist.clone()
        pulled_in = success & (best_dist > threat.eps)
        best_dist[pulled_in] = threat.distance(x_adv[pulled_in], x[pulled_in])
        return x_adv, success, best_dist
