"""Fixtures shared by the fuzz tests (test_fuzz_*.py): a small leaderboard folder with one record."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _checkout_status() -> str:
    return subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all"],
                          capture_output=True, text=True).stdout


@pytest.fixture(autouse=True)
def _results_dir(tmp_path_factory, monkeypatch):
    """Ad-hoc records of every test go to a temporary results folder, never to the checkout's ./results."""
    monkeypatch.setenv("RBL_RESULTS_DIR", str(tmp_path_factory.mktemp("results")))


@pytest.fixture(autouse=True)
def checkout_untouched(request):
    """A fuzz test never writes into the checkout (records, results, stray folders from relative paths)."""
    if not request.module.__name__.startswith("test_fuzz"):
        yield
        return
    before = _checkout_status()
    yield
    assert _checkout_status() == before, "a fuzzed command wrote into the checkout"


REGISTRY = """[defaults]
split = "test"
seed = 0

[[entry]]
model = "digits-mlp-standard"
dataset = "digits"
norm = "Linf"
eps = [0.05]
attacks = ["fgsm"]
certifiers = ["ibp"]
n_examples = 8
"""


@pytest.fixture(scope="module")
def one_record(tmp_path_factory) -> Path:
    from robustbench_lite.leaderboard.regenerate import regenerate

    root = tmp_path_factory.mktemp("board")
    (root / "registry.toml").write_text(REGISTRY)
    regenerate(root, resume=False)
    return root


@pytest.fixture
def board_with_a_record(one_record):
    """Copy the module's regenerated board (registry, one up-to-date record, README) to a folder."""
    def make(target: Path) -> Path:
        shutil.copytree(one_record, target)
        return target
    return make

