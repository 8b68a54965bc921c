"""Every test writes its ad-hoc records to a temporary results folder, never to the checkout's ./results."""
import pytest


@pytest.fixture(autouse=True)
def _results_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RBL_RESULTS_DIR", str(tmp_path_factory.mktemp("results")))
