"""The corruptions threat model: determinism per example, ranges, severities, accuracy table."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from robustbench_lite.corruptions.ops import CORRUPTIONS, SEVERITIES, corrupt, corruption_accuracy
from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import example_seeds


def _digits(n: int, channels: int = 1) -> torch.Tensor:
    """Stroke-like images: a bright bar on a dark background, in [0, 1]."""
    g = torch.Generator().manual_seed(n)
    x = torch.zeros(n, channels, 28, 28)
    for i in range(n):
        r = int(torch.randint(6, 20, (1,), generator=g))
        x[i, :, r:r + 3, 5:23] = 0.6 + 0.4 * torch.rand(1, generator=g)
    return x


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_in_range_and_shape(name):
    x = _digits(4, channels=3 if name == "contrast" else 1)
    for severity in range(1, 6):
        out = corrupt(x, name, severity, example_seeds(0, range(4)))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1
        assert not torch.equal(out, x)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_severity_increases_the_damage(name):
    x = _digits(8)
    seeds = example_seeds(0, range(8))
    damage = [float((corrupt(x, name, s, seeds) - x).abs().mean()) for s in range(1, 6)]
    assert damage[4] > damage[0]
    assert sum(b >= a - 1e-4 for a, b in zip(damage, damage[1:])) >= 3


@settings(max_examples=6, deadline=None)
@given(perm_seed=st.integers(0, 1000), name=st.sampled_from(list(CORRUPTIONS)), severity=st.integers(1, 5))
def test_corruption_of_an_example_does_not_depend_on_its_batch(perm_seed, name, severity):
    x = _digits(6)
    seeds = example_seeds(7, [10, 11, 12, 13, 14, 15])
    whole = corrupt(x, name, severity, seeds)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(perm_seed))
    shuffled = corrupt(x[perm], name, severity, seeds[perm])
    assert torch.allclose(shuffled, whole[perm], atol=1e-6)
    alone = corrupt(x[2:3], name, severity, seeds[2:3])
    assert torch.allclose(alone, whole[2:3], atol=1e-6)


def test_random_corruptions_change_with_the_seed():
    x = _digits(2)
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "elastic"):
        a = corrupt(x, name, 3, example_seeds(0, [0, 1]))
        b = corrupt(x, name, 3, example_seeds(1, [0, 1]))
        assert not torch.equal(a, b), name


def test_corrupt_checks_its_arguments():
    x, seeds = _digits(2), example_seeds(0, [0, 1])
    with pytest.raises(UserInputError, match="unknown corruption"):
        corrupt(x, "fog", 1, seeds)
    with pytest.raises(UserInputError, match="severity"):
        corrupt(x, "jpeg", 6, seeds)
    with pytest.raises(UserInputError, match="one seed per example"):
        corrupt(x, "jpeg", 1, seeds[:1])
    with pytest.raises(UserInputError, match="float batch"):
        corrupt(x[0], "jpeg", 1, seeds)
    assert set(SEVERITIES) == set(CORRUPTIONS) and all(len(v) == 5 for v in SEVERITIES.values())


class _BarRow(nn.Module):
    """Predicts whether the bright bar is in the top (0) or bottom (1) half: robust to most noise."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.mean(dim=(1, 3))
        top, bottom = rows[:, :14].sum(1), rows[:, 14:].sum(1)
        return self.scale * torch.stack([top - bottom, bottom - top], dim=1)


def test_corruption_accuracy_table_and_batch_size_independence():
    x = _digits(12)
    y = (x.mean(dim=(1, 3))[:, 14:].sum(1) > x.mean(dim=(1, 3))[:, :14].sum(1)).long()
    data = SimpleNamespace(x=x, y=y, indices=torch.arange(100, 112))
    model = _BarRow().train()
    a = corruption_accuracy(model, data, n_examples=10, batch_size=3, seed=5)
    b = corruption_accuracy(model, data, n_examples=10, batch_size=10, seed=5)
    assert model.training
    assert a["correct"] == b["correct"] and a["mean_corruption_acc"] == b["mean_corruption_acc"]
    assert a["clean_acc"] == 1.0
    assert set(a["accuracy"]) == set(CORRUPTIONS) and all(len(v) == 5 for v in a["accuracy"].values())
    flat = [acc for accs in a["accuracy"].values() for acc in accs]
    assert a["mean_corruption_acc"] == pytest.approx(sum(flat) / len(flat))
    assert a["accuracy"]["jpeg"][0] == pytest.approx(sum(a["correct"]["jpeg"][0]) / 10)
    assert 0.0 <= min(flat) and max(flat) <= 1.0
    with pytest.raises(UserInputError, match="n_examples"):
        corruption_accuracy(model, data, n_examples=13)
