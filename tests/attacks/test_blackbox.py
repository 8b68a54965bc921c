"""Black-box attacks: Square (score-based) and HopSkipJump (decision-based).

Tiny hand-made linear models (exact, batch-invariant arithmetic) and a small MLP trained here on the
embedded 8x8 digits; small budgets so the whole file runs in seconds.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from attacks import ATTACKS, PGD, HopSkipJump, Square
from attacks.base import margin_loss
from attacks.square import as_images, l2_pattern, p_fraction, settle
from robustbench_lite.data import load_dataset
from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import example_seeds
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo.architectures import digits_mlp


class RowLinear(nn.Module):
    """Logits ``W x + b`` as an elementwise product and a per-row sum: a row's logits never depend on
    the batch it is in (a BLAS matmul may round differently for different batch sizes)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x.flatten(1)[:, None, :] * self.weight[None]).sum(-1) + self.bias


class Counting(nn.Module):
    """Counts the example-rows that reach the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return self.model(x)


class NoGradForward(nn.Module):
    """Raises if called with gradients enabled."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("gradient access")
        return self.model(x)


class _RaisingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        raise RuntimeError("gradient access")


class NoBackward(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(_RaisingBackward.apply(x))


class Constant(nn.Module):
    """Predicts class 0 whatever the input."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: Tensor) -> Tensor:
        out = torch.zeros(x.shape[0], self.classes)
        out[:, 0] = 1.0
        return out


def linear_problem(classes: int = 3, side: int = 4, n: int = 12, seed: int = 0, smooth: bool = False):
    """A linear model on 1 x side x side images and ``n`` images it classifies as ``y``.

    ``smooth`` draws the weights on a 2 x 2 grid and upsamples them: the spatially coherent
    directions images have, which Square's L2 windows search (white-noise weights defeat them)."""
    g = torch.Generator().manual_seed(seed)
    if smooth:
        coarse = torch.randn(classes, 1, 2, 2, generator=g)
        weight = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=True).flatten(1)
    else:
        weight = torch.randn(classes, side * side, generator=g)
    model = RowLinear(weight, -0.5 * weight.sum(dim=1))  # centred on the middle of the box
    x = 0.25 + 0.5 * torch.rand(n, 1, side, side, generator=g)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return model, x, y


def exact_distance(model: RowLinear, x: Tensor, y: Tensor, norm: str) -> Tensor:
    """Smallest Lp perturbation that changes a linear model's class (box ignored): min_j gap_j / ||w_y - w_j||_dual."""
    with torch.no_grad():
        logits = model(x)
        weight = model.weight
        out = torch.full((x.shape[0],), math.inf)
        for j in range(weight.shape[0]):
            grad = weight[y] - weight[j]
            dist = (logits.gather(1, y[:, None])[:, 0] - logits[:, j]) / grad.norm(p=1 if norm == "Linf" else 2, dim=1)
            out = torch.where(y == j, out, torch.minimum(out, dist))
    return out


def problem(norm: str, n: int = 12, seed: int = 0, classes: int = 3, side: int = 4):
    """A smooth linear problem and a threat model whose eps is 1.25x the median exact distance.

    The box is wide enough never to bind, so the closed form is the true minimal distance."""
    model, x, y = linear_problem(classes=classes, side=side, n=n, seed=seed, smooth=True)
    exact = exact_distance(model, x, y, norm)
    return model, x, y, ThreatModel(norm, float(1.25 * exact.median()), box=(-5.0, 5.0)), exact


@pytest.fixture(scope="module")
def digits():
    """A small MLP trained on the embedded digits and 40 test images it classifies."""
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = digits_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        loss = F.cross_entropy(model(train.x), train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        keep = model(test.x).argmax(dim=1) == test.y
    return model, test.x[keep][:40], test.y[keep][:40]


ATTACK_FACTORIES = {"square": lambda: Square(n_queries=150), "hsja": lambda: HopSkipJump(n_queries=300)}


# --- parameters and registration -------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"n_queries": 0}, {"n_queries": -3}, {"n_queries": 2.5}, {"n_queries": True},
                                    {"p_init": 0.0}, {"p_init": 1.5}, {"loss": "dlr"}])
def test_square_rejects_bad_parameters(kwargs):
    with pytest.raises(UserInputError):
        Square(**kwargs)


@pytest.mark.parametrize("kwargs", [{"n_queries": 0}, {"n_queries": -1}, {"init_num_evals": 0},
                                    {"max_num_evals": -2}, {"init_tries": 0}, {"gamma": 0.0},
                                    {"gamma": float("nan")}])
def test_hsja_rejects_bad_parameters(kwargs):
    with pytest.raises(UserInputError):
        HopSkipJump(**kwargs)


def test_square_rejects_one_class_scores_and_odd_shapes():
    model, x, y = linear_problem()
    single = RowLinear(torch.ones(1, 16), torch.zeros(1))
    with pytest.raises(UserInputError):
        Square(n_queries=10)(single, x, torch.zeros_like(y), ThreatModel("Linf", 0.1))
    with pytest.raises(UserInputError):
        as_images(torch.zeros(2, 1, 1, 2, 2))


def test_registered_as_black_box():
    square, hsja = ATTACKS.create("square"), ATTACKS.create("hsja")
    assert isinstance(square, Square) and square.black_box and not square.labels_only
    assert isinstance(hsja, HopSkipJump) and hsja.black_box and hsja.labels_only
    assert (square.n_queries, square.p_init) == (5000, 0.8)  # AutoAttack's standard version


def test_p_schedule_and_l2_pattern_match_the_reference():
    from pyautoattack.square import SquareAttack

    reference = SquareAttack(lambda z: z, n_queries=5000, p_init=0.8, eps=0.1, norm="L2", device="cpu")
    for it in range(0, 5000, 7):
        assert p_fraction(it, 5000, 0.8) == reference.p_selection(it)
    reference_1000 = SquareAttack(lambda z: z, n_queries=1000, p_init=0.3, eps=0.1, device="cpu")
    assert all(p_fraction(it, 1000, 0.3) == reference_1000.p_selection(it) for it in range(1000))
    for s in (1, 3, 5, 8, 11):
        mine, theirs = l2_pattern(s, torch.device("cpu")), reference.eta(s)
        assert torch.allclose(mine, theirs, atol=1e-6) or torch.allclose(mine.t(), theirs, atol=1e-6)


# --- the contract ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["square", "hsja"])
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_inside_threat_set_and_rescored(name, norm):
    model, x, y, threat, exact = problem(norm, seed=1)
    result = ATTACK_FACTORIES[name]()(model, x, y, threat)
    assert threat.contains(result.x_adv, x).all()
    with torch.no_grad():
        assert torch.equal(result.success, model(result.x_adv).argmax(dim=1) != y)
    easy = exact <= 0.5 * threat.eps  # every point within half of eps of the boundary is broken
    assert easy.any() and result.success[easy].all()
    assert not result.success[exact > threat.eps].any()  # box inactive: nothing beyond the true minimum


@pytest.mark.parametrize("norm", ["L2", "Linf"])
@pytest.mark.parametrize("name", ["square", "hsja"])
def test_query_count_is_exact(name, norm):
    model, x, y = linear_problem(n=9)
    counting = Counting(model)
    budget = 120
    attack = Square(n_queries=budget) if name == "square" else HopSkipJump(n_queries=budget)
    threat = ThreatModel(norm, 0.3 if norm == "L2" else 0.08)
    result = attack(counting, x, y, threat)
    assert result.queries + x.shape[0] == counting.rows == result.forward  # + the caller's re-scoring pass
    assert 0 < result.queries <= budget * x.shape[0]
    singles = []
    for i in range(x.shape[0]):  # per example: never over the budget, and the batch is their sum
        one = Counting(model)
        attack(one, x[i:i + 1], y[i:i + 1], threat, seeds=example_seeds(attack.seed, [i]))
        singles.append(one.rows - 1)
    assert max(singles) <= budget
    assert sum(singles) == result.queries


@pytest.mark.parametrize("name", ["square", "hsja"])
@pytest.mark.parametrize("wrapper", [NoGradForward, NoBackward])
def test_runs_without_gradients(name, wrapper):
    model, x, y = linear_problem(n=8)
    result = ATTACK_FACTORIES[name]()(wrapper(model), x, y, ThreatModel("Linf", 0.2))
    assert result.success.any()
    assert result.backward == 0


def test_black_box_attacks_never_see_the_module():
    seen = []

    class Spy(Square):
        def run(self, model, x, y, threat, rng, target):
            seen.append(model)
            return super().run(model, x, y, threat, rng, target)

    model, x, y = linear_problem(n=3)
    Spy(n_queries=5)(model, x, y, ThreatModel("Linf", 0.1))
    assert not isinstance(seen[0], nn.Module) and not hasattr(seen[0], "parameters")


@pytest.mark.parametrize("name", ["square", "hsja"])
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_results_do_not_depend_on_the_batch(name, norm):
    model, x, y = linear_problem(n=6, seed=3)
    threat = ThreatModel(norm, 0.25 if norm == "Linf" else 0.8)
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    seeds = example_seeds(11, range(6))
    attack = ATTACK_FACTORIES[name]()
    whole = attack(model, x, y, threat, seeds=seeds)
    shuffled = attack(model, x[order], y[order], threat, seeds=seeds[order])
    assert torch.equal(whole.x_adv[order], shuffled.x_adv)
    assert whole.queries == shuffled.queries
    for i in (0, 3):
        alone = attack(model, x[i:i + 1], y[i:i + 1], threat, seeds=seeds[i:i + 1])
        assert torch.equal(alone.x_adv[0], whole.x_adv[i])


# --- traps -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["square", "hsja"])
def test_all_misclassified_batch(name):
    x = torch.rand(5, 1, 4, 4)
    y = torch.ones(5, dtype=torch.int64)
    result = ATTACK_FACTORIES[name]()(Constant(), x, y, ThreatModel("Linf", 0.1))
    assert result.success.all()
    assert torch.equal(result.x_adv, x)
    assert result.queries == 5  # the clean check only
    if name == "hsja":
        assert torch.equal(result.distance, torch.zeros(5))


@pytest.mark.parametrize("name", ["square", "hsja"])
def test_empty_batch(name):
    result = ATTACK_FACTORIES[name]()(Constant(), torch.rand(0, 1, 4, 4), torch.zeros(0, dtype=torch.int64),
                                      ThreatModel("L2", 0.5))
    assert result.x_adv.shape == (0, 1, 4, 4) and result.success.shape == (0,) and result.queries == 0


def test_square_all_negative_logits():
    model, x, y = linear_problem(n=12, seed=5)
    shifted = nn.Sequential(model, nn.LogSoftmax(dim=1))  # every logit < 0, same argmax and margin
    with torch.no_grad():
        assert (shifted(x) < 0).all()
    threat = ThreatModel("Linf", 0.12)
    plain, negative = Square(n_queries=200)(model, x, y, threat), Square(n_queries=200)(shifted, x, y, threat)
    assert negative.success.sum() >= plain.success.sum() - 1
    assert negative.success.any()
    logits = torch.tensor([[-5.0, -1.0, -3.0]])
    assert margin_loss(logits, torch.tensor([1]))[0] == -2.0  # -3 - (-1): correct with every logit negative


@pytest.mark.parametrize("norm,eps", [("Linf", 0.2), ("L2", 0.8)])
def test_square_targeted_moves_toward_the_target(norm, eps):
    model, x, y = linear_problem(classes=3, n=12, seed=1, smooth=True)
    target = (y + 1) % 3
    threat = ThreatModel(norm, eps)
    result = Square(n_queries=300)(model, x, y, threat, target=target)
    with torch.no_grad():
        before, after = model(x), model(result.x_adv)
    gap_before = -margin_loss(before, target)  # z_t - max_{j != t} z_j
    gap_after = -margin_loss(after, target)
    assert (gap_after >= gap_before - 1e-5).all() and (gap_after > gap_before).sum() >= 10
    assert torch.equal(result.success, after.argmax(dim=1) == target)
    assert result.success.sum() >= 6


def test_hsja_targeted_reaches_the_target_class():
    model, x, y = linear_problem(classes=3, n=8, seed=2)
    target = (y + 2) % 3
    result = HopSkipJump(n_queries=800)(model, x, y, ThreatModel("L2", 1.0), target=target)
    with torch.no_grad():
        pred = model(result.x_adv).argmax(dim=1)
    assert torch.equal(result.success, pred == target) and result.success.sum() >= 5


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("name", ["square", "hsja"])
def test_fewer_than_ten_classes(classes, name):
    """Against the closed-form minimal distances: every point within half of eps is broken, none beyond eps."""
    model, x, y, threat, exact = problem("L2", classes=classes, n=8, seed=classes)
    result = ATTACK_FACTORIES[name]()(model, x, y, threat)
    easy = exact <= 0.5 * threat.eps
    assert easy.any() and result.success[easy].all()
    assert not result.success[exact > threat.eps].any()


def test_square_eps_zero_and_vector_inputs():
    model, x, y = linear_problem(n=6)
    result = Square(n_queries=50)(model, x, y, ThreatModel("Linf", 0.0))
    assert torch.equal(result.x_adv, x) and result.queries == 6
    for norm in ("Linf", "L2"):
        model, x, y, threat, exact = problem(norm, seed=4)
        vectors = x.flatten(1)  # (N, D): searched as images of height 1
        result = Square(n_queries=300)(model, vectors, y, threat)
        assert result.x_adv.shape == vectors.shape and result.success.any()
        assert threat.contains(result.x_adv, vectors).all()


def test_settle_is_a_fixed_point_of_the_projection():
    threat = ThreatModel("L2", 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 5, 5, generator=g)
    point = settle(threat, x + 0.3 * torch.randn(64, 3, 5, 5, generator=g), x)
    assert torch.equal(threat.project(point, x), point)


# --- strength --------------------------------------------------------------------------------
@pytest.mark.parametrize("norm,eps", [("Linf", 0.15), ("L2", 1.0)])
def test_square_breaks_a_trained_model_like_pgd(digits, norm, eps):
    model, x, y = digits
    threat = ThreatModel(norm, eps)
    pgd = PGD(steps=40)(model, x, y, threat)
    square = Square(n_queries=300)(model, x, y, threat)
    assert square.success.float().mean() >= 0.5
    assert square.success.sum() >= pgd.success.sum() - 4  # 300 queries, no gradient: near PGD-40


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("seed", [2, 5])
def test_square_finds_what_the_closed_form_says_exists(norm, seed):
    model, x, y, threat, exact = problem(norm, seed=seed)
    result = Square(n_queries=400)(model, x, y, threat)
    assert not result.success[exact > threat.eps].any()
    easy = exact < 0.7 * threat.eps
    assert easy.sum() >= 3 and result.success[easy].all()


def test_hsja_reduces_the_distance(digits):
    model, x, y = digits
    x, y = x[:12], y[:12]
    threat = ThreatModel("L2", 0.0)  # never reached: keeps minimising
    short = HopSkipJump(n_queries=60, early_stop=False)(model, x, y, threat)
    long = HopSkipJump(n_queries=1200, early_stop=False)(model, x, y, threat)
    assert torch.isfinite(short.distance).all()
    assert (long.distance <= short.distance).all()  # same start, best point kept
    assert long.distance.median() < 0.6 * short.distance.median()
    assert long.flags["iterations"] > short.flags["iterations"]


@pytest.mark.parametrize("norm", ["L2", "Linf"])
def test_hsja_approaches_the_closed_form_distance_of_a_linear_model(norm):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(1, 8, generator=g)
    model = RowLinear(torch.cat([w, -w]), torch.tensor([0.3, -0.3]))
    x = torch.randn(6, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    gap = 2 * (x @ w[0] + 0.3).abs()  # logit difference, gradient 2 w
    exact = gap / (2 * w.norm(p=1 if norm == "Linf" else 2))  # dual norm of the gradient
    threat = ThreatModel(norm, 0.0, box=(-20.0, 20.0))  # box inactive: the closed form holds
    result = HopSkipJump(n_queries=2000, early_stop=False)(model, x, y, threat)
    assert (result.distance >= exact * (1 - 1e-4)).all()  # never below the true minimum
    assert (result.distance <= exact * (1.25 if norm == "L2" else 1.6)).all()


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.05, 1.5))
def test_hsja_success_only_inside_the_ball(seed, eps):
    model, x, y = linear_problem(n=5, seed=seed)
    threat = ThreatModel("L2", eps)
    result = HopSkipJump(n_queries=200, seed=seed)(model, x, y, threat)
    assert threat.contains(result.x_adv, x).all()
    assert (result.distance[result.success] <= eps + 1e-6).all()  # success only inside, at the distance reported
    assert (result.distance[~result.success] > eps).all()
    assert not math.isnan(float(result.distance.sum()))


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
def test_square_at_least_as_strong_as_the_reference_on_a_small_budget(digits, norm, eps):
    """The fast version of the slow test below: 12 images, 300 queries on both sides."""
    from pyautoattack.square import SquareAttack

    model, x, y = digits
    x, y = x[:12], y[:12]
    ours = Square(n_queries=300)(model, x, y, ThreatModel(norm, eps))
    reference = SquareAttack(lambda z: model(z), norm=norm, n_queries=300, eps=eps, p_init=0.8, seed=0,
                             device="cpu")
    with torch.no_grad(), torch.random.fork_rng():
        adv = reference.perturb(x, y)
        reference_robust = int((model(adv).argmax(dim=1) == y).sum())
    assert int((~ours.success).sum()) <= reference_robust + 1
    assert reference_robust < x.shape[0], "pick an eps where the comparison means something"


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
def test_square_at_least_as_strong_as_the_reference(digits, norm, eps):
    """Same model, examples and budget as pyautoattack's SquareAttack: robust accuracy no higher
    (one example of slack for randomness)."""
    from pyautoattack.square import SquareAttack

    model, x, y = digits
    ours = Square(n_queries=1000)(model, x, y, ThreatModel(norm, eps))
    reference = SquareAttack(lambda z: model(z), norm=norm, n_queries=1000, eps=eps, p_init=0.8, seed=0,
                             device="cpu")
    with torch.no_grad():
        adv = reference.perturb(x, y)
        reference_robust = int((model(adv).argmax(dim=1) == y).sum())
    assert int((~ours.success).sum()) <= reference_robust + 1
