"""Common architectures through the shared graph walk (issue 17): torchvision's ResNet and VGG, RobustBench's
WideResNet / PreActResNet / ResNet blocks, and a functional ``forward`` using every op the walk accepts.

The lowered graph must compute the model's own logits, and IBP, CROWN and alpha-CROWN bounds (float32,
lowered by their proven rounding error) must hold against the exact network at random, corner and PGD
points of the ball (:func:`test_soundness.check_bounds`), at small widths and input sizes so that
CROWN stays fast.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from certify import IBP
from certify.graph import build_graph, check_supported
from robustbench_lite.errors import UnsupportedModelError
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo.robustbench_archs import BasicBlock, Bottleneck, PreActBlock, WideStage
from test_soundness import K, check_bounds


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


class Functional(nn.Module):
    """Every accepted op written the way model code writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mu", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1))
        self.conv_a, self.conv_b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.act = nn.ReLU(inplace=True)
        self.leaky = nn.LeakyReLU(0.1)
        self.pool = nn.AdaptiveAvgPool2d((3, 3))  # 4x4 -> 3x3: windows of unequal sizes
        self.drop, self.skip = nn.Dropout(0.5), nn.Identity()
        self.fc1, self.fc2 = nn.Linear(6 * 3 * 3 + 6, 12), nn.Linear(12, K)

    def forward(self, x):
        x = (x - self.mu) / self.sigma
        x = 2.0 * x - 1.0
        out = torch.cat([self.act(self.conv_a(x)), F.leaky_relu(self.conv_b(x), 0.2)], 1)  # 6 channels
        out = F.max_pool2d(out, 2)  # 8x8 -> 4x4
        side = out.mean((2, 3))  # (N, 6)
        out = self.pool(self.skip(F.avg_pool2d(out, 3, stride=1, padding=1)))
        out = torch.cat([out.view(out.size(0), -1), side], dim=1)
        out = self.leaky(self.fc1(self.drop(out))).unsqueeze(-1).squeeze(-1)
        out = torch.relu_(out.reshape(-1, 12))
        return self.fc2(torch.flatten(out, 1)) * 0.5 + 0.1


class Blocks(nn.Module):
    """RobustBench's block types (our definitions, same code patterns) on 8x8 inputs at small widths."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "wideresnet":
            self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.body = nn.Sequential(WideStage(2, 4, 8, 1, 0.3), WideStage(1, 8, 12, 2, 0.0))
            self.bn, self.channels = nn.BatchNorm2d(12), 12
        else:
            self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            blocks = {"preact": [PreActBlock(8, 8), PreActBlock(8, 8, 2, True)],
                      "resnet": [BasicBlock(8, 8), Bottleneck(8, 2, 2)]}[kind]
            self.body, self.channels = nn.Sequential(*blocks), 8
            self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(self.channels, K)

    def forward(self, x):
        out = self.body(self.stem(x))
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        return self.fc(out.view(-1, self.channels))


def _vgg(num_classes: int = K, config: tuple = (4, "M", 6, "M")) -> nn.Module:
    net = torchvision.models.VGG(torchvision.models.vgg.make_layers(list(config), batch_norm=True),
                                 num_classes=num_classes, init_weights=False)
    net.classifier = nn.Sequential(nn.Linear(6 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(),  # VGG's own layer types
                                   nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, num_classes))
    return net


def _torchvision_resnet() -> nn.Module:
    """torchvision's ResNet class and blocks (7x7 stem, max-pool, adaptive pool) at small widths."""
    tv = torchvision.models.resnet
    net = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=K)
    net.conv1, net.bn1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8)
    net.layer1 = nn.Sequential(tv.BasicBlock(8, 8))
    net.layer2 = nn.Sequential(tv.BasicBlock(8, 12, 2, nn.Sequential(tv.conv1x1(8, 12, 2), nn.BatchNorm2d(12))))
    net.layer3 = nn.Sequential(tv.Bottleneck(12, 4, 1, nn.Sequential(tv.conv1x1(12, 16), nn.BatchNorm2d(16))))
    net.layer4, net.fc = nn.Identity(), nn.Linear(16, K)
    return net


NETS = {
    "torchvision-resnet": (_torchvision_resnet, (3, 16, 16)),
    "torchvision-vgg": (_vgg, (3, 16, 16)),  # 4x4 features -> AdaptiveAvgPool2d((7, 7))
    "wideresnet": (lambda: Blocks("wideresnet"), (3, 8, 8)),
    "preactresnet": (lambda: Blocks("preact"), (3, 8, 8)),
    "resnet": (lambda: Blocks("resnet"), (3, 8, 8)),
    "functional": (Functional, (3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_bounds_hold_on_common_architectures(name):
    factory, shape = NETS[name]
    model = _randomize(factory(), 0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, *shape, generator=g), torch.tensor([0, 2])
    graph = build_graph(model, shape)
    with torch.no_grad():
        assert torch.allclose(graph.forward(x)[graph.output], model(x), atol=1e-5)
    threats = [("Linf", 0.01)] + ([("L2", 0.1)] if name in ("functional", "resnet") else [])  # keeps the suite fast
    for norm, eps in threats:  # float32 bounds against the exact (float64) network
        check_bounds(model, x, y, ThreatModel(norm, eps), 0)  # IBP, CROWN, alpha-CROWN (seed 0)


def _vgg_cifar() -> nn.Module:  # VGG's features end at 1x1 on 32x32 inputs: AdaptiveAvgPool2d((7, 7)) replicates
    return _vgg(10, (4, "M", 6, "M", 6, "M", 6, "M", 6, "M"))


@pytest.mark.parametrize("factory", [lambda: torchvision.models.resnet18(num_classes=10), _vgg_cifar])
def test_torchvision_models_lower_to_their_own_logits_at_cifar_size(factory):
    model = _randomize(factory(), 2)
    x = torch.rand(2, 3, 32, 32)
    graph = build_graph(model, (3, 32, 32))
    with torch.no_grad():
        assert torch.allclose(graph.forward(x)[graph.output], model(x), rtol=1e-4, atol=1e-4)
    assert IBP()(model, x, torch.tensor([1, 2]), ThreatModel("Linf", 1 / 255)).margin_lower.isfinite().all()


def test_in_place_op_on_a_tensor_read_again_through_a_view_is_rejected():
    class Aliased(nn.Module):
        def forward(self, x):
            flat = x.view(x.size(0), -1)
            x.relu_()
            return flat

    class Overwritten(nn.Module):  # x is read again after the in-place ReLU: it is the ReLU's output
        def forward(self, x):
            y = F.relu(x, inplace=True)
            return x + y

    with pytest.raises(UnsupportedModelError, match="in-place"):
        check_supported(Aliased())
    graph = build_graph(Overwritten(), (4,))
    x = torch.randn(3, 4)
    assert torch.equal(graph.forward(x)[graph.output], Overwritten()(x.clone()))


@pytest.mark.parametrize("body, problem", [
    (lambda x: x.view(8, -1), "first dimension must stay the batch"),
    (lambda x: torch.cat([x, x], 0), "batch dimension"),
    (lambda x: x * x, "product of two activations"),
    (lambda x: 1 / x, "division by an activation"),
    (lambda x: x + torch.ones(5, 4), "constant of shape"),
    (lambda x: x.view(x.size(0) * 2, -1), "batch size"),
    (lambda x: F.leaky_relu(x, -0.5), "negative_slope"),
    (lambda x: x[:, :2], "slicing"),
])
def test_unsupported_uses_name_the_node_and_why(body, problem):
    class Net(nn.Module):
        def forward(self, x):
            return body(x)

    with pytest.raises(UnsupportedModelError, match=problem):
        build_graph(Net(), (4,))


@pytest.mark.parametrize("name", ["torchvision-resnet", "wideresnet", "preactresnet", "resnet"])
def test_patch_walk_through_residual_sums_equals_the_dense_walk(name):
    # the branches of a sum reach a node in different frames (a 3x3 conv path, a strided 1x1 shortcut,
    # the identity): the patch walk aligns them; the plain walk (dense A) is the reference
    from certify.crown import Propagator

    factory, shape = NETS[name]
    model = _randomize(factory(), 5)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(5))
    graph = build_graph(model, shape)
    with torch.no_grad():
        for norm, eps in (("Linf", 0.02),) if name != "resnet" else (("Linf", 0.02), ("L2", 0.2)):
            fast = Propagator(graph, x, ThreatModel(norm, eps))
            plain = Propagator(graph, x, ThreatModel(norm, eps), plain=True)
            fast.compute_bounds()
            plain.compute_bounds()
            for i, (lo, hi) in plain.boxes.items():
                assert torch.allclose(fast.boxes[i][0], lo, rtol=1e-4, atol=1e-4)
                assert torch.allclose(fast.boxes[i][1], hi, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("slope", [0.0, 0.1, 0.5, 1.0])
def test_leaky_relu_relaxation_holds_on_its_interval_and_is_the_chord_above(slope):
    from certify.layers import relu_relaxation

    g = torch.Generator().manual_seed(0)
    lo = torch.randn(1, 300, generator=g) * 2
    hi = lo + torch.rand(1, 300, generator=g) * 3
    r = relu_relaxation(lo, hi, slope)
    x = lo + torch.rand(64, 300, generator=g) * (hi - lo)
    f = F.leaky_relu(x, slope)
    assert (r.lower_slope * x <= f + 1e-6).all() and (f <= r.upper_slope * x + r.upper_intercept + 1e-6).all()
    for end in (lo, hi):  # the upper line touches at both ends (the chord), so it is the tightest one
        assert torch.allclose(r.upper_slope * end + r.upper_intercept, F.leaky_relu(end, slope), atol=1e-5)
    # alpha-CROWN's lower slopes in [0, 1] are raised to the negative slope (a lower line below it is unsound)
    optimised = r.optimised_slope(torch.zeros(1, 1, 300))
    assert (optimised >= slope - 1e-7).all() and (optimised[0, 0][~r.unstable[0]] == r.lower_slope[0][~r.unstable[0]]).all()
