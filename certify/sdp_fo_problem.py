"""The SDP relaxation of :mod:`certify.sdp_problem` as matrix-free products through the shared graph, for
the first-order dual of Dathathri et al. 2020 ("Enabling certification of verification-agnostic networks
via memory-efficient semidefinite programming", arXiv 2010.11645).

One row is one (example, class) problem. Its lifted coordinates are the free input coordinates and the
unstable neurons, each normalised to ``w in [-1, 1]`` (``x = mid + half * w``; unstable ``z = h (1 + w)``,
``h = u / 2``); stable neurons are affine in them (active ``z = s``, inactive ``z = 0``), exactly as the
reduced problem of :mod:`certify.sdp_problem`. Every pre-activation is ``s = s0 + J w`` and the logits
``logits0 + J_out w``: ``J v`` is ONE forward pass through the graph with the layers' own linear products
(:meth:`certify.layers.AffineOp.linear`) and ``J^T g`` one backward pass (``AffineOp.backward``). Vectors
live in the full activation layout (input, then every ReLU in graph order), flattened to (B, N) and zero
off the lifted coordinates, so memory is linear in the number of activations.

Multipliers (per neuron of each ReLU's input, (B, *shape)) of the constraints of the relaxation::

    lower >= 0: s - l >= 0       upper >= 0: u - s >= 0                     every neuron
    relu >= 0:  z - s >= 0       triangle >= 0: slope s + icpt - z >= 0     unstable neurons
    product (free): z (z - s) = 0                                           unstable neurons
    ball >= 0 (L2): eps^2 - ||x - x0||^2 >= 0

turn ``c^T logits`` into the Lagrangian ``const + <M, P>`` over ``P = [[1, w^T], [w, W]]`` with
``M = [[0, m^T], [m, R]]``: R's diagonal is ``-product h^2`` (unstable) and ``ball half^2`` (inputs), its
off-diagonal ``1/2 product_k h_k J_k`` in the row of unstable neuron k (only earlier coordinates: the
strict lower triangle). With ``kappa >= 0`` on ``W_kk <= 1`` and ``kappa_0`` on ``P_00 = 1`` the dual bound is
``const - kappa_0 - sum(kappa) + (n + 1) min(0, lambda_min(M + diag(kappa_0, kappa)))`` (n lifted
coordinates). :mod:`certify.sdp_fo_verify` evaluates it soundly.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import Tensor

from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel

from .graph import Graph
from .ibp import input_box


@dataclass
class Multipliers:
    """Dual variables of the rows (B problems); lists hold one tensor (B, *shape) per ReLU layer."""

    lower: list[Tensor]
    upper: list[Tensor]
    relu: list[Tensor]
    triangle: list[Tensor]
    product: list[Tensor]
    kappa: Tensor  # (B, N) on the lifted coordinates
    kappa0: Tensor  # (B,)
    ball: Tensor  # (B,)

    def tensors(self) -> list[Tensor]:
        out: list[Tensor] = []
        for f in fields(self):
            v = getattr(self, f.name)
            out += v if isinstance(v, list) else [v]
        return out

    def map(self, fn) -> "Multipliers":
        return Multipliers(**{f.name: [fn(t) for t in v] if isinstance(v, list) else fn(v)
                              for f in fields(self) for v in [getattr(self, f.name)]})

    def rows(self, index: Tensor) -> "Multipliers":
        return self.map(lambda t: t[index])


@dataclass
class Parts:
    """The Lagrangian of one set of multipliers: ``const`` (B,); ``cot_pre`` (per layer) and ``cot_logits`` (B, K),
    the coefficients of s and of the logits; ``direct`` (B, N), the linear coefficients of w that do not go
    through J; ``diag`` (B, N), R's diagonal; ``coupling`` (per layer, ``product * h``)."""

    const: Tensor
    cot_pre: list[Tensor]
    cot_logits: Tensor
    direct: Tensor
    diag: Tensor
    coupling: list[Tensor]


class LiftedProblem:
    """Rows of (example, class) problems over one graph; every per-row tensor has B rows.

    ``x`` (B, *in) the examples (repeated per class), ``bounds`` one (lower, upper) (B, *shape) per ReLU in
    graph order (sound pre-activation bounds, e.g. CROWN's padded), ``spec`` (B, K) the margins ``c``.
    Raises :class:`UserInputError` for graphs outside plain ReLU networks (max-pool, leaky slopes).
    """

    @torch.no_grad()
    def __init__(self, graph: Graph, x: Tensor, bounds: list[tuple[Tensor, Tensor]], threat: ThreatModel,
                 spec: Tensor) -> None:
        bad = [f"{n.name} ({n.kind})" for n in graph.nodes[:graph.output + 1]
               if n.kind not in ("input", "affine", "relu", "add") or getattr(n.op, "negative_slope", 0.0)]
        if bad:
            raise UserInputError(f"the SDP lifts ReLU networks only; got {', '.join(bad)}")
        self.graph, self.dtype = graph, x.dtype
        self.relus = [n.index for n in graph.nodes[:graph.output] if n.kind == "relu"]
        self.pre = [graph.nodes[i].inputs[0] for i in self.relus]
        if len(bounds) != len(self.relus):
            raise UserInputError(f"{len(bounds)} bounds for {len(self.relus)} ReLU layers")
        lo, hi = input_box(x, threat)
        self.rows = x.shape[0]
        # the normalised box [mid - half, mid + half] must contain [lo, hi] in exact arithmetic: pad the rounding
        u = torch.finfo(x.dtype).eps / 2
        half = (hi - lo) / 2
        self.mid = lo + half
        self.half = torch.where(hi > lo, half * (1 + 4 * u) + 2 * u * (lo.abs() + hi.abs()) + 1e-300, 0.0)
        self.center = x if threat.norm == "L2" else None
        self.radius = float(threat.eps)
        x = x.detach()
        self.lower = [b[0].detach().to(x.dtype) for b in bounds]
        self.upper = [b[1].detach().to(x.dtype) for b in bounds]
        self.active = [(a >= 0).to(x.dtype) for a in self.lower]
        unstable = [(a < 0) & (b > 0) for a, b in zip(self.lower, self.upper)]
        self.unstable = [u.to(x.dtype) for u in unstable]
        self.h = [torch.where(u, b / 2, torch.zeros_like(b)) for u, b in zip(unstable, self.upper)]
        width = [torch.where(u, b - a, torch.ones_like(b)) for u, a, b in zip(unstable, self.lower, self.upper)]
        self.slope = [torch.where(u, b / w, torch.zeros_like(b)) for u, b, w in zip(unstable, self.upper, width)]
        # rounding may only loosen the triangle's upper line (as certify.convex.Relaxation does)
        self.icpt = [-s * torch.where(u, a, torch.zeros_like(a)) + 1e-12 * (1 + a.abs() + b.abs()) * u
                     for s, u, a, b in zip(self.slope, unstable, self.lower, self.upper)]
        self.shapes = [tuple(x.shape[1:])] + [tuple(a.shape[1:]) for a in self.lower]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.mask = self.join([(self.half > 0).to(x.dtype)] + self.unstable)  # (B, N): lifted coordinates
        self.n = self.mask.sum(1)  # (B,) lifted coordinates per row
        self.spec = spec.to(x.dtype)
        self._passes = [0.0]  # forward/backward passes of one example, shared by every select()ed view
        self.s0, self.logits0 = self.offset()

    def select(self, index: Tensor) -> "LiftedProblem":
        """The rows ``index`` only (a shallow copy; the graph is shared)."""
        out = copy.copy(self)
        for name in ("half", "mid", "center", "mask", "n", "spec", "logits0"):
            value = getattr(self, name)
            setattr(out, name, None if value is None else value[index])
        for name in ("lower", "upper", "active", "unstable", "h", "slope", "icpt", "s0"):
            setattr(out, name, [t[index] for t in getattr(self, name)])
        out.rows = out.mask.shape[0]
        return out

    @property
    def passes(self) -> float:
        """Passes through the network so far (each jvp or vjp of B rows counts B), this problem and its views."""
        return self._passes[0]

    # --- layout --------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.offsets[-1]

    def split(self, flat: Tensor) -> list[Tensor]:
        """(B, N) -> [input (B, *in), layer_i (B, *shape_i)] (views)."""
        return [flat[:, a:b].reshape(-1, *s) for a, b, s in zip(self.offsets, self.offsets[1:], self.shapes)]

    def join(self, parts: list[Tensor]) -> Tensor:
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1)

    # --- the affine map w -> (s, logits) and its transpose ---------------------------------------
    def walk(self, x: Tensor, relu_in: list[Tensor], affine: Callable[[Any, Tensor], Tensor]) -> tuple[list[Tensor], Tensor]:
        """The lifted network's forward pass: ``affine(op, value)`` at every affine node, ``active * z +
        relu_in[i]`` at ReLU i (the lifted coordinates enter there), sums at residual additions. Returns
        every ReLU's input and the logits."""
        values: list[Tensor] = []
        layer = {r: i for i, r in enumerate(self.relus)}
        for node in self.graph.nodes[:self.graph.output + 1]:
            if node.kind == "input":
                values.append(x)
            elif node.kind == "add":
                values.append(values[node.inputs[0]] + values[node.inputs[1]])
            elif node.kind == "relu":
                i = layer[node.index]
                values.append(self.active[i] * values[node.inputs[0]] + relu_in[i])
            else:
                values.append(affine(node.op, values[node.inputs[0]]))
        return [values[p] for p in self.pre], values[self.graph.output]

    def _forward(self, x: Tensor, relu_in: list[Tensor], linear: bool) -> tuple[list[Tensor], Tensor]:
        if hasattr(self, "_passes"):
            self._passes[0] += x.shape[0]
        return self.walk(x, relu_in, (lambda op, v: op.linear(v)) if linear else (lambda op, v: op.forward(v)))

    def offset(self) -> tuple[list[Tensor], Tensor]:
        """Pre-activations and logits at w = 0."""
        return self._forward(self.mid, self.h, linear=False)

    def jvp(self, v: Tensor) -> tuple[list[Tensor], Tensor]:
        """``J v`` for v (B, N): the pre-activations' (per layer) and the logits' linear parts."""
        parts = self.split(v)
        return self._forward(self.half * parts[0], [h * p for h, p in zip(self.h, parts[1:])], linear=True)

    def vjp(self, cot_pre: list[Tensor], cot_logits: Tensor | None) -> Tensor:
        """``J^T g`` (B, N) for cotangents g on every ReLU's input (B, *shape_i) and on the logits (B, K)."""
        return self.transpose(cot_pre, cot_logits)[0]

    def transpose(self, cot_pre: list[Tensor], cot_logits: Tensor | None, hook=None) -> tuple[Tensor, list[Tensor]]:
        """As :meth:`vjp`; ``hook(i, cot_z) -> extra cotangent of layer i's input`` runs at every ReLU (the
        cotangents of its output arriving from above: CROWN's walk). Returns (J^T g, the hook's cotangents)."""
        acc: dict[int, Tensor] = {}

        def add(i: int, t: Tensor) -> None:
            acc[i] = acc[i] + t if i in acc else t

        if cot_logits is not None:
            add(self.graph.output, cot_logits)
        for p, c in zip(self.pre, cot_pre):
            if c is not None:
                add(p, c)
        layer = {r: i for i, r in enumerate(self.relus)}
        batch = next(c for c in [cot_logits, *cot_pre] if c is not None).shape[0]
        self._passes[0] += batch
        grads: list[Tensor | None] = [None] * len(self.shapes)
        hooked: list[Tensor] = [torch.zeros_like(h) for h in self.h]
        for node in reversed(self.graph.nodes[:self.graph.output + 1]):
            if node.index not in acc:
                continue
            a = acc.pop(node.index)
            if node.kind == "input":
                grads[0] = self.half * a
            elif node.kind == "add":
                add(node.inputs[0], a)
                add(node.inputs[1], a)
            elif node.kind == "relu":
                i = layer[node.index]
                grads[i + 1] = self.h[i] * a
                back = self.active[i] * a
                if hook is not None:
                    hooked[i] = hook(i, a)
                    back = back + hooked[i]
                add(node.inputs[0], back)
            else:
                add(node.inputs[0], node.op.backward(a.unsqueeze(1)).squeeze(1))
        grads = [torch.zeros(batch, *s, dtype=self.dtype, device=self.mid.device) if g is None else g
                 for g, s in zip(grads, self.shapes)]
        return self.join(grads) * self.mask, hooked

    # --- the Lagrangian ----------------------------------------------------------------------------
    def parts(self, mult: Multipliers) -> Parts:
        """The Lagrangian's pieces for ``mult`` (differentiable in it)."""
        sums = lambda t: t.flatten(1).sum(1)  # noqa: E731
        cot_pre, direct, diag, coupling = [], [], [], []
        const = (self.spec * self.logits0).sum(1)
        for i in range(len(self.relus)):
            hp = self.h[i] * mult.product[i]
            cot = -mult.lower[i] + mult.upper[i] + mult.relu[i] - self.slope[i] * mult.triangle[i] + hp
            cot_pre.append(cot)
            const = const + sums(cot * self.s0[i] + mult.lower[i] * self.lower[i] - mult.upper[i] * self.upper[i]
                                 - mult.triangle[i] * self.icpt[i] + (mult.triangle[i] - mult.relu[i]) * self.h[i]
                                 - hp * self.h[i])
            direct.append((mult.triangle[i] - mult.relu[i]) * self.h[i] - 2 * hp * self.h[i] + hp * self.s0[i])
            diag.append(-hp * self.h[i])
            coupling.append(hp)
        ball = mult.ball[:, None].reshape(-1, *([1] * len(self.shapes[0])))
        if self.center is not None:
            gap = self.mid - self.center
            const = const + mult.ball * (sums(gap * gap) - self.radius ** 2)
            direct.insert(0, 2 * ball * self.half * gap)
            diag.insert(0, ball * self.half ** 2)
        else:
            direct.insert(0, torch.zeros_like(self.mid))
            diag.insert(0, torch.zeros_like(self.mid))
        return Parts(const, cot_pre, self.spec, self.join(direct) * self.mask, self.join(diag) * self.mask, coupling)

    def linear_coefficient(self, parts: Parts) -> Tensor:
        """``2 m`` (B, N): the Lagrangian's linear coefficients of w."""
        return self.vjp(parts.cot_pre, parts.cot_logits) + parts.direct

    def matvec(self, parts: Parts, two_m: Tensor, kappa0: Tensor, kappa: Tensor, v: Tensor) -> Tensor:
        """``(M + diag(kappa0, kappa)) v`` for v (B, 1 + N) (coordinate 0 first)."""
        v0, vr = v[:, 0], v[:, 1:]
        t_pre, _ = self.jvp(vr)
        blocks = self.split(vr)
        back = self.vjp([c * b / 2 for c, b in zip(parts.coupling, blocks[1:])], None)
        rows = self.join([torch.zeros_like(blocks[0])] + [c * t / 2 for c, t in zip(parts.coupling, t_pre)])
        out = two_m / 2 * v0[:, None] + (parts.diag + kappa) * vr + (rows + back) * self.mask
        return torch.cat([(kappa0 * v0 + (two_m / 2 * vr).sum(1))[:, None], out], 1)

    def quadratic(self, parts: Parts, kappa0: Tensor, kappa: Tensor, v: Tensor, t_pre: list[Tensor],
                  t_logits: Tensor) -> Tensor:
        """``v^T (M + K) v`` (B,) with ``t = J v[1:]`` given: explicit (and differentiable) in the multipliers."""
        v0, vr = v[:, 0], v[:, 1:]
        linear = (self.join(parts.cot_pre) * self.join(t_pre)).sum(1) + (parts.cot_logits * t_logits).sum(1)
        linear = linear + (parts.direct * vr).sum(1)
        blocks = self.split(vr)[1:]
        cross = sum((c * b * t).flatten(1).sum(1) for c, b, t in zip(parts.coupling, blocks, t_pre))
        return kappa0 * v0 ** 2 + v0 * linear + ((parts.diag + kappa) * vr ** 2).sum(1) + cross

    def box_value(self, parts: Parts, t_pre: list[Tensor], t_logits: Tensor, w: Tensor) -> Tensor:
        """``const + 2 m^T w`` (B,) at w (B, N) with ``t = J w`` given (the LP bound at the box's minimiser)."""
        linear = (self.join(parts.cot_pre) * self.join(t_pre)).sum(1) + (parts.cot_logits * t_logits).sum(1)
        return parts.const + linear + (parts.direct * w).sum(1)

    # --- a starting point --------------------------------------------------------------------------
    def crown_multipliers(self) -> Multipliers:
        """The multipliers of CROWN's backward walk (adaptive lower slope 1 if u >= -l else 0): at them the
        bound is CROWN's with these intermediate bounds, and ``kappa`` is the box's (``|m|``)."""
        zeros = [torch.zeros_like(h) for h in self.h]
        relu, triangle = [torch.zeros_like(h) for h in self.h], [torch.zeros_like(h) for h in self.h]

        def hook(i: int, a: Tensor) -> Tensor:
            alpha = (self.upper[i] >= -self.lower[i]).to(a.dtype) * self.unstable[i]
            relu[i] = alpha * a.clamp(min=0)
            triangle[i] = self.unstable[i] * (-a).clamp(min=0)
            return relu[i] - self.slope[i] * triangle[i]

        with torch.no_grad():
            self.transpose([None] * len(self.relus), self.spec, hook)
        mult = Multipliers([z.clone() for z in zeros], [z.clone() for z in zeros], relu, triangle,
                           [z.clone() for z in zeros], torch.zeros_like(self.mask), torch.zeros(self.rows, dtype=self.dtype),
                           torch.zeros(self.rows, dtype=self.dtype))
        return self.box_kappa(mult)

    def box_kappa(self, mult: Multipliers) -> Multipliers:
        """``mult`` with kappa = |m| and kappa_0 = sum |m|: M + K is then PSD for a zero quadratic part and the
        dual bound equals the box's minimum of the linear Lagrangian (the LP dual)."""
        with torch.no_grad():
            m = self.linear_coefficient(self.parts(mult)).abs() / 2
        mult.kappa, mult.kappa0 = m, m.sum(1)
        return mult


__all__ = ["LiftedProblem", "Multipliers", "Parts"]
