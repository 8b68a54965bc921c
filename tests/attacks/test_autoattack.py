"""The autoattack cascade against PGD and against the reference pyautoattack on the same examples."""
from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from attacks import ATTACKS, FABT, PGD, AutoAttack, AutoAttackFMN, AutoAttackRef
from digits_model import held_out, trained_mlp
from robustbench_lite.errors import UserInputError
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


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_defaults_are_the_references_published_standard_settings(norm):
    """Read off pyautoattack's own ``version="standard"`` objects, not our constants."""
    from pyautoattack import AutoAttack as Reference

    with contextlib.redirect_stdout(io.StringIO()):
        ref = Reference(torch.nn.Identity(), norm=norm, eps=0.3, version="standard")
    ours = AutoAttack()
    fab, square_p, = ours._attacks["fab-t"], ours.square_p_init
    assert ours.stages == ref.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (ours.steps, ours.restarts, ours.rho, ours.eot_iter) == (ref.apgd.n_iter, ref.apgd.n_restarts, ref.apgd.thr_decr,
                                                                   ref.apgd.eot_iter)
    assert (ours.steps, ours.restarts, ours.rho) == (ref.apgd_targeted.n_iter, ref.apgd_targeted.n_restarts,
                                                     ref.apgd_targeted.thr_decr)
    assert ours.n_target_classes == ref.apgd_targeted.n_target_classes == ref.fab.n_target_classes
    assert (fab.steps, fab.restarts, fab.alpha_max, fab.eta, fab.beta) == (ref.fab.n_iter, ref.fab.n_restarts,
                                                                          ref.fab.alpha_max, ref.fab.eta, ref.fab.beta)
    assert fab.bounded  # the cascade only asks "broken within eps", so it stops a broken point early
    assert (ours.square_queries, square_p, False) == (ref.square.n_queries, ref.square.p_init,
                                                      ref.square.rescale_schedule)
    assert ours.square_start == "stripes"  # the reference's Square starts from stripes
    assert ours.config()["suite"] == "autoattack-standard"
    # and the standalone attacks default to the same budgets
    assert (FABT().steps, FABT().n_target_classes, FABT().restarts) == (ref.fab.n_iter, 9, 1)


def test_only_the_reference_algorithm_and_budget_is_called_standard():
    assert AutoAttack().config()["suite"] == "autoattack-standard"
    for change in ({"steps": 50}, {"restarts": 2}, {"n_target_classes": 5}, {"square_queries": 1000},
                   {"square_p_init": 0.5}, {"rho": 0.5}, {"stages": ["apgd-ce", "apgd-t"]}, {"eot_iter": 2},
                   {"stages": ["apgd-ce", "apgd-t", "square", "fab-t"]}, {"square_start": "best"}):
        assert AutoAttack(**change).config()["suite"] == "custom", change
    # FMN-T in FAB-T's slot is a suite of its own, registered under its own name
    fmn = ATTACKS.create("autoattack-fmn")
    assert fmn.stages == ["apgd-ce", "apgd-t", "fmn-t", "square"] and fmn.config()["suite"] == "autoattack-fmn"
    assert AutoAttack(stages=["apgd-ce", "apgd-t", "fmn-t", "square"]).config()["suite"] == "autoattack-fmn"
    assert AutoAttackFMN(steps=50).config()["suite"] == "custom"
    assert AutoAttackRef().config()["suite"] == "autoattack-standard"
    assert AutoAttackRef(version="plus").config()["suite"] == "autoattack-plus"
    with pytest.raises(UserInputError):
        AutoAttack(stages=["apgd-ce", "apgd-ce"])


def reference_cascade_success(model, x, y, threat, steps: int = 100, queries: int = 5000) -> torch.Tensor:
    """pyautoattack's version="standard" cascade, its budget optionally cut to ``steps`` / ``queries``."""
    from pyautoattack import AutoAttack as Reference

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng():
        warnings.simplefilter("ignore")
        reference = Reference(model, norm=threat.norm, eps=threat.eps, version="standard", seed=0)
        reference.verbose = False
        reference.apgd.n_iter = reference.apgd_targeted.n_iter = reference.fab.n_iter = steps
        reference.square.n_queries = queries
        _, y_adv = reference.run_standard_evaluation(x, y, batch_size=250)
    return y_adv != y


def assert_point_by_point_no_weaker(ours, reference_success, n):
    """No point only the reference breaks (Square's random draws differ: one is tolerated per 50 points),
    and never a higher robust count."""
    only_reference = int((reference_success & ~ours.success).sum())
    assert only_reference <= n // 50, f"{only_reference} point(s) only the reference broke"
    assert int((~ours.success).sum()) <= int((~reference_success).sum())


def zoo_points(name: str, n: int):
    from robustbench_lite.data import load_dataset
    from robustbench_lite.zoo import load_model

    data = load_dataset("mnist5k", "test")
    return load_model(name), data.x[:n], data.y[:n]


CASCADE_CASES = {  # (model, threat, points): one model built here, two from the zoo
    "digits-mlp-Linf": ("built", ThreatModel("Linf", 0.1), 40),
    "digits-mlp-L2": ("built", ThreatModel("L2", 0.5), 40),
    "pgd-at-Linf": ("mnist5k-cnn-pgd-at", ThreatModel("Linf", 0.3), 12),
    "trades-Linf": ("mnist5k-cnn-trades", ThreatModel("Linf", 0.3), 12),
}


def cascade_case(case: str, scale: int = 1):
    source, threat, n = CASCADE_CASES[case]
    if source == "built":
        model = trained_mlp()
        x, y = held_out(n=n)
        return model, x, y, threat
    return (*zoo_points(source, n * scale), threat)


@pytest.mark.parametrize("case", list(CASCADE_CASES))
def test_standard_suite_point_by_point_against_the_reference_at_a_cut_budget(case):
    """The fast version: both cascades with 20 iterations and 300 Square queries, on the same points."""
    model, x, y, threat = cascade_case(case)
    ours = AutoAttack(steps=20, square_queries=300)(model, x, y, threat)
    assert_point_by_point_no_weaker(ours, reference_cascade_success(model, x, y, threat, 20, 300), x.shape[0])
    after = ours.flags["robust_after"]
    assert 0 < after["square"] < after["clean"], "pick points where the comparison means something"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASCADE_CASES))
def test_standard_suite_point_by_point_against_autoattack_ref(case):
    """The deep version: the full standard budget against ``autoattack-ref``, 100 zoo points."""
    model, x, y, threat = cascade_case(case, scale=9)
    ours = AutoAttack()(model, x, y, threat)
    reference = AutoAttackRef()(model, x, y, threat)
    assert_point_by_point_no_weaker(ours, reference.success, x.shape[0])


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


def test_reference_warnings_are_relogged_and_counted_not_printed(capsys, caplog):
    model = torch.nn.Sequential(trained_mlp(), torch.nn.Softmax(dim=1))  # the reference warns on probabilities
    x, y = held_out(n=8)
    with caplog.at_level("WARNING", logger="attacks.ensemble"):
        result = AutoAttackRef()(model, x, y, ThreatModel("L2", 2.0))
    assert result.flags["reference_warnings"] >= 1
    assert any("probability" in r.getMessage() for r in caplog.records if r.name == "attacks.ensemble")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
