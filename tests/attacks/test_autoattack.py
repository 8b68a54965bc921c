"""The autoattack cascade against PGD and against the reference pyautoattack on the same examples."""
from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from attacks import PGD, AutoAttack, AutoAttackRef
from digits_model import held_out, trained_mlp
from robustbench_lite.threat import ThreatModel

LINF = ThreatModel("Linf", 0.1)


def reference_robust(model, x, y, threat, attacks, n_target_classes=9) -> int:
    """Robust count of pyautoattack's own cascade restricted to ``attacks`` (standard budgets)."""
    from pyautoattack import AutoAttack as Reference

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng():
        warnings.simplefilter("ignore")
        reference = Reference(model, norm=threat.norm, eps=threat.eps, version="custom", attacks=attacks, seed=0)
        reference.apgd_targeted.n_target_classes = n_target_classes
        reference.verbose = False
        _, y_adv = reference.run_standard_evaluation(x, y, batch_size=250)
    return int((y_adv == y).sum())


def test_suite_is_called_standard_only_with_the_reference_budget():
    assert AutoAttack().config()["suite"] == "autoattack-standard"
    for change in ({"steps": 50}, {"restarts": 2}, {"n_target_classes": 5}, {"square_queries": 1000},
                   {"square_p_init": 0.5}, {"rho": 0.5}, {"stages": ["apgd-ce", "apgd-t"]}, {"eot_iter": 2}):
        assert AutoAttack(**change).config()["suite"] == "custom", change
    assert "fmn-t" in AutoAttack().config()["min_norm_stage"]


@pytest.mark.parametrize("threat", [LINF, ThreatModel("L2", 0.5)], ids=["Linf", "L2"])
def test_white_box_stages_never_weaker_than_pgd_nor_the_reference(threat):
    model = trained_mlp()
    x, y = held_out(n=40)
    stages = ["apgd-ce", "apgd-t"]
    ours = AutoAttack(stages=stages)(model, x, y, threat)
    pgd = PGD(steps=100, abs_stepsize=threat.eps / 10)(model, x, y, threat)
    robust = int((~ours.success).sum())
    assert robust <= int((~pgd.success).sum())
    assert robust <= reference_robust(model, x, y, threat, stages) + 1
    assert 0 < robust < x.shape[0], "pick an eps where the comparison means something"
    after = ours.flags["robust_after"]
    assert after["clean"] >= after["apgd-ce"] >= after["apgd-t"] == robust


def test_cascade_attacks_only_what_is_left():
    model = trained_mlp()
    x, y = held_out(n=10)
    wrong = (y + 1) % 10
    result = AutoAttack()(model, x, wrong, LINF)
    assert bool(result.success.all())
    # the clean pass and the final re-scoring, nothing else: no stage ran
    assert result.forward == 2 * 10 and result.backward == 0 and result.queries == 0


def test_fewer_than_ten_classes():
    model = trained_mlp(4)
    x, y = held_out(4, n=12)
    result = AutoAttack(steps=20, square_queries=100)(model, x, y, ThreatModel("Linf", 0.3))
    assert bool(result.success.any())
    ref = AutoAttackRef()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ref(model, x, y, ThreatModel("L2", 2.0)).flags["n_target_classes"] == 3
    assert out.getvalue() == ""


def test_reference_wrapper_is_silent_and_leaves_the_global_rng_alone(capsys):
    model = trained_mlp()
    x, y = held_out(n=8)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    result = AutoAttackRef()(model, x, y, ThreatModel("L2", 2.0))  # breaks everything in APGD-CE
    assert torch.equal(torch.random.get_rng_state(), state)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert bool(result.success.all()) and result.backward > 0


@pytest.mark.slow
def test_full_standard_suite_no_weaker_than_the_reference():
    model = trained_mlp()
    x, y = held_out(n=40)
    ours = AutoAttack()(model, x, y, LINF)
    reference = AutoAttackRef()(model, x, y, LINF)
    pgd = PGD()(model, x, y, LINF)
    assert int((~ours.success).sum()) <= int((~pgd.success).sum())
    assert int((~ours.success).sum()) <= int((~reference.success).sum()) + 1


def test_reference_warnings_are_relogged_and_counted_not_printed(capsys, caplog):
    model = torch.nn.Sequential(trained_mlp(), torch.nn.Softmax(dim=1))  # the reference warns on probabilities
    x, y = held_out(n=8)
    with caplog.at_level("WARNING", logger="attacks.ensemble"):
        result = AutoAttackRef()(model, x, y, ThreatModel("L2", 2.0))
    assert result.flags["reference_warnings"] >= 1
    assert any("probability" in r.getMessage() for r in caplog.records if r.name == "attacks.ensemble")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
