"""Sanity and gradient-masking checks that explain an evaluation's numbers without changing them.

After AutoAttack's ``checks.py`` and Athalye, Carlini & Wagner 2018 (arXiv 1802.00420, section 3):
a model that is randomized, handed over in train mode, returns probabilities instead of logits or
gives attacks zero gradients often *looks* robust without being so. Each check is one small
function ``check(ctx: CheckContext) -> Flag | None`` in :data:`CHECKS`; add a check by writing
such a function and appending it (or pass your own list to :func:`run_checks`).

A flag is a plain JSON dict ``{"name", "severity", "explanation", "values"}``: ``severity`` is
``"warning"`` (a number may mislead) or ``"error"`` (a number is wrong: the evaluator raises
:class:`robustbench_lite.errors.SoundnessError` after the result is available).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Flag = dict[str, Any]
WARNING = "warning"
ERROR = "error"

#: examples the probing checks feed the model (train mode, randomness, probabilities)
PROBE_SIZE = 64
#: a re-scored margin this small (relative to the logits' scale) is a float tie, not a batch effect
TIE_TOLERANCE = 1e-5


def make_flag(name: str, explanation: str, severity: str = WARNING, **values: Any) -> Flag:
    """A flag as stored in the leaderboard record; ``values`` are numbers or lists of numbers."""
    return {"name": name, "severity": severity, "explanation": explanation, "values": values}


@dataclass
class CheckContext:
    """What a check may look at; the model is in eval mode and gradients are off while checks run.

    ``x`` (N, ...) and ``y`` (N,) are the evaluated examples (on the evaluation device),
    ``indices`` (N,) their dataset indices, ``clean_logits`` (N, K), ``x_worst`` (N, ...) the
    adversarial example that decided each example's robust flag (the clean input where no attack
    ran), ``robust`` (N,) the reported robust flags, ``attack_flags`` the ``AttackResult.flags``
    summed per attack, ``model_was_training`` the mode the caller handed the model over in.
    ``extras`` holds what checks that re-run attacks need: ``threat``, ``result`` (the
    :class:`~robustbench_lite.evaluation.core.EvaluationResult`), ``attacks`` and ``certifiers`` (name ->
    instance) and ``seeds`` (N,) per-example seeds.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    indices: Tensor
    clean_logits: Tensor
    x_worst: Tensor
    robust: Tensor
    batch_size: int
    model_was_training: bool = False
    attack_flags: dict[str, dict[str, float]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


Check = Callable[[CheckContext], "Flag | None"]


def check_train_mode(ctx: CheckContext) -> Flag | None:
    """The model came in train mode (dropout / batch statistics); it was evaluated in eval mode."""
    if not ctx.model_was_training:
        return None
    return make_flag(
        "train_mode",
        "the model was handed over in train mode; it was evaluated in eval mode, as it should be "
        "(a model that is only robust in train mode is randomized or uses batch statistics)",
        model_was_training=1,
    )


def check_randomized(ctx: CheckContext) -> Flag | None:
    """Two identical calls give different outputs: gradients are noisy, use EOT (Athalye 2018 s.4.3)."""
    probe = ctx.x[:PROBE_SIZE]
    if probe.shape[0] == 0:
        return None
    first, second = ctx.model(probe), ctx.model(probe)
    diff = (first - second).abs().amax().item()
    if diff == 0:
        return None
    changed = (first.argmax(1) != second.argmax(1)).float().mean().item()
    return make_flag(
        "randomized_outputs",
        "two identical forward passes in eval mode gave different logits; the model is randomized, "
        "so single-sample gradients understate attacks (use EOT) and results are not reproducible",
        max_abs_difference=diff, fraction_predictions_changed=changed, probe_examples=probe.shape[0],
    )


def check_probabilities(ctx: CheckContext) -> Flag | None:
    """Outputs in [0, 1] summing to 1 per row: a softmax inside the model flattens gradients."""
    logits = ctx.clean_logits
    if logits.numel() == 0 or logits.shape[1] < 2:
        return None
    in_unit = bool(((logits >= 0) & (logits <= 1)).all())
    sums = logits.sum(dim=1)
    if not (in_unit and torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
        return None
    return make_flag(
        "probability_outputs",
        "the model returns probabilities, not logits (every row in [0, 1] summing to 1); "
        "cross-entropy attacks on a softmax output saturate: remove the final softmax",
        max_row_sum_error=(sums - 1).abs().max().item(),
    )


def check_zero_gradients(ctx: CheckContext) -> Flag | None:
    """Attacks met identically zero (or non-finite) input gradients: a sign of gradient masking."""
    counts = {name: flags.get("zero_gradient", 0) + flags.get("nan_gradient", 0)
              for name, flags in ctx.attack_flags.items()}
    counts = {name: c for name, c in counts.items() if c}
    if not counts:
        return None
    return make_flag(
        "zero_gradient",
        "gradient attacks saw zero or non-finite input gradients on some examples "
        "(shattered or masked gradients); their robust accuracy is an over-estimate",
        **{f"examples_{name}": int(c) for name, c in counts.items()},
    )


def rescore(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Per-example (correct-at-x, margin logit_y - max_{j != y} logit_j) scored in batches."""
    correct, margins = [], []
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start:start + batch_size])
        yb = y[start:start + batch_size]
        true = logits.gather(1, yb[:, None]).squeeze(1)
        other = logits.scatter(1, yb[:, None], float("-inf")).amax(dim=1)
        correct.append(logits.argmax(dim=1) == yb)
        margins.append((true - other) / (1.0 + logits.abs().amax(dim=1)))
    empty = torch.zeros(0, dtype=torch.bool, device=x.device)
    return (torch.cat(correct) if correct else empty), (torch.cat(margins) if margins else empty.float())


def second_batch_size(batch_size: int, n: int) -> int:
    """A batch size different from ``batch_size`` that splits the data differently."""
    other = max(1, batch_size // 3 + 1)
    if other == batch_size or other >= n:
        other = max(1, min(n, batch_size) - 1) if min(n, batch_size) > 1 else 2
    return other


def check_rescoring(ctx: CheckContext) -> Flag | None:
    """Re-score the adversarial examples alone at two batch sizes; they must match the report.

    A mismatch means the reported robust accuracy depends on the batch (batch statistics,
    randomness, an attack that re-scores wrongly): an error, not a warning. Flips whose margin is
    within float rounding of 0 are ties and are only counted.
    """
    n = ctx.x_worst.shape[0]
    if n == 0:
        return None
    sizes = (ctx.batch_size, second_batch_size(ctx.batch_size, n))
    robust = ctx.robust.to(ctx.x_worst.device)
    bad = torch.zeros(n, dtype=torch.bool, device=robust.device)
    ties = torch.zeros_like(bad)
    accuracies = []
    for size in sizes:
        still_correct, margin = rescore(ctx.model, ctx.x_worst, ctx.y, size)
        accuracies.append(still_correct.float().mean().item())
        differs = still_correct != robust
        tie = differs & (margin.abs() <= TIE_TOLERANCE)
        bad |= differs & ~tie
        ties |= tie
    if not bad.any() and not ties.any():
        return None
    reported = robust.float().mean().item()
    if not bad.any():
        return make_flag(
            "rescoring_ties",
            "some adversarial examples sit on the decision boundary (margin within float rounding); "
            "re-scoring them can flip their label",
            examples=int(ties.sum()), reported_robust_acc=reported,
        )
    return make_flag(
        "rescoring_mismatch",
        "re-scoring the adversarial examples on their own does not reproduce the reported robust "
        "accuracy: the result depends on the batch or the model is randomized",
        severity=ERROR, reported_robust_acc=reported, rescored_robust_acc=accuracies,
        batch_sizes=list(sizes), examples=int(bad.sum()),
        indices=ctx.indices[bad.cpu()].tolist()[:100],
    )


def check_black_box_only(ctx: CheckContext) -> Flag | None:
    """A black-box attack broke points every white-box attack left standing (Athalye 2018 s.3.1;
    AutoAttack's Square check): the gradients the white-box attacks followed are masked."""
    count = sum(int(flags.get("square_only", 0)) for flags in ctx.attack_flags.values())
    result, attacks = ctx.extras.get("result"), ctx.extras.get("attacks") or {}
    names = list(attacks)
    black = [n for n in names if getattr(attacks[n], "black_box", False)]
    white = [n for n in names if n not in black]
    ordered = result is not None and black and white and (
        result.mode == "individual" or max(map(names.index, white)) < min(map(names.index, black)))
    if ordered:
        by_white = torch.stack([result.attack_success[n] for n in white]).any(dim=0)
        by_black = torch.stack([result.attack_success[n] for n in black]).any(dim=0)
        count += int((by_black & ~by_white).sum())
    if count == 0:
        return None
    return make_flag(
        "black_box_only",
        "a black-box attack broke examples that the white-box attacks could not: their gradients "
        "are masked or obfuscated, and white-box robust accuracy alone would over-estimate robustness",
        examples=count,
    )


def _probe_correct(ctx: CheckContext) -> tuple[Tensor, Tensor, Tensor]:
    """The first PROBE_SIZE correctly classified examples and their per-example seeds."""
    ok = (ctx.clean_logits.argmax(dim=1).to(ctx.y.device) == ctx.y).nonzero().flatten()[:PROBE_SIZE]
    seeds = ctx.extras.get("seeds")
    seeds = seeds[ok.cpu()] if seeds is not None else ok.cpu()
    return ctx.x[ok], ctx.y[ok], seeds


def check_large_eps(ctx: CheckContext) -> Flag | None:
    """PGD at an eps covering the whole box must break every probe example (Athalye 2018 s.5;
    Carlini et al. 2019 checklist): an example that survives there is protected by masking."""
    from attacks.pgd import PGD
    from robustbench_lite.threat import ThreatModel

    threat = ctx.extras.get("threat")
    x, y, seeds = _probe_correct(ctx)
    if threat is None or x.shape[0] == 0:
        return None
    lo, hi = threat.box
    eps = (hi - lo) * (1.0 if threat.ops.p == float("inf") else x[0].numel() ** (1.0 / threat.ops.p))
    with torch.enable_grad():
        result = PGD(steps=20, abs_stepsize=eps / 4)(ctx.model, x, y, ThreatModel(threat.norm, eps, threat.box),
                                                     seeds=seeds)
    survivors = int((~result.success).sum())
    if survivors == 0:
        return None
    return make_flag(
        "large_eps_not_broken",
        f"PGD at eps={eps:g} (the whole input box) left {survivors} of {x.shape[0]} probe examples "
        "correctly classified; at that radius robust accuracy must be 0, so gradients are masked",
        eps=eps, survivors=survivors, probe_examples=x.shape[0],
    )


def check_more_iterations(ctx: CheckContext) -> Flag | None:
    """PGD with 5x the iterations (same seeds) must not be weaker: if robust accuracy rises with
    more iterations the attack is unstable on this model (randomness or masking)."""
    from attacks.pgd import PGD

    threat = ctx.extras.get("threat")
    x, y, seeds = _probe_correct(ctx)
    if threat is None or x.shape[0] == 0:
        return None
    with torch.enable_grad():
        short = PGD(steps=10, rel_stepsize=0.25)(ctx.model, x, y, threat, seeds=seeds)
        long = PGD(steps=50, rel_stepsize=0.05)(ctx.model, x, y, threat, seeds=seeds)
    robust_short, robust_long = int((~short.success).sum()), int((~long.success).sum())
    if robust_long <= robust_short:
        return None
    return make_flag(
        "more_iterations_weaker",
        "PGD with 50 iterations left more probe examples robust than with 10 (same starts): "
        "more iterations should never help the model; its outputs or gradients are unreliable",
        robust_10_steps=robust_short, robust_50_steps=robust_long, probe_examples=x.shape[0],
    )


#: refuted examples the certifier cross-check runs every certifier on (``evaluate(..., cross_check=True)``)
CROSS_CHECK_SIZE = 16


def refuted_sample(ctx: CheckContext, size: int, prefix: int | None = None) -> Tensor:
    """Positions (ascending) of up to ``size`` refuted examples (correct, broken by an attack or a checked
    counterexample) among the first ``prefix`` (default: all), chosen by their per-example seeds, so the
    sample depends on the run seed and the dataset indices only."""
    result = ctx.extras.get("result")
    if result is None:
        return torch.zeros(0, dtype=torch.long)
    refuted = (result.correct & ~result.robust).nonzero().flatten()
    if prefix is not None:
        refuted = refuted[refuted < prefix]
    seeds = ctx.extras.get("seeds")
    keys = seeds[refuted] if seeds is not None else refuted
    return refuted[torch.argsort(keys, stable=True)[:size]].sort().values


def cross_check_certifiers(ctx: CheckContext, size: int = CROSS_CHECK_SIZE) -> Flag | None:
    """Every certifier (``skip_refuted`` ones too, which the evaluation hands no refuted example) runs on a
    seeded sample of refuted examples: a sound certifier certifies none of them. The cheap certified <=
    robust check cannot see an unsound CROWN, LP or SDP; this one can. A certified refuted example is an
    error naming the certifier (the attack's point was checked: inside ball and box, misclassified). A
    certifier that ran on a prefix of the examples (``certifier_examples``) is checked within its prefix."""
    certifiers, threat = ctx.extras.get("certifiers") or {}, ctx.extras.get("threat")
    result = ctx.extras.get("result")
    prefixes = getattr(result, "certifier_examples", None) or {}
    if not certifiers or threat is None:
        return None
    culprits: dict[str, list[int]] = {}
    checked = set()
    for name, certifier in certifiers.items():
        sample = refuted_sample(ctx, size, prefixes.get(name))
        if sample.numel() == 0:
            continue
        x, y = ctx.x[sample.to(ctx.x.device)], ctx.y[sample.to(ctx.y.device)]
        certified = torch.cat([certifier(ctx.model, x[s:s + ctx.batch_size], y[s:s + ctx.batch_size], threat)
                               .certified.cpu() for s in range(0, x.shape[0], ctx.batch_size)])
        checked.update(sample.tolist())
        if certified.any():
            culprits[name] = ctx.indices[sample[certified]].tolist()
    log.info("cross-check: %s on %d refuted examples, %d certified", ", ".join(certifiers), len(checked),
             sum(len(v) for v in culprits.values()))
    if not culprits:
        return None
    return make_flag(
        "certified_refuted_example",
        f"certifier(s) {', '.join(culprits)} certified examples that an attack refuted with a checked point: "
        "the certifier is unsound (or its bound is off by rounding; docs/soundness.md)",
        severity=ERROR, examples=sum(len(v) for v in culprits.values()), checked=len(checked),
        indices=sorted({i for v in culprits.values() for i in v})[:100],
    )


#: the checks :func:`robustbench_lite.evaluation.core` runs, in order
CHECKS: list[Check] = [check_train_mode, check_randomized, check_probabilities, check_zero_gradients,
                       check_black_box_only, check_rescoring]
#: checks that re-run small attacks on a probe of examples (pass ``checks=CHECKS + ATTACK_CHECKS``)
ATTACK_CHECKS: list[Check] = [check_large_eps, check_more_iterations]


def run_checks(ctx: CheckContext, checks: list[Check] | None = None) -> list[Flag]:
    """Run ``checks`` (default :data:`CHECKS`) without gradients; return the flags they raise."""
    flags = []
    with torch.no_grad():
        for check in CHECKS if checks is None else checks:
            flag = check(ctx)
            if flag is not None:
                log.warning("check %s: %s", flag["name"], flag["explanation"])
                flags.append(flag)
    return flags


def has_errors(flags: list[Flag]) -> bool:
    return any(f.get("severity") == ERROR for f in flags)
