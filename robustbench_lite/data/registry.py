"""Dataset names -> loaders, and :func:`load_dataset`, the one door to every dataset.

A third-party package adds a dataset through the entry-point group ``robustbench_lite.datasets``,
pointing at a :class:`DatasetSpec` (or at a callable ``(split, data_dir, download) -> Dataset``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from robustbench_lite.errors import UserInputError
from robustbench_lite.plugins import Registry

from .dataset import Dataset

log = logging.getLogger(__name__)

Loader = Callable[[str, Path, bool], Dataset]
DATASETS: Registry["DatasetSpec"] = Registry("dataset", "robustbench_lite.datasets")
BUILTIN_NAMES: list[str] = []
DEFAULT_DATASET = "mnist5k"


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its splits, a one-line summary, and ``load(split, data_dir, download)``."""

    name: str
    splits: tuple[str, ...]
    summary: str
    load: Loader

    def __call__(self, split: str, data_dir: Path, download: bool) -> Dataset:
        return self.load(split, data_dir, download)


def register_dataset(name: str, splits: tuple[str, ...], summary: str) -> Callable[[Loader], Loader]:
    """Decorator: register ``load(split, data_dir, download) -> Dataset`` under ``name``."""

    def add(load: Loader) -> Loader:
        DATASETS.register(name, DatasetSpec(name, tuple(splits), summary, load))
        BUILTIN_NAMES.append(name)
        return load

    return add


def default_data_dir() -> Path:
    """``$RBL_DATA_DIR``, else ``~/.cache/robustbench-lite/data``: where downloaded datasets live."""
    if os.environ.get("RBL_DATA_DIR"):
        return Path(os.environ["RBL_DATA_DIR"]).expanduser()
    return Path.home() / ".cache" / "robustbench-lite" / "data"


def dataset_names() -> list[str]:
    """Every dataset name, built-in and from plug-ins."""
    return DATASETS.names()


def load_dataset(
    name: str = DEFAULT_DATASET,
    split: str = "test",
    data_dir: str | Path | None = None,
    download: bool = False,
) -> Dataset:
    """Load split ``split`` of dataset ``name`` as a checked :class:`Dataset`.

    ``data_dir`` holds datasets read through torchvision (default :func:`default_data_dir`);
    ``download=True`` fetches them when missing. The embedded datasets never download.

    >>> load_dataset("mnist5k", "test").x.shape
    torch.Size([1000, 1, 28, 28])
    """
    if not isinstance(name, str):
        raise UserInputError(f"dataset name must be a string, got {type(name).__name__}")
    spec = DATASETS.get(name)
    if not isinstance(split, str):
        raise UserInputError(f"split must be a string, got {type(split).__name__}")
    split = split.lower()
    splits = getattr(spec, "splits", None)
    if splits is not None and split not in splits:
        raise UserInputError(f"dataset {name!r} has no split {split!r}: choose one of {', '.join(splits)}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    dataset = spec(split, root, bool(download))
    if not isinstance(dataset, Dataset):
        raise UserInputError(f"dataset plug-in {name!r} returned {type(dataset).__name__}, not a robustbench_lite Dataset")
    log.info("loaded %r", dataset)
    return dataset
