"""Coloured digits: a spurious-correlation benchmark (Sagawa et al. 2020, arXiv 1911.08731 / 2005.04345).

Construction (fully deterministic; numpy's frozen ``RandomState`` with a fixed seed per split):

1. Start from the grey digits of ``mnist5k`` or ``digits`` (:mod:`.embedded`). Their stratified
   train split is carved again, 80% "train" / 20% "val" (stratified by digit, ``random_state=0``);
   "test" is the base test split. mnist5k gives 3,200 / 800 / 1,000, digits 1,149 / 288 / 360.
2. Label: ``y = 1 if digit >= 5 else 0`` (binary). The ``-10`` variants keep the ten digits.
3. Colour: there are as many colours as classes; colour ``c`` is the one *aligned* with class ``c``
   (binary: 0 = red, 1 = green). In "train" and "val", within each class, exactly
   ``round(5% of the class)`` images, chosen at random, take a uniformly drawn non-aligned colour
   and the rest (95%) take the aligned one. In "test", colour is independent of the label: within
   each class the colours are dealt out in equal shares (binary: 50% / 50%).
4. Image: the grey digit times the colour's RGB vector, so (3, H, W) in [0, 1]; the stroke
   shape carries the label, the colour carries the spurious cue.
5. Groups: (class, colour), ``group = class * n_colours + colour``, named like ``"y=0,red"``.
   Binary: 4 groups; the minority groups (y=0,green) and (y=1,red) are 5% of train and 50% of test,
   so a model that learns colour has a high average and a low worst-group accuracy.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .dataset import Dataset
from .embedded import grey_split
from .registry import register_dataset

log = logging.getLogger(__name__)

TRAIN_AGREEMENT = 0.95
PALETTE: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("red", (1.0, 0.0, 0.0)),
    ("green", (0.0, 1.0, 0.0)),
    ("blue", (0.0, 0.0, 1.0)),
    ("yellow", (1.0, 1.0, 0.0)),
    ("magenta", (1.0, 0.0, 1.0)),
    ("cyan", (0.0, 1.0, 1.0)),
    ("white", (1.0, 1.0, 1.0)),
    ("orange", (1.0, 0.5, 0.0)),
    ("purple", (0.5, 0.0, 1.0)),
    ("pink", (1.0, 0.5, 0.75)),
)
_SEEDS = {"train": 20201, "val": 20202, "test": 20203}
_ROWS = {"train": "fit", "val": "val", "test": "test"}  # which embedded split rows each split uses


def assign_colours(labels: np.ndarray, num_classes: int, agreement: float | None, seed: int) -> np.ndarray:
    """Colour index (N,) per example: ``agreement`` of each class aligned (colour == class), the rest
    a random other colour; ``agreement=None``: colours dealt out in equal shares within each class."""
    rng = np.random.RandomState(seed)
    colours = np.empty(len(labels), dtype=np.int64)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        if agreement is None:
            colours[members] = (np.arange(len(members)) + rng.randint(num_classes)) % num_classes
        else:
            n_off = int(round((1.0 - agreement) * len(members)))
            colours[members] = c
            colours[members[:n_off]] = (c + rng.randint(1, num_classes, size=n_off)) % num_classes
    return colours


def colored(base: str, split: str, binary: bool) -> Dataset:
    """Split ``split`` of the coloured version of embedded dataset ``base`` (see module docstring)."""
    grey, digit, base_info = grey_split(base, _ROWS[split])
    num_classes = 2 if binary else 10
    y = (digit >= 5).long() if binary else digit
    agreement = None if split == "test" else TRAIN_AGREEMENT
    colour = torch.from_numpy(assign_colours(y.numpy(), num_classes, agreement, _SEEDS[split]))
    rgb = torch.tensor([rgb for _, rgb in PALETTE[:num_classes]], dtype=torch.float32)
    x = grey * rgb[colour][:, :, None, None]  # (N, 1, H, W) * (N, 3, 1, 1) -> (N, 3, H, W)
    names = [name for name, _ in PALETTE[:num_classes]]
    group_names = [f"y={c},{names[k]}" for c in range(num_classes) for k in range(num_classes)]
    measured = float((colour == y).double().mean()) if len(y) else float("nan")
    label_rule = "y = digit >= 5" if binary else "y = digit"
    name = f"colored-{base}" + ("" if binary else "-10")
    info = {
        "source": f"{base} ({base_info['source']}), tinted; construction in robustbench_lite.data.colored",
        "license": base_info["license"],
        "split_rule": (
            f"{split} = {base}'s '{_ROWS[split]}' rows (train is carved 80/20 into train/val, stratified, "
            f"random_state=0); {label_rule}; colour agrees with the label for "
            + ("colours dealt out evenly per class (independent of the label)" if split == "test"
               else f"{TRAIN_AGREEMENT:.0%} of each class")
            + f"; RandomState({_SEEDS[split]})"
        ),
        "split_sha256": base_info["split_sha256"],
        "colour_label_agreement": measured,
        "palette": {n: list(rgb) for n, rgb in PALETTE[:num_classes]},
    }
    return Dataset(
        name=name, split=split, x=x, y=y, num_classes=num_classes,
        groups=y * num_classes + colour, group_names=group_names, info=info,
    )


_SPLITS = ("train", "val", "test")


@register_dataset("colored-mnist5k", _SPLITS, "mnist5k tinted red/green, digit>=5 label; colour agrees 95% train, 50% test")
def load_colored_mnist5k(split: str, data_dir: Path, download: bool) -> Dataset:
    return colored("mnist5k", split, binary=True)


@register_dataset("colored-digits", _SPLITS, "digits tinted red/green, digit>=5 label; colour agrees 95% train, 50% test")
def load_colored_digits(split: str, data_dir: Path, download: bool) -> Dataset:
    return colored("digits", split, binary=True)


@register_dataset("colored-mnist5k-10", _SPLITS, "mnist5k with ten colours, one per digit; 95% aligned in train, 10% in test")
def load_colored_mnist5k_10(split: str, data_dir: Path, download: bool) -> Dataset:
    return colored("mnist5k", split, binary=False)
