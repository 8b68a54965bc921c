"""CROWN (Zhang et al. 2018, arXiv 1811.00866) and alpha-CROWN (Xu et al. 2021, arXiv 2011.13824).

Linear bounds are propagated backward from a node to the input through the shared graph
(:mod:`certify.graph`): affine layers by their transpose, ReLU and max-pool by the linear
relaxations of :mod:`certify.layers`, residual sums by adding the two branches' coefficients. The
input set (Linf or L2 ball intersected with the box) is concretised at the end: for Linf the ball ∩
box is a box; for L2 the better of the dual-norm bound ``A x0 - eps ||A||_2`` and the bound over the
bounding box of ball ∩ box (both sound, so their maximum is).

Pre-activation bounds are computed layer by layer: every node that feeds a ReLU or max-pool gets
the intersection of its interval bound (from the tightest bounds of its inputs) and its CROWN bound.
Only neurons whose interval bound leaves them unstable are bounded by CROWN when nothing else
needs their values; the first layer keeps its exact interval bound under Linf. Work is batched over
examples and chunked over bounded neurons so memory stays within ``memory_mb``.

Speed: convolutional nodes are bounded in patch mode (:mod:`certify.patches`), with all
channels of a position as the rows of one patch when most of them are selected; a ReLU followed by a
max-pool over disjoint windows is ONE backward step (:class:`certify.layers.ReluPoolRelaxation`);
everything runs without autograd unless the caller asks for gradients. ``Propagator(plain=True)`` is
the reference path without these (dense A, one row per neuron, one step per layer); tests hold the
two equal.

Rounding (docs/soundness.md): a verdict's margins are lowered by their proven rounding error and, where
the float32 ones are positive but not after that, recomputed in float64 on a float64 copy of the network
(:func:`certify.rounding.proven_margins`); :func:`intermediate_bounds` (for LP/SDP) are float64 and proven.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel

from .base import CertResult, Certifier, spec_matrix
from . import patches
from .graph import Graph, build_graph, check_supported, unsupported_reason
from .ibp import Interval, box_lower, input_box
from .layers import (ConvOp, LinearOp, Relaxation, ReluPoolRelaxation, maxpool_relaxation, pool_windows_disjoint,
                     relu_relaxation)
from .rounding import (as_margin_lower, error_bounds, float64_model, margin_pad, padded_boxes, proven_margins,
                       subtract_pad, unit_roundoff)
from .rows import count_groups, selected_first, tighten


def _dot(a: Tensor, v: Tensor) -> Tensor:
    """``A v`` for A (B, S, *shape) with B in {1, N} and v (N, *shape) -> (N, S)."""
    a2, v2 = a.flatten(2), v.flatten(1)
    if a2.shape[0] == 1 and v2.shape[0] != 1:
        return v2 @ a2[0].T
    return torch.einsum("nsd,nd->ns", a2, v2)


#: patch mode groups all channels of a position when at least this fraction of them is selected
GROUP_DENSITY = 0.65


class Propagator:
    """CROWN bounds for one batch of examples: the graph, the input set, every node's bounds."""

    def __init__(self, graph: Graph, x: Tensor, threat: ThreatModel, memory_mb: float = 1024.0,
                 plain: bool = False) -> None:
        self.graph, self.x, self.threat, self.plain = graph, x, threat, plain
        self.input_lower, self.input_upper = input_box(x, threat)
        self.budget = max(1, int(memory_mb * 2 ** 20 / 4 / 4))  # float32 elements, 4 live copies
        self.boxes: dict[int, Interval] = {}
        self.relax: dict[int, Relaxation] = {}
        self.fused: dict[int, ReluPoolRelaxation] = {}  # max-pool node -> its ReLU and itself in one step
        self.macs = 0  # multiply-accumulates of the affine steps of every walk (cost in forward passes)
        nonlinear = [n for n in graph.nodes if n.kind in ("relu", "maxpool")]
        self.needed = {n.inputs[0] for n in nonlinear}

    # --- the backward walk ---------------------------------------------------------------------
    def backward(self, start: int, a: Tensor, alphas: dict[int, Tensor] | None = None,
                 betas: dict[int, Tensor] | None = None, taps: dict[int, Tensor | None] | None = None) -> Tensor:
        """Lower bound (N, S) of ``A node_start`` over the input set, A (B, S, *shape), B in {1, N}.

        ``alphas`` {ReLU node: (N, S, *shape)}: lower slopes of its unstable neurons (alpha-CROWN).
        ``betas`` {ReLU node: (N, S, *shape)}: ``beta * sign`` of branch-and-bound split constraints
        ``sign * z >= 0`` on the ReLU's input z, subtracted from its coefficient (beta-CROWN, Wang et al.
        2021: with beta >= 0 the Lagrangian term is <= 0 on the subdomain, so the bound stays sound).
        ``taps``: the coefficient A (N, S, *shape) arriving at each listed node is stored in it.
        """
        acc: dict[int, Tensor] = {start: a}
        bias: Tensor | float = 0.0
        for i in self.graph.ancestors(start):
            if i not in acc:  # a ReLU folded into the max-pool after it
                continue
            a = acc.pop(i)
            if taps is not None and i in taps:
                taps[i] = a
            node = self.graph.nodes[i]
            if node.kind == "input":
                return bias + self._concretize(a)
            if i in self.fused:
                relu = node.inputs[0]
                a_in, b = self.fused[i].backward(a, None if alphas is None else alphas.get(relu))
                if betas is not None and relu in betas:
                    a_in = a_in - betas[relu]
                bias = bias + b
                targets = [(self.graph.nodes[relu].inputs[0], a_in)]
            elif node.kind == "add":
                targets = [(node.inputs[0], a), (node.inputs[1], a)]
            elif node.kind == "affine":
                self.macs += a.shape[0] * a.shape[1] * node.op.macs
                b = node.op.bias_term(a)
                if b is not None:
                    bias = bias + b
                targets = [(node.inputs[0], node.op.backward(a))]
            else:
                a_in, b = self.relax[i].backward(a, None if alphas is None else alphas.get(i))
                if betas is not None and i in betas:
                    a_in = a_in - betas[i]
                bias = bias + b
                targets = [(node.inputs[0], a_in)]
            for j, t in targets:
                acc[j] = acc[j] + t if j in acc else t
        raise AssertionError("the walk never reached the input")

    def _concretize(self, a: Tensor) -> Tensor:
        lo, hi = self.input_lower, self.input_upper
        bound = box_lower(a, (hi + lo) / 2, (hi - lo) / 2)
        if self.threat.norm == "L2":
            ball = _dot(a, self.x) - self.threat.eps * a.flatten(2).norm(dim=-1)
            bound = torch.maximum(bound, ball)
        return bound

    def _row_cost(self, start: int) -> int:
        """Elements of A per (example, row) at the widest node of the walk from ``start``."""
        cost = 1
        for i in self.graph.ancestors(start):
            node = self.graph.nodes[i]
            k = math.prod(node.op.kernel) if node.kind == "maxpool" else 1
            cost = max(cost, math.prod(node.shape) * k)
        return cost

    # --- pre-activation bounds ------------------------------------------------------------------
    def compute_bounds(self) -> None:
        """Bounds of every node up to the output; CROWN-refined where a nonlinearity needs them."""
        g = self.graph
        for node in g.nodes[:g.output]:
            i = node.index
            if node.kind == "input":
                self.boxes[i] = (self.input_lower, self.input_upper)
                continue
            lo, hi = self.boxes[node.inputs[0]]
            if node.kind == "relu":
                self.relax[i] = relu_relaxation(lo, hi, node.op.negative_slope)
                self.boxes[i] = (node.op.forward(lo), node.op.forward(hi))
            elif node.kind == "maxpool":
                self.relax[i] = maxpool_relaxation(node.op, lo, hi)
                relu = g.nodes[node.inputs[0]]
                if (not self.plain and relu.kind == "relu" and relu.consumers == [i]
                        and pool_windows_disjoint(node.op)):
                    self.fused[i] = ReluPoolRelaxation(self.relax[relu.index], self.relax[i])
                self.boxes[i] = (node.op.forward(lo), node.op.forward(hi))
            elif node.kind == "add":
                lo2, hi2 = self.boxes[node.inputs[1]]
                self.boxes[i] = (lo + lo2, hi + hi2)
            else:
                c, r = node.op.forward((hi + lo) * 0.5), node.op.forward_abs((hi - lo) * 0.5)
                self.boxes[i] = (c - r, c + r)
            if i in self.needed and node.kind in ("affine", "add") and not self._interval_exact(i):
                self.boxes[i] = self._refine(i)

    def _interval_exact(self, index: int) -> bool:
        """Under Linf, interval bounds are exact through at most one non-diagonal affine map."""
        if self.threat.norm != "Linf":
            return False
        nodes = [self.graph.nodes[i] for i in self.graph.ancestors(index)]
        if any(n.kind not in ("affine", "input") for n in nodes):
            return False
        return sum(isinstance(n.op, (LinearOp, ConvOp)) for n in nodes) <= 1

    def _refine(self, index: int) -> Interval:
        """Intersection of the node's interval bound and its CROWN bound (chunked over neurons)."""
        node = self.graph.nodes[index]
        lo, hi = self.boxes[index]
        n, width = lo.shape[0], math.prod(node.shape)
        lo_f, hi_f = lo.flatten(1), hi.flatten(1)
        # a neuron that only feeds ReLUs and is stable under its interval bound needs no CROWN bound
        # (the relaxation of a stable ReLU is exact; auto_LiRPA's sparse intermediate bounds do the same)
        relu_only = all(self.graph.nodes[c].kind == "relu" for c in node.consumers)
        select = ((lo_f < 0) & (hi_f > 0)) if relu_only else torch.ones_like(lo_f, dtype=torch.bool)
        new_lo, new_hi = lo_f.clone(), hi_f.clone()
        counts = select.sum(1)
        rows = int(counts.max()) if n else 0
        if rows == 0:
            return new_lo.reshape(lo.shape), new_hi.reshape(hi.shape)
        if (self.plain or not patches.eligible(self.graph, index)) and bool((counts == width).all()):
            # every neuron: one identity shared by all examples until the first nonlinearity
            chunk = max(1, self.budget // max(1, self._row_cost(index) * n) // 2)
            eye = torch.eye(width, dtype=lo.dtype, device=lo.device)
            for s in range(0, width, chunk):
                e = eye[s:s + chunk]
                bound = self.backward(index, torch.cat([e, -e]).reshape(1, -1, *node.shape))
                m = e.shape[0]
                new_lo[:, s:s + m] = torch.maximum(new_lo[:, s:s + m], bound[:, :m])
                new_hi[:, s:s + m] = torch.minimum(new_hi[:, s:s + m], -bound[:, m:])
            return new_lo.reshape(lo.shape), new_hi.reshape(hi.shape)
        patch = not self.plain and patches.eligible(self.graph, index)
        if patch and self._group_positions(index, select):
            new_lo, new_hi = self._position_rows(index, select, new_lo, new_hi)
            return new_lo.reshape(lo.shape), new_hi.reshape(hi.shape)
        # one row pair per selected neuron; examples go in groups of similar counts, so that padding
        # every example to its group's largest count wastes little (IBP-trained nets vary a lot)
        for group in count_groups(counts):
            sub = self if group.numel() == n else self.subset(group)
            low, up = sub._neuron_rows(index, select[group], new_lo[group], new_hi[group], patch)
            new_lo[group], new_hi[group] = low, up
            if sub is not self:
                self.macs += sub.macs
        return new_lo.reshape(lo.shape), new_hi.reshape(hi.shape)

    def subset(self, index: Tensor) -> "Propagator":
        """This propagator for the examples ``index`` only (input set and relaxations, not the boxes)."""
        sub = Propagator(self.graph, self.x[index], self.threat, plain=self.plain)
        sub.budget = self.budget
        sub.relax = {i: r.select(index) for i, r in self.relax.items()}
        sub.fused = {i: f.select(index) for i, f in self.fused.items()}
        return sub

    def _neuron_rows(self, index: int, select: Tensor, new_lo: Tensor, new_hi: Tensor, patch: bool) -> Interval:
        """Tighten (N, W) bounds with CROWN rows of the selected neurons, dense or in patch mode."""
        n = select.shape[0]
        order, valid = selected_first(select)  # per example, the selected neurons first; padding ignored
        cost = 2 * patches.patch_cost(self.graph, index) if patch else self._row_cost(index)
        walk = self._walk() if patch else None  # one walk for all chunks: its patch matrices are built once
        chunk = max(1, self.budget // max(1, cost * n) // 2)
        for s in range(0, order.shape[1], chunk):
            idx, ok = order[:, s:s + chunk], valid[:, s:s + chunk]
            rows = self._patch_rows(walk, index, idx) if walk is not None else self._dense_rows(index, idx)
            new_lo, new_hi = tighten(new_lo, new_hi, idx, ok, *rows)
        if walk is not None:
            self.macs += walk.macs
        return new_lo, new_hi

    def _walk(self) -> patches.PatchWalk:
        centre, radius = (self.input_upper + self.input_lower) / 2, (self.input_upper - self.input_lower) / 2
        return patches.PatchWalk(self.graph, self.relax, self.fused, centre, radius,
                                 self.x if self.threat.norm == "L2" else None, self.threat.eps)

    def _group_positions(self, index: int, select: Tensor) -> bool:
        """Patch rows by position (all channels) pay when most channels of the positions are selected."""
        c = self.graph.nodes[index].shape[0]
        positions = select.reshape(select.shape[0], c, -1).any(1)
        return int(select.sum()) >= GROUP_DENSITY * c * int(positions.sum())

    def _position_rows(self, index: int, select: Tensor, new_lo: Tensor, new_hi: Tensor) -> Interval:
        """CROWN bounds of a convolutional node in patch mode, one patch per (example, position) that
        holds a selected neuron with all channels (both signs) of that position as its rows: the
        relaxations are unfolded once per position and shared by its 2C rows."""
        c, h, w = self.graph.nodes[index].shape
        n = select.shape[0]
        order, valid = selected_first(select.reshape(n, c, h * w).any(1))
        walk = self._walk()
        eye = torch.eye(c, dtype=self.x.dtype, device=self.x.device)
        start = torch.cat([eye, -eye]).reshape(1, 1, 2 * c, c, 1, 1)
        chunk = max(1, self.budget // max(1, patches.patch_cost(self.graph, index) * 2 * c * n) // 2)
        for s in range(0, order.shape[1], chunk):
            at, ok = order[:, s:s + chunk], valid[:, s:s + chunk]
            bound = walk.bound(index, start, at)  # (N, m, 2C)
            idx = (at[:, :, None] + torch.arange(c, device=at.device) * (h * w)).reshape(n, -1)
            keep = (ok[:, :, None] & select.gather(1, idx).reshape(n, -1, c)).reshape(n, -1)
            new_lo, new_hi = tighten(new_lo, new_hi, idx, keep, bound[..., :c].reshape(n, -1),
                                      -bound[..., c:].reshape(n, -1))
        self.macs += walk.macs
        return new_lo, new_hi

    def _patch_rows(self, walk: patches.PatchWalk, index: int, idx: Tensor) -> Interval:
        """As :meth:`_dense_rows` for a convolutional node, each row a patch around its neuron (``walk``
        counts the multiply-accumulates)."""
        c, h, w = self.graph.nodes[index].shape
        channel = torch.eye(c, dtype=self.x.dtype, device=self.x.device)[idx // (h * w)]  # (N, m, C)
        start = torch.stack([channel, -channel], 2).reshape(*idx.shape, 2, c, 1, 1)
        bound = walk.bound(index, start, idx % (h * w))  # (N, m, 2)
        return bound[..., 0], -bound[..., 1]

    def _dense_rows(self, index: int, idx: Tensor) -> Interval:
        """CROWN (lower, upper) of the flat neurons ``idx`` (N, m) of node ``index``, dense A."""
        node = self.graph.nodes[index]
        n, m = idx.shape
        e = torch.zeros(n, m, math.prod(node.shape), dtype=self.x.dtype, device=self.x.device)
        e.scatter_(2, idx[:, :, None], 1.0)
        bound = self.backward(index, torch.cat([e, -e], 1).reshape(n, 2 * m, *node.shape))
        return bound[:, :m], -bound[:, m:]

    # --- margins --------------------------------------------------------------------------------
    def spec_start(self, y: Tensor) -> Tensor:
        out = self.graph.nodes[self.graph.output]
        if len(out.shape) != 1:
            raise UserInputError(f"the model must return logits (N, K); its output has shape (N, {out.shape})")
        return spec_matrix(y, out.shape[0]).to(self.x.dtype)

    def margins(self, y: Tensor, alphas: dict[int, Tensor] | None = None) -> Tensor:
        """Lower bounds (N, K) of logit_y - logit_j (column y is exactly 0)."""
        bound = self.backward(self.graph.output, self.spec_start(y), alphas)
        return bound.scatter(1, y[:, None], 0.0)


def _chunks(graph: Graph, n: int, memory_mb: float) -> int:
    """Examples per batch: enough that a useful number of rows (64) fits in the budget."""
    widest = max(math.prod(node.shape) * (math.prod(node.op.kernel) if node.kind == "maxpool" else 1)
                 for node in graph.nodes)
    budget = memory_mb * 2 ** 20 / 4 / 4
    return max(1, min(n, int(budget // (widest * 64))))


def intermediate_bounds(model: nn.Module, x: Tensor, threat: ThreatModel,
                        memory_mb: float = 1024.0) -> list[Interval]:
    """CROWN pre-activation bounds ``(lower, upper)`` (N, *shape), float64, of every ReLU's input, in graph
    order, computed on a float64 copy of the network and widened by their proven rounding error
    (:mod:`certify.rounding`): sound for the exact network on the Linf or L2 ball of ``threat`` intersected
    with its box. The order matches the ReLUs of :func:`certify.graph.to_affine_relu`.
    """
    return bounds_and_margins(model, x, None, threat, memory_mb)[0]


def bounds_and_margins(model: nn.Module, x: Tensor, y: Tensor | None, threat: ThreatModel,
                       memory_mb: float = 1024.0) -> tuple[list[Interval], Tensor | None]:
    """:func:`intermediate_bounds` and, for labels ``y`` (N,), CROWN's margin bounds (N, K), float64, from
    the same walk, lowered by their proven rounding error (:func:`certify.rounding.margin_pad`)."""
    graph, x = build_graph(float64_model(model), tuple(x.shape[1:])), x.detach().double()
    relus = [node.inputs[0] for node in graph.nodes if node.kind == "relu"]
    out: list[list[Interval]] = []
    margins: list[Tensor] = []
    step = _chunks(graph, x.shape[0], memory_mb / 2)  # float64: half as many elements
    for s in range(0, x.shape[0], step):
        prop = Propagator(graph, x[s:s + step], threat, memory_mb / 2)
        with torch.no_grad():
            prop.compute_bounds()
            errors = error_bounds(graph, prop.boxes, prop.x, threat, unit_roundoff(torch.float64))
            if y is not None:
                ys = y[s:s + step].to(torch.int64)
                margins.append(subtract_pad(prop.margins(ys), margin_pad(errors[graph.output], ys), ys))
        out.append(padded_boxes([prop.boxes[i] for i in relus], [errors[i] for i in relus]))
    if not out:
        empty = [(x.new_zeros(0, *graph.nodes[i].shape),) * 2 for i in relus]
        return empty, None if y is None else x.new_zeros(0, graph.nodes[graph.output].shape[0])
    bounds = [(torch.cat([o[k][0] for o in out]), torch.cat([o[k][1] for o in out])) for k in range(len(relus))]
    return bounds, torch.cat(margins) if y is not None else None


class CROWN(Certifier):
    """CROWN margins with adaptive ReLU slopes; ``alpha_steps > 0`` optimises the lower slopes.

    Args:
        alpha_steps: projected-gradient (Adam) steps on the lower ReLU slopes of the final margin
            bound, one slope per (example, margin, neuron) as in alpha-CROWN; 0 is plain CROWN.
            The best bound seen is kept, so alpha-CROWN is never looser than CROWN.
        alpha_lr: Adam step size of the slopes.
        memory_mb: budget for the coefficient tensors; examples and neurons are chunked to fit.

    Shapes: x (N, ...) in the box, y (N,) int64; margins (N, K). ``bound_margins`` called under grad
    mode is differentiable in the parameters (CROWN-style certified training); the evaluator's
    ``certifier(model, x, y, threat)`` runs without autograd to save the memory of the graph.
    """

    name = "crown"
    differentiable = False
    skip_refuted = True  # in the evaluator: IBP (cheap) still cross-checks soundness on every example

    def __init__(self, *, alpha_steps: int = 0, alpha_lr: float = 0.5, memory_mb: float = 1024.0) -> None:
        if not isinstance(alpha_steps, int) or alpha_steps < 0:
            raise UserInputError(f"alpha_steps must be an integer >= 0, got {alpha_steps!r}")
        if not (isinstance(alpha_lr, (int, float)) and alpha_lr > 0):
            raise UserInputError(f"alpha_lr must be > 0, got {alpha_lr!r}")
        if not (isinstance(memory_mb, (int, float)) and memory_mb > 0):
            raise UserInputError(f"memory_mb must be > 0, got {memory_mb!r}")
        self.alpha_steps, self.alpha_lr, self.memory_mb = alpha_steps, float(alpha_lr), float(memory_mb)

    def check_supported(self, model: nn.Module) -> None:
        check_supported(model)

    def unsupported(self, model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
        return unsupported_reason(model, input_shape)

    def bound_margins(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """The margins as computed in x's dtype (differentiable under grad mode; not lowered by their
        rounding error: a verdict comes from :meth:`run`)."""
        return self._bound(model, x, y, threat)[0]

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> CertResult:
        """Margins proven under rounding (:func:`certify.rounding.proven_margins`), then the verdicts."""
        margin_lower, cost = self._bound(model, x, y, threat, proven=True)
        return self._result(as_margin_lower(margin_lower, x.dtype), y, cost)

    def _bound(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
               proven: bool = False) -> tuple[Tensor, float]:
        """Margins (N, K) and their cost in forward passes of the batch (affine multiply-accumulates of
        every backward walk over those of N forward passes; autograd's backward counts twice its walk).
        ``proven``: float64 margins lowered by their rounding error, recomputed in float64 where needed;
        the error bounds cost a forward pass of the examples they cover."""
        graph = build_graph(model, tuple(x.shape[1:]))
        y = y.to(torch.int64)
        step = _chunks(graph, x.shape[0], self.memory_mb)
        parts, macs, exact = [], 0, []
        for s in range(0, x.shape[0], step):
            xs, ys = x[s:s + step], y[s:s + step]
            prop = Propagator(graph, xs, threat, self.memory_mb)
            prop.compute_bounds()
            margin, alphas = self._optimise(prop, ys) if self.alpha_steps else (prop.margins(ys), {})
            macs += prop.macs
            if proven:
                def recompute(rows: Tensor, xs=xs, ys=ys, alphas=alphas):
                    nonlocal macs
                    if not exact:
                        exact.append(build_graph(float64_model(model), tuple(x.shape[1:])))
                    again = Propagator(exact[0], xs[rows].double(), threat, self.memory_mb / 2)
                    again.compute_bounds()
                    bound = again.margins(ys[rows])
                    if alphas:  # the slopes alpha-CROWN found, in float64
                        bound = torch.maximum(bound, again.margins(ys[rows], {i: a[rows].double()
                                                                               for i, a in alphas.items()}))
                    macs += again.macs + rows.numel() * graph.forward_macs
                    return exact[0], again.boxes, again.x, bound
                margin = proven_margins(graph, prop.boxes, xs, ys, threat, margin, recompute)
                macs += xs.shape[0] * graph.forward_macs
            parts.append(margin)
        if not parts:
            return x.new_zeros(0, graph.nodes[graph.output].shape[0]), 0.0
        return torch.cat(parts), macs / max(1, x.shape[0] * graph.forward_macs)

    def _optimise(self, prop: Propagator, y: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """alpha-CROWN on the final bound: Adam on slopes in [0, 1], keeping the best bound per margin and
        the slopes (N, K, *shape) per ReLU that gave it."""
        k = prop.graph.nodes[prop.graph.output].shape[0]
        with torch.no_grad():
            best = prop.margins(y)
        relus = [i for i, r in prop.relax.items() if r.kind == "relu" and bool(r.unstable.any())]
        if not relus:
            return best, {}
        with torch.enable_grad():
            alphas = {i: prop.relax[i].lower_slope.detach().unsqueeze(1).expand(-1, k, *prop.relax[i].lower_slope.shape[1:])
                      .clone().requires_grad_(True) for i in relus}
            kept = {i: a.detach().clone() for i, a in alphas.items()}  # the initial slopes give CROWN's bound
            opt = torch.optim.Adam(list(alphas.values()), lr=self.alpha_lr)
            for _ in range(self.alpha_steps):
                before = prop.macs
                bound = prop.margins(y, alphas)
                prop.macs += 2 * (prop.macs - before)  # the gradient's backward pass
                best = _keep_best(best, bound.detach(), alphas, kept)
                grads = torch.autograd.grad(-bound.sum(), list(alphas.values()))
                for a, g in zip(alphas.values(), grads):
                    a.grad = g
                opt.step()
                with torch.no_grad():
                    for a in alphas.values():
                        a.clamp_(0.0, 1.0)
        with torch.no_grad():
            best = _keep_best(best, prop.margins(y, alphas), alphas, kept)
        return best, kept


def _keep_best(best: Tensor, bound: Tensor, alphas: dict[int, Tensor], kept: dict[int, Tensor]) -> Tensor:
    """Where ``bound`` (N, K) beats ``best``, take it and copy its slopes into ``kept``."""
    better = bound > best
    for i, a in alphas.items():
        kept[i] = torch.where(better.reshape(*better.shape, *[1] * (a.dim() - 2)), a.detach(), kept[i])
    return torch.maximum(best, bound)


class AlphaCROWN(CROWN):
    """alpha-CROWN: CROWN with optimised lower ReLU slopes (Xu et al. 2021); 20 Adam steps by default."""

    name = "alpha-crown"

    def __init__(self, *, alpha_steps: int = 20, alpha_lr: float = 0.5, memory_mb: float = 1024.0) -> None:
        super().__init__(alpha_steps=alpha_steps, alpha_lr=alpha_lr, memory_mb=memory_mb)
