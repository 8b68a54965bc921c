"""What the defenses claim, in leaderboard records: worst-group accuracy (datasets with groups), the
corruptions threat model (accuracy per corruption and severity, mean), and the WRM certificate."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_evaluate import toy_dataset, toy_model
from torch import nn

from robustbench_lite.leaderboard import sections as reports
from robustbench_lite.corruptions.evaluate import corruption_names, evaluate_corruptions
from robustbench_lite.data.dataset import Dataset
from robustbench_lite.errors import UserInputError
from robustbench_lite.evaluation.core import evaluate
from robustbench_lite.leaderboard.records import build_record, read_record, record_path, schema_errors, write_record
from robustbench_lite.metrics import confidence_scores, selective_accuracy, worst_group_accuracy
from robustbench_lite.threat import ThreatModel

REPO = Path(__file__).resolve().parents[2]
INFO = {"name": "toy", "architecture": "linear", "defense": "standard", "weights_sha256": "cd" * 32,
        "parameter_count": 51, "normalization": None, "source": "test", "card": None}
NAMES = ["y=0,a", "y=0,b", "y=1,a", "y=1,b", "y=2,a", "y=2,b"]


def grouped(n: int = 36) -> Dataset:
    base = toy_dataset(n)
    groups = base.y * 2 + (torch.arange(n) // 3) % 2
    return Dataset(name="toy-groups", split="test", x=base.x, y=base.y, num_classes=3, groups=groups, group_names=NAMES)


def doc_anchors() -> set[str]:
    text = (REPO / "docs" / "metrics.md").read_text()
    return {re.sub(r"[^a-z0-9_ -]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", text, re.M)}


# --- groups -----------------------------------------------------------------------------------------
def test_group_section_matches_the_metric_by_hand():
    ds = grouped()
    result = evaluate(toy_model(), ds, ThreatModel("Linf", 0.2), attacks=["fgsm"], certifiers=[], batch_size=7)
    record = build_record(result, INFO, toy_model())
    section = record["groups"]
    assert record["per_example"]["group"] == ds.groups.tolist()
    expected = worst_group_accuracy(result.correct, ds.groups)
    assert section["clean"]["worst_group_acc"] == expected["worst_group_acc"]
    assert section["clean"]["avg_acc"] == record["clean_acc"]
    assert section["clean"]["worst_group"] == NAMES[expected["worst_group"]]
    robust = worst_group_accuracy(result.robust, ds.groups)
    assert section["robust"]["worst_group_acc"] == robust["worst_group_acc"] <= section["clean"]["worst_group_acc"]
    assert section["counts"] == [6] * 6 and section["names"] == NAMES
    assert section["definition"].split("#")[1] in doc_anchors()


def test_group_section_without_attacks_has_no_robust_block_and_datasets_without_groups_none():
    result = evaluate(toy_model(), grouped(), ThreatModel("Linf", 0.1), attacks=[], certifiers=[])
    assert "robust" not in build_record(result, INFO, toy_model())["groups"]
    plain = evaluate(toy_model(), toy_dataset(12), ThreatModel("Linf", 0.1), attacks=[], certifiers=[])
    record = build_record(plain, INFO, toy_model())
    assert "groups" not in record and "group" not in record["per_example"]


def test_group_metrics_do_not_depend_on_batch_size():
    sections = [build_record(evaluate(toy_model(), grouped(), ThreatModel("Linf", 0.15), attacks=["pgd"],
                                      certifiers=[], batch_size=b), INFO, toy_model())["groups"] for b in (5, 36)]
    assert sections[0] == sections[1]


def test_merge_recomputes_worst_group_robust_accuracy(tmp_path):
    ds, model, threat = grouped(), toy_model(), ThreatModel("Linf", 0.2)
    write_record(build_record(evaluate(model, ds, threat, attacks=["fgsm"], certifiers=[]), INFO, model), tmp_path)
    second = evaluate(model, ds, threat, attacks=["pgd"], certifiers=[])
    path = write_record(build_record(second, INFO, model), tmp_path)
    merged = read_record(path)
    robust = torch.tensor(merged["per_example"]["robust"]).bool()
    assert merged["groups"]["robust"]["worst_group_acc"] == worst_group_accuracy(robust, ds.groups)["worst_group_acc"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3)), min_size=1, max_size=40))
def test_worst_group_is_the_lowest_group_accuracy(pairs):
    per = {"correct": [int(c) for c, _ in pairs], "robust": [0] * len(pairs), "group": [g for _, g in pairs]}
    section = reports.group_section(per, ["a", "b", "c", "d"], attacks_ran=False)
    present = {g for _, g in pairs}
    accs = {g: sum(c for c, h in pairs if h == g) / sum(1 for _, h in pairs if h == g) for g in present}
    assert section["clean"]["worst_group_acc"] == min(accs.values())
    assert [a is None for a in section["clean"]["group_acc"]] == [g not in present for g in range(4)]


# --- selective classification ----------------------------------------------------------------------
def test_selective_section_uses_clean_and_adversarial_confidences(tmp_path):
    """The record's scores are the softmax log-odds of the model at x (clean) and at the deciding
    adversarial point; the section is selective_accuracy of those scores with correct / robust flags."""
    ds, model = grouped(), toy_model()
    result = evaluate(model, ds, ThreatModel("Linf", 0.2), attacks=["pgd"], certifiers=[], batch_size=7)
    record = build_record(result, INFO, model)
    assert not schema_errors(record)
    per, section = record["per_example"], record["selective"]
    with torch.no_grad():
        clean = confidence_scores(model(ds.x))
    assert per["confidence"]["clean"] == pytest.approx(clean.tolist(), abs=1e-6)
    adversarial = torch.tensor(per["confidence"]["adversarial"])
    broken = torch.tensor(per["attack_success"]["pgd"]).bool()
    assert broken.any() and not torch.allclose(adversarial[broken].double(), clean[broken], atol=1e-3)
    wrong = ~torch.tensor(per["correct"]).bool()  # no attack ran on them: their point is the clean input
    assert adversarial[wrong].tolist() == pytest.approx(clean[wrong].tolist(), abs=1e-6)
    with torch.no_grad():  # a broken example's point is misclassified, so its top class is not y
        assert (result.adversarial_logits.argmax(1)[broken] != ds.y[broken]).all()
    expected = selective_accuracy(torch.tensor(per["confidence"]["adversarial"], dtype=torch.float64),
                                  result.robust, ds.groups, section["coverages"], num_groups=6)
    assert section["adversarial"]["avg_acc"] == expected["avg_acc"]
    assert section["adversarial"]["worst_group"] == [NAMES[g] for g in expected["worst_group"]]
    assert section["clean"]["avg_acc"][0] == record["clean_acc"]  # 100 % coverage: plain accuracy
    assert section["adversarial"]["worst_group_acc"][0] == record["groups"]["robust"]["worst_group_acc"]
    assert section["definition"].split("#")[1] in doc_anchors()
    from robustbench_lite.leaderboard.render.terminal import format_result

    text = format_result(result, "toy", None, 1.0, record)
    avg = "/".join(f"{100 * a:.1f}" for a in section["adversarial"]["avg_acc"])
    assert f"selective under attack  avg {avg}, worst group" in text and "at coverage 100/90/80/50 %" in text
    plain = build_record(evaluate(model, toy_dataset(12), ThreatModel("Linf", 0.1), attacks=[], certifiers=[]),
                         INFO, model)
    assert "selective" not in plain and "confidence" not in plain["per_example"]
    no_attack = build_record(evaluate(model, ds, ThreatModel("Linf", 0.1), attacks=[], certifiers=[]), INFO, model)
    assert "adversarial" not in no_attack["selective"] and "adversarial" not in no_attack["per_example"]["confidence"]


def test_selective_section_does_not_depend_on_batch_size():
    records = [build_record(evaluate(toy_model(), grouped(), ThreatModel("Linf", 0.15), attacks=["pgd"],
                                     certifiers=[], batch_size=b), INFO, toy_model()) for b in (5, 36)]
    assert records[0]["selective"] == records[1]["selective"]
    assert records[0]["per_example"]["confidence"] == records[1]["per_example"]["confidence"]


def test_merge_takes_the_adversarial_confidence_of_the_run_that_broke_the_example(tmp_path):
    ds, model, threat = grouped(), toy_model(), ThreatModel("Linf", 0.2)
    first = build_record(evaluate(model, ds, threat, attacks=["pgd"], certifiers=[]), INFO, model)
    write_record(first, tmp_path)
    from attacks.pgd import PGD

    weak = PGD(steps=1, abs_stepsize=0.02, random_start=False)
    weak.name = "weak-pgd"  # a second attack under its own name, kept beside the first on merge
    second = build_record(evaluate(model, ds, threat, attacks=[weak], certifiers=[]), INFO, model)
    merged = read_record(write_record(second, tmp_path))
    per, old, new = merged["per_example"], first["per_example"], second["per_example"]
    only_old = [i for i in range(len(ds)) if old["attack_success"]["pgd"][i] and not new["attack_success"]["weak-pgd"][i]]
    assert only_old  # PGD breaks examples the weak attack does not
    for i in range(len(ds)):
        source = old if i in only_old else new
        assert per["confidence"]["adversarial"][i] == source["confidence"]["adversarial"][i]
    robust = torch.tensor(per["robust"]).bool()
    expected = selective_accuracy(torch.tensor(per["confidence"]["adversarial"]), robust, ds.groups,
                                  merged["selective"]["coverages"], num_groups=6)
    assert merged["selective"]["adversarial"]["avg_acc"] == expected["avg_acc"]
    # an older record without confidences cannot say where those examples were broken: no adversarial block
    stripped = dict(first, per_example={k: v for k, v in first["per_example"].items() if k != "confidence"})
    stripped.pop("selective")
    write_record(stripped, tmp_path, replace=True)
    merged = read_record(write_record(second, tmp_path))
    assert "adversarial" not in merged["per_example"]["confidence"] and "adversarial" not in merged["selective"]


# --- corruptions ------------------------------------------------------------------------------------
def bars(n: int = 10) -> Dataset:
    """28x28 bars, horizontal (class 0) or vertical (class 1), in [0, 1]."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.zeros(n, 1, 28, 28), torch.arange(n) % 2
    for i in range(n):
        r = int(torch.randint(6, 20, (1,), generator=g))
        if y[i] == 0:
            x[i, :, r:r + 3, 4:24] = 0.9
        else:
            x[i, :, 4:24, r:r + 3] = 0.9
    return Dataset(name="bars", split="test", x=x, y=y, num_classes=2)


def bar_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(49, 2)).eval()


TWO = ["gaussian_noise", "brightness"]


def test_corruption_record_layout_and_numbers(tmp_path):
    model = bar_model()
    record = build_record(evaluate_corruptions(model, bars(), corruptions=TWO, n_examples=10, batch_size=4),
                          dict(INFO, name="bars-net"), model)
    assert not schema_errors(record)
    assert record["threat_model"]["norm"] == "corruptions" and record["mode"] == "individual"
    assert record_path(tmp_path, record) == tmp_path / "bars" / "corruptions" / "bars-net.json"
    flags = record["per_example"]["corruption_correct"]
    c = record["corruptions"]
    assert list(c["accuracy"]) == TWO and all(len(flags[n]) == 5 and len(flags[n][0]) == 10 for n in TWO)
    assert c["accuracy"]["brightness"][2] == sum(flags["brightness"][2]) / 10
    assert c["mean_corruption_acc"] == pytest.approx(sum(sum(map(sum, flags[n])) / 50 for n in TWO) / 2)
    every = [int(ok and all(flags[n][s][i] for n in TWO for s in range(5)))
             for i, ok in enumerate(record["per_example"]["correct"])]
    assert record["per_example"]["robust"] == every and record["robust_acc"] == sum(every) / 10
    assert [a["config"]["severities"] for a in record["attacks"]] == [[1, 2, 3, 4, 5]] * 2
    assert c["definition"].split("#")[1] in doc_anchors()


def test_corruption_numbers_are_the_same_at_two_batch_sizes():
    model = bar_model()
    runs = [evaluate_corruptions(model, bars(), corruptions=["gaussian_noise", "elastic"], batch_size=b)
            for b in (3, 10)]
    for name in ("gaussian_noise", "elastic"):
        assert torch.equal(runs[0].corruption_correct[name], runs[1].corruption_correct[name])
    records = [build_record(r, INFO, model) for r in runs]
    assert records[0]["corruptions"] == records[1]["corruptions"]


@pytest.mark.parametrize("names, message", [(["fog"], "unknown corruption 'fog'"),
                                            (["jpeg", "jpeg"], "listed twice"), ("jpeg,nope", "unknown corruption")])
def test_corruption_names_are_checked(names, message):
    with pytest.raises(UserInputError, match=message):
        corruption_names(names)


@pytest.mark.parametrize("change, message", [
    (dict(n_examples=0), "n_examples must be >= 1"), (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(model="not a model"), "must be a torch.nn.Module")])
def test_corruption_evaluation_checks_its_inputs_like_evaluate(change, message):
    kwargs = dict(dict(model=bar_model(), corruptions=["jpeg"]), **change)
    with pytest.raises(UserInputError, match=message):
        evaluate_corruptions(kwargs.pop("model"), bars(), **kwargs)


def test_corruption_too_big_for_the_image_is_a_user_error():
    with pytest.raises(UserInputError, match="cannot be applied to 4x4 images"):
        evaluate_corruptions(toy_model(), toy_dataset(6), corruptions=["elastic"])


# --- WRM certificate --------------------------------------------------------------------------------
def elu_model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ELU(), nn.Linear(8, 3)).eval()


WRM_INFO = dict(INFO, name="toy-wrm", defense="wrm", card={"defense": "wrm", "defense_config": {"gamma": 2.0}})


def wrm_record(monkeypatch, model=None, info=WRM_INFO, weights="ef" * 32):
    monkeypatch.setattr(reports, "WRM_STEPS", 15)
    model = model or elu_model()
    ds = toy_dataset(12)
    result = evaluate(model, ds, ThreatModel("L2", 0.5), attacks=["fgsm"], certifiers=[])
    record = build_record(result, dict(info, weights_sha256=weights), model)
    reports.attach_defense_metrics(record, model, info, ds)
    return record


def test_wrm_certificate_in_the_record_bounds_the_measured_loss(monkeypatch):
    record = wrm_record(monkeypatch, weights="01" * 32)
    cert = record["wrm_certificate"]
    assert not schema_errors(record) and cert["gamma"] == 2.0 and cert["steps"] == 15 and cert["n_examples"] == 12
    assert [r["gamma_adv"] for r in cert["rows"]] == [4.0, 2.0, 1.0]
    # the independent attack's loss below the certificate plus phi's gap, with no tolerance
    assert all(r["certificate_if_concave"] >= r["measured_loss"] and r["bound_holds"] for r in cert["rows"])
    assert all(r["certificate_if_concave"] == r["certificate"] + cert["phi_gap_bound"] for r in cert["rows"])
    assert cert["attack_restarts"] >= 2 and cert["phi_shortfall"] >= 0 and cert["ascent_grad_norm_max"] >= 0
    rhos = [r["rho_test"] for r in cert["rows"]]
    assert rhos == sorted(rhos)  # smaller gamma_adv, larger ball
    assert cert["bound_holds"] and not any(f["name"] == "wrm_certificate_violated" for f in record["flags"])


def test_wrm_certificate_is_computed_once_per_model_and_data(monkeypatch):
    calls = []
    real = reports.wrm_report
    monkeypatch.setattr(reports, "wrm_report", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = wrm_record(monkeypatch, weights="02" * 32)
    second = wrm_record(monkeypatch, weights="02" * 32)
    assert len(calls) == 1 and first["wrm_certificate"] == second["wrm_certificate"]


def test_a_violated_wrm_bound_is_flagged_and_still_valid(monkeypatch):
    def fake(model, x, y, *, gamma, gammas_adv, steps):
        rows = [{"gamma_adv": g, "rho_test": 1.0, "loss": 3.0, "clean_loss": 0.1, "certificate": 2.0,
                 "certificate_if_concave": 2.5, "bound_holds": False} for g in gammas_adv]
        return {"mean_phi": 0.0, "ascent_grad_norm": 0.5, "ascent_grad_norm_max": 0.9, "phi_gap_bound": 0.5,
                "phi_shortfall": 0.0, "restarts": 2, "rows": rows}

    monkeypatch.setattr(reports, "wrm_report", fake)
    record = wrm_record(monkeypatch, weights="03" * 32)
    assert not schema_errors(record) and record["wrm_certificate"]["bound_holds"] is False
    flag = next(f for f in record["flags"] if f["name"] == "wrm_certificate_violated")
    assert flag["severity"] == "error" and flag["values"]["measured_loss"] == [3.0] * 3


def test_no_certificate_for_other_defenses_and_a_card_without_gamma_is_an_error(monkeypatch):
    assert "wrm_certificate" not in wrm_record(monkeypatch, info=INFO)
    bad = dict(WRM_INFO, card={"defense": "wrm", "defense_config": {}})
    with pytest.raises(UserInputError, match="defense_config.gamma"):
        wrm_record(monkeypatch, info=bad)


def test_wrm_certificate_refuses_other_examples_than_the_record(monkeypatch):
    record = wrm_record(monkeypatch, weights="04" * 32)
    with pytest.raises(UserInputError, match="evaluated examples"):
        reports.attach_defense_metrics(record, elu_model(), WRM_INFO, toy_dataset(12).subset(slice(1, 12)))
