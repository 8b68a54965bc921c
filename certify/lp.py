"""LP certifier: the triangle relaxation of every ReLU with given intermediate bounds (Ehlers 2017;
the "LP" of Salman et al. 2019, arXiv 1902.08722), built once per network as a DPP cvxpy problem.

For an input set (Linf: the box ``l0 <= x <= u0`` of ball and input box; L2: that box and
``||x - x0||_2 <= eps``) and pre-activation bounds ``l_i <= s_i <= u_i`` of every hidden layer::

    minimise   c^T (W_L z_L + b_L)
    subject to s_i = W_{i-1} z_{i-1} + b_{i-1},  z_0 = x,   l_i <= s_i <= u_i,
               z_i >= 0,  z_i >= s_i,  z_i <= a_i * s_i + beta_i   (triangle),  z_i in [l_i^+, u_i^+]

The certified number is the verified dual bound of :func:`certify.dual.lp_bound`, evaluated from the
solver's multipliers, never the solver's objective value, and lowered by its proven rounding error on a
network folded in float64 with proven intermediate bounds (:mod:`certify.convex`, docs/soundness.md).
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from robustbench_lite.errors import UserInputError

from .convex import BoundsFn, ConvexCertifier, DenseReLUNet, Relaxation, Solved
from .dual import lp_bound

log = logging.getLogger(__name__)

_TIME_OPTION = {"CLARABEL": "time_limit", "HIGHS": "time_limit", "SCS": "time_limit_secs"}
FAMILIES = ("relu_lower", "triangle", "pre_lower", "pre_upper")


@dataclass
class ReluLayerParams:
    """cvxpy Parameters of one hidden layer's relaxation (set per example)."""

    pre_lower: cp.Parameter
    pre_upper: cp.Parameter
    act_lower: cp.Parameter
    act_upper: cp.Parameter
    slope: cp.Parameter
    intercept: cp.Parameter

    @classmethod
    def create(cls, n: int) -> "ReluLayerParams":
        return cls(*(cp.Parameter(n) for _ in range(6)))

    def set(self, rel: Relaxation, i: int) -> None:
        self.pre_lower.value, self.pre_upper.value = rel.pre_lower[i], rel.pre_upper[i]
        self.act_lower.value, self.act_upper.value = rel.act_lower[i], rel.act_upper[i]
        self.slope.value, self.intercept.value = rel.slope[i], rel.intercept[i]


def relu_constraints(net: DenseReLUNet, blocks: list, layers: list[ReluLayerParams]) -> dict[str, list]:
    """The linear ReLU constraints of the triangle relaxation, by family, one per hidden layer.

    ``blocks`` are the cvxpy expressions of x, z_1 .. z_L. Every constraint is written ``g >= 0``
    so that its multiplier enters the Lagrangian as ``- lambda * g`` (see :mod:`certify.dual`).
    """
    out: dict[str, list] = {f: [] for f in FAMILIES}
    for i, p in enumerate(layers):
        s = net.weights[i] @ blocks[i] + net.biases[i]
        z = blocks[i + 1]
        out["relu_lower"].append(z - s >= 0)
        out["triangle"].append(cp.multiply(p.slope, s) + p.intercept - z >= 0)
        out["pre_lower"].append(s - p.pre_lower >= 0)
        out["pre_upper"].append(p.pre_upper - s >= 0)
    return out


def duals_of(families: dict[str, list]) -> dict[str, list]:
    """The solver's multipliers of every family (None where it reported none)."""
    return {name: [None if con.dual_value is None else np.asarray(con.dual_value, dtype=np.float64) for con in cons]
            for name, cons in families.items()}


class LPProblem:
    """The triangle LP of one network and one ball norm, with per-example cvxpy Parameters."""

    def __init__(self, net: DenseReLUNet, norm: str) -> None:
        d = net.input_dim
        self.x = cp.Variable(d)
        self.z = [cp.Variable(n) for n in net.hidden]
        self.input_lower, self.input_upper = cp.Parameter(d), cp.Parameter(d)
        self.layers = [ReluLayerParams.create(n) for n in net.hidden]
        self.objective = cp.Parameter(net.hidden[-1] if net.hidden else d)
        blocks = [self.x, *self.z]
        self.families = relu_constraints(net, blocks, self.layers)
        cons = [c for group in self.families.values() for c in group]
        cons += [self.x >= self.input_lower, self.x <= self.input_upper]
        for z, p in zip(self.z, self.layers):
            cons += [z >= p.act_lower, z <= p.act_upper]
        self.center = self.radius_sq = None
        if norm == "L2":
            self.center, self.radius_sq = cp.Parameter(d), cp.Parameter(nonneg=True)
            cons.append(cp.sum_squares(self.x - self.center) <= self.radius_sq)
        self.problem = cp.Problem(cp.Minimize(self.objective @ blocks[-1]), cons)
        if not self.problem.is_dpp():
            raise RuntimeError("the LP relaxation is not DPP: it would be recompiled for every example")

    def set(self, net: DenseReLUNet, rel: Relaxation, c: np.ndarray) -> None:
        self.input_lower.value, self.input_upper.value = rel.input_lower, rel.input_upper
        for i, p in enumerate(self.layers):
            p.set(rel, i)
        if self.center is not None:
            self.center.value, self.radius_sq.value = rel.center, rel.radius ** 2
        self.objective.value = net.weights[-1].T @ c


class LP(ConvexCertifier):
    """Triangle-relaxation LP certifier with a verified dual bound; registered as ``"lp"``.

    Args: ``solver`` (a cvxpy solver name: CLARABEL, HIGHS for Linf, or SCS), ``max_inputs`` and
    ``max_neurons`` (larger networks are ``skipped``), ``time_limit`` seconds per problem,
    ``early_stop`` (solve only what decides certification; False: every class), ``bounds`` (a function
    ``(model, x, threat) -> [(lower, upper)]`` of pre-activation bounds; CROWN by default).
    """

    name = "lp"

    def __init__(self, *, solver: str = "CLARABEL", max_inputs: int = 1024, max_neurons: int = 2048,
                 time_limit: float = 60.0, early_stop: bool = True, crown_first: bool = True,
                 bounds: BoundsFn | None = None) -> None:
        super().__init__(max_inputs=max_inputs, max_neurons=max_neurons, time_limit=time_limit,
                         early_stop=early_stop, crown_first=crown_first, bounds=bounds)
        solver = str(solver).upper()
        if solver not in _TIME_OPTION:
            raise UserInputError(f"LP solver must be one of {', '.join(_TIME_OPTION)}, got {solver!r}")
        self.solver = solver

    def build(self, net: DenseReLUNet, norm: str, rel: Relaxation) -> LPProblem:
        if norm == "L2" and self.solver == "HIGHS":
            raise UserInputError("the L2 ball needs a conic solver: use solver='CLARABEL' or 'SCS'")
        return LPProblem(net, norm)

    def solve(self, problem: LPProblem, net: DenseReLUNet, rel: Relaxation, c: np.ndarray, warm: bool) -> Solved:
        problem.set(net, rel, c)
        start = time.perf_counter()
        with warnings.catch_warnings():  # "may be inaccurate": the verified bound accounts for it
            warnings.simplefilter("ignore", UserWarning)
            problem.problem.solve(solver=self.solver, **{_TIME_OPTION[self.solver]: self.time_limit})
        seconds = time.perf_counter() - start
        bound = lp_bound(net, rel, c, duals_of(problem.families))
        timed_out = seconds >= 0.95 * self.time_limit and problem.problem.status != cp.OPTIMAL
        return Solved(bound if math.isfinite(bound) else -math.inf, str(problem.problem.status), seconds, timed_out)


__all__ = ["LP", "LPProblem", "ReluLayerParams", "duals_of", "relu_constraints"]
