"""A complete verifier on a stated prefix of a table (issue 11): the registry's per-certifier
``n_examples``, its place in the protocol, the record's certification band, the unresolved column and
the band plots, and the CLI's --certifier-examples."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustbench_lite import cli
from robustbench_lite.errors import UserInputError
from robustbench_lite.leaderboard.records import read_record
from robustbench_lite.leaderboard.protocol import job_protocol, jobs_from_entries, load_registry, protocol_differences
from robustbench_lite.leaderboard.regenerate import SKIP, plan, regenerate
from robustbench_lite.leaderboard.render.tables import build_tables, row_cells

REGISTRY = """
[[entry]]
model = "digits-mlp-standard"
dataset = "digits"
norm = "Linf"
eps = [0.05]
attacks = [{name = "pgd", steps = 5}]
certifiers = ["ibp", {name = "crown", n_examples = 12}]
n_examples = 30
batch_size = 8
"""
RECORD = Path("digits") / "Linf-0.05" / "digits-mlp-standard.json"
ENTRY = {"model": "m", "dataset": "digits", "norm": "Linf", "eps": 0.1, "n_examples": 30}


def test_registry_prefix_is_the_evaluators_and_part_of_the_protocol():
    job, = jobs_from_entries([{**ENTRY, "certifiers": ["ibp", {"name": "crown", "n_examples": 12}]}])
    assert job.certifier_examples() == {"crown": 12}
    assert [type(p).__name__ for p in job.plugins("certifier")] == ["IBP", "CROWN"]
    certs = job_protocol(job)["certifiers"]
    assert "n_examples" not in certs[0] and certs[1]["n_examples"] == 12
    whole, = jobs_from_entries([{**ENTRY, "certifiers": [{"name": "crown", "n_examples": 30}]}])
    assert whole.certifier_examples() == {} and "n_examples" not in job_protocol(whole)["certifiers"][0]
    for bad, message in (({"attacks": [{"name": "pgd", "n_examples": 5}]}, "certifiers only"),
                         ({"certifiers": [{"name": "crown", "n_examples": 0}]}, "positive integer")):
        with pytest.raises(UserInputError, match=message):
            jobs_from_entries([{**ENTRY, **bad}])


def test_regenerate_runs_a_certifier_on_a_prefix_and_renders_the_band(tmp_path):
    (tmp_path / "registry.toml").write_text(REGISTRY)
    report = regenerate(tmp_path)
    assert not report.failed, report.failed
    record = read_record(tmp_path / RECORD)
    ibp, crown = record["certifiers"]
    assert ibp["n_examples"] == 30 and crown["n_examples"] == 12
    assert crown["status_counts"]["skipped"] >= 18  # beyond the prefix (and refuted rows inside it)
    assert not any(record["per_example"]["certified_by"]["crown"][12:])
    band = record["certification"]
    per = record["per_example"]
    assert band["n_examples"] == 12
    assert band["robust_acc"] == sum(per["robust"][:12]) / 12 and band["certified_acc"] == sum(per["certified"][:12]) / 12
    assert band["unresolved"] == pytest.approx(band["robust_acc"] - band["certified_acc"])
    job, = load_registry(tmp_path / "registry.toml")
    assert protocol_differences(record, job_protocol(job)) == []  # eligible
    assert [p.action for p in plan([job], tmp_path)] == [SKIP]  # up to date
    table, = build_tables([record], {job.table: job_protocol(job)})
    assert table.rows and "certified % (first 12)" in table.columns and "unresolved % (first 12)" in table.columns
    cells = dict(zip(table.columns, row_cells(record, 1)))
    assert cells["unresolved % (first 12)"] == f"{100 * band['unresolved']:.1f}"
    crown_cell = cells["certified % by certifier"].split(", ")[-1]
    assert crown_cell.startswith("crown ") and " of 12" in crown_cell, crown_cell
    readme = (tmp_path / "README.md").read_text()
    assert "unresolved % (first 12)" in readme and "over the first 12 examples" in readme
    assert (tmp_path / "plots" / "certified_band_digits_Linf-0.05.png").is_file()


def test_cli_certifier_examples(tmp_path, capsys):
    args = ["evaluate", "--model", "digits-mlp-standard", "--dataset", "digits", "--eps", "0.05", "--n-examples",
            "10", "--batch-size", "5", "--attacks", "none", "--certifiers", "ibp,crown", "--no-progress",
            "--leaderboard-dir", str(tmp_path)]
    assert cli.main([*args, "--certifier-examples", "crown=5"]) == 0
    out = capsys.readouterr().out
    assert "first 5 examples" in out and "unresolved" in out
    record = json.loads((tmp_path / "digits" / "Linf-0.05" / "digits-mlp-standard.json").read_text())
    assert record["certifiers"][1]["n_examples"] == 5 and record["certification"]["n_examples"] == 5
    assert cli.main([*args, "--certifier-examples", "crown"]) == 2
    assert "NAME=N" in capsys.readouterr().err
    assert cli.main([*args, "--certifier-examples", "bab=5"]) == 2
    assert "not among the certifiers" in capsys.readouterr().err
