"""Model cards: what a zoo model is, how it was trained and how to check that its weights are right.

A card is a plain JSON dict (one per model, all of them in ``cards.json`` next to this module)::

    name, architecture, dataset, num_classes, input_shape, defense, defense_config, additional_data,
    training {command, seed, epochs, optimizer, lr, lr_schedule, batch_size, weight_decay, log[...]},
    clean_acc (test split), verification {split, n_examples, correct},
    weights (file name), weights_sha256, normalization {mean, std}, parameter_count, versions

``verification`` is the trap check of :func:`robustbench_lite.zoo.load_model`: the number of the first
``n_examples`` test images the model classifies correctly; weights that load but compute something
else are caught by it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from robustbench_lite.atomic import atomic_write_text
from robustbench_lite.errors import CorruptFileError, short_repr

ZOO_DIR = Path(__file__).resolve().parent
CARDS_FILE = "cards.json"
WEIGHTS_DIR = "weights"
CARDS_FORMAT = 1
#: size of the accuracy sample checked after loading (first N test examples of the card's dataset)
VERIFY_EXAMPLES = 200
#: how many examples of that sample may differ (float noise across machines) before it is an error
VERIFY_TOLERANCE = 1


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def normalization_of(model: nn.Module) -> dict[str, list[float]] | None:
    """``{"mean": [...], "std": [...]}`` of the model's first ``Normalize`` layer (TorchScript too), or None."""
    for m in model.modules():
        kind = getattr(m, "original_name", None) or type(m).__name__
        if kind == "Normalize" and hasattr(m, "mean") and hasattr(m, "std"):
            return {"mean": [round(float(v), 6) for v in m.mean.flatten().tolist()],
                    "std": [round(float(v), 6) for v in m.std.flatten().tolist()]}
    return None


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} must hold a JSON object")
    return data


def read_cards(zoo_dir: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """All cards of a zoo folder, by model name (empty when it has no ``cards.json``), each checked."""
    path = Path(zoo_dir or ZOO_DIR) / CARDS_FILE
    if not path.exists():
        return {}
    data = read_json(path)
    models = data.get("models")
    if not isinstance(models, dict):
        raise CorruptFileError(f"{path} has no 'models' object")
    for name, card in models.items():
        check_card(card, f"{path} (model {name!r})")
        if not _plain_file_name(card.get("weights")):
            raise CorruptFileError(f"{path} (model {name!r}): model card field 'weights' must be a file name in "
                                   f"{WEIGHTS_DIR}/, got {short_repr(card.get('weights'))}")
    return models


def _plain_file_name(value: Any) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


#: the card fields the loader reads, what each must be, and how to say it
_CARD_FIELDS: dict[str, tuple[Any, str]] = {
    "architecture": (lambda v: isinstance(v, str) and bool(v), "an architecture name"),
    "dataset": (lambda v: isinstance(v, str) and bool(v), "a dataset name"),
    "num_classes": (lambda v: _count(v, 2), "an integer >= 2"),
    "weights_sha256": (lambda v: isinstance(v, str) and len(v) == 64, "a sha256 (64 hex digits)"),
    "verification": (lambda v: isinstance(v, dict) and _count(v.get("n_examples"), 1)
                     and _count(v.get("correct"), 0) and v["correct"] <= v["n_examples"],
                     "{split, n_examples >= 1, correct <= n_examples}"),
    "defense": (lambda v: v is None or isinstance(v, str), "a defense name or null"),
    "defense_config": (lambda v: isinstance(v, dict), "an object"),
}


def check_card(card: Any, source: str) -> dict[str, Any]:
    """``card`` when it is an object with the fields the loader reads, of the right types; else a
    CorruptFileError naming the first bad field (architecture, dataset, weights_sha256 and verification
    are required)."""
    if not isinstance(card, dict):
        raise CorruptFileError(f"{source}: a model card must be a JSON object, got {short_repr(card)}")
    for field, (ok, wanted) in _CARD_FIELDS.items():
        required = field in ("architecture", "dataset", "weights_sha256", "verification")
        if (field in card or required) and not ok(card.get(field)):
            raise CorruptFileError(f"{source}: model card field {field!r} must be {wanted}, "
                                   f"got {short_repr(card.get(field))}")
    return card


def write_cards(cards: dict[str, dict[str, Any]], zoo_dir: str | os.PathLike | None = None) -> None:
    path = Path(zoo_dir or ZOO_DIR) / CARDS_FILE
    data = {"format": CARDS_FORMAT, "models": dict(sorted(cards.items()))}
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def list_models(zoo_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One summary row per zoo model: name, dataset, architecture, defense, clean_acc, parameters, sha256."""
    rows = []
    for name, card in read_cards(zoo_dir).items():
        training = card.get("training", {})
        rows.append({
            "name": name,
            "dataset": card.get("dataset"),
            "architecture": card.get("architecture"),
            "defense": card.get("defense"),
            "clean_acc": card.get("clean_acc"),
            "parameter_count": card.get("parameter_count"),
            "epochs": training.get("epochs"),
            "weights_sha256": card.get("weights_sha256"),
            "command": training.get("command"),
        })
    return rows
