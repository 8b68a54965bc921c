"""Certified training with interval bound propagation (Gowal et al. 2018, arXiv 1810.12715).

``kappa * CE(z(x), y) + (1 - kappa) * CE(z_hat(x, eps_t), y)`` where ``z_hat = -margin_lower`` are
the IBP worst-case logits (``z_hat_j`` upper-bounds ``z_j - z_y``; column y is 0) from
``certify.ibp`` (the same bounds as ``certify.IBP().bound_margins``), differentiable in the parameters. eps_t ramps linearly from 0 to
``eps`` and kappa from 1 to ``kappa_final`` over the ramp, after a warm-up of clean training.
Gowal et al.'s MNIST setting: train at eps 0.4 to certify 0.3, kappa_final 0.5 (``--eps 0.4``).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.graph import Graph, build_graph
from certify.ibp import ibp_margins
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel

from .base import Defense, add_option, add_threat_options


class IBPTraining(Defense):
    """IBP certified-training loss with eps and kappa schedules.

    Args:
        eps: final training radius (0.4); norm: "Linf" (or "L2" if the certifier supports it).
        kappa_final: weight of the clean loss after the ramp (0.5).
        warmup: fraction of training with eps = 0 and kappa = 1 (0.1).
        ramp: fraction of training over which eps and kappa move linearly to their final values (0.5).

    Progress through training comes from ``on_epoch_start(epoch, epochs)`` and the number of
    training batches seen in the epoch; without any call the schedule is at its end (full eps).
    ``loss(model, x, y)``: scalar, x (N, C, H, W) in [0, 1], y (N,).
    """

    name = "ibp"

    def __init__(self, *, eps: float = 0.4, norm: str = "Linf", kappa_final: float = 0.5, warmup: float = 0.1,
                 ramp: float = 0.5, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.threat = ThreatModel(norm, eps)
        if not 0 <= kappa_final <= 1:
            raise UserInputError(f"kappa_final must be in [0, 1], got {kappa_final!r}")
        if not (0 <= warmup < 1 and 0 <= ramp <= 1 and warmup + ramp <= 1):
            raise UserInputError(f"warmup and ramp must be fractions of training with warmup + ramp <= 1, got {warmup!r}, {ramp!r}")
        self.eps = self.threat.eps
        self.norm = self.threat.norm
        self.kappa_final = float(kappa_final)
        self.warmup = float(warmup)
        self.ramp = float(ramp)
        self._progress = 1.0
        self._started = False
        self._batches, self._batches_per_epoch = 0, 0
        self._graph_for: tuple[nn.Module, tuple[int, ...]] | None = None
        self._graph = None

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        self._batches_per_epoch = max(self._batches_per_epoch, self._batches)
        self._started, self._batches = True, 0
        self._progress = self.epoch / max(1, self.epochs)

    def schedule(self) -> dict[str, float]:
        """``eps`` and ``kappa`` at the current point of training."""
        eps_t, kappa = self._eps_kappa()
        return {"eps": eps_t, "kappa": kappa}

    def _eps_kappa(self) -> tuple[float, float]:
        if self.ramp == 0:
            t = 1.0 if self._progress >= self.warmup else 0.0
        else:
            t = min(1.0, max(0.0, (self._progress - self.warmup) / self.ramp))
        return self.eps * t, 1.0 - (1.0 - self.kappa_final) * t

    def _bound_graph(self, model: nn.Module, input_shape: tuple[int, ...]) -> Graph:
        """``certify``'s traced graph of the model, kept across batches: its linear and conv ops hold the
        live parameters, so only models with BatchNorm (whose folded statistics change) are re-traced."""
        fresh = self._graph_for is None or self._graph_for[0] is not model or self._graph_for[1] != input_shape
        if fresh or any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            self._graph, self._graph_for = build_graph(model, input_shape), (model, input_shape)
        return self._graph

    def state_dict(self) -> dict[str, Tensor]:
        return {"batches_per_epoch": torch.tensor(self._batches_per_epoch)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "batches_per_epoch" in state:
            self._batches_per_epoch = int(state["batches_per_epoch"])

    def _advance(self) -> None:
        """Move the schedule along within an epoch once the length of an epoch is known."""
        if not self._started:
            return
        self._batches += 1
        if self._batches_per_epoch:
            within = min(1.0, self._batches / self._batches_per_epoch)
            self._progress = (self.epoch + within) / max(1, self.epochs)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, **batch) -> Tensor:
        eps_t, kappa = self._eps_kappa()
        if model.training:
            self._advance()
        clean = F.cross_entropy(model(x), y)
        if eps_t <= 0 or kappa >= 1:
            return clean
        margin_lower = ibp_margins(self._bound_graph(model, tuple(x.shape[1:])), x, y, ThreatModel(self.norm, eps_t))
        return kappa * clean + (1 - kappa) * F.cross_entropy(-margin_lower, y)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        add_threat_options(parser, inner_attack=False)
        add_option(parser, "--kappa-final", type=float, default=0.5, help="IBP: final weight of the clean loss (0.5)")
        add_option(parser, "--ibp-warmup", type=float, default=0.1, help="IBP: fraction of training before the ramp (0.1)")
        add_option(parser, "--ibp-ramp", type=float, default=0.5, help="IBP: fraction of training for the eps/kappa ramp (0.5)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "IBPTraining":
        return cls(eps=args.eps, norm=args.norm, kappa_final=args.kappa_final, warmup=args.ibp_warmup,
                   ramp=args.ibp_ramp, seed=args.seed)
