"""Fuzzing the library's doors: ``evaluate``, every registered attack and every certifier given inputs
outside [0, 1], wrong dtypes, shapes and devices, empty batches and labels out of range.

Each call either works (the inputs were fine after all) or raises a UserInputError whose message
names the argument at fault; never another exception.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from attacks import ATTACKS
from certify import CERTIFIERS
from robustbench_lite.data import Dataset, load_dataset
from robustbench_lite.errors import UserInputError
from robustbench_lite.evaluation.core import evaluate
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo import load_model

from fuzzing import depths, fuzz_settings

MODEL = load_model("digits-mlp-standard")
DIGITS = load_dataset("digits", "test").subset(slice(0, 6))
X, Y = DIGITS.x.clone(), DIGITS.y.clone()
#: cheap configurations of the expensive plug-ins (the point is the input checks, not their strength)
CHEAP = {"square": {"n_queries": 20}, "hsja": {"n_queries": 60, "init_num_evals": 10},
         "autoattack": {"steps": 5, "square_queries": 20}, "autoattack-ref": {"version": "rand"},
         "apgd": {"steps": 5}, "apgd-ce": {"steps": 5}, "apgd-t": {"steps": 5}, "fmn": {"steps": 5},
         "fmn-t": {"steps": 5}, "pgd": {"steps": 3}}
#: slow per call (an SDP per example; the reference AutoAttack): deep run only; their checks are the base class's
SLOW = {"sdp", "autoattack-ref"}

#: (argument, hostile value): every entry is wrong in a way the docs name
BAD_X = {
    "outside [0, 1]": X + 2, "negative": X - 1, "NaN": X.masked_fill(X > 0.5, float("nan")),
    "inf": X.masked_fill(X > 0.5, float("inf")), "float64": X.double(), "float16": X.half(),
    "int": (X * 255).to(torch.uint8), "bool": X > 0.5, "1-D": X.flatten(), "0-d": torch.tensor(0.5),
    "3-D": X[:, 0], "wrong size": X[:, :, :7, :7], "one channel more": torch.cat([X, X], 1),
    "list": X.tolist(), "numpy": X.numpy(), "meta": X.to("meta"), "None": None,
}
BAD_Y = {
    "negative": Y - 100, "too large": Y + 10, "huge": torch.full_like(Y, 2**40), "float": Y.float(),
    "bool": Y > 4, "2-D": Y[:, None], "shorter": Y[:-1], "longer": torch.cat([Y, Y]), "list": Y.tolist(),
    "numpy": Y.numpy(), "meta": Y.to("meta"), "None": None,
}
BAD_THREAT = {"dict": {"norm": "Linf", "eps": 0.1}, "str": "Linf", "None": None, "number": 0.1}


def names_the_argument(err: Exception, argument: str) -> bool:
    return re.search(rf"\b{argument}\b", str(err)) is not None


def plugin(kind: str, name: str):
    registry = ATTACKS if kind == "attack" else CERTIFIERS
    return registry.create(name, **CHEAP.get(name, {}))


PLUGINS = [("attack", n) for n in ATTACKS.names()] + [("certifier", n) for n in CERTIFIERS.names()]


@pytest.mark.parametrize("examples", depths(quick=12, deep=200))
def test_every_plugin_refuses_bad_inputs_naming_them(examples):
    plugins = PLUGINS if examples > 50 else [p for p in PLUGINS if p[1] not in SLOW]

    bad_inputs = ([("x", k) for k in sorted(BAD_X)] + [("y", k) for k in sorted(BAD_Y)]
                  + [("threat", k) for k in sorted(BAD_THREAT)] + [("empty", "")])

    @fuzz_settings(examples)
    @given(which=st.sampled_from(plugins), argument_bad=st.sampled_from(bad_inputs), norm=st.sampled_from(["Linf", "L2"]))
    @example(which=("attack", "apgd"), argument_bad=("y", "too large"), norm="Linf")  # found: IndexError
    @example(which=("attack", "hsja"), argument_bad=("y", "negative"), norm="Linf")  # found: accepted, nonsense
    @example(which=("attack", "pgd"), argument_bad=("x", "float64"), norm="L2")  # found: dtype RuntimeError
    @example(which=("attack", "fgsm"), argument_bad=("x", "meta"), norm="Linf")  # found: meta tensors
    @example(which=("certifier", "ibp"), argument_bad=("threat", "dict"), norm="Linf")  # found: AttributeError
    @example(which=("certifier", "crown"), argument_bad=("x", "wrong size"), norm="Linf")  # found: shape error
    @example(which=("attack", "square"), argument_bad=("y", "None"), norm="Linf")  # found: AttributeError
    def check(which, argument_bad, norm):
        threat = ThreatModel(norm, 0.1)
        (argument, bad), x, y = argument_bad, X, Y
        if argument == "x":
            x = BAD_X[bad]
        elif argument == "y":
            y = BAD_Y[bad]
        elif argument == "threat":
            threat = BAD_THREAT[bad]
        elif argument == "empty":
            x, y = X[:0], Y[:0]
        try:
            result = plugin(*which)(MODEL, x, y, threat)
        except UserInputError as err:
            assert argument != "empty", err
            assert names_the_argument(err, argument), f"{which} on bad {argument} ({bad}): {err}"
        else:  # accepted: only inputs that are fine after all (float16 / float64 are converted, empty works)
            n = 0 if argument == "empty" else X.shape[0]
            flags = result.success if which[0] == "attack" else result.certified
            assert flags.shape == (n,), (which, argument, bad)

    check()


def make_dataset(x, y) -> Dataset:
    return Dataset(name="fuzz", split="test", x=x, y=y, num_classes=10)


@pytest.mark.parametrize("examples", depths(quick=12, deep=200))
def test_evaluate_refuses_bad_inputs_naming_them(examples):
    good = dict(model=MODEL, dataset=DIGITS, threat=ThreatModel("Linf", 0.1), attacks=["fgsm"], certifiers=["ibp"],
                n_examples=6, batch_size=3, seed=0, device="cpu")
    bad_values = {
        "model": [None, "digits-mlp-standard", lambda x: x, torch.nn.Identity(), torch.nn.Linear(3, 3)],
        "dataset": [None, "no-such-dataset", (X + 2, Y), (X, Y + 10), (X, Y - 20), (X, Y.float()), (X[:0], Y[:0]),
                    (X[:, :, :7], Y), (X, Y[:-1]), X],
        "threat": list(BAD_THREAT.values()),
        "attacks": [["no-such-attack"], [None], [3], [lambda *a, **k: None], "pgd,,nope"],
        "certifiers": [["no-such-certifier"], [None], [3]],
        "n_examples": [0, -1, 1.5, "6", None, 2**70, float("nan")],
        "batch_size": [0, -1, 1.5, "3", None, 2**70, float("inf")],
        "seed": [1.5, "0", None, float("nan")],
        "device": ["meta", "cuda:99", "", None, "xla", 3.5],
    }

    pairs = [(argument, value) for argument, values in sorted(bad_values.items()) for value in values]

    @fuzz_settings(examples)
    @given(pair=st.sampled_from(pairs))
    @example(pair=("n_examples", None))  # all of the split
    @example(pair=("seed", None))  # found: TypeError from int(None)
    @example(pair=("dataset", X))  # found: AttributeError (no subset)
    @example(pair=("attacks", [lambda *a, **k: None]))  # found: TypeError when the evaluator called it
    def check(pair):
        argument, value = pair
        try:
            if argument == "dataset" and isinstance(value, tuple):  # built inside: Dataset checks its arrays
                value = make_dataset(*value)
            evaluate(**{**good, argument: value})
        except UserInputError as err:
            named = {"dataset": "dataset|x|y|inputs|labels|classes|examples", "attacks": "attack",
                     "certifiers": "certifier", "model": "model"}.get(argument, argument)
            assert re.search(named, str(err)), f"{argument}={value!r}: {err}"
        else:
            # None examples: all of them; a batch larger than the split: one batch
            assert argument in ("n_examples", "batch_size") and (value is None or value > 0), (argument, value)

    check()
