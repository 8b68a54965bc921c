"""Metrics beyond robust accuracy; their definitions are written down in docs/metrics.md.

- ``worst_group_acc`` (Sagawa et al. 2020, arXiv 1911.08731): the lowest accuracy over the groups
  present in the evaluated set; ``avg_acc`` is the plain accuracy over all examples.
- ``mean_corruption_acc`` (Hendrycks & Dietterich 2019, arXiv 1903.12261): the unweighted mean of
  accuracy over every corruption and its five severities.
- The WRM certificate (Sinha, Namkoong & Duchi 2018, arXiv 1710.10571, eq. 11):
  ``sup_{P: W_c(P, P_n) <= rho} E_P[loss] <= gamma * rho + E_{P_n}[phi_gamma(x, y)]`` with
  ``phi_gamma(x, y) = sup_x' loss(x', y) - gamma * ||x' - x||_2^2`` (x' in the input box): an upper
  bound only when phi is reached, so it is reported with how close its ascent came (gradient norm,
  Frank-Wolfe gap), and the measured adversarial loss it must bound comes from an independent attack
  on the same Lagrangian (random restarts), whose mean transport cost ``rho_test`` places its points
  inside the Wasserstein ball of that radius.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import frozen

from .defenses.wrm import wrm_maximize
from .errors import UserInputError


def group_accuracies(correct: Tensor, groups: Tensor) -> dict[int, float]:
    """Accuracy per group id present in ``groups``; ``correct`` (N,) bool, ``groups`` (N,) int."""
    correct = torch.as_tensor(correct).flatten().bool()
    groups = torch.as_tensor(groups).flatten().long()
    if correct.shape != groups.shape:
        raise UserInputError(f"correct and groups must have the same length, got {correct.numel()} and {groups.numel()}")
    if correct.numel() == 0:
        raise UserInputError("group accuracy needs at least one example")
    return {int(g): float(correct[groups == g].double().mean()) for g in torch.unique(groups).tolist()}


def worst_group_accuracy(correct: Tensor, groups: Tensor) -> dict[str, object]:
    """``avg_acc``, ``worst_group_acc``, ``worst_group`` and ``group_acc`` ({group: acc}).

    Worst-group accuracy is the minimum of the per-group accuracies over the groups that occur in
    ``groups`` (a group with no example has no accuracy and is not counted).

    >>> worst_group_accuracy(torch.tensor([1, 1, 0, 1]).bool(), torch.tensor([0, 0, 1, 1]))["worst_group_acc"]
    0.5
    """
    per_group = group_accuracies(correct, groups)
    worst = min(per_group, key=lambda g: (per_group[g], g))
    return {
        "metric": "worst_group_acc",
        "avg_acc": float(torch.as_tensor(correct).bool().double().mean()),
        "worst_group_acc": per_group[worst],
        "worst_group": worst,
        "group_acc": per_group,
    }


def mean_corruption_accuracy(accuracy: dict[str, Sequence[float]]) -> float:
    """Mean of accuracy over all corruptions and severities: ``{name: [acc at severity 1..5]}``.

    Every corruption weighs the same; within a corruption every severity weighs the same.
    """
    if not accuracy or any(len(a) == 0 for a in accuracy.values()):
        raise UserInputError("mean corruption accuracy needs at least one corruption with one severity")
    per_corruption = [sum(a) / len(a) for a in accuracy.values()]
    return float(sum(per_corruption) / len(per_corruption))


def corruption_summary(correct: dict[str, Sequence[Sequence[int]]]) -> dict[str, Any]:
    """From per-example flags ``{name: [[0/1] * N] * 5}`` (one row per severity): ``accuracy``
    ({name: [acc at severity 1..5]}), ``corruption_mean`` ({name: mean over severities}) and
    ``mean_corruption_acc`` (:func:`mean_corruption_accuracy`)."""
    accuracy = {name: [sum(row) / len(row) for row in rows] for name, rows in correct.items()}
    return {"accuracy": accuracy, "corruption_mean": {name: sum(a) / len(a) for name, a in accuracy.items()},
            "mean_corruption_acc": mean_corruption_accuracy(accuracy)}


#: independent random starts of the Lagrangian attack that measures the loss (:func:`lagrangian_attack`)
WRM_RESTARTS = 2


def _eval_mode(model: nn.Module):
    return frozen(model)


@dataclass
class LagrangianPoints:
    """Per example (N,), evaluated in float64 at points x': cross-entropy ``loss``, transport cost
    ``cost`` = ||x' - x||^2, ``value`` = loss - gamma * cost, the norm of the objective's gradient where the
    box does not block it (``grad_norm``) and the Frank-Wolfe gap ``fw_gap`` = max over the box of
    grad . (v - x'), which bounds sup - value whenever the objective is concave in x'."""

    loss: Tensor
    cost: Tensor
    value: Tensor
    grad_norm: Tensor
    fw_gap: Tensor


def lagrangian_at(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, gamma: float,
                  box: tuple[float, float] = (0.0, 1.0)) -> LagrangianPoints:
    """:class:`LagrangianPoints` of ``loss(x', y) - gamma ||x' - x||^2`` at x' = ``x_adv``, computed on a float64
    copy of the model (so that comparing two such values is not a comparison of float32 noise)."""
    exact = copy.deepcopy(model).double().eval().requires_grad_(False)
    lo, hi = box
    point = x_adv.detach().double().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(exact(point), y, reduction="none")
        cost = (point - x.double()).flatten(1).pow(2).sum(1)
        value = loss - gamma * cost
        (grad,) = torch.autograd.grad(value.sum(), point)
    point = point.detach()
    blocked = ((point <= lo) & (grad < 0)) | ((point >= hi) & (grad > 0))
    fw_gap = torch.maximum(grad * (lo - point), grad * (hi - point)).flatten(1).sum(1)
    return LagrangianPoints(loss.detach(), cost.detach(), value.detach(),
                            grad.masked_fill(blocked, 0.0).flatten(1).norm(dim=1), fw_gap)


def lagrangian_ascent(model: nn.Module, x: Tensor, y: Tensor, gamma: float, steps: int,
                      box: tuple[float, float] = (0.0, 1.0)) -> LagrangianPoints:
    """phi's inner maximisation as the paper solves it: projected gradient ascent from x
    (:func:`robustbench_lite.defenses.wrm.wrm_maximize`), evaluated at its last iterate."""
    with _eval_mode(model):
        x_adv = wrm_maximize(model, x, y, gamma=gamma, steps=steps, box=box)
    return lagrangian_at(model, x, y, x_adv, gamma, box)


def lagrangian_attack(model: nn.Module, x: Tensor, y: Tensor, gamma: float, steps: int,
                      restarts: int = WRM_RESTARTS, box: tuple[float, float] = (0.0, 1.0),
                      seed: int = 0) -> LagrangianPoints:
    """An attack on the same Lagrangian, independent of phi's ascent: ``restarts`` ascents of ``steps`` steps
    from random starts around x (Gaussian, L2 norm about 1 / (2 gamma), seeded), keeping per example the
    point of highest value."""
    g = torch.Generator().manual_seed(seed)
    best: LagrangianPoints | None = None
    for _ in range(restarts):
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)
        start = x + noise * (0.5 / gamma) / noise[0].numel() ** 0.5
        with _eval_mode(model):
            x_adv = wrm_maximize(model, x, y, gamma=gamma, steps=steps, box=box, start=start)
        pts = lagrangian_at(model, x, y, x_adv, gamma, box)
        if best is None:
            best = pts
            continue
        better = pts.value > best.value
        best = LagrangianPoints(*(torch.where(better, new, old) for new, old in zip(vars(pts).values(),
                                                                                   vars(best).values())))
    assert best is not None
    return best


def _clean_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with _eval_mode(model), torch.no_grad():
        return float(F.cross_entropy(model(x), y, reduction="none").mean())


def _check_restarts(restarts: int) -> None:
    if not isinstance(restarts, int) or restarts < 1:
        raise UserInputError(f"restarts must be a positive integer, got {restarts!r}")


def wrm_certificate(model: nn.Module, x: Tensor, y: Tensor, *, gamma: float, rho: float | Sequence[float],
                    steps: int = 200, box: tuple[float, float] = (0.0, 1.0)) -> dict[str, object]:
    """Sinha et al.'s certificate ``gamma * rho + mean_i phi_gamma(x_i, y_i)`` on the worst-case mean
    cross-entropy over the Wasserstein-2 (squared-L2 cost) ball of radius ``rho`` around (x, y).

    It is an upper bound only when phi, a supremum, is reached. phi is estimated by the paper's projected
    gradient ascent (:func:`lagrangian_ascent`), which can only fall short of it; how far, is reported:
    ``ascent_grad_norm`` (mean and ``_max``: the objective's gradient at the last iterate, where the box
    does not block it) and ``phi_gap_bound`` (mean Frank-Wolfe gap: a bound on mean(phi - estimate) when
    the inner problem is concave, i.e. gamma above the loss's smoothness constant, as for ELU networks).
    ``certificate_if_concave`` = certificate + phi_gap_bound is then an upper bound whether or not the
    ascent converged. x (N, ...) in ``box``, y (N,); every rho >= 0. Returns lists, one entry per rho.
    """
    rhos = [float(r) for r in (rho if isinstance(rho, (list, tuple)) else [rho])]
    if any(r < 0 for r in rhos):
        raise UserInputError(f"rho must be >= 0, got {rho!r}")
    phi = lagrangian_ascent(model, x, y, gamma, steps, box)
    mean_phi, gap = float(phi.value.mean()), float(phi.fw_gap.mean())
    return {"metric": "wrm_certificate", "gamma": float(gamma), "rho": rhos, "mean_phi": mean_phi,
            "certificate": [float(gamma) * r + mean_phi for r in rhos],
            "certificate_if_concave": [float(gamma) * r + mean_phi + gap for r in rhos], "phi_gap_bound": gap,
            "ascent_grad_norm": float(phi.grad_norm.mean()), "ascent_grad_norm_max": float(phi.grad_norm.max()),
            "phi": phi.value.tolist()}


def measured_adversarial_loss(model: nn.Module, x: Tensor, y: Tensor, *, gamma_adv: float, steps: int = 200,
                              restarts: int = WRM_RESTARTS, box: tuple[float, float] = (0.0, 1.0)) -> dict[str, float]:
    """The attack side of Sinha et al.'s Figure 2, by :func:`lagrangian_attack`: points x' maximising
    loss - gamma_adv * ||x' - x||^2 from ``restarts`` random starts.

    Returns ``rho_test`` = mean ||x' - x||_2^2 (the Wasserstein radius the points lie in), ``loss`` =
    mean cross-entropy at x' (a lower bound of the worst case in that ball), and ``clean_loss``.
    """
    if not gamma_adv > 0:
        raise UserInputError(f"gamma must be > 0, got {gamma_adv!r}")
    _check_restarts(restarts)
    pts = lagrangian_attack(model, x, y, gamma_adv, steps, restarts, box)
    return {"gamma_adv": float(gamma_adv), "rho_test": float(pts.cost.mean()), "loss": float(pts.loss.mean()),
            "clean_loss": _clean_loss(model, x, y)}


def wrm_report(model: nn.Module, x: Tensor, y: Tensor, *, gamma: float, gammas_adv: Sequence[float] = (),
               steps: int = 200, restarts: int = WRM_RESTARTS, attack_steps: int | None = None,
               box: tuple[float, float] = (0.0, 1.0)) -> dict[str, object]:
    """For each ``gamma_adv``: the loss that an independent attack (:func:`lagrangian_attack`) reaches at
    transport cost rho_test, next to the certificate at that radius (with the model's training ``gamma``,
    see :func:`wrm_certificate`). ``bound_holds``: measured loss <= ``certificate_if_concave``, compared in
    float64 with no tolerance; a failure means the inner problem is not concave (the certificate is not a
    bound). ``phi_shortfall``: mean of max(0, attack's value - phi's) at gamma_adv == gamma, what the attack
    found beyond phi's ascent (a lower bound of mean(phi - estimate); 0: not refuted).

    Default ``gammas_adv``: gamma times (2, 1, 0.5, 0.25), from small to larger balls; ``attack_steps``:
    steps of each of the attack's restarts (default ``steps``).
    """
    gammas_adv = [float(g) for g in gammas_adv] or [gamma * f for f in (2.0, 1.0, 0.5, 0.25)]
    if any(not g > 0 for g in gammas_adv):
        raise UserInputError(f"gammas_adv must be > 0, got {gammas_adv!r}")
    _check_restarts(restarts)
    phi = lagrangian_ascent(model, x, y, gamma, steps, box)
    mean_phi, gap = float(phi.value.mean()), float(phi.fw_gap.mean())
    clean = _clean_loss(model, x, y)
    rows, shortfall = [], None
    for g in gammas_adv:
        pts = lagrangian_attack(model, x, y, g, steps if attack_steps is None else int(attack_steps), restarts, box)
        rho_test, loss = float(pts.cost.mean()), float(pts.loss.mean())
        certificate = float(gamma) * rho_test + mean_phi
        rows.append({"gamma_adv": g, "rho_test": rho_test, "loss": loss, "clean_loss": clean,
                     "certificate": certificate, "certificate_if_concave": certificate + gap,
                     "bound_holds": loss <= certificate + gap})
        if g == float(gamma):
            shortfall = float((pts.value - phi.value).clamp(min=0).mean())
    return {"metric": "wrm_certificate", "gamma": float(gamma), "mean_phi": mean_phi, "phi_gap_bound": gap,
            "phi_shortfall": shortfall, "ascent_grad_norm": float(phi.grad_norm.mean()),
            "ascent_grad_norm_max": float(phi.grad_norm.max()), "n_examples": int(x.shape[0]), "steps": int(steps),
            "restarts": int(restarts), "rows": rows, "bound_holds": all(r["bound_holds"] for r in rows)}


# --- selective classification ---------------------------------------------------------------------------
SCORES = ("softmax", "margin")
DEFAULT_COVERAGES = (1.0, 0.9, 0.8, 0.5)


def confidence_scores(logits: Tensor, score: str = "softmax") -> Tensor:
    """Confidence of each prediction, (N, K) logits -> (N,) float64; higher means more confident.

    ``softmax``: the softmax response max_k p_k (Geifman & El-Yaniv 2017; Jones et al. 2021's default),
    returned as its log-odds ``log(p_top / (1 - p_top)) = z_top - logsumexp_{k != top} z_k``: the same
    order as p_top, without p_top rounding to 1.0 on confident inputs. ``margin``: ``z_top - z_second``.
    """
    if score not in SCORES:
        raise UserInputError(f"unknown confidence score {score!r}: choose one of {', '.join(SCORES)}")
    z = torch.as_tensor(logits).detach().double()
    if z.dim() != 2 or z.shape[1] < 2:
        raise UserInputError(f"confidence scores need (N, K >= 2) logits, got {tuple(z.shape)}")
    top2 = z.topk(2, dim=1).values
    if score == "margin":
        return top2[:, 0] - top2[:, 1]
    others = z.scatter(1, z.argmax(1, keepdim=True), float("-inf"))
    return top2[:, 0] - torch.logsumexp(others, dim=1)


def _ranked_blocks(scores: Tensor, correct: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Examples sorted by decreasing score, cut after each distinct score (ties are never split).
    Returns per threshold j: its score, the covered count n_j, correct count, and (J, G) per-group
    covered / correct counts stacked as (J, 2, G)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    s, ok, oh = scores[order], correct[order].double(), onehot[order]
    ends = torch.cat([(s[1:] != s[:-1]).nonzero().flatten(), torch.tensor([len(s) - 1])])
    covered = ends + 1
    right = ok.cumsum(0)[ends]
    per_group = torch.stack([oh.cumsum(0)[ends], (oh * ok[:, None]).cumsum(0)[ends]], dim=1)
    return s[ends], covered, right, per_group


def _area(covered: Tensor, right: Tensor, total: float) -> float | None:
    """Area under accuracy against coverage, a step per threshold: sum_j (c_j - c_{j-1}) * acc_j.

    Summed as counts times accuracies, divided once: each term is at most its count, so the float
    result never exceeds 1 (per-step fractions could add up to 1 + 2e-16)."""
    if total == 0:
        return None
    steps = torch.diff(covered, prepend=covered.new_zeros(1))
    mask = covered > 0
    return float((steps[mask] * (right[mask] / covered[mask])).sum() / total)


def _selective_inputs(scores: Tensor, correct: Tensor, groups: Tensor | None,
                      num_groups: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Checked (N,) float64 scores, (N,) bool flags and the (N, G) one-hot groups (G = 0 without groups)."""
    scores = torch.as_tensor(scores).detach().double().flatten().cpu()
    correct = torch.as_tensor(correct).flatten().bool().cpu()
    n = scores.numel()
    if n == 0 or correct.numel() != n:
        raise UserInputError(f"selective accuracy needs one correct flag per score and at least one example "
                             f"(got {n} scores, {correct.numel()} flags)")
    if not torch.isfinite(scores).all():
        raise UserInputError("confidence scores must be finite")
    if groups is None:
        return scores, correct, torch.zeros(n, 0, dtype=torch.float64)
    groups = torch.as_tensor(groups).flatten().long().cpu()
    count = int(groups.max()) + 1 if num_groups is None else int(num_groups)
    if groups.numel() != n or int(groups.min()) < 0 or int(groups.max()) >= count:
        raise UserInputError(f"groups must be {n} ints in 0..{count - 1}, one per score")
    return scores, correct, F.one_hot(groups, count).double()


def selective_accuracy(scores: Tensor, correct: Tensor, groups: Tensor | None = None,
                       coverages: Sequence[float] = DEFAULT_COVERAGES, *, num_groups: int | None = None) -> dict[str, Any]:
    """Selective accuracy at fixed coverages, on average and per group, and the area under each curve.

    The classifier predicts on examples whose score is >= a threshold tau and abstains on the rest;
    one tau for all groups. For a target coverage c, tau is the highest threshold that covers at
    least ``ceil(c * N)`` examples (examples with equal scores are covered together, so the achieved
    coverage can exceed c). scores (N,) (higher = more confident, e.g. :func:`confidence_scores`),
    correct (N,) bool, groups (N,) ints in 0..G-1 or None (G = ``num_groups`` or max + 1), coverages in (0, 1].

    Returns ``coverages``, ``achieved_coverage``, ``threshold``, ``avg_acc`` (one per coverage) and
    ``auc`` (area under the average curve); with groups also ``group_acc`` / ``group_coverage``
    (per coverage, a list over group ids, None where the group has no covered example / no example),
    ``worst_group_acc`` / ``worst_group`` (over the groups with a covered example), ``group_auc`` (each
    group's area against its own coverage; None for an empty group) and ``worst_group_auc``.

    >>> selective_accuracy(torch.tensor([0.9, 0.2]), torch.tensor([True, False]), coverages=[1.0, 0.5])["avg_acc"]
    [0.5, 1.0]
    """
    scores, correct, onehot = _selective_inputs(scores, correct, groups, num_groups)
    cov = [float(c) for c in coverages]
    if not cov or any(not 0 < c <= 1 for c in cov):
        raise UserInputError(f"coverages must lie in (0, 1], got {list(coverages)!r}")
    n = scores.numel()
    thresholds, covered, right, per_group = _ranked_blocks(scores, correct, onehot)
    picks = [int(torch.searchsorted(covered, torch.tensor(math.ceil(c * n - 1e-9)))) for c in cov]
    out: dict[str, Any] = {
        "metric": "selective_accuracy", "coverages": cov,
        "achieved_coverage": [int(covered[j]) / n for j in picks],
        "threshold": [float(thresholds[j]) for j in picks],
        "avg_acc": [float(right[j] / covered[j]) for j in picks],
        "auc": _area(covered.double(), right, n),
    }
    if groups is None:
        return out
    sizes = onehot.sum(0)
    g_cov, g_right = per_group[:, 0], per_group[:, 1]
    out["group_acc"] = [[float(g_right[j, g] / g_cov[j, g]) if g_cov[j, g] > 0 else None for g in range(len(sizes))]
                        for j in picks]
    out["group_coverage"] = [[float(g_cov[j, g] / sizes[g]) if sizes[g] > 0 else None for g in range(len(sizes))]
                             for j in picks]
    worst = [min((a, g) for g, a in enumerate(row) if a is not None) for row in out["group_acc"]]
    out["worst_group_acc"] = [a for a, _ in worst]
    out["worst_group"] = [g for _, g in worst]
    out["group_auc"] = [_area(g_cov[:, g], g_right[:, g], float(sizes[g])) for g in range(len(sizes))]
    out["worst_group_auc"] = min(a for a in out["group_auc"] if a is not None)
    return out


def selective_curves(scores: Tensor, correct: Tensor, groups: Tensor | None = None, *,
                     num_groups: int | None = None) -> dict[str, Any]:
    """The whole accuracy-coverage curve, one point per distinct threshold: ``coverage`` (J,) the
    average coverage, ``avg_acc`` (J,), and with groups ``group_acc`` (G lists of J, None where the
    group has no covered example yet). Same conventions as :func:`selective_accuracy`; for plots."""
    scores, correct, onehot = _selective_inputs(scores, correct, groups, num_groups)
    _, covered, right, per_group = _ranked_blocks(scores, correct, onehot)
    out: dict[str, Any] = {"coverage": (covered.double() / len(scores)).tolist(),
                           "avg_acc": (right / covered).tolist()}
    if groups is not None:
        g_cov, g_right = per_group[:, 0], per_group[:, 1]
        out["group_acc"] = [[float(r / c) if c > 0 else None for r, c in zip(g_right[:, g], g_cov[:, g])]
                            for g in range(onehot.shape[1])]
    return out
