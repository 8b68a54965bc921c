"""SDP certifier: SDP-cert of Raghunathan, Steinhardt & Liang (NeurIPS 2018, arXiv 1811.01057; two-layer
form in arXiv 1801.09344) with the triangle LP cuts, solved with SCS, certifying on a verified dual bound.

A cascade per example: a class is solved only when the cheaper bounds did not certify it - the
interval bound and CROWN's margin bound (``crown_first``), then the triangle LP (Clarabel, a DPP
cvxpy problem compiled once per network), then the SDP. The SDP of each example is reduced first
(:mod:`certify.sdp_problem`: stable neurons substituted, only free inputs and unstable neurons lifted,
coordinates normalised to [-1, 1]) and handed to SCS directly: SCS factorises it once per example
and every further class of that example only changes the objective (``SCS.update``) and starts from
the previous class's solution. The certified number of a class is
``max(CROWN, LP verified, SDP verified)``: the SDP's bound is :func:`certify.dual.psd_box_bound` of
SCS's multipliers, so a loose SCS tolerance costs tightness, never soundness; it is lowered by the rounding
error of the problem's data (:func:`certify.sdp_problem.build`, docs/soundness.md). With the same
intermediate bounds the SDP's optimum is never below the LP's; at a loose tolerance its verified
bound can still fall short of it, which the LP floor then covers (``info["problems"]`` records both).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import scs

from robustbench_lite.errors import UserInputError

from .convex import BoundsFn, ConvexCertifier, DenseReLUNet, Relaxation, Solved
from .lp import LP, LPProblem
from .sdp_problem import ReducedSDP, build, lifted_size

log = logging.getLogger(__name__)


class _ExampleSolver:
    """One example's reduced SDP and its SCS workspaces (factorised once, re-used for every class):
    a short one (``first_iters`` iterations, for classes whose verified bound is positive early) and
    the full one, which continues from the short one's point."""

    def __init__(self, net: DenseReLUNet, rel: Relaxation, settings: dict[str, Any], first_iters: int) -> None:
        self.rel = rel
        start = time.perf_counter()
        self.problem: ReducedSDP = build(net, rel)
        data = {"A": self.problem.A, "b": self.problem.b, "c": np.zeros(self.problem.A.shape[1])}
        self.full = scs.SCS(data, self.problem.cone, **settings)
        short = min(first_iters, settings["max_iters"])
        self.short = scs.SCS(data, self.problem.cone, **{**settings, "max_iters": short}) if short > 0 else None
        self.setup_seconds = time.perf_counter() - start
        self.solved = 0
        self.last: dict[str, np.ndarray] | None = None

    def solve(self, c: np.ndarray, warm: bool, early: bool) -> tuple[float, str, dict[str, float]]:
        """(verified bound, SCS status, details: iterations and seconds per part) for the margin c^T logits;
        ``early``: stop at the short workspace when its verified bound is already positive."""
        detail = {"setup_seconds": 0.0 if self.solved else self.setup_seconds, "scs_seconds": 0.0,
                  "verify_seconds": 0.0, "iterations": 0, "variables": self.problem.n}
        objective = self.problem.objective(c)
        best, status = -math.inf, "?"
        if early and self.short is not None:
            best, status = self._phase(self.short, objective, c, warm, detail)
        if not (best > 0 or status == "solved"):  # continue from the short phase's point, if any
            bound, status = self._phase(self.full, objective, c, warm or detail["iterations"] > 0, detail)
            best = max(best, bound)
        self.solved += 1
        return best - self.rel.margin_error(c), status, detail

    def _phase(self, solver: Any, objective: np.ndarray, c: np.ndarray, warm: bool,
               detail: dict[str, float]) -> tuple[float, str]:
        start = time.perf_counter()
        solver.update(c=objective)
        point = self.last if warm and self.last is not None else {}
        out = solver.solve(warm_start=bool(point), **point)
        self.last = {"x": out["x"], "y": out["y"], "s": out["s"]}
        middle = time.perf_counter()
        bound = self.problem.verified_bound(c, out["y"])
        detail["scs_seconds"] += middle - start
        detail["verify_seconds"] += time.perf_counter() - middle
        detail["iterations"] += int(out["info"].get("iter", 0))
        return (bound if math.isfinite(bound) else -math.inf), str(out["info"].get("status", "?"))


class _Problems:
    """What the SDP certifier keeps per network: the LP (compiled once) and the current example's SDP."""

    def __init__(self, lp: LPProblem) -> None:
        self.lp = lp
        self.example: _ExampleSolver | None = None

    def for_example(self, net: DenseReLUNet, rel: Relaxation, settings: dict[str, Any],
                    first_iters: int) -> _ExampleSolver:
        if self.example is None or self.example.rel is not rel:
            self.example = _ExampleSolver(net, rel, settings, first_iters)
        return self.example


class SDP(ConvexCertifier):
    """SDP-cert (Raghunathan et al. 2018) with triangle cuts and a verified dual bound; ``"sdp"``.

    Args: ``eps`` (SCS tolerance; loose is safe, the bound is verified), ``max_iters`` (SCS
    iterations per problem), ``first_iters`` (with ``early_stop``: SCS iterations after which a class
    whose verified bound is already positive stops; 0: always the full solve), ``time_limit``
    seconds per SCS solve (status ``timeout`` when it stops a problem that then fails to certify),
    ``max_inputs`` and ``max_neurons`` (larger networks are ``skipped``), ``max_lifted`` (an example
    whose reduced SDP has more variables - free inputs + unstable neurons - gets no SDP: its status is
    ``skipped: ...`` unless CROWN or the LP certify it), ``early_stop`` (solve only what decides
    certification: a class the LP certifies gets no SDP, an example stops at its first class that
    fails; False: LP and SDP for every class), ``warm_start`` (start SCS from the previous class's
    solution), ``crown_first`` (skip classes CROWN already certifies), ``bounds`` (pre-activation
    bounds function; CROWN by default).
    """

    name = "sdp"

    def __init__(self, *, eps: float = 1e-3, max_iters: int = 5000, first_iters: int = 100, time_limit: float = 20.0,
                 max_inputs: int = 100, max_neurons: int = 512, max_lifted: int = 200, early_stop: bool = True,
                 warm_start: bool = True, crown_first: bool = True, bounds: BoundsFn | None = None) -> None:
        super().__init__(max_inputs=max_inputs, max_neurons=max_neurons, time_limit=time_limit,
                         early_stop=early_stop, crown_first=crown_first, bounds=bounds)
        if not (isinstance(eps, (int, float)) and 0 < eps < 1):
            raise UserInputError(f"eps (the SCS tolerance) must be in (0, 1), got {eps!r}")
        if not isinstance(max_iters, int) or max_iters < 1:
            raise UserInputError(f"max_iters must be a positive integer, got {max_iters!r}")
        if not isinstance(first_iters, int) or first_iters < 0:
            raise UserInputError(f"first_iters must be an integer >= 0, got {first_iters!r}")
        if not isinstance(max_lifted, int) or max_lifted < 1:
            raise UserInputError(f"max_lifted must be a positive integer, got {max_lifted!r}")
        self.max_lifted = max_lifted
        self.eps, self.max_iters, self.first_iters = float(eps), max_iters, first_iters
        self.warm_start = bool(warm_start)
        self._lp = LP(time_limit=time_limit, bounds=bounds)

    def _settings(self) -> dict[str, Any]:
        return {"eps_abs": self.eps, "eps_rel": self.eps, "max_iters": self.max_iters,
                "time_limit_secs": self.time_limit, "verbose": False}

    def build(self, net: DenseReLUNet, norm: str, rel: Relaxation) -> _Problems:
        return _Problems(self._lp.build(net, norm, rel))

    def solve(self, problem: _Problems, net: DenseReLUNet, rel: Relaxation, c: np.ndarray, warm: bool) -> Solved:
        """The triangle LP first; the SDP when the LP did not certify (or always, without ``early_stop``).
        Returns the best verified bound and which stage gave it."""
        start = time.perf_counter()
        floor = self._lp.solve(problem.lp, net, rel, c, warm)
        if floor.bound > 0 and self.early_stop:
            seconds = time.perf_counter() - start
            return Solved(floor.bound, f"lp {floor.solver_status}", seconds, stage="lp",
                          extra={"lp_bound": floor.bound, "lp_seconds": seconds})
        lp_seconds = time.perf_counter() - start
        size = lifted_size(rel)
        if size > self.max_lifted:
            return Solved(floor.bound, f"lp {floor.solver_status}", lp_seconds, stage="lp",
                          extra={"lp_bound": floor.bound, "lp_seconds": lp_seconds},
                          skipped=f"SDP of {size} variables (free inputs + unstable neurons) exceeds max_lifted={self.max_lifted}")
        example = problem.for_example(net, rel, self._settings(), self.first_iters)
        own, raw, detail = example.solve(c, self.warm_start, self.early_stop)
        seconds = time.perf_counter() - start
        best, stage = (own, "sdp") if own > floor.bound else (floor.bound, "lp")
        timed_out = best <= 0 and ("time" in raw.lower() or seconds >= 0.95 * self.time_limit)
        raw = f"{raw} ({detail['iterations']} iterations; sdp bound {own:.6g}, lp floor {floor.bound:.6g})"
        extra = {"sdp_bound": own, "lp_bound": floor.bound, "lp_seconds": lp_seconds, **detail}
        return Solved(best, raw, seconds, timed_out, stage=stage, extra=extra)


__all__ = ["SDP"]
