"""``load_model``: a zoo name, a state-dict file (+ architecture), a TorchScript file or a factory.

Zoo weights are checked twice (the trap of weights that load "successfully" but wrongly):
the sha256 of the file against the card BEFORE anything is read, and after loading the number of
correctly classified examples among the first 200 test images of the card's dataset (more than one
example off is an error). The returned model is in eval mode.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_lite.errors import CheckpointError, UserInputError, first_line
from robustbench_lite.hashing import file_sha256

from . import architectures
from .cards import (VERIFY_EXAMPLES, VERIFY_TOLERANCE, WEIGHTS_DIR, ZOO_DIR, check_card, normalization_of,
                    parameter_count, read_cards, read_json)
from .robustbench_archs import ARCHITECTURES as ROBUSTBENCH_ARCHITECTURES
from .robustbench_archs import from_state as robustbench_from_state
from .checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, is_torchscript, load_state_dict_strict, read_state_dict

log = logging.getLogger(__name__)

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
CARD_SUFFIX = ".card.json"


@dataclass
class ModelInfo:
    """What was loaded: ``source`` is one of "zoo", "state_dict", "torchscript", "factory"."""

    name: str
    architecture: str
    defense: str | None
    dataset: str | None
    weights_sha256: str | None
    parameter_count: int
    normalization: dict[str, list[float]] | None
    source: str
    card: dict[str, Any] | None = None


def count_correct(model: nn.Module, dataset_name: str, n_examples: int = VERIFY_EXAMPLES,
                  device: str | torch.device = "cpu") -> int:
    """Correctly classified examples among the first ``n_examples`` of ``dataset_name``'s test split."""
    from robustbench_lite.data import load_dataset

    sample = load_dataset(dataset_name, "test")
    n = min(n_examples, len(sample))
    x, y = sample.x[:n].to(device), sample.y[:n].to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = int((model(x).argmax(dim=1) == y).sum())
    model.train(was_training)
    return correct


def _verify_accuracy(model: nn.Module, card: dict[str, Any], source: str, device: str | torch.device) -> None:
    check = card.get("verification")
    if not check:
        raise CheckpointError(f"{source}: the model card has no 'verification' entry to check the weights against")
    correct = count_correct(model, card["dataset"], int(check["n_examples"]), device)
    if abs(correct - int(check["correct"])) > VERIFY_TOLERANCE:
        raise CheckpointError(
            f"{source}: weights load but are wrong: {correct}/{check['n_examples']} of the first {card['dataset']} "
            f"test images are classified correctly, the model card says {check['correct']}"
        )


def _verify_sha(path: Path, card: dict[str, Any], source: str) -> str:
    if not path.is_file():
        raise CheckpointError(f"{source}: weights file {path} is missing; reinstall the package")
    digest = file_sha256(path)
    if digest != card.get("weights_sha256"):
        raise CheckpointError(
            f"{source}: sha256 of {path.name} is {digest[:12]}..., the model card says "
            f"{str(card.get('weights_sha256'))[:12]}...: the file was changed or damaged"
        )
    return digest


def _from_card(path: Path, card: dict[str, Any], source: str, name: str, device: str | torch.device,
               verify: bool, kind: str) -> tuple[nn.Module, ModelInfo]:
    digest = _verify_sha(path, card, source)  # before a byte of the file is parsed
    arch = card["architecture"]
    model = architectures.build(arch, num_classes=int(card.get("num_classes", 10)))
    load_state_dict_strict(model, read_state_dict(path), source, arch)
    model.to(device).eval()
    if verify:
        _verify_accuracy(model, card, source, device)
    info = ModelInfo(name=name, architecture=arch, defense=card.get("defense"), dataset=card.get("dataset"),
                     weights_sha256=digest, parameter_count=parameter_count(model),
                     normalization=normalization_of(model), source=kind, card=card)
    return model, info


def _from_file(path: Path, arch: str | None, device: str | torch.device, verify: bool) -> tuple[nn.Module, ModelInfo]:
    if is_torchscript(path):
        if arch is not None:
            raise UserInputError(f"{path} is a TorchScript file and carries its own architecture; drop arch={arch!r}")
        try:
            with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; loading still works
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(str(path), map_location=device)
        except Exception as exc:  # a damaged archive fails in torch's C++ reader with any of its exception types
            raise CheckpointError(f"{path} is not a loadable TorchScript file ({first_line(exc)})") from None
        model.eval()
        info = ModelInfo(name=path.stem, architecture=f"torchscript:{getattr(model, 'original_name', 'Module')}",
                         defense=None, dataset=None, weights_sha256=file_sha256(path),
                         parameter_count=parameter_count(model), normalization=normalization_of(model),
                         source="torchscript")
        return model, info
    name = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.stem
    card_path = path.with_name(name + CARD_SUFFIX)
    card = check_card(read_json(card_path), str(card_path)) if card_path.is_file() else None
    if card is not None and arch in (None, card["architecture"]):
        # a file written by `robustbench-lite train`: its card gives the architecture and the checks
        return _from_card(path, card, str(path), name, device, verify, "state_dict")
    if arch is None:
        raise UserInputError(
            f"{path} is a state dict: name its architecture (arch=..., --arch; one of {', '.join(sorted(architectures.ARCHITECTURES))})"
        )
    state = read_state_dict(path)
    head = [v for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    num_classes = int(head[-1].shape[0]) if head else 10
    if arch in ROBUSTBENCH_ARCHITECTURES:  # RobustBench's keys and optional parts, as the file has them
        model, state = robustbench_from_state(arch, state, num_classes)
    else:
        model = architectures.build(arch, num_classes=num_classes)
    load_state_dict_strict(model, state, str(path), arch)
    model.to(device).eval()
    info = ModelInfo(name=name, architecture=arch, defense=None, dataset=None, weights_sha256=file_sha256(path),
                     parameter_count=parameter_count(model), normalization=normalization_of(model), source="state_dict")
    return model, info


def _from_factory(reference: str, device: str | torch.device) -> tuple[nn.Module, ModelInfo]:
    module_name, _, attr = reference.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise UserInputError(f"cannot import model factory {reference!r}: {exc}") from None
    if not callable(obj):
        raise UserInputError(f"model factory {reference!r} is not callable")
    try:
        model = obj()
    except (Exception, SystemExit) as exc:  # user code: report it on one line instead of a traceback or an exit
        raise UserInputError(f"model factory {reference!r} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserInputError(f"model factory {reference!r} returned {type(model).__name__}, not a torch.nn.Module")
    model.to(device).eval()
    info = ModelInfo(name=reference, architecture=reference, defense=None, dataset=None, weights_sha256=None,
                     parameter_count=parameter_count(model), normalization=normalization_of(model), source="factory")
    return model, info


def load_model_with_info(name_or_path: str | os.PathLike, arch: str | None = None, *, device: str | torch.device = "cpu",
                         verify: bool = True, zoo_dir: str | os.PathLike | None = None) -> tuple[nn.Module, ModelInfo]:
    """Load a model in eval mode and say what it is.

    ``name_or_path``: a zoo name (see :func:`list_models`); a state-dict file (``.safetensors``, or
    ``.pt``/``.pth`` read with ``weights_only=True``) with ``arch``, or with the ``.card.json`` that
    ``robustbench-lite train`` writes next to it; a TorchScript file; or ``"package.module:factory"``.
    ``verify`` checks the clean accuracy sample of a carded model (its sha256 is always checked).
    """
    zoo_dir = Path(zoo_dir or ZOO_DIR)
    key = os.fspath(name_or_path)
    cards = read_cards(zoo_dir)
    if key in cards:
        if arch is not None and arch != cards[key]["architecture"]:
            raise UserInputError(f"zoo model {key!r} is a {cards[key]['architecture']}, not {arch!r}; drop arch")
        path = zoo_dir / WEIGHTS_DIR / cards[key]["weights"]
        return _from_card(path, cards[key], f"zoo model {key!r}", key, device, verify, "zoo")
    path = Path(key).expanduser()
    if path.exists():
        if not path.is_file():
            raise UserInputError(f"{path} is a folder, not a weights file")
        return _from_file(path, arch, device, verify)
    if _FACTORY.match(key):
        return _from_factory(key, device)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + (".ts", ".jit") or os.sep in key:
        raise CheckpointError(f"weights file {path} does not exist")
    raise UserInputError(
        f"unknown model {key!r}: not a zoo name ({', '.join(sorted(cards)) or 'the zoo is empty'}), "
        "not an existing file, not a package.module:factory reference"
    )


def load_model(name_or_path: str | os.PathLike, arch: str | None = None, *, device: str | torch.device = "cpu",
               verify: bool = True, zoo_dir: str | os.PathLike | None = None) -> nn.Module:
    """The model of :func:`load_model_with_info`, without the info."""
    return load_model_with_info(name_or_path, arch, device=device, verify=verify, zoo_dir=zoo_dir)[0]
