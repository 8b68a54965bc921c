"""Certified verdicts that floating-point rounding cannot make wrong: the one rule of every certifier.

**What a certificate is about.** The network in exact real arithmetic on its stored parameters: float32
weights are exact reals, and folded parameters (Normalize's ``1/std``, BatchNorm's scale and shift,
AvgPool's ``1/k^2``) are the reals they denote; the threat set is the ball of radius ``eps`` (the Python
float given) intersected with the box. A float32 forward pass of the same network differs from that
exact function by its own rounding (order 1e-6 relative); a certificate says nothing about that.

**The rule.** A certifier computes its margin bounds in floating point, then subtracts a proven bound on
their rounding error before it reads a sign; every intermediate bound handed from one certifier to
another (CROWN's pre-activation bounds for LP/SDP) is widened by its own proven error. IBP and CROWN
first run in the input's dtype; each float32 bound gets the float32 error bound of :func:`error_bounds`,
and an example whose float32 margins are all positive but not after that pad is recomputed in float64
on a float64 copy of the network (:func:`float64_model`: an exact conversion, folded in float64) with the
float64 error bound, which is about 1e-9 of the float32 one. LP and SDP work on the float64 copy only.

**Error model** (Higham 2002, *Accuracy and Stability of Numerical Algorithms*, ch. 3): with unit
roundoff u, +, -, *, / and sqrt are correctly rounded, and a sum of n products computed in any order
(blocked, pairwise, fused multiply-add) has ``|fl(sum a_i b_i) - sum a_i b_i| <= gamma_n sum |a_i b_i|``,
``gamma_n = n u / (1 - n u)``. It holds for float64 on CPU and CUDA and for float32 on CPU
(oneDNN's direct convolutions, BLAS GEMM). It does not hold for float32 on CUDA (TF32, FFT and
Winograd convolutions): there the float32 pass only chooses which examples to recompute in float64,
and :func:`unit_roundoff` returns None.

**The error bound** (docs/soundness.md derives each line). :func:`error_bounds` runs one forward
recursion over the graph: E_k (per example, per value of node k) bounds both how far the true value
may lie outside node k's computed bounds, and the rounding error of any backward linear bound (CROWN,
alpha-CROWN, IBP's folded last layer) started at node k with a row of unit 1-norm. With M_k = max(|l_k|,
|u_k|) + E_k a bound on the true magnitudes and L the number of nodes:

- input: ``gamma_{d+L+8} (M + eps) + 2u (|x| + eps)`` (the box ``x -+ eps`` rounded; the concretisation);
- affine ``W v + b``: ``(1 + g) |W| E + g |W| M + g_b |b| + |dW| M + |db|``, g = gamma over the longest
  sum of its forward and transposed products, g_b over its bias sums, dW, db the folding errors;
- ReLU: ``(1 + g) E + E + g M`` (a relaxation built from bounds that are off by E is off by at most E;
  rounded slopes and intercepts by 4u M);
- max-pool (k entries per window): ``(1 + g) sum_window E + k max_window E + g k max_window M``;
- addition: ``(1 + g) (E_a + E_b) + g (M_a + M_b)``; a node used twice adds ``g M`` (coefficients merged).

A margin ``logit_y - logit_j`` is then off by at most ``E_out[y] + E_out[j]`` (:func:`margin_pad`).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_lite.threat import ThreatModel

from .graph import Graph
from .affine_ops import ElementwiseAffineOp, EmbedOp, SeparablePoolOp
from .layers import AffineOp, ChannelAffineOp, ConvOp, LinearOp, ReshapeOp

_EXACT = (ReshapeOp, EmbedOp)  # pure data movement: no rounding, errors carried as they are

Interval = tuple[Tensor, Tensor]
Boxes = Mapping[int, Interval] | Sequence["Interval | None"]

#: sums of non-negative float64 numbers (pads, folding errors): their own rounding is a relative 1e-13 at most
_SELF = 1.0 + 2.0 ** -20


def unit_roundoff(dtype: torch.dtype, device: torch.device | str = "cpu") -> float | None:
    """u of arithmetic in ``dtype`` on ``device`` under the summation error model, None where the model
    does not hold (float32 and lower precisions on CUDA). float32 matmuls allowed to run in TF32 or bf16
    (``torch.set_float32_matmul_precision``) count with that precision."""
    if dtype == torch.float64:
        return 2.0 ** -53
    if torch.device(device).type != "cpu" or not dtype.is_floating_point:
        return None
    u = torch.finfo(dtype).eps / 2
    if dtype == torch.float32:
        u = {"highest": u, "high": 2.0 ** -11}.get(torch.get_float32_matmul_precision(), 2.0 ** -8)
    return u


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u); inf where n u >= 1/2 (the bound says nothing there)."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 0.5 else math.inf


def float64_model(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` (parameters and buffers converted exactly; the original is untouched)."""
    return copy.deepcopy(model).to(torch.float64)


def _parameters(graph: Graph) -> list[Tensor]:
    return [t for node in graph.nodes if node.kind == "affine" for t in vars(node.op).values() if torch.is_tensor(t)]


def _magnitude(box: Interval, dtype: torch.dtype = torch.float64) -> Tensor:
    lo, hi = box
    m = torch.maximum(lo.abs(), hi.abs())
    return m.to(dtype) if m.dtype == dtype else up_cast(m, dtype)


def up_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Non-negative ``t`` in ``dtype``, never rounded down."""
    out = t.to(dtype)
    return torch.where(out.to(t.dtype) < t, torch.nextafter(out, torch.full_like(out, math.inf)), out)


def _lengths(op: AffineOp) -> tuple[int, int]:
    """(longest sum of products of the weights: forward or transposed; longest sum of the bias term)."""
    if isinstance(op, LinearOp):
        out_f, in_f = op.weight.shape
        return max(in_f, out_f) + 2, out_f + 2
    if isinstance(op, ConvOp):
        c_out, c_in, kh, kw = op.weight.shape
        return max(c_in, c_out // op.groups) * kh * kw + 2, math.prod(op.out_shape[1:]) + c_out + 2
    if isinstance(op, (ChannelAffineOp, ElementwiseAffineOp)):
        return 3, math.prod(op.in_shape) + op.in_shape[0] + 2
    if isinstance(op, SeparablePoolOp):  # two stages of sums, H and W long: within one sum of H * W
        return op.in_shape[1] * op.in_shape[2] + 2, 2
    raise TypeError(f"no rounding model for {type(op).__name__}")


def _abs_bias(op: AffineOp, like: Tensor) -> Tensor | float:
    """|b| broadcast to the layer's output (N, *out)."""
    if isinstance(op, LinearOp):
        return 0.0 if op.bias is None else op.bias.detach().abs().to(like)
    if isinstance(op, ConvOp):
        return 0.0 if op.bias is None else op.bias.detach().abs().to(like).reshape(-1, 1, 1)
    if isinstance(op, SeparablePoolOp):
        return 0.0
    return op.shift.detach().abs().to(like)


def parameter_term(op: AffineOp, m: Tensor) -> Tensor | float:
    """|dW| m + |db| of an op whose parameters were folded with rounding (``op.param_error``)."""
    if isinstance(op, SeparablePoolOp):  # |P_h' X P_w'^T - P_h X P_w^T| <= rel P_h |X| P_w^T (weights >= 0)
        return op.relative_error * op.forward(m)
    if op.param_error is None:
        return 0.0
    weight_error, bias_error = op.param_error
    out: Tensor | float = 0.0
    if weight_error is not None:
        w = weight_error.detach().to(m)
        if isinstance(op, ConvOp):
            out = F.conv2d(m, w, None, op.stride, op.padding, op.dilation, op.groups)
        else:  # ChannelAffineOp
            out = m * w.reshape(op.scale.shape)
    if bias_error is not None:
        out = out + bias_error.detach().to(m).reshape(
            op.shift.shape if isinstance(op, (ChannelAffineOp, ElementwiseAffineOp)) else (-1,))
    return out


def _abs_op(op: AffineOp) -> AffineOp:
    """The op with |W| and |b| (applied backward, ``|A| |W|``; forward, ``|W| t + |b|``)."""
    if isinstance(op, LinearOp):
        return LinearOp(op.weight.abs(), None if op.bias is None else op.bias.abs(), op.in_shape)
    if isinstance(op, ConvOp):
        return ConvOp(op.weight.abs(), None if op.bias is None else op.bias.abs(), op.stride, op.padding,
                      op.dilation, op.groups, op.in_shape)
    if isinstance(op, ChannelAffineOp):
        return ChannelAffineOp(op.scale.abs(), op.shift.abs(), op.in_shape)
    if isinstance(op, ElementwiseAffineOp):
        return ElementwiseAffineOp(op.scale.abs(), op.shift.abs(), op.in_shape)
    return op  # reshapes, embeddings and averaging (weights >= 0)


def _parameter_backward(op: AffineOp, a: Tensor) -> Tensor | float:
    """``a |dW|`` (a >= 0) for an op with folding errors (the transpose of :func:`parameter_term`)."""
    if isinstance(op, SeparablePoolOp):
        return op.relative_error * op.backward(a)
    if op.param_error is None or op.param_error[0] is None:
        return 0.0
    weight_error = op.param_error[0].detach().to(a)
    if isinstance(op, ConvOp):
        return ConvOp(weight_error, None, op.stride, op.padding, op.dilation, op.groups, op.in_shape).backward(a)
    return a * weight_error.reshape(op.scale.shape)


def fold_errors(ops: Sequence[AffineOp], a: Sequence[Tensor], b: Sequence[Tensor], u: float) -> tuple[Tensor, Tensor]:
    """Elementwise bounds (dW, db) on how far the dense map of :func:`certify.graph.fold_affine` (its steps
    ``a``, ``b``, computed with unit roundoff u) is from the exact map of the exact layers: each step adds
    its products' rounding (gamma of its longest sum) and its parameters' folding error, and carries the
    earlier steps' error through |W|."""
    error_a = torch.zeros_like(a[0])
    for step, op in enumerate(reversed(ops)):
        if isinstance(op, _EXACT):
            error_a = op.backward(error_a)
            continue
        g = gamma(_lengths(op)[0] + 4, u)
        magnitude = a[step].abs()
        error_a = _abs_op(op).backward(error_a + g * magnitude) + _parameter_backward(op, magnitude + error_a)
    error_b = torch.zeros_like(b[0])
    for step, op in enumerate(ops):
        if isinstance(op, _EXACT):
            error_b = op.forward(error_b)
            continue
        g = gamma(_lengths(op)[0] + 4, u)
        magnitude = b[step].abs()
        error_b = (op.forward_abs(error_b + g * magnitude) + g * _abs_bias(op, magnitude)
                   + parameter_term(op, magnitude + error_b))
    n_out = a[-1].shape[1]
    return (error_a * _SELF).reshape(n_out, -1), (error_b * _SELF).reshape(-1)


@torch.no_grad()
def error_bounds(graph: Graph, boxes: Boxes, x: Tensor, threat: ThreatModel, u: float) -> dict[int, Tensor]:
    """E_k (N, *shape_k) for the output and every node it depends on (see the module docstring).

    ``boxes[k]``: the computed bounds of node k for every node before the output that the output depends
    on (IBP's :func:`certify.ibp.interval_bounds` or a CROWN :class:`certify.crown.Propagator`'s
    ``boxes``), computed in arithmetic of unit roundoff ``u`` from x (N, *input_shape). The recursion
    itself runs in x's dtype (float32 or float64) on non-negative numbers, each step's result raised by
    ``1 + 2 gamma`` of its own sums, so that its rounding can only make E larger.
    """
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float64
    length = len(graph.nodes)
    err: dict[int, Tensor] = {}
    mag: dict[int, Tensor] = {}
    eps = float(threat.eps)

    def up(t: Tensor, n: int) -> Tensor:
        return t * (1 + 2 * gamma(n + 8, torch.finfo(work).eps / 2))

    for i in sorted(graph.ancestors(graph.output)):
        node = graph.nodes[i]
        if node.kind == "input":
            m = _magnitude(boxes[i], work)
            d = math.prod(node.shape)
            e = up(gamma(d + length + 8, u) * (m + eps) + 2 * u * (x.detach().to(work).abs() + eps), 0)
        elif node.kind == "relu":
            j = node.inputs[0]
            g = gamma(math.prod(node.shape) + length + 8, u)
            e = up((2 + g) * err[j] + g * mag[j], 0)
        elif node.kind == "maxpool":
            j = node.inputs[0]
            k = math.prod(node.op.kernel)
            g = gamma(math.prod(node.shape) + k + length + 8, u)
            win_e = node.op.windows(err[j]).nan_to_num(neginf=0.0)  # padding reads as -inf: no entry
            win_m = node.op.windows(mag[j]).nan_to_num(neginf=0.0)
            e = up((1 + g) * win_e.sum(-1) + k * win_e.amax(-1) + g * k * win_m.amax(-1), k)
        elif node.kind == "add":
            a, b = node.inputs
            g = gamma(length + 4, u)
            e = up((1 + g) * (err[a] + err[b]) + g * (mag[a] + mag[b]), 0)
        elif isinstance(node.op, _EXACT):
            e = node.op.forward(err[node.inputs[0]])
        else:
            j, op = node.inputs[0], node.op
            n_weight, n_bias = _lengths(op)
            g, g_bias = gamma(n_weight + length + 8, u), gamma(n_bias + length + 8, u)
            e = up(op.forward_abs(up((1 + g) * err[j] + g * mag[j], 0))  # (1 + g) |W| E + g |W| M in one pass
                   + g_bias * _abs_bias(op, err[j]) + parameter_term(op, mag[j]), n_weight)
        if i != graph.output:
            if len(node.consumers) > 1:  # backward coefficients from several consumers are summed here
                e = up(e + gamma(length + 4, u) * (_magnitude(boxes[i], work) + e), 0)
            mag[i] = up(_magnitude(boxes[i], work) + e, 0)
        err[i] = e
    return err


def margin_pad(output_error: Tensor, y: Tensor) -> Tensor:
    """Bound (N, K), float64, on the rounding error of margins ``logit_y - logit_j`` whose logits have
    errors ``output_error`` (N, K): ``E[y] + E[j]``; 0 in column y (exactly 0 by convention)."""
    e = output_error.flatten(1).double()
    pad = (e.gather(1, y[:, None]) + e) * _SELF
    return pad.scatter(1, y[:, None], 0.0)


def subtract_pad(margin: Tensor, pad: Tensor, y: Tensor) -> Tensor:
    """``margin - pad`` in float64, lowered by the subtraction's own rounding; column y stays 0."""
    m = margin.detach().double()
    out = m - pad - 2.0 ** -52 * (m.abs() + pad)
    return out.scatter(1, y[:, None], 0.0)


def round_down(a: Tensor) -> Tensor:
    """float64 -> float32 never rounding up: a lower bound stays a lower bound."""
    f = a.float()
    up = f.double() > a
    return torch.where(up, torch.nextafter(f, torch.tensor(-math.inf, device=f.device)), f)


def padded_margins(graph: Graph, boxes: Boxes, x: Tensor, y: Tensor, threat: ThreatModel,
                   margin: Tensor) -> Tensor | None:
    """``margin`` (N, K) lowered by its proven rounding error, float64; None where x's dtype and device
    have no error model (:func:`unit_roundoff`). ``boxes`` as in :func:`error_bounds`."""
    u = unit_roundoff(x.dtype, x.device)
    if u is None or any(t.dtype != x.dtype for t in _parameters(graph)):
        return None  # no error model, or weights rounded to x's dtype on the fly
    out_error = error_bounds(graph, boxes, x, threat, u)[graph.output]
    return subtract_pad(margin, margin_pad(out_error, y), y)


#: ``rows`` -> (float64 graph, its bounds, x of the rows in float64, float64 margins of the rows)
Recompute = Callable[[Tensor], "tuple[Graph, Boxes, Tensor, Tensor]"]


@torch.no_grad()
def proven_margins(graph: Graph, boxes: Boxes, x: Tensor, y: Tensor, threat: ThreatModel, margin: Tensor,
                   recompute: Recompute) -> Tensor:
    """Proven lower bounds (N, K), float64, of the margins a certifier computed as ``margin`` from the
    bounds ``boxes`` of ``graph`` on x (N, ...): ``margin`` lowered by its rounding error (-inf where x's
    dtype and device have none); rows whose margins are all positive but not after that are recomputed
    in float64 by ``recompute`` and lowered by the float64 error, the better of the two kept."""
    sound = padded_margins(graph, boxes, x, y, threat, margin)
    if sound is None:
        sound = torch.full(margin.shape, -math.inf, dtype=torch.float64, device=margin.device)
    rows = (positive(margin, y) & ~positive(sound, y)).nonzero().flatten()
    if rows.numel() and x.dtype != torch.float64:
        graph64, boxes64, x64, margin64 = recompute(rows)
        again = padded_margins(graph64, boxes64, x64, y[rows], threat, margin64)
        sound[rows] = torch.maximum(sound[rows], again)
    return sound


def positive(margin: Tensor, y: Tensor) -> Tensor:
    """(N,) True where every margin but the label's own is > 0."""
    m = margin.detach().clone()
    m.scatter_(1, y[:, None], math.inf)
    return (m > 0).all(dim=1)


def as_margin_lower(sound: Tensor, dtype: torch.dtype) -> Tensor:
    """Proven float64 margins in the certifier's output dtype, rounded down (float32) or kept (float64)."""
    return sound if dtype == torch.float64 else round_down(sound).to(dtype)


@torch.no_grad()
def padded_boxes(boxes: Sequence[Interval], errors: Sequence[Tensor]) -> list[Interval]:
    """Bounds widened by their proven errors (float64): ``(lower - E, upper + E)``."""
    out = []
    for (lo, hi), e in zip(boxes, errors):
        lo, hi = lo.detach().double(), hi.detach().double()
        grow = e + 2.0 ** -52 * (torch.maximum(lo.abs(), hi.abs()) + e)  # the widening's own rounding
        out.append((lo - grow, hi + grow))
    return out


__all__ = ["as_margin_lower", "error_bounds", "float64_model", "fold_errors", "gamma", "margin_pad", "padded_boxes",
           "padded_margins", "parameter_term", "positive", "proven_margins", "round_down", "subtract_pad", "unit_roundoff"]
