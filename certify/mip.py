"""Exact verification by mixed-integer linear programming (Tjeng, Xiao & Tedrake 2019, arXiv 1711.07356),
solved by HiGHS through :func:`scipy.optimize.milp`; registered as ``"mip"``.

The network is lowered to dense maps (:func:`certify.graph.to_affine_relu`: Linear, Conv2d, AvgPool2d,
BatchNorm, Normalize, Flatten; max-pool and residual nets are ``skipped`` with the lowering's reason).
For one example, with pre-activation bounds ``l <= s <= u`` of every ReLU (CROWN's intermediate bounds
by default, padded outward as for the LP), the ReLU ``z = max(s, 0)`` is encoded exactly: a stable
neuron needs no binary (``z = s`` when ``l >= 0``, ``z = 0`` when ``u <= 0``); an unstable one gets
``a in {0, 1}`` with ``z >= s, z >= 0, z <= s - l (1 - a), z <= u a``. Each class j with
``c = e_y - e_j`` is one MILP minimising ``c^T logits`` over x in ball ∩ box. The feasible x are
exactly ball ∩ box and every feasible z is the network's own activation, so the optimum is the true
minimum margin. Linf: the ball ∩ box is the input box. L2 (HiGHS takes no quadratic constraint):
outer approximation (Kelley's cutting planes) - the MILP runs over box ∩ tangent half-spaces of the
ball; its minimiser, if outside the ball, adds the tangent cut there; every MILP's dual bound is a
bound over a superset of the ball, so it stays a lower bound, and the loop ends at a certificate, a
counterexample, ``max_cuts`` or the time limit.

Soundness of ``certified``: the solver's objective value and status are never used as a bound. A class
counts as certified only when HiGHS's *dual bound* exceeds a slack that covers the error HiGHS's
tolerances allow: with primal, dual and integrality tolerances set to ``tolerance`` (1e-9), a node LP's
value can err by at most ``tolerance`` times the sum of the ranges of every variable, every row's
activity and the objective (weak duality with multipliers that are feasible up to the tolerance); the
slack is 10 times that plus float64 rounding. The MILP is the float64 dense maps' network, the
certificate the exact network's, so the dense maps' folding error (``Relaxation.margin_error``,
docs/soundness.md) is subtracted too, and ``margin_lower`` is the better of that and the CROWN or
interval bound. This rests on HiGHS honouring its tolerances (an assumption, stated here; the
branch-and-bound certifier re-derives its bounds itself). An example without unstable ReLUs is an LP
(scipy's ``linprog``, HiGHS) and needs no such assumption: its bound is verified by weak duality from
the solver's multipliers in float64 (:func:`verified_bound`, ``"rigorous": True``). Margins within the
slack of 0 are undecided (``not_certified``, no counterexample). Counterexamples: when the MILP's
minimiser has margin < 0 in float64, it is projected into ball ∩ box and re-checked with a plain
float32 forward pass of the model (:func:`robustbench_lite.evaluation.claims.check_points`); only a point that
passes is returned in ``CertResult.counterexample`` (NaN rows elsewhere) and marks the example
``info["refuted"]``.

``info["problems"]``: one record per solved (example, class): ``dual_bound``, ``slack``, ``bound``,
``rigorous``, ``optimum`` (the MILP's incumbent), ``point_margin`` (the float64 network's margin at the
projected minimiser), ``counterexample`` (it passed the float32 check), ``nodes``, ``cuts``,
``binaries``, ``seconds``, ``solver_status`` (diagnostics only).

Statuses: ``certified``; ``not_certified`` (refuted, undecided within the slack, or the clean point is
misclassified); ``timeout`` (``time_limit`` seconds per example spent); ``skipped: too large: ...``
(``max_inputs``, ``max_neurons``, or ``max_unstable`` binaries per example).
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from torch import Tensor, nn

from robustbench_lite.evaluation.claims import check_points
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel

from .base import CERTIFIED, NOT_CERTIFIED, SKIPPED, TIMEOUT, CertResult
from .convex import BoundsFn, ConvexCertifier, DenseReLUNet, Relaxation, _spec

log = logging.getLogger(__name__)

#: the dual bound must exceed SAFETY x (the worst error HiGHS's tolerances allow) to certify
SAFETY = 10.0
#: with ``exact``, L2 cutting stops when the bound is this close (relative) to a margin the network attains
EXACT_GAP = 1e-5


@dataclass
class ExampleMILP:
    """One example's MILP: variables ``[x | z_1 .. z_L | binaries]``, rows ``row_lower <= A v <= row_upper``.

    ``logit_block``: the columns of z_L (of x for a net without hidden layer); ``binaries``: how many.
    """

    A: sparse.csr_array
    row_lower: np.ndarray
    row_upper: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    integrality: np.ndarray
    logit_block: slice
    binaries: int


def build_milp(net: DenseReLUNet, rel: Relaxation) -> ExampleMILP:
    """Tjeng et al.'s exact encoding of ``net`` over the input box of ``rel`` with its pre-activation bounds."""
    d = net.input_dim
    lower, upper = [rel.input_lower], [rel.input_upper]
    z_cols, col = [], d
    for lo, hi in zip(rel.pre_lower, rel.pre_upper):
        z_cols.append(col)
        lower.append(np.maximum(lo, 0.0))
        upper.append(np.maximum(hi, 0.0))
        col += len(lo)
    unstable = [np.flatnonzero((lo < 0) & (hi > 0)) for lo, hi in zip(rel.pre_lower, rel.pre_upper)]
    a_cols = []
    for idx in unstable:
        a_cols.append(col)
        col += len(idx)
    binaries = col - (a_cols[0] if a_cols else col)
    rows, cols, vals, rlo, rhi = [], [], [], [], []
    n_rows = 0
    prev, prev_live = 0, np.ones(d, dtype=bool)
    for i, (lo, hi) in enumerate(zip(rel.pre_lower, rel.pre_upper)):
        w, b = net.weights[i] * prev_live[None, :], net.biases[i]
        active, idx = np.flatnonzero(lo >= 0), unstable[i]
        # s_k - z_k written as  -W_k z_prev + z_k  (+ terms)  within [row_lower, row_upper]
        for sel, extra, row_lo, row_hi in (
                (active, None, b[active], b[active]),                           # z = s
                (idx, None, b[idx], np.full(len(idx), np.inf)),                 # z >= s
                (idx, -lo[idx], np.full(len(idx), -np.inf), b[idx] - lo[idx])):  # z <= s - l (1 - a)
            if not len(sel):
                continue
            r, c = np.nonzero(w[sel])
            rows += [n_rows + r, n_rows + np.arange(len(sel))]
            cols += [prev + c, z_cols[i] + sel]
            vals += [-w[sel][r, c], np.ones(len(sel))]
            if extra is not None:
                rows.append(n_rows + np.arange(len(sel)))
                cols.append(a_cols[i] + np.arange(len(sel)))
                vals.append(extra)
            rlo.append(row_lo)
            rhi.append(row_hi)
            n_rows += len(sel)
        if len(idx):  # z <= u a
            rows += [n_rows + np.arange(len(idx))] * 2
            cols += [z_cols[i] + idx, a_cols[i] + np.arange(len(idx))]
            vals += [np.ones(len(idx)), -hi[idx]]
            rlo.append(np.full(len(idx), -np.inf))
            rhi.append(np.zeros(len(idx)))
            n_rows += len(idx)
        prev, prev_live = z_cols[i], hi > 0
    lower += [np.zeros(len(idx)) for idx in unstable]
    upper += [np.ones(len(idx)) for idx in unstable]
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0))
    A = sparse.csr_array((cat(vals), (cat(rows).astype(np.int64), cat(cols).astype(np.int64))), shape=(n_rows, col))
    integrality = np.zeros(col)
    integrality[col - binaries:] = 1
    block = slice(z_cols[-1], z_cols[-1] + net.hidden[-1]) if net.hidden else slice(0, d)
    return ExampleMILP(A, cat(rlo), cat(rhi), cat(lower), cat(upper), integrality, block, binaries)


@dataclass
class ClassSolve:
    """One class's outcome: the verified ``bound`` (dual bound - slack), the MILP's ``optimum`` (its
    incumbent's objective, NaN if none), ``point``: a minimiser inside ball ∩ box with float64 margin
    < 0 (None otherwise), ``timed_out``, and the solver's diagnostics in ``record``."""

    bound: float
    optimum: float
    point: np.ndarray | None
    timed_out: bool
    record: dict = field(default_factory=dict)


def _project(p: np.ndarray, rel: Relaxation) -> np.ndarray:
    """p (d,) moved into ball ∩ box (float64): radial scaling for L2, then the coordinate box."""
    if rel.center is not None:
        delta = p - rel.center
        norm = float(np.linalg.norm(delta))
        if norm > rel.radius:
            p = rel.center + delta * (rel.radius / norm)
    return np.clip(p, rel.input_lower, rel.input_upper)


class MIP(ConvexCertifier):
    """Complete verifier: Tjeng et al.'s MILP per (example, class), HiGHS via scipy; ``"mip"``.

    Args: ``time_limit`` seconds per example (all its classes together); ``max_inputs``,
    ``max_neurons`` (per network) and ``max_unstable`` (binaries per example): larger is
    ``skipped: too large``; ``tolerance``: HiGHS's primal, dual and integrality tolerances (the
    certification slack scales with it); ``max_cuts``: L2 outer-approximation rounds per class;
    ``exact``: L2 cuts continue until the bound is within ``EXACT_GAP`` of the margin at the projected
    minimiser, so ``margin_lower`` is the minimum rather than any positive bound (Linf's always is);
    ``early_stop``: solve only what decides the verdict (classes CROWN already certifies are not
    solved; an example stops at its first checked counterexample; False: every class);
    ``crown_first``: start from CROWN's margin bounds; ``bounds``: the pre-activation bounds
    function (CROWN's by default; :func:`certify.convex.interval` for interval bounds).
    """

    name = "mip"

    def __init__(self, *, time_limit: float = 60.0, max_inputs: int = 1024, max_neurons: int = 2048,
                 max_unstable: int = 256, tolerance: float = 1e-9, max_cuts: int = 100, exact: bool = False,
                 early_stop: bool = True, crown_first: bool = True, bounds: BoundsFn | None = None) -> None:
        super().__init__(max_inputs=max_inputs, max_neurons=max_neurons, time_limit=time_limit,
                         early_stop=early_stop, crown_first=crown_first, bounds=bounds)
        if not isinstance(max_unstable, int) or max_unstable < 0:
            raise UserInputError(f"max_unstable must be an integer >= 0, got {max_unstable!r}")
        if not (isinstance(tolerance, (int, float)) and 1e-10 <= tolerance <= 1e-5):
            raise UserInputError(f"tolerance must be in [1e-10, 1e-5], got {tolerance!r}")
        if not isinstance(max_cuts, int) or max_cuts < 0:
            raise UserInputError(f"max_cuts must be an integer >= 0, got {max_cuts!r}")
        self.max_unstable, self.tolerance, self.max_cuts = max_unstable, float(tolerance), max_cuts
        self.exact = bool(exact)
        self._batch: _Batch | None = None

    # --- ConvexCertifier hooks ---------------------------------------------------------------
    def build(self, net: DenseReLUNet, norm: str, rel: Relaxation) -> DenseReLUNet:
        return net  # the MILP depends on each example's bounds: built per example

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> CertResult:
        self._batch = _Batch(model, x.detach(), y, threat, torch.full_like(x.detach(), float("nan")),
                             [False] * x.shape[0])
        try:
            result = super().run(model, x, y, threat)
            batch = self._batch
        finally:
            self._batch = None
        result.counterexample = batch.points
        result.info["refuted"] = batch.refuted
        return result

    # --- one example -------------------------------------------------------------------------
    def _certify_example(self, problem: DenseReLUNet, net: DenseReLUNet, rel: Relaxation, yi: int,
                         cheap: np.ndarray, clean_ok: bool, problems: list[dict], index: int,
                         cheap_stage: str) -> tuple[np.ndarray, str, str | None]:
        batch = self._batch
        bound = cheap.copy()
        others = [j for j in range(len(cheap)) if j != yi]
        if not clean_ok:  # the clean point itself may be the counterexample
            self._keep(batch, index, None)
            return bound, NOT_CERTIFIED, None
        todo = sorted((j for j in others if cheap[j] <= 0 or not self.early_stop), key=lambda j: cheap[j])
        if not todo:
            return bound, CERTIFIED, cheap_stage
        example = build_milp(net, rel)
        if example.binaries > self.max_unstable:
            return (bound, f"{SKIPPED}: too large: {example.binaries} unstable ReLUs exceed "
                    f"max_unstable={self.max_unstable}", None)
        deadline = time.perf_counter() + self.time_limit
        timed_out = refuted = False
        solved = 0
        for j in todo:
            if time.perf_counter() >= deadline:
                break
            out = self.solve_class(example, net, rel, _spec(len(cheap), yi, j), deadline)
            solved += 1
            bound[j] = max(bound[j], out.bound)
            timed_out |= out.timed_out
            if out.point is not None:
                out.record["counterexample"] = self._keep(batch, index, out.point)
                refuted |= out.record["counterexample"]
            problems.append({"example": index, "class": j, "stage": self.name, **out.record})
            if refuted and self.early_stop:
                break
        timed_out |= solved < len(todo) and not refuted  # the deadline left classes unsolved
        if all(bound[j] > 0 for j in others):
            decided = [j for j in todo if bound[j] > cheap[j]]
            return bound, CERTIFIED, self.name if decided else cheap_stage
        if timed_out and not refuted:
            return bound, TIMEOUT, None
        return bound, NOT_CERTIFIED, None

    def _keep(self, batch: "_Batch", index: int, point: np.ndarray | None) -> bool:
        """Re-check a candidate with a float32 forward pass of the model; keep it if it passes."""
        x, y, threat = batch.x[index:index + 1], batch.y[index:index + 1], batch.threat
        p = x.clone() if point is None else torch.as_tensor(point, dtype=x.dtype, device=x.device).reshape(x.shape)
        p = threat.project(p, x)
        ok = bool(check_points(batch.model, p, x, y, threat).ok[0])
        if ok:
            batch.points[index] = p[0]
            batch.refuted[index] = True
        elif point is not None:
            log.info("mip: example %d: the MILP minimiser fails the float32 check (margin within rounding)", index)
        return ok

    # --- one class -----------------------------------------------------------------------------
    def solve_class(self, problem: ExampleMILP, net: DenseReLUNet, rel: Relaxation, c: np.ndarray,
                    deadline: float) -> ClassSolve:
        """Minimise ``c^T logits`` (L2: with cutting planes) until certified, refuted or out of time."""
        objective = np.zeros(problem.A.shape[1])
        objective[problem.logit_block] = net.weights[-1].T @ c
        const = float(c @ net.biases[-1])
        d = net.input_dim
        cuts, cut_rhs = np.zeros((0, d)), np.zeros(0)
        started, nodes = time.perf_counter(), 0
        best = ClassSolve(-math.inf, math.nan, None, False)
        for round_ in range(self.max_cuts + 1):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                best.timed_out = True
                break
            once = self._solve_once(problem, objective, cuts, cut_rhs, remaining)
            nodes += once.nodes
            bound = once.bound + const - 1e-12 * (1 + abs(const)) - rel.margin_error(c)
            best.bound = max(best.bound, bound)
            best.timed_out = once.timed_out
            best.record = {"solver_status": once.status, "dual_bound": float(once.dual_bound + const),
                           "slack": float(once.slack),
                           "bound": float(best.bound), "rigorous": once.rigorous, "nodes": nodes, "cuts": round_,
                           "binaries": problem.binaries}
            if once.x is None:
                break
            best.optimum = once.value + const
            raw = once.x[:d]
            point = _project(raw, rel)
            margin = float(net.preactivations(point[None])[-1][0] @ c)
            best.record["optimum"], best.record["point_margin"] = best.optimum, margin
            if bound > 0 and not self.exact:
                break
            if margin < 0:
                best.point = point
                break
            if self.exact and margin - best.bound <= EXACT_GAP * (1 + abs(margin)):
                break
            outside = rel.center is not None and np.linalg.norm(raw - rel.center) > rel.radius * (1 + 1e-9) + 1e-12
            if not outside:
                break  # the minimum is within the slack of 0: undecided
            g = (raw - rel.center) / np.linalg.norm(raw - rel.center)
            cuts = np.vstack([cuts, g])
            cut_rhs = np.append(cut_rhs, rel.radius + g @ rel.center + 1e-12 * (1 + abs(g @ rel.center)))
        best.record["seconds"] = round(time.perf_counter() - started, 6)
        if best.bound > 0:
            best.timed_out = False
        return best

    def _solve_once(self, problem: ExampleMILP, objective: np.ndarray, cuts: np.ndarray, cut_rhs: np.ndarray,
                    seconds: float) -> "_Once":
        """One solve over the rows of ``problem`` and the cuts (``cuts @ x <= cut_rhs``): a MILP when the
        example has binaries (bound: dual bound - slack), else an LP (bound: verified from its multipliers)."""
        A, rl, ru = problem.A, problem.row_lower, problem.row_upper
        if cuts.size:
            pad = sparse.csr_array((cuts.shape[0], A.shape[1] - cuts.shape[1]))
            A = sparse.vstack([A, sparse.hstack([sparse.csr_array(cuts), pad])], format="csr")
            rl, ru = np.concatenate([rl, np.full(len(cut_rhs), -np.inf)]), np.concatenate([ru, cut_rhs])
        tolerances = {"primal_feasibility_tolerance": self.tolerance, "dual_feasibility_tolerance": self.tolerance}
        if problem.binaries == 0:
            return _lp(objective, A, rl, ru, problem.lower, problem.upper, {"time_limit": max(seconds, 1e-3),
                                                                            **tolerances})
        options = {"time_limit": max(seconds, 1e-3), "mip_rel_gap": 1e-6, "mip_feasibility_tolerance": self.tolerance,
                   "mip_abs_gap": self.tolerance, **tolerances}
        with warnings.catch_warnings():  # the tolerance options are passed to HiGHS verbatim, with a warning
            warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
            res = milp(objective, integrality=problem.integrality, bounds=Bounds(problem.lower, problem.upper),
                       constraints=LinearConstraint(A, rl, ru), options=options)
        dual = res.mip_dual_bound
        usable = res.status in (0, 1) and dual is not None and math.isfinite(dual)
        w = problem.upper - problem.lower
        slack = SAFETY * self.tolerance * (1 + float(w.sum() + (abs(A) @ w).sum() + np.abs(objective) @ w))
        return _Once(dual - slack if usable else -math.inf, dual if usable else math.nan, slack, False,
                     res.x, math.nan if res.fun is None else float(res.fun), str(res.message).split(".")[0],
                     res.status == 1, int(res.mip_node_count or 0))


@dataclass
class _Once:
    """One MILP/LP solve: ``bound`` of the objective (without the constant), the solver's ``dual_bound``
    and the ``slack`` taken off it, ``rigorous`` (an LP's verified bound: no tolerance assumed), the
    minimiser ``x`` and its ``value`` (None/NaN when none), status text, time limit hit, B&B nodes."""

    bound: float
    dual_bound: float
    slack: float
    rigorous: bool
    x: np.ndarray | None
    value: float
    status: str
    timed_out: bool
    nodes: int


def _lp(objective: np.ndarray, A: sparse.csr_array, rl: np.ndarray, ru: np.ndarray, lower: np.ndarray,
        upper: np.ndarray, options: dict) -> _Once:
    """An example without unstable ReLUs is an LP: solved by HiGHS (scipy's linprog), bounded by weak
    duality from its multipliers (repaired, evaluated in float64 with its rounding error padded)."""
    eq = rl == ru
    up, lo = ~eq & np.isfinite(ru), ~eq & np.isfinite(rl)
    res = linprog(objective, A_ub=sparse.vstack([A[up], -A[lo]], format="csr"), b_ub=np.concatenate([ru[up], -rl[lo]]),
                  A_eq=A[eq] if eq.any() else None, b_eq=rl[eq] if eq.any() else None,
                  bounds=np.stack([lower, upper], 1), method="highs", options=options)
    y = np.zeros(len(rl))
    if res.x is not None:
        if eq.any():
            y[eq] = res.eqlin.marginals
        marg = res.ineqlin.marginals
        y[up] += marg[:int(up.sum())]
        y[lo] -= marg[int(up.sum()):]
    bound = verified_bound(objective, A, rl, ru, lower, upper, np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0))
    return _Once(bound, bound, 0.0, True, res.x, math.nan if res.fun is None else float(res.fun),
                 str(res.message).split(".")[0], res.status == 1, 0)


def verified_bound(objective: np.ndarray, A: sparse.csr_array, rl: np.ndarray, ru: np.ndarray, lower: np.ndarray,
                   upper: np.ndarray, y: np.ndarray) -> float:
    """Lower bound of ``objective @ v`` over ``rl <= A v <= ru``, ``lower <= v <= upper`` valid for ANY
    multipliers y (weak duality, Neumaier & Shcherbina 2004): a multiplier whose row side is infinite is
    zeroed, then ``y^T (A v) + (objective - A^T y)^T v`` is bounded side by side, minus its rounding error."""
    y = np.where((y > 0) & ~np.isfinite(rl), 0.0, np.where((y < 0) & ~np.isfinite(ru), 0.0, y))
    r = objective - A.T @ y
    rows = np.where(y > 0, y * np.where(np.isfinite(rl), rl, 0.0), y * np.where(np.isfinite(ru), ru, 0.0))
    cols = np.minimum(r * lower, r * upper)
    scale = float(np.abs(rows).sum() + np.abs(cols).sum()
                  + ((np.abs(objective) + abs(A).T @ np.abs(y)) * np.maximum(np.abs(lower), np.abs(upper))).sum())
    return float(rows.sum() + cols.sum()) - 4 * (A.shape[0] + A.shape[1] + 2) * np.finfo(np.float64).eps * (1 + scale)


@dataclass
class _Batch:
    """What the per-example loop needs to re-check counterexamples, and where it keeps them."""

    model: nn.Module
    x: Tensor
    y: Tensor
    threat: ThreatModel
    points: Tensor
    refuted: list[bool]


__all__ = ["MIP", "ClassSolve", "ExampleMILP", "build_milp"]
