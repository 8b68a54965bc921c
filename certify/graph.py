"""The one graph walk shared by every bound propagator (IBP, CROWN, alpha-CROWN, LP/SDP lowering).

:func:`build_graph` traces a model with ``torch.fx`` (supported layers are leaves, containers and
custom modules such as a residual block are traced through, so functional code in ``forward`` such
as ``F.relu``, ``F.avg_pool2d``, ``x.view(x.size(0), -1)``, ``torch.cat`` or ``(x - mean) / std``
is seen op by op) and lowers it to a topologically ordered list of :class:`Node`: ``input``,
``affine`` (an :class:`AffineOp`: Linear, Conv2d, average and adaptive pooling, per-channel or
elementwise constants such as ``Normalize`` and eval BatchNorm folded, reshapes, concatenation
slots), ``relu`` (a :class:`ReluOp`: ReLU or LeakyReLU), ``maxpool`` and ``add`` (sums of two
values: residuals, concatenations). Dropout and Identity vanish. Which fx nodes are accepted is
:mod:`certify.lowering`'s; how each becomes nodes for the traced input size, :mod:`certify.builder`'s.
The whole graph is checked up front and every unsupported piece is listed in ONE
:class:`UnsupportedModelError`.

:func:`to_affine_relu` lowers a plain ReLU network to dense ``(W, b)`` maps with a ReLU between
consecutive maps, for the LP and SDP certifiers.

The graph holds references to the module's parameters, never copies, and is rebuilt on every call,
so bounds always reflect the current weights (no stale caches).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor, nn

from robustbench_lite.errors import UnsupportedModelError, UserInputError

from .builder import Ref, lower
from .layers import AffineOp, MaxPoolOp, ReluOp
from .lowering import BATCH, LEAVES, in_place, rule_of, scan


@dataclass
class Node:
    """One value of the network. ``shape`` is per example; ``inputs`` index earlier nodes."""

    index: int
    kind: str  # "input" | "affine" | "relu" | "maxpool" | "add"
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str
    op: AffineOp | MaxPoolOp | ReluOp | None = None
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
            else:  # affine, relu, maxpool
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
        return isinstance(m, LEAVES) or super().is_leaf_module(m, qualname)


#: model -> (its module structure, fx graph): only the STRUCTURE is cached; weights, BatchNorm
#: statistics and shapes are read afresh on every build, and a changed submodule invalidates it
_TRACES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

SUPPORTED = ("supported: Linear, Conv2d, (Leaky)ReLU, BatchNorm1d/2d, max/average/adaptive pooling, mean, "
             "flatten/view/reshape, Dropout, Identity, Normalize, residual additions, torch.cat, scaling and "
             "shifting by constants")


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedModelError([f"{type(model).__name__} (cannot be traced into a graph of supported layers, "
                                     f"data-dependent control flow?: {type(exc).__name__}: {first})"]) from None
    _TRACES[model] = (structure, graph)
    return graph, modules


def check_supported(model: nn.Module) -> None:
    """Raise one :class:`UnsupportedModelError` that lists every unsupported layer of ``model``.

    Shape-dependent checks (a ``view`` that keeps the batch first, constants that broadcast) are made
    by :func:`build_graph`, which knows the input size.
    """
    graph, modules = _trace(model)
    problems = scan(graph, modules)[1]
    if problems:
        raise UnsupportedModelError(problems, SUPPORTED)


class _Build:
    """The nodes being built (a :class:`certify.builder.Sink`)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.nodes: list[Node] = []
        self.dtype = dtype  # of folded parameters and constants: the model's

    def emit(self, kind: str, inputs: tuple[int, ...], op, shape: tuple[int, ...], name: str) -> Ref:
        node = Node(len(self.nodes), kind, tuple(inputs), tuple(int(s) for s in shape), name, op)
        for i in node.inputs:
            self.nodes[i].consumers.append(node.index)
        self.nodes.append(node)
        return Ref(node.index)

    def shape(self, ref: Ref) -> tuple[int, ...]:
        return self.nodes[ref.index].shape


def _attribute(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _constant(node: torch.fx.Node, args: tuple, kwargs: dict, modules: dict[str, nn.Module], sink: _Build):
    """The value of a node that does not depend on the input: a shape query or a computation on constants."""
    if rule_of(node, modules) == "shape" and isinstance(args[0], Ref):
        full = (BATCH, *sink.shape(args[0]))
        if node.target == "dim":
            return len(full)
        if node.target == "size" and (len(args) > 1 or "dim" in kwargs):
            return full[args[1] if len(args) > 1 else kwargs["dim"]]
        return full
    try:
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        target = modules[node.target] if node.op == "call_module" else node.target
        return target(*args, **kwargs)
    except Exception as exc:
        uses_batch = any(a is BATCH for a in _flat((args, kwargs)))
        why = "computes with the batch size" if uses_batch else f"cannot be evaluated: {type(exc).__name__}"
        raise UnsupportedModelError([f"{node.name} ({why})"]) from None


def _flat(value) -> list:
    if isinstance(value, (tuple, list)):
        return [u for v in value for u in _flat(v)]
    if isinstance(value, dict):
        return [u for v in value.values() for u in _flat(v)]
    return [value]


def build_graph(model: nn.Module, input_shape: tuple[int, ...]) -> Graph:
    """Trace and lower ``model`` for per-example inputs of ``input_shape`` (e.g. (1, 28, 28)).

    BatchNorm is folded with its running statistics (eval semantics) whatever the model's mode, and
    dropout is the identity. Raises :class:`UnsupportedModelError` listing every unsupported layer.
    """
    fx_graph, modules = _trace(model)
    values, problems = scan(fx_graph, modules)
    if problems:
        raise UnsupportedModelError(problems, SUPPORTED)
    dtype = next((t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()),
                 torch.get_default_dtype())
    sink, env, output = _Build(dtype), {}, -1
    for fx_node in fx_graph.nodes:
        if fx_node.op == "placeholder":
            env[fx_node] = sink.emit("input", (), None, tuple(input_shape), fx_node.name)
        elif fx_node.op == "get_attr":
            env[fx_node] = _attribute(model, fx_node.target)
        elif fx_node.op == "output":
            output = env[fx_node.args[0]].index
        else:
            args, kwargs = torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda n: env[n])
            if fx_node in values:
                rule = rule_of(fx_node, modules)
                env[fx_node] = lower(rule, fx_node, args, kwargs, sink, modules)
                if in_place(fx_node, modules, rule):  # later readers of the overwritten tensor see the result
                    env[fx_node.args[0]] = env[fx_node]
            else:
                env[fx_node] = _constant(fx_node, args, kwargs, modules, sink)
    if output < 0:
        raise UnsupportedModelError(["output (the model has no output)"])
    return Graph(sink.nodes, output)


def _not_dense(graph: Graph) -> list[str]:
    """The nodes that keep a graph from lowering to dense affine maps and ReLUs."""
    bad = [f"{n.name} ({n.kind})" for n in graph.nodes if n.kind in ("maxpool", "add")]
    return bad + [f"{n.name} (leaky relu)" for n in graph.nodes if n.kind == "relu" and n.op.negative_slope]


def unsupported_reason(model: nn.Module, input_shape: tuple[int, ...], dense: bool = False) -> str | None:
    """``unsupported layers: ...`` when ``model`` does not lower for ``input_shape`` (``dense``: to the
    affine-ReLU maps of the LP and SDP), else None. Builds the graph, never the dense maps."""
    try:
        graph = build_graph(model, input_shape)
    except UnsupportedModelError as exc:
        return exc.reason
    bad = _not_dense(graph) if dense else []
    return UnsupportedModelError(bad).reason if bad else None


def affine_segments(graph: Graph) -> list[tuple[list[AffineOp], tuple[int, ...]]]:
    """The affine ops between consecutive ReLUs of a plain ReLU network, each with its input shape.

    Raises :class:`UnsupportedModelError` for max-pool, residual additions and LeakyReLU."""
    bad = _not_dense(graph)
    if bad:
        raise UnsupportedModelError(bad, "only chains of affine layers and ReLUs lower to dense maps (LP, SDP)")
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
    accepted: MaxPool2d, residual additions and LeakyReLU raise :class:`UnsupportedModelError`.
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
