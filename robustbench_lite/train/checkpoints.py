"""The resumable per-epoch checkpoint: one safetensors file (model, optimizer and defense tensors) with the
log and the optimizer's settings as JSON metadata; no pickle."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_lite.atomic import atomic_write_bytes
from robustbench_lite.defenses import Defense
from robustbench_lite.errors import CheckpointError, UserInputError

from .config import _META_KEY, TrainConfig

log = logging.getLogger(__name__)

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
