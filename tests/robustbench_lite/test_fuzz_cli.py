"""Fuzzing the command line in-process: generated arguments for evaluate, train, zoo and leaderboard.

Each generated command line starts from a valid, cheap one and replaces some options by hostile
values (see fuzzing.py), so most runs get past the parser and reach the library. Every run must end
with exit 0, or one ``robustbench-lite: error:`` line (exit 2; 1 when the OS refused a write), with
no traceback and, on error, no file written or changed (see fuzzing.checked_run).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import save_file

from robustbench_lite.zoo import load_model
from robustbench_lite.zoo.architectures import digits_mlp

from fuzzing import NAME_TEXT, NUMBER_TEXT, checked_run, depths, fuzz_settings

MODEL = "digits-mlp-standard"


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """``fresh()`` makes a new working folder for one generated command (and chdirs there): records,
    results and caches cannot reach the checkout, and no run sees another's files."""
    counter = iter(range(10**9))
    torch.manual_seed(0)
    state = digits_mlp().state_dict()

    def fresh() -> Path:
        work = tmp_path / f"run{next(counter)}"
        work.mkdir()
        os.chdir(work)
        os.environ["RBL_LEADERBOARD_DIR"] = str(work / "default-board")
        os.environ["RBL_RESULTS_DIR"] = str(work / "default-results")
        save_file(state, str(work / "mlp.safetensors"))
        (work / "afile").write_text("not a folder")
        return work

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RBL_LEADERBOARD_DIR", str(tmp_path / "unused"))
    monkeypatch.setenv("RBL_RESULTS_DIR", str(tmp_path / "unused"))
    return fresh


def optional(option: str, values: st.SearchStrategy) -> st.SearchStrategy:
    """``[option, value]`` (a later one wins over the valid base), or rarely the bare option."""
    return st.one_of(values.map(lambda v: [option, v]), values.map(lambda v: [option, v]),
                     values.map(lambda v: [option, v]), st.just([option]))


def plugin_lists(names: list[str]) -> st.SearchStrategy:
    return st.one_of(st.lists(st.sampled_from(names), max_size=3).map(",".join), NAME_TEXT)


CHEAP_ATTACKS = ["fgsm", "pgd", "apgd", "fmn", "hsja"]
ALL_ATTACKS = CHEAP_ATTACKS + ["apgd-ce", "apgd-t", "fmn-t", "square", "autoattack"]
CHEAP_CERTIFIERS = ["ibp", "crown"]
ALL_CERTIFIERS = CHEAP_CERTIFIERS + ["alpha-crown", "lp"]
DEVICES = ["cpu", "CPU", "cpu:0", "cpu:-1", "cuda", "cuda:0", "cuda:99", "meta", "mps", "xla", "gpu", "cpu,cuda"]


EVALUATE = ["evaluate", "--model", MODEL, "--dataset", "digits", "--eps", "0.05", "--n-examples", "6",
            "--attacks", "fgsm", "--certifiers", "ibp", "--no-progress", "--leaderboard-dir", "board"]
EVALUATE_NUMBERS = ["--eps", "--n-examples", "--batch-size", "--seed"]


def evaluate_names(deep: bool) -> dict[str, st.SearchStrategy]:
    """Each name option of ``evaluate``: its valid values, near misses, and hostile text."""
    def names(*valid: str) -> st.SearchStrategy:
        return st.one_of(st.sampled_from(valid), NAME_TEXT)

    models = names(MODEL, "mnist5k-cnn-standard", "mlp.safetensors", "afile", ".", "board", "torch.nn:Flatten",
                   "torch.nn:Identity", "torch.nn:Linear", "builtins:dict", "sys:exit", "no_such_module:f",
                   "os.path:sep", "missing.safetensors", "missing.pt")
    return {
        "--model": models, "--arch": names("digits-mlp", "mnist-cnn", "colored-cnn"),
        "--dataset": names("digits", "mnist5k", "colored-mnist5k", "cifar10"),
        "--split": names("test", "train", "val", "TEST"), "--threat": names("lp", "corruptions"),
        "--corruptions": names("gaussian_noise", "jpeg,contrast", "all"),
        "--norm": names("Linf", "L2", "linf", "inf", "2", "l_2", "L1", "L0"),
        "--attacks": plugin_lists(ALL_ATTACKS if deep else CHEAP_ATTACKS),
        "--certifiers": plugin_lists(ALL_CERTIFIERS if deep else CHEAP_CERTIFIERS),
        "--device": names(*DEVICES),
        "--leaderboard-dir": st.sampled_from(["afile", "afile/sub", "new/deep/board", "", ".", "board"]),
        "--data-dir": names("data", "afile", ""),
    }


@st.composite
def evaluate_argv(draw, deep: bool) -> list[str]:
    """Several options replaced at once (numbers, names, flags), and global flags or junk around them."""
    options = {**{o: NUMBER_TEXT for o in EVALUATE_NUMBERS}, **evaluate_names(deep)}
    argv = list(EVALUATE)
    for option in draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=4)):
        argv += draw(optional(option, options[option]))
    flags = ["--individual", "--no-write", "--replace", "--json", "--no-resume", "--no-defense-metrics"]
    argv += draw(st.lists(st.sampled_from(flags + (["--masking-checks"] if deep else [])), max_size=3, unique=True))
    return draw(st.sampled_from([[], [], [], ["-v"], ["--help"], ["--version"], ["--bogus"]])) + argv + draw(
        st.sampled_from([[]] * 8 + [["stray"], ["--bogus"], ["--help"]]))


@pytest.mark.parametrize("examples", depths())
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_fuzzed_evaluate_numbers(sandbox, examples, norm):
    """eps, n-examples, batch size and seed: huge, tiny, negative, zero, NaN, inf, fractions, junk."""
    @fuzz_settings(examples)
    @given(option=st.sampled_from(EVALUATE_NUMBERS), value=NUMBER_TEXT)
    @example(option="--eps", value="1e39")  # found: a float32 overflow inside PGD (the example)
    @example(option="--eps", value="3.4e38")  # found: APGD's 2 * eps overflowed
    def check(option, value):
        checked_run([*EVALUATE, "--norm", norm, option, value], [sandbox()], allowed=(0, 1, 2))

    check()


@pytest.mark.parametrize("examples", depths())
def test_fuzzed_evaluate_names(sandbox, examples):
    """Each name option: unknown, empty, unicode, path-like, option-like, and its near misses."""
    names = evaluate_names(examples > 50)

    @fuzz_settings(examples)
    @given(option_value=st.sampled_from(sorted(names)).flatmap(lambda o: st.tuples(st.just(o), names[o])))
    @example(option_value=("--device", "meta"))  # found: meta / mps / xla passed the device check
    @example(option_value=("--model", "sys:exit"))  # found: a factory's SystemExit ended the run with exit 0
    @example(option_value=("--leaderboard-dir", "afile"))  # found: an OSError after the whole evaluation
    @example(option_value=("--data-dir", "a\x00b"))  # found: ValueError (embedded null byte)
    def check(option_value):
        code, out, _ = checked_run([*EVALUATE, *option_value], [sandbox()], allowed=(0, 1, 2))
        assert code != 0 or out.strip()

    check()


@pytest.mark.parametrize("examples", depths())
def test_fuzzed_evaluate_command_lines(sandbox, examples):
    """Combinations: norm vs attack support, certifier vs model, threat vs options, flags."""
    @fuzz_settings(examples)
    @given(argv=evaluate_argv(examples > 50))
    def check(argv):
        code, out, _ = checked_run(argv, [sandbox()], allowed=(0, 1, 2))
        assert code != 0 or out.strip()  # exit 0 means a result (or the help) was printed

    check()


TRAIN = ["train", "--dataset", "digits", "--arch", "digits-mlp", "--epochs", "1", "--batch-size", "200",
         "--no-progress", "--attack-steps", "2", "--out", "runs/0"]


@st.composite
def train_argv(draw) -> list[str]:
    argv = [*TRAIN[:-2], "--out", f"runs/{draw(st.integers(0, 10**6))}"]
    small = st.sampled_from(["1", "2"])
    options = [
        optional("--defense", st.one_of(st.sampled_from(["standard", "pgd-at", "trades", "ibp", "wrm", "augmix",
                                                         "group-dro", "rst"]), NAME_TEXT)),
        optional("--dataset", st.one_of(st.sampled_from(["digits", "colored-mnist5k"]), NAME_TEXT)),
        optional("--arch", st.one_of(st.sampled_from(["digits-mlp", "mnist-cnn"]), NAME_TEXT)),
        optional("--epochs", st.one_of(small, NUMBER_TEXT.filter(lambda t: not t.strip().isdigit()))),
        optional("--batch-size", NUMBER_TEXT), optional("--lr", NUMBER_TEXT), optional("--momentum", NUMBER_TEXT),
        optional("--weight-decay", NUMBER_TEXT), optional("--seed", NUMBER_TEXT),
        optional("--lr-schedule", st.one_of(st.sampled_from(["constant", "cosine"]), NAME_TEXT)),
        optional("--optimizer", st.one_of(st.sampled_from(["adam", "sgd"]), NAME_TEXT)),
        optional("--device", st.one_of(st.sampled_from(DEVICES), NAME_TEXT)),
        optional("--out", st.sampled_from(["afile", "afile/x", "", ".", "runs/same"])),
        optional("--name", NAME_TEXT),
        optional("--select", st.one_of(st.just("worst-group-val"), NAME_TEXT)),
        optional("--eps", NUMBER_TEXT), optional("--norm", st.one_of(st.sampled_from(["Linf", "L2"]), NAME_TEXT)),
        optional("--attack-steps", st.one_of(small, NUMBER_TEXT.filter(lambda t: not t.strip().isdigit()))),
        optional("--attack-step-size", NUMBER_TEXT), optional("--eps-ramp-epochs", NUMBER_TEXT),
        optional("--beta", NUMBER_TEXT), optional("--gamma", NUMBER_TEXT),
        optional("--wrm-steps", st.one_of(small, NUMBER_TEXT.filter(lambda t: not t.strip().isdigit()))),
        optional("--kappa-final", NUMBER_TEXT), optional("--ibp-warmup", NUMBER_TEXT),
        optional("--ibp-ramp", NUMBER_TEXT),
        optional("--jsd-lambda", NUMBER_TEXT), optional("--augmix-severity", NUMBER_TEXT),
        optional("--augmix-width", st.one_of(small, NUMBER_TEXT.filter(lambda t: not t.strip().isdigit()))),
        optional("--augmix-depth", st.one_of(small, NUMBER_TEXT.filter(lambda t: not t.strip().isdigit()))),
        optional("--eta-q", NUMBER_TEXT), optional("--group-adjustment", NUMBER_TEXT), optional("--l2", NUMBER_TEXT),
        optional("--unlabeled-fraction", NUMBER_TEXT), optional("--teacher-lr", NUMBER_TEXT),
        optional("--teacher-epochs", st.one_of(small, NUMBER_TEXT.filter(lambda t: not t.strip().isdigit()))),
        optional("--teacher-batch-size", NUMBER_TEXT),
    ]
    for extra in draw(st.lists(st.sampled_from(options), max_size=4)):
        argv += draw(extra)
    argv += draw(st.lists(st.sampled_from(["--resume", "--bogus", "stray"]), max_size=1))
    return argv


@pytest.mark.parametrize("examples", depths(quick=8))
def test_fuzzed_train_command_lines(sandbox, examples):
    """Exit 0 means a model was written that loads back (its card's checks pass); an error writes nothing
    but the epoch checkpoint a --resume would continue from."""
    @fuzz_settings(examples)
    @given(argv=train_argv())
    @example(argv=TRAIN + ["--weight-decay", "1e300"])  # found: a float32 overflow inside Adam
    @example(argv=TRAIN + ["--lr", "1e39"])  # found: the same, through the learning rate
    @example(argv=TRAIN + ["--device", ""])  # found: RuntimeError from torch.device
    @example(argv=TRAIN + ["--name", "a/../b"])  # found: a name that is a path escaped --out
    @example(argv=TRAIN + ["--defense", "augmix", "--jsd-lambda", "inf"])  # found: inf weights accepted
    def check(argv):
        work = sandbox()
        code, _, _ = checked_run(argv, [work], allowed=(0, 1, 2), resume_state=("ckpt", "best"))
        if code == 0 and "--help" not in argv:
            out = work / argv[len(argv) - 1 - argv[::-1].index("--out") + 1]
            (card,) = out.glob("*.card.json")
            load_model(card.with_name(card.name.replace(".card.json", ".safetensors")))

    check()


@st.composite
def board_argv(draw) -> list[str]:
    """``zoo list`` and ``leaderboard show|render|regenerate`` with their options, mostly on the test board."""
    dirs = st.sampled_from(["board", "board", "board", "afile", "missing", "", ".", "board/digits"])
    registries = st.sampled_from(["board/registry.toml", "afile", "missing.toml", "", ".", "board", "mlp.safetensors"])
    common = [optional("--leaderboard-dir", dirs), optional("--root", dirs), optional("--registry", registries)]
    action = draw(st.sampled_from(["show", "render", "regenerate", "list"]))
    if action == "list":
        return ["zoo", "list"] + draw(st.sampled_from([[]] * 4 + [["--bogus"], ["stray"]]))
    options = common + {
        "show": [optional("--dataset", st.one_of(st.sampled_from(["digits", "mnist5k"]), NAME_TEXT))],
        "render": [],
        "regenerate": [optional("--only", st.one_of(st.sampled_from(["*", "digits/*", "nothing"]), NAME_TEXT)),
                       st.just(["--dry-run"]), st.just(["--dry-run"]), st.just(["--force"]), st.just(["--no-resume"])],
    }[action] + [st.just(["--bogus"])]
    argv = ["leaderboard", action, "--leaderboard-dir", "board"]
    for extra in draw(st.lists(st.sampled_from(options), max_size=3)):
        argv += draw(extra)
    return argv


@pytest.mark.parametrize("examples", depths(quick=20))
def test_fuzzed_zoo_and_leaderboard_command_lines(sandbox, examples, board_with_a_record):
    @fuzz_settings(examples)
    @given(argv=board_argv())
    @example(argv=["leaderboard", "show", "--leaderboard-dir", "board", "--registry", "mlp.safetensors"])  # found
    @example(argv=["leaderboard", "regenerate", "--root", "afile", "--force"])  # found: OSError after the work
    @example(argv=["leaderboard", "render", "--leaderboard-dir", "board", "--registry", "afile/registry.toml"])
    def check(argv):
        work = sandbox()
        board = board_with_a_record(work / "board")
        rewrites = "regenerate" in argv and "--dry-run" not in argv  # a real regenerate replaces its records
        code, _, _ = checked_run(argv, [work], allowed=(0, 1, 2),
                                 protected=lambda p: p.endswith(".toml") or (p.endswith(".json") and not rewrites))
        if "regenerate" in argv and "--dry-run" not in argv and code == 0:
            assert board.joinpath("README.md").exists()

    check()
