"""Distributed evaluation: two local ranks on gloo (torchrun, one thread each) give exactly the
numbers of a one-process run, for `evaluate` and for `leaderboard regenerate`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustbench_lite import cli
from robustbench_lite.evaluation.distributed import Group, all_gather, shard

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--model", "digits-mlp-standard", "--dataset", "digits", "--eps", "0.05", "--n-examples", "60",
        "--batch-size", "10", "--attacks", "pgd", "--certifiers", "ibp", "--no-progress"]
RECORD = Path("digits") / "Linf-0.05" / "digits-mlp-standard.json"


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "robustbench_lite", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def comparable(record: dict) -> dict:
    """What must not depend on the number of ranks (not times, dates or thread counts)."""
    keep = ("clean_acc", "robust_acc", "certified_acc", "number_forward_passes", "number_backward_passes",
            "per_example", "dataset", "threat_model", "mode", "flags")
    out = {k: record[k] for k in keep}
    out["attacks"] = [{k: v for k, v in a.items() if k != "seconds"} for a in record["attacks"]]
    out["certifiers"] = [{k: v for k, v in c.items() if k != "seconds"} for c in record["certifiers"]]
    return out


def test_round_robin_shards_and_single_process_gather():
    items = list(range(7))
    assert shard(items, Group(0, 2)) == [0, 2, 4, 6] and shard(items, Group(1, 2)) == [1, 3, 5]
    assert shard(items, Group()) == items and all_gather({"a": 1}, Group()) == [{"a": 1}]


def test_two_gloo_ranks_match_one_process(tmp_path, capsys):
    assert cli.main(["evaluate", *ARGS, "--leaderboard-dir", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    out = torchrun("evaluate", *ARGS, "--leaderboard-dir", str(tmp_path / "two"))
    assert out.stdout.count("robust (worst case)") == 1  # rank 0 alone prints and writes
    one = json.loads((tmp_path / "one" / RECORD).read_text())
    two = json.loads((tmp_path / "two" / RECORD).read_text())
    assert comparable(one) == comparable(two)
    assert sorted(p.name for p in (tmp_path / "two").rglob("*")) == sorted(["digits", "Linf-0.05", RECORD.name])


REGISTRY = """
[defaults]
batch_size = 20
[[entry]]
model = "digits-mlp-standard"
dataset = "digits"
norm = "Linf"
eps = [0.05, 0.1]
attacks = [{name = "pgd", steps = 10}]
certifiers = ["ibp"]
n_examples = 40
"""


@pytest.mark.slow  # a second torchrun launch: ~40 s of process start-up on a loaded 2-core machine
def test_regenerate_spreads_jobs_over_two_ranks(tmp_path, capsys):
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "registry.toml").write_text(REGISTRY)
    assert cli.main(["leaderboard", "regenerate", "--leaderboard-dir", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    out = torchrun("leaderboard", "regenerate", "--leaderboard-dir", str(tmp_path / "two"))
    assert out.stdout.count("ran 2") == 1, out.stdout
    for eps in ("0.05", "0.1"):
        rel = Path("digits") / f"Linf-{eps}" / "digits-mlp-standard.json"
        one = json.loads((tmp_path / "one" / rel).read_text())
        two = json.loads((tmp_path / "two" / rel).read_text())
        assert comparable(one) == comparable(two) and one["inputs"] == two["inputs"]
    assert (tmp_path / "two" / "README.md").read_text() == (tmp_path / "one" / "README.md").read_text()
