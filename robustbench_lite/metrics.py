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
