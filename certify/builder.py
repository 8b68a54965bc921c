"""Shape-aware lowering of one accepted fx node (see :mod:`certify.lowering` for the rules) into graph nodes.

:func:`lower` receives the node's arguments with values replaced by :class:`Ref` (a node of the graph
being built) and constants by their values, and emits nodes into a :class:`Sink`. Everything that
depends on the traced input size is decided here: the fixed pooling an adaptive one amounts to, the
per-example shape of a ``view``, whether a constant broadcasts without changing the activation's
shape. What cannot be lowered raises :class:`UnsupportedModelError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.fx
from torch import Tensor, nn

from robustbench_lite.errors import UnsupportedModelError
from robustbench_lite.zoo.architectures import Normalize

from .affine_ops import ElementwiseAffineOp, EmbedOp, SeparablePoolOp
from .layers import AffineOp, ChannelAffineOp, ConvOp, LinearOp, MaxPoolOp, ReluOp, ReshapeOp
from .lowering import BATCH


@dataclass(frozen=True)
class Ref:
    """A value of the graph being built: the index of its node."""

    index: int


class Sink(Protocol):
    dtype: torch.dtype  # the model's: folded parameters and constants are made in it

    def emit(self, kind: str, inputs: tuple[int, ...], op: Any, shape: tuple[int, ...], name: str) -> Ref:
        ...

    def shape(self, ref: Ref) -> tuple[int, ...]:
        ...


def _pair(v) -> tuple[int, int]:
    return tuple(int(u) for u in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _bind(args: tuple, kwargs: dict, names: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments of a call as one mapping (after the first, the input)."""
    out = dict(defaults)
    out.update(zip(names, args[1:]))
    out.update(kwargs)
    return out


def _fail(name: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError([f"{name} ({why})"])


def _need_image(shape: tuple[int, ...], name: str, what: str) -> None:
    if len(shape) != 3:
        raise _fail(name, f"{what} of an activation of shape {shape}; needs (C, H, W)")


def _unit(t: Tensor) -> float:
    """Unit roundoff of t's dtype."""
    return torch.finfo(t.dtype).eps / 2


def _avg_conv(shape, kernel, stride, padding, dtype: torch.dtype, divisor: float | None = None,
              channels: bool = False) -> ConvOp:
    """Average pooling as a depthwise convolution (weights 1 / window size, in the model's dtype, with
    their rounding as ``param_error``); ``channels`` averages over the channels too (one output channel)."""
    c = shape[0]
    size = (c if channels else 1) * kernel[0] * kernel[1]
    weight = torch.full((1, c, *kernel) if channels else (c, 1, *kernel), 1.0 / (divisor or size), dtype=dtype)
    op = ConvOp(weight, None, stride, padding, (1, 1), 1 if channels else c, shape)
    op.param_error = (weight * (2 * _unit(weight)), None)  # rounded to double, then to the dtype
    return op


def _check_pool(op: ConvOp | MaxPoolOp, name: str) -> None:
    if min(op.out_shape[1:]) < 1:
        raise _fail(name, f"pooling window larger than the input {op.in_shape}")


def _module_affine(m: nn.Module, shape: tuple[int, ...], name: str, dtype: torch.dtype) -> AffineOp:
    """The layer as an AffineOp. Folded parameters (Normalize, BatchNorm, AvgPool's 1/k^2) are computed in
    the layer's dtype with correctly rounded operations only, and carry ``param_error``: elementwise bounds
    on their distance to the exact values (counted per rounding: |fl(a op b) - a op b| <= u |a op b|)."""
    if isinstance(m, nn.Linear):
        if shape != (m.in_features,):
            raise _fail(name, f"Linear({m.in_features}) on an activation of shape {shape}")
        return LinearOp(m.weight, m.bias, shape)
    if isinstance(m, nn.Conv2d):
        if len(shape) != 3 or shape[0] != m.in_channels:
            raise _fail(name, f"Conv2d({m.in_channels}) on an activation of shape {shape}")
        padding = (0, 0) if m.padding == "valid" else m.padding
        op = ConvOp(m.weight, m.bias, m.stride, padding, m.dilation, m.groups, shape)
        _check_pool(op, name)
        return op
    if isinstance(m, nn.AvgPool2d):
        _need_image(shape, name, "AvgPool2d")
        k = _pair(m.kernel_size)
        op = _avg_conv(shape, k, _pair(m.stride or m.kernel_size), _pair(m.padding), dtype, m.divisor_override)
        _check_pool(op, name)
        return op
    if isinstance(m, Normalize):
        std = m.std.flatten()
        scale, shift = 1.0 / std, -m.mean.flatten() / std  # one rounding each
        op = ChannelAffineOp(scale, shift, shape)
        op.param_error = (scale.abs() * _unit(scale), shift.abs() * _unit(shift))
        return op
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if shape[0] != m.num_features or len(shape) != (3 if isinstance(m, nn.BatchNorm2d) else len(shape)):
            raise _fail(name, f"{type(m).__name__}({m.num_features}) on an activation of shape {shape}")
        scale = 1.0 / torch.sqrt(m.running_var + m.eps)  # three roundings (eps is the exact double given)
        if m.weight is not None:
            scale = scale * m.weight  # a fourth
        mean_scale = m.running_mean * scale
        shift = -mean_scale + (m.bias if m.bias is not None else 0.0)
        u = _unit(scale)
        scale_error = scale.abs() * (5 * u)  # (1 + u)^4 / (1 - u) - 1 <= 5u
        bias = m.bias.abs() if m.bias is not None else 0.0
        shift_error = m.running_mean.abs() * scale_error + (mean_scale.abs() + bias) * (3 * u)
        op = ChannelAffineOp(scale, shift, shape)
        op.param_error = (scale_error, shift_error)
        return op
    if isinstance(m, nn.Flatten):
        return _flatten(shape, m.start_dim, m.end_dim, name)
    raise AssertionError(f"not an affine layer: {m}")


def _dim(d: int, rank: int, name: str) -> int:
    """A dimension of the batched tensor (rank = 1 + per-example rank) as a non-negative index >= 1."""
    d = int(d) + (rank if int(d) < 0 else 0)
    if not 1 <= d < rank:
        raise _fail(name, f"dimension {d} of a rank-{rank} activation (the batch must stay first)")
    return d


def _flatten(shape: tuple[int, ...], start: int, end: int, name: str) -> ReshapeOp:
    rank = len(shape) + 1
    start, end = _dim(start, rank, name), _dim(end, rank, name)
    new = shape[:start - 1] + (math.prod(shape[start - 1:end]),) + shape[end:]
    return ReshapeOp(shape, new)


def _view_shape(dims: list[Any], shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """Per-example shape of ``x.view(*dims)``: the batch stays first (``x.size(0)`` or a leading -1)."""
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    n = math.prod(shape)
    rest = dims[1:]
    bad = _fail(name, f"view/reshape to {tuple(dims)}: the first dimension must stay the batch")
    if not dims or any(d is BATCH for d in rest) or not all(isinstance(d, int) for d in rest):
        raise bad
    if dims[0] is not BATCH and not (dims[0] == -1 and -1 not in rest and math.prod(rest) == n):
        raise bad
    if rest.count(-1) > 1:
        raise bad
    if -1 in rest:
        known = math.prod(d for d in rest if d != -1)
        if known <= 0 or n % known:
            raise bad
        rest = [n // known if d == -1 else d for d in rest]
    if math.prod(rest) != n:
        raise bad
    return tuple(rest)


def _aligned(c: Any, shape: tuple[int, ...], name: str, dtype: torch.dtype) -> Tensor:
    """A constant as a tensor of rank 1 + len(shape) that broadcasts to (1, *shape) without enlarging it."""
    t = c if torch.is_tensor(c) else torch.tensor(float(c), dtype=dtype)
    rank = len(shape) + 1
    if t.dim() > rank:
        raise _fail(name, f"constant of shape {tuple(t.shape)} against an activation of shape {shape}")
    t = t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))
    try:
        full = torch.broadcast_shapes(tuple(t.shape), (1, *shape))
    except RuntimeError:
        full = None
    if full != (1, *shape):
        raise _fail(name, f"constant of shape {tuple(t.shape)} against an activation of shape {shape}")
    return t


def scale_shift(scale: Any, shift: Any, shape: tuple[int, ...], name: str, dtype: torch.dtype) -> AffineOp:
    """``x * scale + shift`` for constants (numbers or tensors) broadcast to the per-example shape:
    a :class:`ChannelAffineOp` when both are per channel, else an :class:`ElementwiseAffineOp`. The
    constants may carry up to two roundings (a number converted to the dtype; a reciprocal, negation
    or product with ``alpha``): ``param_error`` is 3u of their magnitude."""
    s, t = _aligned(scale, shape, name, dtype), _aligned(shift, shape, name, dtype)
    if all(d == 1 for d in tuple(s.shape[2:]) + tuple(t.shape[2:])):
        c = shape[0]
        per_channel = (1, c) + (1,) * (len(shape) - 1)
        op: AffineOp = ChannelAffineOp(s.expand(per_channel).reshape(c), t.expand(per_channel).reshape(c), shape)
    else:
        op = ElementwiseAffineOp(s.expand(1, *shape)[0], t.expand(1, *shape)[0], shape)
    op.param_error = (op.scale.abs() * (3 * _unit(op.scale)), op.shift.abs() * (3 * _unit(op.shift)))
    return op




def lower(rule: str, node: torch.fx.Node, args: tuple, kwargs: dict, sink: Sink,
          modules: dict[str, nn.Module]) -> Ref:
    """Emit the graph nodes of one value node; returns the node holding its result."""
    name = node.name
    m = modules.get(node.target) if node.op == "call_module" else None
    x = args[0] if args else kwargs.get("input")
    if rule == "identity":
        return x
    if rule == "cat":
        return _cat(args, kwargs, sink, name)
    if rule in ("add", "sub", "mul", "div", "neg"):
        return _arithmetic(rule, args, kwargs, sink, name)
    shape = sink.shape(x)
    emit = sink.emit
    if rule in ("relu", "leaky"):
        slope = 0.0 if rule == "relu" else (m.negative_slope if m is not None else
                                            _bind(args, kwargs, ["negative_slope"], {"negative_slope": 0.01})[
                                                "negative_slope"])
        return emit("relu", (x.index,), ReluOp(slope), shape, name)
    if rule == "module":
        op = _module_affine(m, shape, name, sink.dtype)
        return emit("affine", (x.index,), op, op.out_shape, name)
    if rule in ("maxpool", "adaptive_max"):
        _need_image(shape, name, "max pooling")
        if rule == "adaptive_max":
            out = m.output_size if m is not None else _bind(args, kwargs, ["output_size"], {})["output_size"]
            kernel = _adaptive_kernel(shape, out, name)
            if kernel is None:
                raise _fail(name, f"adaptive max pooling of {shape[1:]} to {out}: windows of unequal sizes")
            op = MaxPoolOp(kernel, kernel, (0, 0), (1, 1), shape)
        else:
            p = (vars(m) if m is not None else
                 _bind(args, kwargs, ["kernel_size", "stride", "padding", "dilation"], {"stride": None, "padding": 0,
                                                                                     "dilation": 1}))
            op = MaxPoolOp(_pair(p["kernel_size"]), _pair(p["stride"] or p["kernel_size"]), _pair(p["padding"]),
                           _pair(p["dilation"]), shape)
        _check_pool(op, name)
        return emit("maxpool", (x.index,), op, op.out_shape, name)
    if rule == "avgpool":
        _need_image(shape, name, "avg_pool2d")
        p = _bind(args, kwargs, ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                 "divisor_override"],
                  {"stride": None, "padding": 0, "count_include_pad": True, "divisor_override": None})
        if not p["count_include_pad"] and _pair(p["padding"]) != (0, 0):
            raise _fail(name, "avg_pool2d with count_include_pad=False and padding")
        op = _avg_conv(shape, _pair(p["kernel_size"]), _pair(p["stride"] or p["kernel_size"]), _pair(p["padding"]),
                       sink.dtype, p["divisor_override"])
        _check_pool(op, name)
        return emit("affine", (x.index,), op, op.out_shape, name)
    if rule == "adaptive_avg":
        _need_image(shape, name, "adaptive average pooling")
        out = m.output_size if m is not None else _bind(args, kwargs, ["output_size"], {})["output_size"]
        kernel = _adaptive_kernel(shape, out, name)
        if kernel == (1, 1):
            return x
        op = (_avg_conv(shape, kernel, kernel, (0, 0), sink.dtype) if kernel is not None
              else SeparablePoolOp(shape, _adaptive_size(shape, out), sink.dtype))
        return emit("affine", (x.index,), op, op.out_shape, name)
    if rule == "mean":
        return _mean(x, args, kwargs, shape, sink, name)
    if rule in ("flatten", "reshape", "squeeze", "unsqueeze"):
        new = _reshaped(rule, args, kwargs, shape, name)
        return x if new == shape else emit("affine", (x.index,), ReshapeOp(shape, new), new, name)
    raise AssertionError(f"no lowering for rule {rule!r}")


def _adaptive_size(shape: tuple[int, ...], out: Any) -> tuple[int, int]:
    size = list(out) if isinstance(out, (tuple, list)) else [out, out]
    return tuple(int(s) if s is not None else int(d) for s, d in zip(size, shape[1:]))


def _adaptive_kernel(shape: tuple[int, ...], out: Any, name: str) -> tuple[int, int] | None:
    """The window of the equivalent fixed pooling (kernel = stride), or None if windows differ in size."""
    size = _adaptive_size(shape, out)
    if min(size) < 1:
        raise _fail(name, f"adaptive pooling to {out}")
    if all(d % s == 0 for d, s in zip(shape[1:], size)):
        return tuple(d // s for d, s in zip(shape[1:], size))
    return None


def _mean(x: Ref, args: tuple, kwargs: dict, shape: tuple[int, ...], sink: Sink, name: str) -> Ref:
    p = _bind(args, kwargs, ["dim", "keepdim"], {"dim": None, "keepdim": False})
    if p["dim"] is None:
        raise _fail(name, "mean over the batch")
    rank = len(shape) + 1
    dims = sorted({_dim(d, rank, name) for d in (p["dim"] if isinstance(p["dim"], (tuple, list)) else [p["dim"]])})
    _need_image(shape, name, "mean")
    kernel = (shape[1] if 2 in dims else 1, shape[2] if 3 in dims else 1)
    op = _avg_conv(shape, kernel, kernel, (0, 0), sink.dtype, channels=1 in dims)
    ref = sink.emit("affine", (x.index,), op, op.out_shape, name)
    if p["keepdim"]:
        return ref
    new = tuple(s for i, s in enumerate(op.out_shape) if i + 1 not in dims)
    return sink.emit("affine", (ref.index,), ReshapeOp(op.out_shape, new), new, name)


def _reshaped(rule: str, args: tuple, kwargs: dict, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    rank = len(shape) + 1
    if rule == "flatten":
        p = _bind(args, kwargs, ["start_dim", "end_dim"], {"start_dim": 0, "end_dim": -1})
        return _flatten(shape, p["start_dim"], p["end_dim"], name).out_shape
    if rule == "reshape":
        dims = list(args[1:]) or list(kwargs.get("shape", kwargs.get("size", ())))
        return _view_shape(dims, shape, name)
    p = _bind(args, kwargs, ["dim"], {"dim": None})
    if p["dim"] is None:
        raise _fail(name, f"{rule} without a dimension (would also act on a batch of one)")
    if rule == "squeeze":
        d = _dim(p["dim"], rank, name)
        return shape if shape[d - 1] != 1 else shape[:d - 1] + shape[d:]
    d = int(p["dim"]) + (rank + 1 if int(p["dim"]) < 0 else 0)
    if not 1 <= d <= rank:
        raise _fail(name, f"unsqueeze at dimension {p['dim']} (the batch must stay first)")
    return shape[:d - 1] + (1,) + shape[d - 1:]


def _cat(args: tuple, kwargs: dict, sink: Sink, name: str) -> Ref:
    """``torch.cat`` of values along a non-batch dimension: the sum of each part's embedding."""
    parts = list(args[0] if args else kwargs["tensors"])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    shapes = [sink.shape(p) for p in parts]
    d = _dim(dim, len(shapes[0]) + 1, name) - 1
    if any(len(s) != len(shapes[0]) or s[:d] + s[d + 1:] != shapes[0][:d] + shapes[0][d + 1:] for s in shapes):
        raise _fail(name, f"concatenation of shapes {shapes} along dimension {d + 1}")
    if len(parts) == 1:
        return parts[0]
    out = shapes[0][:d] + (sum(s[d] for s in shapes),) + shapes[0][d + 1:]
    total, offset = None, 0
    for part, s in zip(parts, shapes):
        ref = sink.emit("affine", (part.index,), EmbedOp(s, out, d, offset), out, name)
        offset += s[d]
        total = ref if total is None else sink.emit("add", (total.index, ref.index), None, out, name)
    return total


def _arithmetic(rule: str, args: tuple, kwargs: dict, sink: Sink, name: str) -> Ref:
    """add / sub of two values (a residual), or scaling and shifting a value by constants."""
    if rule == "neg":
        shape = sink.shape(args[0])
        return sink.emit("affine", (args[0].index,), scale_shift(-1.0, 0.0, shape, name, sink.dtype), shape, name)
    alpha = kwargs.get("alpha", 1)
    a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
    if rule in ("add", "sub") and isinstance(a, Ref) and isinstance(b, Ref):
        shape = sink.shape(a)
        if sink.shape(b) != shape:
            raise _fail(name, f"{rule} of activations of shapes {shape} and {sink.shape(b)}")
        factor = alpha if rule == "add" else -alpha
        if factor != 1:
            b = sink.emit("affine", (b.index,), scale_shift(factor, 0.0, shape, name, sink.dtype), shape, name)
        return sink.emit("add", (a.index, b.index), None, shape, name)
    first = isinstance(a, Ref)  # exactly one operand is a value (the scan rejects the rest)
    value, const = (a, b) if first else (b, a)
    shape = sink.shape(value)
    if rule == "add":  # value + alpha c, or c + alpha value
        op = (scale_shift(1.0, alpha * const, shape, name, sink.dtype) if first
              else scale_shift(alpha, const, shape, name, sink.dtype))
    elif rule == "sub":  # value - alpha c, or c - alpha value
        op = (scale_shift(1.0, -alpha * const, shape, name, sink.dtype) if first
              else scale_shift(-alpha, const, shape, name, sink.dtype))
    elif rule == "mul":
        op = scale_shift(const, 0.0, shape, name, sink.dtype)
    else:  # div: value / const
        rounding = kwargs.get("rounding_mode")
        if rounding is not None or not first:
            raise _fail(name, "division by an activation" if not first else f"division with rounding {rounding!r}")
        op = scale_shift(1.0 / const if torch.is_tensor(const) else 1.0 / float(const), 0.0, shape, name, sink.dtype)
    return sink.emit("affine", (value.index,), op, shape, name)
