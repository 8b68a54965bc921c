"""One evaluated batch (:func:`evaluate_batch`), and the runners that decide where and whether each
batch is computed.

The evaluator (:mod:`robustbench_lite.evaluation.core`) cuts the examples into batches and asks a runner
for every batch's :class:`BatchOutcome`; the runner computes it here (:class:`LocalRunner`), loads it
from a resume folder (:class:`robustbench_lite.evaluation.resume.ResumeRunner`) or leaves it to another rank
and gathers it (:class:`robustbench_lite.evaluation.distributed.DistributedRunner`). Because every random draw
is seeded per example and batches are cut the same way, the outcomes, hence the numbers, are the
same whichever runner produced them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from certify.base import SKIPPED

from .claims import Claim, verify_claims
from ..errors import SoundnessError, UserInputError
from ..threat import ThreatModel

Compute = Callable[[int], "BatchOutcome"]
Done = Callable[[int], None]
Bounds = list[tuple[int, int]]


@dataclass
class BatchOutcome:
    """Rows ``start:stop`` of an evaluation: per-example flags (b,) bool, the deciding adversarial
    examples ``x_worst`` (b, ...), clean ``logits`` (b, K), minimal perturbations ``distance[name]``
    (b,) float (NaN where the attack did not run or found none; only attacks that report them), and
    ``costs[name]``: ``seconds``, ``forward``, ``backward``, ``queries``, ``examples``,
    ``forward_equivalents``, ``flags`` (summed counts) and ``status_counts`` of each plug-in;
    ``refuted[name]`` (b,) bool: a certifier's counterexample, checked by the evaluator, broke the
    (correctly classified) example (only certifiers that returned counterexamples); ``rejected[name]``
    (b,) uint8: why the evaluator rejected a plug-in's claimed point (:func:`robustbench_lite.evaluation.claims.verify_claims`
    codes; only plug-ins with a rejected claim)."""

    start: int
    stop: int
    correct: Tensor
    success: dict[str, Tensor]
    robust_after: dict[str, Tensor]
    certified: dict[str, Tensor]
    x_worst: Tensor
    logits: Tensor
    distance: dict[str, Tensor] = field(default_factory=dict)
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    refuted: dict[str, Tensor] = field(default_factory=dict)
    rejected: dict[str, Tensor] = field(default_factory=dict)

    _GROUPS = ("success", "robust_after", "certified", "distance", "refuted", "rejected")

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Flat CPU tensors and string metadata (the safetensors layout of a resume shard)."""
        tensors = {"correct": self.correct, "x_worst": self.x_worst, "logits": self.logits}
        for group in self._GROUPS:
            for name, t in getattr(self, group).items():
                tensors[f"{group}/{name}"] = t
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"start": str(self.start), "stop": str(self.stop), "costs": json.dumps(self.costs),
                "names": json.dumps({g: list(getattr(self, g)) for g in self._GROUPS})}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, str]) -> "BatchOutcome":
        names = json.loads(meta["names"])
        groups = {g: {n: tensors[f"{g}/{n}"] for n in names.get(g, [])} for g in cls._GROUPS}
        return cls(start=int(meta["start"]), stop=int(meta["stop"]), correct=tensors["correct"],
                   x_worst=tensors["x_worst"], logits=tensors["logits"], costs=json.loads(meta["costs"]), **groups)


class BatchRunner(Protocol):
    """Produces the outcome of every batch (rows ``bounds[i]``), in order; ``compute(i)`` evaluates
    batch i here; ``done(i)`` is called as this process settles batch i."""

    def run(self, bounds: Bounds, compute: Compute, done: Done | None = None) -> list[BatchOutcome]:
        ...


class LocalRunner:
    """Compute every batch here, one after the other."""

    def run(self, bounds: Bounds, compute: Compute, done: Done | None = None) -> list[BatchOutcome]:
        out = []
        for i in range(len(bounds)):
            out.append(compute(i))
            if done is not None:
                done(i)
        return out


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive batches of ``batch_size`` over ``n`` examples."""
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def as_bool(t: Tensor) -> Tensor:
    return t.detach().cpu().to(torch.bool)


# --- computing one batch --------------------------------------------------------------------------
#: status of an example a ``skip_refuted`` certifier was not run on: an attack already broke it
REFUTED = f"{SKIPPED}: refuted by an attack"
#: the same, when an earlier certifier's checked counterexample broke it
REFUTED_BY_COUNTEREXAMPLE = f"{SKIPPED}: refuted by a counterexample"
#: summed per plug-in over batches (``flags`` and ``status_counts`` are summed per key)
COST_FIELDS = ("seconds", "forward", "backward", "queries", "examples", "forward_equivalents")


def new_cost() -> dict[str, Any]:
    return {"seconds": 0.0, "forward": 0, "backward": 0, "queries": 0, "examples": 0, "forward_equivalents": 0.0,
            "flags": {}, "status_counts": {}}


def add_counts(total: dict[str, float], flags: dict[str, Any], prefix: str = "") -> None:
    """Sum an attack's numeric flags over batches; nested dicts become ``outer.inner`` keys."""
    for key, value in flags.items():
        if isinstance(value, dict):
            add_counts(total, value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[prefix + key] = total.get(prefix + key, 0) + value


def clean_logits(model: nn.Module, x: Tensor, num_classes: int | None) -> Tensor:
    """Logits of a clean batch; a model that cannot take the data is a user error, not a traceback."""
    try:
        with torch.no_grad():
            logits = model(x)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"the model cannot take inputs of shape {tuple(x.shape[1:])}: {first}") from None
    if logits.dim() == 2 and num_classes is not None and logits.shape[1] < num_classes:
        raise UserInputError(f"the model returns {logits.shape[1]} logits but the dataset has {num_classes} classes")
    return logits


def _check_returned(plugin: Any, result: Any, fields: tuple[str, ...], kind: str) -> None:
    """A plug-in that returns something other than its result type is a user error naming it."""
    missing = [f for f in fields if not hasattr(result, f)]
    if missing:
        name = getattr(plugin, "name", getattr(plugin, "__name__", type(plugin).__name__))
        role = "attack" if kind == "AttackResult" else "certifier"
        raise UserInputError(f"{role} {name!r} returned {type(result).__name__}, not a {kind} "
                             f"(missing {', '.join(missing)})")


def attack_batch(attack: Any, cost: dict[str, Any], model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                 seeds: Tensor, todo: Tensor, alive: Tensor, worst: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """Run ``attack`` on rows ``todo`` of the batch; add its cost to ``cost``; return its successes
    (cpu), its minimal perturbations (cpu, or None when the attack reports none) and the points it
    claims broke the successful rows (for :func:`robustbench_lite.evaluation.claims.verify_claims`).

    ``worst`` (the batch's deciding adversarial examples) takes the attack's points where it is the
    first to break an example, or where the example is still robust (so robust rows hold the last).
    """
    dev_todo = todo.to(x.device)
    started = time.perf_counter()
    res = attack(model, x[dev_todo], y[dev_todo], threat, seeds=seeds[todo])
    cost["seconds"] += time.perf_counter() - started
    _check_returned(attack, res, ("x_adv", "success", "forward", "backward", "queries"), "AttackResult")
    cost["forward"] += int(res.forward)
    cost["backward"] += int(res.backward)
    cost["queries"] += int(res.queries)
    cost["examples"] += int(todo.numel())
    add_counts(cost["flags"], res.flags or {})
    hit = res.success.cpu().bool()
    take = alive[todo]  # still robust before this attack: its point decides (first break, or latest survivor)
    worst[dev_todo[take.to(x.device)]] = res.x_adv[take.to(x.device)].detach().to(worst.dtype)
    distance = getattr(res, "distance", None)
    claimed = res.x_adv[hit.to(res.x_adv.device)].detach()
    return hit, (None if distance is None else distance.detach().cpu().float()), claimed


def beyond_prefix(prefix: int) -> str:
    """Status of an example past the prefix a certifier is run on (e.g. a complete verifier's first 200)."""
    return f"{SKIPPED}: beyond the first {prefix} examples"


def certifier_prefixes(certifier_examples: dict[str, int] | None, names: list[str], n: int) -> dict[str, int]:
    """``{name: N}`` checked against the certifiers' names, N >= 1 and capped at the ``n`` evaluated
    examples (a prefix covering everything is no prefix, so it is dropped)."""
    out = {}
    for name, count in (certifier_examples or {}).items():
        if name not in names:
            raise UserInputError(f"certifier_examples names {name!r}, which is not among the certifiers "
                                 f"({', '.join(names) or 'none'})")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UserInputError(f"certifier_examples[{name!r}] must be a positive integer, got {count!r}")
        if count < n:
            out[name] = count
    return out


def certifier_rows(certifier: Any, start: int, ok: Tensor, alive: Tensor, countered: Tensor,
                   prefix: int | None) -> tuple[Tensor, list[str]]:
    """Batch rows a certifier runs on, and the status of the others: rows at evaluation position
    ``>= prefix`` (when given) are beyond its prefix; a ``skip_refuted`` certifier skips correct rows
    already broken, by an attack (``REFUTED``) or by a checked counterexample (``countered``)."""
    b = ok.shape[0]
    run = torch.ones(b, dtype=torch.bool)
    statuses = [""] * b
    if prefix is not None:
        beyond = start + torch.arange(b) >= prefix
        for i in beyond.nonzero().flatten().tolist():
            statuses[i] = beyond_prefix(prefix)
        run &= ~beyond
    if getattr(certifier, "skip_refuted", False):
        broken = run & ok & ~alive  # attacks only run on, and only break, correct rows
        for i in broken.nonzero().flatten().tolist():
            statuses[i] = REFUTED_BY_COUNTEREXAMPLE if countered[i] else REFUTED
        run &= ~broken
    return run.nonzero().flatten(), statuses


def take_counterexamples(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, name: str, rows: Tensor,
                         result: Any, ok: Tensor, alive: Tensor, worst: Tensor,
                         rejected: dict[str, Tensor]) -> Tensor | None:
    """The (b,) rows a certifier's counterexamples break, after the evaluator's own check of every point
    (:func:`robustbench_lite.evaluation.claims.verify_claims`; rejected points do not count and land in
    ``rejected[name]``). A broken row leaves ``alive``; where it was still robust its point becomes the
    row's ``worst``. None when the certifier returned no counterexamples."""
    points = getattr(result, "counterexample", None)
    if points is None:
        return None
    if tuple(points.shape) != (rows.numel(), *x.shape[1:]):
        raise SoundnessError(f"certifier {name!r} returned counterexamples of shape {tuple(points.shape)} for "
                             f"{rows.numel()} examples of shape {tuple(x.shape[1:])}")
    claimed = ~torch.isnan(points.detach().flatten(1)).all(dim=1).cpu()
    rejected.update(verify_claims(model, x, y, threat, [Claim(name, "certifier", rows[claimed],
                                                               points[claimed.to(points.device)])]))
    broke = torch.zeros(ok.shape[0], dtype=torch.bool)
    broke[rows[claimed]] = True
    broke &= ok
    if name in rejected:
        broke &= rejected[name] == 0
    full = torch.full_like(worst, float("nan"))
    full[rows.to(x.device)] = points.detach().to(full.device, full.dtype)
    newly = (broke & alive).to(x.device)
    worst[newly] = full[newly]
    alive &= ~broke
    return broke


def _verified_attacks(success: dict[str, Tensor], rejected: dict[str, Tensor], ok: Tensor,
                      individual: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """Drop the attacks' rejected claims from ``success`` (in place); return the rows still robust and
    every attack's robust-after flags (cascade: after it and those before it; individual: it alone)."""
    broken = torch.zeros_like(ok)
    robust_after = {}
    for name, hit in success.items():
        if name in rejected:
            hit &= rejected[name] == 0
        broken |= hit
        robust_after[name] = ok & ~(hit if individual else broken)
    return ok & ~broken, robust_after


def evaluate_batch(model: nn.Module, x: Tensor, y: Tensor, seeds: Tensor, start: int, threat: ThreatModel,
                   attacks: list[tuple[str, Any]], certifiers: list[tuple[str, Any]], individual: bool,
                   num_classes: int | None, certifier_examples: dict[str, int] | None = None) -> BatchOutcome:
    """Clean pass, the attacks (a cascade over the rows still robust, or each on every correct row)
    and every certifier on one batch ``x`` (b, ...) / ``y`` (b,) with per-example ``seeds`` (b,).

    Every point an attack or a certifier claims broke an example is checked here before it counts
    (:mod:`robustbench_lite.evaluation.claims`; rejected claims are kept in ``rejected``). ``certifier_examples[name]``:
    run that certifier only on the first N examples of the evaluation (``start``: this batch's first)."""
    from attacks.base import check_logits

    b = x.shape[0]
    logits = clean_logits(model, x, num_classes)
    check_logits(logits, b)
    ok = (logits.argmax(dim=1) == y).cpu()
    alive, worst = ok.clone(), x.clone()
    costs = {name: new_cost() for name, _ in attacks + certifiers}
    success = {name: torch.zeros(b, dtype=torch.bool) for name, _ in attacks}
    distance: dict[str, Tensor] = {}
    claims: list[Claim] = []
    for name, attack in attacks:
        todo = (ok if individual else alive).nonzero().flatten()
        if todo.numel():
            hit, dist, points = attack_batch(attack, costs[name], model, x, y, threat, seeds, todo, alive, worst)
            claims.append(Claim(name, "attack", todo[hit], points))
            success[name][todo[hit]] = True
            alive[todo[hit]] = False
            if dist is not None:
                distance[name] = torch.full((b,), float("nan"))
                distance[name][todo] = torch.where(torch.isfinite(dist), dist, torch.full_like(dist, float("nan")))
    rejected = verify_claims(model, x, y, threat, claims)  # no attack's word is taken: one forward for all
    alive, robust_after = _verified_attacks(success, rejected, ok, individual)
    certified: dict[str, Tensor] = {}
    refuted: dict[str, Tensor] = {}
    for name, certifier in certifiers:
        cost = costs[name]
        countered = torch.stack(list(refuted.values())).any(dim=0) if refuted else torch.zeros(b, dtype=torch.bool)
        rows, statuses = certifier_rows(certifier, start, ok, alive, countered,
                                        (certifier_examples or {}).get(name))
        certified[name] = torch.zeros(b, dtype=torch.bool)
        if rows.numel():
            t0 = time.perf_counter()
            idx = rows.to(x.device)
            res = certifier(model, x[idx], y[idx], threat)
            _check_returned(certifier, res, ("certified", "margin_lower", "status"), "CertResult")
            cost["seconds"] += time.perf_counter() - t0
            cost["forward_equivalents"] += float(getattr(res, "forward_equivalents", 0.0) or 0.0)
            certified[name][rows] = as_bool(res.certified)
            for i, status in zip(rows.tolist(), res.status):
                statuses[i] = status
            broke = take_counterexamples(model, x, y, threat, name, rows, res, ok, alive, worst, rejected)
            if broke is not None:
                refuted[name] = broke
        cost["examples"] += b
        for status in statuses:
            key = status.split(":")[0]
            cost["status_counts"][key] = cost["status_counts"].get(key, 0) + 1
    return BatchOutcome(start=start, stop=start + b, correct=ok, success=success, robust_after=robust_after,
                        certified=certified, x_worst=worst.detach().cpu(), logits=logits.detach().cpu(),
                        distance=distance, costs=costs, refuted=refuted, rejected=rejected)
