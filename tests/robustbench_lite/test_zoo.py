"""The model zoo: shipped models load and pass their checks; weights that are tampered with, wrong
though loadable, mismatched with their architecture, missing, corrupt or a hostile pickle are refused
with one clear error; state dicts, TorchScript files and factories load; publishing works."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robustbench_lite.errors import CheckpointError, UserInputError
from robustbench_lite.hashing import file_sha256
from robustbench_lite.zoo import build, list_models, load_model, load_model_with_info, read_cards
from robustbench_lite.zoo.cards import ZOO_DIR, normalization_of
from robustbench_lite.zoo.publish import main as publish_main

SHIPPED = ["mnist5k-cnn-standard", "mnist5k-cnn-pgd-at", "digits-mlp-standard"]
CHEAP = "digits-mlp-standard"  # the smallest shipped model, for the tamper tests


@pytest.fixture
def zoo_copy(tmp_path: Path) -> Path:
    """A private copy of the shipped zoo, so tests never touch the package's weights."""
    (tmp_path / "weights").mkdir()
    card = read_cards()[CHEAP]
    shutil.copy(ZOO_DIR / "weights" / card["weights"], tmp_path / "weights" / card["weights"])
    (tmp_path / "cards.json").write_text(json.dumps({"format": 1, "models": {CHEAP: card}}))
    return tmp_path


def random_digits_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build("digits-mlp").eval()


def digits_batch() -> torch.Tensor:
    return torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))


# --- shipped models --------------------------------------------------------------------------------
def test_list_models_names_every_shipped_model_with_its_card_fields():
    rows = {row["name"]: row for row in list_models()}
    assert set(SHIPPED) <= set(rows)
    for name in SHIPPED:
        row = rows[name]
        assert row["dataset"] in ("mnist5k", "digits") and 0.9 < row["clean_acc"] <= 1
        assert row["command"].startswith("robustbench-lite train ") and len(row["weights_sha256"]) == 64
        assert (ZOO_DIR / "weights" / f"{name}.safetensors").stat().st_size < 1_000_000


@pytest.mark.parametrize("name", sorted(read_cards()))
def test_shipped_models_load_with_their_checks_and_match_their_cards(name):
    model, info = load_model_with_info(name)  # sha256 before, accuracy sample after: both must pass
    card = info.card
    assert not model.training and info.source == "zoo" and info.name == name
    assert info.weights_sha256 == card["weights_sha256"] == file_sha256(ZOO_DIR / "weights" / card["weights"])
    assert info.parameter_count == card["parameter_count"] == sum(p.numel() for p in model.parameters())
    for key in ("mean", "std"):  # cards written from float32 buffers hold e.g. 0.30809999
        assert info.normalization[key] == pytest.approx(card["normalization"][key], rel=1e-6)
    assert min(info.normalization["std"]) > 0
    assert info.architecture == card["architecture"] and info.defense == card["defense"]
    assert card["training"]["seed"] == 0 and len(card["training"]["log"]) == card["training"]["epochs"]
    assert f"--defense {card['defense']}" in card["training"]["command"]


def test_the_pgd_at_card_records_madry_settings_and_the_eps_ramp():
    card = read_cards()["mnist5k-cnn-pgd-at"]
    config = card["defense_config"]
    assert (config["eps"], config["norm"], config["steps"], config["step_size"], config["random_start"]) == (
        0.3, "Linf", 40, 0.01, True)
    ramp = config["eps_ramp_epochs"]
    assert [e["eps"] for e in card["training"]["log"]][ramp - 1:] == [0.3] * (len(card["training"]["log"]) - ramp + 1)


# --- the trap: weights that are not what the card says ------------------------------------------------
def test_tampered_weights_fail_the_sha256_check_before_loading(zoo_copy):
    path = zoo_copy / "weights" / f"{CHEAP}.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(CHEAP, zoo_dir=zoo_copy)


def test_weights_that_load_but_are_wrong_fail_the_accuracy_sample(zoo_copy):
    # a consistent file and card (sha256 matches) whose weights are not the trained ones
    path = zoo_copy / "weights" / f"{CHEAP}.safetensors"
    save_file(random_digits_mlp().state_dict(), str(path))
    cards = json.loads((zoo_copy / "cards.json").read_text())
    cards["models"][CHEAP]["weights_sha256"] = file_sha256(path)
    (zoo_copy / "cards.json").write_text(json.dumps(cards))
    with pytest.raises(CheckpointError, match="weights load but are wrong"):
        load_model(CHEAP, zoo_dir=zoo_copy)
    assert not load_model(CHEAP, zoo_dir=zoo_copy, verify=False).training  # the check can be skipped on purpose


def test_a_missing_zoo_weights_file_is_a_clear_error(zoo_copy):
    (zoo_copy / "weights" / f"{CHEAP}.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(CHEAP, zoo_dir=zoo_copy)


# --- user files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_a_state_dict_with_its_architecture_loads_exactly(tmp_path, suffix):
    model = random_digits_mlp(3)
    path = tmp_path / f"mine{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    else:  # the common wrappings: {"state_dict": ...} and DataParallel's "module." prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded, info = load_model_with_info(path, "digits-mlp")
    x = digits_batch()
    assert torch.equal(loaded(x), model(x)) and not loaded.training
    assert info.source == "state_dict" and info.architecture == "digits-mlp" and info.card is None
    assert info.normalization == {"mean": [0.3], "std": [0.38]} and info.weights_sha256 == file_sha256(path)
    with pytest.raises(UserInputError, match="architecture"):
        load_model(path)  # a bare state dict needs its architecture


def test_a_state_dict_of_another_architecture_names_the_first_problems(tmp_path):
    path = tmp_path / "cnn.safetensors"
    save_file(build("mnist-cnn").state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"does not match architecture 'mnist-lenet': missing keys: .*"
                                              r"unexpected keys: .*\(\+\d+ more\).*wrong shapes"):
        load_model(path, "mnist-lenet")
    state = random_digits_mlp().state_dict()
    state["2.weight"] = torch.zeros(64, 63)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"wrong shapes \(file vs model\): 2.weight \(64, 63\) vs \(64, 64\)") as err:
        load_model(path, "digits-mlp")
    assert "\n" not in str(err.value)


def test_non_finite_weights_are_refused(tmp_path):
    state = random_digits_mlp().state_dict()
    state["4.bias"][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(tmp_path / "nan.safetensors", "digits-mlp")


class Hostile:
    """Unpickling this would create a file: the loader must refuse it without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_hostile_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": Hostile(marker)}, path)
    with pytest.raises(CheckpointError, match="refused.*nothing was executed"):
        load_model(path, "digits-mlp")
    assert not marker.exists()


@pytest.mark.parametrize("name,content", [("junk.safetensors", b"\x00" * 40), ("junk.pt", b"not a checkpoint"),
                                          ("junk.pth", b"PK\x03\x04 broken zip")])
def test_corrupt_files_are_clear_errors(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(tmp_path / name, "digits-mlp")


def test_missing_files_unknown_names_and_non_state_dicts(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere.safetensors", "digits-mlp")
    with pytest.raises(UserInputError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")
    torch.save({"lr": 0.1}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_model(tmp_path / "opt.pt", "digits-mlp")
    with pytest.raises(UserInputError, match="not 'mnist-cnn'"):
        load_model(CHEAP, "mnist-cnn")


# torch 2.14 marks jit.trace/save (used here to write the file a user would hand over) as deprecated
@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_torchscript_files_load_with_their_normalization(tmp_path):
    model = random_digits_mlp(4)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(model, digits_batch()), str(path))
    loaded, info = load_model_with_info(path)
    x = digits_batch()
    assert torch.allclose(loaded(x), model(x)) and info.source == "torchscript"
    assert info.normalization == normalization_of(model) and info.parameter_count == 6570
    with pytest.raises(UserInputError, match="TorchScript"):
        load_model(path, "digits-mlp")


def test_factories_load_and_bad_references_are_clear_errors():
    model, info = load_model_with_info("robustbench_lite.zoo.architectures:digits_mlp")
    assert isinstance(model, nn.Sequential) and not model.training and info.source == "factory"
    assert info.normalization == {"mean": [0.3], "std": [0.38]}
    with pytest.raises(UserInputError, match="cannot import"):
        load_model("robustbench_lite.zoo.architectures:no_such_factory")
    with pytest.raises(UserInputError, match="returned dict, not a torch.nn.Module"):
        load_model("builtins:dict")
    with pytest.raises(UserInputError, match="failed: TypeError"):
        load_model("robustbench_lite.zoo.architectures:build")  # needs an argument


# --- publishing --------------------------------------------------------------------------------------
def test_publish_adds_a_trained_model_and_refuses_a_mismatched_card(tmp_path, zoo_copy):
    model = random_digits_mlp(5)
    weights = tmp_path / "mine.safetensors"
    save_file(model.state_dict(), str(weights))
    card = dict(read_cards()[CHEAP], weights_sha256="0" * 64)
    (tmp_path / "mine.card.json").write_text(json.dumps(card))
    assert publish_main([str(weights), "--zoo-dir", str(zoo_copy)]) != 0  # sha256 does not match the card
    from robustbench_lite.zoo.loading import count_correct

    card.update(weights_sha256=file_sha256(weights), verification={"split": "test", "n_examples": 200,
                                                                     "correct": count_correct(model, "digits")})
    (tmp_path / "mine.card.json").write_text(json.dumps(card))
    assert publish_main([str(weights), "--zoo-dir", str(zoo_copy)]) == 0
    loaded, info = load_model_with_info("mine", zoo_dir=zoo_copy)
    assert info.source == "zoo" and torch.equal(loaded(digits_batch()), model(digits_batch()))
    assert {row["name"] for row in list_models(zoo_copy)} == {CHEAP, "mine"}
