"""What the convex-relaxation certifiers (LP, SDP) share: the network lowered to dense affine maps
with ReLUs between them, the per-example relaxation data, and the per-(example, class) solve loop.

A network ``x -> W_0 x + b_0 -> ReLU -> W_1 z_1 + b_1 -> ReLU -> ... -> W_L z_L + b_L`` becomes a
:class:`DenseReLUNet` (float64). The relaxations (Ehlers 2017 triangle LP; Raghunathan, Steinhardt &
Liang 2018, arXiv 1811.01057, SDP) take pre-activation bounds ``(l_i, u_i)`` of every hidden layer,
from CROWN by default, and bound the margin ``c^T logits`` with ``c = e_y - e_j``. The certified
bound of every problem is a *verified* dual bound (:mod:`certify.dual`), never the solver's value.

Rounding (:mod:`certify.rounding`): the dense maps are folded in float64 from a float64 copy of the
network, with bounds ``weight_errors`` / ``bias_errors`` on their distance to the exact maps; the
intermediate bounds are CROWN's on that copy, widened by their proven error; the relaxation of each
example widens them again by how far the dense maps can move a pre-activation (``D_k``) and lowers
every margin bound by how far they can move the logits (:meth:`Relaxation.margin_error`).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel

from .base import CERTIFIED, NOT_CERTIFIED, SKIPPED, TIMEOUT, CertResult, Certifier
from .crown import CROWN, intermediate_bounds
from .dual import interval_margin
from .graph import affine_segments, build_graph, check_supported, fold_affine, unsupported_reason
from .rounding import float64_model, fold_errors, gamma, round_down

log = logging.getLogger(__name__)

_U = 2.0 ** -53  # float64 unit roundoff


@dataclass(frozen=True)
class DenseReLUNet:
    """``weights[i]`` (n_{i+1}, n_i) and ``biases[i]`` (n_{i+1},), float64; ReLU between them.
    ``weight_errors`` / ``bias_errors`` (same shapes; empty: zeros) bound their distance to the maps of
    the exact network they were folded from."""

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    weight_errors: tuple[np.ndarray, ...] = ()
    bias_errors: tuple[np.ndarray, ...] = ()

    @property
    def input_dim(self) -> int:
        return self.weights[0].shape[1]

    @property
    def hidden(self) -> list[int]:
        """Sizes of the hidden (ReLU) layers z_1 .. z_L."""
        return [w.shape[0] for w in self.weights[:-1]]

    @property
    def num_classes(self) -> int:
        return self.weights[-1].shape[0]

    def preactivations(self, x: np.ndarray) -> list[np.ndarray]:
        """Pre-activations of every ReLU layer and the logits last, for x (N, d)."""
        out, z = [], x
        for w, b in zip(self.weights, self.biases):
            s = z @ w.T + b
            out.append(s)
            z = np.maximum(s, 0.0)
        return out

    def fingerprint(self) -> str:
        """Hash of the weights: a cached problem is reused only for the very same network."""
        h = hashlib.sha1()
        for a in (*self.weights, *self.biases):
            h.update(np.ascontiguousarray(a).tobytes())
            h.update(str(a.shape).encode())
        return h.hexdigest()


def lower_to_dense(model: nn.Module, input_shape: tuple[int, ...]) -> DenseReLUNet:
    """The network as dense maps folded in float64 from a float64 copy (:func:`certify.graph.fold_affine`),
    with their folding errors (:func:`certify.rounding.fold_errors`)."""
    maps = []
    for ops, in_shape in affine_segments(build_graph(float64_model(model), tuple(input_shape))):
        a, b = fold_affine(ops, in_shape)
        n_out = a[-1].shape[1]
        maps.append((a[-1].reshape(n_out, -1), b[-1].reshape(-1), *fold_errors(ops, a, b, _U)))
    numpy = [tuple(m[k].detach().cpu().numpy() for m in maps) for k in range(4)]
    return DenseReLUNet(*numpy)


@dataclass
class Relaxation:
    """Per-example data of the relaxation: input box, optional L2 ball, pre-activation bounds.

    ``pre_lower/pre_upper[i]`` bound layer i+1's pre-activation. The ReLU z = max(s, 0) is relaxed
    to ``z >= 0, z >= s, z <= slope * s + intercept`` (the triangle; exact for stable neurons).
    """

    input_lower: np.ndarray
    input_upper: np.ndarray
    pre_lower: list[np.ndarray]
    pre_upper: list[np.ndarray]
    center: np.ndarray | None = None  # L2 ball centre (None for Linf: the box is the whole set)
    radius: float = 0.0
    logit_error: np.ndarray | None = None  # (K,) how far the dense maps can move each logit; None: 0
    slope: list[np.ndarray] = field(init=False)
    intercept: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.slope, self.intercept = [], []
        for lo, hi in zip(self.pre_lower, self.pre_upper):
            unstable = (lo < 0) & (hi > 0)
            width = np.where(unstable, hi - lo, 1.0)
            slope = np.where(unstable, hi / width, (lo >= 0).astype(float))
            intercept = np.where(unstable, -slope * lo, 0.0)
            # the rounded chord sits below the exact one by at most 3u max(|l|, |u|) on [l, u]: lift it
            self.slope.append(slope)
            self.intercept.append(intercept + 4 * _U * (np.abs(lo) + np.abs(hi)) * unstable)

    def margin_error(self, c: np.ndarray) -> float:
        """How far the dense maps can move ``c^T logits`` from the exact network's (a bound's pad)."""
        return 0.0 if self.logit_error is None else float(np.abs(c) @ self.logit_error) * (1 + 1e-12)

    @property
    def act_lower(self) -> list[np.ndarray]:
        return [np.maximum(lo, 0.0) for lo in self.pre_lower]

    @property
    def act_upper(self) -> list[np.ndarray]:
        return [np.maximum(hi, 0.0) for hi in self.pre_upper]


def input_box(x: np.ndarray, threat: ThreatModel) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate bounds of the ball intersected with the box, x (N, d), rounded outward."""
    lo, hi = threat.box
    slack = 2 * _U * (np.abs(x) + threat.eps)  # x -+ eps is rounded once
    return np.maximum(x - threat.eps - slack, lo), np.minimum(x + threat.eps + slack, hi)


def interval_bounds(net: DenseReLUNet, lower: np.ndarray, upper: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Interval pre-activation bounds of every hidden layer for input boxes (N, d) (Gowal et al. 2018),
    each widened by its rounding error: gamma of the layer's sums times ``|W| max(|l|, |u|) + |b|``."""
    out = []
    for w, b in zip(net.weights[:-1], net.biases[:-1]):
        mid, rad = (upper + lower) / 2, (upper - lower) / 2
        c, r = mid @ w.T + b, rad @ np.abs(w).T
        pad = 2 * gamma(w.shape[1] + 8, _U) * (np.maximum(np.abs(lower), np.abs(upper)) @ np.abs(w).T + np.abs(b))
        out.append((c - r - pad, c + r + pad))
        lower, upper = np.maximum(c - r - pad, 0), np.maximum(c + r + pad, 0)
    return out


BoundsFn = Callable[[nn.Module, Tensor, ThreatModel], list]


def crown_bounds(model: nn.Module, x: Tensor, threat: ThreatModel) -> list[tuple[Tensor, Tensor]]:
    """Pre-activation bounds of every ReLU from the CROWN module of this package (float64, proven)."""
    return intermediate_bounds(model, x, threat)


def make_relaxations(net: DenseReLUNet, x: np.ndarray, threat: ThreatModel,
                     pre_bounds: list[tuple[np.ndarray, np.ndarray]]) -> list[Relaxation]:
    """One :class:`Relaxation` per example of x (N, d); pre_bounds[i] = (lower, upper) (N, n_i): proven
    bounds of the exact network's pre-activations. The dense maps move a pre-activation by at most
    ``D_k = |W_k| D_{k-1} + dW_k M_{k-1} + db_k`` (M: the exact network's activation magnitudes), so the
    bounds are widened by D_k and the logits' D is each relaxation's ``logit_error``."""
    lo, hi = input_box(x, threat)
    bounds = [(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)) for a, b in pre_bounds]
    drift, mag = np.zeros_like(x), np.maximum(np.abs(lo), np.abs(hi))
    widened = []
    for k, w in enumerate(net.weights):
        dw = net.weight_errors[k] if net.weight_errors else np.zeros_like(w)
        db = net.bias_errors[k] if net.bias_errors else 0.0
        drift = (drift @ np.abs(w).T + mag @ dw.T + db) * (1 + gamma(w.shape[1] + 2, _U))
        if k < len(bounds):
            a, b = bounds[k]
            grow = drift + 2 * _U * (np.maximum(np.abs(a), np.abs(b)) + drift)  # and the widening's rounding
            widened.append((a - grow, b + grow))
            mag = np.maximum(b, 0.0)  # the exact network's activations lie in [0, max(u, 0)]
    l2 = threat.norm == "L2"
    return [Relaxation(lo[i], hi[i], [a[i] for a, _ in widened], [b[i] for _, b in widened],
                       center=x[i] if l2 else None, radius=threat.eps, logit_error=drift[i])
            for i in range(x.shape[0])]


@dataclass
class Solved:
    """One (example, class) problem: the verified bound and what the solver said."""

    bound: float
    solver_status: str
    seconds: float
    timed_out: bool = False
    stage: str = ""  # which relaxation gave the bound ("lp", "sdp"); "": the certifier's own
    extra: dict[str, float] = field(default_factory=dict)  # e.g. each stage's own bound, seconds per part
    skipped: str = ""  # why a stage was not run for this problem (e.g. too large), if it was not


class ConvexCertifier(Certifier):
    """Shared loop of the LP, SDP and MIP certifiers: lower, size-check, bound, solve, verify.

    For each example and each class j != y the margin bound starts as the interval bound of the last
    layer over the activation bounds (sound, free; with ``crown_first`` the better of it and CROWN's
    margin bound) and is raised to the verified dual bound of the relaxation. With ``early_stop``
    only what decides certification is solved: misclassified examples and classes already positive
    are not, and an example stops at its first class that the relaxation cannot certify (its other
    columns keep the cheap bound). Without it every class of every example is solved.
    ``info["certified_by"]`` names, per example, the stage that certified its last class ("interval",
    "crown", "lp", "sdp"; None when not certified); ``info["problems"]`` records every solve. An
    example whose stage was skipped (e.g. too large for the SDP) and that nothing else certified reads
    ``skipped: <reason>``.
    """

    skip_refuted = True

    def __init__(self, *, max_inputs: int, max_neurons: int, time_limit: float, early_stop: bool,
                 crown_first: bool, bounds: BoundsFn | None) -> None:
        for name, v in (("max_inputs", max_inputs), ("max_neurons", max_neurons)):
            if not isinstance(v, int) or v < 1:
                raise UserInputError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(time_limit, (int, float)) and time_limit > 0):
            raise UserInputError(f"time_limit must be > 0 seconds, got {time_limit!r}")
        self.max_inputs, self.max_neurons = max_inputs, max_neurons
        self.time_limit, self.early_stop = float(time_limit), bool(early_stop)
        self._bounds = bounds or crown_bounds
        self._problems: dict[tuple, Any] = {}
        self.crown_first = bool(crown_first)
        self._builds = 0

    @property
    def builds(self) -> int:
        """How many cvxpy problems were built (each is compiled once, then re-solved)."""
        return self._builds

    def check_supported(self, model: nn.Module) -> None:
        check_supported(model)

    def unsupported(self, model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
        return unsupported_reason(model, input_shape, dense=True)

    # --- subclasses --------------------------------------------------------------------------
    def build(self, net: DenseReLUNet, norm: str, rel: Relaxation) -> Any:
        """A reusable (DPP) problem for ``net`` and the ball's norm (``rel``: one example, for scaling)."""
        raise NotImplementedError

    def solve(self, problem: Any, net: DenseReLUNet, rel: Relaxation, c: np.ndarray, warm: bool) -> Solved:
        """Verified lower bound of ``c^T logits`` over the relaxation (c (K,))."""
        raise NotImplementedError

    # --- the loop ----------------------------------------------------------------------------
    def _crown_margins(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> np.ndarray | None:
        """CROWN's proven margin bounds (N, K) on a float64 copy: classes they certify need no solve."""
        if not self.crown_first:
            return None
        return CROWN()(float64_model(model), x.double(), y, threat).margin_lower.cpu().numpy()

    def _problem(self, net: DenseReLUNet, norm: str, rel: Relaxation) -> Any:
        key = (net.fingerprint(), norm)
        if key not in self._problems:
            self._problems = {key: self.build(net, norm, rel)}  # keep only the latest network's problem
            self._builds += 1
        return self._problems[key]

    def _skip_reason(self, model: nn.Module, x: Tensor) -> tuple[str | None, DenseReLUNet | None]:
        d = math.prod(x.shape[1:])
        if d > self.max_inputs:
            return f"skipped: too large: {d} inputs exceed max_inputs={self.max_inputs}", None
        try:
            net = lower_to_dense(model, tuple(x.shape[1:]))
        except UserInputError as exc:  # max-pool or residual: fine for CROWN, not for a dense relaxation
            return f"skipped: {exc}", None
        if sum(net.hidden) > self.max_neurons:
            return f"skipped: too large: {sum(net.hidden)} hidden neurons exceed max_neurons={self.max_neurons}", None
        return None, net

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> CertResult:
        n = x.shape[0]
        with torch.no_grad():
            k = model(x[:1]).shape[1] if n else 0
        margin = torch.full((n, k), float("nan"), dtype=torch.float64)
        reason, net = self._skip_reason(model, x) if n else ("skipped: no examples", None)
        if net is None:
            return CertResult(torch.zeros(n, dtype=torch.bool), margin.float().to(x.device), [str(reason)] * n,
                              info={"problems": []})
        xs = x.detach().reshape(n, -1).double().cpu().numpy()
        pre = [(_numpy(lo, n), _numpy(hi, n)) for lo, hi in self._bounds(model, x.detach(), threat)]
        if [p[0].shape[1] for p in pre] != net.hidden:
            raise UserInputError(f"intermediate bounds of sizes {[p[0].shape[1] for p in pre]} do not match "
                                 f"the network's ReLU layers {net.hidden}")
        rels = make_relaxations(net, xs, threat, pre)
        problem = self._problem(net, threat.norm, rels[0])
        logits = net.preactivations(xs)[-1]
        crown = self._crown_margins(model, x, y, threat)
        problems: list[dict] = []
        status, certified_by = [], []
        cheap_stage = "interval" if crown is None else "crown"
        for i, rel in enumerate(rels):
            yi = int(y[i])
            cheap = np.array([0.0 if j == yi else interval_margin(net, rel, _spec(k, yi, j)) for j in range(k)])
            if crown is not None:
                cheap = np.maximum(cheap, crown[i])
            clean_ok = bool(all(logits[i, yi] > logits[i, j] for j in range(k) if j != yi))
            bound, st, by = self._certify_example(problem, net, rel, yi, cheap, clean_ok, problems, i, cheap_stage)
            margin[i] = torch.from_numpy(bound)
            status.append(st)
            certified_by.append(by)
        certified = torch.tensor([s == CERTIFIED for s in status], dtype=torch.bool)
        return CertResult(certified.to(x.device), round_down(margin).to(x.device), status, forward_equivalents=0.0,
                          info={"problems": problems, "builds": self.builds, "certified_by": certified_by})

    def _certify_example(self, problem: Any, net: DenseReLUNet, rel: Relaxation, yi: int, cheap: np.ndarray,
                         clean_ok: bool, problems: list[dict], index: int,
                         cheap_stage: str) -> tuple[np.ndarray, str, str | None]:
        """Solve the classes not yet certified, hardest first; returns (margin bounds, status, the stage
        that certified the example's last class: ``cheap_stage``, "lp", "sdp" or the certifier's name)."""
        bound = cheap.copy()
        stages = {j: cheap_stage for j in range(len(cheap))}
        failed = timed_out = False
        skipped = ""
        todo = sorted((j for j in range(len(cheap)) if j != yi and (cheap[j] <= 0 or not self.early_stop)),
                      key=lambda j: cheap[j])
        for j in todo if clean_ok or not self.early_stop else []:
            if failed and self.early_stop:
                break
            try:
                res = self.solve(problem, net, rel, _spec(len(cheap), yi, j), bool(problems))
            except Exception as exc:  # a solver failure is recorded, never read as certified
                log.warning("%s: example %d class %d: solver failed: %s", self.name, index, j, exc)
                res = Solved(-math.inf, f"error: {type(exc).__name__}: {exc}", 0.0)
            record = {"example": index, "class": j, "bound": float(res.bound), "solver_status": res.solver_status,
                      "seconds": round(float(res.seconds), 4), "timeout": bool(res.timed_out),
                      "stage": res.stage or self.name}
            record.update({k: float(v) for k, v in res.extra.items()})
            problems.append(record)
            if res.bound > bound[j]:
                stages[j] = res.stage or self.name
            bound[j] = max(bound[j], res.bound)
            if bound[j] <= 0:
                failed, timed_out = True, timed_out or res.timed_out
                skipped = skipped or res.skipped
        others = [j for j in range(len(bound)) if j != yi]
        if clean_ok and all(bound[j] > 0 for j in others):
            order = [cheap_stage, "lp", "sdp", self.name]
            return bound, CERTIFIED, max((stages[j] for j in others), key=order.index, default=cheap_stage)
        if skipped:
            return bound, f"{SKIPPED}: {skipped}", None
        return bound, TIMEOUT if timed_out else NOT_CERTIFIED, None


def _spec(k: int, y: int, j: int) -> np.ndarray:
    c = np.zeros(k)
    c[y], c[j] = 1.0, -1.0
    return c


def _numpy(t: Tensor | np.ndarray, n: int) -> np.ndarray:
    if torch.is_tensor(t):
        t = t.detach().double().cpu().numpy()
    return np.asarray(t, dtype=np.float64).reshape(n, -1)


def interval(model: nn.Module, x: Tensor, threat: ThreatModel) -> list[tuple[np.ndarray, np.ndarray]]:
    """Interval (IBP) pre-activation bounds on the dense network: a looser, faster ``bounds`` option."""
    net = lower_to_dense(model, tuple(x.shape[1:]))
    lo, hi = input_box(x.detach().reshape(x.shape[0], -1).double().cpu().numpy(), threat)
    return interval_bounds(net, lo, hi)


__all__ = ["ConvexCertifier", "DenseReLUNet", "Relaxation", "Solved", "crown_bounds", "input_box", "interval",
           "interval_bounds", "lower_to_dense", "make_relaxations"]
