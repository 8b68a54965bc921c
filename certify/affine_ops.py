"""Affine layers of common architectures beyond :mod:`certify.layers`' core ones (same four operations).

- :class:`ElementwiseAffineOp`: ``x * scale + shift`` with constants of the per-example shape (a
  normalization or a bias written in ``forward`` whose constants are not per channel);
- :class:`EmbedOp`: places its input in a zero tensor at an offset along one dimension; a
  ``torch.cat`` is the sum of its inputs' embeddings (exact for intervals and linear bounds alike);
- :class:`SeparablePoolOp`: adaptive average pooling with windows of unequal sizes, as
  ``P_h X P_w^T`` per channel (the equal-window case is a depthwise convolution).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import AffineOp, ScaleShiftOp


class ElementwiseAffineOp(ScaleShiftOp):
    """``x * scale + shift``; scale and shift (*shape) broadcast over the batch."""

    def __init__(self, scale: Tensor, shift: Tensor, in_shape: tuple[int, ...]) -> None:
        self.scale, self.shift = scale, shift
        self.in_shape = self.out_shape = in_shape


class EmbedOp(AffineOp):
    """``x`` (B, *in) written at ``offset`` along per-example dimension ``dim`` of zeros (B, *out)."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], dim: int, offset: int) -> None:
        self.in_shape, self.out_shape, self.dim, self.offset = in_shape, out_shape, dim, offset

    def forward(self, x: Tensor) -> Tensor:
        after = self.out_shape[self.dim] - self.offset - self.in_shape[self.dim]
        pad = [0, 0] * (len(self.in_shape) - 1 - self.dim) + [self.offset, after]
        return F.pad(x, pad)

    forward_abs = forward

    def backward(self, a: Tensor) -> Tensor:
        return a.narrow(2 + self.dim, self.offset, self.in_shape[self.dim])


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows ``[floor(i size / out), ceil((i + 1) size / out))``."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _averaging(size: int, out: int, dtype: torch.dtype) -> Tensor:
    m = torch.zeros(out, size, dtype=dtype)
    for i, (s, e) in enumerate(adaptive_windows(size, out)):
        m[i, s:e] = 1.0 / (e - s)
    return m


class SeparablePoolOp(AffineOp):
    """Adaptive average pooling (C, H, W) -> (C, oh, ow) as ``P_h X P_w^T`` (averaging matrices >= 0).

    Each weight 1 / window is rounded (to double, then to ``dtype``): the product map is within
    ``relative_error`` of the exact one, elementwise (:mod:`certify.rounding`)."""

    def __init__(self, in_shape: tuple[int, ...], out_size: tuple[int, int], dtype: torch.dtype = torch.float32) -> None:
        self.in_shape, self.out_shape = in_shape, (in_shape[0], *out_size)
        self.rows, self.cols = _averaging(in_shape[1], out_size[0], dtype), _averaging(in_shape[2], out_size[1], dtype)
        u = torch.finfo(dtype).eps / 2
        self.relative_error = (1 + 2 * u) ** 2 * (1 + 2 ** -40) - 1  # two factors, each within 2u

    def forward(self, x: Tensor) -> Tensor:
        return self.rows.to(x) @ x @ self.cols.to(x).T

    forward_abs = forward

    @property
    def macs(self) -> int:
        c, h, w = self.in_shape
        _, oh, ow = self.out_shape
        return c * (h * w * ow + oh * h * ow)

    def backward(self, a: Tensor) -> Tensor:
        return self.rows.to(a).T @ a @ self.cols.to(a)
