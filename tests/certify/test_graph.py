"""The shared graph walk: tracing, folding, the one error listing every unsupported layer, dense lowering."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certify import CROWN, IBP
from certify.graph import build_graph, check_supported, to_affine_relu
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo.architectures import digits_mlp, mnist_cnn, mnist_lenet
from test_soundness import KINDS, random_net


@pytest.mark.parametrize("kind", KINDS)
def test_graph_forward_matches_the_model(kind):
    model, shape = random_net(kind, 11)
    x = torch.rand(3, *shape)
    graph = build_graph(model, shape)
    with torch.no_grad():
        assert torch.allclose(graph.forward(x)[graph.output], model(x), atol=1e-5)
    kinds = {n.kind for n in graph.nodes}
    assert "input" in kinds and ("relu" in kinds or kind == "pool")
    if kind == "residual":
        assert "add" in kinds
    if kind in ("conv", "lenet"):
        assert "maxpool" in kinds


def test_batchnorm_is_folded_with_running_stats_even_in_train_mode():
    model, shape = random_net("conv", 4)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        expected = model.eval()(x)
        model.train()
        graph = build_graph(model, shape)
        assert torch.allclose(graph.forward(x)[graph.output], expected, atol=1e-5)


def test_every_unsupported_layer_is_listed_in_one_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sigmoid(), nn.ReLU(),
                          nn.MaxPool2d(2, ceil_mode=True))
    with pytest.raises(UserInputError) as err:
        check_supported(model)
    message = str(err.value)
    assert "Tanh" in message and "Sigmoid" in message and "ceil_mode" in message
    assert "\n" not in message
    for cert in (IBP(), CROWN()):
        with pytest.raises(UserInputError, match="Tanh.*Sigmoid"):
            cert(model, torch.rand(1, 4), torch.tensor([0]), ThreatModel("Linf", 0.1))


def test_unsupported_functions_and_untraceable_models_are_reported():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.sin(x) * 2

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UserInputError, match="sin"):
        check_supported(nn.Sequential(nn.Linear(2, 2), Odd()))
    with pytest.raises(UserInputError, match="cannot be traced"):
        check_supported(Branchy())


def test_dropout_and_identity_vanish_and_nested_sequentials_flatten():
    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Dropout(0.5)),
                          nn.Sequential(nn.Linear(4, 3), nn.Identity(), nn.ReLU()), nn.Linear(3, 2))
    graph = build_graph(model, (1, 2, 2))
    assert [n.kind for n in graph.nodes] == ["input", "affine", "affine", "relu", "affine"]


@pytest.mark.parametrize("factory, shape", [(mnist_cnn, (1, 28, 28)), (digits_mlp, (1, 8, 8))])
def test_to_affine_relu_reproduces_the_network(factory, shape):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.rand(2, *shape)
    maps = to_affine_relu(model, shape)
    z = x.flatten(1)
    for i, (w, b) in enumerate(maps):
        z = z @ w.T + b
        if i < len(maps) - 1:
            z = z.clamp(min=0)
    with torch.no_grad():
        assert torch.allclose(z, model(x), atol=1e-4)
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert len(maps) == relus + 1


def test_to_affine_relu_rejects_max_pool_and_residuals():
    with pytest.raises(UserInputError, match="maxpool"):
        to_affine_relu(mnist_lenet(), (1, 28, 28))
    model, shape = random_net("residual", 0)
    with pytest.raises(UserInputError, match="add"):
        to_affine_relu(model, shape)
