"""Scheduling of CROWN's bound rows (:mod:`certify.crown`): which neurons of a node get rows, in
which groups of examples, and how their bounds are written back (intersected with the old ones).

A batch pads every example to the same number of rows, so examples are grouped by how many neurons
they select (IBP-trained nets select from a handful to hundreds per example).
"""
from __future__ import annotations

import torch
from torch import Tensor


def selected_first(select: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``select`` (N, W), the indices of the True entries first (order kept), cut to the
    largest count, and which of them are real (N, m) rather than padding."""
    counts = select.sum(1)
    rows = int(counts.max()) if select.shape[0] else 0
    order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :rows]
    return order, torch.arange(rows, device=select.device)[None, :] < counts[:, None]


def count_groups(counts: Tensor, ratio: float = 1.5) -> list[Tensor]:
    """Indices (ascending) of the examples with a count > 0, in groups whose largest count is at most
    ``ratio`` times their smallest (largest counts first)."""
    values, order = torch.sort(counts, descending=True)
    groups, start = [], 0
    values = values.tolist()
    for i, v in enumerate(values + [0]):
        if i == len(values) or v == 0 or v * ratio < values[start]:
            if i > start:
                groups.append(order[start:i].sort().values)
            start = i
            if i == len(values) or v == 0:
                break
    return groups


def tighten(lo: Tensor, hi: Tensor, idx: Tensor, keep: Tensor, low: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Intersect the flat bounds (N, W) at ``idx`` (N, m) with (low, up) where ``keep``."""
    cur_lo, cur_hi = lo.gather(1, idx), hi.gather(1, idx)
    lo = lo.scatter(1, idx, torch.where(keep, torch.maximum(cur_lo, low), cur_lo))
    hi = hi.scatter(1, idx, torch.where(keep, torch.minimum(cur_hi, up), cur_hi))
    return lo, hi
