"""The common evaluator: clean, robust and certified accuracy from per-example flags.

``evaluate(model, dataset, threat)`` runs attacks as a cascade over the points still robust (as in
AutoAttack, Croce & Hein 2020) or each on every correct point (``individual=True``), runs the
certifiers (cheap ones such as IBP on every example; ``skip_refuted`` ones such as CROWN, LP and SDP
only on the examples no attack refuted: the others read ``skipped: refuted by an attack``; each on a
stated prefix if ``certifier_examples`` says so), and checks per example that certified <= robust <=
correct. That check sees only what the certifiers were given; ``cross_check=True`` also runs every
certifier on a seeded sample of refuted examples and raises if any certifies one
(:func:`robustbench_lite.evaluation.checks.cross_check_certifiers`). No plug-in's word is taken: every point an
attack or a complete verifier claims broke an example is checked first (:mod:`robustbench_lite.evaluation.claims`).
Robust accuracy is the per-example worst case over all attacks and checked counterexamples, never an
average of per-attack figures.
Every random draw is seeded per example from ``seed`` and the dataset index, so results do not
depend on batch size or order. Shapes: dataset.x (N, C, H, W) in [0, 1], dataset.y (N,) int64.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from . import checks as checks_module
from .claims import rejected_claims_flag
from ..errors import SoundnessError, UserInputError, checked_int, first_line, short_repr
from ..hashing import indices_sha256
from .outcome import (COST_FIELDS, BatchOutcome, BatchRunner, LocalRunner, add_counts, batch_bounds,
                      certifier_prefixes, evaluate_batch)
from ..seeding import example_seeds
from ..threat import ThreatModel

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class PluginReport:
    """Cost and outcome of one attack or certifier over the whole evaluation.

    ``accuracy``: for an attack, robust accuracy after it (cascade: after it and every attack before
    it; individual: under it alone); for a certifier, its certified accuracy. ``examples``: how many
    examples it was run on. Passes are example-passes (sum of batch sizes).
    """

    name: str
    kind: str
    config: dict[str, Any]
    accuracy: float = 0.0
    examples: int = 0
    seconds: float = 0.0
    forward: int = 0
    backward: int = 0
    queries: int = 0
    forward_equivalents: float = 0.0
    flags: dict[str, float] = field(default_factory=dict)
    status_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """Per-example flags (all (N,) bool, in evaluation order) and what produced them.

    ``attack_success[name]``: the attack broke the example (False where it did not run);
    ``certified_by[name]``: the certifier certified it; ``violations``: dataset indices where
    certified <= robust <= correct failed; ``flags``: checks' flags (see :mod:`robustbench_lite.evaluation.checks`);
    ``distances[name]``: (N,) minimal perturbations a minimum-norm attack found (NaN where none / not run);
    ``groups``: (N,) int64 group id of each example when the dataset has groups (``group_names[id]``);
    ``corruption_correct[name]``: (5, N) bool, correct under a corruption at severity 1..5 (corruption runs);
    ``refuted_by[name]``: (N,) bool, a certifier's checked counterexample broke the example (certifiers
    that returned counterexamples); ``certifier_examples[name]``: the certifier ran only on the first
    that many examples (the others read ``skipped: beyond the first N examples``); ``rejected[name]``:
    (N,) uint8, why the evaluator rejected a plug-in's claimed point (:mod:`robustbench_lite.evaluation.claims`);
    ``clean_logits`` (N, K) and, when attacks ran, ``adversarial_logits`` (N, K) at each example's
    deciding adversarial point (the breaking one, else the last attack's; the clean input where no attack ran).
    """

    dataset: str
    split: str
    indices: Tensor
    threat: ThreatModel
    seed: int
    batch_size: int
    device: str
    mode: str
    correct: Tensor
    attack_success: dict[str, Tensor]
    certified_by: dict[str, Tensor]
    attacks: list[PluginReport]
    certifiers: list[PluginReport]
    flags: list[dict[str, Any]] = field(default_factory=list)
    violations: list[int] = field(default_factory=list)
    seconds: float = 0.0
    clean_forward: int = 0
    distances: dict[str, Tensor] = field(default_factory=dict)
    groups: Tensor | None = None
    group_names: list[str] | None = None
    corruption_correct: dict[str, Tensor] | None = None
    refuted_by: dict[str, Tensor] = field(default_factory=dict)
    certifier_examples: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, Tensor] = field(default_factory=dict)
    clean_logits: Tensor | None = None
    adversarial_logits: Tensor | None = None

    @property
    def n_examples(self) -> int:
        return int(self.correct.shape[0])

    @property
    def robust(self) -> Tensor:
        """Correct and broken by no attack and no checked counterexample: the per-example worst case."""
        broken = torch.zeros_like(self.correct)
        for success in [*self.attack_success.values(), *self.refuted_by.values()]:
            broken |= success
        return self.correct & ~broken

    @property
    def certified(self) -> Tensor:
        """Certified by any certifier."""
        out = torch.zeros_like(self.correct)
        for flags in self.certified_by.values():
            out |= flags
        return out

    @property
    def clean_acc(self) -> float:
        return _mean(self.correct)

    @property
    def robust_acc(self) -> float:
        return _mean(self.robust)

    @property
    def certified_acc(self) -> float:
        return _mean(self.certified)

    @property
    def indices_sha256(self) -> str:
        return indices_sha256(self.indices)

    @property
    def number_forward_passes(self) -> int:
        """Example-forward passes of the clean pass and every attack (RobustBench's field)."""
        return self.clean_forward + sum(r.forward for r in self.attacks)

    def summary(self) -> dict[str, float]:
        return {"clean_acc": self.clean_acc, "robust_acc": self.robust_acc, "certified_acc": self.certified_acc}


def _mean(flags: Tensor) -> float:
    return int(flags.sum().item()) / flags.numel() if flags.numel() else 0.0


def _resolve(items: Sequence[Any] | str | None, kind: str) -> list[tuple[str, Any]]:
    """Names or instances -> unique (name, plug-in) pairs; names use the registry's defaults."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    registry, cls = None, _plugin_base(kind)
    out: list[tuple[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            if registry is None:
                registry = _registry(kind)
            try:
                plugin = registry.create(item.strip())
            except TypeError as exc:  # e.g. a required option such as transfer's surrogate
                raise UserInputError(f"{kind} {item.strip()!r} cannot be built from its name alone ({first_line(exc)}); "
                                     "build it in Python or give its options in a registry entry") from None
        else:
            plugin = item
        # a third-party plug-in may implement the call contract without the base class: the evaluator
        # re-checks every point it claims (robustbench_lite.evaluation.claims), so only non-callables are refused here
        if not (isinstance(plugin, cls) or (callable(plugin) and not isinstance(plugin, type))):
            raise UserInputError(f"{kind} {short_repr(plugin)} is neither a registered name nor a "
                                 f"{cls.__module__}.{cls.__name__} (or a callable {kind})")
        base = str(getattr(plugin, "name", type(plugin).__name__)).lower()
        name, k = base, 2
        while any(name == n for n, _ in out):
            name, k = f"{base}#{k}", k + 1
        out.append((name, plugin))
    return out


def _plugin_base(kind: str) -> type:
    """The class every plug-in of ``kind`` derives from (its ``__call__`` checks inputs and re-scores)."""
    if kind == "attack":
        from attacks.base import Attack
        return Attack
    from certify.base import Certifier
    return Certifier


def _registry(kind: str):
    if kind == "attack":
        from attacks import ATTACKS
        return ATTACKS
    from certify import CERTIFIERS
    return CERTIFIERS


def _config(plugin: Any) -> dict[str, Any]:
    config = getattr(plugin, "config", None)
    return dict(config()) if callable(config) else {}


def resolve_device(device: str | torch.device) -> torch.device:
    """A device that holds real tensors on this machine (cpu, an existing cuda:N, mps), else UserInputError."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserInputError(f"unknown device {device!r}") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if target.type not in available:
        raise UserInputError(f"device {device!r} cannot run an evaluation: use cpu, cuda or cuda:N")
    if not available[target.type] or (target.type == "cuda" and (target.index or 0) >= torch.cuda.device_count()):
        raise UserInputError(f"device {device!r} is not available on this machine")
    return target


def evaluation_examples(model: Any, dataset: Any, n_examples: int | None, batch_size: int) -> Any:
    """The first ``n_examples`` of ``dataset`` (a Dataset, or a dataset name: its test split), after the
    checks every evaluation makes: ``model`` is an nn.Module, ``batch_size`` >= 1, ``n_examples`` >= 1
    (more than the split holds evaluates all of it), at least one example, inputs in [0, 1]."""
    from ..data import Dataset, load_dataset

    if not isinstance(model, nn.Module):
        raise UserInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    checked_int("batch_size", batch_size, minimum=1)
    if isinstance(dataset, str):
        dataset = load_dataset(dataset, "test")
    if not isinstance(dataset, Dataset):
        raise UserInputError(f"dataset must be a Dataset or a dataset name, got {type(dataset).__name__}")
    total = len(dataset)
    if n_examples is not None:
        checked_int("n_examples", n_examples, minimum=1)
        if int(n_examples) > total:
            log.info("n_examples=%d > %d examples in the split: evaluating all of them", n_examples, total)
        dataset = dataset.subset(slice(0, min(int(n_examples), total)))
    if len(dataset) == 0:
        raise UserInputError("the dataset has no examples to evaluate")
    x_min, x_max = float(dataset.x.min()), float(dataset.x.max())
    if x_min < 0 or x_max > 1:
        raise UserInputError(f"inputs must lie in [0, 1] (got [{x_min:.4g}, {x_max:.4g}]); "
                             "normalization belongs inside the model, not the data")
    return dataset


def evaluate(model: nn.Module, dataset: Any, threat: ThreatModel, attacks: Sequence[Any] | str | None = ("pgd",),
             certifiers: Sequence[Any] | str | None = ("ibp",), n_examples: int | None = 1000,
             batch_size: int = 250, seed: int = 0, device: str | torch.device = "cpu",
             individual: bool = False, progress: Progress | bool | None = None,
             checks: list[checks_module.Check] | None = None, runner: BatchRunner | None = None,
             certifier_examples: dict[str, int] | None = None, unsupported: str = "skip",
             cross_check: bool | int = False) -> EvaluationResult:
    """Evaluate ``model`` on the first ``n_examples`` of ``dataset`` under ``threat``.

    ``dataset``: a Dataset or a dataset name (its test split). ``attacks`` / ``certifiers``:
    registry names (default configs) or instances. ``progress``: a
    callback ``(examples_done, total)`` or True for a tqdm bar on stderr. The model is evaluated in
    eval mode (its mode is restored afterwards) and moved to ``device``. Raises
    :class:`SoundnessError` (with ``.result`` set) when certified <= robust <= correct fails or the
    adversarial examples re-scored alone disagree with the report; NonFiniteOutputError on NaN logits.
    ``runner`` decides where each batch is computed: here (default), resumed from disk
    (:class:`robustbench_lite.evaluation.resume.ResumeRunner`) or shared over ranks
    (:class:`robustbench_lite.evaluation.distributed.DistributedRunner`); the numbers are the same.
    ``certifier_examples``: ``{certifier name: N}`` runs that certifier on the first N examples only
    (e.g. a complete verifier on a prefix of a table that attacks and cheap certifiers cover whole).
    Every point an attack or a certifier claims broke an example is checked by the evaluator first
    (inside ball and box in float64, misclassified on a fresh forward pass): a failing point does not
    count, and the evaluation raises :class:`SoundnessError` (result attached) naming the plug-in. A
    certifier's checked counterexample counts against robust accuracy (``refuted_by``).
    ``unsupported``: what a certifier that cannot handle the model does: ``"skip"`` (its examples read
    ``skipped: unsupported layers: ...``, listed once in the flag ``certifier_unsupported``, and the
    attacks run) or ``"error"`` (:class:`UnsupportedModelError` before anything runs).
    ``cross_check``: True (16 examples) or a number of refuted examples every certifier is run on, after
    the evaluation; :class:`SoundnessError` if any certifies one. It changes no number.
    """
    if not isinstance(threat, ThreatModel):
        raise UserInputError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    dataset = evaluation_examples(model, dataset, n_examples, batch_size)
    threat.check_inputs(dataset.x, dataset.y)
    checked_int("seed", seed)
    batch_size, dev = int(batch_size), resolve_device(device)
    attack_list, cert_list = _resolve(attacks, "attack"), _resolve(certifiers, "certifier")
    checks = _with_cross_check(checks, cross_check)
    if set(n for n, _ in attack_list) & set(n for n, _ in cert_list):
        raise UserInputError("an attack and a certifier share a name; give them distinct names")
    prefixes = certifier_prefixes(certifier_examples, [n for n, _ in cert_list], len(dataset))
    white_box = [n for n, a in attack_list if not getattr(a, "black_box", False)]
    if threat.access == "gray-box" and white_box:
        raise UserInputError(f"attack {white_box[0]!r} uses the model's gradients; a gray-box threat model allows "
                             "only attacks that query it (e.g. transfer attacks)")
    from certify.base import guard_unsupported

    cert_list, skipped = guard_unsupported(cert_list, model, tuple(dataset.x.shape[1:]), unsupported)

    was_training = any(m.training for m in model.modules())
    modes = [(m, m.training) for m in model.modules()]
    model.to(dev)
    model.eval()
    try:
        result, ctx = _run(model, dataset, threat, attack_list, cert_list, batch_size, int(seed), dev,
                           bool(individual), progress, runner, prefixes)
        ctx.model_was_training = was_training
        model.eval()
        result.flags = checks_module.run_checks(ctx, checks)
        result.flags += [checks_module.make_flag("certifier_unsupported", f"{name} skipped: {reason}",
                                                 examples=result.n_examples) for name, reason in skipped.items()]
    finally:
        for m, mode in modes:
            m.training = mode
    _check_invariant(result)
    _flag_rejected_claims(result, attack_list, cert_list)
    errors = [f for f in result.flags if f.get("severity") == checks_module.ERROR]
    if errors:
        where = errors[0]["values"].get("indices") or []
        err = SoundnessError(f"{errors[0]['name']}: {errors[0]['explanation']}"
                             + (f" (dataset indices {where[:10]})" if where else ""))
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


def _flag_rejected_claims(result: EvaluationResult, attack_list: list, cert_list: list) -> None:
    """Claims the evaluator rejected (a point outside ball ∩ box, or not misclassified) become the
    first error flag: the evaluation then raises SoundnessError naming the plug-ins."""
    kinds = {**{n: "attack" for n, _ in attack_list}, **{n: "certifier" for n, _ in cert_list}}
    flag = rejected_claims_flag(result.rejected, kinds, result.indices, result.threat)
    if flag is not None:
        result.flags.insert(0, flag)


def _with_cross_check(checks: list[checks_module.Check] | None,
                      cross_check: bool | int) -> list[checks_module.Check] | None:
    """``checks`` (default: the standard ones) plus the certifier cross-check when asked for."""
    if isinstance(cross_check, bool):
        size = checks_module.CROSS_CHECK_SIZE if cross_check else 0
    elif isinstance(cross_check, int) and cross_check >= 0:
        size = cross_check
    else:
        raise UserInputError(f"cross_check must be a bool or a number of examples >= 0, got {cross_check!r}")
    if size == 0:
        return checks
    return list(checks_module.CHECKS if checks is None else checks) + [
        lambda ctx: checks_module.cross_check_certifiers(ctx, size)]


def _check_invariant(result: EvaluationResult) -> None:
    """certified <= robust <= correct per example; a violation becomes an error flag."""
    robust, certified = result.robust, result.certified
    bad = (certified & ~robust) | (robust & ~result.correct)
    if not bad.any():
        return
    result.violations = result.indices[bad.cpu()].tolist()
    culprits = [n for n, c in result.certified_by.items() if (c & ~robust).any()]
    result.flags.insert(0, checks_module.make_flag(
        "soundness_violation",
        f"certified <= robust <= correct fails on {int(bad.sum())} example(s): certifier(s) "
        f"{', '.join(culprits) or '?'} certified points an attack or a checked counterexample broke, "
        "or the model misclassifies",
        severity=checks_module.ERROR, examples=int(bad.sum()), indices=result.violations[:100],
    ))


def _progress_callback(progress: Progress | bool | None, total: int) -> tuple[Progress | None, Any]:
    if progress is True:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="ex", desc="evaluate", leave=False)
        return (lambda done, _total: bar.update(done - bar.n)), bar
    return (progress if callable(progress) else None), None


def _add_cost(report: PluginReport, cost: dict[str, Any]) -> None:
    """Add one batch's cost of a plug-in to its report."""
    for key in COST_FIELDS:
        setattr(report, key, getattr(report, key) + cost.get(key, 0))
    add_counts(report.flags, cost.get("flags", {}))
    for key, count in cost.get("status_counts", {}).items():
        report.status_counts[key] = report.status_counts.get(key, 0) + count


def _run(model: nn.Module, dataset: Any, threat: ThreatModel, attack_list: list[tuple[str, Any]],
         cert_list: list[tuple[str, Any]], batch_size: int, seed: int, dev: torch.device,
         individual: bool, progress: Progress | bool | None, runner: BatchRunner | None = None,
         prefixes: dict[str, int] | None = None) -> tuple[EvaluationResult, checks_module.CheckContext]:
    n = len(dataset)
    indices = dataset.indices.cpu()
    seeds_all = example_seeds(seed, indices)
    x_all, y_all = dataset.x, dataset.y.to(torch.int64)
    bounds = batch_bounds(n, batch_size)
    num_classes = getattr(dataset, "num_classes", None)

    def compute(i: int) -> BatchOutcome:
        start, stop = bounds[i]
        return evaluate_batch(model, x_all[start:stop].to(dev), y_all[start:stop].to(dev), seeds_all[start:stop],
                              start, threat, attack_list, cert_list, individual, num_classes, prefixes)

    callback, bar = _progress_callback(progress, n)
    settled = 0

    def done(i: int) -> None:
        nonlocal settled
        settled += bounds[i][1] - bounds[i][0]
        if callback is not None:
            callback(settled, n)

    started = time.perf_counter()
    try:
        outcomes = (runner or LocalRunner()).run(bounds, compute, done)
    finally:
        if bar is not None:
            bar.close()
    reports = {name: PluginReport(name, "attack", _config(a)) for name, a in attack_list}
    reports.update({name: PluginReport(name, "certifier", _config(c)) for name, c in cert_list})
    for outcome in outcomes:
        for name, cost in outcome.costs.items():
            _add_cost(reports[name], cost)
    correct = torch.cat([o.correct for o in outcomes])
    success = {name: torch.cat([o.success[name] for o in outcomes]) for name, _ in attack_list}
    certified = {name: torch.cat([o.certified[name] for o in outcomes]) for name, _ in cert_list}
    robust_after = {name: torch.cat([o.robust_after[name] for o in outcomes]) for name, _ in attack_list}
    distances = {name: torch.cat([o.distance.get(name, torch.full((o.stop - o.start,), float("nan")))
                                  for o in outcomes])
                 for name, _ in attack_list if any(name in o.distance for o in outcomes)}
    refuted = {name: torch.cat([o.refuted.get(name, torch.zeros(o.stop - o.start, dtype=torch.bool))
                                for o in outcomes])
               for name, _ in cert_list if any(name in o.refuted for o in outcomes)}
    rejected = {name: torch.cat([o.rejected.get(name, torch.zeros(o.stop - o.start, dtype=torch.uint8))
                                 for o in outcomes])
                for name, _ in attack_list + cert_list if any(name in o.rejected for o in outcomes)}
    x_worst = torch.cat([o.x_worst for o in outcomes]).to(x_all.dtype)
    logits_all = [o.logits for o in outcomes]
    adversarial_logits = _logits_at(model, x_worst, batch_size, dev) if attack_list else None
    for name, _ in attack_list:
        reports[name].accuracy = _mean(robust_after[name])
    for name, _ in cert_list:
        reports[name].accuracy = _mean(certified[name])
    result = EvaluationResult(
        dataset=str(getattr(dataset, "name", "custom")), split=str(getattr(dataset, "split", "test")),
        indices=indices, threat=threat, seed=seed, batch_size=batch_size, device=str(dev),
        mode="individual" if individual else "cascade", correct=correct, attack_success=success,
        certified_by=certified, attacks=[reports[n_] for n_, _ in attack_list],
        certifiers=[reports[n_] for n_, _ in cert_list], seconds=time.perf_counter() - started,
        clean_forward=n, distances=distances, **group_fields(dataset), refuted_by=refuted,
        certifier_examples=dict(prefixes or {}), rejected=rejected,
        clean_logits=torch.cat(logits_all).cpu(), adversarial_logits=adversarial_logits,
    )
    ctx = checks_module.CheckContext(
        model=model, x=x_all.to(dev), y=y_all.to(dev), indices=indices, clean_logits=torch.cat(logits_all),
        x_worst=x_worst.to(dev), robust=result.robust.to(dev), batch_size=batch_size,
        attack_flags={r.name: r.flags for r in result.attacks},
        extras={"threat": threat, "result": result, "attacks": dict(attack_list), "certifiers": dict(cert_list),
                "seeds": seeds_all},
    )
    return result, ctx


def _logits_at(model: nn.Module, x: Tensor, batch_size: int, dev: torch.device) -> Tensor:
    """Logits (N, K) on the CPU of the points ``x`` (N, ...), in batches (the model is in eval mode)."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])


def group_fields(dataset: Any) -> dict[str, Any]:
    """``groups`` ((N,) int64 group ids on the CPU) and ``group_names`` of the dataset for an
    EvaluationResult; both None when it has no groups."""
    groups, names = getattr(dataset, "groups", None), getattr(dataset, "group_names", None)
    if groups is None or names is None:
        return {"groups": None, "group_names": None}
    return {"groups": torch.as_tensor(groups).cpu().to(torch.int64), "group_names": list(names)}
