"""The command line: the happy paths, and every user error as one line on stderr with no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from certify import CERTIFIERS
from certify.base import Certifier
from safetensors.torch import save_file

import robustbench_lite.evaluation.core as evaluate_module
from robustbench_lite import cli
from robustbench_lite.leaderboard import records as leaderboard
from robustbench_lite.zoo.architectures import digits_mlp

REPO = Path(__file__).resolve().parents[2]
MODEL = "digits-mlp-standard"
FAST = ["--model", MODEL, "--dataset", "digits", "--eps", "0.05", "--n-examples", "30", "--no-progress"]


def evaluate_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["evaluate", *FAST, "--leaderboard-dir", str(tmp_path), *extra]


def record_file(tmp_path: Path) -> Path:
    return tmp_path / "digits" / "Linf-0.05" / f"{MODEL}.json"


def one_error_line(capsys, code: int, expected: int = 2) -> str:
    out = capsys.readouterr()
    assert code == expected, out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustbench-lite: error: "), out.err
    assert "Traceback" not in out.err
    return lines[0]


def test_evaluate_prints_a_table_and_writes_the_record(tmp_path, capsys):
    assert cli.main(evaluate_args(tmp_path)) == 0
    out = capsys.readouterr().out
    for word in ("clean", "attack pgd", "robust (worst case)", "certifier ibp", "certified (any)", "flags:"):
        assert word in out
    path = record_file(tmp_path)
    assert f"wrote {path}" in out
    rec = leaderboard.read_record(path)
    assert rec["model"]["name"] == MODEL and rec["dataset"]["n_examples"] == 30
    assert rec["threat_model"]["eps"] == 0.05 and [a["name"] for a in rec["attacks"]] == ["pgd"]
    assert rec["clean_acc"] >= rec["robust_acc"] >= rec["certified_acc"]


def test_progress_bar_path(tmp_path, capsys):
    argv = [a for a in evaluate_args(tmp_path) if a != "--no-progress"]
    assert cli.main([*argv, "--no-write", "--certifiers", "none"]) == 0
    out = capsys.readouterr()
    assert "robust (worst case)" in out.out and "Traceback" not in out.err


def test_masking_checks_option_runs_the_attack_checks(tmp_path, capsys, monkeypatch):
    from robustbench_lite.evaluation import checks

    calls = []
    monkeypatch.setattr(checks, "ATTACK_CHECKS", [lambda ctx: calls.append(ctx.x.shape[0])])
    assert cli.main(evaluate_args(tmp_path, "--no-write", "--certifiers", "none")) == 0
    assert calls == []
    assert cli.main(evaluate_args(tmp_path, "--no-write", "--certifiers", "none", "--masking-checks")) == 0
    assert calls == [30]


def test_json_and_no_write(tmp_path, capsys):
    assert cli.main(evaluate_args(tmp_path, "--json", "--no-write", "--attacks", "fgsm,pgd", "--certifiers", "none",
                                  "--individual")) == 0
    rec = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in rec["attacks"]] == ["fgsm", "pgd"] and rec["certifiers"] == []
    assert rec["mode"] == "individual"
    assert not any(tmp_path.iterdir())


def test_eps_as_a_fraction_is_stored_as_its_value(tmp_path, capsys):
    assert cli.main(["evaluate", *FAST, "--eps", "8/255", "--attacks", "fgsm", "--certifiers", "none", "--json",
                     "--no-write"]) == 0
    assert json.loads(capsys.readouterr().out)["threat_model"]["eps"] == 8 / 255


def test_zoo_list_and_leaderboard_show(tmp_path, capsys):
    assert cli.main(["zoo", "list"]) == 0
    assert MODEL in capsys.readouterr().out
    assert cli.main(evaluate_args(tmp_path)) == 0
    capsys.readouterr()
    assert cli.main(["leaderboard", "show", "--leaderboard-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert MODEL in table and "robust %" in table
    assert cli.main(["leaderboard", "show", "--leaderboard-dir", str(tmp_path), "--dataset", "mnist5k"]) == 0
    assert "no leaderboard records" in capsys.readouterr().out


def test_train_delegates_to_the_training_module(monkeypatch, capsys):
    import robustbench_lite.train as train_module

    seen = {}
    monkeypatch.setattr(train_module, "run", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main(["train", "--out", "somewhere", "--epochs", "1"]) == 0
    assert str(seen["args"].out) == "somewhere" and seen["args"].epochs == 1


@pytest.fixture
def mismatched_checkpoint(tmp_path):
    path = tmp_path / "mlp.safetensors"
    save_file(digits_mlp().state_dict(), str(path))
    return path


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--model", "no-such-model"], "unknown model"),
    (["evaluate", "--model", "/no/such/file.safetensors"], "does not exist"),
    (["evaluate", "--dataset", "no-such-data", "--model", MODEL], "unknown dataset"),
    (["evaluate", *FAST, "--attacks", "pgd,nope"], "unknown attack 'nope'"),
    (["evaluate", *FAST, "--certifiers", "nope"], "unknown certifier 'nope'"),
    (["evaluate", *FAST, "--eps", "-0.1"], "eps must be finite and >= 0"),
    (["evaluate", *FAST, "--eps", "inf"], "eps must be finite"),
    (["evaluate", *FAST, "--eps", "abc"], "eps must be a number or a fraction"),
    (["evaluate", *FAST, "--eps", "8/0"], "eps must be a number or a fraction"),
    (["evaluate", *FAST, "--norm", "L7"], "unknown norm"),
    (["evaluate", *FAST, "--n-examples", "0"], "n_examples must be >= 1"),
    (["evaluate", *FAST, "--batch-size", "0"], "batch_size must be >= 1"),
    (["evaluate", *FAST, "--device", "banana"], "device"),
    (["evaluate", *FAST, "--split", "validation"], "split"),
    (["evaluate", "--model", MODEL, "--dataset", "mnist5k", "--n-examples", "5", "--no-write"], "cannot take inputs"),
    (["evaluate", "--bogus"], "unrecognized arguments"),
    (["evaluate", *FAST, "--threat", "linf"], "invalid choice"),
    (["evaluate", *FAST, "--corruptions", "jpeg"], "--corruptions needs --threat corruptions"),
    (["evaluate", *FAST, "--threat", "corruptions", "--corruptions", "fog"], "unknown corruption 'fog'"),
    (["evaluate", *FAST, "--threat", "corruptions", "--corruptions", "jpeg,jpeg"], "listed twice"),
    (["evaluate", *FAST, "--threat", "corruptions", "--corruptions", " "], "--corruptions is empty"),
    (["evaluate", *FAST, "--threat", "corruptions", "--attacks", "pgd"], "--attacks does not apply"),
    (["evaluate", *FAST, "--threat", "corruptions", "--certifiers", "none"], "--certifiers does not apply"),
    (["evaluate", *FAST, "--threat", "corruptions", "--corruptions", "elastic"], "cannot be applied to 8x8 images"),
    (["evaluate", *FAST, "--threat", "corruptions", "--n-examples", "0"], "n_examples must be >= 1"),
    (["frobnicate"], "invalid choice"),
    ([], "choose a command"),
    (["zoo"], "required"),
])
def test_user_errors_are_one_line(argv, message, capsys, tmp_path):
    line = one_error_line(capsys, cli.main([*argv, "--leaderboard-dir", str(tmp_path)] if argv[:1] == ["evaluate"]
                                           else argv))
    assert message in line
    assert not any(tmp_path.iterdir())


def test_mismatched_checkpoint(mismatched_checkpoint, capsys, tmp_path):
    line = one_error_line(capsys, cli.main(["evaluate", "--model", str(mismatched_checkpoint), "--arch", "mnist-cnn",
                                            "--dataset", "mnist5k", "--leaderboard-dir", str(tmp_path)]))
    assert "mlp.safetensors" in line


def test_smaller_run_needs_replace(tmp_path, capsys):
    assert cli.main(evaluate_args(tmp_path)) == 0
    small = [a if a != "30" else "10" for a in evaluate_args(tmp_path)]
    assert "not replacing it with a smaller evaluation" in one_error_line(capsys, cli.main(small))
    assert leaderboard.read_record(record_file(tmp_path))["dataset"]["n_examples"] == 30
    assert cli.main([*small, "--replace"]) == 0
    assert leaderboard.read_record(record_file(tmp_path))["dataset"]["n_examples"] == 10


def test_corrupt_record_is_an_error_and_kept(tmp_path, capsys):
    path = record_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{broken")
    assert "not a readable JSON record" in one_error_line(capsys, cli.main(evaluate_args(tmp_path)))
    assert path.read_text() == "{broken"
    assert "not a readable JSON record" in one_error_line(
        capsys, cli.main(["leaderboard", "show", "--leaderboard-dir", str(tmp_path)]))


def test_unwritable_leaderboard_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = one_error_line(capsys, cli.main(["evaluate", *FAST, "--leaderboard-dir", str(blocker)]))
    assert str(blocker) in line and blocker.read_text() == "not a folder"


class CertifyEverything(Certifier):
    name = "liar"

    def bound_margins(self, model, x, y, threat):
        m = torch.ones(x.shape[0], 10)
        return m.scatter(1, y[:, None], 0.0)


def test_soundness_violation_writes_nothing_and_exits_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(CERTIFIERS._factories, "liar", CertifyEverything)
    code = cli.main(["evaluate", *FAST, "--eps", "0.3", "--certifiers", "liar", "--leaderboard-dir", str(tmp_path)])
    line = one_error_line(capsys, code, expected=3)
    assert "soundness_violation" in line
    assert not any(tmp_path.iterdir())


def test_keyboard_interrupt_exits_130_without_a_file(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate", interrupted)
    assert cli.main(evaluate_args(tmp_path)) == 130
    err = capsys.readouterr().err
    assert err.strip() == "robustbench-lite: interrupted" and not any(tmp_path.iterdir())


def test_keyboard_interrupt_during_the_write_keeps_the_old_record(tmp_path, capsys, monkeypatch):
    assert cli.main(evaluate_args(tmp_path)) == 0
    path = record_file(tmp_path)
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(leaderboard.os, "fsync", interrupted)
    assert cli.main(evaluate_args(tmp_path, "--attacks", "fgsm")) == 130
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]


def test_module_entry_point_in_a_subprocess(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "robustbench_lite", "evaluate", "--model", "no-such-model",
                           "--leaderboard-dir", str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("robustbench-lite: error: unknown model 'no-such-model'")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not any(p.name != "__pycache__" for p in tmp_path.iterdir())


CORRUPT = ["evaluate", "--threat", "corruptions", "--model", "mnist5k-cnn-standard", "--dataset", "mnist5k",
           "--n-examples", "8", "--no-progress"]


def test_evaluate_corruptions_prints_the_table_and_writes_its_record(tmp_path, capsys):
    assert cli.main([*CORRUPT, "--corruptions", "gaussian_noise,jpeg", "--leaderboard-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "mnist5k" / "corruptions" / "mnist5k-cnn-standard.json"
    rec = leaderboard.read_record(path)
    assert f"wrote {path}" in out and list(rec["corruptions"]["accuracy"]) == ["gaussian_noise", "jpeg"]
    assert f"mean corruption accuracy {100 * rec['corruptions']['mean_corruption_acc']:.1f} %" in out
    assert rec["threat_model"] == {"norm": "corruptions", "eps": 0.0, "box": [0.0, 1.0]}
    assert cli.main(["leaderboard", "show", "--leaderboard-dir", str(tmp_path)]) == 0
    assert "common corruptions" in capsys.readouterr().out


def test_evaluate_reports_group_accuracies_and_the_wrm_certificate(tmp_path, capsys, monkeypatch):
    from robustbench_lite.leaderboard import sections as reports

    monkeypatch.setattr(reports, "WRM_STEPS", 4)
    colored = ["evaluate", "--model", "colored-mnist5k-cnn-erm", "--dataset", "colored-mnist5k", "--eps", "0.02",
               "--attacks", "fgsm", "--certifiers", "none", "--n-examples", "16", "--no-progress"]
    assert cli.main([*colored, "--leaderboard-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "worst-group clean" in out and "worst-group robust" in out
    rec = leaderboard.read_record(tmp_path / "colored-mnist5k" / "Linf-0.02" / "colored-mnist5k-cnn-erm.json")
    assert rec["groups"]["names"] == ["y=0,red", "y=0,green", "y=1,red", "y=1,green"]
    wrm = ["evaluate", "--model", "mnist5k-cnn-wrm", "--dataset", "mnist5k", "--norm", "L2", "--eps", "0.5",
           "--attacks", "fgsm", "--certifiers", "none", "--n-examples", "4", "--no-progress", "--no-write"]
    assert cli.main([*wrm, "--json"]) == 0
    cert = json.loads(capsys.readouterr().out)["wrm_certificate"]
    assert cert["gamma"] == 0.385 and cert["steps"] == 4 and len(cert["rows"]) == 3
    assert cli.main(wrm) == 0 and "WRM certificate (gamma 0.385" in capsys.readouterr().out
    assert cli.main([*wrm, "--json", "--no-defense-metrics"]) == 0
    assert "wrm_certificate" not in json.loads(capsys.readouterr().out)


def test_regenerate_with_a_missing_registry_is_one_line(tmp_path, capsys):
    line = one_error_line(capsys, cli.main(["leaderboard", "regenerate", "--registry", str(tmp_path / "nope.toml"),
                                            "--root", str(tmp_path / "out")]))
    assert "no leaderboard registry" in line and not (tmp_path / "out").exists()
    for action in ("show", "render"):
        line = one_error_line(capsys, cli.main(["leaderboard", action, "--registry", str(tmp_path / "nope.toml"),
                                                "--root", str(tmp_path)]))
        assert "no leaderboard registry" in line



def tanh_digits() -> torch.nn.Module:
    """A digits model the bound propagators cannot handle (``--model test_cli:tanh_digits``)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10))


def test_default_certifier_skips_an_unsupported_model_and_a_named_one_is_an_error(tmp_path, capsys):
    argv = ["evaluate", "--model", "test_cli:tanh_digits", "--dataset", "digits", "--eps", "0.05", "--n-examples", "8",
            "--attacks", "fgsm", "--no-progress", "--leaderboard-dir", str(tmp_path)]
    assert cli.main([*argv, "--json"]) == 0
    out = capsys.readouterr()
    warning = "robustbench-lite: warning: ibp skipped: unsupported layers: 2 (Tanh)"
    assert out.err.count(warning) == 1 and "Traceback" not in out.err
    record = json.loads(out.out)
    assert record["certifiers"][0]["status_counts"] == {"skipped": 8}
    assert [f["explanation"] for f in record["flags"] if f["name"] == "certifier_unsupported"] == [warning[27:]]
    line = one_error_line(capsys, cli.main([*argv, "--certifiers", "ibp", "--replace"]))
    assert "certifier 'ibp': unsupported layers: 2 (Tanh)" in line


def test_evaluate_writes_to_the_results_folder_and_never_to_the_published_leaderboards(tmp_path, monkeypatch):
    from robustbench_lite.leaderboard.protocol import load_registry
    from robustbench_lite.leaderboard.regenerate import plan

    published = sorted(p.read_bytes() for p in (REPO / "leaderboards").rglob("*.json"))
    monkeypatch.setenv("RBL_RESULTS_DIR", str(tmp_path / "results"))
    assert cli.main(["evaluate", *FAST, "--attacks", "pgd", "--certifiers", "ibp"]) == 0
    record = json.loads(record_file(tmp_path / "results").read_text())
    assert sorted(p.read_bytes() for p in (REPO / "leaderboards").rglob("*.json")) == published
    # one evaluate-and-record path: the command's record carries the fingerprint regeneration would give it,
    # so the same protocol in a registry is up to date without a re-run
    registry = tmp_path / "registry.toml"
    registry.write_text(f'[[entry]]\nmodel = "{MODEL}"\ndataset = "digits"\nsplit = "test"\nnorm = "Linf"\n'
                        'eps = [0.05]\nn_examples = 30\nattacks = ["pgd"]\ncertifiers = ["ibp"]\n')
    [planned] = plan(load_registry(registry), tmp_path / "results")
    assert record["inputs"]["fingerprint"] == planned.inputs["fingerprint"]
    assert planned.action == "skip", planned.reasons
