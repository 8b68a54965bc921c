"""Training settings (:class:`TrainConfig`), the learning-rate schedule and the optimizer."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from robustbench_lite.errors import UserInputError, checked_int, checked_number

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
_META_KEY = "robustbench_lite"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; ``lr_schedule`` "cosine" decays per step to 0 over the run."""

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 50
    seed: int = 0
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"

    def __post_init__(self) -> None:
        checked_int("epochs", self.epochs, minimum=1)
        checked_int("batch size", self.batch_size, minimum=1)
        checked_int("seed", self.seed)
        checked_number("learning rate", self.lr, above=0)
        checked_number("weight decay", self.weight_decay, minimum=0)
        checked_number("momentum", self.momentum, minimum=0)
        if self.optimizer not in OPTIMIZERS:
            raise UserInputError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserInputError(f"unknown lr schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * step / max(total_steps, 1)))
    return config.lr


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
