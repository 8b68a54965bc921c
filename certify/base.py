"""The Certifier contract (see shared ARCHITECTURE.md).

``certifier(model, x, y, threat) -> CertResult``. ``margin_lower[i, j]`` is a lower bound of
``logit_y - logit_j`` over the whole threat set (ball intersected with the box) for every class j;
the column j = y is 0 by convention, so ``-margin_lower`` can be fed to a cross-entropy as the
worst-case logits of certified training (Gowal et al. 2018). An example is certified when every
other column is > 0 and its status is ``certified``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from robustbench_lite.errors import UnsupportedModelError, UserInputError
from robustbench_lite.threat import ThreatModel, check_call

CERTIFIED = "certified"
NOT_CERTIFIED = "not_certified"
TIMEOUT = "timeout"
SKIPPED = "skipped"  # always written as "skipped: <reason>"


@dataclass
class CertResult:
    """What a certifier returns for N examples.

    ``certified`` (N,) bool; ``margin_lower`` (N, K) with column y set to 0 (``nan`` rows where the
    example was skipped); ``status``: one string per example, ``certified``, ``not_certified``,
    ``timeout`` or ``skipped: <reason>``; ``forward_equivalents``: cost in forward passes of the
    model, if the certifier counts it; ``info``: per-certifier diagnostics (e.g. solver statuses);
    ``counterexample``: see the field. An example with a counterexample has status ``not_certified``.
    """

    certified: Tensor
    margin_lower: Tensor
    status: list[str]
    forward_equivalents: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    #: (N, *input_shape) points a complete verifier found and checked (inside ball and box, misclassified
    #: on a plain forward pass), NaN rows where it found none; None for certifiers that never search.
    #: The evaluator re-checks each point and counts it against robust accuracy, like an attack's.
    counterexample: Tensor | None = None


def spec_matrix(y: Tensor, num_classes: int) -> Tensor:
    """C (N, K, K) with ``C[i, j] = e_y - e_j``, so ``C @ logits`` are the margins (row y is 0)."""
    eye = torch.eye(num_classes, device=y.device)
    return eye[y][:, None, :] - eye[None, :, :]


def margins_certified(margin_lower: Tensor, y: Tensor) -> Tensor:
    """True where every margin but the label's own is > 0 (nan counts as not certified)."""
    m = margin_lower.clone()
    m.scatter_(1, y[:, None], float("inf"))
    return (m > 0).all(dim=1)


class Certifier(abc.ABC):
    """Base class: subclasses set ``name`` and implement :meth:`bound_margins`.

    ``__call__`` is final: it validates inputs, evaluates in eval mode (restoring the caller's
    mode), and turns the margin bounds into flags and statuses. A subclass that can skip or time out
    on some examples overrides :meth:`run` instead and fills in statuses itself.
    """

    name: str = "certifier"
    #: True when :meth:`bound_margins` is differentiable w.r.t. the parameters (certified training); the
    #: ``margin_lower`` of a verdict is proven under rounding (:mod:`certify.rounding`) and carries no gradient
    differentiable: bool = False
    #: True for expensive certifiers (CROWN, LP, SDP, MIP): the evaluator hands them only the examples that no
    #: attack and no earlier certifier's counterexample has refuted (a refuted example cannot be certified by a
    #: sound certifier); the others read ``skipped: refuted by an attack`` (or ``... by a counterexample``)
    #: without a solve. Cheap certifiers see every example, which keeps the evaluator's certified <= robust
    #: cross-check on all of them.
    skip_refuted: bool = False

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()
                if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))}

    def check_supported(self, model: nn.Module) -> None:
        """Raise :class:`robustbench_lite.errors.UnsupportedModelError` listing every unsupported layer."""

    def unsupported(self, model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
        """Why this certifier cannot handle ``model`` on per-example inputs of ``input_shape``: one line
        ``unsupported layers: ...`` naming every unsupported layer, or None. The evaluator asks before
        the first batch; subclasses whose checks need the input size override this."""
        try:
            self.check_supported(model)
        except UnsupportedModelError as exc:
            return exc.reason
        return None

    def bound_margins(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """Lower bounds (N, K) of logit_y - logit_j over the threat set; column y is 0."""
        raise NotImplementedError

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> CertResult:
        return self._result(self.bound_margins(model, x, y, threat), y)

    @staticmethod
    def _result(margin_lower: Tensor, y: Tensor, forward_equivalents: float = 0.0) -> CertResult:
        """The result of margin bounds that hold for every example: certified where all are > 0."""
        certified = margins_certified(margin_lower.detach(), y)
        status = [CERTIFIED if c else NOT_CERTIFIED for c in certified.tolist()]
        return CertResult(certified=certified, margin_lower=margin_lower, status=status,
                          forward_equivalents=forward_equivalents)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> CertResult:
        check_call(model, x, y, threat, supported=self.check_supported)
        y = y.to(torch.int64)
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            if self.differentiable and torch.is_grad_enabled():
                result = self.run(model, x, y, threat)
            else:
                with torch.no_grad():
                    result = self.run(model, x, y, threat)
        finally:
            for m, mode in modes:
                m.training = mode
        # a certifier can only certify what its status says, and never a skipped or failed example
        ok = torch.tensor([s == CERTIFIED for s in result.status], dtype=torch.bool, device=result.certified.device)
        result.certified = result.certified & ok
        return result


class Skipped(Certifier):
    """Stands in for a certifier that cannot handle the model: every example reads ``skipped: <reason>``.

    The evaluator runs it in place of a default certifier that reported the model unsupported, so
    the attacks still run; it keeps the certifier's name and configuration for the record.
    """

    skip_refuted = False  # every example reads the reason, refuted or not

    def __init__(self, certifier: Certifier, reason: str) -> None:
        self.name, self.certifier, self.reason = certifier.name, certifier, reason

    def config(self) -> dict[str, Any]:
        return self.certifier.config()

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> CertResult:
        n, k = x.shape[0], model(x[:1]).shape[-1] if x.shape[0] else 0
        return CertResult(certified=torch.zeros(n, dtype=torch.bool, device=x.device),
                          margin_lower=torch.full((n, k), float("nan"), device=x.device),
                          status=[f"{SKIPPED}: {self.reason}"] * n)


def guard_unsupported(certifiers: list[tuple[str, Any]], model: nn.Module, input_shape: tuple[int, ...],
                      unsupported: str) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """Ask every certifier whether it can handle ``model`` before anything runs.

    ``unsupported="skip"``: one that cannot is replaced by :class:`Skipped` (its examples read
    ``skipped: unsupported layers: ...``); ``"error"``: raise :class:`UnsupportedModelError` naming it.
    Returns the certifiers to run and ``{name: reason}`` of the skipped ones.
    """
    if unsupported not in ("skip", "error"):
        raise UserInputError(f"unsupported must be 'skip' or 'error', got {unsupported!r}")
    out, skipped = [], {}
    for name, certifier in certifiers:
        ask = getattr(certifier, "unsupported", None)
        reason = ask(model, tuple(input_shape)) if callable(ask) else None
        if reason is None:
            out.append((name, certifier))
        elif unsupported == "error":
            raise UnsupportedModelError(reason, subject=f"certifier {name!r}")
        else:
            out.append((name, Skipped(certifier, reason)))
            skipped[name] = reason
    return out, skipped
