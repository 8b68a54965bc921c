"""``robustbench-lite train``: data, model, the loop, the weights file and the model card with the exact command."""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from robustbench_lite.atomic import atomic_write_bytes, atomic_write_text
from robustbench_lite.defenses import DEFENSES, Defense
from robustbench_lite.errors import UserInputError

from .config import _PLAIN_NAME, LR_SCHEDULES, OPTIMIZERS, TrainConfig
from .loop import accuracy, train
from .selection import SELECTION_RULES, WorstGroupSelection

log = logging.getLogger(__name__)

# --- command line ----------------------------------------------------------------------------------
#: (flag, dest) of the loop's own options, in the order the recorded command lists them
_COMMON = [("--defense", "defense"), ("--dataset", "dataset"), ("--arch", "arch"), ("--epochs", "epochs"),
           ("--lr", "lr"), ("--lr-schedule", "lr_schedule"), ("--optimizer", "optimizer"),
           ("--momentum", "momentum"), ("--weight-decay", "weight_decay"), ("--batch-size", "batch_size"),
           ("--seed", "seed"), ("--device", "device"), ("--out", "out"), ("--name", "name"), ("--select", "select")]



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
    from robustbench_lite.zoo.cards import (
        VERIFY_EXAMPLES,
        normalization_of,
        parameter_count,
    )

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

