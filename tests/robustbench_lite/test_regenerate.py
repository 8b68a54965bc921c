"""`leaderboard regenerate`: the registry, what runs and why, skipping what is up to date, --force,
--only, --dry-run, protocol eligibility and the refusal to mix protocols in one table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustbench_lite import cli
from robustbench_lite.errors import UserInputError
from robustbench_lite.leaderboard import read_record
from robustbench_lite.protocol import (code_files, job_protocol, jobs_from_entries, load_registry,
                                       protocol_differences)
from robustbench_lite.regenerate import RUN, SKIP, UNAVAILABLE, plan, regenerate

REPO = Path(__file__).resolve().parents[2]
ENTRY = """
[[entry]]
model = "digits-mlp-standard"
dataset = "digits"
norm = "Linf"
eps = [0.05, 0.1]
attacks = [{{name = "pgd", steps = {steps}}}]
certifiers = ["ibp"]
n_examples = 30
batch_size = 16
"""
RECORD = Path("digits") / "Linf-0.05" / "digits-mlp-standard.json"


def registry(root: Path, steps: int = 5, extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "registry.toml"
    path.write_text(ENTRY.format(steps=steps) + extra)
    return path


def actions(root: Path, **kwargs) -> dict[str, tuple[str, list[str]]]:
    return {p.job.key: (p.action, p.reasons) for p in plan(load_registry(root / "registry.toml"), root, **kwargs)}


def test_the_shipped_registry_lists_the_zoo_models_and_one_protocol_per_table():
    jobs = load_registry(REPO / "leaderboards" / "registry.toml")
    keys = {j.key for j in jobs}
    for model in ("mnist5k-cnn-standard", "mnist5k-cnn-pgd-at"):
        for eps in ("0.1", "0.2", "0.3"):
            assert f"mnist5k/Linf-{eps}/{model}" in keys
    assert any(j.model == "digits-mlp-standard" and j.dataset == "digits" for j in jobs)
    assert all(j.n_examples >= 360 and [a for a, _ in j.attacks][:1] == ["pgd"] for j in jobs)


@pytest.mark.parametrize("text, message", [
    ('[[entry]]\nmodel = "m"\ndataset = "digits"\nnorm = "Linf"\neps = [0.1]\n', "n_examples"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\neps = 0.1\nn_examples = 5\ncolour = 1\n', "colour"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "L7"\neps = 0.1\nn_examples = 5\n', "norm"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\neps = -1\nn_examples = 5\n', "eps"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\neps = 0.1\nn_examples = 0\n', "n_examples"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\neps = 0.1\nn_examples = 5\nmode = "x"\n', "mode"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\neps = [0.1, 0.1]\nn_examples = 5\n', "more than once"),
    ("[[entry]\n", "not valid TOML"),
])
def test_bad_registries_are_one_clear_error(tmp_path, text, message):
    (tmp_path / "registry.toml").write_text(text)
    with pytest.raises(UserInputError, match=message):
        load_registry(tmp_path / "registry.toml")


def test_mixing_protocols_in_one_table_is_refused(tmp_path):
    other = ENTRY.format(steps=5).replace("digits-mlp-standard", "other-model").replace("n_examples = 30",
                                                                                        "n_examples = 20")
    path = registry(tmp_path, extra=other)
    with pytest.raises(UserInputError, match="refusing to mix protocols in table digits Linf-0.05: "
                                             "digits-mlp-standard and other-model differ in n_examples, subset"):
        load_registry(path)


def test_regenerate_runs_then_skips_until_an_input_changes(tmp_path):
    registry(tmp_path)
    assert {a for a, _ in actions(tmp_path).values()} == {RUN}
    report = regenerate(tmp_path)
    assert sorted(report.ran) == ["digits/Linf-0.05/digits-mlp-standard", "digits/Linf-0.1/digits-mlp-standard"]
    rec = read_record(tmp_path / RECORD)
    assert rec["inputs"]["weights_sha256"] == rec["model"]["weights_sha256"]
    assert "attacks/pgd.py" in rec["inputs"]["code_files"] and "robustbench_lite/evaluate.py" in rec["inputs"]["code_files"]
    assert not (tmp_path / ".state").exists() and not list(tmp_path.rglob("*.partial"))
    assert (tmp_path / "README.md").exists() and (tmp_path / "index.html").exists()
    assert {a for a, _ in actions(tmp_path).values()} == {SKIP}
    assert regenerate(tmp_path).ran == []
    # forced
    assert {a for a, r in actions(tmp_path, force=True).values() if r[0] == "forced"} == {RUN}
    # a configuration change (more PGD steps) re-runs and the record holds the new protocol only
    registry(tmp_path, steps=7)
    acts = actions(tmp_path)
    assert acts["digits/Linf-0.05/digits-mlp-standard"] == (RUN, ["configuration changed: attacks"])
    # weights and code changes are named
    stale = json.loads((tmp_path / RECORD).read_text())
    stale["inputs"]["weights_sha256"] = "0" * 64
    stale["inputs"]["code_files"]["attacks/pgd.py"] = "0" * 64
    stale["inputs"]["code_sha256"] = "0" * 64
    (tmp_path / RECORD).write_text(json.dumps(stale))
    reasons = actions(tmp_path)["digits/Linf-0.05/digits-mlp-standard"][1]
    assert reasons[:2] == ["model weights changed", "code changed: attacks/pgd.py"]
    report = regenerate(tmp_path, only="digits/Linf-0.05/*")
    assert report.ran == ["digits/Linf-0.05/digits-mlp-standard"]
    rec = read_record(tmp_path / RECORD)
    assert [a["config"]["steps"] for a in rec["attacks"]] == [7] and not protocol_differences(
        rec, job_protocol(load_registry(tmp_path / "registry.toml")[0]))


def test_unavailable_models_and_corrupt_records_are_reported_not_run(tmp_path, capsys):
    registry(tmp_path, extra=ENTRY.format(steps=5).replace("digits-mlp-standard", "no-such-model")
             .replace('dataset = "digits"', 'dataset = "mnist5k"'))
    (tmp_path / RECORD).parent.mkdir(parents=True)
    (tmp_path / RECORD).write_text("{broken")
    acts = actions(tmp_path)
    assert acts["mnist5k/Linf-0.05/no-such-model"][0] == UNAVAILABLE
    assert acts["digits/Linf-0.05/digits-mlp-standard"][0] == "error"
    code = cli.main(["leaderboard", "regenerate", "--leaderboard-dir", str(tmp_path), "--only", "*0.05*"])
    out = capsys.readouterr().out
    assert code == 1 and "unavailable" in out and "error" in out
    assert (tmp_path / RECORD).read_text() == "{broken"  # never overwritten


def test_cli_dry_run_lists_what_would_run_and_why(tmp_path, capsys):
    registry(tmp_path)
    assert cli.main(["leaderboard", "regenerate", "--leaderboard-dir", str(tmp_path), "--dry-run",
                     "--only", "digits-mlp-*"]) == 0
    out = capsys.readouterr().out
    assert "run   digits/Linf-0.05/digits-mlp-standard: no record yet" in out
    assert "would run 2" in out and not (tmp_path / "digits").exists()


def test_a_quicker_evaluate_run_is_not_eligible_and_shown_apart(tmp_path, capsys):
    registry(tmp_path)
    regenerate(tmp_path, only="*0.05*")
    assert cli.main(["evaluate", "--model", "digits-mlp-standard", "--dataset", "digits", "--eps", "0.05",
                     "--n-examples", "10", "--attacks", "fgsm", "--certifiers", "none", "--no-progress",
                     "--leaderboard-dir", str(tmp_path / "quick")]) == 0
    quick = read_record(tmp_path / "quick" / RECORD)
    quick["model"]["name"] = "quick-run"
    (tmp_path / RECORD.parent / "quick-run.json").write_text(json.dumps(quick))
    capsys.readouterr()
    assert cli.main(["leaderboard", "show", "--leaderboard-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    eligible, apart = out.split("not eligible")
    assert "digits-mlp-standard" in eligible and "quick-run" in apart
    assert "attacks, certifiers, n_examples, subset" in apart


def test_code_fingerprint_follows_module_level_imports_only():
    files = code_files(["attacks.pgd"])
    assert {"attacks/pgd.py", "attacks/base.py", "robustbench_lite/threat.py"} <= set(files)
    assert "attacks/square.py" not in files and "certify/ibp.py" not in files
    jobs = jobs_from_entries([{"model": "m", "dataset": "digits", "norm": "Linf", "eps": [0.1], "n_examples": 3,
                               "attacks": ["fgsm"], "certifiers": []}])
    assert job_protocol(jobs[0])["attacks"][0]["name"] == "fgsm"
