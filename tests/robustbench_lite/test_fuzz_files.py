"""Fuzzing the files a user or an earlier run hands us: weights, model cards, records, registries, resume shards.

Each generated file is refused with one clear error (a RobustBenchLiteError in the library, exit 2
and one line in the CLI), or used safely (loaded, recomputed); a good file is never modified.
"""
from __future__ import annotations

import copy
import datetime
import io
import json
import math
import os
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from robustbench_lite.errors import RobustBenchLiteError
from robustbench_lite.zoo import load_model
from robustbench_lite.zoo.architectures import digits_mlp

from fuzzing import checked_run, depths, fuzz_settings, snapshot

ARCH = "digits-mlp"
DIGITS = torch.rand(4, 1, 8, 8)


def good_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return digits_mlp().state_dict()


def torchscript_bytes() -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(digits_mlp().eval()), buffer)
    return buffer.getvalue()


def pt_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


GOOD = {".safetensors": st_save(good_state()), ".pt": pt_bytes(good_state()), ".ts": torchscript_bytes()}


# --- damaged bytes ---------------------------------------------------------------------------------
#: how to damage a good file: (kind, where as a fraction of its length, bytes to write or append)
DAMAGE = st.tuples(st.sampled_from(["truncate", "flip", "overwrite", "extend", "empty", "header"]),
                   st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=32))


def damaged(good: bytes, damage: tuple[str, float, bytes]) -> bytes:
    """Truncated, bit-flipped, overwritten, extended or emptied bytes of a good file."""
    kind, where, chunk = damage
    data = bytearray(good)
    pos = int(where * len(data))
    if kind == "truncate":
        return bytes(data[:pos])
    if kind == "flip":
        data[pos] ^= 1 << (chunk[0] % 8)
    elif kind == "overwrite":
        data[pos:pos + len(chunk)] = chunk
    elif kind == "extend":
        data += chunk
    elif kind == "empty":
        return b""
    else:  # the first bytes: a format's length field or magic number
        data[pos % 16] = chunk[0]
    return bytes(data)


@st.composite
def safetensors_header_edits(draw) -> bytes:
    """A safetensors file whose JSON header lies about one tensor: dtype, shape, offsets, or metadata."""
    good = GOOD[".safetensors"]
    (size,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + size])
    body = good[8 + size:]
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "metadata", "drop"]))
    if field == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(["F64", "F16", "BF16", "I64", "I8", "U8", "BOOL", "XX", "", 5]))
    elif field == "shape":
        header[name]["shape"] = draw(st.one_of(st.lists(st.integers(-2, 10**12), max_size=4), st.just("x")))
    elif field == "data_offsets":
        header[name]["data_offsets"] = draw(st.lists(st.integers(-1, 10**9), max_size=3))
    elif field == "metadata":
        header["__metadata__"] = draw(st.sampled_from([{"a": 1}, [], "x", {"a": None}, {"a": "b"}]))
    else:
        del header[name]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@st.composite
def confused_state(draw) -> dict:
    """A state dict of the wrong types: dtypes, shapes, keys, values, wrappings."""
    state = dict(good_state())
    name = draw(st.sampled_from(sorted(state)))
    kind = draw(st.sampled_from(["dtype", "shape", "extra", "missing", "prefix", "wrap", "value", "nonfinite", "huge"]))
    if kind == "dtype":
        state[name] = state[name].to(draw(st.sampled_from([torch.int64, torch.float64, torch.float16, torch.bool,
                                                            torch.uint8, torch.bfloat16, torch.complex64])))
    elif kind == "shape":
        state[name] = draw(st.sampled_from([state[name].flatten(), state[name][:1], state[name].unsqueeze(0),
                                            torch.zeros(0), torch.zeros(())]))
    elif kind == "extra":
        state["extra.weight"] = torch.zeros(3)
    elif kind == "missing":
        del state[name]
    elif kind == "prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    elif kind == "wrap":
        state = {draw(st.sampled_from(["state_dict", "model", "model_state_dict", "net"])): state}
    elif kind == "value":
        state[name] = draw(st.sampled_from([1, "x", None, [1.0, 2.0], {"a": torch.zeros(1)}, (torch.zeros(1),)]))
    elif kind == "nonfinite":
        state[name] = state[name].clone().fill_(draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    else:
        state[name] = state[name].clone().fill_(3e38)
    return state


def assert_loads_or_refuses(path: Path) -> None:
    """The library either refuses the file with a RobustBenchLiteError or returns a model that runs."""
    before = path.read_bytes()
    try:
        model = load_model(path, None if path.suffix == ".ts" else ARCH)
    except RobustBenchLiteError as err:
        assert str(err).strip() and "\n" not in str(err).strip()
    else:
        with torch.no_grad():
            assert model(DIGITS).shape[0] == DIGITS.shape[0]
    assert path.read_bytes() == before


@pytest.mark.parametrize("examples", depths(quick=10))
@pytest.mark.parametrize("suffix", sorted(GOOD))
def test_damaged_weight_files(tmp_path, examples, suffix):
    @fuzz_settings(examples)
    @given(damage=DAMAGE)
    @example(damage=("empty", 0.0, b"\x00"))  # found: IndexError formatting an empty EOFError (.pt)
    @example(damage=("header", 0.0, b"Q"))  # found: IndexError from torch's legacy tar reader (.pt)
    @example(damage=("overwrite", 0.002, bytes(range(200, 232))))  # found: UnicodeDecodeError in zip names
    def check(damage):
        path = tmp_path / f"weights{suffix}"
        path.write_bytes(damaged(GOOD[suffix], damage))
        assert_loads_or_refuses(path)

    check()


@pytest.mark.parametrize("examples", depths(quick=10))
def test_safetensors_headers_that_lie(tmp_path, examples):
    @fuzz_settings(examples)
    @given(data=safetensors_header_edits())
    def check(data):
        path = tmp_path / "weights.safetensors"
        path.write_bytes(data)
        assert_loads_or_refuses(path)

    check()


@pytest.mark.parametrize("examples", depths(quick=10))
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_type_confused_state_dicts(tmp_path, examples, suffix):
    @fuzz_settings(examples)
    @given(state=confused_state())
    def check(state):
        path = tmp_path / f"weights{suffix}"
        if suffix == ".pt":
            path.write_bytes(pt_bytes(state))
        else:
            tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
            if len(tensors) != len(state) or any(v.dtype == torch.complex64 for v in tensors.values()):
                return  # safetensors holds only real tensors: nothing else can be written to the file
            path.write_bytes(st_save({k: v.contiguous() for k, v in tensors.items()}))
        assert_loads_or_refuses(path)

    check()


# --- model cards -------------------------------------------------------------------------------------
def zoo_card_and_weights() -> tuple[dict, bytes]:
    """The zoo's digits-mlp-standard card (short log) and weights: a card that checks out against them."""
    from robustbench_lite.zoo.cards import ZOO_DIR, read_cards

    card = copy.deepcopy(read_cards()["digits-mlp-standard"])
    card["training"]["log"] = card["training"]["log"][:1]
    return card, (ZOO_DIR / "weights" / card["weights"]).read_bytes()


@pytest.mark.parametrize("examples", depths(quick=10))
def test_model_cards_broken_field_by_field(tmp_path, monkeypatch, examples):
    """The card that `train` writes next to a weights file, with one field of a wrong type or value:
    load_model refuses it with one clear error or loads a model that runs; the files stay as they were."""
    monkeypatch.chdir(tmp_path)
    card, weights = zoo_card_and_weights()

    @fuzz_settings(examples)
    @given(edit=record_edit(card))
    @example(edit=(["num_classes"], "replace", 2**70))  # found: an overflow building the architecture
    @example(edit=(["architecture"], "replace", []))  # found: TypeError (unhashable list)
    @example(edit=(["verification"], "replace", True))  # found: TypeError (not subscriptable)
    def check(edit):
        work = fresh(tmp_path)
        (work / "mine.safetensors").write_bytes(weights)
        (work / "mine.card.json").write_text(json.dumps(apply_edit(card, edit)))
        before = snapshot(work)
        try:
            model = load_model(work / "mine.safetensors")
        except RobustBenchLiteError as err:
            assert str(err).strip() and "\n" not in str(err).strip()
        else:
            with torch.no_grad():
                assert model(DIGITS).shape == (DIGITS.shape[0], 10)
        assert snapshot(work) == before

    check()


# --- records -----------------------------------------------------------------------------------------
HOSTILE = st.sampled_from([None, True, False, 0, -1, 1, 2, 7, 1.5, -0.5, 1e308, -1e308, 2**70, "", "x", "NaN", [],
                           [0], [1, 2, 3], [0.5] * 8, [1] * 9, {}, {"a": 1}, {"fgsm": [1] * 8}, math.nan, math.inf,
                           "2026-13-45T99:99:99", "Linf", "L2", "corruptions", "0" * 64])


@st.composite
def record_edit(draw, record: dict) -> tuple[list, str, object]:
    """(path, operation, value): replace, delete or add one field somewhere in a record."""
    node, path = record, []
    while True:
        keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        path.append(key)
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        operation = draw(st.sampled_from(["replace", "replace", "delete", "add"] if isinstance(node, dict)
                                         else ["replace", "delete"]))
        return path, operation, draw(HOSTILE)


def apply_edit(record: dict, edit: tuple[list, str, object]) -> dict:
    record = copy.deepcopy(record)
    path, operation, value = edit
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if operation == "replace":
        parent[path[-1]] = value
    elif operation == "delete":
        del parent[path[-1]]
    else:
        parent["unknown_field"] = value
    return record


RECORD = Path("digits/Linf-0.05/digits-mlp-standard.json")
RECORD_COMMANDS = [["leaderboard", "show", "--leaderboard-dir", "b"],
                   ["leaderboard", "render", "--leaderboard-dir", "b"],
                   ["leaderboard", "regenerate", "--dry-run", "--leaderboard-dir", "b"],
                   ["evaluate", "--model", "digits-mlp-standard", "--dataset", "digits", "--eps", "0.05",
                    "--n-examples", "8", "--attacks", "pgd", "--certifiers", "none", "--no-progress",
                    "--leaderboard-dir", "b"]]


@pytest.mark.parametrize("examples", depths(quick=10))
def test_records_broken_field_by_field(tmp_path, monkeypatch, examples, one_record, board_with_a_record):
    """A record that parses but breaks the schema (or contradicts itself) in one field: read_record
    refuses it with a CorruptFileError or accepts it; show, render, regenerate --dry-run and an evaluate
    that merges into it keep the guarantee, and none of them rewrites a record it refused."""
    monkeypatch.chdir(tmp_path)
    from robustbench_lite.errors import CorruptFileError
    from robustbench_lite.leaderboard.records import read_record

    good = json.loads((one_record / RECORD).read_text())

    @fuzz_settings(examples)
    @given(edit=record_edit(good), command=st.sampled_from(RECORD_COMMANDS))
    @example(edit=(["certifiers", 0, "seconds"], "replace", math.nan), command=RECORD_COMMANDS[3])  # found
    @example(edit=(["per_example", "attack_success", "fgsm"], "delete", None), command=RECORD_COMMANDS[3])  # found
    @example(edit=(["mode"], "add", 1.0), command=RECORD_COMMANDS[2])  # found: exit 1 with no error line
    def check(edit, command):
        work = fresh(tmp_path)
        path = board_with_a_record(work / "b") / RECORD
        path.write_text(json.dumps(apply_edit(good, edit)))
        try:
            read_record(path)
            refused = False
        except CorruptFileError:
            refused = True
        checked_run(command, [work], protected=lambda p: p.endswith(".json") and (refused or "evaluate" not in command))

    check()


# --- registries --------------------------------------------------------------------------------------
def toml_value(value) -> str:
    """``value`` as a TOML literal (strings, numbers incl. nan/inf, booleans, dates, arrays, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_text(data: dict) -> str:
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, (dict, list))
             or (isinstance(v, list) and not all(isinstance(e, dict) for e in v)) or k not in ("defaults", "entry")]
    if isinstance(data.get("defaults"), dict):
        lines += ["[defaults]"] + [f"{json.dumps(k)} = {toml_value(v)}" for k, v in data["defaults"].items()]
    if isinstance(data.get("entry"), list) and all(isinstance(e, dict) for e in data["entry"]):
        for entry in data["entry"]:
            lines += ["[[entry]]"] + [f"{json.dumps(k)} = {toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


REGISTRY_DATA = {
    "defaults": {"split": "test", "seed": 0, "mode": "cascade", "batch_size": 250},
    "entry": [{"model": "digits-mlp-standard", "dataset": "digits", "norm": "Linf", "eps": [0.05],
               "attacks": ["fgsm", {"name": "pgd", "steps": 3}], "certifiers": ["ibp"], "n_examples": 8},
              {"model": "digits-mlp-standard", "dataset": "digits", "norm": "corruptions",
               "corruptions": ["gaussian_noise"], "n_examples": 8}],
}
REGISTRY_KEYS = ["model", "dataset", "split", "norm", "eps", "attacks", "certifiers", "n_examples", "seed", "mode",
                 "batch_size", "corruptions", "unknown"]
TOML_VALUES = st.sampled_from([
    0, -1, 1, 2**63 - 1, -2**63, 0.0, -0.5, 0.05, 1e308, math.nan, math.inf, -math.inf, True, False, "", "x", "Linf",
    "corruptions", "pgd", "0.05", "8/255", [], [0.05, 0.05], [0.05, "x"], [-1.0], [1e308], ["pgd", "pgd"], [""],
    [["pgd"]], [{"name": "pgd", "steps": -1}], [{"name": "pgd", "steps": "x"}], [{"name": "pgd", "nope": 1}],
    [{"name": 5}], [{"steps": 3}], [{"name": "pgd", "steps": {"a": 1}}], [{"name": "pgd", "steps": [1, [2]]}],
    {}, {"name": "pgd"}, datetime.date(2024, 1, 1), datetime.datetime(2024, 1, 1, 12, 0), ["gaussian_noise", "x"],
])


@st.composite
def registry_edit(draw) -> dict:
    """The test registry with one key of the defaults, of an entry, or of the top level set to a wrong type."""
    data = copy.deepcopy(REGISTRY_DATA)
    where = draw(st.sampled_from(["defaults", "entry0", "entry1", "top"]))
    if where == "top":
        data[draw(st.sampled_from(["defaults", "entry", "unknown"]))] = draw(TOML_VALUES)
        return data
    table = data["defaults"] if where == "defaults" else data["entry"][int(where[-1])]
    key = draw(st.sampled_from(REGISTRY_KEYS))
    if draw(st.integers(0, 5)) == 0:
        table.pop(key, None)
    else:
        table[key] = draw(TOML_VALUES)
    return data


@pytest.mark.parametrize("examples", depths(quick=15))
def test_registries_with_wrong_types(tmp_path, monkeypatch, examples, board_with_a_record):
    """Each key of the defaults, of an entry, or of the top level set to a wrong TOML type: load_registry
    refuses it with a UserInputError or accepts it, and show / render / regenerate --dry-run keep the
    guarantee without touching a record or the registry."""
    monkeypatch.chdir(tmp_path)
    from robustbench_lite.leaderboard.protocol import load_registry

    commands = [["leaderboard", action, "--leaderboard-dir", "b"] for action in ("show", "render")]
    commands.append(["leaderboard", "regenerate", "--dry-run", "--leaderboard-dir", "b"])

    @fuzz_settings(examples)
    @given(data=registry_edit(), command=st.sampled_from(commands))
    @example(data={**REGISTRY_DATA, "entry": 1}, command=commands[0])  # found: TypeError (not iterable)
    @example(data={**REGISTRY_DATA, "defaults": {"seed": math.nan}}, command=commands[2])  # found: ValueError
    @example(data={**REGISTRY_DATA, "defaults": {"n_examples": 2**63 - 1}}, command=commands[1])  # MemoryError
    def check(data, command):
        work = fresh(tmp_path)
        board = board_with_a_record(work / "b")
        (board / "registry.toml").write_text(toml_text(data))
        try:
            load_registry(board / "registry.toml")
        except RobustBenchLiteError as err:
            assert "\n" not in str(err)
        checked_run(command, [work], protected=lambda p: p.endswith((".json", ".toml")))

    check()


# --- resume shards -----------------------------------------------------------------------------------
def toy_run(runner=None, eps: float = 0.15, attacks=None):
    from test_evaluate import toy_dataset, toy_model

    from attacks import PGD
    from robustbench_lite.evaluation.core import evaluate
    from robustbench_lite.threat import ThreatModel

    return evaluate(toy_model(), toy_dataset(16), ThreatModel("Linf", eps), batch_size=4, runner=runner,
                    attacks=[PGD(steps=3)] if attacks is None else attacks, certifiers=["ibp"])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Shards of run A (key "A") and of run B (key "B": no attack, so other flags), and A's result."""
    from robustbench_lite.evaluation.resume import ResumeRunner

    root = tmp_path_factory.mktemp("shards")
    full = toy_run()
    toy_run(ResumeRunner(root / "A", "A"))
    toy_run(ResumeRunner(root / "B", "B"), eps=0.3, attacks=[])
    return root, full


def same_result(a, b) -> bool:
    return (torch.equal(a.correct, b.correct) and torch.equal(a.robust, b.robust)
            and torch.equal(a.certified, b.certified) and a.summary() == b.summary())


SHARDS = [f"batch-{i:07d}-{i + 4:07d}.safetensors" for i in range(0, 16, 4)]


@pytest.mark.parametrize("examples", depths(quick=8))
def test_damaged_swapped_or_foreign_shards_are_recomputed(tmp_path, monkeypatch, examples, two_runs):
    """A resumed run over shards that are truncated, damaged, taken from another evaluation (another
    key: other protocol or other run) or from other rows gives exactly the uninterrupted numbers."""
    monkeypatch.chdir(tmp_path)
    from robustbench_lite.evaluation.resume import ResumeRunner

    root, full = two_runs
    assert not same_result(toy_run(eps=0.3, attacks=[]), full)  # B's flags differ from A's: a swap would show

    @fuzz_settings(examples)
    @given(shard=st.sampled_from(SHARDS), how=st.sampled_from(["damage", "other run", "other rows", "manifest"]),
           damage=DAMAGE)
    def check(shard, how, damage):
        state = fresh(tmp_path) / "A"
        shutil.copytree(root / "A", state)
        target = state / shard
        if how == "damage":
            target.write_bytes(damaged(target.read_bytes(), damage))
        elif how == "other run":
            shutil.copy(root / "B" / shard, target)
        elif how == "other rows":
            shutil.copy(state / SHARDS[(SHARDS.index(shard) + 1) % len(SHARDS)], target)
        else:  # B's shards and manifest in A's folder: a stale folder, cleared before the run
            shutil.rmtree(state)
            shutil.copytree(root / "B", state)
        runner = ResumeRunner(state, "A")
        assert same_result(toy_run(runner), full)
        assert runner.loaded + runner.computed == len(SHARDS)

    check()


def fresh(tmp_path: Path) -> Path:
    """A new empty folder under ``tmp_path`` for one generated example, made the working folder (the
    commands' relative paths land there; the tests chdir back through monkeypatch)."""
    index = sum(1 for _ in tmp_path.iterdir())
    folder = tmp_path / f"example{index}"
    folder.mkdir()
    os.chdir(folder)
    return folder
