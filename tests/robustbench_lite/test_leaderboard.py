"""Leaderboard records: schema, layout, merging, atomic writes, corrupt files, the table."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from attacks import PGD
from certify.base import Certifier
from test_evaluate import LinearExact, toy_dataset, toy_model

from robustbench_lite.leaderboard import records as leaderboard
from robustbench_lite.leaderboard.render import build_tables, render_text
from robustbench_lite.errors import CorruptFileError, SoundnessError, UserInputError
from robustbench_lite.evaluation.core import evaluate
from robustbench_lite.leaderboard.records import (build_record, default_leaderboard_dir, default_results_dir, load_records, read_record, record_path,
                                          schema_errors, write_record)
from robustbench_lite.threat import ThreatModel


INFO = {"name": "toy-linear", "architecture": "linear", "defense": "none", "dataset": "toy",
        "weights_sha256": "ab" * 32, "parameter_count": 51, "normalization": None, "source": "test", "card": None}


def run(attacks=("pgd",), certifiers=(), eps=0.15, n=24, model=None, **kwargs):
    model = toy_model() if model is None else model
    return evaluate(model, toy_dataset(n), ThreatModel("Linf", eps), attacks=list(attacks),
                    certifiers=list(certifiers), **kwargs), model


def record(attacks=("pgd",), certifiers=(), info=INFO, **kwargs):
    result, model = run(attacks, certifiers, **kwargs)
    return build_record(result, info, model)


def test_record_is_schema_valid_numbers_in_unit_interval():
    result, model = run(("pgd",), (LinearExact(),))
    rec = build_record(result, INFO, model)
    assert schema_errors(rec) == []
    for key in ("clean_acc", "robust_acc", "certified_acc"):
        assert isinstance(rec[key], float) and 0 <= rec[key] <= 1
    assert rec["robust_acc"] == result.robust_acc and rec["certified_acc"] == result.certified_acc
    assert rec["threat_model"] == {"norm": "Linf", "eps": 0.15, "box": [0.0, 1.0]}
    assert rec["dataset"] == {"name": "toy", "split": "test", "n_examples": 24,
                              "indices": {"start": 0, "stop": 24, "sha256": result.indices_sha256}}
    assert rec["model"]["weights_sha256"] == "ab" * 32 and rec["model"]["defense"] == "none"
    assert rec["attacks"][0]["name"] == "pgd" and rec["attacks"][0]["config"]["steps"] == 40
    assert rec["attacks"][0]["forward_passes"] > 0 and rec["certifiers"][0]["n_certified"] == int(result.certified.sum())
    assert rec["number_forward_passes"] == 24 + rec["attacks"][0]["forward_passes"]
    env = rec["environment"]
    assert env["torch"] == torch.__version__ and env["seed"] == 0 and env["threads"] >= 1 and env["device"] == "cpu"
    per = rec["per_example"]
    assert sum(per["correct"]) / 24 == rec["clean_acc"] and sum(per["robust"]) / 24 == rec["robust_acc"]
    assert sum(per["certified"]) / 24 == rec["certified_acc"] and set(per["attack_success"]) == {"pgd"}
    json.dumps(rec)  # plain JSON


def test_model_section_from_the_module_alone():
    result, model = run(())
    rec = build_record(result, None, model, name="my model/v2")
    assert rec["model"]["name"] == "my-model-v2" and rec["model"]["parameter_count"] == 51
    assert len(rec["model"]["weights_sha256"]) == 64


def test_percent_strings_and_out_of_range_numbers_are_rejected():
    rec = record()
    for bad in ("89.0%", 89.0, -0.1):
        broken = dict(rec, robust_acc=bad)
        assert schema_errors(broken)
        with pytest.raises(UserInputError, match="schema"):
            leaderboard.validate_record(broken)


def test_one_file_per_model_layout(tmp_path):
    rec = record()
    path = write_record(rec, tmp_path)
    assert path == tmp_path / "toy" / "Linf-0.15" / "toy-linear.json" == record_path(tmp_path, rec)
    assert read_record(path)["robust_acc"] == rec["robust_acc"]
    assert not list(path.parent.glob("*.partial"))


def test_update_merges_attacks_and_recomputes_the_worst_case(tmp_path):
    first = record(("fgsm",))
    path = write_record(first, tmp_path)
    second = record(("pgd",))
    write_record(second, tmp_path)
    merged = read_record(path)
    assert [a["name"] for a in merged["attacks"]] == ["fgsm", "pgd"]
    per = merged["per_example"]
    worst = [int(c and not (a or b)) for c, a, b in
             zip(per["correct"], per["attack_success"]["fgsm"], per["attack_success"]["pgd"])]
    assert per["robust"] == worst and merged["robust_acc"] == sum(worst) / 24
    assert merged["robust_acc"] <= min(first["robust_acc"], second["robust_acc"])
    assert merged["created"] == first["created"] and "updated" in merged
    # running the same attack again replaces its entry instead of duplicating it
    write_record(record(("pgd",)), tmp_path)
    assert [a["name"] for a in read_record(path)["attacks"]] == ["fgsm", "pgd"]


def test_new_weights_replace_the_old_record(tmp_path):
    path = write_record(record(("fgsm",)), tmp_path)
    write_record(record(("pgd",), info=dict(INFO, weights_sha256="cd" * 32)), tmp_path)
    rec = read_record(path)
    assert [a["name"] for a in rec["attacks"]] == ["pgd"] and rec["model"]["weights_sha256"] == "cd" * 32


def test_a_smaller_evaluation_does_not_replace_a_larger_one(tmp_path):
    path = write_record(record(("fgsm",), n=24), tmp_path)
    before = path.read_bytes()
    with pytest.raises(UserInputError, match="covers 24 examples and this run 12"):
        write_record(record(("pgd",), n=12), tmp_path)
    assert path.read_bytes() == before
    write_record(record(("pgd",), n=12), tmp_path, replace=True)
    rec = read_record(path)
    assert rec["dataset"]["n_examples"] == 12 and [a["name"] for a in rec["attacks"]] == ["pgd"]
    write_record(record(("fgsm",), n=24), tmp_path)  # a larger one replaces a smaller one
    assert read_record(path)["dataset"]["n_examples"] == 24


class CertifyCorrect(Certifier):
    """Unsound: certifies every correctly classified point."""

    name = "optimist"

    def bound_margins(self, model, x, y, threat):
        logits = model(x)
        return logits.gather(1, y[:, None]) - logits


def test_merge_that_breaks_the_invariant_is_refused(tmp_path):
    path = write_record(record((), (CertifyCorrect(),), eps=0.3), tmp_path)
    before = path.read_bytes()
    with pytest.raises(SoundnessError, match="merging"):
        write_record(record(("pgd",), (), eps=0.3), tmp_path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("content", ["{not json", '{"clean_acc": "98%"}', ""])
def test_corrupt_existing_file_is_reported_and_kept(tmp_path, content):
    rec = record()
    path = record_path(tmp_path, rec)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(CorruptFileError, match="toy-linear.json"):
        write_record(rec, tmp_path)
    assert path.read_text() == content
    with pytest.raises(CorruptFileError):
        load_records(tmp_path)


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_the_old_file_intact(tmp_path, monkeypatch, error):
    path = write_record(record(("fgsm",)), tmp_path)
    before = path.read_bytes()

    def fail(fd):  # the new text is in the temporary file, not yet synced or renamed
        partial = [p for p in path.parent.iterdir() if p.name.endswith(".partial")]
        assert len(partial) == 1 and partial[0].stat().st_size > 0
        raise error

    monkeypatch.setattr(leaderboard.os, "fsync", fail)
    with pytest.raises(type(error)):
        write_record(record(("pgd",)), tmp_path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy-linear.json"]


def test_per_example_flags_stay_compact(tmp_path):
    path = write_record(record(n=60), tmp_path)
    lines = path.read_text().splitlines()
    assert len(lines) < 150 and any(line.strip().startswith('"correct": [') for line in lines)
    assert read_record(path)["per_example"]["correct"] == record(n=60)["per_example"]["correct"]


def test_default_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("RBL_LEADERBOARD_DIR", str(tmp_path / "board"))
    assert default_leaderboard_dir() == tmp_path / "board"
    monkeypatch.delenv("RBL_LEADERBOARD_DIR")
    checkout = Path(leaderboard.__file__).resolve().parents[2] / "leaderboards"
    monkeypatch.chdir(tmp_path)
    expected = checkout if checkout.is_dir() else tmp_path / "leaderboards"
    assert default_leaderboard_dir() == expected
    monkeypatch.setenv("RBL_RESULTS_DIR", str(tmp_path / "mine"))
    assert default_results_dir() == tmp_path / "mine"
    monkeypatch.delenv("RBL_RESULTS_DIR")
    assert default_results_dir() == tmp_path / "results"  # the working directory's, never the checkout's


def test_load_and_render_sorted_by_robust_accuracy(tmp_path):
    strong = record(("pgd",), info=dict(INFO, name="strong"), eps=0.05)
    weak = record(("pgd",), info=dict(INFO, name="weak"), eps=0.05, model=torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval())
    for rec in (weak, strong):
        write_record(rec, tmp_path)
    other = dict(record(("pgd",), info=dict(INFO, name="elsewhere"), eps=0.05))
    other["dataset"] = dict(other["dataset"], name="other")
    write_record(other, tmp_path)
    assert len(load_records(tmp_path)) == 3
    records = load_records(tmp_path, dataset="toy")
    assert sorted(r["model"]["name"] for r in records) == ["strong", "weak"]
    assert strong["robust_acc"] > weak["robust_acc"]
    [table] = build_tables(records)
    assert [r["model"]["name"] for r in table.rows] == ["strong", "weak"]  # ranked by robust accuracy
    text = render_text([table])
    assert text.index("strong") < text.index("weak") and f"{100 * strong['robust_acc']:.1f}" in text
    assert build_tables([]) == []
    assert load_records(tmp_path / "missing") == []


def test_autoattack_acc_only_when_autoattack_saw_every_correct_point(tmp_path):
    """autoattack_acc is the accuracy the autoattack-named attack leaves on its own, not robust_acc: with a
    stronger attack after it (cascade) or beside it (individual) the two differ."""
    from attacks import FGSM

    class AutoLike(FGSM):  # half an eps step: weaker than PGD on this linear model
        name = "autoattack"

        def __init__(self) -> None:
            super().__init__(rel_stepsize=0.5)

        def config(self):
            return dict(super().config(), suite="autoattack-standard")

    eps = 0.3
    alone, model = run((AutoLike(),), eps=eps)
    expected = float((alone.correct & ~alone.attack_success["autoattack"]).double().mean())
    for individual in (False, True):
        rec = record((AutoLike(), PGD(steps=30)), eps=eps, individual=individual)
        assert rec["autoattack_acc"] == pytest.approx(expected, abs=1e-12)
        assert rec["robust_acc"] < rec["autoattack_acc"]  # PGD broke points FGSM left: not robust_acc
    assert "autoattack_acc" not in record(("pgd", AutoLike()), eps=eps)  # after PGD it saw only survivors
    assert record(("pgd", AutoLike()), eps=eps, individual=True)["autoattack_acc"] == pytest.approx(expected, abs=1e-12)


def test_autoattack_acc_only_from_the_standard_suite_on_every_correct_point(tmp_path):
    from attacks import FGSM

    class StandardLike(FGSM):
        name = "mine"

        def config(self):
            return dict(super().config(), suite="autoattack-standard")

    class NamedLike(FGSM):
        name = "autoattack"  # the name alone is not the standard suite

        def config(self):
            return dict(super().config(), suite="autoattack-fmn")

    rec = record((StandardLike(),))
    assert rec["autoattack_acc"] == rec["robust_acc"]
    assert "autoattack_acc" not in record(("pgd", StandardLike()))  # the cascade's second attack saw fewer points
    assert "autoattack_acc" not in record((NamedLike(),))


def test_record_files_are_never_written_into_the_repo(tmp_path):
    # the tests above all pass tmp_path; the repo's leaderboards/ is the lead's to generate
    repo_board = Path(leaderboard.__file__).resolve().parents[2] / "leaderboards"
    before = sorted(repo_board.rglob("*.json")) if repo_board.exists() else []
    write_record(record(), tmp_path)
    after = sorted(repo_board.rglob("*.json")) if repo_board.exists() else []
    assert before == after
    assert os.listdir(tmp_path) == ["toy"]


def test_concurrent_writes_of_one_model_both_survive(tmp_path, monkeypatch):
    import threading
    import time

    write_record(record(("fgsm",)), tmp_path)
    first, second = record(("pgd",)), record(("apgd",))
    real_read = leaderboard.read_record

    def slow_read(path):  # widen the read-merge-write window so an unlocked writer would lose an update
        rec = real_read(path)
        time.sleep(0.3)
        return rec

    monkeypatch.setattr(leaderboard, "read_record", slow_read)
    threads = [threading.Thread(target=write_record, args=(rec, tmp_path)) for rec in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    merged = read_record(record_path(tmp_path, first))
    assert sorted(a["name"] for a in merged["attacks"]) == ["apgd", "fgsm", "pgd"]


def test_defense_sections_are_checked_by_the_schema():
    """groups / corruptions / wrm_certificate: numbers in range, required fields, no unknown keys."""
    import copy

    from test_reports import bar_model, bars, grouped

    from robustbench_lite.corruptions.evaluate import evaluate_corruptions

    grouped_rec = build_record(evaluate(toy_model(), grouped(), ThreatModel("Linf", 0.1), attacks=["fgsm"],
                                        certifiers=[]), INFO, toy_model())
    corrupt_rec = build_record(evaluate_corruptions(bar_model(), bars(), corruptions=["jpeg"], n_examples=4),
                               INFO, bar_model())
    assert not schema_errors(grouped_rec) and not schema_errors(corrupt_rec)
    cert = {"metric": "wrm_certificate", "definition": "docs/metrics.md#x", "gamma": 1.0, "steps": 5,
            "n_examples": 24, "mean_phi": 0.3, "bound_holds": True,
            "rows": [{"gamma_adv": 1.0, "rho_test": 0.5, "measured_loss": 0.8, "certificate": 0.8, "bound_holds": True}]}
    assert not schema_errors(dict(grouped_rec, wrm_certificate=cert))
    breakages = [
        (grouped_rec, lambda r: r["groups"]["clean"].__setitem__("worst_group_acc", 74.8)),
        (grouped_rec, lambda r: r["groups"].pop("names")),
        (grouped_rec, lambda r: r["groups"].__setitem__("metric", "avg_acc")),
        (grouped_rec, lambda r: r["per_example"].__setitem__("group", [-1])),
        (corrupt_rec, lambda r: r["corruptions"].__setitem__("mean_corruption_acc", "89%")),
        (corrupt_rec, lambda r: r["corruptions"]["accuracy"].__setitem__("jpeg", [1.2])),
        (corrupt_rec, lambda r: r["threat_model"].__setitem__("norm", "fog")),
        (dict(grouped_rec, wrm_certificate=cert), lambda r: r["wrm_certificate"]["rows"][0].pop("measured_loss")),
        (dict(grouped_rec, wrm_certificate=cert), lambda r: r["wrm_certificate"].__setitem__("gamma", 0)),
        (dict(grouped_rec, wrm_certificate=cert), lambda r: r["wrm_certificate"].__setitem__("rows", [])),
    ]
    for rec, breaks in breakages:
        broken = copy.deepcopy(rec)
        breaks(broken)
        assert schema_errors(broken), breaks
