"""Merging a new leaderboard record into an existing one of the same model, data and threat model.

Plug-ins of the same name are replaced, others kept, and every aggregate (robust, certified,
worst-group accuracy) is recomputed from the merged per-example flags; records of the corruptions
threat model, new weights or other examples replace the old record instead.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from ..errors import SoundnessError, UserInputError
from .sections import merge_confidence, refresh_sections
from ..threat import CORRUPTIONS_NORM

log = logging.getLogger(__name__)

#: the one attack suite whose accuracy fills a record's ``autoattack_acc`` (attacks.ensemble names it)
STANDARD_AUTOATTACK_SUITE = "autoattack-standard"


def _same_evaluation(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return (old["model"].get("weights_sha256") == new["model"].get("weights_sha256")
            and old["dataset"] == new["dataset"] and old["threat_model"] == new["threat_model"])


def merge_records(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Merge ``new`` into ``old`` (same model, data and threat): plug-ins of the same name are
    replaced, others kept, and the aggregates are recomputed from the merged per-example flags
    (robust = correct and broken by no attack and no checked counterexample of either run). Different
    weights or examples:
    the new record replaces the old one."""
    if not _same_evaluation(old, new) or new["threat_model"]["norm"] == CORRUPTIONS_NORM:
        if (old["model"].get("weights_sha256") == new["model"].get("weights_sha256")
                and old["threat_model"] == new["threat_model"]
                and old["dataset"]["n_examples"] > new["dataset"]["n_examples"]):
            raise UserInputError(
                f"the existing record of {new['model']['name']} covers {old['dataset']['n_examples']} examples and "
                f"this run {new['dataset']['n_examples']}: not replacing it with a smaller evaluation "
                "(use --no-write, another --leaderboard-dir, or --replace)")
        log.info("replacing %s: the weights or the evaluated examples changed", new["model"]["name"])
        return new
    merged = copy.deepcopy(new)
    per, old_per = merged["per_example"], old["per_example"]
    new_attacks = {a["name"] for a in new["attacks"]}
    new_certs = {c["name"] for c in new["certifiers"]}
    kept_attacks = [a for a in old["attacks"] if a["name"] not in new_attacks]
    kept_certs = [c for c in old["certifiers"] if c["name"] not in new_certs]
    merged["attacks"] = kept_attacks + new["attacks"]
    if kept_attacks or kept_certs:  # the new run's fingerprint does not describe the merged protocol
        merged.pop("inputs", None)
    merged["certifiers"] = kept_certs + new["certifiers"]
    for a in kept_attacks:
        per["attack_success"][a["name"]] = old_per["attack_success"][a["name"]]
        if a["name"] in old_per.get("distances", {}):
            per.setdefault("distances", {})[a["name"]] = old_per["distances"][a["name"]]
    for c in kept_certs:
        per["certified_by"][c["name"]] = old_per["certified_by"][c["name"]]
        if c["name"] in old_per.get("refuted_by", {}):
            per.setdefault("refuted_by", {})[c["name"]] = old_per["refuted_by"][c["name"]]
    n = len(per["correct"])
    broken = [*per["attack_success"].values(), *per.get("refuted_by", {}).values()]
    per["robust"] = [int(per["correct"][i] and not any(s[i] for s in broken)) for i in range(n)]
    per["certified"] = [int(any(c[i] for c in per["certified_by"].values())) for i in range(n)]
    merged["robust_acc"] = sum(per["robust"]) / n
    merged["certified_acc"] = sum(per["certified"]) / n
    merged["number_forward_passes"] = n + sum(a["forward_passes"] for a in merged["attacks"])
    merged["number_backward_passes"] = sum(a["backward_passes"] for a in merged["attacks"])
    new_flags = {f["name"] for f in new["flags"]}
    merged["flags"] = [f for f in old["flags"] if f["name"] not in new_flags] + new["flags"]
    merged["created"], merged["updated"] = old["created"], new["created"]
    merged.pop("autoattack_acc", None)
    if "autoattack_acc" in new:
        merged["autoattack_acc"] = new["autoattack_acc"]
    elif "autoattack_acc" in old and kept_attacks and any(
            a["config"].get("suite") == STANDARD_AUTOATTACK_SUITE for a in kept_attacks):
        merged["autoattack_acc"] = old["autoattack_acc"]
    if "wrm_certificate" in old and "wrm_certificate" not in new:
        merged["wrm_certificate"] = old["wrm_certificate"]
    elif "wrm_certificate" in new:  # the new certificate's verdict replaces the old one's
        merged["flags"] = [f for f in merged["flags"] if f["name"] != "wrm_certificate_violated" or f in new["flags"]]
    merge_confidence(old_per, new["per_example"], per)
    refresh_sections(merged)
    bad = [i for i in range(n) if per["certified"][i] and not per["robust"][i]]
    if bad:
        raise SoundnessError(f"merging into the existing record breaks certified <= robust on {len(bad)} "
                             "example(s): a certifier of one run certified points an attack of the other broke")
    return merged
