"""The Attack contract (see shared ARCHITECTURE.md) and the common work every attack shares.

An attack is an object with keyword-only hyper-parameters. ``Attack.__call__`` is final: it checks
the inputs, puts the model in eval mode (restoring the caller's mode afterwards), counts passes,
calls the subclass's :meth:`Attack.run`, projects the result into the threat set and recomputes
``success`` from the model's own prediction. Subclasses implement only ``run``.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from robustbench_lite.errors import NonFiniteOutputError, UserInputError
from robustbench_lite.seeding import ExampleRNG, example_seeds
from robustbench_lite.threat import ThreatModel, check_call


@dataclass
class AttackResult:
    """What an attack returns for a batch of N examples.

    ``x_adv``: (N, ...) inside the ball and box; ``success``: (N,) bool, model(x_adv) != y (or == target
    when targeted); ``forward``/``backward``: example-passes through the model (sum of batch sizes);
    ``queries``: example-queries of a black-box attack; ``distance``: (N,) minimal perturbation found
    by minimum-norm attacks (inf where none was found), else None; ``flags``: diagnostics
    (e.g. ``zero_gradient`` counts) that explain numbers without changing them.
    """

    x_adv: Tensor
    success: Tensor
    forward: int = 0
    backward: int = 0
    queries: int = 0
    distance: Tensor | None = None
    flags: dict[str, Any] = field(default_factory=dict)


class PassCounter(nn.Module):
    """Wraps a model and counts example-forward and example-backward passes through it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward_passes = 0
        self.backward_passes = 0

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        n = x.shape[0]
        self.forward_passes += n
        if out.requires_grad:
            def count(grad: Tensor) -> None:
                self.backward_passes += n
            out.register_hook(count)
        return out


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the duration; the caller's state comes back after.

    Parameters' ``requires_grad`` is turned off so a backward pass to the input neither computes
    nor accumulates ``.grad`` on them (and is cheaper); their values and ``.grad`` are untouched.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, rg in flags:
            p.requires_grad_(rg)


class QueryOracle:
    """What a black-box attack sees: a function from inputs to scores (or labels), no gradients.

    Every call counts its examples as queries. There is deliberately no way back to the module.
    """

    def __init__(self, model: nn.Module, labels_only: bool = False) -> None:
        self._model = model
        self.labels_only = labels_only
        self.queries = 0

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            out = self._model(x.detach())
        self.queries += x.shape[0]
        return out.argmax(dim=1) if self.labels_only else out


def check_logits(logits: Tensor, n: int) -> None:
    if logits.dim() != 2 or logits.shape[0] != n:
        raise UserInputError(f"the model must return logits of shape (N, classes); got {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise NonFiniteOutputError("the model returned NaN or infinite logits")


class Attack(abc.ABC):
    """Base class: subclasses set ``name`` and implement :meth:`run`.

    Call as ``attack(model, x, y, threat, seeds=None, target=None)``. ``seeds`` (N,) int64 makes
    every random draw a function of the example alone (the evaluator passes them); without them,
    seeds come from ``seed`` and the position in the batch. ``target`` (N,) switches to a
    targeted attack where the subclass supports it.
    """

    name: str = "attack"
    #: black-box attacks receive a scoring function instead of the module
    black_box: bool = False
    #: black-box attacks that see only the predicted label (decision-based)
    labels_only: bool = False
    supports_targeted: bool = False

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = int(seed)

    def config(self) -> dict[str, Any]:
        """Hyper-parameters as plain JSON values, recorded in the leaderboard entry."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and _is_json_scalar(v)}

    @abc.abstractmethod
    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None) -> AttackResult:
        """Attack the batch; return candidates (they are projected and re-scored by ``__call__``)."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                 seeds: Tensor | None = None, target: Tensor | None = None) -> AttackResult:
        check_call(model, x, y, threat)
        if target is not None and not self.supports_targeted:
            raise UserInputError(f"attack {self.name!r} has no targeted mode")
        if seeds is None:
            seeds = example_seeds(self.seed, range(x.shape[0]))
        rng = ExampleRNG(seeds, device=x.device)
        y = y.to(torch.int64)
        x = x.detach()
        with frozen(model):
            counter = PassCounter(model)
            if x.shape[0] == 0:
                return AttackResult(x_adv=x.clone(), success=torch.zeros(0, dtype=torch.bool, device=x.device))
            oracle = QueryOracle(counter, labels_only=self.labels_only) if self.black_box else None
            result = self.run(oracle if oracle is not None else counter, x, y, threat, rng, target)
            x_adv = threat.project(result.x_adv.detach(), x)
            with torch.no_grad():
                logits = model(x_adv)
            check_logits(logits, x.shape[0])
            pred = logits.argmax(dim=1)
            success = pred == target if target is not None else pred != y
        result.x_adv = x_adv
        result.success = success
        result.forward = counter.forward_passes + x.shape[0]  # + the re-scoring pass
        result.backward = counter.backward_passes
        if oracle is not None:
            result.queries = oracle.queries
        return result


def _is_json_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (list, tuple)) and all(isinstance(e, (bool, int, float, str)) for e in v))


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example ``max_{j != y} z_j - z_y`` (positive once misclassified). Correct for any sign."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.amax(dim=1) - true


def select_rows(take: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Rows of ``new`` where ``take`` (N,) bool, else rows of ``old`` (N, ...): ``torch.where`` written as
    ``lerp`` with weights 0 / 1, which is exact for finite values (PyTorch's lerp returns ``old + 0 * d``
    or ``new - 0 * d``) and on CPU several times faster than a boolean-mask ``where`` over images."""
    return torch.lerp(old, new, take.to(old.dtype).view(-1, *([1] * (old.dim() - 1))))


LossFn = Callable[[Tensor, Tensor], Tensor]
