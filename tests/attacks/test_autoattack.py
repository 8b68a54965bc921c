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


def reference_robust(model, x, y, threat, attacks, n_target_classes=9, steps=100, square_queries=5000) -> int:
    """Robust count of pyautoattack's own cascade restricted to ``attacks`` (standard budgets by default)."""
    from pyautoattack import AutoAttack as Reference

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng():
        warnings.simplefilter("ignore")
        reference = Reference(model, norm=threat.norm, eps=threat.eps, version="custom", attacks=attacks, seed=0)
        reference.apgd_targeted.n_target_classes = reference.fab.n_target_classes = n_target_classes
        reference.apgd.n_iter = reference.apgd_targeted.n_iter = reference.fab.n_iter = steps
        reference.square.n_queries = square_queries
        reference.verbose = False
        _, y_adv = reference.run_standard_evaluation(x, y, batch_size=250)
    return int((y_adv == y).sum())


def reference_standard(norm: str = "Linf"):
    """pyautoattack's own ``version="standard"`` AutoAttack (the settings it publishes and runs)."""
    from pyautoattack import AutoAttack as Reference

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return Reference(model, norm=norm, eps=0.1, version="standard", device="cpu")


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_defaults_are_the_reference_standard_settings(norm):
    """Read from the reference's standard suite and from its paper (Croce & Hein 2020, section 4: 100
    iterations, 9 target classes, 5000 Square queries with p_init 0.8, rho 0.75), not from our STANDARD."""
    ref, ours = reference_standard(norm), AutoAttack()
    assert ref.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert ours.stages == [s.replace("fab-t", "fmn-t") for s in ref.attacks_to_run]  # FMN-T in FAB-T's slot
    assert ours.steps == ref.apgd.n_iter == ref.apgd_targeted.n_iter == ref.fab.n_iter == 100
    assert ours.restarts == ref.apgd.n_restarts == ref.apgd_targeted.n_restarts == 1
    assert ours.rho == ref.apgd.thr_decr == 0.75
    assert ours.n_target_classes == ref.apgd_targeted.n_target_classes == ref.fab.n_target_classes == 9
    assert ours.square_queries == ref.square.n_queries == 5000 and ours.square_p_init == ref.square.p_init == 0.8
    assert ours.eot_iter == ref.apgd.eot_iter == 1 and ref.square.rescale_schedule is False
    assert ours.square_start == "stripes"  # the reference's Square starts from vertical stripes


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
    """Four classes: the targeted stages use the 3 other classes and the cascade is as strong as PGD and as
    the reference's (told 3 targets) at the same budget, with APGD-T breaking points APGD-CE left."""
    model = trained_mlp(4)
    x, y = held_out(4, n=12)
    threat = ThreatModel("Linf", 0.2)
    result = AutoAttack(steps=20, square_queries=100)(model, x, y, threat)
    robust = int((~result.success).sum())
    assert 0 < robust <= int((~PGD(steps=20, abs_stepsize=0.05)(model, x, y, threat).success).sum())
    assert robust <= reference_robust(model, x, y, threat, ["apgd-ce", "apgd-t", "fab-t", "square"],
                                      n_target_classes=3, steps=20, square_queries=100) + 1
    after = result.flags["robust_after"]
    assert after["apgd-t"] < after["apgd-ce"]
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


@pytest.mark.parametrize("threat", [LINF, ThreatModel("L2", 0.5)], ids=["Linf", "L2"])
def test_full_suite_at_a_small_budget_no_weaker_than_the_reference(threat):
    """The fast version of the slow test below: all four stages (FMN-T against the reference's FAB-T) at
    25 iterations and 500 Square queries on both sides, 16 points of the small digits MLP."""
    model = trained_mlp()
    x, y = held_out(n=16)
    ours = AutoAttack(steps=25, square_queries=500)(model, x, y, threat)
    robust = int((~ours.success).sum())
    assert robust <= reference_robust(model, x, y, threat, ["apgd-ce", "apgd-t", "fab-t", "square"], steps=25,
                                      square_queries=500) + 1
    assert robust <= int((~PGD(steps=25, abs_stepsize=threat.eps / 4)(model, x, y, threat).success).sum())
    assert 0 < robust < x.shape[0], "pick an eps where the comparison means something"


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
