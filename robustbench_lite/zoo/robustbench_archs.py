"""RobustBench's standard CIFAR architectures, written here so that a RobustBench checkpoint loads without
the ``robustbench`` package: same parameter names (so the state-dict keys match), same forward pass.

- ``wideresnet-D-W``: the pre-activation WideResNet of TRADES (Zagoruyko & Komodakis 2016; Zhang et al.
  2019) that RobustBench's ``WideResNet`` defines, optionally with its unused ``sub_block1`` (many
  checkpoints carry it; it is built when the file has its keys);
- ``preactresnet-18``: ``PreActResNet`` with ``PreActBlock`` (He et al. 2016), ``bn_before_fc`` when the
  file has ``bn.*`` keys;
- ``resnet-18`` / ``resnet-34`` / ``resnet-50``: the CIFAR ``ResNet`` (3x3 stem, no max-pool) with
  ``BasicBlock`` / ``Bottleneck``.

Inputs are [0, 1] images; these names apply no normalization, as RobustBench's bare classes do not. A
RobustBench entry that normalizes inside ``forward`` is named by its place in RobustBench's model folder,
``cifar10/Linf/Wong2020Fast`` (see :data:`ENTRIES`), which fixes its architecture variant and its mean
and std; a checkpoint's own ``mu`` / ``sigma`` tensors, when it has them, are its normalization.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .architectures import Normalize

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class _Normalized(nn.Module):
    """A model whose ``normalize`` (or None) maps [0, 1] inputs first; its statistics are not in the
    state dict (RobustBench's checkpoints mostly lack them)."""

    normalize: Normalize | None

    def set_normalization(self, stats: Stats | None) -> None:
        self.normalize = None if stats is None else Normalize(*stats, persistent=False)

    def _input(self, x: Tensor) -> Tensor:
        return x if self.normalize is None else self.normalize(x)


# --- WideResNet -------------------------------------------------------------------------------------
class WideBlock(nn.Module):
    """Pre-activation basic block; the shortcut is a strided 1x1 conv of the activated input when the
    width changes, else the raw input."""

    def __init__(self, cin: int, cout: int, stride: int, drop: float) -> None:
        super().__init__()
        self.bn1, self.relu1, self.conv1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True), _conv(cin, cout, 3, stride)
        self.bn2, self.relu2, self.conv2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True), _conv(cout, cout, 3)
        self.drop = drop
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        out = self.relu2(self.bn2(self.conv1(out)))
        out = F.dropout(out, p=self.drop, training=self.training)
        return torch.add(shortcut, self.conv2(out))


class WideStage(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, drop: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop)
                                     for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(_Normalized):
    """WideResNet-``depth``-``widen``: 3 stages of (depth - 4) / 6 blocks, widths 16w, 32w, 64w, on 32x32."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, sub_block1: bool = False,
                 drop: float = 0.0, stats: Stats | None = None) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = _conv(3, widths[0], 3)
        self.block1 = WideStage(n, widths[0], widths[1], 1, drop)
        if sub_block1:
            self.sub_block1 = WideStage(n, widths[0], widths[1], 1, drop)  # in RobustBench's checkpoints, unused
        self.block2 = WideStage(n, widths[1], widths[2], 2, drop)
        self.block3 = WideStage(n, widths[2], widths[3], 2, drop)
        self.bn1, self.relu = nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.channels = widths[3]
        self.set_normalization(stats)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self._input(x)))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.channels))


# --- ResNet and PreActResNet ------------------------------------------------------------------------
def _shortcut(cin: int, cout: int, stride: int, norm: bool) -> nn.Sequential:
    if stride == 1 and cin == cout:
        return nn.Sequential()
    layers = [nn.Conv2d(cin, cout, 1, stride=stride, bias=False)]
    return nn.Sequential(*(layers + [nn.BatchNorm2d(cout)] if norm else layers))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes, stride, norm=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = _conv(planes, 4 * planes, 1), nn.BatchNorm2d(4 * planes)
        self.shortcut = _shortcut(cin, 4 * planes, stride, norm=True)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block; ``activated_shortcut`` feeds the shortcut conv the activated input
    (RobustBench's ``PreActBlockV2`` and ``out_shortcut``), else the raw one."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, activated_shortcut: bool = False) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv(cin, planes, 3, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), _conv(planes, planes, 3)
        self.activated_shortcut = activated_shortcut
        if stride != 1 or cin != planes:
            self.shortcut = _shortcut(cin, planes, stride, norm=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out if self.activated_shortcut else x) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class ResNet(_Normalized):
    """CIFAR ResNet: 3x3 stem, four stages of ``blocks`` at widths 64-512 (x ``block.expansion``), 4x4 average
    pool; ``preact``: RobustBench's PreActResNet (no stem BN, ``bn_before_fc`` optional)."""

    def __init__(self, block: type, blocks: list[int], num_classes: int = 10, preact: bool = False,
                 bn_before_fc: bool = False, activated_shortcut: bool = False, stats: Stats | None = None) -> None:
        super().__init__()
        self.preact, self.bn_before_fc = preact, bn_before_fc
        self.conv1 = _conv(3, 64, 3)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stage = []
            for j in range(n):
                stride = 1 if i == 0 or j > 0 else 2
                extra = (activated_shortcut,) if preact else ()
                stage.append(block(cin, planes, stride, *extra))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)
        self.set_normalization(stats)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self._input(x))
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn_before_fc:
            out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


# --- names --------------------------------------------------------------------------------------------
def _wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    return lambda num_classes=10, **kw: WideResNet(depth, widen, num_classes, **kw)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    **{f"wideresnet-{d}-{w}": _wrn(d, w) for d, w in ((28, 10), (34, 10), (34, 15), (34, 20), (70, 16))},
    "preactresnet-18": lambda num_classes=10, **kw: ResNet(PreActBlock, [2, 2, 2, 2], num_classes, preact=True, **kw),
    "resnet-18": lambda num_classes=10, **kw: ResNet(BasicBlock, [2, 2, 2, 2], num_classes, **kw),
    "resnet-34": lambda num_classes=10, **kw: ResNet(BasicBlock, [3, 4, 6, 3], num_classes, **kw),
    "resnet-50": lambda num_classes=10, **kw: ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kw),
}

CIFAR10: Stats = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR10_ENGSTROM: Stats = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CIFAR10_RONY: Stats = ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))
CIFAR10_AUGUSTIN: Stats = ((0.4913997551666284, 0.48215855929893703, 0.4465309133731618),
                           (0.24703225141799082, 0.24348516474564, 0.26158783926049628))
CIFAR100: Stats = ((0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
                   (0.2673342858792401, 0.2564384629170883, 0.27615047132568404))
CIFAR100_CHEN: Stats = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
HALF: Stats = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # also Hendrycks2019Using's 2 x - 1

#: RobustBench entries that normalize inside ``forward``: ``dataset/threat/name`` -> (architecture,
#: options of its constructor, mean and std), as RobustBench's model zoo defines them
ENTRIES: dict[str, tuple[str, dict[str, Any], Stats]] = {
    "cifar10/Linf/Hendrycks2019Using": ("wideresnet-28-10", {}, HALF),
    "cifar10/Linf/Rice2020Overfitting": ("wideresnet-34-20", {}, CIFAR10),
    "cifar10/Linf/Engstrom2019Robustness": ("resnet-50", {}, CIFAR10_ENGSTROM),
    "cifar10/Linf/Wong2020Fast": ("preactresnet-18", {}, CIFAR10),
    "cifar10/Linf/Chen2020Efficient": ("wideresnet-34-10", {"sub_block1": True}, CIFAR10),
    "cifar10/L2/Augustin2020Adversarial": ("resnet-50", {}, CIFAR10_AUGUSTIN),
    "cifar10/L2/Engstrom2019Robustness": ("resnet-50", {}, CIFAR10_ENGSTROM),
    "cifar10/L2/Rice2020Overfitting": ("preactresnet-18", {"activated_shortcut": True, "bn_before_fc": True},
                                       CIFAR10),
    "cifar10/L2/Rony2019Decoupling": ("wideresnet-28-10", {}, CIFAR10_RONY),
    "cifar10/L2/Augustin2020Adversarial_34_10": ("wideresnet-34-10", {}, CIFAR10_AUGUSTIN),
    "cifar10/L2/Augustin2020Adversarial_34_10_extra": ("wideresnet-34-10", {}, CIFAR10_AUGUSTIN),
    "cifar100/Linf/Hendrycks2019Using": ("wideresnet-28-10", {}, HALF),
    "cifar100/Linf/Rice2020Overfitting": ("preactresnet-18", {"activated_shortcut": True, "bn_before_fc": True},
                                          CIFAR100),
    "cifar100/Linf/Chen2020Efficient": ("wideresnet-34-10", {"sub_block1": True}, CIFAR100_CHEN),
}
for _name, (_arch, _options, _stats) in ENTRIES.items():
    ARCHITECTURES[_name] = (lambda a, o, s: lambda num_classes=10, **kw: ARCHITECTURES[a](
        num_classes, **{**o, "stats": s, **kw}))(_arch, _options, _stats)


def strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys as RobustBench reads them: a leading ``module.`` (DataParallel) and ``model.`` removed."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def from_state(arch: str, state: dict[str, Tensor], num_classes: int) -> tuple[nn.Module, dict[str, Tensor]]:
    """The architecture ``arch`` built to fit ``state`` (RobustBench's keys), and the state to load into it.

    The optional parts follow the file: ``sub_block1`` and ``bn_before_fc`` when their keys are there;
    a ``mu`` / ``sigma`` pair (RobustBench's normalizing classes save them) is the normalization.
    """
    state = strip_prefixes(state)
    options: dict[str, Any] = {}
    if any(k.startswith("sub_block1.") for k in state):
        options["sub_block1"] = True
    if arch.split("/")[-1].startswith("preactresnet") and "bn.weight" in state:
        options["bn_before_fc"] = True
    if "mu" in state and "sigma" in state:
        mu, sigma = state.pop("mu"), state.pop("sigma")
        options["stats"] = (tuple(mu.flatten().tolist()), tuple(sigma.flatten().tolist()))
    if "/" in arch:  # a named entry: its own variant, unless the file says otherwise
        options = {k: v for k, v in options.items() if k == "stats"}
    return ARCHITECTURES[arch](num_classes, **options), state
