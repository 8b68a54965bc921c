"""Per-layer transforms of the bound propagators, kept apart from the graph walk (after jax_verify).

Every affine layer (Linear, Conv2d, AvgPool2d, the zoo's ``Normalize``, eval-mode BatchNorm,
Flatten) becomes an :class:`AffineOp` with four operations:

- ``forward(x)``: the layer itself, x (B, *in) -> (B, *out);
- ``linear(x)``: the layer without its bias, ``W x`` (the matrix-free SDP's forward product);
- ``forward_abs(r)``: ``|W| r`` without bias (interval radius, Gowal et al. 2018);
- ``backward(A)``: ``A W``, A (B, S, *out) -> (B, S, *in) (the transpose, for CROWN);
- ``bias_term(A)``: ``A b``, (B, S).

The two nonlinear layers, ReLU and MaxPool2d, get linear relaxations from their input bounds
(CROWN, Zhang et al. 2018, arXiv 1811.00866) and a :func:`relaxed_backward` step. Everything is
plain differentiable torch, so bounds carry gradients to the parameters (certified training).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class AffineOp:
    """Base of the affine layers; ``in_shape``/``out_shape`` are per-example shapes."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    #: (weight-like, bias-like) elementwise bounds on how far folded parameters (Normalize, BatchNorm,
    #: AvgPool) are from their exact values, in the parameters' shapes; None where they are exact
    param_error: tuple[Tensor | None, Tensor | None] | None = None

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_abs(self, r: Tensor) -> Tensor:
        raise NotImplementedError

    def linear(self, x: Tensor) -> Tensor:
        """``W x`` without the bias: the forward derivative of an affine map (subclasses do it directly)."""
        return torch.func.jvp(self.forward, (torch.zeros_like(x),), (x,))[1]

    def backward(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def bias_term(self, a: Tensor) -> Tensor | None:
        return None

    @property
    def macs(self) -> int:
        """Multiply-accumulates of ``forward`` for one example (and of ``backward`` for one row)."""
        return 0


def pooled_size(size, kernel, stride, padding, dilation) -> tuple[int, ...]:
    """Spatial output size of a convolution or pooling window (floor mode), per spatial dimension."""
    return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1
                 for i, k, s, p, d in zip(size, kernel, stride, padding, dilation))


def _rows(a: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(B, S, *shape) viewed as (B * S, *shape)."""
    return a.reshape(-1, *shape)


class LinearOp(AffineOp):
    def __init__(self, weight: Tensor, bias: Tensor | None, in_shape: tuple[int, ...]) -> None:
        self.weight, self.bias = weight, bias
        self.in_shape, self.out_shape = in_shape, (weight.shape[0],)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    @property
    def macs(self) -> int:
        return self.weight.numel()

    def forward_abs(self, r: Tensor) -> Tensor:
        return F.linear(r, self.weight.to(r).abs())

    def linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def backward(self, a: Tensor) -> Tensor:
        return a @ self.weight

    def bias_term(self, a: Tensor) -> Tensor | None:
        return None if self.bias is None else a @ self.bias


class ConvOp(AffineOp):
    """Conv2d (zero padding); AvgPool2d is the depthwise conv with weights 1 / k^2."""

    def __init__(self, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
                 in_shape: tuple[int, ...]) -> None:
        self.weight, self.bias = weight, bias
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_shape = in_shape
        self.out_shape = (weight.shape[0], *pooled_size(in_shape[1:], weight.shape[2:], stride, padding, dilation))
        # output_padding that makes the transposed conv return exactly the input's size
        self._out_pad = tuple(
            i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for i, o, s, p, d, k in zip(in_shape[1:], self.out_shape[1:], self.stride, self.padding,
                                         self.dilation, weight.shape[2:]))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight.to(x), self.bias, self.stride, self.padding, self.dilation, self.groups)

    @property
    def macs(self) -> int:
        return self.weight.numel() * math.prod(self.out_shape[1:])

    def forward_abs(self, r: Tensor) -> Tensor:
        return F.conv2d(r, self.weight.to(r).abs(), None, self.stride, self.padding, self.dilation, self.groups)

    def linear(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight.to(x), None, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, a: Tensor) -> Tensor:
        lead = a.shape[:2]
        # channels-last takes oneDNN's transposed conv: ~3x faster than the default path on CPU
        rows = _rows(a, self.out_shape).contiguous(memory_format=torch.channels_last)
        out = F.conv_transpose2d(rows, self.weight.to(a), None, self.stride, self.padding, self._out_pad,
                                 self.groups, self.dilation)
        return out.contiguous().reshape(*lead, *self.in_shape)

    def bias_term(self, a: Tensor) -> Tensor | None:
        return None if self.bias is None else a.sum(dim=(-1, -2)) @ self.bias


class ScaleShiftOp(AffineOp):
    """``x * scale + shift`` with ``scale`` and ``shift`` broadcast over the batch (the subclasses fix their shape)."""

    scale: Tensor
    shift: Tensor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    @property
    def macs(self) -> int:
        return math.prod(self.in_shape)

    def forward_abs(self, r: Tensor) -> Tensor:
        return r * self.scale.abs()

    def linear(self, x: Tensor) -> Tensor:
        return x * self.scale

    def backward(self, a: Tensor) -> Tensor:
        return a * self.scale

    def bias_term(self, a: Tensor) -> Tensor | None:
        return (a * self.shift).flatten(2).sum(-1)


class ChannelAffineOp(ScaleShiftOp):
    """``x * scale + shift`` per channel (dim 1 of the batch): Normalize and eval BatchNorm."""

    def __init__(self, scale: Tensor, shift: Tensor, in_shape: tuple[int, ...]) -> None:
        view = (-1,) + (1,) * (len(in_shape) - 1)
        self.scale, self.shift = scale.reshape(view), shift.reshape(view)
        self.in_shape = self.out_shape = in_shape


class ReshapeOp(AffineOp):
    """Flatten (and any other pure reshape of the per-example tensor)."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        self.in_shape, self.out_shape = in_shape, out_shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    forward_abs = linear = forward

    def backward(self, a: Tensor) -> Tensor:
        return a.reshape(*a.shape[:2], *self.in_shape)


# --- nonlinear layers ------------------------------------------------------------------------
class MaxPoolOp:
    """MaxPool2d (floor mode) as windows over a -inf padded input."""

    def __init__(self, kernel, stride, padding, dilation, in_shape: tuple[int, ...]) -> None:
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation
        self.in_shape = in_shape
        self.out_shape = (in_shape[0], *pooled_size(in_shape[1:], kernel, stride, padding, dilation))

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation)

    def windows(self, t: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, Ho, Wo, k) window entries; padding reads as -inf."""
        ph, pw = self.padding
        if ph or pw:
            t = F.pad(t, (pw, pw, ph, ph), value=-math.inf)
        n, c = t.shape[:2]
        cols = F.unfold(t.reshape(n * c, 1, *t.shape[2:]), self.kernel, self.dilation, 0, self.stride)
        return cols.reshape(n, c, cols.shape[1], *self.out_shape[1:]).permute(0, 1, 3, 4, 2)

    def scatter(self, w: Tensor) -> Tensor:
        """Adjoint of :meth:`windows`: (R, C, Ho, Wo, k) -> (R, C, H, W), overlaps summed."""
        ph, pw = self.padding
        out = fold_windows(w.permute(0, 1, 4, 2, 3), self.kernel, self.stride, self.dilation)
        # rows and columns past the last window (floor mode) get no coefficient
        out = F.pad(out, (0, max(0, self.in_shape[2] + 2 * pw - out.shape[-1]),
                          0, max(0, self.in_shape[1] + 2 * ph - out.shape[-2])))
        return out[:, :, ph:ph + self.in_shape[1], pw:pw + self.in_shape[2]]


def fold_windows(w: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """Sum window entries back onto the grid: w (..., k, h, w) -> (..., (h-1)*s + d*(kh-1) + 1, ...).

    Non-overlapping windows are a reshape; others a transposed conv with one-hot kernels (F.fold
    loops over the batch in Python-sized steps and is far slower on many small images).
    """
    kh, kw = kernel
    lead, (h, wd) = w.shape[:-3], w.shape[-2:]
    if tuple(stride) == (kh, kw) and tuple(dilation) == (1, 1):
        out = w.reshape(*lead, kh, kw, h, wd).permute(*range(len(lead)), -2, -4, -1, -3)
        return out.reshape(*lead, h * kh, wd * kw)
    eye = torch.eye(kh * kw, dtype=w.dtype, device=w.device).reshape(kh * kw, 1, kh, kw)
    out = F.conv_transpose2d(w.reshape(-1, kh * kw, h, wd), eye, stride=stride, dilation=dilation)
    return out.reshape(*lead, *out.shape[-2:])


def _bias(a: Tensor, intercept: Tensor) -> Tensor:
    """``min(A, 0) . intercept`` per (example, row): A (B, S, *shape), intercept (N, *shape); B and N are
    equal or one of them is 1 (A or the relaxation shared by every example)."""
    neg, icpt = a.clamp(max=0).flatten(2), intercept.flatten(1)
    if neg.shape[0] == icpt.shape[0]:
        return torch.einsum("nsd,nd->ns", neg, icpt)
    if icpt.shape[0] == 1:
        return neg @ icpt[0]
    bias = neg @ icpt.T
    return bias.squeeze(0).T if bias.shape[0] == 1 else bias


class Relaxation:
    """Linear bounds of a nonlinear layer's output from its input bounds (per example).

    ReLU (elementwise): ``lower_slope * x <= relu(x) <= upper_slope * x + upper_intercept``.
    MaxPool: ``sum_k lower_w[k] x_k <= max_k x_k <= sum_k upper_w[k] x_k + upper_intercept`` per window.
    """

    def __init__(self, kind: str, lower_slope: Tensor, upper_slope: Tensor, upper_intercept: Tensor,
                 pool: MaxPoolOp | None = None, unstable: Tensor | None = None, negative_slope: float = 0.0) -> None:
        self.kind, self.pool, self.unstable = kind, pool, unstable
        self.lower_slope, self.upper_slope, self.upper_intercept = lower_slope, upper_slope, upper_intercept
        self.negative_slope = negative_slope  # LeakyReLU's; the sound lower slopes are [negative_slope, 1]

    def select(self, index: Tensor) -> "Relaxation":
        """The relaxation of the examples ``index`` only."""
        return Relaxation(self.kind, self.lower_slope[index], self.upper_slope[index], self.upper_intercept[index],
                          self.pool, None if self.unstable is None else self.unstable[index], self.negative_slope)

    def optimised_slope(self, lower_slope: Tensor) -> Tensor:
        """alpha-CROWN's slopes (N, S, *shape) in [0, 1] on the unstable neurons, the others' own slopes;
        a LeakyReLU's are raised to its negative slope (a lower line below it is not sound)."""
        if self.negative_slope:
            lower_slope = lower_slope.clamp(min=self.negative_slope)
        return torch.where(self.unstable.unsqueeze(1), lower_slope, self.lower_slope.unsqueeze(1))

    def backward(self, a: Tensor, lower_slope: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Lower bound of ``A y`` as ``A' x + bias``: A (B, S, *out) -> (A' (B', S, *in), bias (B', S)).

        ``lower_slope`` (N, S, *out) overrides the ReLU's lower slopes on its unstable neurons
        (alpha-CROWN); it must lie in [0, 1].
        """
        bias = _bias(a, self.upper_intercept)
        if self.kind == "relu":
            low = self.lower_slope.unsqueeze(1) if lower_slope is None else self.optimised_slope(lower_slope)
            return a * torch.where(a >= 0, low, self.upper_slope.unsqueeze(1)), bias
        a = a.unsqueeze(-1)
        weights = a * torch.where(a >= 0, self.lower_slope.unsqueeze(1), self.upper_slope.unsqueeze(1))
        lead = weights.shape[:2]
        out = self.pool.scatter(weights.reshape(-1, *weights.shape[2:]))
        return out.reshape(*lead, *out.shape[1:]), bias


class ReluOp:
    """ReLU, or LeakyReLU with ``negative_slope`` a in [0, 1]: ``x if x >= 0 else a x`` (monotone, convex)."""

    def __init__(self, negative_slope: float = 0.0) -> None:
        self.negative_slope = float(negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=0) if not self.negative_slope else F.leaky_relu(x, self.negative_slope)


def relu_relaxation(lower: Tensor, upper: Tensor, negative_slope: float = 0.0) -> Relaxation:
    """CROWN's (Leaky)ReLU relaxation: the chord above, an adaptive slope below (1 if u >= -l, else the
    negative slope a); a stable neuron is exact (slope 1 or a)."""
    a = float(negative_slope)
    unstable = (lower < 0) & (upper > 0)
    active = lower >= 0
    stable_slope = torch.where(active, torch.ones_like(upper), torch.full_like(upper, a))
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    up_slope = torch.where(unstable, (upper - a * lower) / width, stable_slope)
    up_intercept = torch.where(unstable, (a - up_slope) * lower, torch.zeros_like(upper))
    low_slope = torch.where(unstable, torch.where(upper >= -lower, 1.0, a).to(upper.dtype), stable_slope)
    return Relaxation("relu", low_slope, up_slope, up_intercept, unstable=unstable, negative_slope=a)


def maxpool_relaxation(pool: MaxPoolOp, lower: Tensor, upper: Tensor) -> Relaxation:
    """A sound linear relaxation of the max over each window from its input bounds.

    Below: the entry with the largest centre (``max >= x_i`` for any i). Above, the candidate with
    the smallest mean over the window's box: the constant ``max_k u_k``; ``x_i + max(0, max_{j!=i}
    u_j - l_i)`` with i the largest upper bound (exact when i dominates); or
    ``sum_k (x_k - l_k) + max_k l_k`` (exact at the lower corner).
    """
    lo, hi = pool.windows(lower), pool.windows(upper)  # (N, C, Ho, Wo, k)
    valid = torch.isfinite(lo)
    zero = torch.zeros_like(lo)
    lo_v, hi_v = torch.where(valid, lo, zero), torch.where(valid, hi, zero)
    centre = torch.where(valid, (lo_v + hi_v) / 2, torch.full_like(lo, -math.inf))
    k = lo.shape[-1]
    low_w = F.one_hot(centre.argmax(-1), k).to(lo.dtype)

    u_max, i_up = hi.max(-1)
    onehot_up = F.one_hot(i_up, k).to(lo.dtype)
    others = torch.where(onehot_up.bool(), torch.full_like(hi, -math.inf), hi).amax(-1)
    l_i = (lo_v * onehot_up).sum(-1)
    c_b = (others - l_i).clamp(min=0)
    mean_b = ((lo_v + hi_v) / 2 * onehot_up).sum(-1) + c_b
    l_max = lo.amax(-1)
    c_c = l_max - lo_v.sum(-1)
    mean_c = ((hi_v - lo_v) / 2).sum(-1) + l_max
    best = torch.stack([u_max, mean_b, mean_c], -1).argmin(-1)  # 0: constant, 1: one entry, 2: sum
    up_w = torch.where((best == 1).unsqueeze(-1), onehot_up,
                       torch.where((best == 2).unsqueeze(-1), valid.to(lo.dtype), zero))
    up_c = torch.where(best == 0, u_max, torch.where(best == 1, c_b, c_c))
    return Relaxation("maxpool", low_w, up_w, up_c, pool=pool)


def pool_windows_disjoint(pool: MaxPoolOp) -> bool:
    """True when the windows tile the input without overlap or padding (LeNet's 2x2 pools)."""
    return tuple(pool.stride) == tuple(pool.kernel) and tuple(pool.padding) == (0, 0) \
        and tuple(pool.dilation) == (1, 1)


class ReluPoolRelaxation:
    """``maxpool(relu(x))`` over disjoint windows as ONE backward step (same bound, fewer passes).

    The pool's relaxation weights are >= 0, so the sign of a window's coefficient decides the side of
    both relaxations: coefficient a >= 0 takes ``a * lower_w * relu_lower`` per entry, a < 0 takes
    ``a * upper_w * relu_upper`` and the intercept ``a * (pool_icpt + sum_k upper_w relu_icpt)``.
    ``positive``/``negative`` (N, C, H, W) and ``negative_bias`` (N, C, Ho, Wo) hold those products.
    """

    def __init__(self, relu: Relaxation, pool: Relaxation) -> None:
        op = pool.pool
        self.relu, self.op = relu, op
        self.lower_w, upper_w = op.scatter(pool.lower_slope), op.scatter(pool.upper_slope)
        self.positive = self.lower_w * relu.lower_slope
        self.negative = upper_w * relu.upper_slope
        self.negative_bias = pool.upper_intercept + (pool.upper_slope * op.windows(relu.upper_intercept)).sum(-1)

    def select(self, index: Tensor) -> "ReluPoolRelaxation":
        """The relaxation of the examples ``index`` only."""
        out = ReluPoolRelaxation.__new__(ReluPoolRelaxation)
        out.relu, out.op = self.relu.select(index), self.op
        out.lower_w, out.positive, out.negative = self.lower_w[index], self.positive[index], self.negative[index]
        out.negative_bias = self.negative_bias[index]
        return out

    def tile(self, a: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        """Coefficients at the ReLU's input: a (..., C, h, w) per window, positive/negative broadcastable
        to (..., C, h*kh, w*kw); entries past the last window (floor mode) are 0."""
        kh, kw = self.op.kernel
        h, w = a.shape[-2:]
        # a upsampled to the ReLU's grid first: small when a is shared by examples and positions, and the
        # products below then run over contiguous rows (a size-2 broadcast innermost is ~4x slower)
        up = a[..., :, None, :, None].expand(*a.shape[:-2], h, kh, w, kw).reshape(*a.shape[:-2], h * kh, w * kw)
        pos, neg = positive[..., :h * kh, :w * kw], negative[..., :h * kh, :w * kw]
        if torch.is_grad_enabled() and (a.requires_grad or pos.requires_grad or neg.requires_grad):
            out = torch.where(up >= 0, pos, neg) * up
        elif 4 * up.numel() <= math.prod(max(u, p) for u, p in zip(up.shape, pos.shape)):  # a shared: split it
            out = pos * up.clamp(min=0)
            out.addcmul_(neg, up.clamp(max=0))
        else:
            out = torch.where(up >= 0, pos, neg).mul_(up)
        full_h, full_w = positive.shape[-2:]
        if (full_h, full_w) != (h * kh, w * kw):
            out = F.pad(out, (0, full_w - w * kw, 0, full_h - h * kh))
        return out

    def backward(self, a: Tensor, lower_slope: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """As :meth:`Relaxation.backward` of the pool then the ReLU: A (B, S, C, Ho, Wo) -> (A', bias)."""
        positive = self.positive.unsqueeze(1)
        if lower_slope is not None:  # alpha-CROWN slopes (N, S, C, H, W) on the unstable ReLUs
            positive = self.lower_w.unsqueeze(1) * self.relu.optimised_slope(lower_slope)
        bias = _bias(a, self.negative_bias)
        return self.tile(a, positive, self.negative.unsqueeze(1)), bias
