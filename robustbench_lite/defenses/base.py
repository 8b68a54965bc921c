"""The Defense contract (see shared ARCHITECTURE.md): a training loss that any training loop can call.

``defense.loss(model, x, y, **batch) -> Tensor`` returns a scalar to minimise for one batch. ``batch``
carries what a loop knows about the batch beyond images and labels: ``indices`` (N,) dataset indices
(for per-example seeds), ``groups`` (N,) group labels where the dataset has them, ``pseudo`` (N,) bool
where the label is a pseudo-label (robust self-training's pool), ``epoch``, and
``step`` / ``steps_per_epoch`` (position in the epoch, for schedules finer than an epoch). A defense
may keep state across batches (e.g. group weights); :meth:`Defense.state_dict` returns it as tensors
so a checkpoint can restore it, and :meth:`Defense.on_epoch_start` lets it follow a schedule
(e.g. an eps ramp-up). A defense that needs work before the loop (RST trains a teacher and
pseudo-labels unlabeled images) does it in :meth:`Defense.prepare`, which returns the training set.

``robustbench-lite train`` builds a defense from its command line through :meth:`Defense.add_arguments`
and :meth:`Defense.from_args`, so a new defense adds its own options without touching the loop.
"""
from __future__ import annotations

import abc
import argparse
from typing import Any, Callable

from torch import Tensor, nn


def add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str, **kwargs: Any) -> None:
    """``parser.add_argument`` that skips an option another defense already added (e.g. ``--eps``)."""
    # argument groups share their parser's table of option strings
    if any(flag in parser._option_string_actions for flag in flags):
        return
    parser.add_argument(*flags, **kwargs)


def add_threat_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, inner_attack: bool) -> None:
    """The training threat model's options (``--eps``, ``--norm``) and, for defenses that attack
    inside the loss (PGD-AT, TRADES), the inner PGD's ``--attack-steps`` / ``--attack-step-size``."""
    add_option(parser, "--eps", type=float, default=0.3, help="training threat radius (pixel units)")
    add_option(parser, "--norm", default="Linf", choices=["Linf", "L2"], help="training threat norm")
    if inner_attack:
        add_option(parser, "--attack-steps", type=int, default=40, help="inner PGD steps")
        add_option(parser, "--attack-step-size", type=float, default=0.01, help="inner PGD step at full eps")


class Defense(abc.ABC):
    """Base class: subclasses set ``name`` and implement :meth:`loss`.

    Hyper-parameters are keyword-only in ``__init__`` and reported by :meth:`config` (recorded in the
    model card). The loss is computed with the model in whatever mode the caller put it in (train
    mode in a training loop); an inner attack may switch to eval mode and must switch back.
    """

    name: str = "defense"

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = int(seed)
        self.epoch = 0
        self.epochs = 1

    @abc.abstractmethod
    def loss(self, model: nn.Module, x: Tensor, y: Tensor, **batch: Any) -> Tensor:
        """Scalar training loss for a batch: x (N, C, H, W) in [0, 1], y (N,) int64."""

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called by the loop before epoch ``epoch`` (0-based) of ``epochs``; schedules live here."""
        self.epoch = int(epoch)
        self.epochs = int(epochs)

    def schedule(self) -> dict[str, float]:
        """Scheduled values for the current epoch (e.g. ``{"eps": 0.15}``), logged per epoch."""
        return {}

    def config(self) -> dict[str, Any]:
        """Hyper-parameters as plain JSON values, recorded in the model card."""
        return {k: v for k, v in vars(self).items()
                if not k.startswith("_") and k not in ("epoch", "epochs")
                and (v is None or isinstance(v, (bool, int, float, str)))}

    def state_dict(self) -> dict[str, Tensor]:
        """State kept across batches (tensors only), saved in the resumable checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def prepare(self, train_set: Any, build_model: Callable[[], nn.Module], *, device: Any = "cpu") -> Any:
        """Called once before the loop with the training split and a factory of fresh models (same
        architecture); returns the set to train on. Default: ``train_set`` unchanged."""
        return train_set

    def report(self, test_set: Any = None) -> dict[str, Any]:
        """What :meth:`prepare` did (e.g. RST's teacher), for the model card; empty by default."""
        return {}

    # --- command line -----------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """Add this defense's options with :func:`add_option` (shared options are added once)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Defense":
        """Build the defense from parsed ``robustbench-lite train`` arguments."""
        return cls(seed=args.seed)
