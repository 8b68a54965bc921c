"""Complete verification by branch and bound over ReLU splits (beta-CROWN, Wang et al. 2021, arXiv 2103.06624).

Per example, in this order (every example alone, so batch size and order never change a verdict):

1. **Attack.** A plain forward pass at x, then APGD on the targeted margin loss toward every class
   (Croce & Hein 2020) from a random start drawn with the example's seed. A point counts only after
   :func:`certify.bab_leaf.check_counterexample` (inside ball and box, misclassified by a float32
   forward pass of the model).
2. **Root.** Sound pre-activation bounds (:func:`certify.bab_bound.make_context`), then alpha-CROWN
   on every margin ``logit_y - logit_j``; a margin whose float64 recheck is > 0 is done.
3. **Branch and bound** on the remaining margins: each open margin j is its own tree (``spec =
   "per-class"``) or all share one (``"joint"``), and every tree's domains sit in one list, bounded
   in batches of ``batch_size`` (within ``memory_mb``), worst bound first. Each batch splits every
   picked domain on one unstable ReLU (BaBSR or FSB, :mod:`certify.bab_domains`) into two children,
   bounds them with alpha and beta optimised jointly (:func:`certify.bab_bound.optimise`), and
   drops the children whose float64 bound (:func:`certify.bab_bound.sound_lower`) is > 0. The
   points minimising the open children's linear bounds are checked as counterexamples, and every
   ``attack_every`` batches APGD starts from the worst of them. A child with no unstable neuron left
   is a leaf: an LP (HiGHS) gives its exact minimum and the split multipliers that prove it
   (:mod:`certify.bab_leaf`). With ``refine_rows`` > 0 each batch's children first get their own
   intermediate bounds, re-tightened under their splits (:func:`certify.bab_bound.refine`); by default
   every domain keeps the root's.

Verdicts (``info["verdict"]``): ``certified`` (every subdomain's float64 bound > 0), ``refuted`` (a
checked counterexample, returned in ``CertResult.counterexample``; status ``not_certified``),
``timeout`` (``timeout`` seconds or ``max_domains`` spent; status ``timeout``), ``unknown`` (a leaf
with no proof and no counterexample, e.g. a margin that only float rounding keeps positive; status
``not_certified``). What is split: ReLU neurons only; max-pool is relaxed, never split (a max-pool
net's leaf stays unknown). The time budget makes verdicts machine-dependent; the domain budget does not.
"""
from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import mix
from robustbench_lite.threat import ThreatModel

from .bab_bound import (Context, batch_capacity, choose_branches, falsification_points, make_context, optimise,
                        refine, sound_lower, tighten_intermediate)
from .bab_domains import Domains, domain_bytes
from .bab_leaf import attack_from, check_counterexample, frozen_copy, resolve_leaves
from .base import CERTIFIED, NOT_CERTIFIED, TIMEOUT, CertResult, Certifier
from .graph import build_graph, check_supported, unsupported_reason
from .rounding import float64_model

log = logging.getLogger(__name__)

HEURISTICS = ("babsr", "fsb")
SPECS = ("per-class", "joint")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Outcome:
    """One example's verdict and what it cost."""

    verdict: str
    margin_lower: Tensor  # (K,) sound lower bounds
    counterexample: Tensor | None = None
    found_by: str | None = None
    domains: int = 0
    seconds: float = 0.0
    macs: int = 0
    stats: dict = field(default_factory=dict)


def example_seed(seed: int, x: Tensor, y: int) -> int:
    """A seed from the example's content (the evaluator passes certifiers no indices)."""
    return mix(seed, zlib.crc32(x.detach().cpu().contiguous().numpy().tobytes()), y)


class BaB(Certifier):
    """Branch and bound with beta-CROWN bounds: a complete verifier for ReLU networks (module docstring).

    Args:
        timeout: seconds per example (default 60, sized for a 2-core CPU).
        max_domains: subdomains bounded per example before it times out; the open ones are also capped
            by ``memory_mb`` (their slopes and multipliers are stored).
        batch_size: subdomains split per batch (capped so a batch fits in ``memory_mb``).
        iterations: Adam steps on alpha and beta per batch; ``root_iterations`` at the root.
        lr_alpha, lr_beta: Adam step sizes (``root_lr_alpha`` at the root).
        branching: "fsb" (De Palma et al. 2021) or "babsr" (Bunel et al. 2020); ``candidates``: FSB's
            top-k per score.
        spec: "per-class" (one tree per open margin) or "joint" (one tree for all of them).
        intermediate_iterations, intermediate_rows: when alpha-CROWN leaves a margin open, Adam steps on
            the slopes of each intermediate bound (:func:`certify.bab_bound.tighten_intermediate`) for the
            layers with at most ``intermediate_rows`` unstable bounds; 0 iterations: CROWN's.
        refine_rows: each batch's children get their own intermediate bounds, re-tightened under their
            splits (:func:`certify.bab_bound.refine`) on the layers after the split one with at most this
            many bounds (two per neuron unstable in some child); 0 (default): the root's bounds throughout.
            Off by default: on the zoo's nets it did not pay for itself (docs/bab.md, "Per-domain
            intermediate bounds").
        attack_steps, attack_every: APGD steps of the root attack and of the domain attacks, run every
            ``attack_every`` batches from the worst domains' points (0: never).
        memory_mb: budget of one bounding pass.
        clock: what ``timeout`` counts, "wall" seconds or "cpu" seconds of this process (every thread);
            "cpu" keeps budgets comparable on a shared machine.
        seed: mixed with each example's content for its attack seeds.

    Shapes: x (N, ...) in the box, y (N,). ``CertResult.info``: per example ``verdict``, ``domains``,
    ``seconds``, ``found_by``.
    """

    name = "bab"
    skip_refuted = True

    def __init__(self, *, timeout: float = 60.0, max_domains: int = 200_000, batch_size: int = 256,
                 iterations: int = 20, root_iterations: int = 50, lr_alpha: float = 0.1, lr_beta: float = 0.05,
                 root_lr_alpha: float = 0.5, branching: str = "fsb", candidates: int = 3, spec: str = "per-class",
                 intermediate_iterations: int = 20, intermediate_rows: int = 4096, refine_rows: int = 0,
                 attack_steps: int = 100,
                 attack_every: int = 5, memory_mb: float = 1024.0, clock: str = "wall", seed: int = 0) -> None:
        for label, v in (("timeout", timeout), ("lr_alpha", lr_alpha), ("lr_beta", lr_beta),
                         ("root_lr_alpha", root_lr_alpha), ("memory_mb", memory_mb)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UserInputError(f"{label} must be a number > 0, got {v!r}")
        for label, v, low in (("max_domains", max_domains, 1), ("batch_size", batch_size, 1),
                              ("iterations", iterations, 0), ("root_iterations", root_iterations, 0),
                              ("candidates", candidates, 1), ("attack_steps", attack_steps, 0),
                              ("intermediate_iterations", intermediate_iterations, 0),
                              ("intermediate_rows", intermediate_rows, 0), ("refine_rows", refine_rows, 0),
                              ("attack_every", attack_every, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise UserInputError(f"{label} must be an integer >= {low}, got {v!r}")
        if branching not in HEURISTICS:
            raise UserInputError(f"branching must be one of {', '.join(HEURISTICS)}, got {branching!r}")
        if spec not in SPECS:
            raise UserInputError(f"spec must be one of {', '.join(SPECS)}, got {spec!r}")
        if clock not in CLOCKS:
            raise UserInputError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
        self.timeout, self.max_domains, self.batch_size = float(timeout), max_domains, batch_size
        self.iterations, self.root_iterations = iterations, root_iterations
        self.lr_alpha, self.lr_beta, self.root_lr_alpha = float(lr_alpha), float(lr_beta), float(root_lr_alpha)
        self.branching, self.candidates, self.spec = branching, candidates, spec
        self.attack_steps, self.attack_every = attack_steps, attack_every
        self.intermediate_iterations, self.intermediate_rows = intermediate_iterations, intermediate_rows
        self.refine_rows = refine_rows
        self.memory_mb, self.clock, self.seed = float(memory_mb), clock, int(seed)

    def check_supported(self, model: nn.Module) -> None:
        check_supported(model)

    def unsupported(self, model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
        return unsupported_reason(model, input_shape)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> CertResult:
        frozen = frozen_copy(model)
        shape = tuple(x.shape[1:])
        graph, graph64 = build_graph(frozen, shape), build_graph(float64_model(frozen), shape)
        k = graph.nodes[graph.output].shape[0] if graph.nodes[graph.output].shape else 0
        outcomes = [self.verify(frozen, graph, graph64, x[i:i + 1], int(y[i]), threat) for i in range(x.shape[0])]
        margin = torch.stack([o.margin_lower for o in outcomes]) if outcomes else x.new_zeros(0, k)
        counter = torch.full_like(x, math.nan)
        for i, o in enumerate(outcomes):
            if o.counterexample is not None:
                counter[i] = o.counterexample
        status = {"certified": CERTIFIED, "timeout": TIMEOUT}
        macs = sum(o.macs for o in outcomes) / max(1, x.shape[0] * graph.forward_macs)
        return CertResult(
            certified=torch.tensor([o.verdict == "certified" for o in outcomes], dtype=torch.bool),
            margin_lower=margin.to(x.dtype), status=[status.get(o.verdict, NOT_CERTIFIED) for o in outcomes],
            counterexample=counter, forward_equivalents=macs,
            info={"verdict": [o.verdict for o in outcomes], "domains": [o.domains for o in outcomes],
                  "seconds": [o.seconds for o in outcomes], "found_by": [o.found_by for o in outcomes],
                  "stats": [o.stats for o in outcomes]})

    # --- one example -------------------------------------------------------------------------------
    def verify(self, model: nn.Module, graph, graph64, x: Tensor, y: int, threat: ThreatModel) -> Outcome:
        """The verdict on one example x (1, ...) with label y (the module docstring's steps 1-3)."""
        start = CLOCKS[self.clock]()
        seed = example_seed(self.seed, x, y)
        k = graph.nodes[graph.output].shape[0]
        nan = torch.full((k,), math.nan)
        point = attack_from(model, x, y, threat, None, None, seed, self.attack_steps)
        if point is not None:
            return Outcome("refuted", nan, point, "root attack", seconds=CLOCKS[self.clock]() - start)
        ctx = make_context(graph, graph64, x, y, threat, self.memory_mb)
        others = torch.tensor([j for j in range(k) if j != y])
        root = self._root(ctx, others)
        sound = sound_lower(ctx, root)[0]
        if bool((sound <= 0).any()) and self.intermediate_iterations:
            rows = tighten_intermediate(ctx, self.intermediate_iterations, self.root_lr_alpha, self.intermediate_rows)
            if rows:
                root = self._root(ctx, others)
                sound = torch.maximum(sound, sound_lower(ctx, root)[0])
        margin = torch.zeros(k, dtype=torch.float64)
        margin[others] = sound
        open_classes = others[sound <= 0]
        log.debug("root: %d of %d margins open (worst %.4g)", open_classes.numel(), k - 1, float(sound.min()))
        if open_classes.numel() == 0:
            return Outcome("certified", margin, seconds=CLOCKS[self.clock]() - start, macs=ctx.macs)
        root.lower = torch.minimum(root.lower, sound.float()[None])  # a row the float64 check refused is open
        rows = [int((others == j).nonzero()) for j in open_classes.tolist()]
        if self.spec == "per-class":
            dom = root.select(torch.zeros(len(rows), dtype=torch.long))
            dom.spec = open_classes[:, None]
            dom.lower = root.lower[0, rows][:, None]
            dom.alphas = {r: t[0, rows].unsqueeze(1) for r, t in root.alphas.items()}
            dom.betas = {r: t[0, rows].unsqueeze(1) for r, t in root.betas.items()}
        else:
            dom = root
            dom.spec, dom.lower = open_classes[None, :], root.lower[:, rows]
            dom.alphas = {r: t[:, rows] for r, t in root.alphas.items()}
            dom.betas = {r: t[:, rows] for r, t in root.betas.items()}
        outcome = self._search(model, ctx, dom, margin, seed, start)
        outcome.seconds, outcome.macs = CLOCKS[self.clock]() - start, ctx.macs
        log.info("%s after %d subdomains in %.1f s (%s clock)", outcome.verdict, outcome.domains, outcome.seconds,
                 self.clock)
        return outcome

    def _root(self, ctx: Context, others: Tensor) -> Domains:
        """alpha-CROWN on every margin: one domain with no splits and a row per class j != y."""
        prop = ctx.propagator({}, 1)
        s = others.numel()
        dom = Domains(ctx.relus, {r: torch.zeros(1, *ctx.graph.nodes[r].shape, dtype=torch.int8) for r in ctx.relus},
                      {r: prop.relax[r].lower_slope.unsqueeze(1).expand(1, s, *prop.relax[r].lower_slope.shape[1:]).clone()
                       for r in ctx.relus},
                      {r: torch.zeros(1, s, *ctx.graph.nodes[r].shape) for r in ctx.relus},
                      torch.full((1, s), -math.inf), others[None, :], torch.full((1, 2), -1),
                      ctx.root_pre() if self.refine_rows else None)
        optimise(ctx, dom, self.root_iterations, self.root_lr_alpha, self.lr_beta)
        return dom

    def _search(self, model: nn.Module, ctx: Context, dom: Domains, margin: Tensor, seed: int, start: float) -> Outcome:
        """Branch and bound from the open root domains; ``margin`` (K,) gets the closed leaves' bounds."""
        taps, final = optimise(ctx, dom, 0, self.lr_alpha, self.lr_beta)
        choose_branches(ctx, dom, taps, final, self.branching, self.candidates)
        closed_min = torch.full_like(margin, math.inf)
        pending, bounded, batches = dom, 0, 0
        capacity = max(1, min(self.batch_size, batch_capacity(ctx, dom.spec.shape[1]) // 2))
        stored = max(1, int(self.memory_mb * 2 ** 20 // domain_bytes(pending)))  # open domains kept at most
        while len(pending):
            spent = CLOCKS[self.clock]() - start > self.timeout or bounded >= self.max_domains or len(pending) > stored
            if spent:
                return Outcome("timeout", margin, domains=bounded,
                               stats={"open": len(pending), "worst": float(pending.lower.min())})
            leaves = pending.branch[:, 0] < 0
            if bool(leaves.any()):
                verdict, point = resolve_leaves(model, ctx, pending.select(leaves.nonzero().flatten()), closed_min)
                if point is not None:
                    return Outcome("refuted", margin, point, "leaf LP", domains=bounded)
                if verdict == "unknown":
                    return Outcome("unknown", margin, domains=bounded)
                pending = pending.select((~leaves).nonzero().flatten())
                if not len(pending):
                    break
            batch, pending = pending.worst_first(capacity)
            kids = batch.children()
            refine(ctx, kids, int(batch.branch[:, 0].min()), self.refine_rows)
            taps, final = optimise(ctx, kids, self.iterations, self.lr_alpha, self.lr_beta,
                                   lambda: CLOCKS[self.clock]() - start > self.timeout)
            bounded += len(kids)
            batches += 1
            keep = self._close(ctx, kids, closed_min)
            kids = kids.select(keep)
            taps, final = {i: t[keep] for i, t in taps.items()}, final[keep]
            if not len(kids):
                continue
            points = falsification_points(ctx, kids, taps)
            point = check_counterexample(model, ctx.x, ctx.y, ctx.threat, points)
            if point is None and self.attack_every and batches % self.attack_every == 0:
                worst = torch.argsort(kids.lower.min(1).values, stable=True)[:8]
                targets = kids.spec[worst, kids.lower[worst].argmin(1)]
                point = attack_from(model, ctx.x, ctx.y, ctx.threat, points[worst], targets,
                                    mix(seed, batches), self.attack_steps // 2)
            if point is not None:
                return Outcome("refuted", margin, point, "branch and bound", domains=bounded)
            choose_branches(ctx, kids, taps, final, self.branching, self.candidates)
            pending = Domains.cat([pending, kids]) if len(pending) else kids
            log.debug("batch %d: %d domains bounded, %d open, worst %.4g", batches, bounded, len(pending),
                      float(pending.lower.min()))
        done = torch.isfinite(closed_min)
        margin[done] = closed_min[done]
        return Outcome("certified", margin, domains=bounded)

    @staticmethod
    def _close(ctx: Context, kids: Domains, closed_min: Tensor) -> Tensor:
        """Drop the children whose float64 bound is > 0 on every row; returns the mask of the others."""
        maybe = (kids.lower > 0).all(dim=1)
        keep = ~maybe
        if bool(maybe.any()):
            idx = maybe.nonzero().flatten()
            sub = kids.select(idx)
            sound = sound_lower(ctx, sub)
            proven = (sound > 0).all(dim=1)
            for row, cls in zip(sound[proven].reshape(-1).tolist(), sub.spec[proven].reshape(-1).tolist()):
                closed_min[cls] = min(float(closed_min[cls]), row)
            keep[idx[~proven]] = True
            kids.lower[idx[~proven]] = torch.minimum(kids.lower[idx[~proven]], sound[~proven].float())
        return keep
