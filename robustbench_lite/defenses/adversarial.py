"""PGD adversarial training (Madry et al. 2018, arXiv 1706.06083).

The inner maximisation is :class:`attacks.PGD` run on the model being trained (it switches the
model to eval mode for the attack and restores train mode) without early stopping, so training
sees the last PGD iterate as in the paper; the outer minimisation is the cross-entropy on it. MNIST defaults follow the paper: Linf eps 0.3, 40 steps
of 0.01, uniform random start. An optional linear eps ramp-up over the first epochs is recorded in
the config (``eps_ramp_epochs``); the step size scales with the ramped eps.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from attacks.pgd import PGD
from robustbench_lite.errors import checked_int, checked_number
from robustbench_lite.seeding import example_seeds, mix
from robustbench_lite.threat import ThreatModel

from .base import Defense, add_option, add_threat_options


def ramped_eps(eps: float, epoch: int, ramp_epochs: int) -> float:
    """Linear ramp: ``eps * (epoch + 1) / ramp_epochs`` for the first ``ramp_epochs`` epochs, then eps."""
    if ramp_epochs <= 0:
        return eps
    return eps * min(1.0, (epoch + 1) / ramp_epochs)


class PGDAT(Defense):
    """Madry et al.'s PGD adversarial training: ``CE(model(PGD(x)), y)``.

    Args:
        eps: radius of the training threat ball (0.3, Linf, pixel units of [0, 1]).
        norm: "Linf" or "L2".
        steps: PGD steps of the inner maximisation (40).
        step_size: PGD step at the full eps (0.01); scaled by eps_now / eps during the ramp.
        random_start: start PGD at a uniform point of the ball (True).
        eps_ramp_epochs: epochs of linear eps ramp-up (0 = full eps from the start).
        seed: mixed with the epoch and ``batch["indices"]`` into per-example seeds of the random
            start, so training does not depend on how batches are formed.

    Shapes: x (N, C, H, W) in [0, 1], y (N,) int64; returns a scalar.
    """

    name = "pgd-at"

    def __init__(self, *, eps: float = 0.3, norm: str = "Linf", steps: int = 40, step_size: float = 0.01,
                 random_start: bool = True, eps_ramp_epochs: int = 0, seed: int = 0) -> None:
        super().__init__(seed=seed)
        threat = ThreatModel(norm, eps)  # validates norm and eps
        self.eps = threat.eps
        self.norm = threat.norm
        self.steps = checked_int("steps", steps, minimum=1)
        self.step_size = checked_number("step_size", step_size, above=0)
        self.random_start = bool(random_start)
        self.eps_ramp_epochs = checked_int("eps_ramp_epochs", eps_ramp_epochs, minimum=0)

    @property
    def current_eps(self) -> float:
        return ramped_eps(self.eps, self.epoch, self.eps_ramp_epochs)

    def schedule(self) -> dict[str, float]:
        return {"eps": self.current_eps}

    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor, indices: Tensor | None = None) -> Tensor:
        """PGD points inside the current (ramped) ball; ``x`` itself while the ramp is at 0."""
        eps = self.current_eps
        if eps == 0:
            return x.detach()
        attack = PGD(steps=self.steps, abs_stepsize=self.step_size * eps / self.eps, random_start=self.random_start,
                     early_stop=False, seed=mix(self.seed, self.epoch))
        seeds = None if indices is None else example_seeds(mix(self.seed, self.epoch), indices)
        return attack(model, x, y, ThreatModel(self.norm, eps), seeds=seeds).x_adv

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, **batch: Any) -> Tensor:
        x_adv = self.adversarial_examples(model, x, y, batch.get("indices"))
        return F.cross_entropy(model(x_adv), y)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        add_threat_options(parser, inner_attack=True)
        add_option(parser, "--eps-ramp-epochs", type=int, default=0, help="epochs of linear eps ramp-up")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PGDAT":
        return cls(eps=args.eps, norm=args.norm, steps=args.attack_steps, step_size=args.attack_step_size,
                   eps_ramp_epochs=args.eps_ramp_epochs, seed=args.seed)
