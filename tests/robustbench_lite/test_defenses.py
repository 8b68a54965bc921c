"""TRADES, AugMix, WRM, group DRO and IBP training as losses: shapes, gradients, model state, inner
attacks inside their sets, schedules, parameter checks, and a short training run per defense."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from robustbench_lite.defenses import DEFENSES
from robustbench_lite.defenses.augmix import AugMix, jensen_shannon
from robustbench_lite.defenses.certified import IBPTraining
from robustbench_lite.defenses.group_dro import GroupDRO
from robustbench_lite.defenses.trades import TRADES, kl_from_clean
from robustbench_lite.defenses.wrm import WRM, wrm_maximize
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo.architectures import Normalize


def tiny_model(classes: int = 3, seed: int = 0, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Normalize((0.3,), (0.4,)), nn.Flatten(), nn.Linear(64, 24), activation(), nn.Linear(24, classes))


def blobs(n: int = 48, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1x8x8 images: class k lights up rows 2k..2k+1, plus noise; groups = class * 2 + (i % 2)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.15 * torch.rand(n, 1, 8, 8, generator=g)
    for k in range(classes):
        x[y == k, :, 2 * k:2 * k + 2, 1:7] += 0.7
    groups = y * 2 + torch.arange(n) % 2
    return x.clamp(0, 1), y, groups


DEFENSE_FACTORIES = {
    "trades": lambda: TRADES(eps=0.1, steps=5, step_size=0.03),
    "augmix": lambda: AugMix(),
    "wrm": lambda: WRM(gamma=1.0, steps=5),
    "group-dro": lambda: GroupDRO(num_groups=6, group_counts=[8] * 6, adjustment=1.0, l2=1e-3),
    "ibp": lambda: IBPTraining(eps=0.1, warmup=0.0, ramp=0.0),  # full eps from the start
}


@pytest.mark.parametrize("name", list(DEFENSE_FACTORIES))
def test_registered_by_name(name):
    assert isinstance(DEFENSES.create(name), type(DEFENSE_FACTORIES[name]()))


@pytest.mark.parametrize("name", list(DEFENSE_FACTORIES))
@pytest.mark.parametrize("training", [True, False])
def test_loss_is_a_scalar_with_gradients_and_leaves_the_model_as_found(name, training):
    model = tiny_model(activation=nn.ELU if name == "wrm" else nn.ReLU).train(training)
    model[2].weight.requires_grad_(True)
    model[2].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    x, y, groups = blobs(12)
    defense = DEFENSE_FACTORIES[name]()
    loss = defense.loss(model, x, y, groups=groups, indices=torch.arange(12))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(p.grad is None for p in model.parameters())  # the inner attack leaves no .grad behind
    assert all(m.training == training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]
    loss.backward()
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_trades_inner_attack_stays_in_its_ball_and_raises_the_kl():
    model, (x, y, _) = tiny_model(), blobs(16)
    for norm, eps, step in (("Linf", 0.1, 0.03), ("L2", 0.5, 0.2)):
        trades = TRADES(eps=eps, norm=norm, steps=10, step_size=step)
        x_adv = trades.perturb(model, x)
        assert ThreatModel(norm, eps).contains(x_adv, x).all()
        with torch.no_grad():
            kl_adv = kl_from_clean(model(x_adv), model(x))
            kl_start = kl_from_clean(model(trades.threat.project(x + 0.001 * torch.randn_like(x), x)), model(x))
        assert kl_adv > 10 * kl_start


def test_trades_loss_is_ce_plus_beta_kl():
    model, (x, y, _) = tiny_model(), blobs(8)
    trades = TRADES(eps=0.1, steps=3, step_size=0.03, beta=0.0)
    assert trades.loss(model, x, y).item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
    full = TRADES(eps=0.1, steps=3, step_size=0.03, beta=6.0)
    x_adv = full.perturb(model, x, torch.arange(8))
    expected = F.cross_entropy(model(x), y) + 6.0 * kl_from_clean(model(x_adv), model(x))
    assert full.loss(model, x, y, indices=torch.arange(8)).item() == pytest.approx(expected.item(), rel=1e-5)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), gamma=st.sampled_from([0.5, 2.0, 8.0]))
def test_wrm_maximiser_stays_in_the_box_and_improves_the_objective(seed, gamma):
    model, (x, y, _) = tiny_model(seed=seed, activation=nn.ELU), blobs(8, seed=seed)

    def objective(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(z), y, reduction="none") - gamma * (z - x).flatten(1).pow(2).sum(1)

    x_star = wrm_maximize(model, x, y, gamma=gamma, steps=15)
    assert x_star.min() >= 0 and x_star.max() <= 1
    with torch.no_grad():
        assert (objective(x_star) >= objective(x) - 1e-6).all()
    # a larger penalty keeps the maximiser closer to x
    near = wrm_maximize(model, x, y, gamma=4 * gamma, steps=15)
    assert (near - x).flatten(1).norm(dim=1).mean() <= (x_star - x).flatten(1).norm(dim=1).mean() + 1e-6


def test_wrm_trains_on_the_maximiser():
    model, (x, y, _) = tiny_model(activation=nn.ELU), blobs(8)
    wrm = WRM(gamma=1.0, steps=5)
    x_star = wrm.perturb(model, x, y)
    assert wrm.loss(model, x, y).item() == pytest.approx(F.cross_entropy(model(x_star), y).item(), rel=1e-6)
    assert wrm.loss(model, x, y).item() > F.cross_entropy(model(x), y).item()


def test_augmix_views_are_per_example_deterministic_and_in_range():
    x, _, _ = blobs(6)
    augmix = AugMix()
    a = augmix.augment(x, torch.arange(10, 16), view=1)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, augmix.augment(x, torch.arange(10, 16), view=2))
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    assert torch.equal(augmix.augment(x[perm], torch.arange(10, 16)[perm], view=1), a[perm])
    assert not torch.allclose(a, (x * 255).round() / 255)


def test_augmix_chains_are_per_image_whatever_the_batch():
    x, _, _ = blobs(6)
    augmix = AugMix()
    twins = augmix.augment(torch.cat([x[:1], x[:1]]), torch.tensor([0, 1]), view=1)
    assert not torch.equal(twins[0], twins[1])  # the same image at two indices draws its own chains
    full = augmix.augment(x, torch.arange(6), view=1)
    assert torch.equal(augmix.augment(x[2:5], torch.arange(2, 5), view=1), full[2:5])
    augmix.on_epoch_start(1, 2)
    assert not torch.equal(augmix.augment(x, torch.arange(6), view=1), full)  # new chains every epoch
    with pytest.raises(UserInputError, match="index"):
        augmix.augment(x, torch.arange(5))


@pytest.mark.parametrize("all_ops", [False, True])
def test_augmix_vectorised_chains_equal_torchvision_ops_image_by_image(all_ops):
    """The sub-batch application gives the pixels of torchvision's ``_apply_op`` run on each image alone,
    mixed as ``torchvision.transforms.AugMix.forward`` mixes them."""
    from torchvision.transforms.autoaugment import _apply_op

    images = torch.randint(0, 256, (24, 1, 12, 12), dtype=torch.uint8)
    augmix = AugMix(all_ops=all_ops, severity=6)
    plan = augmix.plan(list(range(24)), 12, 12)
    mixed = augmix.mix_views(images, plan)
    for m in range(24):
        expected = plan.skip[m] * images[m].float()
        for j in range(augmix.width):
            chain = images[m]
            for step in range(int(plan.depth[m, j])):
                chain = _apply_op(chain, plan.op_names[int(plan.ops[m, j, step])], float(plan.magnitudes[m, j, step]),
                                  interpolation=augmix._augmix.interpolation, fill=None)
            expected = expected + plan.chain_weights[m, j] * chain.float()
        assert torch.allclose(mixed[m], expected, atol=1e-3)


def test_augmix_draws_follow_torchvision_and_the_paper():
    augmix = AugMix()
    plan = augmix.plan(list(range(400)), 28, 28)
    # the paper's rule: no op that overlaps the test corruptions
    assert set(plan.op_names).isdisjoint({"Brightness", "Color", "Contrast", "Sharpness"}) and len(plan.op_names) == 9
    assert set(AugMix(all_ops=True).plan([0], 28, 28).op_names) >= {"Brightness", "Contrast"}
    assert torch.allclose(plan.skip + plan.chain_weights.sum(1), torch.ones(400), atol=1e-5)  # convex mix
    assert 0.4 < plan.skip.mean() < 0.6 and plan.skip.std() > 0.25  # Beta(1, 1) is uniform: std 0.29
    assert plan.chain_weights.shape == (400, 3) and set(plan.depth.flatten().tolist()) == {1, 2, 3}
    assert set(plan.ops.flatten().tolist()) == set(range(9))
    rotate = plan.magnitudes[plan.ops == plan.op_names.index("Rotate")]
    # torchvision: magnitude bin randint(severity) of linspace(0, 30, 10) degrees, random sign
    hits = torch.isclose(rotate.abs().unsqueeze(1), torch.tensor([0.0, 30 / 9, 60 / 9]))
    assert hits.any(1).all() and hits.any(0).all() and (rotate < 0).any()
    assert torch.equal(AugMix(depth=2).plan(list(range(5)), 28, 28).depth, torch.full((5, 3), 2))


def test_jensen_shannon_by_hand():
    z = torch.randn(4, 3)
    assert jensen_shannon(z, z, z).abs().item() < 1e-6  # identical predictions agree
    p, q = torch.tensor([[10.0, -10.0]]), torch.tensor([[-10.0, 10.0]])
    # two opposite one-hot predictions and a third equal to the first: JS = (2 KL(p||m) + KL(q||m)) / 3
    m = torch.tensor([2 / 3, 1 / 3])
    expected = (2 * torch.log(1 / m[0]) + torch.log(1 / m[1])) / 3
    assert jensen_shannon(p, q, p).item() == pytest.approx(expected.item(), rel=1e-3)


def test_group_dro_upweights_the_worst_group_by_exponentiated_gradient():
    model, (x, y, groups) = tiny_model(), blobs(12)
    dro = GroupDRO(num_groups=6, eta_q=0.5)
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none")
    group_loss, present = dro.group_losses(losses, groups)
    expected_q = torch.softmax(0.5 * group_loss, dim=0)  # uniform q times exp(eta * L_g), normalised
    loss = dro.loss(model, x, y, groups=groups)
    assert torch.allclose(dro.q, expected_q, atol=1e-6)
    assert loss.item() == pytest.approx(float((expected_q * group_loss).sum()), rel=1e-5)
    assert int(dro.q.argmax()) == int(group_loss.argmax())
    # eval mode does not move the weights; the state survives a checkpoint
    q_before = dro.q.clone()
    dro.loss(model.eval(), x, y, groups=groups)
    assert torch.equal(dro.q, q_before)
    other = GroupDRO(num_groups=6)
    other.load_state_dict(dro.state_dict())
    assert torch.equal(other.q, dro.q)


def test_group_dro_adjustment_favours_small_groups():
    model, (x, y, groups) = tiny_model(), blobs(12)
    dro = GroupDRO(num_groups=6, eta_q=0.1, adjustment=2.0, group_counts=[100, 100, 100, 100, 100, 1])
    with torch.no_grad():
        group_loss, _ = dro.group_losses(F.cross_entropy(model(x), y, reduction="none"), groups)
    dro.loss(model, x, y, groups=groups)
    adjusted = group_loss + 2.0 / torch.tensor([100.0] * 5 + [1.0]).sqrt()
    assert torch.allclose(dro.q, torch.softmax(0.1 * adjusted, dim=0), atol=1e-6)


def test_ibp_schedule_ramps_eps_and_kappa():
    ibp = IBPTraining(eps=0.4, kappa_final=0.5, warmup=0.2, ramp=0.4)
    seen = []
    for epoch in range(10):
        ibp.on_epoch_start(epoch, 10)
        seen.append(ibp.schedule())
    assert seen[0] == {"eps": 0.0, "kappa": 1.0} and seen[2] == {"eps": 0.0, "kappa": 1.0}
    assert seen[4]["eps"] == pytest.approx(0.2) and seen[4]["kappa"] == pytest.approx(0.75)
    assert seen[6] == pytest.approx({"eps": 0.4, "kappa": 0.5}) and seen[9] == pytest.approx({"eps": 0.4, "kappa": 0.5})


def test_ibp_certified_loss_upper_bounds_the_clean_loss():
    # the IBP worst-case logits dominate the clean logits' margins, so CE(z_hat) >= CE(z)
    model, (x, y, _) = tiny_model(), blobs(12)
    certified_only = IBPTraining(eps=0.05, kappa_final=0.0)
    clean = F.cross_entropy(model(x), y)
    assert certified_only.loss(model, x, y).item() >= clean.item() - 1e-6
    assert IBPTraining(eps=0.05, kappa_final=1.0).loss(model, x, y).item() == pytest.approx(clean.item(), rel=1e-6)


@pytest.mark.parametrize("make", [
    lambda: TRADES(eps=-0.1), lambda: TRADES(steps=0), lambda: TRADES(beta=-1), lambda: TRADES(norm="L7"),
    lambda: AugMix(lam=-1), lambda: AugMix(severity=11), lambda: AugMix(width=0), lambda: AugMix(depth=0),
    lambda: WRM(gamma=0), lambda: WRM(steps=0), lambda: WRM(step_size=-1.0),
    lambda: GroupDRO(num_groups=0), lambda: GroupDRO(eta_q=-1), lambda: GroupDRO(adjustment=1.0),
    lambda: GroupDRO(num_groups=2, group_counts=[3]),
    lambda: IBPTraining(kappa_final=1.5), lambda: IBPTraining(warmup=0.6, ramp=0.6), lambda: IBPTraining(eps=-1),
])
def test_parameter_checks(make):
    with pytest.raises(UserInputError):
        make()


def test_group_dro_needs_groups():
    model, (x, y, groups) = tiny_model(), blobs(6)
    with pytest.raises(UserInputError, match="groups"):
        GroupDRO(num_groups=6).loss(model, x, y)
    with pytest.raises(UserInputError, match="groups"):
        GroupDRO(num_groups=2).loss(model, x, y, groups=groups)


@pytest.mark.parametrize("name", list(DEFENSE_FACTORIES))
def test_a_short_training_run_lowers_the_loss(name):
    model = tiny_model(activation=nn.ELU if name == "wrm" else nn.ReLU)
    x, y, groups = blobs(24)
    defense = DEFENSE_FACTORIES[name]()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    epochs = 12
    for epoch in range(epochs):
        defense.on_epoch_start(epoch, epochs)
        for start in range(0, 24, 12):
            sl = slice(start, start + 12)
            loss = defense.loss(model, x[sl], y[sl], groups=groups[sl], indices=torch.arange(24)[sl])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4


def test_command_line_options_build_each_defense():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    for name in DEFENSE_FACTORIES:
        DEFENSES.get(name).add_arguments(parser)
    args = parser.parse_args(["--eps", "0.2", "--beta", "3", "--gamma", "1.5", "--jsd-lambda", "6", "--kappa-final", "0.7",
                              "--augmix-width", "2", "--augmix-depth", "1"])
    assert TRADES.from_args(args).config() == {"seed": 0, "eps": 0.2, "norm": "Linf", "steps": 40, "step_size": 0.01,
                                               "beta": 3.0}
    augmix = AugMix.from_args(args)
    assert WRM.from_args(args).gamma == 1.5 and (augmix.lam, augmix.severity, augmix.width, augmix.depth) == (6.0, 3, 2, 1)
    ibp = IBPTraining.from_args(args)
    assert (ibp.eps, ibp.kappa_final) == (0.2, 0.7)


def test_worst_group_selection_keeps_the_best_epoch(tmp_path):
    from types import SimpleNamespace

    from robustbench_lite.train import WorstGroupSelection

    x, y, groups = blobs(12)
    val = SimpleNamespace(name="blobs", x=x, y=y, groups=groups)
    selector = WorstGroupSelection(val, tmp_path / "m.best.safetensors")
    # "good" reads the row each class lights up; "bad" (a huge bias) always says class 0
    good = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        good[1].weight.zero_()
        good[1].bias.zero_()
        for k in range(3):
            good[1].weight[k].view(8, 8)[2 * k:2 * k + 2, 1:7] = 1.0
    bad_state = {k: v.clone() for k, v in good.state_dict().items()}
    bad_state["1.bias"] = torch.tensor([100.0, 0.0, 0.0])
    entries = []
    for epoch, state in enumerate([bad_state, {k: v.clone() for k, v in good.state_dict().items()}, bad_state], 1):
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        model.load_state_dict(state)
        entry = {"epoch": epoch}
        selector(model.train(), entry)
        assert model.training
        entries.append(entry)
    assert [e["val_worst_group_acc"] for e in entries] == [0.0, 1.0, 0.0]
    assert entries[0]["val_acc"] == pytest.approx(4 / 12)
    restored = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    rule = selector.restore_best(restored)
    assert "epoch 2" in rule and "worst-group" in rule
    assert torch.equal(restored[1].bias, good[1].bias)
    with pytest.raises(UserInputError, match="groups"):
        WorstGroupSelection(SimpleNamespace(name="plain", groups=None), tmp_path / "x")
