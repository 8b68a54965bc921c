"""RobustBench checkpoints load through our own ``--arch`` definitions with identical logits.

Each test builds the architecture with the ``robustbench`` package (the ``test`` extra installs it),
gives it random weights and BatchNorm statistics, saves its state dict the way RobustBench's files
hold it (``{"state_dict": ...}`` with DataParallel's ``module.`` prefix), loads the file through
``load_model_with_info(path, arch=...)`` and compares the logits bit for bit. The full-size
WideResNets and every named entry (checked against RobustBench's own model table, normalization
included) run with ``-m slow``.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from robustbench_lite.errors import CheckpointError
from robustbench_lite.zoo import load_model_with_info
from robustbench_lite.zoo.robustbench_archs import ENTRIES, from_state


def _robustbench_module(relative: str) -> types.ModuleType:
    """One of robustbench's files, imported without running its package ``__init__`` (robustbench 1.1.1
    imports ``pkg_resources`` and an ``autoattack`` module there, which this environment lacks)."""
    package = sys.modules.get("robustbench")
    if package is None or not hasattr(package, "__path__"):
        spec = importlib.util.find_spec("robustbench")
        if spec is None:
            # robustbench is in the test extra that README's test command installs: missing, the comparison
            # cannot run, and a skip would hide that the architectures went unchecked
            pytest.fail("the robustbench package is not installed: pip install -e '.[test]'")
        package = types.ModuleType("robustbench")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["robustbench"] = package
    if relative.startswith("model_zoo.architectures."):  # torch-only files: skip the zoo's heavy __init__
        name = f"_robustbench_{relative.rsplit('.', 1)[1]}"
        if name not in sys.modules:
            path = Path(package.__path__[0], *relative.split(".")).with_suffix(".py")
            file_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
            sys.modules[name] = module
        return sys.modules[name]
    return importlib.import_module(f"robustbench.{relative}")


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _saved(model: nn.Module, path: Path, extra: dict | None = None) -> Path:
    """The state dict as RobustBench's checkpoints hold it."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 99, **(extra or {})}, path)
    return path


def _same_logits(reference: nn.Module, ours: nn.Module, seed: int = 0) -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert torch.equal(expected, got), (expected - got).abs().max()


@pytest.mark.parametrize("arch, build", [
    ("preactresnet-18", lambda rb: rb.PreActResNet18()),
    ("resnet-18", lambda rb: rb.ResNet18()),
])
def test_checkpoint_loads_through_arch_with_identical_logits(tmp_path, arch, build):
    reference = _randomize(build(_robustbench_module("model_zoo.architectures.resnet")), 1)
    path = _saved(reference, tmp_path / "model.pt")
    model, info = load_model_with_info(path, arch=arch)
    _same_logits(reference, model)
    assert info.architecture == arch and info.normalization is None and not model.training


@pytest.mark.parametrize("depth, widen, sub_block1, drop", [(10, 1, True, 0.3), (16, 2, False, 0.0)])
def test_wideresnet_definition_matches_at_small_sizes(depth, widen, sub_block1, drop):
    rb = _robustbench_module("model_zoo.architectures.wide_resnet")
    reference = _randomize(rb.WideResNet(depth=depth, widen_factor=widen, sub_block1=sub_block1, dropRate=drop), 2)
    from robustbench_lite.zoo import robustbench_archs

    robustbench_archs.ARCHITECTURES["_test"] = robustbench_archs._wrn(depth, widen)
    try:
        state = {f"module.{k}": v for k, v in reference.state_dict().items()}
        ours, state = from_state("_test", state, 10)
        ours.load_state_dict(state, strict=True)
    finally:
        del robustbench_archs.ARCHITECTURES["_test"]
    _same_logits(reference, ours.eval())


def test_bottleneck_and_preact_variants_match_at_small_sizes():
    rb = _robustbench_module("model_zoo.architectures.resnet")
    from robustbench_lite.zoo.robustbench_archs import Bottleneck, PreActBlock, ResNet

    pairs = [(rb.ResNet(rb.Bottleneck, [1, 1, 1, 1]), ResNet(Bottleneck, [1, 1, 1, 1])),
             (rb.PreActResNet(rb.PreActBlockV2, [1, 1, 1, 1], bn_before_fc=True),
              ResNet(PreActBlock, [1, 1, 1, 1], preact=True, bn_before_fc=True, activated_shortcut=True)),
             (rb.PreActResNet(rb.PreActBlock, [1, 1, 1, 1], out_shortcut=True),
              ResNet(PreActBlock, [1, 1, 1, 1], preact=True, activated_shortcut=True))]
    for reference, ours in pairs:
        reference = _randomize(reference, 3)
        ours.load_state_dict(reference.state_dict(), strict=True)
        _same_logits(reference, ours.eval())


def test_normalization_from_the_checkpoint_or_the_entry(tmp_path):
    rb = _robustbench_module("model_zoo.architectures.resnet")
    reference = _randomize(rb.PreActResNet18(), 4)
    mu, sigma = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1)
    state = {**reference.state_dict(), "mu": mu, "sigma": sigma}  # as RobustBench's normalizing classes save
    torch.save(state, tmp_path / "norm.pt")
    model, info = load_model_with_info(tmp_path / "norm.pt", arch="preactresnet-18")
    _same_logits(lambda x: reference((x - mu) / sigma), model)
    assert info.normalization == {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]}
    _saved(reference, tmp_path / "wong.pt")
    model, info = load_model_with_info(tmp_path / "wong.pt", arch="cifar10/Linf/Wong2020Fast")
    mean, std = ENTRIES["cifar10/Linf/Wong2020Fast"][2]
    assert info.normalization == {"mean": list(mean), "std": list(std)}


def test_a_checkpoint_of_another_architecture_is_one_error_line(tmp_path):
    rb = _robustbench_module("model_zoo.architectures.resnet")
    path = _saved(rb.ResNet18(), tmp_path / "r18.pt")
    with pytest.raises(CheckpointError, match="does not match architecture 'preactresnet-18'"):
        load_model_with_info(path, arch="preactresnet-18")


@pytest.mark.slow
@pytest.mark.parametrize("arch, kwargs", [("wideresnet-28-10", {"depth": 28, "widen_factor": 10, "sub_block1": True}),
                                          ("wideresnet-34-10", {"depth": 34, "widen_factor": 10}),
                                          ("wideresnet-34-20", {"depth": 34, "widen_factor": 20})])
def test_full_size_wideresnets(tmp_path, arch, kwargs):
    rb = _robustbench_module("model_zoo.architectures.wide_resnet")
    reference = _randomize(rb.WideResNet(**kwargs), 5)
    model, _ = load_model_with_info(_saved(reference, tmp_path / "w.pt"), arch=arch)
    _same_logits(reference, model)


@pytest.mark.slow
@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_every_named_entry_against_robustbench_model_table(tmp_path, entry):
    dataset, threat, name = entry.split("/")
    zoo = _robustbench_module(f"model_zoo.{dataset}")
    table = zoo.cifar_10_models if dataset == "cifar10" else zoo.cifar_100_models
    models = {t.value: v for t, v in table.items()}[threat]
    reference = _randomize(models[name]["model"](), 6)
    state = {k: v for k, v in reference.state_dict().items() if k not in ("mu", "sigma")}  # most files lack them
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "entry.pt")
    model, _ = load_model_with_info(tmp_path / "entry.pt", arch=entry)
    _same_logits(reference, model)
