"""MNIST, CIFAR-10 and CIFAR-100 through torchvision's own dataset classes.

Files are read from ``data_dir`` (see :func:`.registry.default_data_dir`) in torchvision's layout:
``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``, ``cifar-10-batches-py/`` (data_batch_1..5,
test_batch, batches.meta) and ``cifar-100-python/`` (train, test, meta). Nothing is downloaded
unless ``download=True`` (``--download`` on the CLI); otherwise missing or corrupted files raise
one :class:`DatasetNotFoundError` line saying where the files go.

Security note: torchvision's CIFAR reader unpickles the batch files (after checking their md5s
against the official archive's). Pickle can run code, so only point ``data_dir`` at files you
downloaded yourself or through torchvision.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch

from robustbench_lite.errors import DatasetNotFoundError

from .dataset import Dataset
from .registry import register_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchvisionSource:
    """A torchvision dataset class, where its files live under the root, and what they are."""

    name: str
    class_name: str
    folder: str  # relative to data_dir
    files: str  # human-readable list of expected files
    num_classes: int
    info: dict


SOURCES = {
    "mnist": TorchvisionSource(
        "mnist", "MNIST", "MNIST/raw",
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte",
        10,
        {"source": "MNIST (LeCun, Cortes & Burges) via torchvision.datasets.MNIST",
         "license": "CC BY-SA 3.0"},
    ),
    "cifar10": TorchvisionSource(
        "cifar10", "CIFAR10", "cifar-10-batches-py",
        "data_batch_1..data_batch_5, test_batch, batches.meta",
        10,
        {"source": "CIFAR-10 (Krizhevsky 2009) via torchvision.datasets.CIFAR10",
         "license": "no explicit license; cite Krizhevsky 2009, 'Learning Multiple Layers of Features from Tiny Images'"},
    ),
    "cifar100": TorchvisionSource(
        "cifar100", "CIFAR100", "cifar-100-python",
        "train, test, meta",
        100,
        {"source": "CIFAR-100 (Krizhevsky 2009) via torchvision.datasets.CIFAR100 (fine labels)",
         "license": "no explicit license; cite Krizhevsky 2009, 'Learning Multiple Layers of Features from Tiny Images'"},
    ),
}


def _open(source: TorchvisionSource, split: str, data_dir: Path, download: bool):
    from torchvision import datasets

    cls = getattr(datasets, source.class_name)
    where = data_dir / source.folder
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):  # torchvision prints download progress
            return cls(root=str(data_dir), train=(split == "train"), download=download)
    except (RuntimeError, URLError, OSError) as exc:
        if download:
            raise DatasetNotFoundError(
                f"{source.name}: download into {where} failed ({str(exc).strip().splitlines()[0]}); "
                f"put {source.files} there by hand or retry when online"
            ) from None
        raise DatasetNotFoundError(
            f"{source.name} {split} files not found or corrupted in {where}: put {source.files} there, "
            "or pass --download (download=True) to fetch them"
        ) from None
    finally:
        if captured.getvalue().strip():
            log.info("torchvision: %s", captured.getvalue().strip())


def _to_dataset(source: TorchvisionSource, split: str, data_dir: Path, tv) -> Dataset:
    data = tv.data
    if torch.is_tensor(data):  # MNIST: uint8 (N, H, W)
        x = data.unsqueeze(1).to(torch.float32) / 255.0
    else:  # CIFAR: uint8 numpy (N, H, W, C)
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(data).transpose(0, 3, 1, 2))).to(torch.float32) / 255.0
    y = torch.as_tensor(np.asarray(tv.targets), dtype=torch.int64)
    info = dict(source.info, files=str(data_dir / source.folder),
                split_rule=f"the official {split} split, in file order")
    return Dataset(name=source.name, split=split, x=x, y=y, num_classes=source.num_classes, info=info)


def _load(name: str, split: str, data_dir: Path, download: bool) -> Dataset:
    source = SOURCES[name]
    return _to_dataset(source, split, data_dir, _open(source, split, data_dir, download))


@register_dataset("mnist", ("train", "test"), "MNIST via torchvision (60,000 / 10,000); needs files or --download")
def load_mnist(split: str, data_dir: Path, download: bool) -> Dataset:
    return _load("mnist", split, data_dir, download)


@register_dataset("cifar10", ("train", "test"), "CIFAR-10 via torchvision (50,000 / 10,000); needs files or --download")
def load_cifar10(split: str, data_dir: Path, download: bool) -> Dataset:
    return _load("cifar10", split, data_dir, download)


@register_dataset("cifar100", ("train", "test"), "CIFAR-100 via torchvision (50,000 / 10,000); needs files or --download")
def load_cifar100(split: str, data_dir: Path, download: bool) -> Dataset:
    return _load("cifar100", split, data_dir, download)
