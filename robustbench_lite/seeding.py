"""Per-example seeds: results must not depend on batch size, sharding or example order.

Every random draw an attack makes for example ``i`` comes from a generator seeded with
``example_seed(seed, dataset_index_i)`` mixed with a stream id (restart, purpose), so the same
example gets the same noise whichever batch or rank it lands in.
"""
from __future__ import annotations

import torch
from torch import Tensor

_MASK = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def mix(*values: int) -> int:
    """Hash integers into one 63-bit seed (stable across runs and platforms)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK))
    return h >> 1


def example_seeds(seed: int, indices: Tensor | list[int]) -> Tensor:
    """int64 seeds, one per example, from the run seed and the examples' dataset indices."""
    idx = indices.tolist() if torch.is_tensor(indices) else list(indices)
    return torch.tensor([mix(seed, i) for i in idx], dtype=torch.int64)


class ExampleRNG:
    """Draws per-example noise: row i depends only on ``seeds[i]`` and the stream id.

    >>> rng = ExampleRNG(example_seeds(0, [3, 7]))
    >>> rng.uniform((1, 2, 2), stream=0).shape
    torch.Size([2, 1, 2, 2])
    """

    def __init__(self, seeds: Tensor, device: torch.device | str = "cpu") -> None:
        self.seeds = [int(s) for s in seeds.tolist()]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.seeds)

    def subset(self, mask_or_index: Tensor) -> "ExampleRNG":
        idx = mask_or_index.nonzero().flatten() if mask_or_index.dtype == torch.bool else mask_or_index
        sub = ExampleRNG(torch.tensor([self.seeds[i] for i in idx.tolist()], dtype=torch.int64), self.device)
        return sub

    def _draw(self, kind: str, shape: tuple[int, ...], stream: int) -> Tensor:
        out = torch.empty((len(self.seeds), *shape))
        g = torch.Generator()
        for row, s in enumerate(self.seeds):
            g.manual_seed(mix(s, stream, 1 if kind == "uniform" else 2))
            if kind == "uniform":
                out[row] = torch.rand(shape, generator=g)
            else:
                out[row] = torch.randn(shape, generator=g)
        return out.to(self.device)

    def uniform(self, shape: tuple[int, ...], stream: int) -> Tensor:
        """U[0, 1) noise of shape (N, *shape)."""
        return self._draw("uniform", tuple(shape), stream)

    def normal(self, shape: tuple[int, ...], stream: int) -> Tensor:
        """Standard normal noise of shape (N, *shape)."""
        return self._draw("normal", tuple(shape), stream)
