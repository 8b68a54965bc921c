"""The training loop behind ``robustbench-lite train``: any registered defense, resumable, deterministic.

``train(model, dataset, defense, config)`` minimises ``defense.loss(model, x, y, indices=, groups=,
epoch=, step=, steps_per_epoch=)`` over shuffled mini-batches. Every random draw of epoch ``e`` (shuffling, and any global
torch randomness a defense uses) is seeded from ``(seed, e)``, so a run resumed from its per-epoch
checkpoint ends with the same weights as an uninterrupted one. The checkpoint is one safetensors
file (model, optimizer and defense tensors) with the log and the optimizer's settings as JSON
metadata: no pickle. ``run(args)`` adds what the command line needs: data, model, the weights file
and the model card (see :mod:`robustbench_lite.zoo.cards`) with the exact command.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from robustbench_lite.atomic import atomic_write_bytes, atomic_write_text
from robustbench_lite.defenses import DEFENSES, Defense
from robustbench_lite.errors import CheckpointError, UserInputError, checked_int, checked_number
from robustbench_lite.seeding import mix

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


# --- resumable checkpoint ------------------------------------------------------------------------
def _fingerprint(model: nn.Module, dataset: Any, defense: Defense, config: TrainConfig) -> dict[str, Any]:
    return {"config": asdict(config), "defense": defense.name, "defense_config": defense.config(),
            "dataset": getattr(dataset, "name", None), "examples": len(dataset),
            "parameters": {k: list(v.shape) for k, v in model.state_dict().items()}}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, defense: Defense,
                    epochs_done: int, history: list[dict], fingerprint: dict) -> None:
    """Atomically write model, optimizer and defense state after ``epochs_done`` epochs."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    for key, value in defense.state_dict().items():
        tensors[f"defense.{key}"] = value.detach().cpu().contiguous().clone()
    meta = {"epochs_done": epochs_done, "history": history, "fingerprint": fingerprint,
            "optimizer_param_groups": opt["param_groups"], "optimizer_scalars": scalars}
    atomic_write_bytes(path, save(tensors, metadata={_META_KEY: json.dumps(meta)}))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, defense: Defense,
                    fingerprint: dict) -> tuple[int, list[dict]]:
    """Restore a checkpoint of the same run; returns (epochs done, history)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a training checkpoint of robustbench-lite ({exc})") from None
    if meta["fingerprint"] != json.loads(json.dumps(fingerprint)):
        raise UserInputError(f"{path} belongs to a run with other settings; resume with the same command or use a new --out")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    defense.load_state_dict({k[len("defense."):]: v for k, v in tensors.items() if k.startswith("defense.")})
    return int(meta["epochs_done"]), list(meta["history"])


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


# --- command line ----------------------------------------------------------------------------------
#: (flag, dest) of the loop's own options, in the order the recorded command lists them
_COMMON = [("--defense", "defense"), ("--dataset", "dataset"), ("--arch", "arch"), ("--epochs", "epochs"),
           ("--lr", "lr"), ("--lr-schedule", "lr_schedule"), ("--optimizer", "optimizer"),
           ("--momentum", "momentum"), ("--weight-decay", "weight_decay"), ("--batch-size", "batch_size"),
           ("--seed", "seed"), ("--device", "device"), ("--out", "out"), ("--name", "name"), ("--select", "select")]


SELECTION_RULES = ("worst-group-val",)


class WorstGroupSelection:
    """Model selection by worst-group accuracy on a validation split (Sagawa et al. 2020).

    Called after every epoch: records ``val_acc`` and ``val_worst_group_acc`` in the log entry and
    keeps the best weights so far in ``path`` (safetensors; the score and epoch in its metadata, so a
    resumed run continues the comparison). Ties keep the earlier epoch.
    """

    def __init__(self, val_set: Any, path: Path) -> None:
        if getattr(val_set, "groups", None) is None:
            raise UserInputError(f"--select worst-group-val needs a dataset with groups; {val_set.name!r} has none")
        self.val_set, self.path = val_set, Path(path)

    def best(self) -> tuple[float, int]:
        """(score, epoch) of the weights kept so far; (-1, 0) when none."""
        if not self.path.is_file():
            return -1.0, 0
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
        return float(meta.get("val_worst_group_acc", -1.0)), int(meta.get("epoch", 0))

    def __call__(self, model: nn.Module, entry: dict[str, Any]) -> None:
        from safetensors.torch import save

        from robustbench_lite.metrics import worst_group_accuracy

        device = next(model.parameters()).device
        x, y = self.val_set.x.to(device), self.val_set.y.to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            correct = torch.cat([model(x[i:i + 1000]).argmax(1) == y[i:i + 1000] for i in range(0, len(x), 1000)])
        model.train(was_training)
        metric = worst_group_accuracy(correct.cpu(), self.val_set.groups)
        entry["val_acc"], entry["val_worst_group_acc"] = metric["avg_acc"], metric["worst_group_acc"]
        if metric["worst_group_acc"] > self.best()[0]:
            tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            atomic_write_bytes(self.path, save(tensors, metadata={"val_worst_group_acc": repr(metric["worst_group_acc"]),
                                                                  "epoch": str(entry["epoch"])}))

    def restore_best(self, model: nn.Module) -> str:
        """Load the kept weights into ``model``; returns the rule as recorded in the model card."""
        from safetensors.torch import load_file

        score, epoch = self.best()
        model.load_state_dict(load_file(str(self.path)))
        return f"best worst-group accuracy on the validation split (epoch {epoch}, {score:.4f})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``robustbench-lite train``; each registered defense adds its own."""
    from robustbench_lite.cli import folder_text

    defaults = TrainConfig()
    parser.add_argument("--defense", default="standard", help=f"one of: {', '.join(DEFENSES.names())}")
    parser.add_argument("--dataset", default="mnist5k", help="embedded or local dataset name")
    parser.add_argument("--arch", default="mnist-cnn", help="zoo architecture name")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--lr-schedule", default=defaults.lr_schedule, choices=LR_SCHEDULES)
    parser.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS)
    parser.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, type=folder_text, help="folder for NAME.safetensors, NAME.card.json, NAME.ckpt.safetensors")
    parser.add_argument("--name", default=None, help="model name (default DATASET-ARCH-DEFENSE, e.g. mnist5k-cnn-pgd-at)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch checkpoint")
    parser.add_argument("--register", action="store_true", help="also add the model to the package's zoo")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--select", default=None, choices=SELECTION_RULES,
                        help="keep the epoch with the best worst-group accuracy on the validation split "
                             "(group DRO, Sagawa et al. 2020) instead of the last epoch")
    group = parser.add_argument_group("defense options")
    for name in DEFENSES.names():
        DEFENSES.get(name).add_arguments(group)


def default_name(dataset: str, arch: str, defense: str) -> str:
    """``mnist5k`` + ``mnist-cnn`` + ``pgd-at`` -> ``mnist5k-cnn-pgd-at``."""
    short = arch.split("-", 1)[1] if "-" in arch else arch
    return f"{dataset}-{short}-{defense}"


def training_command(args: argparse.Namespace, defense_cls: type[Defense]) -> str:
    """The full command (every option explicit, so later default changes cannot alter it)."""
    scratch = argparse.ArgumentParser(add_help=False)
    defense_cls.add_arguments(scratch)
    options = _COMMON + [(a.option_strings[-1], a.dest) for a in scratch._actions if a.option_strings]
    parts = ["robustbench-lite", "train"]
    for flag, dest in options:
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    """``robustbench-lite train``: train, write weights + card (+ checkpoint), optionally register."""
    from safetensors.torch import save

    from robustbench_lite import __version__
    from robustbench_lite.data import load_dataset
    from robustbench_lite.evaluation.core import resolve_device
    from robustbench_lite.hashing import bytes_sha256
    from robustbench_lite.zoo import architectures
    from robustbench_lite.zoo.cards import VERIFY_EXAMPLES, normalization_of, parameter_count

    defense_cls = DEFENSES.get(args.defense)
    if args.name is not None and not _PLAIN_NAME.fullmatch(args.name):
        raise UserInputError(f"--name must be letters, digits and . _ + - (a file name), got {args.name!r}")
    resolve_device(args.device)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                         optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
                         lr_schedule=args.lr_schedule)
    defense = defense_cls.from_args(args)
    train_set, test_set = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    def build_model() -> nn.Module:
        return architectures.build(args.arch, num_classes=train_set.num_classes)

    torch.manual_seed(args.seed)
    model = build_model()
    try:
        with torch.no_grad():
            model.eval()(train_set.x[:1])
    except RuntimeError:
        raise UserInputError(f"architecture {args.arch!r} does not take {args.dataset} images of shape "
                             f"{tuple(train_set.x.shape[1:])}") from None
    name = args.name or default_name(args.dataset, args.arch, defense.name)
    out = Path(args.out)  # created by the first write
    ckpt = out / f"{name}.ckpt.safetensors"
    if ckpt.exists() and not args.resume:
        raise UserInputError(f"{ckpt} exists: pass --resume to continue that run, or choose another --out or --name")
    command = training_command(args, defense_cls)
    log.info("training %s: %s", name, command)
    train_set = defense.prepare(train_set, build_model, device=args.device)
    selector = WorstGroupSelection(load_dataset(args.dataset, "val"), out / f"{name}.best.safetensors") \
        if args.select == "worst-group-val" else None
    history = train(model, train_set, defense, config, checkpoint=ckpt, resume=args.resume,
                    progress=not args.no_progress, device=args.device, on_epoch_end=selector)
    model_selection = "last epoch" if selector is None else selector.restore_best(model)
    model.cpu().eval()
    weights = out / f"{name}.safetensors"
    weights_bytes = save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata={"name": name})
    n_check = min(VERIFY_EXAMPLES, len(test_set))
    card = {
        "name": name, "architecture": args.arch, "dataset": args.dataset, "num_classes": train_set.num_classes,
        "input_shape": list(train_set.x.shape[1:]), "defense": defense.name, "defense_config": defense.config(),
        "additional_data": False,
        "training": {"command": command, **asdict(config), "train_examples": len(train_set),
                     "model_selection": model_selection, "log": history},
        "clean_acc": accuracy(model, test_set.x, test_set.y), "test_examples": len(test_set),
        "verification": {"split": "test", "n_examples": n_check,
                         "correct": round(accuracy(model, test_set.x[:n_check], test_set.y[:n_check]) * n_check)},
        "weights": weights.name, "weights_sha256": bytes_sha256(weights_bytes),
        "normalization": normalization_of(model), "parameter_count": parameter_count(model),
        "versions": {"robustbench_lite": __version__, "torch": torch.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    extra = defense.report(test_set)
    if extra:
        card["training"][defense.name] = extra
    atomic_write_bytes(weights, weights_bytes)  # the card is complete before either file is written
    atomic_write_text(out / f"{name}.card.json", json.dumps(card, indent=1) + "\n")
    log.info("%s: clean accuracy %.4f on %d %s test images; wrote %s", name, card["clean_acc"], len(test_set),
             args.dataset, weights)
    if args.register:
        from robustbench_lite.zoo.publish import publish

        publish(weights, overwrite=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m robustbench_lite.train`` (the same as ``robustbench-lite train``)."""
    import sys

    from robustbench_lite.errors import RobustBenchLiteError

    parser = argparse.ArgumentParser(prog="robustbench-lite train", description="train a model with a defense")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except RobustBenchLiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
