"""The one graph walk shared by every bound propagator (IBP, CROWN, alpha-CROWN, LP/SDP lowering).

:func:`build_graph` traces a model with ``torch.fx`` (supported layers are leaves, containers and
small custom modules such as a residual block ``x + f(x)`` are traced through) and lowers it to a
topologically ordered list of :class:`Node`: ``input``, ``affine`` (an :class:`AffineOp`: Linear,
Conv2d, AvgPool2d, the zoo's ``Normalize``, eval BatchNorm1d/2d folded, Flatten), ``relu``,
``maxpool`` and ``add`` (residual sums). Dropout and Identity vanish. The whole graph is checked up
front and every unsupported piece is listed in ONE :class:`UserInputError`.

:func:`to_affine_relu` lowers a plain ReLU network to dense ``(W, b)`` maps with a ReLU between
consecutive maps, for the LP and SDP certifiers.

The graph holds references to the module's parameters, never copies, and is rebuilt on every call,
so bounds always reflect the current weights (no stale caches).
"""
from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError
from robustbench_lite.zoo.architectures import Normalize

from .layers import AffineOp, ChannelAffineOp, ConvOp, LinearOp, MaxPoolOp, ReshapeOp

_LEAVES = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d,
           nn.MaxPool2d, Normalize, nn.Dropout, nn.Identity)
_ADD = {operator.add, torch.add, operator.iadd}
_RELU = {F.relu, torch.relu}
_FLATTEN = {torch.flatten}


@dataclass
class Node:
    """One value of the network. ``shape`` is per example; ``inputs`` index earlier nodes."""

    index: int
    kind: str  # "input" | "affine" | "relu" | "maxpool" | "add"
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str
    op: AffineOp | MaxPoolOp | None = None
    consumers: list[int] = field(default_factory=list)


@dataclass
class Graph:
    """Nodes in topological order (node 0 is the input); ``output`` is the logits node."""

    nodes: list[Node]
    output: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    def forward(self, x: Tensor) -> list[Tensor]:
        """Every node's value for x (N, *input_shape)."""
        values: list[Tensor] = []
        for node in self.nodes:
            if node.kind == "input":
                values.append(x)
            elif node.kind == "add":
                values.append(values[node.inputs[0]] + values[node.inputs[1]])
            elif node.kind == "relu":
                values.append(values[node.inputs[0]].clamp(min=0))
            else:
                values.append(node.op.forward(values[node.inputs[0]]))
        return values

    @property
    def forward_macs(self) -> int:
        """Multiply-accumulates of the affine layers in one forward pass of one example."""
        return sum(node.op.macs for node in self.nodes if node.kind == "affine")

    def ancestors(self, index: int) -> list[int]:
        """Indices of ``index`` and every node it depends on, descending (reverse topological)."""
        seen, todo = {index}, [index]
        while todo:
            for i in self.nodes[todo.pop()].inputs:
                if i not in seen:
                    seen.add(i)
                    todo.append(i)
        return sorted(seen, reverse=True)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _problem(name: str, m: nn.Module) -> str | None:
    """Why a supported layer type is used in an unsupported way (None when fine)."""
    if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        return f"{name} (Conv2d with padding_mode={m.padding_mode!r})"
    if isinstance(m, nn.Conv2d) and isinstance(m.padding, str):
        return f"{name} (Conv2d with padding={m.padding!r})"
    if isinstance(m, nn.MaxPool2d) and (m.ceil_mode or m.return_indices):
        return f"{name} (MaxPool2d with ceil_mode or return_indices)"
    if isinstance(m, nn.AvgPool2d) and (m.ceil_mode or m.divisor_override or not m.count_include_pad):
        return f"{name} (AvgPool2d with ceil_mode, divisor_override or count_include_pad=False)"
    if isinstance(m, nn.Flatten) and (m.start_dim != 1 or m.end_dim != -1):
        return f"{name} (Flatten with start_dim={m.start_dim}, end_dim={m.end_dim})"
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and not m.track_running_stats:
        return f"{name} ({type(m).__name__} without running statistics)"
    return None


#: model -> (its module structure, fx graph): only the STRUCTURE is cached; weights, BatchNorm
#: statistics and shapes are read afresh on every build, and a changed submodule invalidates it
_TRACES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _trace(model: nn.Module) -> tuple[torch.fx.Graph, dict[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise UserInputError(f"expected an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    structure = tuple((name, id(m), type(m)) for name, m in modules.items())
    cached = _TRACES.get(model)
    if cached is not None and cached[0] == structure:
        return cached[1], modules
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        raise UserInputError(f"cannot trace {type(model).__name__} into a graph of supported layers "
                             f"(data-dependent control flow?): {type(exc).__name__}: {exc}") from None
    _TRACES[model] = (structure, graph)
    return graph, modules


def _kind(fx_node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str | None]:
    """(kind, problem) of one fx node; kind is one of the Node kinds or "skip"/"output"."""
    op, target = fx_node.op, fx_node.target
    nodes = [a for a in fx_node.args if isinstance(a, torch.fx.Node)]
    if op == "placeholder":
        return "input", None
    if op == "output":
        return "output", None if isinstance(fx_node.args[0], torch.fx.Node) else "output (several outputs)"
    if op == "call_module":
        m = modules[target]
        if not isinstance(m, _LEAVES):
            return "", f"{target} ({type(m).__name__})"
        if isinstance(m, (nn.Dropout, nn.Identity)):
            return "skip", None
        kinds = {nn.ReLU: "relu", nn.MaxPool2d: "maxpool"}
        return kinds.get(type(m), "affine"), _problem(target, m)
    if op == "call_function" and target in _ADD and len(nodes) == 2 and not fx_node.kwargs:
        return "add", None
    if op == "call_function" and target in _RELU and len(fx_node.args) == 1:
        return "relu", None
    if op == "call_method" and target == "relu" and len(fx_node.args) == 1:
        return "relu", None
    if (op == "call_function" and target in _FLATTEN) or (op == "call_method" and target == "flatten"):
        start = fx_node.args[1] if len(fx_node.args) > 1 else fx_node.kwargs.get("start_dim", 0)
        if start == 1 and len(fx_node.args) <= 2 and not set(fx_node.kwargs) - {"start_dim"}:
            return "flatten", None
        return "", f"{fx_node.name} (flatten with start_dim={start})"
    what = getattr(target, "__name__", str(target))
    return "", f"{fx_node.name} ({op} {what})"


def check_supported(model: nn.Module) -> None:
    """Raise one :class:`UserInputError` that lists every unsupported layer of ``model``."""
    graph, modules = _trace(model)
    bad = [p for n in graph.nodes for _, p in [_kind(n, modules)] if p]
    if bad:
        raise UserInputError(f"unsupported by the bound propagators: {', '.join(bad)}; supported: Linear, "
                             "Conv2d, ReLU, Flatten, BatchNorm1d/2d, AvgPool2d, MaxPool2d, Normalize, "
                             "residual additions")


def _unit(t: Tensor) -> float:
    """Unit roundoff of t's dtype (float16 and bfloat16 included)."""
    return torch.finfo(t.dtype).eps / 2


def _affine(m: nn.Module, in_shape: tuple[int, ...], dtype: torch.dtype) -> AffineOp:
    """The layer as an AffineOp. Folded parameters (Normalize, BatchNorm, AvgPool's 1/k^2) are computed in
    the layer's dtype with correctly rounded operations only, and carry ``param_error``: elementwise bounds
    on their distance to the exact values (counted per rounding: |fl(a op b) - a op b| <= u |a op b|)."""
    if isinstance(m, nn.Linear):
        return LinearOp(m.weight, m.bias, in_shape)
    if isinstance(m, nn.Conv2d):
        return ConvOp(m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, in_shape)
    if isinstance(m, nn.AvgPool2d):
        k = _pair(m.kernel_size)
        c = in_shape[0]
        weight = torch.full((c, 1, *k), 1.0 / (k[0] * k[1]), dtype=dtype)  # the model's dtype
        op = ConvOp(weight, None, _pair(m.stride or m.kernel_size), _pair(m.padding), (1, 1), c, in_shape)
        op.param_error = (weight * (2 * _unit(weight)), None)  # 1 / (k0 k1) rounded to double, then to the dtype
        return op
    if isinstance(m, Normalize):
        std = m.std.flatten()
        scale, shift = 1.0 / std, -m.mean.flatten() / std  # one rounding each
        op = ChannelAffineOp(scale, shift, in_shape)
        op.param_error = (scale.abs() * _unit(scale), shift.abs() * _unit(shift))
        return op
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale = 1.0 / torch.sqrt(m.running_var + m.eps)  # three roundings (eps is the exact double given)
        if m.weight is not None:
            scale = scale * m.weight  # a fourth
        mean_scale = m.running_mean * scale
        shift = -mean_scale + (m.bias if m.bias is not None else 0.0)
        u = _unit(scale)
        scale_error = scale.abs() * (5 * u)  # (1 + u)^4 / (1 - u) - 1 <= 5u
        bias = m.bias.abs() if m.bias is not None else 0.0
        shift_error = m.running_mean.abs() * scale_error + (mean_scale.abs() + bias) * (3 * u)
        op = ChannelAffineOp(scale, shift, in_shape)
        op.param_error = (scale_error, shift_error)
        return op
    if isinstance(m, nn.Flatten):
        return ReshapeOp(in_shape, (math.prod(in_shape),))
    raise AssertionError(f"not an affine layer: {m}")


def build_graph(model: nn.Module, input_shape: tuple[int, ...]) -> Graph:
    """Trace and lower ``model`` for per-example inputs of ``input_shape`` (e.g. (1, 28, 28)).

    BatchNorm is folded with its running statistics (eval semantics) whatever the model's mode.
    Raises :class:`UserInputError` listing every unsupported layer.
    """
    check_supported(model)
    fx_graph, modules = _trace(model)
    dtype = next((t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()),
                 torch.get_default_dtype())
    nodes: list[Node] = []
    where: dict[torch.fx.Node, int] = {}
    output = -1
    for fx_node in fx_graph.nodes:
        kind, _ = _kind(fx_node, modules)
        args = [where[a] for a in fx_node.args if isinstance(a, torch.fx.Node)]
        if kind == "output":
            output = args[0]
            continue
        if kind == "skip":
            where[fx_node] = args[0]
            continue
        if kind == "input":
            if nodes:
                raise UserInputError("the model must take exactly one input tensor")
            shape = tuple(int(s) for s in input_shape)
            node = Node(0, "input", (), shape, fx_node.name)
        else:
            in_shape = nodes[args[0]].shape
            op, shape = None, in_shape
            if kind == "add":
                if nodes[args[1]].shape != in_shape:
                    raise UserInputError(f"{fx_node.name}: residual addition of shapes {in_shape} and "
                                         f"{nodes[args[1]].shape}")
            elif kind == "flatten":
                kind, op = "affine", ReshapeOp(in_shape, (math.prod(in_shape),))
            elif kind == "maxpool":
                m = modules[fx_node.target]
                op = MaxPoolOp(_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding),
                               _pair(m.dilation), in_shape)
            elif kind == "affine":
                op = _affine(modules[fx_node.target], in_shape, dtype)
            if op is not None:
                shape = op.out_shape
            node = Node(len(nodes), kind, tuple(args), tuple(shape), fx_node.name, op)
        for i in node.inputs:
            nodes[i].consumers.append(node.index)
        where[fx_node] = node.index
        nodes.append(node)
    if output < 0 or not nodes:
        raise UserInputError("the model has no output")
    return Graph(nodes, output)


def affine_segments(graph: Graph) -> list[tuple[list[AffineOp], tuple[int, ...]]]:
    """The affine ops between consecutive ReLUs of a plain ReLU network, each with its input shape.

    Raises :class:`UserInputError` for max-pool and residual additions."""
    bad = [f"{n.name} ({n.kind})" for n in graph.nodes if n.kind in ("maxpool", "add")]
    if bad:
        raise UserInputError(f"only chains of affine layers and ReLUs lower to dense maps; got {', '.join(bad)}")
    segments: list[list[AffineOp]] = [[]]
    shapes = [graph.input_shape]
    for node in graph.nodes[1:graph.output + 1]:
        if node.kind == "relu":
            segments.append([])
            shapes.append(node.shape)
        else:
            segments[-1].append(node.op)
    return list(zip(segments, shapes))


def to_affine_relu(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[Tensor, Tensor]]:
    """Dense ``[(W_0, b_0), ..., (W_L, b_L)]`` with ``logits = W_L relu(... relu(W_0 x + b_0))``.

    x is the flattened input; W_i (n_{i+1}, n_i), b_i (n_{i+1},). Normalize, Conv2d, AvgPool2d,
    BatchNorm and Flatten are folded into the maps. Only chains of affine layers and ReLUs are
    accepted: MaxPool2d and residual additions raise :class:`UserInputError`.
    """
    maps = []
    for ops, in_shape in affine_segments(build_graph(model, input_shape)):
        a, b = fold_affine(ops, in_shape)
        maps.append((a[-1].reshape(a[-1].shape[1], -1), b[-1].reshape(-1)))
    return maps


def fold_affine(ops: list[AffineOp], in_shape: tuple[int, ...]) -> tuple[list[Tensor], list[Tensor]]:
    """The dense map of ``ops`` applied in order, step by step, in the ops' dtype: ``a[t]`` (1, n_out, ...)
    is the identity of the output pulled back through the last t ops (``a[-1]`` reshaped is W) and
    ``b[t]`` (1, ...) the first t ops applied to 0 (``b[-1]`` is the bias)."""
    ref = next((p for op in ops for p in vars(op).values() if torch.is_tensor(p)), None)
    dtype = ref.dtype if ref is not None else torch.float32
    out_shape = ops[-1].out_shape if ops else in_shape
    n_out = math.prod(out_shape)
    a = [torch.eye(n_out, dtype=dtype).reshape(1, n_out, *out_shape)]
    b = [torch.zeros(1, *in_shape, dtype=dtype)]
    for op in reversed(ops):
        a.append(op.backward(a[-1]))
    for op in ops:
        b.append(op.forward(b[-1]))
    return a, b
