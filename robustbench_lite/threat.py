"""Threat models: an Lp ball of radius ``eps`` around the input, intersected with the input box.

The norm-specific work (projection, random start, steepest-ascent direction) lives in small
norm objects, after foolbox's ``LpDistance``, so attacks never branch on ``norm == ...``.
eps is in pixel units of images in [0, 1] and is stored exactly as given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .errors import UserInputError, first_line, short_repr

_TINY = 1e-12
#: the ``norm`` of the common-corruptions threat model (its records live in ``<dataset>/corruptions/``)
CORRUPTIONS_NORM = "corruptions"


def threat_folder(norm: str, eps: float, access: str = "white-box") -> str:
    """The records' folder name of a threat model: ``<norm>-<eps:g>`` (``-gray-box`` appended for a
    gray-box table), or ``corruptions``."""
    if norm == CORRUPTIONS_NORM:
        return CORRUPTIONS_NORM
    return f"{norm}-{eps:g}" + ("" if access == "white-box" else f"-{access}")


#: the largest eps and box bound: any image box's diameter in pixel units is far below it, and the
#: few multiples of eps (and its square) that attacks and certifiers form stay finite in float32
LIMIT = 1e6


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
#: what an attacker may use of the target (Xu et al. 2019's white/gray-box): its gradients, or, gray-box,
#: only queries of its scores (transfer attacks craft on a surrogate model they own)
ACCESS = ("white-box", "gray-box")
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
    access: str = "white-box"
    _ops: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        numeric = isinstance(self.norm, (int, float)) and not isinstance(self.norm, bool)  # 2, math.inf
        norm = _ALIASES.get(str(self.norm).lower(), self.norm) if isinstance(self.norm, str) or numeric else None
        if norm not in NORMS:
            raise UserInputError(f"unknown norm {short_repr(self.norm)}: choose one of {', '.join(NORMS)}")
        try:
            if isinstance(self.eps, bool):
                raise TypeError
            eps = float(self.eps)
        except (TypeError, ValueError, OverflowError):
            raise UserInputError(f"eps must be a number, got {short_repr(self.eps)}") from None
        if not math.isfinite(eps) or eps < 0:
            raise UserInputError(f"eps must be finite and >= 0, got {short_repr(self.eps)}")
        if eps > LIMIT:
            raise UserInputError(f"eps {short_repr(self.eps)} is above {LIMIT:g}: a ball that large already holds the "
                                 "whole input box, and attacks and certifiers would overflow float32 with it (eps "
                                 "is in pixel units of [0, 1] images, e.g. 0.3 or 8/255)")
        try:
            lo, hi = (float(v) for v in self.box)
        except (TypeError, ValueError, OverflowError):
            raise UserInputError(f"box must be a pair of numbers, got {short_repr(self.box)}") from None
        if not (-LIMIT <= lo < hi <= LIMIT):
            raise UserInputError(f"box must be two numbers low < high within [-{LIMIT:g}, {LIMIT:g}], "
                                 f"got {short_repr(self.box)}")
        if self.access not in ACCESS:
            raise UserInputError(f"unknown access {short_repr(self.access)}: choose one of {', '.join(ACCESS)}")
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
        """Directory name of this threat model in the leaderboard, e.g. ``Linf-0.3`` (``Linf-0.3-gray-box``)."""
        return threat_folder(self.norm, self.eps, self.access)

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
        if x.device.type not in _REAL_DEVICES:
            raise UserInputError(f"x is on device {x.device}, which holds no values: use cpu or cuda")
        if not torch.is_floating_point(x):
            raise UserInputError(f"x must be floating point, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise UserInputError("x contains NaN or infinite values")
        lo, hi = self.box
        if x.numel() and (x.min() < lo - 1e-6 or x.max() > hi + 1e-6):
            raise UserInputError(
                f"x must lie in the box [{lo:g}, {hi:g}] (got [{x.min().item():.4g}, {x.max().item():.4g}]); "
                "normalization belongs inside the model, not the data"
            )
        if y is not None:
            if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise UserInputError(f"y must have shape ({x.shape[0]},), got {tuple(getattr(y, 'shape', ()))}")
            if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise UserInputError(f"y must be integer class labels, got {y.dtype}")
            if y.device != x.device:
                raise UserInputError(f"y is on {y.device} but x on {x.device}: put them on one device")
            if y.numel() and y.min() < 0:
                raise UserInputError(f"y must hold class labels >= 0, got {int(y.min())}")

    def to_dict(self) -> dict:
        out = {"norm": self.norm, "eps": self.eps, "box": list(self.box)}
        if self.access != ACCESS[0]:  # white-box, the default, is left out: older records stay as they are
            out["access"] = self.access
        return out


_REAL_DEVICES = ("cpu", "cuda", "mps")


def check_call(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
               supported: Callable[[nn.Module], None] | None = None) -> None:
    """What every attack and certifier call checks before any work: ``threat`` a ThreatModel, ``model`` an
    nn.Module, x and y valid for the threat (:meth:`ThreatModel.check_inputs`), x of the dtype and on the
    device of the model's parameters, ``supported(model)`` (a certifier's layer check), and a model that
    maps x's shape to logits (N, K) with 0 <= y < K.

    The model is probed with an empty batch (x[:0], in eval mode, without gradients), so no example-row is
    spent; a model that cannot take zero rows (``x.view(x.size(0), -1)`` flattening, as RobustBench's
    models do) is probed with the first example instead, outside every pass and query counter. x (N, ...),
    y (N,).
    """
    if not isinstance(threat, ThreatModel):
        raise UserInputError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    if not isinstance(model, nn.Module):
        raise UserInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if y is None:
        raise UserInputError("y must be a tensor of class labels (N,), got None")
    threat.check_inputs(x, y)
    weight = next((p for p in model.parameters() if torch.is_floating_point(p)), None)
    if weight is not None and (x.dtype, x.device) != (weight.dtype, weight.device):
        raise UserInputError(f"x is {x.dtype} on {x.device} but the model computes in {weight.dtype} on "
                             f"{weight.device}: convert x (x.to(...)) or the model")
    if supported is not None:
        supported(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            try:
                logits = model(x[:0])
            except (RuntimeError, ValueError, TypeError, IndexError):
                if x.shape[0] == 0:
                    raise
                logits = model(x[:1])
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserInputError(f"the model cannot take x of shape {tuple(x.shape[1:])} ({first_line(exc)})") from None
    finally:
        for m, mode in modes:
            m.training = mode
    if not torch.is_tensor(logits) or logits.dim() != 2:
        raise UserInputError(f"the model must return logits of shape (N, classes) for x; got "
                             f"{tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
    if y.numel() and int(y.max()) >= logits.shape[1]:
        raise UserInputError(f"y must hold class labels below the model's {logits.shape[1]} logits, "
                             f"got {int(y.max())}")
