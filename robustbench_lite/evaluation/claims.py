"""The check every claimed adversarial point passes before it counts: an attack's ``x_adv`` or a
complete verifier's counterexample must lie in the threat ball intersected with the box and be
misclassified by the model on a fresh forward pass. No plug-in's word is taken.

:func:`check_points` checks points; :func:`verify_claims` is the evaluator's use of it: every claim
of a batch in one forward pass; a rejected claim does not count, and the evaluation ends in a
:class:`SoundnessError` whose error flag names each plug-in whose point failed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .checks import TIE_TOLERANCE
from ..threat import ThreatModel


@dataclass
class PointCheck:
    """Per-point verdicts, each (P,) on the CPU: ``inside`` ball and box, ``misclassified``, and
    ``margin`` (logit_y - max_{j != y} logit_j over 1 + max |logit|; NaN for a non-finite point)."""

    inside: Tensor
    misclassified: Tensor
    margin: Tensor

    @property
    def ok(self) -> Tensor:
        return self.inside & self.misclassified

    @property
    def tie(self) -> Tensor:
        """Classified correctly, but within float rounding of the decision boundary (``TIE_TOLERANCE``, as
        the evaluator's re-scoring check): another batch composition may flip it, so it is no lie."""
        return ~self.misclassified & (self.margin.abs() <= TIE_TOLERANCE)


def check_points(model: nn.Module, points: Tensor, x: Tensor, y: Tensor, threat: ThreatModel) -> PointCheck:
    """Check claimed adversarial ``points`` (P, ...) for clean inputs ``x`` (P, ...) with labels ``y`` (P,).

    ``inside``: :meth:`ThreatModel.contains` computed in float64 with eps as given, to a tolerance of
    ``1e-6 * max(1, eps)`` that absorbs the float32 rounding of ``x + delta`` (about 1e-7 of eps for
    an L2 ball in 784 dimensions); a non-finite point is never inside.
    ``misclassified``: ``model(points).argmax(1) != y`` in the dtype of ``x``, one batched forward (as
    the attacks' own re-scoring). The caller fixes the model's mode.
    """
    if points.shape != x.shape:
        raise ValueError(f"points {tuple(points.shape)} and inputs {tuple(x.shape)} differ in shape")
    if points.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.bool)
        return PointCheck(empty, empty.clone(), torch.zeros(0))
    finite = torch.isfinite(points.flatten(1)).all(dim=1)
    inside = threat.contains(points.detach().double(), x.detach().double(), 1e-6 * max(1.0, threat.eps)) & finite
    where = finite.view(-1, *[1] * (x.dim() - 1))
    with torch.no_grad():
        logits = model(torch.where(where, points.detach(), x).to(x.dtype))
    y = y.to(logits.device)
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    margin = ((true - other) / (1.0 + logits.abs().amax(dim=1))).float()
    finite = finite.to(logits.device)
    wrong = (logits.argmax(dim=1) != y) & finite
    margin = torch.where(finite, margin, torch.full_like(margin, float("nan")))
    return PointCheck(inside.cpu(), wrong.cpu(), margin.cpu())


@dataclass
class Claim:
    """Rows of a batch that plug-in ``name`` (``kind``: "attack" or "certifier") says are broken:
    ``rows`` (P,) int64 batch positions and its ``points`` (P, ...)."""

    name: str
    kind: str
    rows: Tensor
    points: Tensor


#: why a claim was rejected (codes of :func:`verify_claims`)
OUTSIDE, NOT_MISCLASSIFIED = 1, 2
REASONS = {OUTSIDE: "outside the threat ball intersected with the box",
           NOT_MISCLASSIFIED: "classified correctly on a fresh forward pass"}


def verify_claims(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                  claims: list[Claim]) -> dict[str, Tensor]:
    """Check every claim on the batch ``x`` (b, ...) / ``y`` (b,) in one forward pass.

    Returns ``{plug-in name: (b,) uint8}`` for the plug-ins with a rejected claim: per row 0 (fine or
    not claimed), ``OUTSIDE`` (the point is outside ball ∩ box) or ``NOT_MISCLASSIFIED`` (the model
    classifies it correctly, beyond a float tie). A rejected claim does not count; the evaluator turns
    any into an error flag naming the plug-in (:func:`rejected_claims_flag`)."""
    claims = [c for c in claims if c.rows.numel()]
    if not claims:
        return {}
    rows = torch.cat([c.rows.cpu() for c in claims])
    idx = rows.to(x.device)
    check = check_points(model, torch.cat([c.points.to(x.device, x.dtype) for c in claims]), x[idx], y[idx], threat)
    code = torch.where(~check.inside, OUTSIDE, torch.where(check.misclassified | check.tie, 0, NOT_MISCLASSIFIED))
    out: dict[str, Tensor] = {}
    at = 0
    for c in claims:
        part = code[at:at + c.rows.numel()].to(torch.uint8)
        at += c.rows.numel()
        if part.any():
            codes = out.setdefault(c.name, torch.zeros(x.shape[0], dtype=torch.uint8))
            codes[c.rows.cpu()] = torch.maximum(codes[c.rows.cpu()], part)
    return out


def rejected_claims_flag(rejected: dict[str, Tensor], kinds: dict[str, str], indices: Tensor,
                         threat: ThreatModel) -> dict | None:
    """The error flag of an evaluation whose plug-ins made claims the evaluator rejected (None if none):
    ``rejected[name]`` (N,) reason codes, ``kinds[name]`` "attack" or "certifier", ``indices`` (N,)."""
    from .checks import ERROR, make_flag

    parts, values = [], {}
    for name, codes in rejected.items():
        for code, reason in REASONS.items():
            bad = (codes == code).nonzero().flatten()
            if bad.numel():
                parts.append(f"{kinds.get(name, 'plug-in')} {name!r}: {bad.numel()} point(s) {reason}")
                values[f"{'outside' if code == OUTSIDE else 'correct'}_{name}"] = indices[bad].tolist()[:100]
    if not parts:
        return None
    return make_flag(
        "rejected_claims",
        f"the evaluator rejected claimed adversarial points ({'; '.join(parts)}) of the {threat.norm} "
        f"ball of radius {threat.eps:g}; those examples were not counted as broken: the plug-in is wrong, "
        "or the model is randomized or depends on the batch", severity=ERROR, **values)


__all__ = ["Claim", "PointCheck", "check_points", "rejected_claims_flag", "verify_claims"]
