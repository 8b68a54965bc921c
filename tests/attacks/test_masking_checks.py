"""The attack-based masking checks added to robustbench_lite/evaluation/checks.py: each fires on its trap only."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from attacks import PGD
from attacks.square import Square
from digits_model import held_out, trained_mlp
from robustbench_lite.evaluation import checks
from robustbench_lite.evaluation.checks import CheckContext
from robustbench_lite.threat import ThreatModel

LINF = ThreatModel("Linf", 0.3)


def context(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **extras) -> CheckContext:
    with torch.no_grad():
        logits = model(x)
    return CheckContext(model=model, x=x, y=y, indices=torch.arange(x.shape[0]), clean_logits=logits,
                        x_worst=x.clone(), robust=torch.ones(x.shape[0], dtype=torch.bool), batch_size=8,
                        extras={"threat": LINF, "seeds": torch.arange(x.shape[0]), **extras})


def test_black_box_only_from_the_cascade_flag_and_from_separate_attacks():
    model = trained_mlp()
    x, y = held_out(n=6)
    assert checks.check_black_box_only(context(model, x, y)) is None
    ctx = context(model, x, y)
    ctx.attack_flags = {"autoattack": {"square_only": 2, "robust_after.clean": 6}}
    assert checks.check_black_box_only(ctx)["values"]["examples"] == 2
    white = torch.tensor([True, False, False, False, False, False])
    black = torch.tensor([False, True, True, False, False, False])
    result = SimpleNamespace(mode="cascade", attack_success={"pgd": white, "square": black})
    ctx = context(model, x, y, result=result, attacks={"pgd": PGD(), "square": Square()})
    assert checks.check_black_box_only(ctx)["values"]["examples"] == 2
    # black-box first in a cascade: the white-box attacks never saw those points, no evidence
    ctx = context(model, x, y, result=result, attacks={"square": Square(), "pgd": PGD()})
    assert checks.check_black_box_only(ctx) is None


def test_a_healthy_trained_model_passes_the_attack_checks():
    model = trained_mlp()
    x, y = held_out(n=20)
    ctx = context(model, x, y)
    assert checks.check_large_eps(ctx) is None
    assert checks.check_more_iterations(ctx) is None


class ConstantLogits(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :2] * 0.0 + torch.tensor([1.0, 0.0])


def test_large_eps_not_broken_flags_a_model_no_eps_can_move():
    x = torch.rand(5, 1, 8, 8)
    flag = checks.check_large_eps(context(ConstantLogits(), x, torch.zeros(5, dtype=torch.int64)))
    assert flag["name"] == "large_eps_not_broken" and flag["values"]["survivors"] == 5
    assert flag["values"]["eps"] == 1.0


class TurnsRobust(nn.Module):
    """Breakable (class = mean(x) > 0.5) for its first ``calls`` forwards, then constant class 0."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls, self.seen = calls, 0

    def forward(self, x):
        self.seen += 1
        mean = x.flatten(1).mean(dim=1, keepdim=True)
        if self.seen > self.calls:
            return torch.cat([torch.ones_like(mean), torch.zeros_like(mean)], dim=1) + 0 * mean
        return 10 * torch.cat([0.5 - mean, mean - 0.5], dim=1)


def test_more_iterations_weaker_flags_an_unstable_model():
    x = 0.3 + 0.2 * torch.rand(6, 1, 8, 8)  # class 0 (mean < 0.5), one eps away from class 1
    model = TurnsRobust(calls=12)
    ctx = context(model, x, torch.zeros(6, dtype=torch.int64))
    model.seen = 0  # the clean pass above does not count
    flag = checks.check_more_iterations(ctx)
    assert flag["name"] == "more_iterations_weaker"
    assert flag["values"]["robust_10_steps"] < flag["values"]["robust_50_steps"]
