"""Standard (empirical risk minimisation) training: mean cross-entropy on the clean batch."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Defense


class Standard(Defense):
    """Cross-entropy on clean inputs; the baseline every defense is compared with.

    >>> loss = Standard().loss(model, x, y)  # x (N, C, H, W) in [0, 1], y (N,) -> scalar
    """

    name = "standard"

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, **batch: Any) -> Tensor:
        return F.cross_entropy(model(x), y)
