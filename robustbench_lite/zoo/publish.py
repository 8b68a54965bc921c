"""Add a trained model to the zoo: ``python -m robustbench_lite.zoo.publish DIR/NAME.safetensors``.

Copies the weights written by ``robustbench-lite train`` into ``zoo/weights/`` and its card
(``DIR/NAME.card.json``) into ``zoo/cards.json``, after checking that the card's sha256 matches the
file. ``robustbench-lite train --register`` does the same at the end of a run.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from robustbench_lite.atomic import atomic_write
from robustbench_lite.errors import CheckpointError, RobustBenchLiteError, UserInputError
from robustbench_lite.hashing import file_sha256

from .cards import WEIGHTS_DIR, ZOO_DIR, read_cards, read_json, write_cards
from .loading import CARD_SUFFIX

log = logging.getLogger(__name__)


def publish(weights: str | os.PathLike, *, zoo_dir: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Register ``weights`` (with its sibling ``.card.json``) in ``zoo_dir``; returns the card."""
    weights = Path(weights)
    if not weights.name.endswith(".safetensors"):
        raise UserInputError(f"{weights}: the zoo ships .safetensors weights only")
    name = weights.name[: -len(".safetensors")]
    card_path = weights.with_name(name + CARD_SUFFIX)
    if not weights.is_file() or not card_path.is_file():
        raise UserInputError(f"publish needs {weights} and its card {card_path}; train with robustbench-lite train")
    card = read_json(card_path)
    if file_sha256(weights) != card.get("weights_sha256"):
        raise CheckpointError(f"{weights}: sha256 does not match its card {card_path.name}")
    zoo_dir = Path(zoo_dir or ZOO_DIR)
    cards = read_cards(zoo_dir)
    if name in cards and not overwrite and cards[name].get("weights_sha256") != card["weights_sha256"]:
        raise UserInputError(f"zoo model {name!r} exists with other weights; pass --overwrite to replace it")
    with open(weights, "rb") as source:
        atomic_write(zoo_dir / WEIGHTS_DIR / weights.name, lambda target: shutil.copyfileobj(source, target))
    card = {**card, "name": name, "weights": weights.name}
    cards[name] = card
    write_cards(cards, zoo_dir)
    log.info("published %s to %s", name, zoo_dir)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robustbench_lite.zoo.publish", description=__doc__.splitlines()[0])
    parser.add_argument("weights", help="DIR/NAME.safetensors written by robustbench-lite train")
    parser.add_argument("--zoo-dir", default=None, help="zoo folder (default: the installed package's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a zoo model of the same name")
    args = parser.parse_args(argv)
    try:
        card = publish(args.weights, zoo_dir=args.zoo_dir, overwrite=args.overwrite)
    except RobustBenchLiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"published {card['name']} (clean_acc {card.get('clean_acc')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
