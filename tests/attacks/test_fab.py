"""FAB and FAB-T (Croce & Hein 2020): the boundary step against the reference's projections and a closed
form, and the minimal distances and success against pyautoattack's FAB on the same points."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attacks import FAB, FABT
from attacks.fab import _level, _level_sorted, step_to_hyperplane
from digits_model import held_out, trained_mlp
from robustbench_lite.threat import ThreatModel

#: per-point tolerance of "no weaker than the reference": our minimal distance <= (1 + DISTANCE_RTOL) x
#: the reference's. Both run the same deterministic algorithm; float rounding (batching all targets, the
#: projection solved without sorting) makes trajectories drift apart by at most this much.
DISTANCE_RTOL = 5e-3


def random_problem(seed: int, rows: int, dim: int):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(rows, dim, generator=g)
    t[:, : dim // 4] = (t[:, : dim // 4] > 0.5).float()  # saturated pixels, as in MNIST
    w = torch.randn(rows, dim, generator=g) * (torch.rand(rows, dim, generator=g) > 0.3)
    scale = torch.rand(rows, generator=g) * 3 - 1.5  # some hyperplanes out of the box's reach
    b = (w * t).sum(1) + scale * (w.abs() * 0.5).sum(1)
    return t, w, b


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), dim=st.sampled_from([1, 7, 64, 784]))
def test_boundary_step_is_the_references_projection(seed, dim):
    from pyautoattack.fab_projections import projection_l2, projection_linf

    # float64: in float32 both drift by up to ~1e-3 on near-unreachable planes (norms ~10), each its own way
    t, w, b = (v.double() for v in random_problem(seed, 32, dim))
    for linf, reference in ((True, projection_linf), (False, projection_l2)):
        mine = step_to_hyperplane(t, w, b - (w * t).sum(1), (0.0, 1.0), linf)
        theirs = reference(t.clone(), w.clone(), b.clone())
        assert torch.allclose(mine, theirs, atol=1e-9, rtol=0), float((mine - theirs).abs().max())
        assert bool(((t + mine) >= -1e-6).all() and ((t + mine) <= 1 + 1e-6).all())


def test_boundary_step_in_closed_form_and_in_another_box():
    # Linf, box never binding: every live coordinate moves by |c| / ||w||_1 towards the plane
    t = torch.full((1, 4), 0.5)
    w = torch.tensor([[1.0, -2.0, 0.0, 1.0]])
    d = step_to_hyperplane(t, w, torch.tensor([0.2]), (0.0, 1.0), linf=True)
    assert torch.allclose(d, torch.tensor([[0.05, -0.05, 0.0, 0.05]]))
    # L2, box never binding: c w / ||w||^2
    d = step_to_hyperplane(t, w, torch.tensor([0.3]), (0.0, 1.0), linf=False)
    assert torch.allclose(d, 0.3 * w / 6)
    # box [-1, 1], Linf: coordinate 0 can rise only 0.1, the others make up for it
    t = torch.tensor([[0.9, 0.0, 0.0]])
    w = torch.ones(1, 3)
    d = step_to_hyperplane(t, w, torch.tensor([0.7]), (-1.0, 1.0), linf=True)
    assert torch.allclose(d, torch.tensor([[0.1, 0.3, 0.3]]))
    # out of reach: every coordinate goes to its box side
    d = step_to_hyperplane(t, w, torch.tensor([-5.0]), (-1.0, 1.0), linf=True)
    assert torch.allclose(d, torch.tensor([[-1.9, -1.0, -1.0]]))


def test_newton_level_equals_the_sorted_level_where_newton_takes_many_steps():
    g = torch.Generator().manual_seed(3)
    weight = torch.rand(50, 300, generator=g)
    cap = torch.rand(50, 300, generator=g) ** 4  # many kinks below the root: the sorted fallback runs
    need = (weight * cap).sum(1) * torch.rand(50, generator=g)
    assert torch.allclose(_level(weight, cap, need), _level_sorted(weight, cap, need), rtol=1e-5, atol=1e-7)
    need[0] = (weight[0] * cap[0]).sum() * 2  # out of reach
    assert math.isinf(float(_level(weight, cap, need)[0]))


def linear_problem(seed: int, d: int = 32):
    """Two-class linear model with the box never binding; the minimal perturbation in closed form."""
    torch.manual_seed(seed)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(d, 2)).double()
    x = 0.45 + 0.1 * torch.rand(8, d, dtype=torch.float64)
    with torch.no_grad():
        lin[1].weight.mul_(0.3)
        gap = lin(x)[:, 1] - lin(x)[:, 0]
        lin[1].bias += torch.tensor([1.0, -1.0]) * gap.mean() / 2
        y = lin(x).argmax(dim=1)
        w = lin[1].weight[1] - lin[1].weight[0]
        gap = (x @ w + lin[1].bias[1] - lin[1].bias[0]).abs()
    return lin, x, y, w, gap


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("attack", [FAB(steps=50), FABT(steps=50)], ids=["fab", "fab-t"])
def test_minimal_perturbation_of_a_linear_model(attack, norm):
    lin, x, y, w, gap = linear_problem(1)
    minimal = gap / w.norm(p=1 if norm == "Linf" else 2)
    result = attack(lin, x, y, ThreatModel(norm, 10.0))
    ratio = result.distance / minimal
    assert bool((ratio >= 1 - 1e-6).all()), "a perturbation smaller than the minimum: the distance is wrong"
    assert bool((ratio <= 1.01).all()), float(ratio.max())
    assert bool(result.success.all())
    assert torch.allclose(ThreatModel(norm, 10.0).distance(result.x_adv, x), result.distance, rtol=1e-6)


def reference_fab_distances(model, x, y, threat, targeted: bool, k: int = 9) -> torch.Tensor:
    """pyautoattack's FAB (targeted: one run per target class, as its perturb() does): per point the
    smallest adversarial norm it found over its runs (inf where none)."""
    from pyautoattack.fab_pt import FABAttack_PT

    fab = FABAttack_PT(model, norm=threat.norm, n_restarts=1, n_iter=100, eps=threat.eps, seed=0,
                       targeted=targeted, n_target_classes=k, device=x.device)
    best = torch.full((x.shape[0],), math.inf)
    with torch.no_grad(), torch.random.fork_rng():
        for target_class in range(2, k + 2) if targeted else [None]:
            fab.target_class = target_class
            adv = fab.attack_single_run(x, y, use_rand_start=False, is_targeted=targeted)
            found = model(adv).argmax(dim=1) != y
            norm = threat.distance(adv, x)
            best = torch.minimum(best, torch.where(found, norm, torch.full_like(norm, math.inf)))
    return best


def assert_no_weaker(ours, reference_distance, threat):
    assert bool(torch.isfinite(ours.distance)[torch.isfinite(reference_distance)].all())
    both = torch.isfinite(reference_distance)
    ratio = ours.distance[both] / reference_distance[both]
    assert bool((ratio <= 1 + DISTANCE_RTOL).all()), f"ours up to {float(ratio.max()):.4f}x the reference's distance"
    assert float(ratio.median()) <= 1 + 1e-4
    # success at eps: every point the reference breaks within eps, ours breaks too
    assert bool(ours.success[reference_distance <= threat.eps].all())


@pytest.mark.parametrize("threat", [ThreatModel("Linf", 0.1), ThreatModel("L2", 1.0)], ids=["Linf", "L2"])
def test_fab_t_no_weaker_than_the_reference_on_the_same_points(threat):
    model = trained_mlp()
    x, y = held_out(n=40)
    ours = FABT()(model, x, y, threat)
    reference = reference_fab_distances(model, x, y, threat, targeted=True)
    assert_no_weaker(ours, reference, threat)
    assert 0 < int(ours.success.sum()) < 40 or threat.norm == "L2"
    # the cascade's bounded run breaks exactly the same points, at a fraction of the passes
    bounded = FABT(bounded=True)(model, x, y, threat)
    assert torch.equal(bounded.success, ours.success) and bounded.backward < ours.backward


def test_fab_t_with_fewer_targets_takes_the_highest_scoring_other_classes_as_the_reference_does():
    # with 9 targets on 10 classes every other class is a target and the order cannot show; with 2 the
    # targets must be the 2nd and 3rd highest-scoring classes at the clean input (the reference's target_class 2, 3)
    model = trained_mlp()
    x, y = held_out(n=40)
    threat = ThreatModel("Linf", 0.1)
    ours = FABT(n_target_classes=2)(model, x, y, threat)
    assert_no_weaker(ours, reference_fab_distances(model, x, y, threat, targeted=True, k=2), threat)


def test_untargeted_fab_no_weaker_than_the_reference():
    model = trained_mlp()
    x, y = held_out(n=20)
    threat = ThreatModel("L2", 1.0)
    ours = FAB()(model, x, y, threat)
    assert_no_weaker(ours, reference_fab_distances(model, x, y, threat, targeted=False), threat)
    assert ours.backward == 20 * 100 * 10  # one backward pass per class and step: the paper's cost


@pytest.mark.slow
@pytest.mark.parametrize("threat", [ThreatModel("Linf", 0.3), ThreatModel("L2", 2.0)], ids=["Linf", "L2"])
def test_fab_t_no_weaker_than_the_reference_on_a_zoo_model(threat):
    from robustbench_lite.data import load_dataset
    from robustbench_lite.zoo import load_model

    model = load_model("mnist5k-cnn-pgd-at")
    data = load_dataset("mnist5k", "test")
    x, y = data.x[:60], data.y[:60]
    with torch.no_grad():
        keep = model(x).argmax(dim=1) == y
    x, y = x[keep], y[keep]
    ours = FABT()(model, x, y, threat)
    reference = reference_fab_distances(model, x, y, threat, targeted=True)
    assert_no_weaker(ours, reference, threat)
    assert 0 < int(ours.success.sum()) < x.shape[0]


def test_restarts_start_at_half_eps_and_never_lose_the_first_runs_result():
    model = trained_mlp()
    x, y = held_out(n=12)
    threat = ThreatModel("Linf", 0.05)
    once = FABT(steps=20, n_target_classes=2)(model, x, y, threat)
    twice = FABT(steps=20, n_target_classes=2, restarts=2)(model, x, y, threat)
    assert bool((twice.distance <= once.distance).all())
    assert bool(twice.success[once.success].all())
