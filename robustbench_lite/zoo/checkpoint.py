"""Reading weight files without ever executing them, and loading them into an architecture strictly.

- ``.safetensors``: read by safetensors (no code path exists in the format).
- ``.pt`` / ``.pth`` / ``.bin``: ``torch.load(weights_only=True)``, which refuses any pickled object
  that is not a tensor or a container of tensors, so a hostile pickle is rejected, not run.
- TorchScript archives are recognised by their layout (a ``code/`` folder in the zip).

A state dict that does not fit its architecture (missing or unexpected keys, wrong shapes,
non-finite values) is a :class:`CheckpointError` that names the first few problems on one line.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

from robustbench_lite.errors import CheckpointError, first_line

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SHOWN = 3  # problems named per kind in a mismatch error


def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive (a zip with a ``code/`` folder or ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError):  # damaged names, versions
        return False
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` from what torch.load returned (``{"state_dict": ...}``, also next to other
    entries such as an epoch or optimizer state, and DataParallel's ``module.`` prefix are common
    wrappings and are undone)."""
    if isinstance(obj, dict) and not all(torch.is_tensor(v) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model", "last"):  # "last": some RobustBench files
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a weight file, on CPU. Never executes code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None
    if suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = next((line.split("WeightsUnpickler error:", 1)[1].strip() for line in str(exc).splitlines()
                           if "WeightsUnpickler error:" in line), "")
            if "GLOBAL" not in reason:  # no forbidden object, just bytes that are not a pickle
                raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (unpickling failed)") from None
            raise CheckpointError(
                f"{path} was refused: it holds pickled Python objects that are not tensors "
                "(loaded with weights_only=True, nothing was executed); save a plain state dict or use safetensors"
            ) from None
        except Exception as exc:  # damaged bytes fail inside torch's zip / legacy-tar readers with many types
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line(exc)})") from None
        return _unwrap(obj, path)
    raise CheckpointError(
        f"{path}: unknown weights format {suffix!r}; use .safetensors, or a state dict saved as .pt/.pth"
    )


def _names(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: str, arch: str) -> None:
    """Raise one CheckpointError line naming the first problems when ``state`` does not fit ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    kinds = [k for k, v in expected.items() if k in state and torch.is_floating_point(v)
             and not torch.is_floating_point(state[k])]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes (file vs model): {_names(shapes)}")
    if kinds:
        problems.append(f"non-float tensors: {_names(kinds)}")
    if problems:
        raise CheckpointError(f"{source} does not match architecture {arch!r}: " + "; ".join(problems))
    bad = [k for k, v in state.items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source} has NaN or infinite values in {_names(bad)}")


def load_state_dict_strict(model: nn.Module, state: dict[str, Tensor], source: str, arch: str) -> nn.Module:
    """Check ``state`` against ``model`` (see :func:`check_state_dict`), then copy it in."""
    check_state_dict(model, state, source, arch)
    model.load_state_dict(state, strict=True)
    return model
