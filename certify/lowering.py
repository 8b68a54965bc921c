"""Which fx nodes the bound propagators accept (:func:`scan`, no input shape needed) and the rule of each.

A node of a traced model is one of: the input; a *value* (a tensor that depends on the input); a
*constant* (parameters and buffers read with ``get_attr``, numbers, and anything computed from
constants only); or a *shape query* (``x.size(d)``, ``x.shape``, ``x.dim()``: numbers, the batch
size being the symbolic :data:`BATCH`). Every value node needs a rule:

- ``relu`` / ``leaky``: ReLU (module, ``F.relu``, ``torch.relu_``, ``x.relu()``, in place or not),
  LeakyReLU with a negative slope in [0, 1];
- ``maxpool`` / ``avgpool`` / ``adaptive_avg`` / ``adaptive_max`` / ``mean``: pooling (modules and
  functions; adaptive pooling as the equivalent pooling for the traced input size);
- ``module``: Linear, Conv2d, BatchNorm1d/2d (eval statistics), AvgPool2d, Flatten, ``Normalize``;
- ``identity``: Identity, Dropout (eval), ``contiguous``;
- ``reshape``: ``flatten``, ``view``/``reshape`` keeping the batch first, ``squeeze``/``unsqueeze``;
- ``add`` / ``sub`` / ``mul`` / ``div`` / ``neg``: sums of two values (residuals), and scaling or
  shifting by constants (a normalization written as ``(x - mean) / std`` in ``forward``);
- ``cat``: concatenation of values along a non-batch dimension.

In-place operations are followed as eager PyTorch runs them (later readers of the mutated tensor see
the result); one that mutates a tensor still read through another name (a view) is rejected.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from robustbench_lite.zoo.architectures import Normalize


class _BatchSize:
    """The batch size in a shape query: unknown when the graph is built, so it may only stand first in a
    ``view``/``reshape``; arithmetic with it fails (and the model is reported as unsupported)."""

    def __repr__(self) -> str:
        return "N"


BATCH = _BatchSize()

LEAVES = (nn.Linear, nn.Conv2d, nn.ReLU, nn.LeakyReLU, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d,
          nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, Normalize, nn.modules.dropout._DropoutNd,
          nn.Identity)
AFFINE_MODULES = (nn.Linear, nn.Conv2d, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, Normalize)

_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
    F.leaky_relu: "leaky", F.leaky_relu_: "leaky",
    F.max_pool2d: "maxpool", F.avg_pool2d: "avgpool",
    F.adaptive_avg_pool2d: "adaptive_avg", F.adaptive_max_pool2d: "adaptive_max", torch.mean: "mean",
    F.dropout: "identity", F.dropout1d: "identity", F.dropout2d: "identity", F.dropout3d: "identity",
    F.alpha_dropout: "identity", F.feature_alpha_dropout: "identity",
    torch.flatten: "flatten", torch.reshape: "reshape", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.neg: "neg", torch.neg: "neg", operator.pos: "identity",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
}
_METHODS = {
    "relu": "relu", "relu_": "relu", "flatten": "flatten", "view": "reshape", "reshape": "reshape",
    "squeeze": "squeeze", "unsqueeze": "unsqueeze", "mean": "mean", "contiguous": "identity",
    "add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul",
    "div": "div", "div_": "div", "true_divide": "div", "neg": "neg",
}
_SHAPE_METHODS = {"size", "dim"}
_IN_PLACE_FUNCTIONS = {torch.relu_, F.relu_, F.leaky_relu_, operator.iadd, operator.isub, operator.imul,
                       operator.itruediv}
#: rules whose output may share memory with their input (an in-place op on one mutates the others)
_ALIASING = {"identity", "reshape", "flatten", "squeeze", "unsqueeze"}


def module_rule(m: nn.Module) -> str | None:
    if isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)):
        return "identity"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.LeakyReLU):
        return "leaky"
    if isinstance(m, nn.MaxPool2d):
        return "maxpool"
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return "adaptive_avg"
    if isinstance(m, nn.AdaptiveMaxPool2d):
        return "adaptive_max"
    if isinstance(m, AFFINE_MODULES):
        return "module"
    return None


def rule_of(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The rule of a call node (None: unsupported); ``"shape"`` for shape queries, ``"getitem"``."""
    if node.op == "call_module":
        return module_rule(modules[node.target])
    if node.op == "call_method":
        if node.target in _SHAPE_METHODS:
            return "shape"
        return _METHODS.get(node.target)
    if node.op == "call_function":
        if node.target is getattr and len(node.args) == 2 and node.args[1] == "shape":
            return "shape"
        if node.target is operator.getitem:
            return "getitem"
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def in_place(node: torch.fx.Node, modules: dict[str, nn.Module], rule: str | None) -> bool:
    """True when the node overwrites its first argument (the result is then that tensor)."""
    if rule == "identity":
        return False  # dropout in eval and Identity change nothing, in place or not
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.target in _IN_PLACE_FUNCTIONS:
        return True
    if rule in ("relu", "leaky"):  # F.relu(x, inplace), F.leaky_relu(x, negative_slope, inplace)
        position = 1 if rule == "relu" else 2
        return bool(node.kwargs.get("inplace", node.args[position] if len(node.args) > position else False))
    return False


def _fx_inputs(value: Any) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(value, lambda n: out.append(n))
    return out


def describe(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    """``name (what)`` of a node for error messages, e.g. ``avgpool (AdaptiveAvgPool2d)``."""
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    what = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {what})"


def module_problem(name: str, m: nn.Module) -> str | None:
    """Why a supported layer type is used in an unsupported way (None when fine)."""
    if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        return f"{name} (Conv2d with padding_mode={m.padding_mode!r})"
    if isinstance(m, nn.Conv2d) and isinstance(m.padding, str) and m.padding != "valid":
        return f"{name} (Conv2d with padding={m.padding!r})"
    if isinstance(m, nn.MaxPool2d) and (m.ceil_mode or m.return_indices):
        return f"{name} (MaxPool2d with ceil_mode or return_indices)"
    if isinstance(m, nn.AdaptiveMaxPool2d) and m.return_indices:
        return f"{name} (AdaptiveMaxPool2d with return_indices)"
    if isinstance(m, nn.AvgPool2d) and (m.ceil_mode or (not m.count_include_pad and m.padding not in (0, (0, 0)))):
        return f"{name} (AvgPool2d with ceil_mode, or count_include_pad=False with padding)"
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and not m.track_running_stats:
        return f"{name} ({type(m).__name__} without running statistics)"
    if isinstance(m, nn.LeakyReLU) and not 0.0 <= m.negative_slope <= 1.0:
        return f"{name} (LeakyReLU with negative_slope={m.negative_slope} outside [0, 1])"
    return None


def _function_problem(node: torch.fx.Node, rule: str, values: set[torch.fx.Node]) -> str | None:
    """Static problems of a supported function or method applied to values."""
    args = node.args
    value_args = [a for a in args if isinstance(a, torch.fx.Node) and a in values]
    name = node.name
    if rule == "mul" and len(value_args) > 1:
        return f"{name} (product of two activations)"
    if rule == "div" and (len(args) < 2 or (isinstance(args[1], torch.fx.Node) and args[1] in values)):
        return f"{name} (division by an activation)"
    if rule in ("add", "sub") and len(args) < 2:
        return f"{name} ({rule} with one operand)"
    if rule == "leaky":
        slope = args[1] if len(args) > 1 else node.kwargs.get("negative_slope", 0.01)
        if not isinstance(slope, (int, float)) or not 0.0 <= slope <= 1.0:
            return f"{name} (leaky_relu with negative_slope={slope} outside [0, 1])"
    if rule == "cat":
        parts = args[0] if args else node.kwargs.get("tensors", ())
        if not isinstance(parts, (list, tuple)) or not all(isinstance(p, torch.fx.Node) and p in values
                                                             for p in parts):
            return f"{name} (concatenation with constants)"
        if (args[1] if len(args) > 1 else node.kwargs.get("dim", 0)) == 0:
            return f"{name} (concatenation along the batch dimension)"
    if rule == "getitem":
        return f"{name} (indexing or slicing activations)"
    if rule in ("maxpool", "adaptive_max") and (node.kwargs.get("return_indices") or node.kwargs.get("ceil_mode")):
        return f"{name} ({rule} with ceil_mode or return_indices)"
    if rule == "avgpool" and node.kwargs.get("ceil_mode"):
        return f"{name} (avg_pool2d with ceil_mode)"
    return None


def scan(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> tuple[set[torch.fx.Node], list[str]]:
    """The value nodes of a traced model and every unsupported piece (``name (what)``), in order."""
    values: set[torch.fx.Node] = set()
    problems: list[str] = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    alias: dict[torch.fx.Node, torch.fx.Node] = {}  # node -> the node whose memory it shares
    inputs = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            inputs += 1
            values.add(node)
            if inputs == 2:
                problems.append(f"{node.name} (a second input; the model must take exactly one tensor)")
            continue
        if node.op == "get_attr":
            continue
        if node.op == "output":
            out = node.args[0]
            if not (isinstance(out, torch.fx.Node) and out in values):
                problems.append("output (not one tensor of logits)")
            continue
        rule = rule_of(node, modules)
        if rule == "shape" or not any(a in values for a in _fx_inputs((node.args, node.kwargs))):
            continue  # a constant or a shape query
        values.add(node)
        if rule is None:
            problems.append(describe(node, modules))
            continue
        problem = (module_problem(node.target, modules[node.target]) if node.op == "call_module"
                   else _function_problem(node, rule, values))
        if problem:
            problems.append(problem)
            continue
        if rule in _ALIASING:
            alias[node] = node.args[0]
        if in_place(node, modules, rule):
            target = node.args[0]
            alias[node] = target
            root = target
            while root in alias:
                root = alias[root]
            group = [n for n in values if _root(n, alias) is root and n is not target and n is not node]
            if any(order[u] > order[node] for n in group for u in n.users):
                problems.append(f"{node.name} (in-place {rule} of a tensor read again through another name)")
    return values, problems


def _root(node: torch.fx.Node, alias: dict[torch.fx.Node, torch.fx.Node]) -> torch.fx.Node:
    while node in alias:
        node = alias[node]
    return node
