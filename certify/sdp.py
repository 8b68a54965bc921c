"""SDP certifier: SDP-cert of Raghunathan, Steinhardt & Liang (NeurIPS 2018, arXiv 1811.01057;
two-layer form in arXiv 1801.09344), with the triangle LP constraints added, solved with SCS.

The variable is ``P = [[1, v^T], [v, V]] >= 0`` with ``v = [x, z_1, ..., z_L]`` (V relaxes v v^T)::

    minimise   c^T (W_L z_L + b_L)
    subject to P_00 = 1,  P >= 0 (PSD)
               z_i >= 0, z_i >= s_i, diag(V_{z_i z_i}) = diag(W_{i-1} V_{z_{i-1} z_i}) + b_{i-1} * z_i   (ReLU)
               l <= v <= u  and  diag(V) <= (l + u) * v - l * u   for every block (input ball ∩ box,
               activation bounds l_i^+, u_i^+ from the intermediate bounds)
               l_i <= s_i <= u_i and the triangle z_i <= a_i s_i + beta_i   (so SDP >= LP)
               trace(V_xx) - 2 x0^T x + ||x0||^2 <= eps^2                    (L2 ball only)

Every family that the triangle LP has is here too, so with the same intermediate bounds the SDP
optimum is never below the LP optimum. The problem is built once per network (DPP Parameters for
the bounds, the centre and the objective) and re-solved, warm-started, for each (example, class).
The certified number is :func:`certify.dual.sdp_bound` of SCS's multipliers, so a loose SCS
tolerance costs tightness, never soundness. SCS works on coordinates scaled to order one, and the
verified bound of the triangle LP (solved first, Clarabel) is kept as a floor: on larger trained
networks SCS often stops (time or iteration limit) before its own bound passes the LP's.
"""
from __future__ import annotations

import logging
import math
import time
import warnings

import cvxpy as cp
import numpy as np

from robustbench_lite.errors import UserInputError

from .convex import BoundsFn, ConvexCertifier, DenseReLUNet, Relaxation, Solved
from .dual import sdp_bound
from .lp import LP, LPProblem, ReluLayerParams, duals_of, relu_constraints

log = logging.getLogger(__name__)


class SDPProblem:
    """The SDP relaxation of one network and one ball norm, with per-example cvxpy Parameters."""

    def __init__(self, net: DenseReLUNet, norm: str, scale: np.ndarray | None = None) -> None:
        sizes = [net.input_dim, *net.hidden]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        n = int(offsets[-1])
        # the solver's variable is P-hat with v = scale * v-hat: every coordinate of order one, which
        # SCS needs to converge (a PSD cone cannot be equilibrated per coordinate); the constraints
        # are the same functions of v, so their multipliers feed certify.dual unchanged
        sc = np.ones(n) if scale is None else np.asarray(scale, dtype=np.float64)
        self.P = cp.Variable((n + 1, n + 1), PSD=True)
        v, diag = cp.multiply(sc, self.P[0, 1:]), cp.multiply(sc ** 2, cp.diag(self.P)[1:])
        blocks = [v[offsets[b]:offsets[b + 1]] for b in range(len(sizes))]
        diags = [diag[offsets[b]:offsets[b + 1]] for b in range(len(sizes))]
        self.layers = [ReluLayerParams.create(k) for k in net.hidden]
        self.input_lower, self.input_upper = cp.Parameter(sizes[0]), cp.Parameter(sizes[0])
        # l + u and l * u of every block, as parameters (a product of parameters is not DPP)
        self.box_sum = [cp.Parameter(k) for k in sizes]
        self.box_prod = [cp.Parameter(k) for k in sizes]
        self.objective = cp.Parameter(sizes[-1])
        lows = [self.input_lower, *(p.act_lower for p in self.layers)]
        highs = [self.input_upper, *(p.act_upper for p in self.layers)]
        fam = relu_constraints(net, blocks, self.layers)
        fam["box_lower"] = [blk - lo >= 0 for blk, lo in zip(blocks, lows)]
        fam["box_upper"] = [hi - blk >= 0 for blk, hi in zip(blocks, highs)]
        fam["box_quad"] = [cp.multiply(s, blk) - p - dg >= 0
                           for blk, dg, s, p in zip(blocks, diags, self.box_sum, self.box_prod)]
        fam["relu_eq"] = []
        for i in range(len(net.hidden)):
            prev = slice(1 + offsets[i], 1 + offsets[i + 1])
            cur = slice(1 + offsets[i + 1], 1 + offsets[i + 2])
            w = net.weights[i] * sc[cur.start - 1:cur.stop - 1, None] * sc[None, prev.start - 1:prev.stop - 1]
            cross = cp.sum(cp.multiply(w.T, self.P[prev, cur]), axis=0)  # diag(W V_{prev,cur})
            fam["relu_eq"].append(diags[i + 1] - cross - cp.multiply(net.biases[i], blocks[i + 1]) == 0)
        self.center = self.radius_sq = self.center_sq = None
        if norm == "L2":
            self.center = cp.Parameter(sizes[0])
            self.radius_sq, self.center_sq = cp.Parameter(nonneg=True), cp.Parameter(nonneg=True)
            fam["ball"] = [self.radius_sq - (cp.sum(diags[0]) - 2 * self.center @ blocks[0] + self.center_sq) >= 0]
        self.families = fam
        cons = [self.P[0, 0] == 1] + [c for group in fam.values() for c in group]
        self.problem = cp.Problem(cp.Minimize(self.objective @ blocks[-1]), cons)
        if not self.problem.is_dpp():
            raise RuntimeError("the SDP relaxation is not DPP: it would be recompiled for every example")

    def set(self, net: DenseReLUNet, rel: Relaxation, c: np.ndarray) -> None:
        self.input_lower.value, self.input_upper.value = rel.input_lower, rel.input_upper
        for i, p in enumerate(self.layers):
            p.set(rel, i)
        lows = [rel.input_lower, *rel.act_lower]
        highs = [rel.input_upper, *rel.act_upper]
        for s, p, lo, hi in zip(self.box_sum, self.box_prod, lows, highs):
            s.value, p.value = lo + hi, lo * hi
        if self.center is not None:
            self.center.value = rel.center
            self.radius_sq.value, self.center_sq.value = rel.radius ** 2, float(rel.center @ rel.center)
        self.objective.value = net.weights[-1].T @ c


class SDP(ConvexCertifier):
    """SDP-cert (Raghunathan et al. 2018) with triangle cuts and a verified dual bound; ``"sdp"``.

    Args: ``eps`` (SCS tolerance; loose is safe, the bound is verified), ``max_iters`` (SCS
    iterations per problem), ``chunk_iters`` (iterations before the first verified-bound check,
    doubling after each: a class stops as soon as its bound is positive), ``time_limit`` seconds per problem (status ``timeout`` when it stops a
    problem that then fails to certify), ``max_inputs`` and ``max_neurons`` (larger networks are
    ``skipped``), ``early_stop`` (solve only what decides certification; False: every class), ``warm_start``
    (start SCS from the last solution: across chunks, classes and examples), ``crown_first`` (skip
    classes CROWN already certifies), ``bounds`` (pre-activation bounds function; CROWN by default).
    """

    name = "sdp"

    def __init__(self, *, eps: float = 1e-3, max_iters: int = 5000, chunk_iters: int = 150, time_limit: float = 20.0,
                 max_inputs: int = 100, max_neurons: int = 128, early_stop: bool = True,
                 warm_start: bool = True, crown_first: bool = True, bounds: BoundsFn | None = None) -> None:
        super().__init__(max_inputs=max_inputs, max_neurons=max_neurons, time_limit=time_limit,
                         early_stop=early_stop, crown_first=crown_first, bounds=bounds)
        if not (isinstance(eps, (int, float)) and 0 < eps < 1):
            raise UserInputError(f"eps (the SCS tolerance) must be in (0, 1), got {eps!r}")
        for name, v in (("max_iters", max_iters), ("chunk_iters", chunk_iters)):
            if not isinstance(v, int) or v < 1:
                raise UserInputError(f"{name} must be a positive integer, got {v!r}")
        self.eps, self.max_iters, self.chunk_iters = float(eps), max_iters, chunk_iters
        self.warm_start = bool(warm_start)
        self._lp = LP(time_limit=time_limit, bounds=bounds)

    def build(self, net: DenseReLUNet, norm: str, rel: Relaxation) -> tuple[SDPProblem, LPProblem]:
        return SDPProblem(net, norm, scale=coordinate_scale(rel)), self._lp.build(net, norm, rel)

    def solve(self, problem: tuple[SDPProblem, LPProblem], net: DenseReLUNet, rel: Relaxation, c: np.ndarray,
              warm: bool) -> Solved:
        """The triangle LP first (its verified bound is a floor: the SDP contains its constraints and
        SCS may stop short of them); then SCS in doubling chunks from ``chunk_iters`` iterations (warm-started)
        until the verified bound is positive (``early_stop``), SCS converges, or the iteration/time
        budget is spent. Returns the best verified bound."""
        sdp, lp = problem
        start = time.perf_counter()
        floor = self._lp.solve(lp, net, rel, c, warm)
        best, done, raw, own, chunks = floor.bound, 0, f"lp {floor.solver_status}", -math.inf, 0
        sdp.set(net, rel, c)
        while done < self.max_iters and not (best > 0 and self.early_stop):
            left = self.time_limit - (time.perf_counter() - start)
            if left <= 0:
                raw = "time limit"
                break
            # chunks double: every warm restart resets SCS's adaptive scale and acceleration memory
            chunk = min(self.chunk_iters * 2 ** chunks, self.max_iters - done)
            chunks += 1
            with warnings.catch_warnings():  # "may be inaccurate": the verified bound accounts for it
                warnings.simplefilter("ignore", UserWarning)
                sdp.problem.solve(solver=cp.SCS, eps_abs=self.eps, eps_rel=self.eps, max_iters=chunk,
                                  time_limit_secs=left, warm_start=self.warm_start and (warm or done > 0))
            stats = sdp.problem.solver_stats
            done += int(getattr(stats, "num_iters", None) or chunk)
            raw = _scs_status(sdp.problem)
            bound = sdp_bound(net, rel, c, duals_of(sdp.families))
            own = max(own, bound) if math.isfinite(bound) else own
            best = max(best, own)
            if raw == "solved":
                break
        seconds = time.perf_counter() - start
        timed_out = raw != "solved" and best <= 0 and (seconds >= 0.95 * self.time_limit or "time" in raw)
        raw = f"{raw} ({done} iterations; sdp bound {own:.6g}, lp floor {floor.bound:.6g})"
        return Solved(best, raw, seconds, timed_out)


def coordinate_scale(rel: Relaxation) -> np.ndarray:
    """Typical magnitude of every coordinate of v (from one example's bounds), for conditioning only."""
    out = []
    for lo, hi in zip([rel.input_lower, *rel.act_lower], [rel.input_upper, *rel.act_upper]):
        mag = np.maximum(np.abs(lo), np.abs(hi))
        floor = 0.1 * float(np.median(mag[mag > 0])) if (mag > 0).any() else 1.0
        out.append(np.maximum(mag, floor))
    return np.concatenate(out)


def _scs_status(problem: cp.Problem) -> str:
    stats = problem.solver_stats
    info = (getattr(stats, "extra_stats", None) or {}).get("info", {}) if stats is not None else {}
    return str(info.get("status", problem.status))


__all__ = ["SDP", "SDPProblem"]
