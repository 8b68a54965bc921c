"""Evaluation under the ``corruptions`` threat model (Hendrycks & Dietterich 2019, arXiv 1903.12261).

``evaluate_corruptions(model, dataset)`` scores the first ``n_examples`` of a dataset clean and under
every corruption of :mod:`robustbench_lite.corruptions.ops` at its five severities, and returns an
:class:`robustbench_lite.evaluation.core.EvaluationResult` that the leaderboard stores like any other:

- each corruption plays the part of an attack run on every example (mode ``individual``): it *breaks*
  a correctly classified example when the model errs on it at one severity or more, so ``robust_acc``
  is the per-example worst case over the whole corruption set;
- ``corruption_correct[name]`` (5, N) keeps the per-example, per-severity flags, from which the
  record's ``corruptions`` section (accuracy per corruption and severity, ``mean_corruption_acc``,
  docs/metrics.md) is computed by :mod:`robustbench_lite.leaderboard.sections`.

Noise and elastic fields are drawn per example from the run seed and the dataset index, so the
numbers do not depend on batch size or order. Shapes: dataset.x (N, C, H, W) in [0, 1], dataset.y (N,).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .ops import CORRUPTIONS, SEVERITIES, corruption_accuracy
from ..errors import UserInputError
from ..evaluation.core import EvaluationResult, PluginReport, evaluation_examples, group_fields, resolve_device
from ..threat import CORRUPTIONS_NORM

log = logging.getLogger(__name__)

SEVERITY_LEVELS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class CorruptionThreat:
    """The ``corruptions`` threat model as a record stores it: no radius, inputs in ``box``."""

    norm: str = CORRUPTIONS_NORM
    eps: float = 0.0
    box: tuple[float, float] = (0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": float(self.eps), "box": [float(b) for b in self.box]}


def corruption_names(names: Sequence[str] | str | None = None) -> list[str]:
    """Checked, distinct corruption names (a list or ``"a,b"``); None or empty: all of them."""
    if isinstance(names, str):
        names = [s.strip() for s in names.split(",") if s.strip()]
    if not names:
        return list(CORRUPTIONS)
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or name not in CORRUPTIONS:
            raise UserInputError(f"unknown corruption {name!r}: choose from {', '.join(CORRUPTIONS)}")
        if name in out:
            raise UserInputError(f"corruption {name!r} is listed twice")
        out.append(name)
    return out


def corruption_config(name: str) -> dict[str, Any]:
    """What a record's ``attacks[]`` entry holds as the corruption's configuration."""
    return {"severities": list(SEVERITY_LEVELS), "parameters": [float(c) for c in SEVERITIES[name]]}


def evaluate_corruptions(model: nn.Module, dataset: Any, *, corruptions: Sequence[str] | str | None = None,
                         n_examples: int | None = 1000, batch_size: int = 250, seed: int = 0,
                         device: str | torch.device = "cpu") -> EvaluationResult:
    """Clean and corrupted accuracy of ``model`` on the first ``n_examples`` of ``dataset`` (or a dataset name).

    Returns an EvaluationResult with ``threat`` = :class:`CorruptionThreat`, one attack report per
    corruption and ``corruption_correct`` filled in. The model's mode is restored afterwards.
    """
    names = corruption_names(corruptions)
    dataset = evaluation_examples(model, dataset, n_examples, batch_size)
    n = len(dataset)
    dev = resolve_device(device)
    model.to(dev)
    started = time.perf_counter()
    acc = corruption_accuracy(model, dataset, batch_size=int(batch_size), seed=int(seed), corruptions=names)
    correct = torch.tensor(acc["clean_correct"], dtype=torch.bool)
    flags = {name: torch.tensor(acc["correct"][name], dtype=torch.bool) for name in names}  # (5, n) each
    survived = {name: correct & flags[name].all(dim=0) for name in names}
    success = {name: correct & ~survived[name] for name in names}
    reports = [PluginReport(name, "attack", corruption_config(name), accuracy=float(survived[name].double().mean()),
                            examples=n, seconds=acc["seconds"][name], forward=len(SEVERITY_LEVELS) * n)
               for name in names]
    log.info("corruptions: %d examples, %d corruptions in %.1f s", n, len(names), time.perf_counter() - started)
    return EvaluationResult(
        dataset=str(getattr(dataset, "name", "custom")), split=str(getattr(dataset, "split", "test")),
        indices=dataset.indices.cpu(), threat=CorruptionThreat(), seed=int(seed),  # type: ignore[arg-type]
        batch_size=int(batch_size), device=str(dev), mode="individual", correct=correct, attack_success=success,
        certified_by={}, attacks=reports, certifiers=[], seconds=time.perf_counter() - started, clean_forward=n,
        **group_fields(dataset), corruption_correct=flags,
    )
