"""The training loop and the first two defenses: Standard and PGD-AT as losses (shapes, gradients,
model state, the inner attack inside its ball), schedules, parameter checks, a short run that lowers
the loss, resume == uninterrupted, and ``robustbench-lite train`` end to end on tiny data."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from robustbench_lite.data import Dataset, load_dataset
from robustbench_lite.defenses import DEFENSES, PGDAT, Defense, Standard
from robustbench_lite.defenses.adversarial import ramped_eps
from robustbench_lite.errors import UserInputError
from robustbench_lite.hashing import file_sha256
from robustbench_lite.threat import ThreatModel
from robustbench_lite.train import TrainConfig, add_arguments, default_name, learning_rate, run, train
from robustbench_lite.zoo import build, load_model_with_info


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build("digits-mlp")


@pytest.fixture(scope="module")
def digits_small() -> Dataset:
    return load_dataset("digits", "train").subset(slice(0, 120))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


# --- defenses as losses ----------------------------------------------------------------------------
def test_registered_by_name():
    assert isinstance(DEFENSES.create("standard"), Standard)
    assert isinstance(DEFENSES.create("pgd-at", eps=0.1), PGDAT)


@pytest.mark.parametrize("defense", [Standard(), PGDAT(eps=0.2, steps=3, step_size=0.1)], ids=["standard", "pgd-at"])
@pytest.mark.parametrize("training", [True, False])
def test_loss_is_a_scalar_with_gradients_and_leaves_the_model_as_found(digits_small, defense, training):
    model = tiny_model().train(training)
    x, y = digits_small.x[:16], digits_small.y[:16]
    loss = defense.loss(model, x, y, indices=digits_small.indices[:16], epoch=0)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(m.training == training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@settings(max_examples=8, deadline=None)
@given(eps=st.floats(0.01, 0.5), norm=st.sampled_from(["Linf", "L2"]), seed=st.integers(0, 1000))
def test_pgd_at_trains_on_points_inside_the_ball_and_box(eps, norm, seed):
    data = load_dataset("digits", "test").subset(slice(0, 12))
    defense = PGDAT(eps=eps, norm=norm, steps=4, step_size=eps / 2, seed=seed)
    model = tiny_model(seed).train()
    x_adv = defense.adversarial_examples(model, data.x, data.y, data.indices)
    assert ThreatModel(norm, eps).contains(x_adv, data.x, tol=1e-5).all()
    assert model.training


def test_pgd_at_raises_the_loss_and_is_per_example_deterministic(digits_small):
    model = tiny_model()
    x, y, idx = digits_small.x[:20], digits_small.y[:20], digits_small.indices[:20]
    defense = PGDAT(eps=0.3, steps=10, step_size=0.05)
    clean = Standard().loss(model, x, y)
    assert defense.loss(model, x, y, indices=idx) > clean
    # the same example gets the same adversarial point whatever batch it is in
    whole = defense.adversarial_examples(model, x, y, idx)
    part = defense.adversarial_examples(model, x[5:9], y[5:9], idx[5:9])
    assert torch.allclose(whole[5:9], part, atol=1e-6)


def test_pgd_at_eps_ramp_is_linear_and_recorded():
    defense = PGDAT(eps=0.3, eps_ramp_epochs=3)
    seen = []
    for epoch in range(5):
        defense.on_epoch_start(epoch, 5)
        seen.append(defense.schedule()["eps"])
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    assert ramped_eps(0.3, 0, 0) == 0.3
    assert defense.config()["eps_ramp_epochs"] == 3 and defense.config()["steps"] == 40


@pytest.mark.parametrize("make", [
    lambda: PGDAT(eps=-0.1), lambda: PGDAT(steps=0), lambda: PGDAT(step_size=0), lambda: PGDAT(norm="L7"),
    lambda: PGDAT(eps_ramp_epochs=-1), lambda: TrainConfig(epochs=0), lambda: TrainConfig(batch_size=0),
    lambda: TrainConfig(lr=0), lambda: TrainConfig(optimizer="rmsprop"), lambda: TrainConfig(lr_schedule="step"),
    lambda: TrainConfig(weight_decay=-1), lambda: DEFENSES.get("no-such-defense"),
])
def test_parameter_checks(make):
    with pytest.raises(UserInputError):
        make()


def test_cosine_schedule_and_default_name():
    config = TrainConfig(lr=0.1, lr_schedule="cosine")
    assert learning_rate(config, 0, 10) == pytest.approx(0.1)
    assert learning_rate(config, 5, 10) == pytest.approx(0.05)
    assert learning_rate(TrainConfig(lr=0.1, lr_schedule="constant"), 9, 10) == 0.1
    assert default_name("mnist5k", "mnist-cnn", "pgd-at") == "mnist5k-cnn-pgd-at"


# --- the loop --------------------------------------------------------------------------------------
@pytest.mark.parametrize("defense", [Standard(), PGDAT(eps=0.1, steps=2, step_size=0.05)], ids=["standard", "pgd-at"])
def test_a_short_training_run_lowers_the_loss(digits_small, defense):
    model = tiny_model()
    history = train(model, digits_small, defense, TrainConfig(epochs=2, lr=3e-3, batch_size=20, lr_schedule="constant"))
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"]
    assert not model.training


class Interrupt(Exception):
    pass


class InterruptedPGDAT(PGDAT):
    """PGD-AT that dies when epoch ``at`` starts, as a killed process would."""

    def __init__(self, at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._at = at

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if epoch == self._at:
            raise Interrupt
        super().on_epoch_start(epoch, epochs)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(digits_small, tmp_path, optimizer):
    config = TrainConfig(epochs=3, lr=3e-3, batch_size=32, seed=5, optimizer=optimizer, weight_decay=1e-4)
    options = dict(eps=0.1, steps=2, step_size=0.05, eps_ramp_epochs=2, seed=5)
    reference = tiny_model(1)
    history = train(reference, digits_small, PGDAT(**options), config)

    ckpt = tmp_path / "run.ckpt.safetensors"
    model = tiny_model(1)
    with pytest.raises(Interrupt):
        train(model, digits_small, InterruptedPGDAT(2, **options), config, checkpoint=ckpt)
    resumed = tiny_model(99)  # a fresh process: other initial weights, restored from the checkpoint
    resumed_history = train(resumed, digits_small, PGDAT(**options), config, checkpoint=ckpt, resume=True)
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in resumed_history] == [h["loss"] for h in history]


def test_resume_refuses_another_configuration_or_a_missing_checkpoint(digits_small, tmp_path):
    ckpt = tmp_path / "run.ckpt.safetensors"
    train(tiny_model(), digits_small, Standard(), TrainConfig(epochs=1, batch_size=40), checkpoint=ckpt)
    with pytest.raises(UserInputError, match="other settings"):
        train(tiny_model(), digits_small, Standard(), TrainConfig(epochs=1, batch_size=41), checkpoint=ckpt, resume=True)
    with pytest.raises(UserInputError, match="nothing to resume"):
        train(tiny_model(), digits_small, Standard(), TrainConfig(epochs=1), checkpoint=tmp_path / "none", resume=True)


class GroupCounter(Defense):
    """Records what the loop passes in the batch dict."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def loss(self, model, x, y, **batch):
        self.seen.append(batch)
        return nn.functional.cross_entropy(model(x), y)


def test_the_loop_passes_indices_groups_and_position_to_the_defense():
    x = torch.rand(10, 1, 8, 8)
    data = Dataset(name="toy", split="train", x=x, y=torch.arange(10) % 3, num_classes=10,
                   groups=torch.arange(10) % 2, group_names=["a", "b"], indices=torch.arange(100, 110))
    recorder = GroupCounter()
    train(tiny_model(), data, recorder, TrainConfig(epochs=1, batch_size=4))
    assert [b["step"] for b in recorder.seen] == [0, 1, 2] and recorder.seen[0]["steps_per_epoch"] == 3
    seen = torch.cat([b["indices"] for b in recorder.seen])
    assert sorted(seen.tolist()) == list(range(100, 110))
    assert torch.equal(torch.cat([b["groups"] for b in recorder.seen]), (seen - 100) % 2)


# --- the command -----------------------------------------------------------------------------------
def test_train_command_writes_weights_card_and_checkpoint_and_registers(tmp_path, monkeypatch):
    import robustbench_lite.zoo.publish as publish_module

    zoo = tmp_path / "zoo"
    real_publish = publish_module.publish
    monkeypatch.setattr(publish_module, "publish", lambda weights, **kw: real_publish(weights, zoo_dir=zoo, overwrite=True))
    out = tmp_path / "runs"
    args = parse("--defense", "pgd-at", "--dataset", "digits", "--arch", "digits-mlp", "--epochs", "1",
                 "--attack-steps", "2", "--eps", "0.1", "--out", str(out), "--no-progress", "--register")
    assert run(args) == 0
    name = "digits-mlp-pgd-at"
    card = json.loads((out / f"{name}.card.json").read_text())
    assert card["weights_sha256"] == file_sha256(out / f"{name}.safetensors")
    assert card["training"]["command"].startswith("robustbench-lite train --defense pgd-at --dataset digits")
    assert "--attack-steps 2" in card["training"]["command"] and "--register" not in card["training"]["command"]
    assert card["defense_config"]["steps"] == 2 and card["training"]["log"][0]["eps"] == 0.1
    assert card["normalization"] == {"mean": [0.3], "std": [0.38]} and 0 <= card["verification"]["correct"] <= 200
    assert (out / f"{name}.ckpt.safetensors").is_file()
    model, info = load_model_with_info(out / f"{name}.safetensors")  # the card next to it drives the checks
    assert info.architecture == "digits-mlp" and info.defense == "pgd-at" and not model.training
    _, info = load_model_with_info(name, zoo_dir=zoo)
    assert info.source == "zoo" and info.card["clean_acc"] == card["clean_acc"]
    with pytest.raises(UserInputError, match="--resume"):
        run(args)  # the checkpoint exists: never silently overwritten
    assert run(parse(*[a for a in vars_to_argv(args)], "--resume")) == 0


def vars_to_argv(args: argparse.Namespace) -> list[str]:
    return ["--defense", args.defense, "--dataset", args.dataset, "--arch", args.arch, "--epochs", str(args.epochs),
            "--attack-steps", str(args.attack_steps), "--eps", str(args.eps), "--out", str(args.out), "--no-progress"]


def test_train_command_refuses_an_architecture_that_does_not_fit_the_data(tmp_path):
    args = parse("--dataset", "digits", "--arch", "mnist-cnn", "--epochs", "1", "--out", str(tmp_path), "--no-progress")
    with pytest.raises(UserInputError, match="does not take"):
        run(args)
