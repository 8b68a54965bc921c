"""Threat models: an Lp ball of radius ``eps`` around the input, intersected with the input box.

The norm-specific work (projection, random start, steepest-ascent direction) lives in small
norm objects, after foolbox's ``LpDistance``, so attacks never branch on ``norm == ...``.
eps is in pixel units of images in [0, 1] and is stored exactly as given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import UserInputError

_TINY = 1e-12
#: the ``norm`` of the common-corruptions threat model (its records live in ``<dataset>/corruptions/``)
CORRUPTIONS_NORM = "corruptions"


def threat_folder(norm: str, eps: float) -> str:
    """The records' folder name of a threat model: ``<norm>-<eps:g>``, or ``corruptions``."""
    return CORRUPTIONS_NORM if norm == CORRUPTIONS_NORM else f"{norm}-{eps:g}"


def _flat_norm(t: Tensor, p: float) -> Tensor:
    """Per-example Lp norm of a batch, shape (N,)."""
    return t.flatten(1).norm(p=p, dim=1)


def _expand(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class LinfNorm:
    name = "Linf"
    p = math.inf

    def norm(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).abs().amax(dim=1)

    def clip(self, delta: Tensor, eps: Tensor | float) -> Tensor:
        if torch.is_tensor(eps):
            eps = _expand(eps, delta)
            return torch.clamp(delta, -eps, eps)
        return delta.clamp(-eps, eps)

    def ascent_direction(self, grad: Tensor) -> Tensor:
        return grad.sign()

    def random_in_ball(self, noise_uniform: Tensor, noise_normal: Tensor, eps: float) -> Tensor:
        """Uniform in the ball, from U[0,1) noise of the input's shape."""
        return (2 * noise_uniform - 1) * eps


class L2Norm:
    name = "L2"
    p = 2.0

    def norm(self, delta: Tensor) -> Tensor:
        return _flat_norm(delta, 2)

    def clip(self, delta: Tensor, eps: Tensor | float) -> Tensor:
        norms = self.norm(delta)
        eps_t = eps if torch.is_tensor(eps) else torch.full_like(norms, eps)
        factor = torch.where(norms > eps_t, eps_t / norms.clamp_min(_TINY), torch.ones_like(norms))
        return delta * _expand(factor, delta)

    def ascent_direction(self, grad: Tensor) -> Tensor:
        return grad / _expand(_flat_norm(grad, 2).clamp_min(_TINY), grad)

    def random_in_ball(self, noise_uniform: Tensor, noise_normal: Tensor, eps: float) -> Tensor:
        """Uniform in the L2 ball: a Gaussian direction and radius eps * U^(1/d)."""
        d = noise_normal[0].numel()
        direction = noise_normal / _expand(_flat_norm(noise_normal, 2).clamp_min(_TINY), noise_normal)
        radius = noise_uniform.flatten(1)[:, 0] ** (1.0 / d) * eps
        return direction * _expand(radius, direction)


NORMS = {"Linf": LinfNorm(), "L2": L2Norm()}
_ALIASES = {"linf": "Linf", "inf": "Linf", "l_inf": "Linf", "l2": "L2", "2": "L2", "l_2": "L2"}


@dataclass(frozen=True)
class ThreatModel:
    """An Lp ball of radius ``eps`` around each input, intersected with ``box``.

    >>> ThreatModel("Linf", 0.3)
    ThreatModel(norm='Linf', eps=0.3, box=(0.0, 1.0))
    """

    norm: str
    eps: float
    box: tuple[float, float] = (0.0, 1.0)
    _ops: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        norm = _ALIASES.get(str(self.norm).lower(), self.norm)
        if norm not in NORMS:
            raise UserInputError(f"unknown norm {self.norm!r}: choose one of {', '.join(NORMS)}")
        try:
            eps = float(self.eps)
        except (TypeError, ValueError):
            raise UserInputError(f"eps must be a number, got {self.eps!r}") from None
        if not math.isfinite(eps) or eps < 0:
            raise UserInputError(f"eps must be finite and >= 0, got {self.eps!r}")
        try:
            lo, hi = (float(v) for v in self.box)
        except (TypeError, ValueError):
            raise UserInputError(f"box must be a pair of numbers, got {self.box!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise UserInputError(f"box must be finite with low < high, got {self.box!r}")
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "box", (lo, hi))
        object.__setattr__(self, "_ops", NORMS[norm])

    # --- norm operations -------------------------------------------------------------------
    @property
    def ops(self) -> LinfNorm | L2Norm:
        return self._ops  # type: ignore[return-value]

    @property
    def key(self) -> str:
        """Directory name of this threat model in the leaderboard, e.g. ``Linf-0.3``."""
        return f"{self.norm}-{self.eps:g}"

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        return self.ops.norm(x_adv - x)

    def project(self, x_adv: Tensor, x: Tensor, eps: Tensor | float | None = None) -> Tensor:
        """Nearest-ish point of the ball and the box: clip the perturbation, then the box.

        For Linf the result is the exact projection. For L2, clipping to the box after scaling can
        only shrink the perturbation, so the result stays inside both sets.
        """
        eps = self.eps if eps is None else eps
        delta = self.ops.clip(x_adv - x, eps)
        return (x + delta).clamp(self.box[0], self.box[1])

    def contains(self, x_adv: Tensor, x: Tensor, tol: float = 1e-6) -> Tensor:
        """Per-example check that ``x_adv`` is in the ball and the box (to ``tol``)."""
        in_ball = self.distance(x_adv, x) <= self.eps + tol
        in_box = ((x_adv >= self.box[0] - tol) & (x_adv <= self.box[1] + tol)).flatten(1).all(dim=1)
        return in_ball & in_box

    def check_inputs(self, x: Tensor, y: Tensor | None = None) -> None:
        """Raise a clear error for inputs an attack or certifier cannot be asked about."""
        if not torch.is_tensor(x) or x.dim() < 2:
            raise UserInputError(f"x must be a batched tensor (N, ...), got shape {tuple(getattr(x, 'shape', ()))}")
        if not torch.is_floating_point(x):
            raise UserInputError(f"x must be floating point, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise UserInputError("x contains NaN or infinite values")
        lo, hi = self.box
        if x.numel() and (x.min() < lo - 1e-6 or x.max() > hi + 1e-6):
            raise UserInputError(
                f"inputs must lie in the box [{lo:g}, {hi:g}] (got [{x.min().item():.4g}, {x.max().item():.4g}]); "
                "normalization belongs inside the model, not the data"
            )
        if y is not None:
            if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise UserInputError(f"y must have shape ({x.shape[0]},), got {tuple(getattr(y, 'shape', ()))}")
            if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise UserInputError(f"y must be integer class labels, got {y.dtype}")

    def to_dict(self) -> dict:
        return {"norm": self.norm, "eps": self.eps, "box": list(self.box)}
