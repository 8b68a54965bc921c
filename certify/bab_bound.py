"""Bounding for branch and bound: beta-CROWN on batches of subdomains of one example.

:func:`make_context` computes the example's root pre-activation bounds once, soundly (CROWN on a float64
copy of the network, widened by their proven rounding error, :mod:`certify.rounding`), and keeps them in
float32 (rounded outward) for the search. A batch of D subdomains is a :class:`certify.crown.Propagator`
over the example's x repeated D times, whose pre-activation bounds are the root's with each domain's
splits applied (:func:`certify.bab_domains.split_relaxation`); the bound of each domain's margins is

    min over the input set of  c^T f(x) - sum_split beta_i sign_i z_i(x)      (beta-CROWN, Wang et al. 2021)

with the lower ReLU slopes alpha (Xu et al. 2021) and beta >= 0 optimised jointly by projected Adam
(:func:`optimise`), warm-started from the parent. The best bound seen per domain is kept with the alpha
and beta that gave it, so :func:`sound_lower` can recompute exactly that bound in float64 and lower it
by its proven rounding error before a domain counts as closed. :func:`choose_branches` picks each open
domain's next split (BaBSR, or FSB: its candidates' children bounded with the parent's alpha and beta).
:func:`refine` optionally gives each domain its own intermediate bounds (``Domains.pre``), re-tightened
under its splits; the relaxations of every walk then come from those (:func:`domain_relaxations`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from robustbench_lite.threat import ThreatModel

from .bab_domains import Domains, branching_scores, preactivation_bias, split_relaxation, top_candidates
from .crown import Propagator
from .graph import Graph
from .ibp import input_box
from .layers import Relaxation, maxpool_relaxation, relu_relaxation
from .rounding import error_bounds, padded_boxes, round_down, unit_roundoff

Interval = tuple[Tensor, Tensor]
U64 = 2.0 ** -53
#: the pad's own float64 rounding (as :data:`certify.rounding._SELF`)
SELF = 1.0 + 2.0 ** -20


@dataclass
class Context:
    """One example: its graphs (float32 and float64), proven root bounds and what the search reuses.

    ``relus``: the ReLU nodes with an unstable neuron at the root (the only ones ever split or given
    alphas); ``pre32``/``pre64`` {pre-activation node: (1, *shape)}: float64 bounds proven for the exact
    network and their float32 outward rounding; ``relax32``/``relax64`` the relaxations of every ReLU
    and max-pool built from them (float32 for the search, float64 for the proofs); ``errors`` {node:
    (1, *shape)}: :func:`certify.rounding.error_bounds` of the float64 graph at the root, which bound the
    rounding of any float64 walk whose relaxations come from bounds inside the root's (see
    :func:`sound_lower`); ``magnitude`` {pre-activation node: max |z|} over the root bounds.
    """

    graph: Graph
    graph64: Graph
    x: Tensor
    y: int
    threat: ThreatModel
    relus: list[int]
    relu_input: dict[int, int]
    pre32: dict[int, Interval]
    pre64: dict[int, Interval]
    relax32: dict[int, Relaxation]
    relax64: dict[int, Relaxation]
    errors: dict[int, Tensor]
    magnitude: dict[int, Tensor]
    bias: dict[int, Tensor | float]
    memory_mb: float
    macs: int = 0  # multiply-accumulates of every walk so far (gradients count twice their walk)

    @property
    def num_classes(self) -> int:
        return self.graph.nodes[self.graph.output].shape[0]

    def spec_rows(self, spec: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """(D, S, K) rows e_y - e_j for the classes ``spec`` (D, S)."""
        eye = torch.eye(self.num_classes, dtype=dtype, device=self.x.device)
        return eye[self.y][None, None, :] - eye[spec]

    def propagator(self, splits: dict[int, Tensor], rows: int, pre: dict[int, Interval] | None = None) -> Propagator:
        """A float32 propagator of ``rows`` domains: the relaxations of their bounds ``pre`` (None: the
        root's) with ``splits`` applied."""
        prop = Propagator(self.graph, self.x.expand(rows, *self.x.shape[1:]), self.threat, self.memory_mb)
        prop.relax = patched(domain_relaxations(self.relax32, pre), splits)
        return prop

    def propagator64(self, splits: dict[int, Tensor], rows: int, pre: dict[int, Interval] | None = None) -> Propagator:
        """The float64 propagator of ``rows`` domains (the proofs' walk); domain bounds ``pre`` are
        intersected with the root's proven float64 bounds first, so every relaxation comes from bounds
        inside the root's (the condition of the rounding pads, :func:`sound_lower`)."""
        x64 = self.x.double().expand(rows, *self.x.shape[1:])
        prop = Propagator(self.graph64, x64, self.threat, self.memory_mb / 2)
        inside = None if pre is None else {
            r: (torch.maximum(lo.double(), self.pre64[self.relu_input[r]][0]),
                torch.minimum(hi.double(), self.pre64[self.relu_input[r]][1])) for r, (lo, hi) in pre.items()}
        prop.relax = patched(domain_relaxations(self.relax64, inside), splits)
        return prop

    def root_pre(self) -> dict[int, Interval]:
        """The root's float32 bounds of every split-able ReLU's input, (1, *shape) each."""
        return {r: self.pre32[self.relu_input[r]] for r in self.relus}


def domain_relaxations(relax: dict[int, Relaxation], pre: dict[int, Interval] | None) -> dict[int, Relaxation]:
    """The root's relaxations with those of the ReLUs in ``pre`` rebuilt from the domains' own bounds."""
    if pre is None:
        return relax
    out = dict(relax)
    for r, (lo, hi) in pre.items():
        out[r] = relu_relaxation(lo, hi, relax[r].negative_slope)
    return out


def patched(relax: dict[int, Relaxation], splits: dict[int, Tensor]) -> dict[int, Relaxation]:
    """The relaxations with each layer's splits applied (layers with no split stay shared)."""
    return {i: split_relaxation(r, splits[i]) if i in splits and bool((splits[i] != 0).any()) else r
            for i, r in relax.items()}


def outward32(lo: Tensor, hi: Tensor) -> Interval:
    """float32 bounds that contain the float64 interval [lo, hi]."""
    return round_down(lo), -round_down(-hi)


def relaxations(graph: Graph, pre: dict[int, Interval]) -> dict[int, Relaxation]:
    """CROWN's relaxation of every ReLU (LeakyReLU) and max-pool from the bounds ``pre`` of its input."""
    out = {}
    for n in graph.nodes:
        if n.kind == "relu":
            out[n.index] = relu_relaxation(*pre[n.inputs[0]], n.op.negative_slope)
        elif n.kind == "maxpool":
            out[n.index] = maxpool_relaxation(n.op, *pre[n.inputs[0]])
    return out


def lowered(bound: Tensor, pad: Tensor) -> Tensor:
    """``bound - pad`` in float64, lowered by the subtraction's own rounding."""
    return bound - pad - 2.0 ** -52 * (bound.abs() + pad)


def make_context(graph: Graph, graph64: Graph, x: Tensor, y: int, threat: ThreatModel, memory_mb: float) -> Context:
    """The root of one example x (1, *input_shape): proven pre-activation bounds and the relaxation data
    (CROWN in float64 widened by :func:`certify.rounding.error_bounds`, as :func:`certify.crown.intermediate_bounds`)."""
    x64 = x.double()
    root = Propagator(graph64, x64, threat, memory_mb / 2)
    with torch.no_grad():
        root.compute_bounds()
        errors = error_bounds(graph64, root.boxes, x64, threat, unit_roundoff(torch.float64))
    needed = sorted(root.needed)
    pre64 = dict(zip(needed, padded_boxes([root.boxes[i] for i in needed], [errors[i] for i in needed])))
    pre32 = {i: outward32(*b) for i, b in pre64.items()}
    relu_input = {n.index: n.inputs[0] for n in graph.nodes if n.kind == "relu"}
    relus = [r for r, i in relu_input.items() if bool(((pre64[i][0] < 0) & (pre64[i][1] > 0)).any())]
    magnitude = {i: torch.maximum(lo.abs(), hi.abs()) for i, (lo, hi) in pre64.items()}
    return Context(graph, graph64, x, y, threat, relus, relu_input, pre32, pre64, relaxations(graph, pre32),
                   relaxations(graph64, pre64), errors, magnitude, {r: preactivation_bias(graph, r) for r in relus},
                   memory_mb, root.macs)


def tighten_intermediate(ctx: Context, iterations: int, lr: float, max_rows: int) -> int:
    """alpha-CROWN on the root's intermediate bounds (Xu et al. 2021): for each pre-activation node in
    order, the lower slopes of every earlier ReLU are optimised separately for each of its unstable
    neurons' two bounds (rows), in float32 by projected Adam, and the bounds are then recomputed soundly
    in float64 with those slopes (any slope in [0, 1] is valid) and intersected with the old ones.
    Nodes with more than ``max_rows`` rows keep their CROWN bounds. Returns the rows optimised."""
    done = 0
    ancestors = {i: set(ctx.graph.ancestors(i)) for i in ctx.pre64}
    for node in sorted(ctx.pre64):
        before = [r for r in ctx.relus if r in ancestors[node]]
        lo64, hi64 = ctx.pre64[node]
        ids = ((lo64 < 0) & (hi64 > 0)).flatten().nonzero().flatten()
        if not before or ids.numel() == 0 or 2 * ids.numel() > max_rows or iterations == 0:
            continue
        shape = ctx.graph.nodes[node].shape
        width = math.prod(shape)
        chunk = max(1, int(ctx.memory_mb * 2 ** 20 / 4 // (8 * _rows_per_domain(ctx, 1))))
        new_lo, new_hi = lo64.flatten().clone(), hi64.flatten().clone()
        pad = ctx.errors[node].flatten()
        for s in range(0, ids.numel(), chunk):
            part = ids[s:s + chunk]
            m = part.numel()
            e = torch.zeros(2 * m, width)
            e[torch.arange(m), part] = 1.0
            e[torch.arange(m, 2 * m), part] = -1.0
            rows = e.reshape(1, 2 * m, *shape)
            prop = ctx.propagator({}, 1)
            slopes = {r: ctx.relax32[r].lower_slope.unsqueeze(1).expand(1, 2 * m, *shape_r).clone()
                      for r in before for shape_r in [ctx.relax32[r].lower_slope.shape[1:]]}
            best = torch.full((1, 2 * m), -math.inf)
            best_slopes = {r: t.clone() for r, t in slopes.items()}
            params = [t.requires_grad_(True) for t in slopes.values()]
            adam = ProjectedAdam(params, [lr] * len(params), [(0.0, 1.0)] * len(params))
            for _ in range(iterations):
                with torch.enable_grad():
                    bound = prop.backward(node, rows, slopes)
                    grads = torch.autograd.grad(-bound.sum(), params)
                with torch.no_grad():
                    better = bound > best
                    best = torch.where(better, bound, best)
                    for r, t in slopes.items():
                        best_slopes[r] = torch.where(better.reshape(1, 2 * m, *([1] * (t.dim() - 2))), t.detach(),
                                                     best_slopes[r])
                adam.step(grads)
            ctx.macs += 3 * prop.macs
            with torch.no_grad():  # a row of 1-norm 1 from the node: its rounding is within errors[node]
                bound = ctx.propagator64({}, 1).backward(node, rows.double(), best_slopes)[0]
            sound = lowered(bound, pad[part].repeat(2))
            new_lo[part] = torch.maximum(new_lo[part], sound[:m])
            new_hi[part] = torch.minimum(new_hi[part], -sound[m:])
            done += 2 * m
        ctx.pre64[node] = (new_lo.reshape(lo64.shape), new_hi.reshape(hi64.shape))
        ctx.pre32[node] = outward32(*ctx.pre64[node])
        ctx.relax32, ctx.relax64 = relaxations(ctx.graph, ctx.pre32), relaxations(ctx.graph64, ctx.pre64)
    ctx.relus = [r for r in ctx.relus if bool(((ctx.pre64[ctx.relu_input[r]][0] < 0)
                                                 & (ctx.pre64[ctx.relu_input[r]][1] > 0)).any())]
    return done


def refine(ctx: Context, dom: Domains, first: int, max_rows: int) -> int:
    """Re-tighten the domains' intermediate bounds under their splits (beta-CROWN's per-subdomain
    intermediate bounds, without their own optimisation): for each split-able ReLU after position
    ``first`` of ``ctx.relus`` in order, CROWN bounds (lower slopes CROWN's adaptive ones) of the
    neurons unstable in some domain, in float64 through each domain's own relaxations, the splits
    applied (a split-active neuron is the identity, a split-inactive one 0: exact on the domain), lowered
    by the node's proven rounding pad and intersected with the domain's bounds, so they hold on the
    domain in exact arithmetic. A ReLU with more than ``max_rows`` rows (two per neuron) keeps its
    bounds. ``dom.pre`` is updated in place; returns the rows bounded."""
    done = 0
    if dom.pre is None or max_rows == 0:
        return 0
    d = len(dom)
    for r in ctx.relus[first + 1:]:
        node = ctx.relu_input[r]
        lo, hi = dom.pre[r]
        free = ((lo < 0) & (hi > 0) & (dom.splits[r] == 0)).flatten(1)
        ids = free.any(0).nonzero().flatten()
        m = ids.numel()
        if m == 0 or 2 * m > max_rows:
            continue
        shape = ctx.graph.nodes[node].shape
        e = torch.zeros(1, 2 * m, math.prod(shape), dtype=torch.float64)
        e[0, torch.arange(m), ids] = 1.0
        e[0, torch.arange(m, 2 * m), ids] = -1.0
        rows = e.reshape(1, 2 * m, *shape)
        pad = ctx.errors[node].flatten()[ids].repeat(2)
        new_lo, new_hi = lo.flatten(1).double(), hi.flatten(1).double()
        per = max(1, int(ctx.memory_mb * 2 ** 20 / 8 // (4 * 2 * m * _activations(ctx))))
        for s in range(0, d, per):
            part = slice(s, min(d, s + per))
            n = part.stop - part.start
            prop = ctx.propagator64({q: t[part] for q, t in dom.splits.items()}, n,
                                    {q: (a[part], b[part]) for q, (a, b) in dom.pre.items()})
            with torch.no_grad():
                sound = lowered(prop.backward(node, rows), pad)
            ctx.macs += prop.macs
            new_lo[part, ids] = torch.maximum(new_lo[part, ids], sound[:, :m])
            new_hi[part, ids] = torch.minimum(new_hi[part, ids], -sound[:, m:])
        done += 2 * m * d
        dom.pre[r] = tuple(t.reshape(lo.shape) for t in outward32(new_lo, new_hi))  # type: ignore[assignment]
    return done


def _activations(ctx: Context) -> int:
    return sum(math.prod(n.shape) for n in ctx.graph.nodes)


def _rows_per_domain(ctx: Context, spec_rows: int) -> int:
    """float32 elements one domain needs in a bounding pass with gradients (a rough upper bound)."""
    nodes = sum(math.prod(n.shape) * (math.prod(n.op.kernel) if n.kind == "maxpool" else 1) for n in ctx.graph.nodes)
    return 8 * nodes * spec_rows


def batch_capacity(ctx: Context, spec_rows: int) -> int:
    """Domains that fit in one bounding pass within ``memory_mb``."""
    return max(1, int(ctx.memory_mb * 2 ** 20 / 4 // _rows_per_domain(ctx, spec_rows)))


def optimise(ctx: Context, dom: Domains, iterations: int, lr_alpha: float, lr_beta: float,
             expired: Callable[[], bool] | None = None) -> tuple[dict[int, Tensor], Tensor]:
    """Optimise alpha and beta of the domains in place (``dom.lower``, ``dom.alphas``, ``dom.betas`` hold
    the best bound per row and its parameters; ``expired()`` True stops early); returns the coefficient
    taps {ReLU node or 0 (the input): (D, S, *shape)} of a final pass with those parameters and its
    bound (D, S), for branching and falsification."""
    d = len(dom)
    prop = ctx.propagator(dom.splits, d, dom.pre)
    c = ctx.spec_rows(dom.spec)
    signs = {r: s.unsqueeze(1).to(torch.float32) for r, s in dom.splits.items()}
    best = torch.full(dom.lower.shape, -math.inf)
    alphas = {r: t.clone().requires_grad_(True) for r, t in dom.alphas.items()}
    betas = {r: t.clone().requires_grad_(True) for r, t in dom.betas.items()}
    best_alphas = {r: t.detach().clone() for r, t in alphas.items()}
    best_betas = {r: t.detach().clone() for r, t in betas.items()}
    split_any = [r for r, s in dom.splits.items() if bool((s != 0).any())]
    params = list(alphas.values()) + [betas[r] for r in split_any]
    adam = ProjectedAdam(params, [lr_alpha] * len(alphas) + [lr_beta] * len(split_any),
                         [(0.0, 1.0)] * len(alphas) + [(0.0, math.inf)] * len(split_any))
    for _ in range(iterations if params else 0):
        with torch.enable_grad():
            bound = prop.backward(ctx.graph.output, c, alphas, {r: betas[r] * signs[r] for r in split_any})
            grads = torch.autograd.grad(-bound.sum(), params)
        with torch.no_grad():
            better = bound > best
            best = torch.where(better, bound, best)
            for src, dst in ((alphas, best_alphas), (betas, best_betas)):
                for r, t in src.items():
                    view = better.reshape(*better.shape, *([1] * (t.dim() - 2)))
                    dst[r] = torch.where(view, t.detach(), dst[r])
            if bool((best > 0).all()) or (expired is not None and expired()):
                break
            adam.step(grads)
    dom.alphas, dom.betas = best_alphas, best_betas
    ctx.macs += 3 * prop.macs
    prop.macs = 0
    taps: dict[int, Tensor | None] = {r: None for r in ctx.relus}
    taps[0] = None
    with torch.no_grad():
        final = prop.backward(ctx.graph.output, c, best_alphas,
                              {r: best_betas[r] * signs[r] for r in split_any}, taps=taps)
    dom.lower = torch.maximum(best, final) if iterations else final
    ctx.macs += prop.macs
    return taps, final


class ProjectedAdam:
    """Adam (Kingma & Ba 2015) on tensors updated in place, each projected onto its interval after a step
    (alpha onto [0, 1], beta onto [0, inf)); one step size per tensor."""

    def __init__(self, params: list[Tensor], lrs: list[float], limits: list[tuple[float, float]],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lrs, self.limits, self.betas, self.eps = params, lrs, limits, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads: tuple[Tensor, ...]) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, g, m, v, lr, (lo, hi) in zip(self.params, grads, self.m, self.v, self.lrs, self.limits):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)
            p.clamp_(lo, hi)


def sound_lower(ctx: Context, dom: Domains) -> Tensor:
    """float64 lower bounds (D, S) of the domains' margins that hold in exact arithmetic (same alpha, beta).

    The float64 walk's rounding (docs/soundness.md): a walk from the output with row e_y - e_j errs by
    at most E_out[y] + E_out[j] (:func:`certify.rounding.margin_pad`); each split layer's term
    ``beta sign z`` is subtracted from the coefficient A at its pre-activation node z, so the walk below
    z starts from the computed A' = fl(A - beta sign) instead of A: by the same induction its rounding
    grows by at most ``|beta| . E_z`` (|A'| <= |A| + |beta| up to one rounding) plus the subtraction's
    own ``u |A'| . (M_z + E_z)``, M_z the magnitude of z over the root bounds."""
    d = len(dom)
    split_any = [r for r, s in dom.splits.items() if bool((s != 0).any())]
    betas = {r: dom.betas[r].double() * dom.splits[r].unsqueeze(1) for r in split_any}
    taps: dict[int, Tensor | None] = {ctx.relu_input[r]: None for r in split_any}
    with torch.no_grad():
        bound = ctx.propagator64(dom.splits, d, dom.pre).backward(ctx.graph.output, ctx.spec_rows(dom.spec, torch.float64),
                                                         dom.alphas, betas, taps=taps)
        out = ctx.errors[ctx.graph.output].flatten()
        pad = out[ctx.y] + out[dom.spec] + split_pad(ctx, betas, taps, ctx.errors, U64)
    return lowered(bound, pad * SELF)


def split_pad(ctx: Context, betas: dict[int, Tensor], taps: dict[int, Tensor], errors: dict[int, Tensor],
              u: float) -> Tensor:
    """(D, S): the rounding a walk's split terms add (:func:`sound_lower`), ``betas`` {ReLU: beta * sign
    (D, S, *shape)}, ``taps`` {pre-activation node: the computed coefficient there}, ``errors`` the
    graph's :func:`certify.rounding.error_bounds` in arithmetic of unit roundoff u."""
    pad: Tensor | float = 0.0
    for r, beta in betas.items():
        z = ctx.relu_input[r]
        e, m = errors[z].flatten().to(beta), ctx.magnitude[z].flatten().to(beta)
        pad = pad + beta.abs().flatten(2) @ e + u * (taps[z].abs().flatten(2) @ (e + m))
    return pad


def falsification_points(ctx: Context, dom: Domains, taps: dict[int, Tensor]) -> Tensor:
    """Per domain, the point of the ball ∩ box that minimises the linear bound of its worst row (D, *in)."""
    a = taps[0]  # (D, S, *input_shape)
    worst = dom.lower.argmin(dim=1)
    a = a[torch.arange(a.shape[0]), worst]
    lo, hi = input_box(ctx.x, ctx.threat)
    if ctx.threat.norm == "Linf":
        return torch.where(a >= 0, lo, hi)
    step = a / a.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *([1] * (a.dim() - 1)))
    return ctx.threat.project(ctx.x - ctx.threat.eps * step, ctx.x.expand_as(a))


def choose_branches(ctx: Context, dom: Domains, taps: dict[int, Tensor], final: Tensor, heuristic: str,
                    candidates: int) -> None:
    """Set ``dom.branch`` (D, 2) for every domain: BaBSR's best neuron, or FSB's (see the module doc)."""
    if not ctx.relus:  # nothing to split: every domain is a leaf
        dom.branch = torch.full((len(dom), 2), -1)
        return
    open_rows = dom.lower <= 0
    babsr, intercept = [], []
    for r in ctx.relus:
        lo, hi = ctx.pre32[ctx.relu_input[r]] if dom.pre is None else dom.pre[r]
        s1, s2 = branching_scores(taps[r], lo, hi, ctx.bias[r], dom.splits[r] == 0, open_rows)
        babsr.append(s1)
        intercept.append(s2)
    top, valid = top_candidates(babsr, 1 if heuristic == "babsr" else candidates)
    if heuristic == "babsr" or len(dom) == 0:
        dom.branch = torch.where(valid[:, :1, None], top[:, :1], torch.full_like(top[:, :1], -1))[:, 0]
        return
    top2, valid2 = top_candidates(intercept, candidates)
    cand, ok = torch.cat([top, top2], 1), torch.cat([valid, valid2], 1)
    score = _fsb_scores(ctx, dom, taps, final, cand, ok)
    pick = score.argmax(dim=1)
    chosen = cand[torch.arange(len(dom)), pick]
    dom.branch = torch.where(ok.any(1, keepdim=True), chosen, torch.full_like(chosen, -1))


def _fsb_scores(ctx: Context, dom: Domains, taps: dict[int, Tensor], final: Tensor, cand: Tensor,
                ok: Tensor) -> Tensor:
    """(D, C): the worse child's bound (worst open row) of each candidate split, with the parent's alpha
    and beta; -inf for invalid candidates.

    A child differs from its parent only at the split neuron's layer, so its walk above that layer is
    the parent's: each child's bound is the parent's ``final`` plus the difference of the two walks from
    that ReLU (started from the parent's coefficient there, ``taps``) down to the input."""
    d, n_cand = cand.shape[:2]
    out = torch.full((d, n_cand * 2), math.inf)
    side = torch.tensor([1, -1], dtype=torch.int8).repeat(d * n_cand)
    which = cand.repeat_interleave(2, dim=1).reshape(-1, 2)  # (domain, candidate, side) flattened
    owner = torch.arange(d).repeat_interleave(2 * n_cand)
    open_rows = dom.lower <= 0
    betas = {r: dom.betas[r] * dom.splits[r].unsqueeze(1) for r in dom.splits}
    per = max(1, batch_capacity(ctx, dom.spec.shape[1]) * 3)  # walks without gradients: ~3x cheaper
    with torch.no_grad():
        for pos, r in enumerate(ctx.relus):
            rows = (which[:, 0] == pos).nonzero().flatten()
            if rows.numel() == 0:
                continue
            parent = ctx.propagator(dom.splits, d, dom.pre).backward(r, taps[r], dom.alphas, betas)
            for s in range(0, rows.numel(), per):
                part = rows[s:s + per]
                own = owner[part]
                splits = {q: t[own] for q, t in dom.splits.items()}
                flat = splits[r].flatten(1).clone()
                flat[torch.arange(part.numel()), which[part, 1]] = side[part]
                splits[r] = flat.reshape(part.numel(), *dom.splits[r].shape[1:])
                pre = None if dom.pre is None else {q: (lo[own], hi[own]) for q, (lo, hi) in dom.pre.items()}
                prop = ctx.propagator(splits, part.numel(), pre)
                child = prop.backward(r, taps[r][own], {q: t[own] for q, t in dom.alphas.items()},
                                      {q: t[own] for q, t in betas.items()})
                ctx.macs += prop.macs
                bound = final[own] + child - parent[own]
                out.view(-1)[part] = torch.where(open_rows[own], bound, torch.full_like(bound, math.inf)).min(1).values
    score = out.reshape(d, n_cand, 2).min(dim=2).values
    return torch.where(ok, score, torch.full_like(score, -math.inf))
