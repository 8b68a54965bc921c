"""White-box attacks: closed forms, loss signs, traps peers fell into, flags for broken gradients."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from attacks import APGD, APGDT, FAB, FABT, FGSM, FMN, FMNT, PGD, AutoAttack
from attacks.apgd import checkpoint_schedule
from attacks.losses import ce_loss, cw_margin_loss, dlr_loss, get_loss, loss_and_grad
from digits_model import held_out, trained_mlp
from robustbench_lite.threat import ThreatModel

LINF, L2 = ThreatModel("Linf", 0.1), ThreatModel("L2", 1.0)


# --- minimum norm: a linear model whose minimal perturbation is known in closed form ---------------
def linear_problem(seed: int, d: int = 32):
    """Two-class linear model, points in the middle of the box so the box never binds."""
    torch.manual_seed(seed)
    lin = nn.Linear(d, 2).double()  # float64: the closed form is compared to 1e-6
    x = 0.45 + 0.1 * torch.rand(8, d, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.mul_(0.3)
        diff = lin(x)[:, 1] - lin(x)[:, 0]
        lin.bias += torch.tensor([1.0, -1.0]) * diff.mean() / 2
        y = lin(x).argmax(dim=1)
        w = lin.weight[1] - lin.weight[0]
        gap = (x @ w + lin.bias[1] - lin.bias[0]).abs()
    return lin, x, y, w, gap


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["Linf", "L2"]))
def test_fmn_finds_the_closed_form_minimal_perturbation(seed, norm):
    lin, x, y, w, gap = linear_problem(seed)
    dual = 1 if norm == "Linf" else 2
    minimal = gap / w.norm(p=dual)
    # the box must not bind: the minimal perturbation moves no coordinate by more than 0.45
    step = minimal * (1 if norm == "Linf" else w.abs().max() / w.norm())
    assert float(step.max()) < 0.45
    result = FMN(steps=200)(lin, x, y, ThreatModel(norm, 10.0))
    ratio = result.distance / minimal
    assert bool((ratio >= 1 - 1e-6).all()), "found a perturbation smaller than the minimum: distance is wrong"
    assert bool((ratio <= 1.01).all()), f"FMN is {float(ratio.max()):.4f}x the minimal norm"
    assert bool(result.success.all())
    assert torch.allclose(ThreatModel(norm, 10.0).distance(result.x_adv, x), result.distance, rtol=1e-5)


def test_fmn_distance_is_inf_where_nothing_found_and_zero_where_already_wrong():
    lin, x, y, w, gap = linear_problem(0)
    result = FMN(steps=1)(lin, x, 1 - y, ThreatModel("L2", 0.5))
    assert torch.equal(result.distance, torch.zeros(8, dtype=torch.float64))
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 3)).double()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    result = FMN(steps=5)(model, x, torch.zeros(8, dtype=torch.int64), ThreatModel("Linf", 0.5))
    assert bool(torch.isinf(result.distance).all()) and not bool(result.success.any())
    assert result.flags.get("zero_gradient") == 8


def test_fmn_t_distance_is_no_larger_than_untargeted_on_a_trained_model():
    model = trained_mlp()
    x, y = held_out(n=16)
    untargeted = FMN(steps=100)(model, x, y, L2)
    targeted = FMNT(steps=100, n_target_classes=9)(model, x, y, L2)
    # per example: the best target includes the class the untargeted run crossed into (no slack allowed)
    assert bool((targeted.distance <= untargeted.distance * (1 + 1e-6)).all())
    assert bool(torch.isfinite(targeted.distance).all())


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_fmn_t_finds_the_closed_form_minimal_perturbation_of_a_four_class_linear_model(norm):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    x = 0.45 + 0.1 * torch.rand(8, 12, dtype=torch.float64)
    with torch.no_grad():  # classes close to each other around the box's centre: short distances
        model[1].weight.mul_(0.5)
        model[1].bias.copy_(-model[1].weight @ torch.full((12,), 0.5, dtype=torch.float64)
                            + 0.1 * torch.randn(4, dtype=torch.float64))
        logits = model(x)
        y = logits.argmax(1)
        w = model[1].weight
        diff = w[y][:, None, :] - w[None, :, :]  # (N, K, D): w_y - w_j
        gap = logits.gather(1, y[:, None]) - logits
        dual = diff.norm(p=1 if norm == "Linf" else 2, dim=2)
        per_class = torch.where(gap > 0, gap / dual, torch.full_like(gap, math.inf))
        exact, j = per_class.min(1)
        # the box [0, 1] does not bind: the minimal perturbation moves no coordinate by more than 0.45
        d = diff[torch.arange(8), j]
        step = exact * (1 if norm == "Linf" else d.abs().amax(1) / d.norm(dim=1))
    assert float(step.max()) < 0.45
    result = FMNT(steps=200, n_target_classes=3)(model, x, y, ThreatModel(norm, 10.0))
    ratio = result.distance / exact
    assert bool((ratio >= 1 - 1e-6).all()) and bool((ratio <= 1.01).all()), ratio


# --- losses: correct for any sign of the logits ---------------------------------------------------
def test_losses_on_all_negative_logits_by_hand():
    z = torch.tensor([[-5.0, -3.0, -4.0, -10.0]])
    y, t = torch.tensor([1]), torch.tensor([2])
    assert cw_margin_loss(z, y).item() == pytest.approx(-1.0)          # max_other - z_y = -4 - (-3)
    assert cw_margin_loss(z, y, t).item() == pytest.approx(-1.0)       # z_t - max_{j!=t} = -4 - (-3)
    assert dlr_loss(z, y).item() == pytest.approx(-1.0 / 2.0)          # / (z_pi1 - z_pi3) = -3 - -5
    assert dlr_loss(z, y, t).item() == pytest.approx(-1.0 / 4.5)       # / (-3 - (-5 - 10) / 2)
    assert ce_loss(z, y).item() == pytest.approx(torch.nn.functional.cross_entropy(z, y).item())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-1e3, 1e3), classes=st.integers(2, 12))
def test_losses_are_shift_invariant_and_finite(seed, shift, classes):
    torch.manual_seed(seed)
    z = torch.randn(5, classes, dtype=torch.float64) * 3
    y = torch.randint(0, classes, (5,))
    t = (y + 1) % classes
    for loss in (cw_margin_loss, dlr_loss, ce_loss):
        for target in (None, t):
            a, b = loss(z, y, target), loss(z + shift, y, target)
            assert bool(torch.isfinite(a).all())
            assert torch.allclose(a, b, atol=1e-6 * (1 + abs(shift)))


class Shifted(nn.Module):
    def __init__(self, model: nn.Module, shift: float) -> None:
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, x):
        return self.model(x) + self.shift


@pytest.mark.parametrize("attack", [APGD(loss="dlr", steps=30), APGDT(steps=30, n_target_classes=3),
                                    PGD(loss="margin", steps=20), FMN(steps=30)], ids=lambda a: a.name)
def test_attacks_are_as_strong_on_all_negative_logits(attack):
    model = trained_mlp()
    x, y = held_out(n=30)
    shifted = Shifted(model, -60.0)
    with torch.no_grad():
        assert bool((shifted(x) < 0).all())
    plain, negative = attack(model, x, y, LINF), attack(shifted, x, y, LINF)
    assert abs(int(plain.success.sum()) - int(negative.success.sum())) <= 1


# --- targeted mode moves TOWARD the target -------------------------------------------------------
@pytest.mark.parametrize("attack", [FGSM(), PGD(steps=20, abs_stepsize=0.03), APGD(steps=30), APGD(loss="dlr", steps=30),
                                    FMN(steps=50)], ids=lambda a: f"{a.name}-{getattr(a, 'loss', '')}")
def test_targeted_attacks_move_toward_the_target(attack):
    model = trained_mlp()
    x, y = held_out(n=30)
    with torch.no_grad():
        clean = model(x)
    target = clean.argmin(dim=1)  # the least likely class: hardest, and never the label
    result = attack(model, x, y, ThreatModel("Linf", 0.3), target=target)
    with torch.no_grad():
        adv = model(result.x_adv)
    gain = cw_margin_loss(adv, y, target) - cw_margin_loss(clean, y, target)
    # FMN returns the clean point where it found nothing within eps: no gain there, but never a loss
    moved = result.success if isinstance(attack, FMN) else torch.ones_like(result.success)
    assert bool((gain[moved] > 0).all()) and bool((gain >= 0).all()), "a targeted attack moved away from its target"
    if not isinstance(attack, FGSM):
        assert float(result.success.float().mean()) >= 0.5


def test_fgsm_is_one_signed_step_of_size_eps():
    model = trained_mlp()
    x, y = held_out(n=20)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(xr), y, reduction="sum"), xr)
    expected = (x + 0.1 * grad.sign()).clamp(0, 1)
    result = FGSM()(model, x, y, LINF)
    broken_at_start = model(x).argmax(dim=1) != y
    assert not bool(broken_at_start.any())
    assert torch.allclose(result.x_adv, expected, atol=1e-7)
    assert result.forward == 2 * 20 and result.backward == 20


# --- strength ----------------------------------------------------------------------------------
@pytest.mark.parametrize("threat", [LINF, L2], ids=["Linf", "L2"])
def test_apgd_is_at_least_as_strong_as_pgd_and_the_reference_apgd(threat):
    from pyautoattack.autopgd_base import APGDAttack

    model = trained_mlp()
    x, y = held_out(n=40)
    pgd = PGD(steps=100, abs_stepsize=threat.eps / 10)(model, x, y, threat)
    apgd = APGD()(model, x, y, threat)
    reference = APGDAttack(model, n_iter=100, norm=threat.norm, eps=threat.eps, seed=0, loss="ce", device="cpu")
    ref_robust = int((model(reference.perturb(x, y)).argmax(dim=1) == y).sum())
    ours = int((~apgd.success).sum())
    assert ours <= int((~pgd.success).sum()) + 1
    assert ours <= ref_robust + 1
    assert ours < x.shape[0], "the attack should break some points at this eps"


def test_checkpoint_schedule_matches_the_paper():
    assert checkpoint_schedule(100) == (22, 3, 6)
    assert checkpoint_schedule(10) == (2, 1, 1)


def test_broken_points_stop_costing_passes():
    model = trained_mlp()
    x, y = held_out(n=20)
    strong = APGD(steps=100)(model, x, y, ThreatModel("Linf", 0.5))  # every point breaks early
    assert bool(strong.success.all())
    assert strong.backward < 20 * 101 / 4


# --- fewer than 10 classes --------------------------------------------------------------------
@pytest.mark.parametrize("classes", [2, 3, 4])
def test_fewer_classes_adapt_the_number_of_targets(classes):
    model = trained_mlp(classes)
    x, y = held_out(classes, n=12)
    threat = ThreatModel("Linf", 0.2)
    apgdt = APGDT(steps=10)(model, x, y, threat)
    # clean logits once, then 11 gradient passes per (example, target) row at most
    assert apgdt.backward <= 12 * (classes - 1) * 11
    assert APGD(loss="dlr", steps=10)(model, x, y, threat).success.shape == (12,)
    fmnt = FMNT(steps=10)(model, x, y, threat)
    assert fmnt.distance.shape == (12,)
    assert FABT(steps=10)(model, x, y, threat).distance.shape == (12,)
    suite = AutoAttack(steps=10, square_queries=50)(model, x, y, threat)
    pgd = PGD(steps=10)(model, x, y, threat)
    assert int(suite.success.sum()) >= int(pgd.success.sum())


# --- zero and NaN gradients are flagged, never read as robustness ---------------------------------
class ConstantLogits(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :3] * 0.0 + torch.tensor([2.0, 1.0, 0.0])


class NanGradient(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 3)

    def forward(self, x):
        flat = x.flatten(1)
        return self.linear(flat) + 0.0 * torch.sqrt(flat - flat).sum(dim=1, keepdim=True)


GRADIENT_ATTACKS = [FGSM(), PGD(steps=3), APGD(steps=5), APGDT(steps=5, n_target_classes=2), FMN(steps=3),
                    FMNT(steps=3, n_target_classes=2), FAB(steps=3), FABT(steps=3, n_target_classes=2)]


@pytest.mark.parametrize("attack", GRADIENT_ATTACKS, ids=lambda a: a.name)
def test_zero_gradients_are_flagged(attack):
    x = torch.rand(5, 1, 8, 8)
    y = torch.zeros(5, dtype=torch.int64)
    result = attack(ConstantLogits(), x, y, LINF)
    assert result.flags.get("zero_gradient") == 5
    assert not bool(result.success.any())


@pytest.mark.parametrize("attack", GRADIENT_ATTACKS, ids=lambda a: a.name)
def test_nan_gradients_are_flagged_and_do_not_poison_the_point(attack):
    torch.manual_seed(0)
    model = NanGradient()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    result = attack(model, x, y, LINF)
    assert result.flags.get("nan_gradient") == 5
    assert bool(torch.isfinite(result.x_adv).all())


def test_autoattack_sums_gradient_flags():
    x = torch.rand(4, 1, 8, 8)
    result = AutoAttack(steps=5, square_queries=20)(ConstantLogits(), x, torch.zeros(4, dtype=torch.int64), LINF)
    assert result.flags["zero_gradient"] >= 4


# --- EOT -----------------------------------------------------------------------------------------
def test_eot_on_a_deterministic_model_changes_nothing_but_the_cost():
    model = trained_mlp()
    x, y = held_out(n=10)
    once = PGD(steps=5, random_start=False)(model, x, y, LINF)
    four = PGD(steps=5, random_start=False, eot_iter=4)(model, x, y, LINF)
    assert torch.equal(once.x_adv, four.x_adv)
    assert four.backward == 4 * once.backward


class NoisyInput(nn.Module):
    """A randomized defense: Gaussian noise on the input before a fixed classifier."""

    def __init__(self, model: nn.Module, std: float) -> None:
        super().__init__()
        self.model, self.std = model, std

    def forward(self, x):
        return self.model(x + self.std * torch.randn_like(x))


class CyclingScale(nn.Module):
    """A randomized model whose draws are known: logits = s * (W x + b), s cycling through SCALES per call."""

    SCALES = (2.0, 1.0, -0.5, 0.5, -1.0)

    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin, self.calls = lin, 0

    def forward(self, x):
        s = self.SCALES[self.calls % len(self.SCALES)]
        self.calls += 1
        return s * self.lin(x.flatten(1))


def test_eot_gradient_is_the_mean_of_the_per_draw_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4).double()
    x, y = 0.2 + 0.6 * torch.rand(6, 16, dtype=torch.float64), torch.arange(6) % 4
    model = CyclingScale(lin)
    _, _, eot = loss_and_grad(model, x, y, None, get_loss("ce"), eot_iter=5)
    draws = []
    for s in CyclingScale.SCALES:
        xs = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(ce_loss(s * lin(xs), y, None).sum(), xs)
        draws.append(grad)
    mean = torch.stack(draws).mean(0)
    assert torch.allclose(eot, mean, rtol=0, atol=1e-12)
    assert not torch.allclose(eot, draws[-1]) and not torch.allclose(eot, draws[0])  # not one draw's
    # and PGD steps along it: a full cycle's mean does not depend on which draw a step starts at
    eps = 0.05
    result = PGD(steps=1, random_start=False, eot_iter=5, abs_stepsize=eps, early_stop=False)(
        model, x, y, ThreatModel("Linf", eps))
    assert torch.equal(result.x_adv, (x + eps * mean.sign()).clamp(0, 1))
    assert result.backward == 5 * 6


def test_eot_averages_gradients_of_a_randomized_model():
    torch.manual_seed(0)
    model = NoisyInput(trained_mlp(), std=0.3)
    x, y = held_out(n=8)
    result = APGD(steps=3, eot_iter=5)(model, x, y, LINF)
    # every step costs eot_iter passes per running example: start + 3 steps
    assert result.backward % 5 == 0 and result.backward <= 8 * 4 * 5
    assert math.isfinite(float(result.x_adv.sum()))
