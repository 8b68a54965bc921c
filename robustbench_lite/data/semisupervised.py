"""Semi-supervised views of a labeled train split, for robust self-training (Carmon et al. 2019, arXiv 1905.13736).

``mnist5k-ssl``: mnist5k's 4,000 train rows cut into a **labeled** part (1,000, stratified by digit:
100 per class) and an **unlabeled** part (the other 3,000), with scikit-learn's
``train_test_split(stratify=digit, random_state=0)``. As in every semi-supervised benchmark with a
stratified labeled subset, the stratification is the one place the labels of all rows are read: it
decides which rows are labeled. From there on the unlabeled part's labels are withheld:

- ``load_dataset("mnist5k-ssl", "train")``: the 1,000 labeled examples (a :class:`Dataset`);
  ``"test"``: mnist5k's test split.
- :func:`unlabeled_images` ``("mnist5k-ssl")``: an :class:`UnlabeledImages` (images and indices, no
  labels); this is all a training run gets of the unlabeled part.
- :func:`withheld_labels` ``("mnist5k-ssl")``: the withheld labels, for reporting only (e.g. the
  accuracy of pseudo-labels); no training code calls it.

Indices are positions in mnist5k's train split, so labeled and unlabeled indices are disjoint and a
pool of both keeps one per-example seed per image. ``info`` fingerprints both parts' rows
(``labeled_sha256``, ``unlabeled_sha256``) and never holds anything computed from withheld labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustbench_lite.errors import UserInputError

from .dataset import Dataset
from .embedded import SOURCES, source_arrays, split_fingerprint
from .registry import load_dataset, register_dataset

SSL_SPLIT_RULE = "sklearn-train_test_split-stratified-labeled-rs{seed}-v1"


@dataclass(frozen=True)
class UnlabeledImages:
    """The unlabeled part of a semi-supervised view: ``x`` (M, C, H, W) float32 in [0, 1] and
    ``indices`` (M,) int64 (positions in the base train split). There is no label field."""

    name: str
    x: Tensor
    indices: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.indices.shape != (self.x.shape[0],):
            raise UserInputError(f"unlabeled images need x (M, C, H, W) and indices (M,), got "
                                 f"{tuple(self.x.shape)} and {tuple(self.indices.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class SemiSupervisedSpec:
    """A labeled train split cut into ``n_labeled`` labeled rows (stratified, ``seed``) and the rest."""

    name: str
    base: str
    n_labeled: int
    seed: int = 0


SSL_VIEWS: dict[str, SemiSupervisedSpec] = {"mnist5k-ssl": SemiSupervisedSpec("mnist5k-ssl", "mnist5k", 1000)}


def stratified_labeled_positions(labels: np.ndarray, n_labeled: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labeled, unlabeled) positions into ``labels`` (N,), each sorted: ``n_labeled`` rows drawn with the
    class proportions of ``labels`` (scikit-learn's stratified split, ``random_state=seed``)."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    if not 0 < int(n_labeled) < n:
        raise UserInputError(f"n_labeled must lie in 1..{n - 1}, got {n_labeled}")
    labeled, unlabeled = train_test_split(np.arange(n), train_size=int(n_labeled), stratify=labels,
                                          random_state=int(seed))
    return np.sort(labeled).astype(np.int64), np.sort(unlabeled).astype(np.int64)


def _spec(name: str) -> SemiSupervisedSpec:
    spec = SSL_VIEWS.get(str(name).lower())
    if spec is None:
        raise UserInputError(f"{name!r} is not a semi-supervised dataset (one with an unlabeled part): "
                             f"choose one of {', '.join(SSL_VIEWS)}")
    return spec


def _parts(spec: SemiSupervisedSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Base train images (uint8), labels, labeled and unlabeled positions, and the shared info."""
    arrays = source_arrays(spec.base)
    rows = arrays["train"]
    images, labels = arrays["images"][rows], arrays["labels"][rows]
    labeled, unlabeled = stratified_labeled_positions(labels, spec.n_labeled, spec.seed)
    source = SOURCES[spec.base]
    info = {
        "source": f"{spec.base} train split ({source.info['source']})", "license": source.info["license"],
        "split_rule": (f"{spec.base}'s {len(rows)} train rows -> {len(labeled)} labeled (stratified by label, "
                       f"sklearn train_test_split(train_size={spec.n_labeled}, random_state={spec.seed})) + "
                       f"{len(unlabeled)} unlabeled (labels withheld); indices are positions in {spec.base}'s train split"),
        "ssl_rule": SSL_SPLIT_RULE.format(seed=spec.seed),
        "base_split_sha256": split_fingerprint(rows),
        "labeled_sha256": split_fingerprint(labeled), "unlabeled_sha256": split_fingerprint(unlabeled),
    }
    return images, labels, labeled, unlabeled, info


def _scaled(images: np.ndarray, base: str) -> Tensor:
    return torch.from_numpy(images.astype(np.float32)) / SOURCES[base].scale


def unlabeled_images(name: str) -> UnlabeledImages:
    """The unlabeled part of semi-supervised dataset ``name`` (images and indices only)."""
    spec = _spec(name)
    images, _labels, _labeled, unlabeled, info = _parts(spec)
    return UnlabeledImages(name=spec.name, x=_scaled(images[unlabeled], spec.base),
                           indices=torch.from_numpy(unlabeled), info=info)


def withheld_labels(name: str) -> Tensor:
    """The labels the loader withholds, (M,) int64 in the order of :func:`unlabeled_images`.
    For reporting (pseudo-label accuracy) only: a training run never calls this."""
    spec = _spec(name)
    _images, labels, _labeled, unlabeled, _info = _parts(spec)
    return torch.from_numpy(labels[unlabeled].astype(np.int64))


def labeled_split(name: str) -> Dataset:
    """The labeled part of semi-supervised dataset ``name`` as a Dataset (split "train")."""
    spec = _spec(name)
    images, labels, labeled, _unlabeled, info = _parts(spec)
    return Dataset(name=spec.name, split="train", x=_scaled(images[labeled], spec.base),
                   y=torch.from_numpy(labels[labeled].astype(np.int64)), num_classes=10,
                   indices=torch.from_numpy(labeled), info=info)


@register_dataset("mnist5k-ssl", ("train", "test"),
                  "mnist5k for semi-supervised training: 1,000 labeled train images (+ 3,000 unlabeled, "
                  "labels withheld); test = mnist5k's")
def load_mnist5k_ssl(split: str, data_dir: Path, download: bool) -> Dataset:
    if split == "train":
        return labeled_split("mnist5k-ssl")
    test = load_dataset("mnist5k", "test")
    return Dataset(name="mnist5k-ssl", split="test", x=test.x, y=test.y, num_classes=test.num_classes,
                   indices=test.indices, info={**test.info, "note": "mnist5k's test split"})
