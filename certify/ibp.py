"""Interval bound propagation (Gowal et al. 2018, arXiv 1810.12715) on the shared graph walk.

Each node's value is bounded by a box ``[l, u]``: affine layers map the centre exactly and the radius
through ``|W|``; ReLU and max-pool are monotone. The margins ``logit_y - logit_j`` are bounded with
the specification ``e_y - e_j`` folded into the last affine layer (tighter than subtracting logit
intervals). Everything is differentiable, so ``IBP().bound_margins`` is a certified-training loss
ingredient. Cost: about two forward passes. A verdict (``IBP()(model, x, y, threat)``) is proven under
rounding: its margins are lowered by their rounding error and recomputed in float64 where needed
(:func:`certify.rounding.proven_margins`, docs/soundness.md).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from robustbench_lite.threat import ThreatModel

from .base import CertResult, Certifier, spec_matrix
from .graph import Graph, build_graph, check_supported, unsupported_reason
from .rounding import as_margin_lower, float64_model, proven_margins

Interval = tuple[Tensor, Tensor]


def input_box(x: Tensor, threat: ThreatModel) -> Interval:
    """Coordinate bounds of the threat ball intersected with the input box, each (N, *x.shape[1:]).

    For L2 this is the bounding box of the ball (each coordinate moves at most eps).
    """
    lo, hi = threat.box
    return (x - threat.eps).clamp(min=lo), (x + threat.eps).clamp(max=hi)


def box_lower(a: Tensor, centre: Tensor, radius: Tensor) -> Tensor:
    """min of ``A v`` over the box ``|v - centre| <= radius``: A (B, S, *shape), centre (N, *shape) -> (N, S).

    B is N or 1 (A shared by every example).
    """
    a2 = a.flatten(2)
    c, r = centre.flatten(1), radius.flatten(1)
    if a2.shape[0] == 1 and c.shape[0] != 1:
        return c @ a2[0].T - r @ a2[0].abs().T
    return torch.einsum("nsd,nd->ns", a2, c) - torch.einsum("nsd,nd->ns", a2.abs(), r)


def interval_bounds(graph: Graph, lower: Tensor, upper: Tensor, last: int | None = None) -> list[Interval | None]:
    """Box bounds of every node up to ``last`` (default: the output) from the input box (N, *input_shape)."""
    last = graph.output if last is None else last
    needed = set(graph.ancestors(last))
    out: list[Interval | None] = []
    for node in graph.nodes[:last + 1]:
        if node.index not in needed:
            out.append(None)
            continue
        if node.kind == "input":
            out.append((lower, upper))
            continue
        lo, hi = out[node.inputs[0]]
        if node.kind == "add":
            lo2, hi2 = out[node.inputs[1]]
            out.append((lo + lo2, hi + hi2))
        elif node.kind in ("relu", "maxpool"):  # monotone
            out.append((node.op.forward(lo), node.op.forward(hi)))
        else:
            centre, radius = node.op.forward((hi + lo) * 0.5), node.op.forward_abs((hi - lo) * 0.5)
            out.append((centre - radius, centre + radius))
    return out


def ibp_margins(graph: Graph, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
    """Lower bounds (N, K) of logit_y - logit_j over ball and box; column y is 0.

    When the logits come from an affine layer, the specification is folded into it.
    """
    return margins_and_bounds(graph, x, y, threat)[0]


def margins_and_bounds(graph: Graph, x: Tensor, y: Tensor, threat: ThreatModel) -> tuple[Tensor, list]:
    """:func:`ibp_margins` and the interval bounds of every node they were computed from."""
    out_node = graph.nodes[graph.output]
    lower, upper = input_box(x, threat)
    if out_node.kind == "affine":
        bounds = interval_bounds(graph, lower, upper, last=out_node.inputs[0])
        lo, hi = bounds[out_node.inputs[0]]
        k = out_node.shape[0]
        spec = spec_matrix(y, k).to(lo.dtype)  # (N, K, K)
        a = out_node.op.backward(spec.reshape(spec.shape[0], k, *out_node.shape))
        margin = box_lower(a, (hi + lo) / 2, (hi - lo) / 2)
        bias = out_node.op.bias_term(spec.reshape(spec.shape[0], k, *out_node.shape))
        if bias is not None:
            margin = margin + bias
    else:
        bounds = interval_bounds(graph, lower, upper)
        lo, hi = bounds[graph.output]
        lo, hi = lo.flatten(1), hi.flatten(1)
        margin = lo.gather(1, y[:, None]) - hi
    return margin.scatter(1, y[:, None], 0.0), bounds


class IBP(Certifier):
    """Interval bound propagation (Gowal et al. 2018) for Linf and L2 balls intersected with the box.

    ``IBP().bound_margins(model, x, y, threat)`` returns margins (N, K) that carry gradients to the
    parameters when called under grad mode (certified training); BatchNorm uses its running
    statistics. x (N, C, H, W) or (N, D) in the box, y (N,) int64.

    >>> # result = IBP()(model, x, y, ThreatModel("Linf", 0.1)); result.certified
    """

    name = "ibp"
    differentiable = True

    def check_supported(self, model: nn.Module) -> None:
        check_supported(model)

    def unsupported(self, model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
        return unsupported_reason(model, input_shape)

    def bound_margins(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        graph = build_graph(model, tuple(x.shape[1:]))
        return ibp_margins(graph, x, y.to(torch.int64), threat)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> CertResult:
        """Margins proven under rounding (:func:`certify.rounding.proven_margins`), then the verdicts.
        Cost: :func:`ibp_cost`, a forward pass for the error bounds, and the float64 recomputation."""
        graph = build_graph(model, tuple(x.shape[1:]))  # once for the margins and their cost
        y = y.to(torch.int64)
        margin, bounds = margins_and_bounds(graph, x, y, threat)
        rechecked = 0

        def recompute(rows: Tensor):
            nonlocal rechecked
            rechecked = rows.numel()
            graph64, x64 = build_graph(float64_model(model), tuple(x.shape[1:])), x[rows].double()
            again, bounds64 = margins_and_bounds(graph64, x64, y[rows], threat)
            return graph64, bounds64, x64, again

        proven = proven_margins(graph, bounds, x, y, threat, margin, recompute)
        cost = ibp_cost(graph) + 1 + (ibp_cost(graph) + 1) * rechecked / max(1, x.shape[0])
        return self._result(as_margin_lower(proven, x.dtype), y, cost)


def ibp_cost(graph: Graph) -> float:
    """IBP's cost in forward passes: centre and radius through every affine layer (|W| r costs as
    much as W c), the last layer instead K times backward (the specification folded into it)."""
    out = graph.nodes[graph.output]
    if out.kind != "affine":
        return 2.0
    before = sum(n.op.macs for n in graph.nodes[:graph.output] if n.kind == "affine")
    return (2 * before + out.shape[0] * out.op.macs) / max(1, graph.forward_macs)
