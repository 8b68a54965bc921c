"""Sound float64 bounds for branch and bound: a float64 copy of the network and a proven rounding allowance.

A ``certified`` verdict of :mod:`certify.bab` must hold in exact arithmetic for the network whose
parameters are the model's float values. The float32 bounds that steer the search carry no such
guarantee, so every bound that closes a subdomain is recomputed here in float64, from the same
alpha (lower slopes, any value in [0, 1] is valid) and beta (split multipliers, any value >= 0), and
an allowance for every rounding is subtracted. The rules (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2002, Sec. 2.2 and 3.1), with ``u = 2^-53``:

- one operation: ``|fl(a op b) - a op b| <= u |a op b|`` (plus at most 2^-1074 when it underflows);
- a sum of n terms, in ANY order or blocking (BLAS, convolutions): off by at most
  ``gamma_n * sum |terms|``, ``gamma_n = n u / (1 - n u)``.

A backward step ``A' = A W`` that rounds to ``A' + E`` changes the linear function by ``E h`` where h
is the layer's input; ``|E h| <= gamma_n (|A| |W|) |h| = gamma_n |A| (|W| |h|)``, so with ``m >= |h|``
from sound interval bounds of every node the allowance of a step is one dot product of ``|A|`` with the
precomputed ``|W| m``. Relaxation products, sums at residual joins, bias terms and the final
concretisation are bounded the same way; every gamma below is doubled and the total is scaled by
``1 + 2^-20`` so that the rounding of the allowance itself is covered. Parameters derived in floating
point (Normalize's ``1/std``, folded BatchNorm) are off by a few units in the last place; each
affine step counts ``EXTRA`` more terms for them (libm's ``rsqrt`` is assumed within 4 ulp).

ReLU upper lines are recomputed so that they lie above the ReLU at both ends of the (sound) input
interval despite rounding (intercept raised by 8u * upper); max-pool intercepts are rounded up.
The input box is rounded outward. Until the shared rounding module of the soundness work lands this
is the minimum :mod:`certify.bab` needs.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import Tensor, nn

from robustbench_lite.threat import ThreatModel

from .graph import Graph, build_graph
from .layers import (AffineOp, ChannelAffineOp, ConvOp, LinearOp, MaxPoolOp, Relaxation, ReshapeOp,
                     maxpool_relaxation, relu_relaxation)

U = 2.0 ** -53
EXTRA = 8  # terms added per affine step for parameters derived in floating point
UNDERFLOW = 2.0 ** -900  # far above the 2^-1074 per operation that underflow can add, for any size here
Interval = tuple[Tensor, Tensor]


def gamma(n: int) -> float:
    """Twice Higham's gamma_n: a bound on the relative error of a sum of n terms, with room to spare."""
    return 2.0 * n * U / (1.0 - n * U)


def down(t: Tensor) -> Tensor:
    return torch.nextafter(t, torch.full_like(t, -math.inf))


def up(t: Tensor) -> Tensor:
    return torch.nextafter(t, torch.full_like(t, math.inf))


def to_float32_outward(lo: Tensor, hi: Tensor) -> Interval:
    """float32 bounds that contain the float64 interval [lo, hi]."""
    lo32, hi32 = lo.float(), hi.float()
    lo32 = torch.where(lo32.double() > lo, down(lo32), lo32)
    hi32 = torch.where(hi32.double() < hi, up(hi32), hi32)
    return lo32, hi32


def sound_input_box(x: Tensor, threat: ThreatModel) -> Interval:
    """float64 box containing (ball of radius eps around x) ∩ input box, in exact arithmetic."""
    x64 = x.double()
    lo_box, hi_box = threat.box
    lo = down(x64 - threat.eps).clamp(min=lo_box)
    hi = up(x64 + threat.eps).clamp(max=hi_box)
    return lo, hi


def float64_graph(model: nn.Module, input_shape: tuple[int, ...]) -> Graph:
    """The graph of a float64 copy of ``model`` (the model itself is untouched)."""
    return build_graph(copy.deepcopy(model).double(), input_shape)


def _weight_variant(op: AffineOp, fn) -> AffineOp | None:
    """``op`` with its weight (or scale) replaced by ``fn(weight)`` and no bias; None for a reshape."""
    if isinstance(op, LinearOp):
        return LinearOp(fn(op.weight), None, op.in_shape)
    if isinstance(op, ConvOp):
        return ConvOp(fn(op.weight), None, op.stride, op.padding, op.dilation, op.groups, op.in_shape)
    if isinstance(op, ChannelAffineOp):
        return ChannelAffineOp(fn(op.scale).flatten(), torch.zeros_like(op.shift).flatten(), op.in_shape)
    if isinstance(op, ReshapeOp):
        return None
    raise AssertionError(f"no sound rounding rule for {type(op).__name__}")


def _terms(op: AffineOp) -> int:
    """An upper bound on the terms of one output entry (or one backward entry) of ``op``, plus EXTRA."""
    return math.prod(op.in_shape) + math.prod(op.out_shape) + EXTRA


def sound_relu_relaxation(lo: Tensor, hi: Tensor) -> Relaxation:
    """CROWN's ReLU relaxation with an upper line that is above the ReLU on [lo, hi] despite rounding.

    With s = fl(hi / fl(hi - lo)) = s*(1 + d), |d| <= 2.1u, the line s z + c is above the ReLU at z = lo
    iff c >= s|lo| and at z = hi iff c >= hi (1 - s); both are at most hi|lo|/(hi - lo) + 3u hi, and
    fl(s|lo|) + 8u hi rounded up exceeds that.
    """
    r = relu_relaxation(lo, hi)
    icpt = up(r.upper_slope * lo.abs() + 8 * U * hi.abs())
    r.upper_intercept = torch.where(r.unstable, icpt, torch.zeros_like(icpt))
    return r


def sound_maxpool_relaxation(pool: MaxPoolOp, lo: Tensor, hi: Tensor) -> Relaxation:
    """:func:`certify.layers.maxpool_relaxation` with each window's intercept recomputed, rounded up,
    for the upper weights it chose (none, one entry, or all entries)."""
    r = maxpool_relaxation(pool, lo, hi)
    lw, hw = pool.windows(lo), pool.windows(hi)
    valid = torch.isfinite(lw)
    lw0 = torch.where(valid, lw, torch.zeros_like(lw))
    k = lw.shape[-1]
    w = r.upper_slope
    count = w.sum(-1)
    u_max = hw.amax(-1)  # exact
    chosen = w.argmax(-1, keepdim=True)
    others = torch.where(torch.arange(k, device=lw.device) == chosen, torch.full_like(hw, -math.inf), hw).amax(-1)
    one = up((others - lw0.gather(-1, chosen).squeeze(-1)).clamp(min=0))
    total = lw.amax(-1) - lw0.sum(-1)
    every = up(total + gamma(k + 1) * (lw.amax(-1).abs() + lw0.abs().sum(-1)))
    r.upper_intercept = torch.where(count == 0, u_max, torch.where(count == 1, one, every))
    return r


def _dot(a: Tensor, v: Tensor) -> Tensor:
    """sum over the node of a (B, S, *shape) times v (N, *shape), B and N in {1, D} -> (D, S)."""
    a2, v2 = a.flatten(2), v.flatten(1)
    if v2.shape[0] == 1:
        return a2 @ v2[0]
    if a2.shape[0] == 1:
        return v2 @ a2[0].T
    return torch.einsum("nsd,nd->ns", a2, v2)


def magnitudes(graph: Graph, lo: Tensor, hi: Tensor) -> dict[int, Tensor]:
    """m (1 or N, *shape) per node with |value| <= m over the input box [lo, hi], and dominating the
    coefficient chains of every CROWN walk: m = |W| m_in + |b| (affine), m_in (ReLU), the window SUM of
    m_in (max-pool: its relaxations may put weight 1 on every entry), m1 + m2 (residual add)."""
    m: dict[int, Tensor] = {}
    for node in graph.nodes[:graph.output + 1]:
        if node.kind == "input":
            m[0] = torch.maximum(lo.abs(), hi.abs())
        elif node.kind == "relu":
            m[node.index] = m[node.inputs[0]]
        elif node.kind == "maxpool":
            w = node.op.windows(m[node.inputs[0]])
            m[node.index] = torch.where(torch.isfinite(w), w, torch.zeros_like(w)).sum(-1)
        elif node.kind == "add":
            m[node.index] = m[node.inputs[0]] + m[node.inputs[1]]
        else:
            absop = _weight_variant(node.op, torch.abs)
            mi = m[node.inputs[0]]
            if absop is None:
                m[node.index] = node.op.forward(mi)
            else:
                bias = node.op.forward(torch.zeros_like(mi[:1])).abs()
                m[node.index] = (absop.forward(mi) + bias) * (1 + gamma(_terms(node.op)))
    return m


def crown_allowance(graph: Graph, lo: Tensor, hi: Tensor) -> Callable[[int, Interval], Interval]:
    """``widen(node, (lower, upper))``: float64 interval or CROWN bounds of ``node`` (computed by
    :class:`certify.crown.Propagator` on a float64 graph, patch mode or dense, any summation order)
    widened by an a-priori bound on their rounding error.

    Every step of a walk from ``node`` with a one-hot row has coefficients |A_k| <= (1 + g)^k times the
    chain of |W|, ReLU slopes and max-pool weights (all in [0, 1]), so its rounding error, its bias
    and intercept terms (ReLU chord intercepts are <= |l| <= m, max-pool intercepts <= 2 m) and the
    rounding of the relaxations themselves (chord within 3u hi) are each at most a small multiple of
    ``gamma_N * m[node]``; the allowance is ``C * (steps + 1) * gamma_N * m[node]`` with N an upper
    bound on the terms of any sum of the walk and C = 4 (largest pool window + 4). The same bound
    covers the interval (IBP) bounds, whose steps are a subset."""
    m = magnitudes(graph, lo, hi)
    kernel = max([math.prod(n.op.kernel) for n in graph.nodes if n.kind == "maxpool"] + [1])
    terms = sum(math.prod(n.shape) for n in graph.nodes) * kernel + EXTRA
    c = 4 * (kernel + 4)

    def widen(index: int, box: Interval) -> Interval:
        width = c * (len(graph.ancestors(index)) + 1) * gamma(terms) * m[index] + UNDERFLOW
        return down(box[0] - width), up(box[1] + width)

    return widen


class SoundPropagator:
    """float64 linear bounds with a per-step rounding allowance, for one example and D domains of it.

    ``boxes`` {node: (lo, hi)}: sound float64 bounds of every node up to the output's input (the
    widened root bounds); :meth:`relax_from` sets the sound relaxations (per domain, D rows, or shared).
    """

    def __init__(self, graph: Graph, x: Tensor, threat: ThreatModel, boxes: dict[int, Interval]) -> None:
        self.graph, self.threat = graph, threat
        self.x = x.double()
        self.input_lower, self.input_upper = sound_input_box(x, threat)
        self.boxes = dict(boxes)
        self.boxes[0] = (self.input_lower, self.input_upper)
        self.relax: dict[int, Relaxation] = {}
        self.weighted_mag: dict[int, Tensor] = {}  # affine node -> |W| max|input| (its step's error scale)
        for node in graph.nodes[:graph.output + 1]:
            if node.kind == "affine":
                absop = _weight_variant(node.op, torch.abs)
                mag = self._mag(node.inputs[0])
                self.weighted_mag[node.index] = mag if absop is None else absop.forward(mag)

    def relax_from(self, pre: dict[int, Interval], rows: int) -> None:
        """Sound relaxations (``rows`` domains) of every ReLU and max-pool from the bounds ``pre`` of their
        inputs (node -> (lo, hi), 1 or ``rows`` rows), or the root's bounds where ``pre`` has none."""
        for node in self.graph.nodes:
            if node.kind not in ("relu", "maxpool"):
                continue
            lo, hi = pre.get(node.inputs[0], self.boxes[node.inputs[0]])
            lo, hi = lo.expand(rows, *lo.shape[1:]), hi.expand(rows, *hi.shape[1:])
            if node.kind == "relu":
                self.relax[node.index] = sound_relu_relaxation(lo, hi)
            else:
                self.relax[node.index] = sound_maxpool_relaxation(node.op, lo, hi)

    # --- the walk ----------------------------------------------------------------------------
    def _mag(self, index: int) -> Tensor:
        lo, hi = self.boxes[index]
        return torch.maximum(lo.abs(), hi.abs())

    def backward(self, start: int, a: Tensor, alphas: dict[int, Tensor] | None = None,
                 betas: dict[int, Tensor] | None = None) -> Tensor:
        """A sound lower bound (N, S) of ``A node_start`` in exact arithmetic; A (B, S, *shape) float64."""
        alphas, betas = alphas or {}, betas or {}
        acc: dict[int, Tensor] = {start: a}
        bias: Tensor | float = 0.0
        err: Tensor | float = 0.0
        ops = 0
        for i in self.graph.ancestors(start):
            if i not in acc:
                continue
            a = acc.pop(i)
            node = self.graph.nodes[i]
            ops += 1
            if node.kind == "input":
                bound, e = self._concretize(a)
                total = bias + bound
                err = err + e + U * total.abs() + ops * UNDERFLOW
                return down(total - err * (1 + 2.0 ** -20))
            if node.kind == "add":
                targets = [(node.inputs[0], a), (node.inputs[1], a)]
            elif node.kind == "affine":
                op = node.op
                b = op.bias_term(a)
                if b is not None:
                    vec = op.forward(torch.zeros((1, *op.in_shape), dtype=a.dtype, device=a.device)).abs()
                    err = err + gamma(_terms(op)) * _dot(a.abs(), vec)
                    bias = bias + b
                    err = err + U * bias.abs()
                if not isinstance(op, ReshapeOp):
                    err = err + gamma(_terms(op)) * _dot(a.abs(), self.weighted_mag[i])
                targets = [(node.inputs[0], op.backward(a))]
            else:
                relax = self.relax[i]
                a_in, b = relax.backward(a, alphas.get(i))
                if i in betas:
                    a_in = a_in - betas[i]
                mag = self._mag(node.inputs[0])
                k = math.prod(relax.pool.kernel) if relax.kind == "maxpool" else 1
                # products and the (overlapping-window) sums of the step, beta's subtraction, the bias sum
                err = err + gamma(k + 2) * _dot(a_in.abs() + (betas[i].abs() if i in betas else 0), mag)
                neg = a.clamp(max=0).abs()
                err = err + gamma(math.prod(relax.upper_intercept.shape[1:]) + 1) * _dot(neg, relax.upper_intercept.abs())
                bias = bias + b
                err = err + U * bias.abs()
                targets = [(node.inputs[0], a_in)]
            for j, t in targets:
                if j in acc:
                    acc[j] = acc[j] + t
                    err = err + U * _dot(acc[j].abs(), self._mag(j))
                else:
                    acc[j] = t
        raise AssertionError("the walk never reached the input")

    def _concretize(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """min over the input set of A x (sound up to the returned allowance): (bound, allowance)."""
        lo, hi = self.input_lower, self.input_upper
        n = math.prod(a.shape[2:])
        mag = torch.maximum(lo.abs(), hi.abs())
        box = _dot(a.clamp(min=0), lo) + _dot(a.clamp(max=0), hi)
        box_err = gamma(2 * n + 1) * _dot(a.abs(), mag)
        if self.threat.norm != "L2":
            return box, box_err
        norm = a.flatten(2).norm(dim=-1)
        ball = _dot(a, self.x) - self.threat.eps * norm
        ball_err = gamma(2 * n + 4) * (_dot(a.abs(), self.x.abs()) + self.threat.eps * norm) + U * ball.abs()
        # the larger of two sound bounds is sound: compare them net of their own allowances
        use_ball = ball - ball_err > box - box_err
        return torch.where(use_ball, ball, box), torch.where(use_ball, ball_err, box_err)
