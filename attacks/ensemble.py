"""The AutoAttack cascade (Croce & Hein 2020, arXiv 2003.01690) and a wrapper of the reference code.

``autoattack`` runs the reference's standard suite: APGD-CE, APGD-T (targeted DLR, 9 targets), FAB-T
(:mod:`attacks.fab`, 9 targets) and Square (5000 queries), each only on the points every earlier stage
left standing, and reuses the clean logits for the correctness mask and the target choice. ``suite``
in its config names what ran: ``"autoattack-standard"`` only for those four stages with every
hyper-parameter equal to the reference's ``version="standard"`` budget (100 iterations, 1 restart,
rho 0.75, 9 targets, FAB-T's alpha_max 0.1 / eta 1.05 / beta 0.9, 5000 Square queries with p_init
0.8, the p-schedule read unscaled); ``"autoattack-fmn"`` for the variant with FMN-T (Pintor et al.
2021) in FAB-T's slot (registered as ``autoattack-fmn``); ``"custom"`` for anything else. Only the
standard suite fills a record's ``autoattack_acc``.

With ``square_start="best"`` (opt-in; the suite is then ``"custom"``) Square starts, per example,
from whichever scores higher of the paper's stripes and the highest-margin point the white-box stages
reached (the reference starts from stripes only; one query of the same 5000): stronger on robust
models, but not the reference's algorithm. Every stage's re-scoring pass also updates that
highest-margin point, so no success and no progress is lost between stages; robust examples come
back at it.

``flags["stage_passes"]`` holds, per stage, the forward and backward passes and the queries it
spent (the re-scoring pass of its candidates included), so a record says where its budget went.

``autoattack-ref`` runs ``pyautoattack.AutoAttack(version="standard")`` itself on the same model and
examples, silenced and with the caller's global RNG state restored, so both can be put side by side.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import ExampleRNG, mix
from robustbench_lite.threat import ThreatModel

from .apgd import APGD, APGDT
from .base import Attack, AttackResult, PassCounter, QueryOracle, margin_loss
from .fab import FABT
from .fmn import FMNT
from .square import Square, settle

log = logging.getLogger(__name__)

STAGES = ("apgd-ce", "apgd-t", "fab-t", "fmn-t", "square")
STANDARD_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
FMN_STAGES = ("apgd-ce", "apgd-t", "fmn-t", "square")
SQUARE_STARTS = ("best", "stripes")
#: the reference's version="standard" budget (pyautoattack/autoattack.py, _set_version), Linf and L2;
#: FAB-T's own constants (alpha_max, eta, beta, 1 restart) are :class:`~attacks.fab.FABT`'s defaults
STANDARD = {"steps": 100, "restarts": 1, "rho": 0.75, "n_target_classes": 9, "square_queries": 5000,
            "square_p_init": 0.8, "eot_iter": 1, "square_start": "stripes"}
#: suite name -> its stages; the budget must be STANDARD for either name
SUITES = {"autoattack-standard": STANDARD_STAGES, "autoattack-fmn": FMN_STAGES}


class AutoAttack(Attack):
    """Cascade of APGD-CE, APGD-T, FAB-T and Square on the surviving points (untargeted).

    Args:
        stages: which stages to run, in order (apgd-ce, apgd-t, fab-t, square); "fmn-t" is FMN-T.
        steps: iterations of APGD-CE, APGD-T, FAB-T and FMN-T (100).
        restarts: APGD restarts (1); FAB-T runs once, as in the reference.
        rho: APGD checkpoint parameter (0.75).
        n_target_classes: targets of APGD-T, FAB-T and FMN-T (9; fewer when the model has fewer classes).
        square_queries, square_p_init: Square's query budget and initial patch fraction (5000, 0.8).
        square_start: "stripes" (default) starts Square from the paper's stripes, as the reference does;
            "best" starts it, per example, from whichever has the higher margin loss: the stripes or
            the highest-margin point the white-box stages reached (one query of the same budget;
            stronger, but it makes the suite "custom").
        eot_iter: EOT gradients per APGD step, for randomized models (1).
        seed: used only when the caller passes no per-example seeds.

    Shapes: x (N, C, H, W), y (N,). ``flags["robust_after"]`` maps each stage to the robust count
    after it; ``flags["square_only"]`` counts points only the black-box stage broke (a masking sign).

    >>> attack = AutoAttack()
    >>> attack.config()["suite"]
    'autoattack-standard'
    """

    name = "autoattack"
    default_stages: tuple[str, ...] = STANDARD_STAGES

    def __init__(self, *, stages: tuple[str, ...] | list[str] | None = None, steps: int = 100, restarts: int = 1,
                 rho: float = 0.75, n_target_classes: int = 9, square_queries: int = 5000,
                 square_p_init: float = 0.8, square_start: str = "stripes", eot_iter: int = 1,
                 seed: int = 0) -> None:
        super().__init__(seed=seed)
        stages = self.default_stages if stages is None else stages
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages or len(set(stages)) != len(stages):
            raise UserInputError(f"unknown, repeated or no autoattack stages {list(stages)}: "
                                 f"choose from {', '.join(STAGES)}")
        if int(square_queries) < 1 or not 0 < float(square_p_init) <= 1:
            raise UserInputError("square_queries must be >= 1 and square_p_init in (0, 1]")
        self.stages = list(stages)
        self.steps, self.restarts, self.rho = int(steps), int(restarts), float(rho)
        self.n_target_classes, self.eot_iter = int(n_target_classes), int(eot_iter)
        if square_start not in SQUARE_STARTS:
            raise UserInputError(f"unknown square_start {square_start!r}: choose one of {', '.join(SQUARE_STARTS)}")
        self.square_queries, self.square_p_init = int(square_queries), float(square_p_init)
        self.square_start = square_start
        self._attacks = {  # constructed now so bad hyper-parameters fail at construction
            "apgd-ce": APGD(steps=steps, restarts=restarts, loss="ce", rho=rho, eot_iter=eot_iter),
            "apgd-t": APGDT(steps=steps, restarts=restarts, n_target_classes=n_target_classes, rho=rho,
                            eot_iter=eot_iter),
            "fab-t": FABT(steps=steps, n_target_classes=n_target_classes, bounded=True),
            "fmn-t": FMNT(steps=steps, n_target_classes=n_target_classes, bounded=True),
        }

    @property
    def suite(self) -> str:
        """"autoattack-standard", "autoattack-fmn" (the reference's budget with FMN-T for FAB-T) or "custom"."""
        if {k: getattr(self, k) for k in STANDARD} != STANDARD:
            return "custom"
        return next((name for name, stages in SUITES.items() if tuple(self.stages) == stages), "custom")

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["suite"] = self.suite
        if "fab-t" in self.stages:  # FAB-T's fixed constants, flat (a config holds scalars)
            fab = self._attacks["fab-t"]
            cfg.update({"fab_t_restarts": fab.restarts, "fab_t_alpha_max": fab.alpha_max, "fab_t_eta": fab.eta,
                        "fab_t_beta": fab.beta})
        cfg["square_p_schedule"] = "unscaled, as the reference's standard Square (resc_schedule=False)"
        if self.square_start == "best":
            cfg["square_start_note"] = ("best of stripes and the white-box stages' highest-margin point, one query "
                                        "of the same budget (the reference starts from stripes only)")
        return cfg

    def _stage(self, stage: str, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
               clean_logits: Tensor, start: Tensor | None) -> AttackResult:
        if stage == "square":
            # the reference's standard Square reads the 10,000-query p-schedule unscaled (resc_schedule=False)
            square = Square(n_queries=self.square_queries, p_init=self.square_p_init, rescale_schedule=False,
                            seed=self.seed)
            oracle = QueryOracle(model)
            result = square.run(oracle, x, y, threat, rng, None, start=start)
            result.queries = oracle.queries
            return result
        attack = self._attacks[stage]
        if stage == "apgd-ce":
            return attack.run(model, x, y, threat, rng, None)
        return attack.run(model, x, y, threat, rng, None, clean_logits=clean_logits)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None) -> AttackResult:
        with torch.no_grad():
            clean_logits = model(x)
        robust = clean_logits.argmax(dim=1) == y
        x_adv = x.clone()
        # per example, the highest-margin point seen so far (a warm start for Square); never loses a success
        margin_best = margin_loss(clean_logits, y)
        robust_after: dict[str, int] = {"clean": int(robust.sum())}
        stage_passes: dict[str, dict[str, int]] = {}
        flags: dict[str, Any] = {}
        queries = 0
        white_box_survivors = None
        for number, stage in enumerate(self.stages):
            idx = robust.nonzero().flatten()
            if idx.numel() == 0:
                robust_after[stage] = 0
                continue
            if stage == "square":
                white_box_survivors = idx.numel()
            seeds = torch.tensor([mix(s, 0x5EED, number) for s in rng.subset(idx).seeds], dtype=torch.int64)
            # only Square's warm start reads the points reached so far: copy them only for it
            start = x_adv[idx] if stage == "square" and self.square_start == "best" else None
            counter = PassCounter(model)
            result = self._stage(stage, counter, x[idx], y[idx], threat, ExampleRNG(seeds, x.device),
                                 clean_logits[idx], start)
            queries += result.queries
            # a fixed point of the projection, so the final re-scoring sees exactly this point
            candidate = settle(threat, result.x_adv.detach(), x[idx])
            with torch.no_grad():  # authoritative re-score of this stage's candidates
                logits = counter(candidate)
            stage_passes[stage] = {"forward": counter.forward_passes, "backward": counter.backward_passes,
                                   "queries": result.queries}
            broken = logits.argmax(dim=1) != y[idx]
            margin = margin_loss(logits, y[idx])
            higher = broken | (margin > margin_best[idx])
            x_adv[idx[higher]] = candidate[higher]
            margin_best[idx[higher]] = margin[higher]
            robust[idx[broken]] = False
            robust_after[stage] = int(robust.sum())
            for key, value in result.flags.items():
                if isinstance(value, int):
                    flags[key] = flags.get(key, 0) + value
        flags["robust_after"] = robust_after
        flags["stage_passes"] = stage_passes
        if white_box_survivors is not None:
            flags["square_only"] = white_box_survivors - robust_after["square"]
        # robust examples keep their highest-margin point (x where no stage raised the margin)
        return AttackResult(x_adv=x_adv, success=~robust, queries=queries, flags=flags)


class AutoAttackFMN(AutoAttack):
    """The cascade with FMN-T (Pintor et al. 2021) in FAB-T's slot: APGD-CE, APGD-T, FMN-T, Square.

    Same arguments as :class:`AutoAttack`; its suite is ``"autoattack-fmn"`` at the reference's budget,
    never ``"autoattack-standard"``.
    """

    name = "autoattack-fmn"
    default_stages = FMN_STAGES


class _Collect(logging.Handler):
    """Keeps the reference's own warnings (it logs to the "auto-attack" logger) to re-log them here."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class AutoAttackRef(Attack):
    """``pyautoattack.AutoAttack(version=...)`` on the same model and examples, as an AttackResult.

    The reference prints and logs; here it runs with ``verbose`` off and stdout captured, its own
    warnings (e.g. its Square check) are re-logged through this module's logger and counted in
    ``flags["reference_warnings"]``, and its ``torch.manual_seed`` calls cannot leak: the global RNG
    state is restored afterwards. Inputs must be
    in [0, 1] (the reference assumes it). For models with fewer than 10 classes the number of targets
    is lowered to classes - 1 (the reference would index out of range) and recorded in ``flags``.

    Args:
        version: "standard" (default), "plus" or "rand".
        batch_size: the reference's batch size (250).
        seed: the reference's seed.
    """

    name = "autoattack-ref"

    def __init__(self, *, version: str = "standard", batch_size: int = 250, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if version not in ("standard", "plus", "rand"):
            raise UserInputError(f"unknown AutoAttack version {version!r}: choose standard, plus or rand")
        if int(batch_size) < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
        self.version = version
        self.batch_size = int(batch_size)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["suite"] = f"autoattack-{self.version}"  # the reference's own suite, run by its own code
        return cfg

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng: ExampleRNG,
            target: Tensor | None) -> AttackResult:
        from pyautoattack import AutoAttack as ReferenceAutoAttack

        if threat.box != (0.0, 1.0):
            raise UserInputError(f"autoattack-ref needs inputs in [0, 1], the threat model's box is {threat.box}")
        flags: dict[str, Any] = {}
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        if n_classes < 4:
            raise UserInputError(f"autoattack-ref needs >= 4 classes (its targeted DLR loss), the model has {n_classes}")
        devices = [x.device] if x.device.type == "cuda" else []
        collected = _Collect()
        reference_log = logging.getLogger("auto-attack")
        propagate = reference_log.propagate
        reference_log.addHandler(collected)
        reference_log.propagate = False
        try:
            with torch.random.fork_rng(devices=devices), warnings.catch_warnings(), \
                    contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                reference = ReferenceAutoAttack(model, norm=threat.norm, eps=threat.eps, version=self.version,
                                                seed=self.seed, device=x.device)
                reference.verbose = False
                if n_classes - 1 < 9:
                    reference.apgd_targeted.n_target_classes = n_classes - 1
                    reference.fab.n_target_classes = n_classes - 1
                    flags["n_target_classes"] = n_classes - 1
                x_adv, y_adv = reference.run_standard_evaluation(x, y, batch_size=self.batch_size)
        finally:
            reference_log.removeHandler(collected)
            reference_log.propagate = propagate
        for message in collected.messages:
            log.warning("autoattack-ref: %s", message)
        if collected.messages:
            flags["reference_warnings"] = len(collected.messages)
        return AttackResult(x_adv=x_adv.detach(), success=y_adv != y, flags=flags)
