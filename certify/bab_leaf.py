"""Falsification and leaves for :mod:`certify.bab`: counterexample checks, APGD from given points, and
the exact LP of a subdomain whose every ReLU is fixed.

A counterexample counts only after :func:`check_counterexample`: projected into ball ∩ box, inside
them with no tolerance, and misclassified by a plain float32 forward pass of the model.

A leaf (every ReLU stable or split, no max-pool) is affine on its subdomain: f(x) = M x + c on the
polytope {x in box : sign_i z_i(x) >= 0 for its split neurons}. :func:`resolve_leaves` solves
``min_x (e_y - e_j)^T f(x)`` over it with HiGHS (scipy). The LP's multipliers of the split constraints
are exactly beta-CROWN's beta at the optimum (strong duality), so they are put into the domain and
the float64 walk proves the bound; an infeasible leaf gets its multipliers from the LP that maximises
the least violated split constraint (a Farkas certificate, scaled). A negative optimum gives a point
to check. Neither the LP's value nor its status is ever read as a proof.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.optimize import linprog
from torch import Tensor, nn

from attacks.apgd import apgd_rows
from attacks.losses import get_loss
from robustbench_lite.seeding import ExampleRNG
from robustbench_lite.threat import ThreatModel

from .bab_bound import sound_lower  # a leaf's proof is the same float64 walk as any domain's
from .bab_domains import Domains, apply_splits
from .ibp import input_box


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy whose parameters need no gradients (bounds and attacks never touch the model's)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def strictly_inside(points: Tensor, x: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
    """``points`` (R, ...) projected into ball ∩ box so that they lie inside in exact arithmetic (Linf:
    coordinates past eps, measured in float64, step one ulp toward x; L2: the perturbation shrinks by
    1e-6), and whether they do (R,) bool, measured in float64 (L2: with 1e-12 room for the norm's rounding)."""
    x = x.expand_as(points)
    cand = threat.project(points.to(x.dtype), x)
    for _ in range(4):
        delta = cand.double() - x.double()
        if threat.norm == "Linf":
            over = delta.abs() > threat.eps
            cand = torch.where(over, torch.nextafter(cand, x), cand)
        else:
            over = delta.flatten(1).norm(dim=1) > threat.eps * (1 - 1e-12)  # room for the norm's rounding
            cand = torch.where(over.reshape(-1, *([1] * (x.dim() - 1))), x + (cand - x) * (1 - 1e-6), cand)
        cand = cand.clamp(*threat.box)
    delta = cand.double() - x.double()
    if threat.norm == "Linf":
        dist, radius = delta.flatten(1).abs().amax(1), threat.eps
    else:
        dist, radius = delta.flatten(1).norm(dim=1), threat.eps * (1 - 1e-12)
    lo, hi = threat.box
    inside = (dist <= radius) & ((cand >= lo) & (cand <= hi)).flatten(1).all(1)
    return cand, inside


def check_counterexample(model: nn.Module, x: Tensor, y: int, threat: ThreatModel, points: Tensor) -> Tensor | None:
    """The first of ``points`` (R, ...) that, projected, lies in ball ∩ box and is misclassified (else None)."""
    if points.shape[0] == 0:
        return None
    with torch.no_grad():
        cand, inside = strictly_inside(points, x, threat)
        wrong = model(cand).argmax(dim=1) != y
    hit = (inside & wrong).nonzero().flatten()
    return cand[int(hit[0])] if hit.numel() else None


def attack_from(model: nn.Module, x: Tensor, y: int, threat: ThreatModel, starts: Tensor | None,
                targets: Tensor | None, seed: int, steps: int) -> Tensor | None:
    """APGD on the targeted margin loss (one row per target class, all stopping at the first success).

    ``starts``/``targets`` None: x itself first, then every class j != y from a random start drawn
    with ``seed``. Returns a checked counterexample (x's shape without the batch) or None."""
    k = None
    if starts is None:
        point = check_counterexample(model, x, y, threat, x)
        if point is not None or steps == 0:
            return point
        with torch.no_grad():
            k = model(x).shape[1]
        targets = torch.tensor([j for j in range(k) if j != y])
        rng = ExampleRNG(torch.tensor([seed] * targets.numel(), dtype=torch.int64), device=x.device)
        noise = threat.ops.random_in_ball(rng.uniform(x.shape[1:], 0), rng.normal(x.shape[1:], 1), threat.eps)
        starts = threat.project(x + noise, x.expand(targets.numel(), *x.shape[1:]))
    if steps == 0 or starts.shape[0] == 0:
        return None
    r = starts.shape[0]
    with torch.enable_grad():
        out, hit, _, _ = apgd_rows(model, x.expand(r, *x.shape[1:]), torch.full((r,), y, dtype=torch.int64),
                                   targets.to(torch.int64), None, torch.zeros(r, dtype=torch.int64),
                                   threat.project(starts, x.expand_as(starts)), threat, get_loss("margin"),
                                   steps, 0.75, 1)
    return check_counterexample(model, x, y, threat, out[hit]) if bool(hit.any()) else None


def _masked_forward(ctx, masks: dict[int, Tensor], v: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
    """The float64 network with each ReLU replaced by its fixed pattern (an affine map of v)."""
    graph = ctx.graph64
    values: list[Tensor] = []
    for node in graph.nodes[:graph.output + 1]:
        if node.kind == "input":
            values.append(v)
        elif node.kind == "add":
            values.append(values[node.inputs[0]] + values[node.inputs[1]])
        elif node.kind == "relu":
            values.append(values[node.inputs[0]] * masks[node.index])
        else:
            values.append(node.op.forward(values[node.inputs[0]]))
    return values[graph.output], {r: values[i] for r, i in ctx.relu_input.items()}


def _leaf_lp(ctx, dom: Domains, row: int) -> tuple[str, dict[int, Tensor] | None, Tensor | None]:
    """('optimal' | 'infeasible' | 'failed', betas (1, 1, *shape) per split ReLU, LP point (1, ...))."""
    splits = {r: s[row:row + 1] for r, s in dom.splits.items()}
    pre = apply_splits(ctx.pre64, splits, ctx.relu_input)
    lows = {r: pre[i][0] for r, i in ctx.relu_input.items()}
    if dom.pre is not None:  # the leaf's own bounds (splits applied): stable there even where the root's are not
        lows.update({r: lo[row:row + 1] for r, (lo, _) in dom.pre.items()})
    masks = {r: torch.where(lows[r] >= 0, 1.0, ctx.graph64.nodes[r].op.negative_slope).to(torch.float64)
             for r in ctx.relu_input}  # a leaf's every ReLU is stable or split
    lo, hi = input_box(ctx.x.double(), ctx.threat)
    d = ctx.x[0].numel()
    basis = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)])
    with torch.no_grad():
        logits, pres = _masked_forward(ctx, masks, basis.reshape(-1, *ctx.x.shape[1:]))
    spec = ctx.spec_rows(dom.spec[row:row + 1], torch.float64)[0, 0]
    obj = logits @ spec  # (1 + d,)
    cost = (obj[1:] - obj[0]).numpy()
    rows, rhs, where = [], [], []
    for r, s in splits.items():
        flat = s.flatten()
        idx = flat.nonzero().flatten()
        z = pres[r].flatten(1)[:, idx]  # (1 + d, n)
        sign = flat[idx].to(torch.float64)
        rows.append((-(z[1:] - z[0]) * sign).T.numpy())
        rhs.append((z[0] * sign).numpy())
        where += [(r, int(i)) for i in idx]
    bounds = list(zip(lo.flatten().tolist(), hi.flatten().tolist()))
    a_ub = np.concatenate(rows) if where else None
    b_ub = np.concatenate(rhs) if where else None
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    if res.status == 0:
        duals = -res.ineqlin.marginals if where else np.zeros(0)
        point = torch.as_tensor(res.x, dtype=torch.float32).reshape(1, *ctx.x.shape[1:])
        return "optimal", _betas(dom, where, duals), point
    if res.status != 2 or not where:
        return "failed", None, None
    # infeasible: min t s.t. -sign z(x) <= t; multipliers lam >= 0 with sum 1 give sum lam sign z <= -t* < 0
    n = a_ub.shape[0]
    phase = linprog(np.r_[np.zeros(d), 1.0], A_ub=np.c_[a_ub, -np.ones(n)], b_ub=b_ub,
                    bounds=bounds + [(None, None)], method="highs")
    if phase.status != 0 or phase.x[-1] <= 0:
        return "failed", None, None
    scale = (abs(float(dom.lower[row].min())) + 1.0) / phase.x[-1]
    return "infeasible", _betas(dom, where, -phase.ineqlin.marginals * scale), None


def _betas(dom: Domains, where: list[tuple[int, int]], values: np.ndarray) -> dict[int, Tensor]:
    out = {r: torch.zeros(1, 1, *t.shape[2:]) for r, t in dom.betas.items()}
    for (r, i), v in zip(where, values.tolist()):
        out[r].view(-1)[i] = max(0.0, v)
    return out


def resolve_leaves(model: nn.Module, ctx, leaves: Domains, closed_min: Tensor) -> tuple[str, Tensor | None]:
    """Decide every leaf: ('closed', None) when all are proven, ('refuted', point) or ('unknown', None)."""
    if ctx.threat.norm != "Linf" or any(n.kind == "maxpool" for n in ctx.graph.nodes):
        return "unknown", None
    for i in range(len(leaves)):
        leaf = leaves.select(torch.tensor([i]))
        for row in range(leaf.spec.shape[1]):
            one = leaf.select(torch.tensor([0]))
            one.spec, one.lower = leaf.spec[:, row:row + 1], leaf.lower[:, row:row + 1]
            one.alphas = {r: t[:, row:row + 1] for r, t in leaf.alphas.items()}
            state, betas, point = _leaf_lp(ctx, one, 0)
            if point is not None:
                found = check_counterexample(model, ctx.x, ctx.y, ctx.threat, point)
                if found is not None:
                    return "refuted", found
            if betas is None:
                return "unknown", None
            for attempt in range(8 if state == "infeasible" else 1):
                one.betas = {r: b * 2.0 ** attempt for r, b in betas.items()}
                bound = float(sound_lower(ctx, one)[0, 0])
                if bound > 0:
                    cls = int(one.spec[0, 0])
                    closed_min[cls] = min(float(closed_min[cls]), bound)
                    break
            else:
                return "unknown", None
    return "closed", None
