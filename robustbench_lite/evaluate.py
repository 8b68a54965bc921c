"""The common evaluator: clean, robust and certified accuracy from per-example flags.

``evaluate(model, dataset, threat)`` runs attacks as a cascade over the points still robust (as in
AutoAttack, Croce & Hein 2020) or each on every correct point (``individual=True``), runs every
certifier on every example, and checks per example that certified <= robust <= correct. Robust
accuracy is the per-example worst case over all attacks, never an average of per-attack figures.
Every random draw is seeded per example from ``seed`` and the dataset index, so results do not
depend on batch size or order. Shapes: dataset.x (N, C, H, W) in [0, 1], dataset.y (N,) int64.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from . import checks as checks_module
from .errors import SoundnessError, UserInputError
from .seeding import example_seeds
from .threat import ThreatModel

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
    certified <= robust <= correct failed; ``flags``: checks' flags (see :mod:`robustbench_lite.checks`).
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

    @property
    def n_examples(self) -> int:
        return int(self.correct.shape[0])

    @property
    def robust(self) -> Tensor:
        """Correct and broken by no attack: the per-example worst case."""
        broken = torch.zeros_like(self.correct)
        for success in self.attack_success.values():
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


def indices_sha256(indices: Tensor | Sequence[int]) -> str:
    """sha256 of the ASCII, comma-separated decimal indices in evaluation order."""
    idx = indices.tolist() if torch.is_tensor(indices) else list(indices)
    return hashlib.sha256(",".join(str(int(i)) for i in idx).encode("ascii")).hexdigest()


def _mean(flags: Tensor) -> float:
    return int(flags.sum().item()) / flags.numel() if flags.numel() else 0.0


def _resolve(items: Sequence[Any] | str | None, kind: str) -> list[tuple[str, Any]]:
    """Names or instances -> unique (name, plug-in) pairs; names use the registry's defaults."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    registry = None
    out: list[tuple[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            if registry is None:
                registry = _registry(kind)
            plugin = registry.create(item.strip())
        else:
            plugin = item
        if not callable(plugin):
            raise UserInputError(f"{kind} {plugin!r} is neither a registered name nor a callable {kind}")
        base = str(getattr(plugin, "name", type(plugin).__name__)).lower()
        name, k = base, 2
        while any(name == n for n, _ in out):
            name, k = f"{base}#{k}", k + 1
        out.append((name, plugin))
    return out


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
    """A torch device that exists on this machine, else UserInputError."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserInputError(f"unknown device {device!r}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} is not available on this machine")
    return target


def evaluate(model: nn.Module, dataset: Any, threat: ThreatModel, attacks: Sequence[Any] | str | None = ("pgd",),
             certifiers: Sequence[Any] | str | None = ("ibp",), n_examples: int | None = 1000,
             batch_size: int = 250, seed: int = 0, device: str | torch.device = "cpu",
             individual: bool = False, progress: Progress | bool | None = None,
             checks: list[checks_module.Check] | None = None) -> EvaluationResult:
    """Evaluate ``model`` on the first ``n_examples`` of ``dataset`` under ``threat``.

    ``dataset``: a Dataset or a dataset name (its test split). ``attacks`` / ``certifiers``:
    registry names (default configs) or instances. ``progress``: a
    callback ``(examples_done, total)`` or True for a tqdm bar on stderr. The model is evaluated in
    eval mode (its mode is restored afterwards) and moved to ``device``. Raises
    :class:`SoundnessError` (with ``.result`` set) when certified <= robust <= correct fails or the
    adversarial examples re-scored alone disagree with the report; NonFiniteOutputError on NaN logits.
    """
    if not isinstance(threat, ThreatModel):
        raise UserInputError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    if not isinstance(model, nn.Module):
        raise UserInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if int(batch_size) < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(dataset, str):
        from .data import load_dataset
        dataset = load_dataset(dataset, "test")
    total = len(dataset)
    if n_examples is not None:
        if int(n_examples) < 1:
            raise UserInputError(f"n_examples must be >= 1, got {n_examples}")
        if int(n_examples) > total:
            log.info("n_examples=%d > %d examples in the split: evaluating all of them", n_examples, total)
        dataset = dataset.subset(slice(0, min(int(n_examples), total)))
    if len(dataset) == 0:
        raise UserInputError("the dataset has no examples to evaluate")
    x_min, x_max = float(dataset.x.min()), float(dataset.x.max())
    if x_min < 0 or x_max > 1:
        raise UserInputError(f"inputs must lie in [0, 1] (got [{x_min:.4g}, {x_max:.4g}]); "
                             "normalization belongs inside the model, not the data")
    threat.check_inputs(dataset.x, dataset.y)
    batch_size, dev = int(batch_size), resolve_device(device)
    attack_list, cert_list = _resolve(attacks, "attack"), _resolve(certifiers, "certifier")
    if set(n for n, _ in attack_list) & set(n for n, _ in cert_list):
        raise UserInputError("an attack and a certifier share a name; give them distinct names")

    was_training = any(m.training for m in model.modules())
    modes = [(m, m.training) for m in model.modules()]
    model.to(dev)
    model.eval()
    try:
        result, ctx = _run(model, dataset, threat, attack_list, cert_list, batch_size, int(seed), dev,
                           bool(individual), progress)
        ctx.model_was_training = was_training
        model.eval()
        result.flags = checks_module.run_checks(ctx, checks)
    finally:
        for m, mode in modes:
            m.training = mode
    _check_invariant(result)
    errors = [f for f in result.flags if f.get("severity") == checks_module.ERROR]
    if errors:
        where = errors[0]["values"].get("indices") or []
        err = SoundnessError(f"{errors[0]['name']}: {errors[0]['explanation']}"
                             + (f" (dataset indices {where[:10]})" if where else ""))
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


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
        f"{', '.join(culprits) or '?'} certified points an attack broke or the model misclassifies",
        severity=checks_module.ERROR, examples=int(bad.sum()), indices=result.violations[:100],
    ))


def _progress_callback(progress: Progress | bool | None, total: int) -> tuple[Progress | None, Any]:
    if progress is True:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="ex", desc="evaluate", leave=False)
        return (lambda done, _total: bar.update(done - bar.n)), bar
    return (progress if callable(progress) else None), None


def _add_counts(total: dict[str, float], flags: dict[str, Any], prefix: str = "") -> None:
    """Sum an attack's numeric flags over batches; nested dicts become ``outer.inner`` keys."""
    for key, value in flags.items():
        if isinstance(value, dict):
            _add_counts(total, value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[prefix + key] = total.get(prefix + key, 0) + value


def _clean_logits(model: nn.Module, x: Tensor, num_classes: int | None) -> Tensor:
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


def _attack_batch(attack: Any, report: PluginReport, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                  seeds: Tensor, todo: Tensor, alive: Tensor, worst: Tensor) -> Tensor:
    """Run ``attack`` on rows ``todo`` of the batch; add its cost to ``report``; return its successes (cpu).

    ``worst`` (the batch's deciding adversarial examples) takes the attack's points where it is the
    first to break an example, or where the example is still robust (so robust rows hold the last).
    """
    dev_todo = todo.to(x.device)
    started = time.perf_counter()
    res = attack(model, x[dev_todo], y[dev_todo], threat, seeds=seeds[todo])
    report.seconds += time.perf_counter() - started
    report.forward += int(res.forward)
    report.backward += int(res.backward)
    report.queries += int(res.queries)
    report.examples += int(todo.numel())
    _add_counts(report.flags, res.flags or {})
    hit = res.success.cpu().bool()
    take = alive[todo]  # still robust before this attack: its point decides (first break, or latest survivor)
    worst[dev_todo[take.to(x.device)]] = res.x_adv[take.to(x.device)].detach().to(worst.dtype)
    return hit


def _run(model: nn.Module, dataset: Any, threat: ThreatModel, attack_list: list[tuple[str, Any]],
         cert_list: list[tuple[str, Any]], batch_size: int, seed: int, dev: torch.device,
         individual: bool, progress: Progress | bool | None) -> tuple[EvaluationResult, checks_module.CheckContext]:
    from attacks.base import check_logits

    n = len(dataset)
    indices = dataset.indices.cpu()
    seeds_all = example_seeds(seed, indices)
    x_all, y_all = dataset.x, dataset.y.to(torch.int64)
    reports = {name: PluginReport(name, "attack", _config(a)) for name, a in attack_list}
    reports.update({name: PluginReport(name, "certifier", _config(c)) for name, c in cert_list})
    correct = torch.zeros(n, dtype=torch.bool)
    success = {name: torch.zeros(n, dtype=torch.bool) for name, _ in attack_list}
    certified = {name: torch.zeros(n, dtype=torch.bool) for name, _ in cert_list}
    robust_after = {name: torch.zeros(n, dtype=torch.bool) for name, _ in attack_list}
    x_worst = x_all.clone()
    logits_all: list[Tensor] = []
    callback, bar = _progress_callback(progress, n)
    started = time.perf_counter()
    try:
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            x, y, seeds = x_all[sl].to(dev), y_all[sl].to(dev), seeds_all[sl]
            logits = _clean_logits(model, x, getattr(dataset, "num_classes", None))
            check_logits(logits, x.shape[0])
            logits_all.append(logits.cpu())
            ok = (logits.argmax(dim=1) == y).cpu()
            correct[sl] = ok
            alive = ok.clone()
            worst = x.clone()
            for name, attack in attack_list:
                todo = (ok if individual else alive).nonzero().flatten()
                if todo.numel():
                    hit = _attack_batch(attack, reports[name], model, x, y, threat, seeds, todo, alive, worst)
                    success[name][start + todo[hit]] = True
                    alive[todo[hit]] = False
                robust_after[name][sl] = alive if not individual else ok & ~success[name][sl]
            x_worst[sl] = worst.cpu()
            for name, certifier in cert_list:
                report = reports[name]
                t0 = time.perf_counter()
                res = certifier(model, x, y, threat)
                report.seconds += time.perf_counter() - t0
                report.examples += x.shape[0]
                report.forward_equivalents += float(getattr(res, "forward_equivalents", 0.0) or 0.0)
                certified[name][sl] = res.certified.detach().cpu().bool()
                for status in res.status:
                    key = status.split(":")[0]
                    report.status_counts[key] = report.status_counts.get(key, 0) + 1
            if callback is not None:
                callback(sl.stop, n)
    finally:
        if bar is not None:
            bar.close()
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
        clean_forward=n,
    )
    ctx = checks_module.CheckContext(
        model=model, x=x_all.to(dev), y=y_all.to(dev), indices=indices, clean_logits=torch.cat(logits_all),
        x_worst=x_worst.to(dev), robust=result.robust.to(dev), batch_size=batch_size,
        attack_flags={r.name: r.flags for r in result.attacks},
        extras={"threat": threat, "result": result, "attacks": dict(attack_list), "certifiers": dict(cert_list),
                "seeds": seeds_all},
    )
    return result, ctx


class _CallableModule(types.ModuleType):
    """``robustbench_lite.evaluate`` is both this module and the function: importing the module
    sets the package attribute to it, so the module forwards calls to :func:`evaluate`."""

    def __call__(self, *args: Any, **kwargs: Any) -> EvaluationResult:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
