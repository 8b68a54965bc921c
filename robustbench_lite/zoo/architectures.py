"""Architectures of the model zoo, by name. Every one is a plain ``nn.Sequential`` of layers the
certifiers support, with input normalization as its first layer (normalization belongs to the model,
never to the data, and is recorded in the model card).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError, checked_int

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
DIGITS_MEAN, DIGITS_STD = (0.3,), (0.38,)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; a per-channel affine map that certifiers propagate exactly."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], persistent: bool = True) -> None:
        """``persistent=False`` keeps mean and std out of the state dict (architectures whose checkpoints
        do not carry them)."""
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise UserInputError("Normalize needs one mean and one positive std per channel")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def mnist_cnn(num_classes: int = 10) -> nn.Sequential:
    """The small CNN of Wong & Kolter 2018 / Gowal et al. 2018: two strided convs, two linears."""
    return nn.Sequential(
        Normalize(MNIST_MEAN, MNIST_STD),
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def mnist_lenet(num_classes: int = 10) -> nn.Sequential:
    """Classic LeNet: two conv + max-pool blocks, two linear layers."""
    return nn.Sequential(
        Normalize(MNIST_MEAN, MNIST_STD),
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def digits_mlp(num_classes: int = 10) -> nn.Sequential:
    """A small MLP for the 1x8x8 scikit-learn digits."""
    return nn.Sequential(
        Normalize(DIGITS_MEAN, DIGITS_STD),
        nn.Flatten(),
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 32), nn.ReLU(),
        nn.Linear(32, num_classes),
    )


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mnist-cnn": mnist_cnn,
    "mnist-lenet": mnist_lenet,
    "digits-mlp": digits_mlp,
}


#: the most classes an architecture is built with (a head of that many logits is still small)
MAX_CLASSES = 100_000


def build(arch: str, **kwargs) -> nn.Module:
    """A fresh ``arch`` network; ``num_classes`` (optional) must be an integer from 1 to MAX_CLASSES."""
    try:
        factory = ARCHITECTURES[arch]
    except (KeyError, TypeError):
        raise UserInputError(f"unknown architecture {arch!r}: choose one of "
                             f"{', '.join(sorted(ARCHITECTURES))}") from None
    if "num_classes" in kwargs:
        kwargs["num_classes"] = checked_int("num_classes", kwargs["num_classes"], minimum=1, maximum=MAX_CLASSES)
    return factory(**kwargs)


# --- architectures for the defenses (WRM, group DRO) ---------------------------------------------------
def mnist_cnn_elu(num_classes: int = 10) -> nn.Sequential:
    """``mnist-cnn`` with ELU activations: the smooth network WRM's certificate needs (Sinha et al. 2018)."""
    return nn.Sequential(*[nn.ELU() if isinstance(layer, nn.ReLU) else layer for layer in mnist_cnn(num_classes)])


def colored_cnn(num_classes: int = 2) -> nn.Sequential:
    """``mnist-cnn`` on 3-channel 28x28 images (colored-mnist5k); MNIST's statistics on every channel."""
    layers = list(mnist_cnn(num_classes))
    layers[0] = Normalize(MNIST_MEAN * 3, MNIST_STD * 3)
    layers[1] = nn.Conv2d(3, 16, 4, stride=2, padding=1)
    return nn.Sequential(*layers)


def colored_digits_mlp(num_classes: int = 2) -> nn.Sequential:
    """``digits-mlp`` on 3-channel 8x8 images (colored-digits); the digits' statistics on every channel."""
    layers = list(digits_mlp(num_classes))
    layers[0] = Normalize(DIGITS_MEAN * 3, DIGITS_STD * 3)
    layers[2] = nn.Linear(3 * 64, 64)
    return nn.Sequential(*layers)


ARCHITECTURES["mnist-cnn-elu"] = mnist_cnn_elu
ARCHITECTURES["colored-cnn"] = colored_cnn
ARCHITECTURES["colored-digits-mlp"] = colored_digits_mlp


# --- RobustBench's standard CIFAR architectures -------------------------------------------
from .robustbench_archs import ARCHITECTURES as _ROBUSTBENCH  # noqa: E402 (needs Normalize above)

ARCHITECTURES.update(_ROBUSTBENCH)
