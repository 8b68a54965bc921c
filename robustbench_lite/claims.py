"""The check every claimed adversarial point passes before it counts: an attack's ``x_adv`` or a
complete verifier's counterexample must lie in the threat ball intersected with the box and be
misclassified by the model on a fresh forward pass. One batched forward; no plug-in's word is taken.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .threat import ThreatModel


@dataclass
class PointCheck:
    """Per-point verdicts, each (P,) bool on the CPU: ``inside`` ball and box, ``misclassified``."""

    inside: Tensor
    misclassified: Tensor

    @property
    def ok(self) -> Tensor:
        return self.inside & self.misclassified


def check_points(model: nn.Module, points: Tensor, x: Tensor, y: Tensor, threat: ThreatModel) -> PointCheck:
    """Check claimed adversarial ``points`` (P, ...) for clean inputs ``x`` (P, ...) with labels ``y`` (P,).

    ``inside``: :meth:`ThreatModel.contains` computed in float64 with eps as given (its default
    tolerance absorbs the float32 rounding of ``x + delta``); a NaN point is never inside.
    ``misclassified``: ``model(points).argmax(1) != y`` in the dtype of ``x`` (the model's own, as
    the attacks' re-scoring does). The caller fixes the model's mode.
    """
    if points.shape != x.shape:
        raise ValueError(f"points {tuple(points.shape)} and inputs {tuple(x.shape)} differ in shape")
    if points.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.bool)
        return PointCheck(empty, empty.clone())
    finite = torch.isfinite(points.flatten(1)).all(dim=1)
    inside = threat.contains(points.detach().double(), x.detach().double()) & finite
    with torch.no_grad():
        logits = model(torch.where(finite.view(-1, *[1] * (x.dim() - 1)), points, x).to(x.dtype))
    wrong = (logits.argmax(dim=1) != y.to(logits.device)) & finite.to(logits.device)
    return PointCheck(inside.cpu(), wrong.cpu())


__all__ = ["PointCheck", "check_points"]
