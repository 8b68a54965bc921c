"""The in-memory dataset every evaluator, defense and CLI command works on.

A :class:`Dataset` holds a whole split as tensors: images ``x`` (N, C, H, W) float32 in [0, 1],
labels ``y`` (N,) int64, optional group labels (for worst-group metrics, Sagawa et al. 2020) and
``indices`` (N,) int64, the stable position of each example in its split. Per-example seeds are
derived from ``indices`` (see :mod:`robustbench_lite.seeding`), so they survive :meth:`subset`.
Every Dataset is checked when it is built: a malformed one never reaches an attack.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset

from robustbench_lite.errors import UserInputError

log = logging.getLogger(__name__)


def _as_tensor(value: Any, what: str) -> Tensor:
    if torch.is_tensor(value):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise UserInputError(f"{what} must be a torch tensor or numpy array, got {type(value).__name__}")


def _as_labels(value: Any, what: str, n: int) -> Tensor:
    t = _as_tensor(value, what)
    if t.dtype == torch.bool or torch.is_floating_point(t) or torch.is_complex(t):
        raise UserInputError(f"{what} must hold integers, got {t.dtype}")
    if t.shape != (n,):
        raise UserInputError(f"{what} must have shape ({n},), got {tuple(t.shape)}")
    return t.to(torch.int64)


@dataclass(eq=False, repr=False, kw_only=True)
class Dataset(TorchDataset):
    """A split of an image classification dataset, usable as a ``torch.utils.data.Dataset``.

    ``x``: (N, C, H, W) float32 in [0, 1]; ``y``: (N,) int64 in [0, num_classes);
    ``groups``: (N,) int64 in [0, len(group_names)) or None; ``indices``: (N,) distinct int64
    (defaults to 0..N-1); ``info``: provenance (source, split rule, license note).
    ``dataset[i]`` is the pair ``(x[i], y[i])``.
    """

    name: str
    split: str
    x: Tensor
    y: Tensor
    num_classes: int
    groups: Tensor | None = None
    group_names: list[str] | None = None
    indices: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        x = _as_tensor(self.x, "x")
        if x.dim() != 4:
            raise UserInputError(f"dataset x must have shape (N, C, H, W), got {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise UserInputError(f"dataset x must be float in [0, 1], got {x.dtype} (divide uint8 images by 255)")
        x = x.to(torch.float32)
        n = x.shape[0]
        y = _as_labels(self.y, "dataset y", n)
        if int(self.num_classes) < 1:
            raise UserInputError(f"num_classes must be >= 1, got {self.num_classes!r}")
        self.num_classes = int(self.num_classes)
        if n:
            if not torch.isfinite(x).all():
                raise UserInputError(f"dataset {self.name!r} ({self.split}) has NaN or infinite pixels")
            lo, hi = x.min().item(), x.max().item()
            if lo < 0 or hi > 1:
                raise UserInputError(
                    f"dataset {self.name!r} ({self.split}) pixels must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]"
                )
            if y.min().item() < 0 or y.max().item() >= self.num_classes:
                raise UserInputError(
                    f"dataset {self.name!r} ({self.split}) labels must lie in [0, {self.num_classes}), "
                    f"got [{y.min().item()}, {y.max().item()}]"
                )
        indices = torch.arange(n, device=x.device) if self.indices is None else _as_labels(self.indices, "indices", n)
        if n and (indices.min().item() < 0 or torch.unique(indices).numel() != n):
            raise UserInputError(f"dataset {self.name!r} ({self.split}) indices must be distinct and >= 0")
        groups = self.groups
        if (groups is None) != (self.group_names is None):
            raise UserInputError("groups and group_names must be given together")
        if groups is not None:
            groups = _as_labels(groups, "groups", n)
            self.group_names = [str(g) for g in self.group_names]  # type: ignore[union-attr]
            if n and (groups.min().item() < 0 or groups.max().item() >= len(self.group_names)):
                raise UserInputError(f"groups must lie in [0, {len(self.group_names)}) (one per group name)")
        self.x, self.y, self.indices, self.groups = x, y, indices, groups

    # --- torch Dataset protocol -----------------------------------------------------------------
    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def __repr__(self) -> str:
        groups = None if self.group_names is None else len(self.group_names)
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={tuple(self.x.shape[1:])}, num_classes={self.num_classes}, groups={groups})"
        )

    # --- derived datasets -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one image, (C, H, W)."""
        return tuple(self.x.shape[1:])

    def subset(self, selection: slice | Sequence[int] | Tensor | np.ndarray) -> "Dataset":
        """The examples at ``selection`` (a slice, positions 0..N-1, or a boolean mask of length N).

        Positions select rows of this object; the stable ``indices`` of the chosen rows are kept,
        so per-example seeds do not change. Repeated positions are refused (indices stay distinct).
        """
        n = len(self)
        if isinstance(selection, slice):
            pos = torch.arange(n)[selection]
        else:
            sel = selection if torch.is_tensor(selection) else torch.as_tensor(np.asarray(selection))
            sel = sel.cpu()
            if sel.dtype == torch.bool:
                if sel.shape != (n,):
                    raise UserInputError(f"a boolean subset mask must have shape ({n},), got {tuple(sel.shape)}")
                pos = sel.nonzero().flatten()
            elif sel.numel() == 0:
                pos = torch.zeros(0, dtype=torch.int64)
            elif torch.is_floating_point(sel) or sel.dim() != 1:
                raise UserInputError(f"subset takes a slice, a 1-D list of positions or a boolean mask, got {sel.dtype} {tuple(sel.shape)}")
            else:
                pos = sel.to(torch.int64)
                if pos.min().item() < 0 or pos.max().item() >= n:
                    raise UserInputError(f"subset positions must lie in [0, {n}), got [{pos.min().item()}, {pos.max().item()}]")
                if torch.unique(pos).numel() != pos.numel():
                    raise UserInputError("subset positions must be distinct")
        pos = pos.to(self.x.device)
        return replace(
            self,
            x=self.x[pos],
            y=self.y[pos],
            indices=self.indices[pos],  # type: ignore[index]
            groups=None if self.groups is None else self.groups[pos],
            group_names=None if self.group_names is None else list(self.group_names),
            info=dict(self.info),
        )

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy whose tensors live on ``device``."""
        return replace(
            self,
            x=self.x.to(device),
            y=self.y.to(device),
            indices=self.indices.to(device),  # type: ignore[union-attr]
            groups=None if self.groups is None else self.groups.to(device),
            group_names=None if self.group_names is None else list(self.group_names),
            info=dict(self.info),
        )

    def group_counts(self) -> dict[str, int]:
        """Number of examples per group name (empty dict when the dataset has no groups)."""
        if self.groups is None or self.group_names is None:
            return {}
        counts = torch.bincount(self.groups.cpu(), minlength=len(self.group_names)).tolist()
        return dict(zip(self.group_names, counts))
