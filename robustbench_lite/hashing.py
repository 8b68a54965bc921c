"""Every sha256 the package computes: of files, JSON data, tensors, index lists, state dicts, arrays.

One module so that a record's code fingerprint (:func:`robustbench_lite.leaderboard.protocol.code_files`) follows
these few functions, not the registry code that happened to hold them. Each digest is hex and covers
what makes two inputs different (dtype and shape as well as bytes, where they apply).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """sha256 of bytes in memory (equal to :func:`file_sha256` of a file holding them)."""
    return hashlib.sha256(data).hexdigest()


def sha256_json(data: Any) -> str:
    """sha256 of ``data`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensors_sha256(named: Iterable[tuple[str | None, Tensor]]) -> str:
    """sha256 over ``(name, tensor)`` pairs in order: ``name|`` (when not None), ``dtype|shape|``, the bytes
    (bfloat16 as float32)."""
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{'' if name is None else name + '|'}{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def dataset_sha256(x: Tensor, y: Tensor) -> str:
    """sha256 of an evaluated subset's image and label tensors (dtype, shape and bytes)."""
    return tensors_sha256([(None, x), (None, y)])


def indices_sha256(indices: Tensor | Sequence[int]) -> str:
    """sha256 of the ASCII, comma-separated decimal indices in evaluation order."""
    idx = indices.tolist() if torch.is_tensor(indices) else list(indices)
    return hashlib.sha256(",".join(str(int(i)) for i in idx).encode("ascii")).hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 of the parameters and buffers (name, dtype, shape, bytes in key order)."""
    return tensors_sha256(model.state_dict().items())


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes of named arrays (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


__all__ = ["arrays_sha256", "bytes_sha256", "dataset_sha256", "file_sha256", "indices_sha256", "sha256_json", "state_dict_sha256",
           "tensors_sha256"]
