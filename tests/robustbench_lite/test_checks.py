"""checks.py: each check fires on the trap it names, stays quiet otherwise, and never changes numbers."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustbench_lite.evaluation import checks
from robustbench_lite.evaluation.checks import CheckContext, make_flag, run_checks, second_batch_size


def context(model: nn.Module, n: int = 10, **overrides) -> CheckContext:
    torch.manual_seed(0)
    x = torch.rand(n, 1, 2, 2)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    fields = dict(model=model, x=x, y=y, indices=torch.arange(n), clean_logits=logits, x_worst=x.clone(),
                  robust=torch.ones(n, dtype=torch.bool), batch_size=4)
    fields.update(overrides)
    return CheckContext(**fields)


def linear() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()


def test_a_healthy_model_raises_no_flag():
    ctx = context(linear())
    assert run_checks(ctx) == []


def test_train_mode():
    flag = checks.check_train_mode(context(linear(), model_was_training=True))
    assert flag["name"] == "train_mode" and flag["severity"] == "warning" and flag["values"]["model_was_training"] == 1
    assert checks.check_train_mode(context(linear())) is None


def test_randomized_outputs():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = linear()

        def forward(self, x):
            return self.inner(x) + torch.randn(x.shape[0], 3)

    flag = checks.check_randomized(context(Noisy()))
    assert flag["name"] == "randomized_outputs" and flag["values"]["max_abs_difference"] > 0
    assert checks.check_randomized(context(linear())) is None


def test_probability_outputs():
    probs = nn.Sequential(linear(), nn.Softmax(dim=1))
    assert checks.check_probabilities(context(probs))["name"] == "probability_outputs"
    # logits that happen to lie in [0, 1] but do not sum to 1 are logits
    squashed = nn.Sequential(linear(), nn.Sigmoid())
    assert checks.check_probabilities(context(squashed)) is None


def test_zero_gradients_are_summed_per_attack():
    ctx = context(linear(), attack_flags={"pgd": {"zero_gradient": 3}, "fgsm": {}, "apgd": {"nan_gradient": 1}})
    flag = checks.check_zero_gradients(ctx)
    assert flag["values"] == {"examples_pgd": 3, "examples_apgd": 1}
    assert checks.check_zero_gradients(context(linear(), attack_flags={"pgd": {}})) is None


def test_rescoring_mismatch_is_an_error_and_reports_indices():
    ctx = context(linear())
    robust = torch.ones(10, dtype=torch.bool)
    robust[[2, 7]] = False  # reported as broken, but x_worst is the clean (correct) input
    ctx.robust = robust
    flag = checks.check_rescoring(ctx)
    assert flag["name"] == "rescoring_mismatch" and flag["severity"] == "error"
    assert flag["values"]["indices"] == [2, 7] and flag["values"]["examples"] == 2
    assert checks.has_errors([flag])


def test_rescoring_tie_is_only_counted():
    class Tied(nn.Module):  # every example sits exactly on the boundary between classes 0 and 1
        def forward(self, x):
            s = x.flatten(1).sum(1, keepdim=True)
            return torch.cat([s, s, s - 1], dim=1)

    ctx = context(Tied())
    ctx.y = torch.ones(10, dtype=torch.int64)  # argmax picks class 0: misclassified, but only by a tie
    flag = checks.check_rescoring(ctx)
    assert flag["name"] == "rescoring_ties" and flag["severity"] == "warning"


def test_checks_do_not_change_numbers_or_mode():
    model = linear()
    ctx = context(model, model_was_training=True)
    before = (ctx.robust.clone(), ctx.clean_logits.clone(), ctx.x_worst.clone())
    run_checks(ctx)
    assert torch.equal(before[0], ctx.robust) and torch.equal(before[1], ctx.clean_logits)
    assert torch.equal(before[2], ctx.x_worst) and not model.training


def test_a_check_is_one_function_in_a_list():
    def always(ctx: CheckContext):
        return make_flag("custom", "a user check", n=len(ctx.y))

    flags = run_checks(context(linear()), checks=[always])
    assert flags == [{"name": "custom", "severity": "warning", "explanation": "a user check", "values": {"n": 10}}]
    assert checks.CHECKS[-1] is checks.check_rescoring


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 600), st.integers(1, 2000))
def test_second_batch_size_differs(batch_size: int, n: int):
    other = second_batch_size(batch_size, n)
    assert other >= 1
    if min(batch_size, n) > 1:
        assert other != batch_size and other < max(batch_size, n) + 1


@pytest.mark.parametrize("n", [1, 2])
def test_second_batch_size_tiny(n):
    assert second_batch_size(1, n) == 2
