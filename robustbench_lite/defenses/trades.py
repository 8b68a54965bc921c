"""TRADES (Zhang et al. 2019, arXiv 1901.08573): ``CE(f(x), y) + beta * KL(f(x) || f(x'))``.

The inner maximisation is PGD on the KL divergence from the clean prediction, started at
``x + 0.001 * N(0, I)`` as in the authors' code (noise drawn per example), with the norm's steepest-ascent step and the threat
model's projection (Linf or L2 ball intersected with the box), the model frozen in eval mode.
MNIST defaults: eps 0.3, 40 steps of 0.01, beta 6.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import frozen
from robustbench_lite.errors import checked_int, checked_number
from robustbench_lite.seeding import ExampleRNG, example_seeds, mix
from robustbench_lite.threat import ThreatModel

from .base import Defense, add_option, add_threat_options


def kl_from_clean(logits_adv: Tensor, logits_clean: Tensor, reduction: str = "batchmean") -> Tensor:
    """KL(softmax(clean) || softmax(adv)), the TRADES regulariser (``nn.KLDivLoss`` convention)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction=reduction)


class TRADES(Defense):
    """TRADES loss with a KL-PGD inner maximisation.

    Args:
        eps: radius of the training ball (0.3); norm: "Linf" or "L2".
        steps: inner PGD steps (40); step_size: inner step in input units (0.01).
        beta: weight of the KL term (6.0, the paper's 1/lambda).

    ``loss(model, x, y)``: scalar, x (N, C, H, W) in [0, 1], y (N,).
    """

    name = "trades"

    def __init__(self, *, eps: float = 0.3, norm: str = "Linf", steps: int = 40, step_size: float = 0.01,
                 beta: float = 6.0, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.threat = ThreatModel(norm, eps)
        self.eps = self.threat.eps
        self.norm = self.threat.norm
        self.steps = checked_int("steps", steps, minimum=1)
        self.step_size = checked_number("step_size", step_size, above=0)
        self.beta = checked_number("beta", beta, minimum=0)

    def perturb(self, model: nn.Module, x: Tensor, indices: Tensor | None = None) -> Tensor:
        """argmax of KL(f(x) || f(x')) over the ball by PGD; x (N, ...) -> x' (N, ...), detached.

        The start's noise is drawn per example from ``indices`` (dataset indices), the seed and the
        epoch, so training does not depend on how batches are formed (positions when None).
        """
        x = x.detach()
        ops = self.threat.ops
        indices = torch.arange(x.shape[0]) if indices is None else indices
        noise = ExampleRNG(example_seeds(mix(self.seed, self.epoch), indices), x.device).normal(x.shape[1:], stream=0)
        with frozen(model), torch.enable_grad():
            with torch.no_grad():
                clean = model(x)
            x_adv = self.threat.project(x + 0.001 * noise, x)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                kl = kl_from_clean(model(x_adv), clean, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
                x_adv = self.threat.project(x_adv.detach() + self.step_size * ops.ascent_direction(grad), x)
        return x_adv.detach()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, **batch) -> Tensor:
        x_adv = self.perturb(model, x, batch.get("indices"))
        logits = model(x)
        return F.cross_entropy(logits, y) + self.beta * kl_from_clean(model(x_adv), logits)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        add_threat_options(parser, inner_attack=True)
        add_option(parser, "--beta", type=float, default=6.0, help="TRADES: weight of the KL term (6)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TRADES":
        return cls(eps=args.eps, norm=args.norm, steps=args.attack_steps, step_size=args.attack_step_size,
                   beta=args.beta, seed=args.seed)
