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

from typing import Sequence

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


_ROUNDING = 1e-5  # relative float32 rounding allowed when comparing certificate and measured loss


def _per_example_ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def _eval_mode(model: nn.Module):
    from attacks.base import frozen

    return frozen(model)


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
    from .defenses.wrm import wrm_maximize

    rhos = [float(r) for r in (rho if isinstance(rho, (list, tuple)) else [rho])]
    if any(r < 0 for r in rhos):
        raise UserInputError(f"rho must be >= 0, got {rho!r}")
    with _eval_mode(model):
        x_star, grad_norm = wrm_maximize(model, x, y, gamma=gamma, steps=steps, box=box, return_grad_norm=True)
        with torch.no_grad():
            cost = (x_star - x).flatten(1).pow(2).sum(1)
            phi = _per_example_ce(model, x_star, y) - gamma * cost
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
    from .defenses.wrm import wrm_maximize

    with _eval_mode(model):
        x_adv = wrm_maximize(model, x, y, gamma=gamma_adv, steps=steps, box=box)
        with torch.no_grad():
            loss = _per_example_ce(model, x_adv, y).mean()
            clean = _per_example_ce(model, x, y).mean()
    rho_test = float((x_adv - x).flatten(1).pow(2).sum(1).mean())
    return {"gamma_adv": float(gamma_adv), "rho_test": rho_test, "loss": float(loss), "clean_loss": float(clean)}


def wrm_report(model: nn.Module, x: Tensor, y: Tensor, *, gamma: float, gammas_adv: Sequence[float] = (),
               steps: int = 200, box: tuple[float, float] = (0.0, 1.0)) -> dict[str, object]:
    """For each ``gamma_adv``: the measured adversarial loss at radius rho_test and the certificate at
    that radius (with the model's training ``gamma``); ``bound_holds`` says certificate >= measured
    (up to float rounding, 1e-5 relative: at gamma_adv == gamma both sides are the same number, the
    radius the paper reports: the transport cost of the inner maximiser on the test set).

    Default ``gammas_adv``: gamma times (2, 1, 0.5, 0.25), from small to larger balls. The maximisers
    at gamma serve both phi and the gamma_adv == gamma row (one ascent, not two).
    """
    from .defenses.wrm import wrm_maximize

    gammas_adv = [float(g) for g in gammas_adv] or [gamma * f for f in (2.0, 1.0, 0.5, 0.25)]
    if any(not g > 0 for g in gammas_adv):
        raise UserInputError(f"gammas_adv must be > 0, got {gammas_adv!r}")
    rows = []
    with _eval_mode(model):
        x_star, grad_norm = wrm_maximize(model, x, y, gamma=gamma, steps=steps, box=box, return_grad_norm=True)
        with torch.no_grad():
            cost_star = (x_star - x).flatten(1).pow(2).sum(1)
            loss_star = _per_example_ce(model, x_star, y)
            clean = float(_per_example_ce(model, x, y).mean())
        mean_phi = float((loss_star - gamma * cost_star).mean())
        for g in gammas_adv:
            if g == float(gamma):
                attack = {"gamma_adv": g, "rho_test": float(cost_star.mean()), "loss": float(loss_star.mean()),
                          "clean_loss": clean}
            else:
                attack = measured_adversarial_loss(model, x, y, gamma_adv=g, steps=steps, box=box)
            bound = float(gamma) * attack["rho_test"] + mean_phi
            # equality is exact at gamma_adv == gamma (same maximisers), so allow float rounding
            holds = bound >= attack["loss"] - _ROUNDING * max(1.0, abs(attack["loss"]))
            rows.append({**attack, "certificate": bound, "bound_holds": holds})
    return {"metric": "wrm_certificate", "gamma": float(gamma), "mean_phi": mean_phi,
            "ascent_grad_norm": float(grad_norm.mean()), "n_examples": int(x.shape[0]), "steps": int(steps),
            "rows": rows, "bound_holds": all(r["bound_holds"] for r in rows)}
