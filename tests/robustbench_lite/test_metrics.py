"""Metric definitions on hand-made cases (docs/metrics.md), and the WRM certificate's soundness."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from robustbench_lite.errors import UserInputError
from robustbench_lite.metrics import (
    confidence_scores,
    group_accuracies,
    mean_corruption_accuracy,
    measured_adversarial_loss,
    selective_accuracy,
    selective_curves,
    worst_group_accuracy,
    wrm_certificate,
    wrm_report,
)


def test_worst_group_accuracy_by_hand():
    # group 0: 3/4 right, group 1: 1/2 right, group 3: 2/2 right, group 2 absent
    correct = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 3, 3])
    out = worst_group_accuracy(correct, groups)
    assert out["group_acc"] == {0: 0.75, 1: 0.5, 3: 1.0}
    assert out["worst_group_acc"] == 0.5 and out["worst_group"] == 1
    assert out["avg_acc"] == 6 / 8
    assert out["metric"] == "worst_group_acc"


def test_worst_group_is_not_the_average():
    # a majority group hides a minority group the model always gets wrong
    correct = torch.tensor([True] * 9 + [False])
    groups = torch.tensor([0] * 9 + [1])
    out = worst_group_accuracy(correct, groups)
    assert out["avg_acc"] == 0.9 and out["worst_group_acc"] == 0.0


def test_group_metrics_check_their_inputs():
    with pytest.raises(UserInputError, match="same length"):
        group_accuracies(torch.ones(3, dtype=torch.bool), torch.zeros(2, dtype=torch.long))
    with pytest.raises(UserInputError, match="at least one"):
        worst_group_accuracy(torch.ones(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))


def test_mean_corruption_accuracy_weighs_corruptions_equally():
    acc = {"a": [1.0, 1.0, 1.0, 1.0, 1.0], "b": [0.5, 0.5, 0.0, 0.0, 0.0], "c": [0.3]}
    assert mean_corruption_accuracy(acc) == pytest.approx((1.0 + 0.2 + 0.3) / 3)
    with pytest.raises(UserInputError):
        mean_corruption_accuracy({})
    with pytest.raises(UserInputError):
        mean_corruption_accuracy({"a": []})


def _linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    return model


def test_wrm_phi_for_a_constant_model_is_the_loss():
    # a model whose logits ignore x: phi = loss(x) exactly, x* = x
    model = _linear_model(torch.zeros(3, 4), torch.tensor([1.0, 0.0, -1.0]))
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    out = wrm_certificate(model, x, y, gamma=1.0, rho=[0.0, 0.5])
    loss = nn.functional.cross_entropy(model(x), y).item()
    assert out["mean_phi"] == pytest.approx(float(loss), abs=1e-6)
    assert out["certificate"] == pytest.approx([float(loss), float(loss) + 0.5], abs=1e-6)


def _elu_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ELU(), nn.Linear(8, 3))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), gamma_adv_factor=st.sampled_from([1.0, 0.5, 0.25]))
def test_wrm_certificate_bounds_the_loss_of_an_independent_attack(seed, gamma_adv_factor):
    # soundness: for gamma above the loss's smoothness the inner problem is concave, so
    # gamma * rho_test + E[phi estimate + Frank-Wolfe gap] >= E[loss(x')] for any points whose mean cost is
    # rho_test, here those of an attack from random starts (not phi's maximisers): no tolerance
    model = _elu_net(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    gamma = 5.0
    attack = measured_adversarial_loss(model, x, y, gamma_adv=gamma * gamma_adv_factor)
    cert = wrm_certificate(model, x, y, gamma=gamma, rho=attack["rho_test"])
    assert cert["ascent_grad_norm"] < 1e-3 and cert["phi_gap_bound"] < 1e-4  # the ascent converged
    assert cert["certificate_if_concave"][0] >= attack["loss"]
    assert attack["loss"] >= attack["clean_loss"]  # the attack only raises the loss


def test_wrm_certificate_says_how_far_a_short_ascent_is_from_phi():
    # one ascent step stops far from the maximiser: the independent attack finds more than the plain
    # certificate allows at gamma_adv = gamma (a comparison that is no longer a number against itself),
    # and the Frank-Wolfe gap covers the difference, as concavity guarantees
    model = _elu_net(3)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    report = wrm_report(model, x, y, gamma=5.0, gammas_adv=[5.0], steps=1, attack_steps=100)
    row = report["rows"][0]
    assert row["loss"] > row["certificate"]
    assert report["phi_shortfall"] > 0 and report["phi_gap_bound"] >= report["phi_shortfall"]
    assert row["bound_holds"] and row["certificate_if_concave"] >= row["loss"]
    full = wrm_report(model, x, y, gamma=5.0, gammas_adv=[5.0], steps=200)
    assert full["phi_shortfall"] < 1e-6 and full["phi_gap_bound"] < report["phi_gap_bound"]


class _TwoBumps(nn.Module):
    """1-D input in [0, 2]: logit 1 is a small narrow bump at 0.4 plus a tall one at 1.0, so maximising
    loss - gamma |x' - x|^2 from x = 0.4 (gamma 2) is not a concave problem: the ascent from x stays on the
    small bump (gradient 0, Frank-Wolfe gap 0), the global maximum is on the tall one."""

    def forward(self, x):
        x = x.flatten(1)[:, :1]
        z = 4 * torch.exp(-(x - 1.0) ** 2 / 0.1) + 0.5 * torch.exp(-(x - 0.4) ** 2 / 0.01)
        return torch.cat([torch.zeros_like(x), z], 1)


def test_wrm_bound_fails_where_the_inner_problem_is_not_concave():
    x, y = torch.full((4, 1), 0.4), torch.zeros(4, dtype=torch.long)
    report = wrm_report(_TwoBumps(), x, y, gamma=2.0, gammas_adv=[2.0], steps=100, box=(0.0, 2.0))
    row = report["rows"][0]
    assert report["ascent_grad_norm"] < 1e-6 and report["phi_gap_bound"] < 1e-6  # stuck on the small bump
    assert row["loss"] > row["certificate_if_concave"] and not report["bound_holds"]
    assert report["phi_shortfall"] > 1.0  # the attack's random starts found the tall bump


def test_wrm_report_rows_and_model_state():
    model = _elu_net(0).train()
    flags = [p.requires_grad for p in model.parameters()]
    x, y = torch.rand(8, 6), torch.randint(0, 3, (8,))
    report = wrm_report(model, x, y, gamma=5.0)
    assert [r["gamma_adv"] for r in report["rows"]] == [10.0, 5.0, 2.5, 1.25]
    rhos = [r["rho_test"] for r in report["rows"]]
    assert rhos == sorted(rhos)  # smaller penalty, larger ball
    assert report["bound_holds"] is True and report["restarts"] == 2
    assert all(r["certificate_if_concave"] == r["certificate"] + report["phi_gap_bound"] for r in report["rows"])
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


def test_wrm_metric_parameter_checks():
    model, x, y = _elu_net(0), torch.rand(2, 6), torch.tensor([0, 1])
    with pytest.raises(UserInputError, match="rho"):
        wrm_certificate(model, x, y, gamma=1.0, rho=-1.0)
    with pytest.raises(UserInputError, match="gamma"):
        measured_adversarial_loss(model, x, y, gamma_adv=0.0)
    with pytest.raises(UserInputError, match="restarts"):
        wrm_report(model, x, y, gamma=1.0, restarts=0)
    with pytest.raises(UserInputError, match="gammas_adv"):
        wrm_report(model, x, y, gamma=1.0, gammas_adv=[-1.0])


# --- selective classification (Jones et al. 2021) ---------------------------------------------------
# five examples by hand: scores with a tie at 0.8, two groups
HAND_SCORES = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1], dtype=torch.float64)
HAND_CORRECT = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
HAND_GROUPS = torch.tensor([0, 1, 0, 1, 1])


def test_selective_accuracy_by_hand():
    out = selective_accuracy(HAND_SCORES, HAND_CORRECT, HAND_GROUPS, [1.0, 0.5, 0.2])
    # thresholds 0.9 / 0.8 / 0.3 / 0.1 cover 1 / 3 / 4 / 5 examples, of which 1 / 2 / 3 / 3 are right
    assert out["achieved_coverage"] == [1.0, 0.6, 0.2]  # 50 % needs 3 covered: the tie at 0.8 goes in whole
    assert out["threshold"] == [0.1, 0.8, 0.9]
    assert out["avg_acc"] == pytest.approx([3 / 5, 2 / 3, 1.0])
    assert out["group_acc"] == [[1.0, pytest.approx(1 / 3)], [1.0, 0.0], [1.0, None]]
    assert out["group_coverage"] == [[1.0, 1.0], [1.0, pytest.approx(1 / 3)], [0.5, 0.0]]
    assert out["worst_group_acc"] == [pytest.approx(1 / 3), 0.0, 1.0] and out["worst_group"] == [1, 1, 0]
    # area: steps of coverage 1/5, 2/5, 1/5, 1/5 at accuracies 1, 2/3, 3/4, 3/5
    assert out["auc"] == pytest.approx(1 / 5 + 2 / 5 * 2 / 3 + 1 / 5 * 3 / 4 + 1 / 5 * 3 / 5)
    # group 1 (3 examples): its coverage steps 1/3 at 0.8 (wrong), 1/3 at 0.3, 1/3 at 0.1
    assert out["group_auc"] == [1.0, pytest.approx(1 / 3 * 0 + 1 / 3 * 1 / 2 + 1 / 3 * 1 / 3)]
    assert out["worst_group_auc"] == pytest.approx(5 / 18)


def test_selective_curve_by_hand_and_without_groups():
    curve = selective_curves(HAND_SCORES, HAND_CORRECT, HAND_GROUPS)
    assert curve["coverage"] == [0.2, 0.6, 0.8, 1.0]
    assert curve["avg_acc"] == pytest.approx([1.0, 2 / 3, 3 / 4, 3 / 5])
    assert curve["group_acc"][1] == [None, 0.0, 0.5, pytest.approx(1 / 3)]
    plain = selective_accuracy(HAND_SCORES, HAND_CORRECT, coverages=[0.5])
    assert set(plain) == {"metric", "coverages", "achieved_coverage", "threshold", "avg_acc", "auc"}


def test_selective_accuracy_does_not_depend_on_example_order():
    order = torch.tensor([3, 0, 4, 2, 1])
    a = selective_accuracy(HAND_SCORES, HAND_CORRECT, HAND_GROUPS, [1.0, 0.8, 0.5, 0.2])
    b = selective_accuracy(HAND_SCORES[order], HAND_CORRECT[order], HAND_GROUPS[order], [1.0, 0.8, 0.5, 0.2])
    assert a == b


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans(), st.integers(0, 2)), min_size=1, max_size=30),
       st.sampled_from([1.0, 0.9, 0.7, 0.5, 0.1]))
def test_selective_accuracy_is_the_accuracy_of_the_covered_set(rows, coverage):
    scores = torch.tensor([float(s) for s, _, _ in rows])
    correct = torch.tensor([c for _, c, _ in rows])
    groups = torch.tensor([g for _, _, g in rows])
    out = selective_accuracy(scores, correct, groups, [coverage], num_groups=3)
    n = len(rows)
    tau = out["threshold"][0]
    covered = scores >= tau
    assert int(covered.sum()) >= coverage * n - 1e-9  # at least the target coverage
    assert (scores > tau).sum() < coverage * n - 1e-9 or tau == scores.max()  # and the highest such threshold
    assert out["avg_acc"][0] == pytest.approx(float(correct[covered].double().mean()))
    for g in range(3):
        members = covered & (groups == g)
        expected = float(correct[members].double().mean()) if members.any() else None
        assert out["group_acc"][0][g] == (None if expected is None else pytest.approx(expected))
    # the area is the mean accuracy of the k most confident examples when scores are distinct
    if len(set(scores.tolist())) == n:
        ranked = correct[torch.sort(scores, descending=True).indices].double()
        assert out["auc"] == pytest.approx(float((ranked.cumsum(0) / torch.arange(1, n + 1)).mean()))


def test_selective_area_of_a_perfect_group_is_exactly_one():
    # thirteen steps of 1/13 add up to 1.0000000000000002 in torch; a record's fraction must stay <= 1
    scores = torch.arange(13.0)
    out = selective_accuracy(scores, torch.ones(13, dtype=torch.bool), torch.zeros(13, dtype=torch.long))
    assert out["auc"] == 1.0 and out["group_auc"] == [1.0]


def test_selective_coverage_needs_no_float_luck():
    # 0.55 * 100 is 55.00000000000001 in floats: 55 % coverage must cover 55 examples, not 56
    out = selective_accuracy(torch.arange(100.0), torch.ones(100, dtype=torch.bool), coverages=[0.55])
    assert out["achieved_coverage"] == [0.55]


def test_confidence_scores_order_like_the_softmax_response_and_margin():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.4, 0.3], [60.0, 0.0, 0.0], [59.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    p = torch.softmax(logits.double(), 1).max(1).values
    score = confidence_scores(logits)
    finite = p < 1
    assert torch.allclose(score[finite], torch.log(p / (1 - p))[finite])
    assert score[2] > score[3]  # both have p_top == 1.0 in float64, the log-odds still order them
    assert torch.allclose(confidence_scores(logits, "margin"), torch.tensor([2.0, 0.1, 60.0, 59.0, 3.0]).double())
    two = torch.tensor([[1.0, -2.0], [0.0, 0.5]])
    assert torch.allclose(confidence_scores(two), confidence_scores(two, "margin"))  # two classes: the same


@pytest.mark.parametrize("call,message", [
    (lambda: selective_accuracy(torch.ones(3), torch.ones(2, dtype=torch.bool)), "one correct flag per score"),
    (lambda: selective_accuracy(torch.ones(0), torch.ones(0, dtype=torch.bool)), "at least one example"),
    (lambda: selective_accuracy(torch.ones(2), torch.ones(2, dtype=torch.bool), coverages=[0.0]), "coverages"),
    (lambda: selective_accuracy(torch.ones(2), torch.ones(2, dtype=torch.bool), coverages=[1.5]), "coverages"),
    (lambda: selective_accuracy(torch.tensor([1.0, float("nan")]), torch.ones(2, dtype=torch.bool)), "finite"),
    (lambda: selective_accuracy(torch.ones(2), torch.ones(2, dtype=torch.bool), torch.tensor([0, 3]), num_groups=2),
     "groups must be"),
    (lambda: confidence_scores(torch.ones(3, 4), "entropy"), "unknown confidence score"),
    (lambda: confidence_scores(torch.ones(3, 1)), "K >= 2"),
])
def test_selective_metrics_check_their_inputs(call, message):
    with pytest.raises(UserInputError, match=message):
        call()
