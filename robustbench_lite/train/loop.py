"""The training loop: any registered defense, resumable, deterministic (see the package docstring)."""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from robustbench_lite.defenses import Defense
from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import mix

from .checkpoints import _fingerprint, load_checkpoint, save_checkpoint
from .config import TrainConfig, learning_rate, make_optimizer

log = logging.getLogger(__name__)

# --- the loop --------------------------------------------------------------------------------------
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Clean accuracy in eval mode (the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                      for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / max(len(x), 1)


def train(model: nn.Module, dataset: Any, defense: Defense, config: TrainConfig, *, checkpoint: str | os.PathLike | None = None,
          resume: bool = False, progress: bool = False, device: str | torch.device = "cpu",
          on_epoch_end: Callable[[nn.Module, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place on ``dataset`` (``.x`` (N, C, H, W) in [0, 1], ``.y``, optional ``.indices``,
    ``.groups``, ``.pseudo``) with ``defense.loss``; returns the per-epoch log (loss, train_acc, lr, schedule, seconds).

    With ``checkpoint``, the state after every epoch is saved there; ``resume=True`` continues from it.
    ``on_epoch_end(model, entry)`` runs after each epoch, before the entry is logged and checkpointed; it
    may add fields to the entry (e.g. a validation metric for model selection).
    """
    model.to(device)
    x, y = dataset.x.to(device), dataset.y.to(device)
    indices = getattr(dataset, "indices", None)
    indices = torch.arange(len(x)) if indices is None else indices.cpu()
    groups = getattr(dataset, "groups", None)
    pseudo = getattr(dataset, "pseudo", None)
    optimizer = make_optimizer(model, config)
    fingerprint = _fingerprint(model, dataset, defense, config)
    start, history = 0, []
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise UserInputError(f"nothing to resume: no checkpoint at {ckpt}")
        start, history = load_checkpoint(ckpt, model, optimizer, defense, fingerprint)
        log.info("resuming from %s after epoch %d", ckpt, start)
    n, bs = len(x), config.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total_steps = steps_per_epoch * config.epochs
    for epoch in range(start, config.epochs):
        began = time.perf_counter()
        torch.manual_seed(mix(config.seed, epoch, 1))  # any global draw of this epoch depends on (seed, epoch) only
        order = torch.randperm(n, generator=torch.Generator().manual_seed(mix(config.seed, epoch)))
        defense.on_epoch_start(epoch, config.epochs)
        model.train()
        total_loss, bar = 0.0, tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                                    disable=not progress, leave=False, dynamic_ncols=True)
        for step in range(steps_per_epoch):
            lr = learning_rate(config, epoch * steps_per_epoch + step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pos = order[step * bs:(step + 1) * bs]
            batch = {"indices": indices[pos], "epoch": epoch, "step": step, "steps_per_epoch": steps_per_epoch}
            if groups is not None:
                batch["groups"] = groups[pos].to(device)
            if pseudo is not None:
                batch["pseudo"] = pseudo[pos].to(device)
            loss = defense.loss(model, x[pos.to(device)], y[pos.to(device)], **batch)
            if not torch.isfinite(loss):
                raise UserInputError(f"the training loss became {loss.item()} at epoch {epoch + 1}: training diverged; "
                                     "lower --lr or the defense's loss weights")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(pos)
            bar.set_postfix(loss=f"{total_loss / min(n, (step + 1) * bs):.4f}")
            bar.update()
        bar.close()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UserInputError(f"the weights became NaN or infinite in epoch {epoch + 1}: training diverged; "
                                 "lower --lr or the defense's loss weights")
        entry = {"epoch": epoch + 1, "loss": total_loss / n, "train_acc": accuracy(model, x, y),
                 "lr": learning_rate(config, epoch * steps_per_epoch, total_steps), **defense.schedule(),
                 "seconds": round(time.perf_counter() - began, 2)}
        if on_epoch_end is not None:
            on_epoch_end(model, entry)
        history.append(entry)
        log.info("epoch %d/%d %s", epoch + 1, config.epochs,
                 " ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "epoch"))
        if ckpt is not None:
            save_checkpoint(ckpt, model, optimizer, defense, epoch + 1, history, fingerprint)
    model.eval()
    return history
