"""The statistics of benchmarks/rst_seeds.py (issue 16's pre-registered seed study): gaps and the
recovered fraction by hand, the paired bootstrap's point values, the t-interval over seeds, the
verdict rule at its boundaries, and records cut to their first n images."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "rst_seeds.py"
_SPEC = importlib.util.spec_from_file_location("rst_seeds", _PATH)
rst_seeds = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rst_seeds)


def test_gaps_by_hand():
    g = rst_seeds.gaps(np.array([0.70, 0.70]), np.array([0.76, 0.70]), np.array([0.78, 0.70]))
    np.testing.assert_allclose(g["d1"], [0.06, 0.0], atol=1e-12)
    np.testing.assert_allclose(g["d2"], [0.02, 0.0], atol=1e-12)
    assert g["R"][0] == pytest.approx(0.75) and np.isnan(g["R"][1])  # r_C <= r_L: R undefined


def test_paired_bootstrap_points_and_a_degenerate_span():
    l = np.array([1, 0, 0, 0, 1, 0, 1, 1], dtype=float)     # 0.5
    rst = np.array([1, 1, 0, 0, 1, 0, 1, 1], dtype=float)   # 0.625
    c = np.array([1, 1, 1, 0, 1, 0, 1, 1], dtype=float)     # 0.75
    b = rst_seeds.paired_bootstrap(l, rst, c, resamples=500)
    assert b["d1"][0] == pytest.approx(0.125) and b["d2"][0] == pytest.approx(0.125) and b["R"][0] == pytest.approx(0.5)
    assert b["d1"][1] <= 0.125 <= b["d1"][2]
    same = rst_seeds.paired_bootstrap(l, l, l, resamples=50)   # r_C == r_L in every resample
    assert np.isnan(same["R"][0]) and np.isnan(same["R"][1]) and same["R"][3] == 1.0


def test_t_interval_over_seeds_by_hand():
    mean, low, high = rst_seeds.over_seeds([1.0, 2.0, 3.0])    # sd 1, df 2: half-width 4.303 / sqrt(3)
    assert mean == 2.0 and high - mean == pytest.approx(4.303 / np.sqrt(3)) and mean - low == pytest.approx(high - mean)
    assert np.isnan(rst_seeds.over_seeds([0.4])[1])


@pytest.mark.parametrize("r_first, r_seeds, mean_d1, word", [
    ((0.8, 0.55, 0.95, 0.0), [0.8, 0.6, 0.7], 0.03, "SUPPORTED"),
    ((0.8, 0.50, 0.95, 0.0), [0.8, 0.6, 0.7], 0.03, "INCONCLUSIVE"),   # interval touches 0.5
    ((0.8, 0.55, 0.95, 0.0), [0.8, 0.5, 0.7], 0.03, "INCONCLUSIVE"),   # one seed not above 0.5
    ((0.3, 0.10, 0.49, 0.0), [0.3, 0.2, 0.4], 0.01, "REFUTED"),        # interval below 0.5
    ((0.8, 0.20, 0.95, 0.0), [0.8, 0.6, 0.7], 0.0, "REFUTED"),         # mean d1 <= 0
])
def test_verdict_rule_at_its_boundaries(r_first, r_seeds, mean_d1, word):
    assert rst_seeds.verdict(r_first, r_seeds, mean_d1).startswith(word)


def _record(path: Path, robust: list[int], start: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": {"n_examples": len(robust), "indices": {"start": start}},
                                "per_example": {"robust": robust, "correct": [1] * len(robust)}}))


def test_records_are_cut_to_their_first_n_images_and_short_ones_refused(tmp_path):
    _record(rst_seeds.record_path(tmp_path, "L", 0, 0.3), [1, 0, 1, 1, 0])
    np.testing.assert_array_equal(rst_seeds.flags(tmp_path, "L", 0, 0.3, 3), [1, 0, 1])
    assert rst_seeds.flags(tmp_path, "C", 0, 0.3, 3) is None
    with pytest.raises(SystemExit, match="not the first 6"):
        rst_seeds.flags(tmp_path, "L", 0, 0.3, 6)
    _record(rst_seeds.record_path(tmp_path, "RST", 0, 0.3), [1, 1, 1], start=2)
    with pytest.raises(SystemExit, match="from index 2"):
        rst_seeds.flags(tmp_path, "RST", 0, 0.3, 3)
