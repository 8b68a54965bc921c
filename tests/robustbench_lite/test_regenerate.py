"""`leaderboard regenerate`: the registry, what runs and why, skipping what is up to date, --force,
--only, --dry-run, protocol eligibility and the refusal to mix protocols in one table."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from robustbench_lite import cli
from robustbench_lite.errors import UserInputError
from robustbench_lite.leaderboard.records import read_record
from robustbench_lite.leaderboard.protocol import (EVALUATOR_MODULES, PROJECT_PACKAGES, PROJECT_ROOT, code_files, job_protocol,
                                       jobs_from_entries, load_registry, protocol_differences)
from robustbench_lite.leaderboard.regenerate import RUN, SKIP, UNAVAILABLE, plan, regenerate

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
    white_box = [j for j in jobs if not j.is_corruptions and j.access == "white-box"]
    assert all(j.n_examples >= 200 and [a for a, _ in j.attacks][:1] == ["pgd"] for j in white_box)
    # issue 13: the standard AutoAttack suite on every Linf and L2 table of mnist5k, digits and colored-mnist5k
    assert all("autoattack" in [a for a, _ in j.attacks] for j in white_box)
    # ... on prefixes that keep a regeneration near an hour on 2 cores (~0.45 CPU s per point PGD leaves
    # standing, registry.toml; 4-6 s for a robust model's at Linf 0.3): the first 200 points on every white-box
    # mnist5k table
    assert {j.n_examples for j in white_box if j.dataset == "mnist5k" and j.key.startswith("mnist5k/Linf-0.3/")} == {200}
    assert {j.n_examples for j in white_box if j.dataset == "mnist5k" and not j.key.startswith("mnist5k/Linf-0.3/")} == {200}
    assert {j.norm for j in white_box if j.dataset == "mnist5k"} == {"Linf", "L2"}
    # and a gray-box table: transfer from the standard and the PGD-AT models to every mnist5k zoo model
    gray = [j for j in jobs if j.access == "gray-box"]
    assert {j.key.rsplit("/", 1)[0] for j in gray} == {"mnist5k/Linf-0.3-gray-box"}
    assert {j.model for j in gray} == {j.model for j in white_box if j.dataset == "mnist5k"}
    assert all({dict(kw)["surrogate"] for _, kw in j.attacks} == {"mnist5k-cnn-standard", "mnist5k-cnn-pgd-at"}
               for j in gray)
    # issue 5's comparisons: ERM vs group DRO in one colored-mnist5k table, every mnist5k CNN under corruptions
    colored = {j.model: j.table for j in jobs if j.dataset == "colored-mnist5k"}
    assert set(colored) == {"colored-mnist5k-cnn-erm", "colored-mnist5k-cnn-group-dro"} and len(set(colored.values())) == 1
    corrupted = {j.model for j in jobs if j.is_corruptions and j.dataset == "mnist5k" and j.n_examples == 1000}
    assert {"mnist5k-cnn-standard", "mnist5k-cnn-augmix", "mnist5k-cnn-pgd-at", "mnist5k-cnn-wrm"} <= corrupted
    assert "mnist5k/L2-0.5/mnist5k-cnn-wrm" in keys
    # issue 11: the complete verifier on the mnist5k Linf tables (every one of the 200 points at Linf 0.1, a
    # stated prefix of 15 at 0.2 and 0.3 where most examples time out: docs/bab.md) and on all of digits,
    # 10 CPU seconds per example
    for job in jobs:
        if job.norm == "Linf" and job.dataset in ("mnist5k", "digits") and "transfer" not in [a for a, _ in job.attacks]:
            assert "bab" in [name for name, _ in job.certifiers], job.key
            bab = dict(dict(job.certifiers)["bab"])
            assert bab.get("timeout") == 10 and bab.get("clock") == "cpu", job.key
            prefix = 15 if job.dataset == "mnist5k" and job.eps > 0.1 else job.n_examples
            assert job.certifier_examples().get("bab", job.n_examples) == prefix, job.key
            assert job.dataset != "mnist5k" or job.eps > 0.1 or prefix == 200, job.key
    # issue 12: the first-order SDP where it adds certificates bab's prefix leaves out (docs/sdp_fo.md), on a
    # prefix no shorter than bab's, so the certified-to-robust band stays bab's
    sdp_tables = {j.key for j in jobs if "sdp-fo" in [name for name, _ in j.certifiers]}
    assert sdp_tables == {j.key for j in jobs if j.dataset == "mnist5k" and j.norm == "Linf" and j.eps > 0.1
                          and j.access == "white-box"}
    for job in jobs:
        if job.key in sdp_tables:
            sdp = dict(dict(job.certifiers)["sdp-fo"])
            assert sdp.get("timeout") == 10 and sdp.get("clock") == "cpu", job.key
            assert job.certifier_examples()["sdp-fo"] == 100 >= job.certifier_examples()["bab"], job.key


@pytest.mark.parametrize("text, message", [
    ('[[entry]]\nmodel = "m"\ndataset = "digits"\nnorm = "Linf"\neps = [0.1]\n', "n_examples"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\neps = 0.1\nn_examples = 5\ncolour = 1\n', "colour"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "L7"\neps = 0.1\nn_examples = 5\n', "norm"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\neps = -1\nn_examples = 5\n', "eps"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\neps = 0.1\nn_examples = 0\n', "n_examples"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\neps = 0.1\nn_examples = 5\nmode = "x"\n', "mode"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\neps = [0.1, 0.1]\nn_examples = 5\n', "more than once"),
    ("[[entry]\n", "not valid TOML"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "corruptions"\neps = 0.1\nn_examples = 5\n', "'eps' does not apply"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "corruptions"\nattacks = ["pgd"]\nn_examples = 5\n',
     "'attacks' does not apply"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "corruptions"\nmode = "cascade"\nn_examples = 5\n', "individual"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "corruptions"\ncorruptions = ["fog"]\nn_examples = 5\n',
     "unknown corruption 'fog'"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "corruptions"\ncorruptions = "jpeg"\nn_examples = 5\n',
     "must be a non-empty list"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "corruptions"\ncorruptions = []\nn_examples = 5\n',
     "must be a non-empty list"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\neps = 0.1\ncorruptions = ["jpeg"]\nn_examples = 5\n',
     "needs norm"),
    ('[[entry]]\nmodel = "m"\ndataset = "d"\nnorm = "Linf"\nn_examples = 5\n', "'eps' is missing"),
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
    assert "attacks/pgd.py" in rec["inputs"]["code_files"] and "robustbench_lite/evaluation/core.py" in rec["inputs"]["code_files"]
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
    out, err = capsys.readouterr()
    assert code == 2 and "unavailable" in out and "error" in out
    assert err.startswith("robustbench-lite: error: 2 of 2 registry entries were not evaluated")
    assert len(err.strip().splitlines()) == 1
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


def test_code_fingerprint_of_lp_follows_crown_and_not_the_registry_code():
    """LP takes its intermediate bounds from CROWN: a change to crown.py must re-run an LP-only entry; an
    edit to the registry code (protocol.py) must re-run nothing."""
    files = code_files(["certify.lp"])
    assert {"certify/crown.py", "certify/graph.py", "certify/layers.py", "certify/convex.py"} <= set(files)
    assert "robustbench_lite/leaderboard/protocol.py" not in code_files(list(EVALUATOR_MODULES) + ["robustbench_lite.leaderboard.merge",
                                                                                      "robustbench_lite.corruptions.evaluate"])


def test_code_fingerprint_of_crown_leaves_out_its_package_siblings():
    """``from . import patches`` in crown.py depends on patches.py, not on certify/__init__.py and every
    certifier it registers: an edit to bab or sdp-fo must not re-run a CROWN-only entry."""
    files = code_files(["certify.crown"])
    assert {"certify/crown.py", "certify/patches.py", "certify/rounding.py"} <= set(files)
    assert not {"certify/__init__.py", "certify/bab.py", "certify/sdp_fo.py", "certify/mip.py"} & set(files)
    assert "certify/bab_bound.py" in code_files(["certify.bab"])


def test_certifiers_import_project_modules_at_module_level():
    """The fingerprint follows module-level imports only, so a certifier that imports a project module
    inside a function hides a dependency from it."""
    lazy = []
    for path in sorted((PROJECT_ROOT / "certify").glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{path.name}:{node.lineno}" for node in ast.walk(fn)
                         if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0]
                                                                  in PROJECT_PACKAGES)]
    assert not lazy, f"imports inside functions: {lazy}"


CORRUPTION_TABLE = """dataset = "mnist5k"
norm = "corruptions"
corruptions = ["gaussian_noise", "jpeg"]
n_examples = 8
"""
COLORED_TABLE = """dataset = "colored-mnist5k"
norm = "Linf"
eps = [0.02]
attacks = [{name = "pgd", steps = 3}]
certifiers = []
n_examples = 24
"""
WRM_TABLE = """dataset = "mnist5k"
norm = "L2"
eps = [0.5, 1.0]
attacks = [{name = "pgd", steps = 3}]
certifiers = []
n_examples = 6
"""
#: a table's entries share its protocol, so each model's entry is the table's lines under its name
DEFENSE_ENTRIES = '[defaults]\nmode = "cascade"\nattacks = ["fgsm"]\n' + "".join(
    f'\n[[entry]]\nmodel = "{model}"\n{table}' for model, table in [
        ("mnist5k-cnn-standard", CORRUPTION_TABLE), ("mnist5k-cnn-augmix", CORRUPTION_TABLE),
        ("colored-mnist5k-cnn-erm", COLORED_TABLE), ("colored-mnist5k-cnn-group-dro", COLORED_TABLE),
        ("mnist5k-cnn-wrm", WRM_TABLE)])


def test_defense_tables_end_to_end_from_a_registry_elsewhere(tmp_path, capsys, monkeypatch):
    """Corruptions, worst-group and WRM entries: records, README, index.html; the registry is a copy
    outside the output root (--registry / --root), and a second run skips everything."""
    from robustbench_lite.leaderboard import sections as reports

    monkeypatch.setattr(reports, "WRM_STEPS", 4)
    monkeypatch.setattr(reports, "_WRM_CACHE", {})
    calls = []
    real = reports.wrm_report
    monkeypatch.setattr(reports, "wrm_report", lambda *a, **k: calls.append(1) or real(*a, **k))
    (tmp_path / "copy").mkdir()
    reg, root = tmp_path / "copy" / "registry.toml", tmp_path / "out"
    reg.write_text(DEFENSE_ENTRIES)
    assert cli.main(["leaderboard", "regenerate", "--registry", str(reg), "--root", str(root)]) == 0
    assert "ran 6, skipped 0" in capsys.readouterr().out
    assert len(calls) == 1  # one certificate for the two L2 tables of the WRM model
    corrupt = read_record(root / "mnist5k" / "corruptions" / "mnist5k-cnn-augmix.json")
    assert list(corrupt["corruptions"]["accuracy"]) == ["gaussian_noise", "jpeg"]
    assert corrupt["inputs"]["registry_key"] == "mnist5k/corruptions/mnist5k-cnn-augmix"
    assert "robustbench_lite/corruptions/ops.py" in corrupt["inputs"]["code_files"]
    erm, dro = (read_record(root / "colored-mnist5k" / "Linf-0.02" / f"colored-mnist5k-cnn-{m}.json")
                for m in ("erm", "group-dro"))
    wrm = read_record(root / "mnist5k" / "L2-1" / "mnist5k-cnn-wrm.json")
    assert wrm["wrm_certificate"]["bound_holds"] and wrm["wrm_certificate"]["steps"] == 4
    readme = (root / "README.md").read_text()
    assert "registry protocol" in readme and "no registry entry" not in readme
    assert "## mnist5k, common corruptions (ranked by mean corruption accuracy)" in readme
    assert "## colored-mnist5k, Linf eps = 0.02 (ranked by worst-group accuracy)" in readme
    assert "## WRM certificate" in readme and readme.count("| mnist5k-cnn-wrm | 0.385 |") == 3
    group_table = readme.split("ranked by worst-group accuracy)")[1].split("##")[0]
    order = sorted([erm, dro], key=lambda r: -r["groups"]["clean"]["worst_group_acc"])
    assert group_table.index(order[0]["model"]["name"] + " |") < group_table.index(order[1]["model"]["name"] + " |")
    page = (root / "index.html").read_text()
    assert 'id="mnist5k-corruptions"' in page and 'id="wrm-certificate"' in page
    assert not (root / "plots" / "robust_vs_eps_mnist5k_corruptions.png").exists()
    assert not list(root.glob("registry.toml"))
    assert cli.main(["leaderboard", "regenerate", "--registry", str(reg), "--root", str(root)]) == 0
    assert "ran 0, skipped 6" in capsys.readouterr().out

