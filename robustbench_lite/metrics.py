"""Metrics beyond robust accuracy; their definitions are written down in docs/metrics.md.

- ``worst_group_acc`` (Sagawa et al. 2020, arXiv 1911.08731): the lowest accuracy over the groups
  present in the evaluated set; ``avg_acc`` is the plain accuracy over all examples.
- ``mean_corruption_acc`` (Hendrycks & Dietterich 2019, arXiv 1903.12261): the unweighted mean of
  accuracy over every corruption and its five severities.
- The WRM certificate (Sinha, Namkoong & Duchi 2018, arXiv 1710.10571, eq. 11):
  ``sup_{P: W_c(P, P_n) <= rho} E_P[loss] <= gamma * rho + E_{P_n}[phi_gamma(x, y)]`` with
  ``phi_gamma(x, y) = sup_x' loss(x', y) - gamma * ||x' - x||_2^2`` (x' in the input box), and the
  measured adversarial loss it must bound: the mean loss at the Lagrangian attack's points, whose
  mean transport cost ``rho_test`` places them inside the Wasserstein ball of that radius.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


_ROUNDING = 1e-5  # relative float32 rounding allowed when comparing certificate and measured loss


def _per_example_ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def _eval_mode(model: nn.Module):
    from attacks.base import frozen

    return frozen(model)


def _lagrangian_ascent(model: nn.Module, x: Tensor, y: Tensor, gamma: float, steps: int, box: tuple[float, float],
                       grad_norm: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per example: the transport cost ||x' - x||^2 and cross-entropy at the maximiser x' of
    loss - gamma * cost (:func:`robustbench_lite.defenses.wrm.wrm_maximize`), and with ``grad_norm``
    the norm of the objective's unblocked gradient there. The model is in eval mode meanwhile."""
    from .defenses.wrm import wrm_maximize

    with _eval_mode(model):
        out = wrm_maximize(model, x, y, gamma=gamma, steps=steps, box=box, return_grad_norm=grad_norm)
        x_adv, norm = out if grad_norm else (out, None)
        with torch.no_grad():
            return (x_adv - x).flatten(1).pow(2).sum(1), _per_example_ce(model, x_adv, y), norm


def _clean_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with _eval_mode(model), torch.no_grad():
        return float(_per_example_ce(model, x, y).mean())


def _attack_row(gamma_adv: float, cost: Tensor, loss: Tensor, clean_loss: float) -> dict[str, float]:
    return {"gamma_adv": float(gamma_adv), "rho_test": float(cost.mean()), "loss": float(loss.mean()),
            "clean_loss": clean_loss}


def wrm_certificate(model: nn.Module, x: Tensor, y: Tensor, *, gamma: float, rho: float | Sequence[float],
                    steps: int = 200, box: tuple[float, float] = (0.0, 1.0)) -> dict[str, object]:
    """Sinha et al.'s upper bound ``gamma * rho + mean_i phi_gamma(x_i, y_i)`` on the worst-case mean
    cross-entropy over the Wasserstein-2 (squared-L2 cost) ball of radius ``rho`` around (x, y).

    phi is computed by projected gradient ascent (:func:`robustbench_lite.defenses.wrm.wrm_maximize`);
    it is a concave problem when gamma exceeds the loss's smoothness constant (ELU networks, large
    gamma), so the ascent reaches the supremum. ``ascent_grad_norm`` (mean norm of the objective's
    gradient at the end, where the box does not block it) says how far from stationary it stopped.
    x (N, ...) in ``box``, y (N,). Returns ``certificate`` (list, one per rho), ``mean_phi``, ``gamma``, ``rho``.
    """
    rhos = [float(r) for r in (rho if isinstance(rho, (list, tuple)) else [rho])]
    if any(r < 0 for r in rhos):
        raise UserInputError(f"rho must be >= 0, got {rho!r}")
    cost, loss, grad_norm = _lagrangian_ascent(model, x, y, gamma, steps, box, grad_norm=True)
    phi = loss - gamma * cost
    mean_phi = float(phi.mean())
    return {"metric": "wrm_certificate", "gamma": float(gamma), "rho": rhos, "mean_phi": mean_phi,
            "certificate": [float(gamma) * r + mean_phi for r in rhos], "ascent_grad_norm": float(grad_norm.mean()),
            "phi": phi.tolist()}


def measured_adversarial_loss(model: nn.Module, x: Tensor, y: Tensor, *, gamma_adv: float, steps: int = 200,
                              box: tuple[float, float] = (0.0, 1.0)) -> dict[str, float]:
    """The attack side of Sinha et al.'s Figure 2: points x' maximising loss - gamma_adv * ||x' - x||^2.

    Returns ``rho_test`` = mean ||x' - x||_2^2 (the Wasserstein radius the points lie in), ``loss`` =
    mean cross-entropy at x' (a lower bound of the worst case in that ball), and ``clean_loss``.
    """
    cost, loss, _ = _lagrangian_ascent(model, x, y, gamma_adv, steps, box)
    return _attack_row(gamma_adv, cost, loss, _clean_loss(model, x, y))


def wrm_report(model: nn.Module, x: Tensor, y: Tensor, *, gamma: float, gammas_adv: Sequence[float] = (),
               steps: int = 200, box: tuple[float, float] = (0.0, 1.0)) -> dict[str, object]:
    """For each ``gamma_adv``: the measured adversarial loss at radius rho_test and the certificate at
    that radius (with the model's training ``gamma``); ``bound_holds`` says certificate >= measured
    (up to float rounding, 1e-5 relative: at gamma_adv == gamma both sides are the same number, the
    radius the paper reports: the transport cost of the inner maximiser on the test set).

    Default ``gammas_adv``: gamma times (2, 1, 0.5, 0.25), from small to larger balls. The maximisers
    at gamma serve both phi and the gamma_adv == gamma row (one ascent, not two).
    """
    gammas_adv = [float(g) for g in gammas_adv] or [gamma * f for f in (2.0, 1.0, 0.5, 0.25)]
    if any(not g > 0 for g in gammas_adv):
        raise UserInputError(f"gammas_adv must be > 0, got {gammas_adv!r}")
    cost_star, loss_star, grad_norm = _lagrangian_ascent(model, x, y, gamma, steps, box, grad_norm=True)
    clean = _clean_loss(model, x, y)
    mean_phi = float((loss_star - gamma * cost_star).mean())
    rows = []
    for g in gammas_adv:
        ascent = (cost_star, loss_star) if g == float(gamma) else _lagrangian_ascent(model, x, y, g, steps, box)[:2]
        attack = _attack_row(g, *ascent, clean)
        bound = float(gamma) * attack["rho_test"] + mean_phi
        # equality is exact at gamma_adv == gamma (same maximisers), so allow float rounding
        holds = bound >= attack["loss"] - _ROUNDING * max(1.0, abs(attack["loss"]))
        rows.append({**attack, "certificate": bound, "bound_holds": holds})
    return {"metric": "wrm_certificate", "gamma": float(gamma), "mean_phi": mean_phi,
            "ascent_grad_norm": float(grad_norm.mean()), "n_examples": int(x.shape[0]), "steps": int(steps),
            "rows": rows, "bound_holds": all(r["bound_holds"] for r in rows)}


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
