"""``sdp-fo``: the SDP relaxation solved by its first-order dual, for convolutional networks (Dathathri et
al. 2020, "Enabling certification of verification-agnostic networks via memory-efficient semidefinite
programming", arXiv 2010.11645).

The relaxation is the one of the exact ``sdp`` certifier (:mod:`certify.sdp_problem`: Raghunathan et al.
2018 with the triangle cuts and every layer's CROWN bounds, stable neurons substituted), but its dual is
optimised with projected first-order steps whose every operation is a forward or backward pass through
the shared graph (:mod:`certify.sdp_fo_problem`) plus Lanczos for the smallest eigenvalue
(:mod:`certify.eigen`), in memory linear in the activations (:mod:`certify.sdp_fo_solve`). The certified
number is the float64 re-evaluation of the best multipliers with a proven eigenvalue bound and rounding
accounted for (:mod:`certify.sdp_fo_verify`), so an early stop, a loose step or a missed eigenvalue cost
tightness, never soundness.

A cascade per example: CROWN's margins first (a class they prove is never solved); then the LP dual
from CROWN's multipliers (cheap, no eigenvalues); then the SDP dual on the classes still open, all of
them in one batch. With ``early_stop`` an example stops when its classes' estimates all pass
``stop_margin`` and gets no dense check for a class whose estimate is not positive (it cannot verify).
"""
from __future__ import annotations

import copy
import logging
import math
import zlib
from typing import Any

import torch
from torch import Tensor, nn

from robustbench_lite.errors import UnsupportedModelError, UserInputError
from robustbench_lite.seeding import mix
from robustbench_lite.threat import ThreatModel

from .bab import CLOCKS  # what ``timeout`` counts: "wall" or "cpu" seconds, as bab
from .base import CERTIFIED, NOT_CERTIFIED, SKIPPED, TIMEOUT, CertResult, Certifier, spec_matrix
from .crown import bounds_and_margins
from .graph import build_graph, check_supported
from .rounding import as_margin_lower, float64_model
from .sdp_fo_problem import LiftedProblem
from .sdp_fo_solve import SDPDual, lp_phase
from .sdp_fo_verify import linear_bounds, sdp_bounds

log = logging.getLogger(__name__)

#: an intermediate check runs only when the hardest class's estimate is above -CHECK_WITHIN (logits): the
#: check's best diagonal added 0.1-0.7 to the estimate on the zoo CNN, so a lower one would not verify
CHECK_WITHIN = 1.0


def _positive_int(name: str, v: Any, minimum: int = 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise UserInputError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _positive(name: str, v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > 0 and math.isfinite(v)):
        raise UserInputError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


class SDPFO(Certifier):
    """First-order SDP (SDP-FO, Dathathri et al. 2020) on the classes CROWN leaves open; ``"sdp-fo"``.

    Args: ``steps`` (Adam steps on the SDP dual per example), ``lp_steps`` (steps on the LP dual before it),
    ``lanczos_iters`` (Lanczos iterations per step, warm-started), ``lr`` (step size relative to the mean CROWN
    multiplier of each problem), ``timeout`` (seconds per example: optimisation stops at ``verify_share`` of
    it, the sound check runs after; status ``timeout`` when it then fails to certify), ``max_dense`` (the
    largest lifted dimension, free inputs + unstable neurons + 1, whose dense float64 check is run: memory
    ``8 max_dense^2`` bytes; above it only the LP dual's bound counts and the status says so), ``early_stop``,
    ``stop_margin`` (an estimate above it ends the optimisation of a class), ``seed`` (Lanczos starts; mixed
    with each example's content, so no result depends on the batch), ``memory_mb`` (CROWN's budget), ``clock``
    (what ``timeout`` counts: "wall" seconds, or "cpu" seconds of this process, every thread, which keeps a
    budget's work about the same on a loaded machine).

    Shapes: x (N, ...) in the box, y (N,); margins (N, K). ``info["problems"]`` holds one record per solved
    (example, class): CROWN's, the LP dual's and the SDP's bounds, the SDP's estimate, steps, seconds and
    how its eigenvalue was proven; ``info["certified_by"]`` the stage ("crown", "lp", "sdp") per example.
    """

    name = "sdp-fo"
    skip_refuted = True

    def __init__(self, *, steps: int = 300, lp_steps: int = 100, lanczos_iters: int = 2, block: int = 8,
                 lr: float = 0.2, decay: float = 0.1, timeout: float = 60.0, verify_share: float = 0.75,
                 max_dense: int = 6000, early_stop: bool = True, stop_margin: float = 0.01, seed: int = 0,
                 memory_mb: float = 1024.0, clock: str = "wall") -> None:
        self.steps = _positive_int("steps", steps, 0)
        self.lp_steps = _positive_int("lp_steps", lp_steps, 0)
        self.lanczos_iters = _positive_int("lanczos_iters", lanczos_iters, 0)
        self.block = _positive_int("block", block)
        self.lr, self.timeout = _positive("lr", lr), _positive("timeout", timeout)
        self.decay = _positive("decay", decay)
        if self.decay > 1:
            raise UserInputError(f"decay must be in (0, 1], got {decay!r}")
        self.verify_share = _positive("verify_share", verify_share)
        if self.verify_share > 1:
            raise UserInputError(f"verify_share must be in (0, 1], got {verify_share!r}")
        self.max_dense = _positive_int("max_dense", max_dense, 2)
        self.stop_margin = _positive("stop_margin", stop_margin)
        self.memory_mb = _positive("memory_mb", memory_mb)
        self.early_stop = bool(early_stop)
        self.seed = _positive_int("seed", seed, 0)
        if clock not in CLOCKS:
            raise UserInputError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
        self.clock = clock

    def check_supported(self, model: nn.Module) -> None:
        check_supported(model)

    def unsupported(self, model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
        """The SDP lifts ReLU networks (residual sums included): max-pool and LeakyReLU are unsupported."""
        try:
            graph = build_graph(model, tuple(input_shape))
        except UnsupportedModelError as exc:
            return exc.reason
        bad = [f"{n.name} ({n.kind})" for n in graph.nodes if n.kind == "maxpool"]
        bad += [f"{n.name} (leaky relu)" for n in graph.nodes if n.kind == "relu" and n.op.negative_slope]
        return UnsupportedModelError(bad).reason if bad else None

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> CertResult:
        n = x.shape[0]
        shape = tuple(x.shape[1:])
        # the optimiser runs in float32 (its values are estimates); the checks in float64 on an exact copy
        float32 = all(t.dtype == torch.float32 for t in model.parameters())
        graph = build_graph(model if float32 else copy.deepcopy(model).float(), shape)
        k = graph.nodes[graph.output].shape[0]
        x = x.detach()
        # proven float64 CROWN bounds and margins of the exact network (certify.rounding)
        bounds, crown = bounds_and_margins(model, x, y, threat, self.memory_mb)
        margin = crown.detach().cpu().clone() if crown is not None else torch.zeros(n, k, dtype=torch.float64)
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        graph64 = build_graph(float64_model(model), shape)
        problems: list[dict] = []
        status, certified_by = [], []
        for i in range(n):
            st, by = self._example(graph, graph64, x[i], int(y[i]), bool(clean[i]), [(lo[i], hi[i]) for lo, hi in bounds],
                                   threat, margin[i], problems, i)
            status.append(st)
            certified_by.append(by)
        certified = torch.tensor([s == CERTIFIED for s in status], dtype=torch.bool, device=x.device)
        passes = sum(p.get("passes", 0.0) for p in problems)
        return CertResult(certified, as_margin_lower(margin, x.dtype).to(x.device), status,
                          forward_equivalents=passes / max(1, n), info={"problems": problems, "certified_by": certified_by})

    # --- one example -------------------------------------------------------------------------------
    def _example(self, graph, graph64, x: Tensor, y: int, clean: bool, bounds: list[tuple[Tensor, Tensor]],
                 threat: ThreatModel, margin: Tensor, problems: list[dict], index: int) -> tuple[str, str | None]:
        """Raise ``margin`` (K,) in place on the open classes; returns (status, certifying stage)."""
        margin[y] = 0.0
        todo = sorted((j for j in range(len(margin)) if j != y and (margin[j] <= 0 or not self.early_stop)),
                      key=lambda j: float(margin[j]))
        if not clean:
            return NOT_CERTIFIED, None
        if not todo:
            return CERTIFIED, "crown"
        now = CLOCKS[self.clock]
        start = now()
        deadline = start + self.verify_share * self.timeout
        rows = len(todo)
        spec = spec_matrix(torch.tensor([y]), len(margin))[0][todo]
        pads = [(lo.cpu(), hi.cpu()) for lo, hi in bounds]  # float64, proven
        try:
            p32 = LiftedProblem(graph, x[None].float().expand(rows, *x.shape), _rows(pads, rows, torch.float32),
                                threat, spec.float())
            p64 = LiftedProblem(graph64, x[None].double().expand(rows, *x.shape), _rows(pads, rows, torch.float64),
                                threat, spec.double())
        except UserInputError as exc:
            return f"{SKIPPED}: {exc}", None
        records = [{"example": index, "class": j, "crown_bound": float(margin[j]), "lifted": int(p64.n[r])}
                   for r, j in enumerate(todo)]
        target = self.stop_margin if self.early_stop else math.inf
        lp = lp_phase(p32, p32.crown_multipliers(), self.lp_steps, self.lr, self.decay, deadline, target, now)
        lp_bound = linear_bounds(p64, lp.mult.map(lambda t: t.double()))
        stage = {j: "crown" for j in todo}
        for r, j in enumerate(todo):
            records[r].update(lp_bound=float(lp_bound[r]), lp_steps=lp.steps)
            if lp_bound[r] > margin[j]:
                margin[j], stage[j] = float(lp_bound[r]), "lp"
        timed_out = lp.timed_out
        open_rows = [r for r, j in enumerate(todo) if margin[j] <= 0 or not self.early_stop]
        too_large = [r for r in open_rows if int(p64.n[r]) + 1 > self.max_dense]
        if open_rows and not too_large and self.steps > 0:
            timed_out = self._sdp(p32, p64, lp, open_rows, todo, deadline, start + self.timeout, margin, stage, records,
                                  x) or timed_out
        seconds = now() - start
        for r in records:
            r["seconds"] = round(seconds, 4)
            r["bound"] = float(margin[r["class"]])
            r["stage"] = stage[r["class"]]
            r["passes"] = (p32.passes + p64.passes) / len(records)
        problems.extend(records)
        others = [j for j in range(len(margin)) if j != y]
        if all(margin[j] > 0 for j in others):
            order = ["crown", "lp", "sdp"]
            return CERTIFIED, max((stage[j] for j in todo), key=order.index)
        if too_large:
            return (f"{SKIPPED}: SDP of {int(p64.n[too_large[0]]) + 1} lifted coordinates exceeds "
                    f"max_dense={self.max_dense}"), None
        return (TIMEOUT if timed_out or now() - start > self.timeout else NOT_CERTIFIED), None

    def _sdp(self, p32: LiftedProblem, p64: LiftedProblem, lp, open_rows: list[int], todo: list[int], deadline: float,
             deadline_verify: float, margin: Tensor, stage: dict[int, str], records: list[dict], x: Tensor) -> bool:
        """The SDP phase on ``open_rows`` and its sound checks; returns whether the deadline stopped it.

        With ``early_stop`` the classes are checked (hardest first, stopping at the first that fails) at a
        third and two thirds of the steps and whenever every estimate stays above ``stop_margin``: the check's
        best diagonal often proves more than the optimiser's estimate, and an example proven early stops."""
        index = torch.tensor(open_rows)
        sub32, sub64 = p32.select(index), p64.select(index)
        seed = mix(self.seed, zlib.crc32(x.detach().float().cpu().numpy().tobytes()))
        dual = SDPDual(sub32, lp.mult.rows(index), self.steps, self.lr, self.decay, self.lanczos_iters, self.block,
                       deadline, torch.Generator().manual_seed(seed), CLOCKS[self.clock])
        target = self.stop_margin if self.early_stop else math.inf
        checkpoints = [self.steps // 3, 2 * self.steps // 3, self.steps] if self.early_stop else [self.steps]
        pending = list(range(len(open_rows)))
        for until in checkpoints:
            result = dual.advance(deadline, target, until=until)
            hardest = sorted(pending, key=lambda r: float(result.value[r]))
            if not dual.done and float(result.value[hardest[0]]) < -CHECK_WITHIN:
                continue  # an intermediate check would fail: keep the dense check for the end
            for r in hardest:
                row, j = open_rows[r], todo[open_rows[r]]
                bound, details = sdp_bounds(sub64, result.mult.map(lambda t: t.double()), result.vector.double(),
                                            rows=[r], max_dense=self.max_dense, deadline=deadline_verify,
                                            clock=CLOCKS[self.clock])
                records[row].update(sdp_estimate=float(result.value[r]), sdp_steps=result.steps,
                                    sdp_bound=float(bound[r]),
                                    **{k: v for k, v in details[r].items() if k in ("eigen", "lambda_lower")})
                if bound[r] > margin[j]:
                    margin[j], stage[j] = float(bound[r]), "sdp"
                if margin[j] > 0:
                    pending.remove(r)
                elif self.early_stop:
                    target = math.inf  # the estimate was optimistic: no more checks on its word
                    break
            if not pending or dual.done:
                break
        return dual.timed_out


def _rows(pads: list[tuple[Tensor, Tensor]], rows: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """One example's bounds repeated for ``rows`` classes, rounded outward to ``dtype``."""
    out = []
    for lo, hi in pads:
        lo_d, hi_d = lo.to(dtype), hi.to(dtype)
        if dtype != torch.float64:  # never round a bound inward
            lo_d = torch.where(lo_d.double() > lo, torch.nextafter(lo_d, torch.tensor(-math.inf, dtype=dtype)), lo_d)
            hi_d = torch.where(hi_d.double() < hi, torch.nextafter(hi_d, torch.tensor(math.inf, dtype=dtype)), hi_d)
        out.append((lo_d[None].expand(rows, *lo.shape), hi_d[None].expand(rows, *hi.shape)))
    return out


__all__ = ["SDPFO"]
