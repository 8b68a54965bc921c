"""What the defenses claim, in the leaderboard record (definitions in docs/metrics.md).

- ``groups`` (datasets with group labels, e.g. colored-mnist5k; Sagawa et al. 2020, arXiv 1911.08731):
  average and worst-group clean accuracy, worst-group robust accuracy when attacks ran, and every
  group's accuracy, computed from ``per_example.correct`` / ``robust`` and ``per_example.group``.
- ``selective`` (datasets with group labels; Jones et al. 2021, arXiv 2010.14134): selective accuracy at
  fixed coverages on average and per group, and the area under each accuracy-coverage curve, from the
  softmax-response confidence of each prediction (``per_example.confidence``): clean, and at the
  deciding adversarial point when attacks ran (correct = ``per_example.robust`` there).
- ``corruptions`` (the ``corruptions`` threat model, :mod:`robustbench_lite.corruptions.evaluate`; Hendrycks &
  Dietterich 2019, arXiv 1903.12261): accuracy per corruption and severity and ``mean_corruption_acc``,
  computed from ``per_example.corruption_correct``.
- ``wrm_certificate`` (models whose card says defense ``wrm``, gamma from the card's
  ``defense_config``; Sinha, Namkoong & Duchi 2018, arXiv 1710.10571): the certificate
  ``gamma * rho + mean(phi_gamma)`` at the radii rho_test that an independent Lagrangian attack's
  transport cost gives, with how close phi's ascent came to the supremum, next to the loss that attack
  measured; a measured loss above the certificate plus phi's Frank-Wolfe gap adds the error flag
  ``wrm_certificate_violated`` to the record (recorded, not raised: the table shows it).

- ``certification`` (records with certifiers): the band from certified to robust accuracy
  on the first ``n_examples`` examples that every certifier ran on (a complete verifier may run on a
  prefix of the table), and ``unresolved`` = robust - certified there: the true robust accuracy of those
  examples lies in the band.

The group, selective, corruption and certification sections are functions of stored per-example flags, so a
merged record gets them recomputed (:func:`refresh_sections`).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from ..evaluation.checks import ERROR, make_flag
from ..errors import UserInputError
from ..hashing import dataset_sha256, indices_sha256, sha256_json
from ..metrics import (DEFAULT_COVERAGES, confidence_scores, corruption_summary, selective_accuracy,
                       worst_group_accuracy, wrm_report)
from ..threat import CORRUPTIONS_NORM

log = logging.getLogger(__name__)

DOCS = "docs/metrics.md"
GROUP_DEFINITION = f"{DOCS}#worst-group-accuracy-worst_group_acc"
CORRUPTION_DEFINITION = f"{DOCS}#mean-corruption-accuracy-mean_corruption_acc"
SELECTIVE_DEFINITION = f"{DOCS}#selective-accuracy-selective_accuracy"
#: the confidence score of the records and the decimals it is stored with (the section is computed from those)
SELECTIVE_SCORE, CONFIDENCE_DECIMALS = "softmax", 6
WRM_DEFINITION = f"{DOCS}#wrm-certificate-wrm_certificate"
#: ascent steps of phi and of the Lagrangian attack (the gradient norm at the end is recorded)
WRM_STEPS = 100
#: the attack's gamma_adv as multiples of the model's gamma (1: the paper's rho = the maximiser's cost)
WRM_GAMMA_FACTORS = (2.0, 1.0, 0.5)


# --- groups -----------------------------------------------------------------------------------------
def _group_block(flags: Sequence[int], groups: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    correct, ids = torch.tensor(list(flags)).bool(), torch.tensor(list(groups), dtype=torch.int64)
    summary = worst_group_accuracy(correct, ids)
    per_group: dict[int, float] = summary["group_acc"]  # type: ignore[assignment]
    return {"avg_acc": summary["avg_acc"], "worst_group_acc": summary["worst_group_acc"],
            "worst_group": names[int(summary["worst_group"])],  # type: ignore[call-overload]
            "group_acc": [per_group.get(g) for g in range(len(names))]}


def group_section(per_example: dict[str, Any], names: Sequence[str], attacks_ran: bool) -> dict[str, Any]:
    """The record's ``groups`` section from ``per_example`` (``correct``, ``robust``, ``group``)."""
    groups = per_example["group"]
    section = {"metric": "worst_group_acc", "definition": GROUP_DEFINITION, "names": list(names),
               "counts": [sum(1 for g in groups if g == k) for k in range(len(names))],
               "clean": _group_block(per_example["correct"], groups, names)}
    if attacks_ran:
        section["robust"] = _group_block(per_example["robust"], groups, names)
    return section


# --- selective classification ----------------------------------------------------------------------
def confidence_block(result: Any) -> dict[str, Any] | None:
    """``per_example.confidence`` of an evaluation: the score of every clean prediction and, when attacks
    ran, of the prediction at its deciding adversarial point (rounded to CONFIDENCE_DECIMALS)."""
    clean = getattr(result, "clean_logits", None)
    if clean is None:
        return None
    block = {"score": SELECTIVE_SCORE, "clean": _rounded(confidence_scores(clean, SELECTIVE_SCORE))}
    adversarial = getattr(result, "adversarial_logits", None)
    if adversarial is not None:
        block["adversarial"] = _rounded(confidence_scores(adversarial, SELECTIVE_SCORE))
    return block


def _rounded(scores: torch.Tensor) -> list[float]:
    return [round(float(s), CONFIDENCE_DECIMALS) for s in scores.tolist()]


def _selective_block(scores: Sequence[float], flags: Sequence[int], groups: Sequence[int],
                     names: Sequence[str]) -> dict[str, Any]:
    out = selective_accuracy(torch.tensor(list(scores), dtype=torch.float64), torch.tensor(list(flags)).bool(),
                             torch.tensor(list(groups)), DEFAULT_COVERAGES, num_groups=len(names))
    out["worst_group"] = [names[g] for g in out["worst_group"]]
    return {k: v for k, v in out.items() if k not in ("metric", "coverages")}


def selective_section(per_example: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The record's ``selective`` section from ``per_example`` (``confidence``, ``correct``, ``robust``, ``group``)."""
    confidence, groups = per_example["confidence"], per_example["group"]
    section = {"metric": "selective_accuracy", "definition": SELECTIVE_DEFINITION, "score": confidence["score"],
               "coverages": list(DEFAULT_COVERAGES), "names": list(names),
               "clean": _selective_block(confidence["clean"], per_example["correct"], groups, names)}
    if "adversarial" in confidence:
        section["adversarial"] = _selective_block(confidence["adversarial"], per_example["robust"], groups, names)
    return section


def merge_confidence(old_per: dict[str, Any], new_per: dict[str, Any], merged_per: dict[str, Any]) -> None:
    """Adversarial confidences of a merged record: each example's comes from the run whose attacks decided
    its merged flag (the new run's, unless only an attack kept from the old record broke it; then the
    old run's point, or none at all when the old record has no confidences)."""
    confidence = merged_per.get("confidence")
    if not confidence or "adversarial" not in confidence:
        return
    old = old_per.get("confidence") or {}
    taken = [i for i, (m, r) in enumerate(zip(merged_per["robust"], new_per["robust"])) if m != r]
    if not taken:
        return
    if "adversarial" not in old or old.get("score") != confidence["score"]:
        del confidence["adversarial"]
        return
    for i in taken:
        confidence["adversarial"][i] = old["adversarial"][i]


# --- corruptions ------------------------------------------------------------------------------------
def corruption_section(flags: dict[str, list[list[int]]], correct: Sequence[int]) -> dict[str, Any]:
    """The record's ``corruptions`` section from the per-severity flags ``{name: [[0/1] * N] * 5}``."""
    summary = corruption_summary(flags)
    return {"metric": "mean_corruption_acc", "definition": CORRUPTION_DEFINITION,
            "mean_corruption_acc": summary["mean_corruption_acc"], "clean_acc": sum(correct) / len(correct),
            "severities": list(range(1, 1 + len(next(iter(flags.values()))))), "accuracy": summary["accuracy"],
            "corruption_mean": summary["corruption_mean"]}


# --- certification -----------------------------------------------------------------------------------
def certification_section(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record's ``certification`` section from ``per_example`` (``robust``, ``certified``) and each
    certifier's ``n_examples`` (absent: all); None for a record without certifiers."""
    per, certifiers = record["per_example"], record["certifiers"]
    n = len(per["correct"])
    if not certifiers or n == 0:
        return None
    prefix = min(int(c.get("n_examples", n)) for c in certifiers)
    robust, certified = sum(per["robust"][:prefix]), sum(per["certified"][:prefix])
    return {"n_examples": prefix, "robust_acc": robust / prefix, "certified_acc": certified / prefix,
            "unresolved": (robust - certified) / prefix}


def _set_certification(record: dict[str, Any]) -> None:
    section = certification_section(record)
    record.pop("certification", None)
    if section is not None:
        record["certification"] = section


# --- building and refreshing ------------------------------------------------------------------------
def add_sections(record: dict[str, Any], result: Any) -> None:
    """Put the group, corruption and certification sections (and their per-example flags) of ``result``
    in ``record``."""
    per = record["per_example"]
    groups = getattr(result, "groups", None)
    if groups is not None:
        per["group"] = [int(g) for g in groups.tolist()]
        record["groups"] = group_section(per, list(result.group_names), bool(record["attacks"]))
        confidence = confidence_block(result)
        if confidence is not None:
            per["confidence"] = confidence
            record["selective"] = selective_section(per, list(result.group_names))
    corrupted = getattr(result, "corruption_correct", None)
    if corrupted:
        per["corruption_correct"] = {name: [[int(b) for b in row] for row in flags.tolist()]
                                     for name, flags in corrupted.items()}
        record["corruptions"] = corruption_section(per["corruption_correct"], per["correct"])
    _set_certification(record)


def refresh_sections(record: dict[str, Any]) -> None:
    """Recompute the sections that depend on flags a merge changed (``robust`` after new attacks,
    ``certified`` after new certifiers)."""
    per = record["per_example"]
    if "groups" in record and "group" in per:
        record["groups"] = group_section(per, record["groups"]["names"], bool(record["attacks"]))
    if "selective" in record and "confidence" in per:
        record["selective"] = selective_section(per, record["selective"]["names"])
    if "corruptions" in record and "corruption_correct" in per:
        record["corruptions"] = corruption_section(per["corruption_correct"], per["correct"])
    _set_certification(record)


# --- WRM certificate --------------------------------------------------------------------------------
_WRM_CACHE: dict[str, dict[str, Any]] = {}


def wrm_gamma(model_info: Any) -> float | None:
    """The training gamma of a WRM model (card ``defense_config.gamma``); None for other defenses."""
    card = model_info.get("card") if isinstance(model_info, dict) else getattr(model_info, "card", None)
    card = card if isinstance(card, dict) else {}
    defense = card.get("defense") or (model_info.get("defense") if isinstance(model_info, dict)
                                      else getattr(model_info, "defense", None))
    if defense != "wrm":
        return None
    gamma = (card.get("defense_config") or {}).get("gamma")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise UserInputError(f"the model card says defense wrm but its defense_config.gamma is {gamma!r}, "
                             "not a positive number")
    return float(gamma)


def wrm_section(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, gamma: float, steps: int | None = None,
                factors: Sequence[float] | None = None, cache_key: str | None = None) -> dict[str, Any]:
    """The record's ``wrm_certificate`` section on x (N, ...) / y (N,) (see :func:`metrics.wrm_report`).

    ``cache_key`` (weights and data fingerprint): the same model on the same examples is computed once
    per process, so the tables of one model at several eps share one ascent. ``steps`` / ``factors``:
    default :data:`WRM_STEPS` / :data:`WRM_GAMMA_FACTORS`.
    """
    steps = WRM_STEPS if steps is None else int(steps)
    factors = tuple(WRM_GAMMA_FACTORS if factors is None else factors)
    key = None if cache_key is None else f"{cache_key}|{gamma}|{steps}|{factors}"
    if key is not None and key in _WRM_CACHE:
        return dict(_WRM_CACHE[key])
    report = wrm_report(model, x, y, gamma=gamma, gammas_adv=[gamma * f for f in factors], steps=steps)
    rows = [{"gamma_adv": r["gamma_adv"], "rho_test": r["rho_test"], "measured_loss": r["loss"],
             "certificate": r["certificate"], "certificate_if_concave": r["certificate_if_concave"],
             "bound_holds": bool(r["bound_holds"])} for r in report["rows"]]
    section = {"metric": "wrm_certificate", "definition": WRM_DEFINITION, "gamma": float(gamma),
               "gamma_source": "model card defense_config.gamma", "steps": int(steps),
               "attack_restarts": int(report["restarts"]),
               "n_examples": int(x.shape[0]), "clean_loss": float(report["rows"][0]["clean_loss"]),
               "mean_phi": report["mean_phi"], "ascent_grad_norm": report["ascent_grad_norm"],
               "ascent_grad_norm_max": report["ascent_grad_norm_max"], "phi_gap_bound": report["phi_gap_bound"],
               "rows": rows, "bound_holds": all(r["bound_holds"] for r in rows)}
    if report["phi_shortfall"] is not None:
        section["phi_shortfall"] = report["phi_shortfall"]
    if key is not None:
        _WRM_CACHE[key] = dict(section)
    return section


def attach_defense_metrics(record: dict[str, Any], model: nn.Module, model_info: Any, dataset: Any) -> None:
    """Add the ``wrm_certificate`` section (and a flag if it fails) to the record of a WRM model.

    ``dataset``: the evaluated Dataset; the record's first ``n_examples`` are used (their index
    fingerprint must match the record's). Records of the corruptions threat model get none.
    """
    gamma = wrm_gamma(model_info)
    if gamma is None or record["threat_model"]["norm"] == CORRUPTIONS_NORM:
        return
    n = int(record["dataset"]["n_examples"])
    sub = dataset.subset(slice(0, n))
    if indices_sha256(sub.indices) != record["dataset"]["indices"]["sha256"]:
        raise UserInputError("the WRM certificate must be computed on the evaluated examples: "
                             "the dataset given is not the one the record was made from")
    device = next(iter(model.parameters()), torch.empty(0)).device
    weights = record["model"].get("weights_sha256")
    key = None if weights is None else sha256_json([weights, dataset_sha256(sub.x, sub.y)])
    section = wrm_section(model, sub.x.to(device), sub.y.to(device).long(), gamma=gamma, cache_key=key)
    record["wrm_certificate"] = section
    record["flags"] = [f for f in record["flags"] if f["name"] != "wrm_certificate_violated"]
    if not section["bound_holds"]:  # recorded, not raised: the published table shows the violation
        bad = [r for r in section["rows"] if not r["bound_holds"]]
        record["flags"].append(make_flag(
            "wrm_certificate_violated",
            f"an independent attack's loss exceeds the WRM certificate gamma * rho + mean(phi) plus phi's "
            f"Frank-Wolfe gap at {len(bad)} radius(es): the inner problem is not concave, so the certificate is "
            f"not an upper bound (see {WRM_DEFINITION})",
            severity=ERROR, gamma_adv=[r["gamma_adv"] for r in bad], certificate=[r["certificate"] for r in bad],
            certificate_if_concave=[r["certificate_if_concave"] for r in bad],
            measured_loss=[r["measured_loss"] for r in bad]))
        log.warning("WRM certificate violated for %s", record["model"]["name"])
