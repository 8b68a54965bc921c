"""What the faster, stronger cascade changed: Square's mask-built Linf windows, its unscaled p-schedule
(AutoAttack standard), its warm start, APGD-T's highest-margin pick and the cascade's margin bookkeeping."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attacks import APGDT, AutoAttack, Square
from attacks.base import QueryOracle, margin_loss
from attacks.square import NOISE_BLOCK, get_window, p_fraction, positions, signs, window_index
from digits_model import held_out, trained_mlp
from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import ExampleRNG, example_seeds
from robustbench_lite.threat import ThreatModel
from test_blackbox import Counting


def indexed_linf_step(images, best, u, p, threat):
    """The window step written the straightforward way (gather the window, set it to the corner
    ``x +- eps`` clipped to the box, scatter it back), as the reference's Linf sampler does."""
    n, c, h, w = images.shape
    eps, (lo, hi) = threat.eps, threat.box
    s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
    index = window_index(positions(u[:, 0], h, s), positions(u[:, 1], w, s), s)
    clean = get_window(images, index)
    lower, upper = (clean - eps).clamp_min(lo), (clean + eps).clamp_max(hi)
    current = get_window(best, index)
    sign = signs(u[:, 2:2 + c])[:, :, None, None].expand_as(current)
    window = torch.where(sign > 0, upper, lower)
    unchanged = (window == current).flatten(1).all(dim=1)
    flipped = torch.where(sign > 0, lower, upper)
    window = torch.where(unchanged[:, None, None, None], flipped, window)
    out = best.clone()
    batch, rows, cols = index
    out[batch, :, rows, cols] = window.permute(0, 2, 3, 1)
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       eps=st.sampled_from([0.05, 0.3, 0.7]))
def test_mask_window_step_equals_the_indexed_window_step(seed, c, h, w, eps):
    g = torch.Generator().manual_seed(seed)
    n = 5
    threat = ThreatModel("Linf", eps)
    images = torch.rand(n, c, h, w, generator=g)
    best = threat.project(images + eps * torch.sign(torch.randn(n, c, h, w, generator=g)), images)
    u = torch.rand(n, NOISE_BLOCK, 2 + c, generator=g)
    p_at = [p_fraction(it, 300, 0.8, rescale=False) for it in range(NOISE_BLOCK)]
    plan = Square._linf_plan(u, p_at, images.shape, eps)
    bounds = ((images - eps).clamp_min(0.0), (images + eps).clamp_max(1.0))
    for k in (0, 7, 60, NOISE_BLOCK - 1):
        mine = Square._linf_step(bounds, best, plan, k)
        assert torch.equal(mine, indexed_linf_step(images, best, u[:, k], p_at[k], threat))
        assert bool(threat.contains(mine, images).all())


def test_unscaled_schedule_is_the_reference_standard_squares():
    from pyautoattack.square import SquareAttack

    reference = SquareAttack(lambda z: z, n_queries=5000, p_init=0.8, eps=0.3, resc_schedule=False, device="cpu")
    assert all(p_fraction(it, 5000, 0.8, rescale=False) == reference.p_selection(it) for it in range(0, 5000, 3))
    # and AutoAttack's cascade uses it: its windows stay larger for longer than the paper's rescaled ones
    assert p_fraction(4000, 5000, 0.8, rescale=False) > p_fraction(4000, 5000, 0.8)


def test_square_warm_start_counts_its_query_and_keeps_the_budget():
    model = trained_mlp()
    x, y = held_out(n=12)
    threat = ThreatModel("Linf", 0.1)
    budget = 60
    seeds = example_seeds(0, range(12))
    plain = Square(n_queries=budget)
    oracle = QueryOracle(model)
    cold = plain.run(oracle, x, y, threat, ExampleRNG(seeds), None)
    cold_queries = oracle.queries
    oracle = QueryOracle(model)
    warm = plain.run(oracle, x, y, threat, ExampleRNG(seeds), None, start=cold.x_adv)
    assert oracle.queries <= budget * 12
    # starting from the end of a cold run, nothing the cold run broke is lost
    assert bool(warm.success[cold.success].all())
    assert cold_queries <= budget * 12
    with torch.no_grad():
        assert torch.equal(warm.success, model(warm.x_adv).argmax(dim=1) != y)


def test_square_warm_start_that_already_fools_costs_two_queries_after_the_clean_one():
    model = trained_mlp()
    x, y = held_out(n=40)
    threat = ThreatModel("Linf", 0.3)
    from attacks import PGD

    broken = PGD(steps=20)(model, x, y, threat)
    assert bool(broken.success.any())
    oracle = QueryOracle(model)
    result = Square(n_queries=500).run(oracle, x, y, threat, ExampleRNG(example_seeds(0, range(40))), None,
                                       start=broken.x_adv)
    assert bool(result.success[broken.success].all())
    with torch.no_grad():
        clean_wrong = model(x).argmax(dim=1) != y
    fresh = broken.success & ~clean_wrong
    assert fresh.any()
    assert result.flags["median_queries_successful"] <= 3 or not bool((~broken.success).any())


def test_square_start_option_is_checked_and_named():
    with pytest.raises(UserInputError):
        AutoAttack(square_start="clean")
    assert "stripes" in AutoAttack(square_start="best").config()["square_start_note"]
    assert "square_start_note" not in AutoAttack().config()
    assert AutoAttack().config()["suite"] == "autoattack-standard"  # the name of the default suite (whose settings
    # test_autoattack.test_defaults_are_the_reference_standard_settings reads from the reference itself)
    assert AutoAttack(square_start="best").config()["suite"] == "custom"  # a warm start is not the reference's


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
def test_cascade_returns_its_highest_margin_point_and_never_loses_a_success(norm, eps):
    model = trained_mlp()
    x, y = held_out(n=30)
    threat = ThreatModel(norm, eps)
    result = AutoAttack(steps=10, square_queries=50)(model, x, y, threat)
    assert bool(threat.contains(result.x_adv, x).all())
    with torch.no_grad():
        clean, adv = model(x), model(result.x_adv)
    assert torch.equal(result.success, adv.argmax(dim=1) != y)
    survived = ~result.success
    assert survived.any() and result.success.any(), "pick an eps where both happen"
    # robust points come back at a margin no lower than the clean one (the Square warm start's source)
    assert bool((margin_loss(adv, y)[survived] >= margin_loss(clean, y)[survived]).all())
    assert bool((margin_loss(adv, y)[survived] > margin_loss(clean, y)[survived]).any())


class RowLinear(torch.nn.Module):
    """``W x + b`` as an elementwise product and a row sum: a row's logits never depend on its batch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1)[:, None, :] * self.weight[None]).sum(-1) + self.bias


def test_apgdt_returns_the_highest_margin_target_where_none_succeeds():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 16, generator=g)
    model = RowLinear(weight, -0.5 * weight.sum(dim=1))
    x = 0.25 + 0.5 * torch.rand(40, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    threat = ThreatModel("Linf", 0.01)
    many = APGDT(steps=10, n_target_classes=5)(model, x, y, threat)
    one = APGDT(steps=10, n_target_classes=1)(model, x, y, threat)  # the same run as target 0 of the five
    missed = ~many.success & ~one.success
    assert missed.sum() >= 10
    with torch.no_grad():
        m_many = margin_loss(model(many.x_adv), y)[missed]
        m_one = margin_loss(model(one.x_adv), y)[missed]
    assert bool((m_many >= m_one).all())  # the top target's point is one of the candidates
    assert bool((m_many > m_one).any())   # and another target's point is picked where it is higher


def test_input_gradient_is_the_plain_gradient_whichever_kernel_it_takes():
    from attacks import losses
    from robustbench_lite.zoo.architectures import mnist_cnn

    torch.manual_seed(0)
    model = mnist_cnn().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(6, 1, 28, 28)
    y = torch.arange(6) % 10
    xr = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(losses.ce_loss(model(xr), y).sum(), xr)
    enabled = torch.backends.mkldnn.enabled
    assert losses.native_backward_is_faster(model)  # 16 and 32 channels: narrow
    wide = torch.nn.Sequential(torch.nn.Conv2d(1, 128, 3), torch.nn.Flatten())
    assert not losses.native_backward_is_faster(wide) and not losses.native_backward_is_faster(torch.nn.Linear(2, 2))
    first = None
    for _ in range(3):
        _, _, grad = losses.loss_and_grad(model, x, y, None, losses.ce_loss)
        assert torch.allclose(grad, plain, atol=1e-6, rtol=1e-5)
        assert torch.backends.mkldnn.enabled == enabled  # the global switch always comes back
        first = grad if first is None else first
        assert torch.equal(grad, first)  # a fixed kernel: the same bits every call


@pytest.mark.parametrize("square_start", ["best", "stripes"])
def test_cascade_square_queries_are_counted_exactly_with_either_start(square_start):
    model = trained_mlp()
    x, y = held_out(n=20)
    counting = Counting(model)
    budget = 40
    result = AutoAttack(stages=["apgd-ce", "square"], steps=3, square_queries=budget,
                        square_start=square_start)(counting, x, y, ThreatModel("Linf", 0.05))
    after = result.flags["robust_after"]
    assert 0 < after["apgd-ce"] and result.queries <= budget * after["apgd-ce"]
    # clean pass, APGD-CE's passes, its re-score, Square's queries, Square's re-score, the final re-score
    apgd_forward = result.forward - 20 - result.queries - after["clean"] - after["apgd-ce"] - 20
    assert counting.rows == result.forward and apgd_forward > 0
    assert result.backward == apgd_forward  # one backward per APGD forward: none spent on anything else
