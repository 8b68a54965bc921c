"""Sound bounds from first-order SDP multipliers (Dathathri et al. 2020, arXiv 2010.11645), in float64.

The optimiser's value uses a Ritz value, an upper estimate of the smallest eigenvalue, so it is never
the certified number. Here the multipliers (projected onto their signs) are evaluated again in float64 on
a float64 copy of the network:

* no quadratic part (``product = 0``, ``ball = 0``: the LP dual): ``const - sum |2 m|``, the exact
  minimum of the linear Lagrangian over the box, no eigenvalue needed;
* otherwise ``const - kappa_0 - sum(kappa) + (n + 1) min(0, lambda)`` with ``lambda`` a proven lower bound of
  ``lambda_min(M + K)`` (:func:`certify.eigen.min_eigenvalue_lower`) of the DENSE (n + 1)^2 matrix of the
  lifted coordinates: its rows of unstable neurons are ``J^T`` of unit cotangents, one backward pass per
  neuron in chunks. This is the one quadratic-memory step, bounded by ``max_dense``.

Rounding (the rule of :mod:`certify.rounding`, docs/soundness.md): the bound is about the exact network,
and the intermediate bounds are proven for it (:func:`certify.crown.intermediate_bounds`). Every quantity
computed through the network is off by at most ``gamma_D`` times the same computation in absolute values
(``|W|`` products, :meth:`AffineOp.forward_abs`), D the summed input sizes of the affine layers (Higham,
"Accuracy and stability of numerical algorithms", sec. 3.5); the matrix's error enters as a Frobenius
bound, the final sums as ``gamma_{n+4}`` of their absolute values; the folded layers' distance from the
exact ones as :func:`drift_pad`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .eigen import U64, best_diagonal, min_eigenvalue_lower
from .rounding import gamma, parameter_term
from .sdp_fo_problem import LiftedProblem, Multipliers


@dataclass
class Magnitudes:
    """Per-row rounding scales: ``gamma`` of the network passes and the absolute-value passes
    ``|s|`` / ``|logits|`` (any point of the box) and the row sums of ``|J|`` (per layer, then logits);
    ``drift_pre`` / ``drift_logits``: how far the folded graph's pre-activations and logits can be from
    the exact network's on its own trajectory (:func:`drift`)."""

    gamma: float
    value_pre: list[Tensor]
    value_logits: Tensor
    rowsum_pre: list[Tensor]
    rowsum_logits: Tensor
    drift_pre: list[Tensor]
    drift_logits: Tensor


def _abs_forward(problem: LiftedProblem, x_abs: Tensor, relu_abs: list[Tensor], bias: bool) -> tuple[list[Tensor], Tensor]:
    """The lifted walk with every affine layer's |W| (plus |b| when ``bias``)."""
    def affine(op, prev: Tensor) -> Tensor:
        out = op.forward_abs(prev)
        return out + op.forward(torch.zeros_like(prev[:1])).abs() if bias else out

    return problem.walk(x_abs, relu_abs, affine)


@torch.no_grad()
def drift(problem: LiftedProblem) -> tuple[list[Tensor], Tensor]:
    """Folding errors (docs/soundness.md): the graph's folded layers (Normalize, BatchNorm, pooling) are
    within ``|dW| m + |db|`` of the exact ones (:func:`certify.rounding.parameter_term`). Take a true point
    of the threat set and lift it with the exact network's own values (its unstable neurons' outputs,
    in [0, u] by the proven bounds): the problem's pre-activations there are within ``D`` of the exact
    ones, ``D = |W| D + |dW| M + |db|`` through affine layers, carried by active neurons only (unstable
    ones are the lifted coordinates themselves, inactive ones are 0), M the exact values' magnitudes.
    Returns D (B, *shape) of every ReLU's input and (B, K) of the logits, float64."""
    d: list[Tensor] = []
    m: list[Tensor] = []
    layer = {r: i for i, r in enumerate(problem.relus)}
    for node in problem.graph.nodes[:problem.graph.output + 1]:
        if node.kind == "input":
            d.append(torch.zeros_like(problem.mid))
            m.append(problem.mid.abs() + problem.half)
        elif node.kind == "add":
            d.append(d[node.inputs[0]] + d[node.inputs[1]])
            m.append(m[node.inputs[0]] + m[node.inputs[1]])
        elif node.kind == "relu":
            i, j = layer[node.index], node.inputs[0]
            d.append(problem.active[i] * d[j])
            m.append(problem.active[i] * m[j] + problem.unstable[i] * problem.upper[i])
        else:
            op, prev_d, prev_m = node.op, d[node.inputs[0]], m[node.inputs[0]]
            folding = parameter_term(op, prev_m)
            d.append(op.forward_abs(prev_d) + folding)
            m.append(op.forward_abs(prev_m) + op.forward(torch.zeros_like(prev_m[:1])).abs() + folding)
    grow = 1 + 2.0 ** -20  # the recursion's own rounding (non-negative sums, relative 1e-13 at most)
    return [d[p] * grow for p in problem.pre], d[problem.graph.output] * grow


def magnitudes(problem: LiftedProblem) -> Magnitudes:
    depth = sum(math.prod(n.op.in_shape) + 2 for n in problem.graph.nodes if n.kind == "affine")
    g = gamma(depth + 4 * len(problem.graph.nodes) + problem.width + 32, U64)
    with torch.no_grad():
        vp, vl = _abs_forward(problem, problem.mid.abs() + problem.half, [2 * h for h in problem.h], bias=True)
        rp, rl = _abs_forward(problem, problem.half, problem.h, bias=False)
    dp, dl = drift(problem)
    return Magnitudes(g, vp, vl, rp, rl, dp, dl)


def drift_pad(problem: LiftedProblem, mult: Multipliers, mag: Magnitudes) -> Tensor:
    """(B,) what the folding drift can cost the Lagrangian at the lifted true point (:func:`drift`): every
    constraint touching a pre-activation moves by its multiplier times D (the product ``z (z - s)`` by
    ``|product| u D``), the objective by ``|c| D``."""
    out = (problem.spec.abs() * mag.drift_logits).sum(1)
    for i, dp in enumerate(mag.drift_pre):
        weight = (mult.lower[i].abs() + mult.upper[i].abs() + mult.relu[i].abs()
                  + problem.slope[i].abs() * mult.triangle[i].abs() + 2 * problem.h[i] * mult.product[i].abs())
        out = out + _sum(weight * dp)
    return out * (1 + gamma(problem.width + 8, U64))


def _sum(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def _pads(problem: LiftedProblem, mult: Multipliers, mag: Magnitudes) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: the error bound of const, of ``2 m`` (1-norm) and the coupling's (Frobenius, both triangles)."""
    g = mag.gamma
    const_abs = (problem.spec.abs() * mag.value_logits).sum(1)
    lin_abs = (problem.spec.abs() * mag.rowsum_logits).sum(1)
    direct_abs = torch.zeros_like(const_abs)
    coupling_sq = torch.zeros_like(const_abs)
    for i in range(len(problem.relus)):
        lo, up, re, tr, pr = (mult.lower[i].abs(), mult.upper[i].abs(), mult.relu[i].abs(), mult.triangle[i].abs(),
                              mult.product[i].abs())
        h = problem.h[i]
        cot = lo + up + re + problem.slope[i].abs() * tr + pr * h
        const_abs = const_abs + _sum(cot * mag.value_pre[i] + lo * problem.lower[i].abs() + up * problem.upper[i].abs()
                                     + tr * problem.icpt[i].abs() + (tr + re) * h + pr * h * h)
        lin_abs = lin_abs + _sum(cot * mag.rowsum_pre[i])
        direct_abs = direct_abs + _sum((tr + re) * h + 2 * pr * h * h + pr * h * problem.s0[i].abs())
        coupling_sq = coupling_sq + _sum((pr * h * mag.rowsum_pre[i] / 2) ** 2)
    if problem.center is not None:
        gap = (problem.mid - problem.center).abs()
        const_abs = const_abs + mult.ball.abs() * (_sum(gap * gap) + problem.radius ** 2)
        direct_abs = direct_abs + mult.ball.abs() * _sum(2 * problem.half * gap)
    return g * const_abs * (1 + g), g * (lin_abs + direct_abs) * (1 + g), g * (1 + g) * coupling_sq.sqrt() * math.sqrt(2)


def project(problem: LiftedProblem, mult: Multipliers) -> Multipliers:
    """Multipliers made feasible: signs, and zero off the constraints' neurons and the lifted coordinates."""
    out = mult.map(lambda t: t.detach().to(problem.dtype))
    out.lower = [t.clamp(min=0) for t in out.lower]
    out.upper = [t.clamp(min=0) for t in out.upper]
    out.relu = [t.clamp(min=0) * u for t, u in zip(out.relu, problem.unstable)]
    out.triangle = [t.clamp(min=0) * u for t, u in zip(out.triangle, problem.unstable)]
    out.product = [t * u for t, u in zip(out.product, problem.unstable)]
    out.kappa = out.kappa.clamp(min=0) * problem.mask
    out.ball = out.ball.clamp(min=0) if problem.center is not None else torch.zeros_like(out.ball)
    return out


def linear_bounds(problem: LiftedProblem, mult: Multipliers, mag: Magnitudes | None = None) -> Tensor:
    """Sound bounds (B,) float64 of rows whose quadratic part is zero (the LP dual); ``-inf`` elsewhere."""
    mult = project(problem, mult)
    mag = mag or magnitudes(problem)
    with torch.no_grad():
        parts = problem.parts(mult)
        two_m = problem.linear_coefficient(parts)
        const_pad, lin_pad, _ = _pads(problem, mult, mag)
        value = parts.const - two_m.abs().sum(1)
        g = gamma(problem.width + 4, U64)
        value = value - const_pad - lin_pad - g * (parts.const.abs() + two_m.abs().sum(1)) - drift_pad(problem, mult, mag)
    quadratic = torch.stack([_sum(p.abs()) for p in mult.product], 1).sum(1) + mult.ball.abs() > 0
    return torch.where(quadratic, torch.full_like(value, -math.inf), value)


def dense_matrix(problem: LiftedProblem, mult: Multipliers, row: int, chunk: int = 64) -> tuple[np.ndarray, Tensor]:
    """``M`` (n + 1, n + 1) float64 of one row (both triangles; no kappa) and the lifted indices."""
    one = problem.select(torch.tensor([row]))
    mult1 = mult.rows(torch.tensor([row]))
    with torch.no_grad():
        parts = one.parts(mult1)
        two_m = one.linear_coefficient(parts)[0]
    idx = one.mask[0].nonzero().flatten()
    n = idx.numel()
    position = torch.full((one.width,), -1, dtype=torch.long)
    position[idx] = torch.arange(n)
    a = np.zeros((n + 1, n + 1))
    a[1:, 0] = (two_m[idx] / 2).numpy()
    a[np.arange(1, n + 1), np.arange(1, n + 1)] = parts.diag[0, idx].numpy()
    for i, coupling in enumerate(parts.coupling):
        neurons = coupling[0].flatten().nonzero().flatten()
        for s in range(0, neurons.numel(), chunk):
            part = neurons[s:s + chunk]
            cot = torch.zeros(part.numel(), one.sizes[i + 1], dtype=one.dtype)
            cot[torch.arange(part.numel()), part] = coupling[0].flatten()[part] / 2
            cots = [None] * len(one.relus)
            cots[i] = cot.reshape(part.numel(), *one.shapes[i + 1])
            with torch.no_grad():
                rows = one.vjp(cots, None)[:, idx].numpy()  # (chunk, n): 1/2 coupling_k J_k
            for r, k in enumerate(part.tolist()):
                p = int(position[one.offsets[i + 1] + k])
                a[1 + p, 1:1 + p] += rows[r, :p]  # J_k lives on earlier coordinates: the strict lower triangle
    for s in range(0, n + 1, chunk):  # the upper triangle from the lower, strip by strip (no n^2 temporary)
        e = s + chunk
        a[s:e, e:] = a[e:, s:e].T
        blk = np.tril(a[s:e, s:e])
        a[s:e, s:e] = blk + np.tril(blk, -1).T
    return a, idx


def layer_blocks(problem: LiftedProblem, idx: Tensor) -> list[slice]:
    """The lifted coordinates (numbered 1..n after coordinate 0) grouped by layer: [0], inputs, each ReLU, as
    contiguous ranges (idx is sorted and the layout is layer by layer). No two coordinates of one group are
    coupled in M (a pre-activation depends on earlier layers only)."""
    flat = idx.numpy()
    blocks = [slice(0, 1)]
    for a, b in zip(problem.offsets, problem.offsets[1:]):
        lo, hi = np.searchsorted(flat, a), np.searchsorted(flat, b)
        if hi > lo:
            blocks.append(slice(int(lo) + 1, int(hi) + 1))
    return blocks


def sdp_bounds(problem: LiftedProblem, mult: Multipliers, starts: Tensor | None = None,
               rows: list[int] | None = None, max_dense: int = 6000, sweeps: int = 100,
               deadline: float = math.inf, clock: Callable[[], float] = time.perf_counter) -> tuple[Tensor, list[dict]]:
    """Sound bounds (B,) float64 of the rows ``rows`` (default all; the others are ``-inf``) and per row how
    they were proven. Per row: the dense M of the multipliers, the best diagonal for it
    (:func:`certify.eigen.best_diagonal`, ``sweeps`` at most, stopping at ``deadline`` on ``clock``; the optimiser's own
    kappa is only its state), a proven lower bound of ``lambda_min(M + K)``, every rounding error padded.
    ``starts`` (B, 1 + N): eigenvector estimates (warm starts)."""
    mult = project(problem, mult)
    mag = magnitudes(problem)
    with torch.no_grad():
        parts = problem.parts(mult)
        const_pad, lin_pad, coupling_err = _pads(problem, mult, mag)
        const_pad = const_pad + drift_pad(problem, mult, mag)
    out = torch.full((problem.rows,), -math.inf, dtype=torch.float64)
    details: list[dict] = [{} for _ in range(problem.rows)]
    for b in (range(problem.rows) if rows is None else rows):
        n = int(problem.n[b])
        if n + 1 > max_dense:
            details[b] = {"eigen": f"skipped: {n + 1} lifted coordinates exceed max_dense={max_dense}"}
            continue
        a, idx = dense_matrix(problem, mult, b)
        kappa, factor = best_diagonal(a, layer_blocks(problem, idx), sweeps, deadline=deadline, clock=clock)
        kappa[1:] = np.maximum(kappa[1:], 0.0)  # W_kk <= 1 needs kappa >= 0; P_00 = 1 takes any sign
        a[np.diag_indices(n + 1)] += kappa
        diag_err = mag.gamma * float(np.abs(np.diag(a)).max() + kappa.max())
        start = factor
        if starts is not None:  # the optimiser's Ritz vector joins the primal factor's span
            s = starts[b].double()
            start = np.column_stack([factor, torch.cat([s[:1], s[1:][idx]]).numpy()])
        lam, how = min_eigenvalue_lower(a, start)
        del a
        # ||A_hat - A||_2 <= Frobenius: column 0 (twice), the coupling, the diagonal
        err = math.sqrt(2) * float(lin_pad[b]) / 2 + float(coupling_err[b]) + diag_err
        lam = min(0.0, lam - err)
        total, const = float(np.abs(kappa).sum()), float(parts.const[b])  # kappa is float64 exactly as added
        value = const - float(kappa.sum()) + (n + 1) * lam
        value -= float(const_pad[b]) + gamma(n + 4, U64) * (abs(const) + total + (n + 1) * abs(lam))
        out[b] = value if math.isfinite(value) else -math.inf
        details[b] = {"eigen": how, "lambda_lower": lam, "lifted": n, "matrix_error": err}
    return out, details


__all__ = ["Magnitudes", "dense_matrix", "layer_blocks", "linear_bounds", "magnitudes", "project", "sdp_bounds"]
