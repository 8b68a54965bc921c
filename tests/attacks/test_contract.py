"""The Attack contract, table-driven over EVERY registered attack (white- and black-box).

For each attack and norm: x_adv inside the ball and the box (to 1e-6), ``success`` equal to a fresh
evaluation of the model, the model's mode, parameters and ``.grad`` untouched, forward/backward/query
counters exact against an independent counting wrapper, empty and all-misclassified batches.
Budgets are shrunk through whichever budget keywords an attack's constructor has, so a newly
registered attack is covered without editing this file.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from attacks import ATTACKS
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo.architectures import Normalize

NAMES = ATTACKS.names()
THREATS = [ThreatModel("Linf", 0.1), ThreatModel("L2", 0.5)]
#: budget keywords any attack may have -> a small value that keeps the test fast
SMALL = {"steps": 4, "restarts": 1, "n_queries": 40, "square_queries": 40, "max_queries": 40, "queries": 40,
         "n_target_classes": 3, "iterations": 3, "num_iterations": 3, "max_num_evals": 20,
         "init_num_evals": 10, "eot_iter": 1}
#: attacks whose point is a fixed reference budget (kept as they are)
KEEP_DEFAULTS = {"autoattack-ref"}


def surrogate_model() -> nn.Sequential:
    """A model of its own (other width, other seed) for attacks that craft on a surrogate."""
    torch.manual_seed(1)
    return nn.Sequential(Normalize((0.5,), (0.25,)), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


#: required keywords some attacks have -> a value for this test
REQUIRED = {"surrogate": surrogate_model}


def make(name: str):
    factory = ATTACKS.get(name)
    if name in KEEP_DEFAULTS:
        return factory()
    params = inspect.signature(factory).parameters
    needed = {k: make_value() for k, make_value in REQUIRED.items() if k in params}
    return factory(**{k: v for k, v in SMALL.items() if k in params}, **needed)


def tiny_model(classes: int = 10) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Normalize((0.5,), (0.25,)), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, classes))


class Counted:
    """Counts example-forwards (pre-hook on the model) and example-backwards (hook on the last layer)."""

    def __init__(self, model: nn.Sequential) -> None:
        self.forward = 0
        self.backward = 0
        model.register_forward_pre_hook(self._fwd)
        model[-1].register_full_backward_pre_hook(self._bwd)

    def _fwd(self, module, inputs):
        self.forward += inputs[0].shape[0]

    def _bwd(self, module, grad_output):
        self.backward += grad_output[0].shape[0]


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    model = tiny_model()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return model, x, y


@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.norm)
@pytest.mark.parametrize("name", NAMES)
def test_threat_set_success_and_exact_counters(name, threat, data):
    model, x, y = data
    model = tiny_model()
    counted = Counted(model)
    attack = make(name)
    result = attack(model, x, y, threat)
    assert result.x_adv.shape == x.shape and result.success.shape == y.shape
    assert result.success.dtype == torch.bool
    assert bool(threat.contains(result.x_adv, x, tol=1e-6).all()), "x_adv left the ball or the box"
    with torch.no_grad():
        fresh = model(result.x_adv).argmax(dim=1) != y
    assert torch.equal(result.success, fresh)
    fresh_forwards = x.shape[0]
    assert result.forward == counted.forward - fresh_forwards
    assert result.backward == counted.backward
    if attack.black_box:
        assert result.backward == 0
        assert result.queries == result.forward - x.shape[0]  # all but the re-scoring pass were queries
    assert result.forward > x.shape[0] or bool(result.success.all())


@pytest.mark.parametrize("name", NAMES)
def test_mode_parameters_and_grads_untouched(name, data):
    _, x, y = data
    model = tiny_model()
    model.train()
    model[2].eval()  # a mixed-mode model must come back mixed
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[4].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [(p, p.grad, p.grad.clone(), p.requires_grad) for p in model.parameters()]
    make(name)(model, x, y, THREATS[0])
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g, value, rg in grads:
        assert p.grad is g and torch.equal(p.grad, value) and p.requires_grad == rg


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name, data):
    model, x, y = data
    result = make(name)(model, x[:0], y[:0], THREATS[0])
    assert result.x_adv.shape == (0, *x.shape[1:]) and result.success.shape == (0,)


@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.norm)
@pytest.mark.parametrize("name", NAMES)
def test_all_misclassified_batch(name, threat, data):
    model, x, y = data
    wrong = (y + 1) % 10
    result = make(name)(model, x, wrong, threat)
    assert bool(result.success.all())
    assert bool(threat.contains(result.x_adv, x).all())


@pytest.mark.parametrize("name", [n for n in NAMES if ATTACKS.get(n).supports_targeted])
def test_targeted_success_is_the_target(name, data):
    model, x, y = data
    with torch.no_grad():
        target = model(x).topk(2, dim=1).indices[:, 1]
    result = make(name)(model, x, y, ThreatModel("Linf", 0.3), target=target)
    with torch.no_grad():
        pred = model(result.x_adv).argmax(dim=1)
    assert torch.equal(result.success, pred == target)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_outside_the_box_are_refused(name, data):
    model, x, y = data
    with pytest.raises(UserInputError):
        make(name)(model, x * 2 + 0.5, y, THREATS[0])


@pytest.mark.parametrize("name", [n for n in NAMES if not ATTACKS.get(n).supports_targeted])
def test_untargeted_only_attacks_refuse_a_target(name, data):
    model, x, y = data
    with pytest.raises(UserInputError):
        make(name)(model, x, y, THREATS[0], target=y)


BAD_PARAMETERS = [
    ("pgd", {"steps": 0}), ("pgd", {"loss": "hinge"}), ("pgd", {"eot_iter": 0}), ("pgd", {"abs_stepsize": -1.0}),
    ("fgsm", {"rel_stepsize": 0.0}), ("fgsm", {"eot_iter": 0}),
    ("apgd", {"steps": 0}), ("apgd", {"rho": 1.5}), ("apgd", {"restarts": 0}), ("apgd", {"loss": "x"}),
    ("apgd-t", {"n_target_classes": 0}),
    ("fmn", {"steps": 0}), ("fmn", {"gamma_init": 0.001, "gamma_final": 0.01}), ("fmn", {"alpha_init": 0.0}),
    ("fmn-t", {"n_target_classes": 0}),
    ("autoattack", {"stages": ["apgd-ce", "fab"]}), ("autoattack", {"stages": []}),
    ("autoattack", {"square_queries": 0}), ("autoattack", {"steps": 0}),
    ("autoattack-ref", {"version": "fast"}), ("autoattack-ref", {"batch_size": 0}),
    ("fab", {"steps": 0}), ("fab", {"eta": 0.5}), ("fab", {"beta": 1.0}), ("fab", {"alpha_max": 2.0}),
    ("fab-t", {"n_target_classes": 0}), ("autoattack-fmn", {"stages": ["fab-t", "fab-t"]}),
    ("transfer", {"surrogate": "no-such-model"}), ("transfer", {"surrogate": "mnist5k-cnn-standard", "loss": "dlr"}),
    ("transfer", {"surrogate": "mnist5k-cnn-standard", "restarts": 0}),
]


@pytest.mark.parametrize("name,kwargs", BAD_PARAMETERS)
def test_parameter_checks(name, kwargs):
    with pytest.raises(UserInputError):
        ATTACKS.create(name, **kwargs)
