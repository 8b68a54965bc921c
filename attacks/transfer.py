"""Gray-box transfer attack (Papernot et al. 2017, arXiv 1602.02697; Tramer et al. 2018, arXiv 1705.07204).

The attacker has no access to the target's gradients: it crafts adversarial points on a surrogate
model it owns (a zoo model or a user's) with a white-box attack, then submits them to the target,
which it sees only as a query function: one query per example for the clean point (an example the
target already misclassifies is not attacked) and one per restart for the transferred point.
The white-box attack is PGD on the surrogate run for all its steps (no early stop at the
surrogate's own boundary: the highest-loss point transfers better than a barely-adversarial one).

The surrogate's passes are the attacker's own cost and are reported in ``flags``
(``surrogate_forward`` / ``surrogate_backward``); ``queries`` counts the target's.
``config()`` names the surrogate and the sha256 of its weights, so a record says what it was crafted on
and a regeneration notices when the surrogate changes.

>>> attack = Transfer(surrogate="mnist5k-cnn-standard")
>>> attack.name
'transfer-mnist5k-cnn-standard'
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError, first_line
from robustbench_lite.seeding import ExampleRNG
from robustbench_lite.threat import ThreatModel

from .base import Attack, AttackResult, QueryOracle, margin_loss
from .losses import get_loss
from .pgd import PGD


class Transfer(Attack):
    """Craft on ``surrogate`` with PGD, score on the target (which is only queried).

    Args:
        surrogate: a zoo model name, a weights file / TorchScript file / ``package.module:factory``
            that :func:`robustbench_lite.zoo.load_model` takes, or an ``nn.Module``.
        steps: PGD steps on the surrogate (40, Madry et al.'s MNIST setting).
        rel_stepsize: PGD step as a fraction of eps (0.01 / 0.3).
        loss: the surrogate's loss, "ce" (default) or "margin" (Carlini-Wagner).
        restarts: PGD restarts on the surrogate; each restart's point is one query (1).
        seed: used only when the caller passes no per-example seeds.

    Shapes: x (N, ...) as the surrogate takes it, y (N,). Returns :class:`AttackResult`.
    """

    name = "transfer"
    black_box = True

    def __init__(self, *, surrogate: str | os.PathLike | nn.Module, steps: int = 40, rel_stepsize: float = 0.01 / 0.3,
                 loss: str = "ce", restarts: int = 1, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if loss not in ("ce", "margin"):
            get_loss(loss)  # an unknown name: its own error
            raise UserInputError(f"transfer attacks use loss 'ce' or 'margin', got {loss!r}")
        self._pgd = PGD(steps=steps, rel_stepsize=rel_stepsize, loss=loss, restarts=1, early_stop=False)
        if int(restarts) < 1:
            raise UserInputError(f"restarts must be >= 1, got {restarts}")
        self.steps, self.rel_stepsize, self.loss, self.restarts = int(steps), float(rel_stepsize), loss, int(restarts)
        if isinstance(surrogate, nn.Module):
            self._module: nn.Module | None = surrogate
            self.surrogate = type(surrogate).__name__
            self.surrogate_sha256 = None
        else:
            self._module = None
            self.surrogate = os.fspath(surrogate)
            self.surrogate_sha256 = _weights_sha256(self.surrogate)
        label = Path(self.surrogate).stem if Path(self.surrogate).expanduser().is_file() else self.surrogate
        self.name = f"transfer-{label}".lower()  # the record's attack name says what it was crafted on
        self._loaded: dict[torch.device, nn.Module] = {}

    def _model_on(self, device: torch.device) -> nn.Module:
        if device not in self._loaded:
            if self._module is not None:
                self._loaded[device] = self._module
            else:
                from robustbench_lite.zoo import load_model

                self._loaded[device] = load_model(self.surrogate, device=device)
        return self._loaded[device]

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None) -> AttackResult:
        oracle: QueryOracle = model  # type: ignore[assignment]  (black-box: the target is a query function)
        surrogate = self._model_on(x.device)
        seeds = torch.tensor(rng.seeds, dtype=torch.int64)
        best = x.clone()
        fooled = oracle(x).argmax(dim=1) != y  # one query each: nothing to transfer where the target errs already
        todo = (~fooled).nonzero().flatten()
        best_margin = torch.full((todo.numel(),), -torch.inf, device=x.device)
        forward = backward = 0
        for restart in range(self.restarts if todo.numel() else 0):
            try:
                crafted = self._pgd(surrogate, x[todo], y[todo], threat, seeds=seeds[todo.cpu()] + restart)
            except (UserInputError, RuntimeError) as exc:  # the call check's word, or the surrogate's own error
                raise UserInputError(f"surrogate {self.surrogate!r} cannot take these inputs: "
                                     f"{first_line(exc)}") from None
            forward, backward = forward + crafted.forward, backward + crafted.backward
            scores = oracle(crafted.x_adv)  # the target's only other role: score the transferred point
            hit = scores.argmax(dim=1) != y[todo]
            margin = margin_loss(scores, y[todo])
            take = ~fooled[todo] & (hit | (margin > best_margin))  # the first fooling point, else the highest margin
            best[todo[take]] = crafted.x_adv[take]
            best_margin = torch.where(take, margin, best_margin)
            fooled[todo[hit]] = True
        flags: dict[str, Any] = {"surrogate_forward": forward, "surrogate_backward": backward}
        return AttackResult(x_adv=best, success=fooled, flags=flags)


def _weights_sha256(surrogate: str) -> str | None:
    """The surrogate's weights sha256, without loading it: the zoo card's, else the file's (None for a
    ``package.module:factory`` reference)."""
    from robustbench_lite.hashing import file_sha256
    from robustbench_lite.zoo import read_cards

    card = read_cards().get(surrogate)
    if card is not None:
        return card.get("weights_sha256")
    path = Path(surrogate).expanduser()
    if path.is_file():
        return file_sha256(path)
    if ":" in surrogate:
        return None
    raise UserInputError(f"unknown surrogate {surrogate!r}: a zoo model name, a weights file or package.module:factory")
