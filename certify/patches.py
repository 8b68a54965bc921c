"""Patch mode of the CROWN backward walk for convolutional layers (after auto_LiRPA's "patches").

The linear bound of a neuron of a convolutional layer depends only on its receptive field. Instead of
a dense coefficient tensor over the whole image, every row of A is kept as a small patch around its
neuron: A (B, P, R, C, h, w) for P spatial positions of the start node and R rows per position, with
a geometry (stride, offset) that maps patch entry (i, j) of the row at position (p_h, p_w) to the
absolute location ``(p_h * stride + offset + i, p_w * stride + offset + j)`` of the current layer.
Conv2d and AvgPool2d go backward by a transposed convolution of each patch (one GEMM with the
patch-level matrix when that is small), MaxPool2d by folding its window weights (or, after a ReLU
over disjoint windows, both in one step), ReLU and per-channel affine layers elementwise with their
tensors unfolded into the same patches. Entries outside the image (padding) are zeroed after each
spatial step that can reach them; rows shared by every position (the start's channels) stay shared
until the first position-dependent tensor, so the relaxations broadcast over them.

For LeNet-sized networks this is ~8x less work and memory than the dense walk. Graphs of Conv2d,
AvgPool2d, Normalize/BatchNorm2d, ReLU, MaxPool2d and residual sums are handled here: the branches of a
sum are walked apart and their patches added, each placed in the frame (stride, offset, size) that
covers both.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .graph import Graph, Node
from .layers import ChannelAffineOp, ConvOp, MaxPoolOp, Relaxation, ReluPoolRelaxation, fold_windows

Geometry = tuple[tuple[int, int], tuple[int, int]]  # (stride, offset) per spatial dim
_GEMM_LIMIT = 1 << 21  # entries of a patch-level transposed-conv matrix worth a GEMM


def eligible(graph: Graph, start: int) -> bool:
    """True when every node from ``start`` back to the input is patch-able (convolutions, per-channel
    affine maps, ReLU, max-pool, residual sums) on (C, H, W) activations."""
    node = graph.nodes[start]
    if len(node.shape) != 3:
        return False
    for i in graph.ancestors(start):
        n = graph.nodes[i]
        if n.kind == "affine" and not isinstance(n.op, (ConvOp, ChannelAffineOp)):
            return False
        if len(n.shape) != 3:
            return False
    return True


def _union(g1: Geometry, size1: tuple[int, int], g2: Geometry, size2: tuple[int, int]) -> tuple[Geometry, tuple]:
    """The geometry and patch size covering two patch frames of the same stride (branches of a sum)."""
    (stride, o1), (stride2, o2) = g1, g2
    assert tuple(stride) == tuple(stride2), "branches of a sum reach a node at different strides"
    offset = tuple(min(a, b) for a, b in zip(o1, o2))
    end = tuple(max(a + s, b + t) for a, s, b, t in zip(o1, size1, o2, size2))
    return (tuple(stride), offset), tuple(e - o for e, o in zip(end, offset))


def _step(node: Node, geometry: Geometry, size: tuple[int, int]) -> tuple[Geometry, tuple[int, int]]:
    """Geometry and patch size at a node's input after a conv / pool step (unchanged otherwise)."""
    op = node.op
    if not isinstance(op, (ConvOp, MaxPoolOp)):
        return geometry, size
    k = op.weight.shape[2:] if isinstance(op, ConvOp) else op.kernel
    size = tuple((s - 1) * st + d * (kk - 1) + 1 for s, st, d, kk in zip(size, op.stride, op.dilation, k))
    return PatchWalk._shift(geometry, op.stride, op.padding), size


def patch_cost(graph: Graph, start: int) -> int:
    """Largest number of A elements per row (per position and row) on the walk from ``start``."""
    frames: dict[int, tuple[Geometry, tuple[int, int]]] = {start: (((1, 1), (0, 0)), (1, 1))}
    cost = 1
    for i in graph.ancestors(start):
        if i not in frames:
            continue
        geometry, size = frames.pop(i)
        node = graph.nodes[i]
        if node.kind == "maxpool":
            cost = max(cost, node.shape[0] * node.op.kernel[0] * node.op.kernel[1] * size[0] * size[1])
        if node.kind == "input":
            continue
        geometry, size = _step(node, geometry, size)
        for j in node.inputs:
            if j in frames:
                geometry_j, size_j = _union(*frames[j], geometry, size)
            else:
                geometry_j, size_j = geometry, size
            frames[j] = (geometry_j, size_j)
            cost = max(cost, graph.nodes[j].shape[0] * size_j[0] * size_j[1])
    return cost


def _aligned(a: Tensor, geometry: Geometry, target: Geometry, size: tuple[int, int]) -> Tensor:
    """Patches ``a`` (..., h, w) in frame ``geometry`` placed in the larger frame ``target`` of ``size``."""
    (_, (oh, ow)), (_, (th, tw)) = geometry, target
    h, w = a.shape[-2:]
    return F.pad(a, (ow - tw, size[1] - (ow - tw) - w, oh - th, size[0] - (oh - th) - h))


def _unfold(t: Tensor, geometry: Geometry, size: tuple[int, int], grid: tuple[int, int], sel: Tensor) -> Tensor:
    """Patches of t (N, C, H, W) at the selected start positions: (N, P, C, h, w), zero outside."""
    (sh, sw), (oh, ow) = geometry
    n, c, height, width = t.shape
    pad_h, pad_w = -oh, -ow
    need_h = (grid[0] - 1) * sh + oh + size[0]
    need_w = (grid[1] - 1) * sw + ow + size[1]
    t = F.pad(t, (pad_w, max(0, need_w - width), pad_h, max(0, need_h - height)))
    cols = F.unfold(t, size, stride=(sh, sw))  # (N, C*h*w, Lh*Lw)
    lh = (t.shape[2] - size[0]) // sh + 1
    lw = (t.shape[3] - size[1]) // sw + 1
    cols = cols.reshape(n, c * size[0] * size[1], lh, lw)[:, :, :grid[0], :grid[1]].flatten(2)
    if sel.dim() == 1:
        cols = cols[:, :, sel]
    else:  # one list of positions per example
        cols = cols.expand(sel.shape[0], -1, -1).gather(2, sel[:, None, :].expand(-1, cols.shape[1], -1))
    return cols.permute(0, 2, 1).reshape(cols.shape[0], -1, c, *size)


def _row_dot(a: Tensor, t: Tensor) -> Tensor:
    """``sum(a * t)`` over each patch, a (B, P, R, *patch), t (N, P, 1, *patch) -> (N, P, R), as a matrix
    product (no product tensor of the rows' size)."""
    a2, t2 = a.flatten(3), t.flatten(3)
    if a2.shape[0] == 1 and a2.shape[1] == 1:  # rows shared by every example and position
        return t2.squeeze(2) @ a2[0, 0].T
    return (a2 @ t2.transpose(-1, -2)).squeeze(-1)


class PatchWalk:
    """Lower bounds of A * node_start for rows given as patches; ``relax`` from the propagator."""

    def __init__(self, graph: Graph, relax: dict[int, Relaxation], fused: dict[int, ReluPoolRelaxation],
                 centre: Tensor, radius: Tensor, x: Tensor | None, eps: float) -> None:
        self.graph, self.relax, self.fused = graph, relax, fused
        self.centre, self.radius, self.x, self.eps = centre, radius, x, eps
        self.macs = 0  # multiply-accumulates of the affine steps (cost in forward passes)
        self._matrices: dict = {}  # (node, patch size) -> (transposed-conv matrix, out patch shape) or None

    def bound(self, start: int, a: Tensor, sel: Tensor) -> Tensor:
        """A (B, P, R, C_start, 1, 1) at positions ``sel`` (P,) or (N, P) of the start grid -> bounds (N, P, R).

        The two branches of a residual sum are walked separately and their patches added where they
        meet, each placed in the frame that covers both.
        """
        grid = self.graph.nodes[start].shape[1:]
        acc: dict[int, tuple[Tensor, Geometry]] = {start: (a, ((1, 1), (0, 0)))}
        bias: Tensor | float = 0.0
        for i in self.graph.ancestors(start):
            if i not in acc:  # a ReLU folded into the max-pool after it
                continue
            a, geometry = acc.pop(i)
            node = self.graph.nodes[i]
            target = node.inputs[0] if node.inputs else None
            if node.kind == "input":
                return bias + self._concretize(a, geometry, grid, sel)
            if node.kind == "add":
                self._push(acc, node.inputs[1], a, geometry)
            elif i in self.fused:
                a, b, geometry = self._relu_pool(self.fused[i], a, geometry, grid, sel)
                bias = bias + b
                target = self.graph.nodes[target].inputs[0]
            elif node.kind == "relu":
                r = self.relax[i]
                low, up, icpt = (_unfold(t, geometry, a.shape[-2:], grid, sel).unsqueeze(2)
                                 for t in (r.lower_slope, r.upper_slope, r.upper_intercept))
                bias = bias + _row_dot(a.clamp(max=0), icpt)
                a = a * torch.where(a >= 0, low, up)
            elif node.kind == "maxpool":
                a, b, geometry = self._maxpool(node, self.relax[i], a, geometry, grid, sel)
                bias = bias + b
            elif isinstance(node.op, ChannelAffineOp):
                op = node.op
                self.macs += a.numel()
                bias = bias + a.sum(dim=(-1, -2)) @ op.shift.flatten()
                a = a * op.scale
            else:  # ConvOp
                op = node.op
                if op.bias is not None:
                    bias = bias + a.sum(dim=(-1, -2)) @ op.bias
                a = self._conv_backward(i, op, a)
                geometry = self._shift(geometry, op.stride, op.padding)
                mask = self._mask(target, geometry, a.shape[-2:], grid, sel)
                if not bool(mask.all()):  # keeps rows shared by every position when no patch leaves the image
                    a = a * mask
            self._push(acc, target, a, geometry)
        raise AssertionError("the walk never reached the input")

    @staticmethod
    def _push(acc: dict, index: int, a: Tensor, geometry: Geometry) -> None:
        """Add patches ``a`` to what node ``index`` already received (aligned to a common frame)."""
        if index not in acc:
            acc[index] = (a, geometry)
            return
        other, other_geometry = acc[index]
        frame, size = _union(other_geometry, tuple(other.shape[-2:]), geometry, tuple(a.shape[-2:]))
        acc[index] = (_aligned(other, other_geometry, frame, size) + _aligned(a, geometry, frame, size), frame)

    def _conv_backward(self, index: int, op: ConvOp, a: Tensor) -> Tensor:
        """Transposed conv of every patch: one GEMM with the patch-level matrix when it is small
        (tiny images per row make conv_transpose2d loop), else conv_transpose2d (channels-last)."""
        size = tuple(a.shape[-3:])
        key = (index, size)
        if key not in self._matrices:
            d_in = size[0] * size[1] * size[2]
            w = op.weight.to(a)
            out_size = [(s - 1) * st + d * (k - 1) + 1
                        for s, st, d, k in zip(size[1:], op.stride, op.dilation, w.shape[2:])]
            d_out = w.shape[1] * op.groups * out_size[0] * out_size[1]
            if d_in * d_out <= _GEMM_LIMIT:
                eye = torch.eye(d_in, dtype=a.dtype, device=a.device).reshape(d_in, *size)
                m = F.conv_transpose2d(eye, w, None, op.stride, 0, 0, op.groups, op.dilation)
                self._matrices[key] = (m.reshape(d_in, d_out), (w.shape[1] * op.groups, *out_size))
            else:
                self._matrices[key] = None
        entry = self._matrices[key]
        lead = a.shape[:-3]
        if entry is not None:
            m, shape = entry
            self.macs += math.prod(lead) * m.numel()
            return (a.reshape(*lead, -1) @ m).reshape(*lead, *shape)
        rows = a.reshape(-1, *size).contiguous(memory_format=torch.channels_last)
        self.macs += rows.shape[0] * op.weight.numel() * size[1] * size[2]
        out = F.conv_transpose2d(rows, op.weight.to(a), None, op.stride, 0, 0, op.groups, op.dilation)
        return out.contiguous().reshape(*lead, *out.shape[1:])

    @staticmethod
    def _shift(geometry: Geometry, stride, padding) -> Geometry:
        (sh, sw), (oh, ow) = geometry
        return (sh * stride[0], sw * stride[1]), (oh * stride[0] - padding[0], ow * stride[1] - padding[1])

    def _mask(self, index: int, geometry: Geometry, size, grid, sel) -> Tensor:
        shape = self.graph.nodes[index].shape
        ones = torch.ones(1, 1, *shape[1:], dtype=self.centre.dtype, device=self.centre.device)
        return _unfold(ones, geometry, tuple(size), grid, sel).unsqueeze(2)  # (1, P, 1, 1, h, w)

    def _maxpool(self, node: Node, r: Relaxation, a: Tensor, geometry: Geometry, grid, sel):
        pool: MaxPoolOp = node.op
        n, c, ho, wo, k = r.lower_slope.shape
        size = tuple(a.shape[-2:])

        def unfold_windows(t: Tensor) -> Tensor:  # (N, C, Ho, Wo, k) -> (N, P, 1, C, k, h, w)
            u = _unfold(t.permute(0, 1, 4, 2, 3).reshape(n, c * k, ho, wo), geometry, size, grid, sel)
            return u.reshape(n, -1, c, k, *size).unsqueeze(2)

        icpt = _unfold(r.upper_intercept, geometry, size, grid, sel).unsqueeze(2)
        bias = _row_dot(a.clamp(max=0), icpt)
        a = a.unsqueeze(4)
        weights = a * torch.where(a >= 0, unfold_windows(r.lower_slope), unfold_windows(r.upper_slope))
        a = fold_windows(weights, pool.kernel, pool.stride, pool.dilation)
        out_size = tuple(a.shape[-2:])
        geometry = self._shift(geometry, pool.stride, pool.padding)
        return a * self._mask(node.inputs[0], geometry, out_size, grid, sel), bias, geometry

    def _relu_pool(self, f: ReluPoolRelaxation, a: Tensor, geometry: Geometry, grid, sel):
        """max-pool and the ReLU before it in one step (disjoint windows); no mask needed after it:
        the unfolded products are 0 outside the image."""
        size = tuple(a.shape[-2:])
        bias = _row_dot(a.clamp(max=0), _unfold(f.negative_bias, geometry, size, grid, sel).unsqueeze(2))
        geometry = self._shift(geometry, f.op.stride, f.op.padding)
        out_size = (size[0] * f.op.kernel[0], size[1] * f.op.kernel[1])
        pos, neg = (_unfold(t, geometry, out_size, grid, sel).unsqueeze(2) for t in (f.positive, f.negative))
        return f.tile(a, pos, neg), bias, geometry

    def _concretize(self, a: Tensor, geometry: Geometry, grid, sel) -> Tensor:
        size = tuple(a.shape[-2:])
        c = _unfold(self.centre, geometry, size, grid, sel).unsqueeze(2)
        r = _unfold(self.radius, geometry, size, grid, sel).unsqueeze(2)
        bound = _row_dot(a, c) - _row_dot(a.abs(), r)
        if self.x is not None:  # L2: also the dual-norm bound around x; both are sound
            x = _unfold(self.x, geometry, size, grid, sel).unsqueeze(2)
            ball = _row_dot(a, x) - self.eps * a.flatten(3).norm(dim=-1)
            bound = torch.maximum(bound, ball)
        return bound
