"""Gray-box transfer attacks: crafted on a surrogate, scored on the target through queries only; the
gray-box threat model refuses white-box attacks and keeps its records in a table of their own."""
from __future__ import annotations

import pytest
import torch

from attacks import PGD, Transfer
from digits_model import held_out, trained_mlp
from robustbench_lite.errors import UserInputError
from robustbench_lite.evaluation.core import evaluate
from robustbench_lite.leaderboard.records import build_record, record_path
from robustbench_lite.leaderboard.render import build_tables
from robustbench_lite.seeding import example_seeds
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo import ModelInfo

THREAT = ThreatModel("Linf", 0.1)


class Spy(torch.nn.Module):
    """Counts example-forwards and records whether any input it saw required a gradient."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.rows, self.saw_gradient = model, 0, False

    def forward(self, x):
        self.rows += x.shape[0]
        self.saw_gradient |= x.requires_grad and torch.is_grad_enabled()
        return self.model(x)


def test_crafted_on_the_surrogate_scored_on_the_target_by_queries_only():
    target, surrogate = Spy(trained_mlp(seed=0)), trained_mlp(steps=200, seed=1)
    x, y = held_out(n=30)
    result = Transfer(surrogate=surrogate, steps=20)(target, x, y, THREAT)
    assert not target.saw_gradient and result.backward == 0
    assert result.queries == 2 * 30  # the clean point and the transferred one
    assert target.rows == result.forward == result.queries + 30  # + the re-scoring pass
    assert result.flags["surrogate_backward"] == 20 * 30
    # what it returns is the surrogate's PGD point (no early stop, the same per-example seeds) where it fools
    crafted = PGD(steps=20, early_stop=False)(surrogate, x, y, THREAT, seeds=example_seeds(0, range(30)))
    fooled = result.success
    assert 0 < int(fooled.sum()) < 30
    assert torch.equal(result.x_adv[fooled], crafted.x_adv[fooled])
    assert Transfer(surrogate=surrogate).name == "transfer-sequential"  # a module: named by its class


def test_a_model_as_its_own_surrogate_is_white_box_pgd_without_early_stop():
    model = trained_mlp()
    x, y = held_out(n=30)
    transfer = Transfer(surrogate=model, steps=20)(model, x, y, THREAT)
    pgd = PGD(steps=20, early_stop=False)(model, x, y, THREAT)
    assert torch.equal(transfer.success, pgd.success)


def test_zoo_surrogate_is_named_and_fingerprinted_without_loading():
    from robustbench_lite.zoo import read_cards

    attack = Transfer(surrogate="mnist5k-cnn-standard")
    assert attack.name == "transfer-mnist5k-cnn-standard"
    assert attack.config()["surrogate_sha256"] == read_cards()["mnist5k-cnn-standard"]["weights_sha256"]
    with pytest.raises(UserInputError, match="unknown surrogate"):
        Transfer(surrogate="no-such-model")


def test_a_surrogate_that_cannot_take_the_inputs_is_one_clear_error():
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 10))
    x, y = held_out(n=4)
    with pytest.raises(UserInputError, match="cannot take these inputs"):
        Transfer(surrogate=wrong, steps=2)(trained_mlp(), x, y, THREAT)


def test_gray_box_threat_model_refuses_white_box_attacks_and_has_its_own_table():
    from robustbench_lite.data import load_dataset

    gray = ThreatModel("Linf", 0.1, access="gray-box")
    assert gray.key == "Linf-0.1-gray-box" and gray.to_dict()["access"] == "gray-box"
    assert "access" not in THREAT.to_dict() and THREAT != gray
    with pytest.raises(UserInputError, match="access"):
        ThreatModel("Linf", 0.1, access="black")
    model = trained_mlp()
    data = load_dataset("digits", "test")
    with pytest.raises(UserInputError, match="gray-box"):
        evaluate(model, data, gray, attacks=["pgd"], certifiers=[], n_examples=20)
    surrogate = trained_mlp(steps=200, seed=1)
    info = ModelInfo(name="mlp", architecture="digits-mlp", defense=None, dataset="digits", weights_sha256=None,
                     parameter_count=1, normalization=None, source="factory")
    records = []
    for threat in (gray, THREAT):
        attack = Transfer(surrogate=surrogate, steps=5) if threat is gray else PGD(steps=5)
        result = evaluate(model, data, threat, attacks=[attack], certifiers=[], n_examples=20)
        records.append(build_record(result, info, model))
    assert record_path("/r", records[0]).parent.name == "Linf-0.1-gray-box"
    assert record_path("/r", records[1]).parent.name == "Linf-0.1"
    titles = sorted(t.title for t in build_tables(records))
    assert titles == ["digits, Linf eps = 0.1", "digits, Linf eps = 0.1, gray-box: transfer attacks"]


def test_transfer_by_name_alone_is_one_clear_error():
    from robustbench_lite.data import load_dataset

    with pytest.raises(UserInputError, match="surrogate"):  # the CLI's --attacks transfer takes this path
        evaluate(trained_mlp(), load_dataset("digits", "test"), THREAT, attacks=["transfer"], certifiers=[],
                 n_examples=4)
