"""The training loop behind ``robustbench-lite train``: any registered defense, resumable, deterministic.

``train(model, dataset, defense, config)`` minimises ``defense.loss(model, x, y, indices=, groups=,
epoch=, step=, steps_per_epoch=)`` over shuffled mini-batches. Every random draw of epoch ``e`` (shuffling, and any global
torch randomness a defense uses) is seeded from ``(seed, e)``, so a run resumed from its per-epoch
checkpoint ends with the same weights as an uninterrupted one. The checkpoint is one safetensors
file (model, optimizer and defense tensors) with the log and the optimizer's settings as JSON
metadata: no pickle. ``run(args)`` adds what the command line needs: data, model, the weights file
and the model card (see :mod:`robustbench_lite.zoo.cards`) with the exact command.
"""
from .checkpoints import load_checkpoint, save_checkpoint
from .command import add_arguments, default_name, main, run, training_command
from .config import LR_SCHEDULES, OPTIMIZERS, TrainConfig, learning_rate, make_optimizer
from .loop import accuracy, train
from .selection import SELECTION_RULES, WorstGroupSelection

__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "SELECTION_RULES", "TrainConfig", "WorstGroupSelection", "accuracy",
           "add_arguments", "default_name", "learning_rate", "load_checkpoint", "main", "make_optimizer", "run",
           "save_checkpoint", "train", "training_command"]
