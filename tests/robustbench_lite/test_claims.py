"""The evaluator trusts no plug-in's word (issue 13 item 4, issue 11 "counterexamples count"): lying
attacks and certifiers are caught, checked counterexamples count against robust accuracy, complete
verification closes the certified/robust gap, and a certifier can run on a prefix of the examples."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_evaluate import K, TEMPLATES, LinearExact, toy_dataset, toy_model

from attacks import AttackResult
from certify import MIP
from certify.base import CertResult, Certifier
from robustbench_lite.evaluation.claims import NOT_MISCLASSIFIED, OUTSIDE, check_points
from robustbench_lite.data.dataset import Dataset
from robustbench_lite.errors import SoundnessError, UserInputError
from robustbench_lite.evaluation.core import evaluate
from robustbench_lite.leaderboard.records import build_record
from robustbench_lite.evaluation.outcome import BatchOutcome
from robustbench_lite.evaluation.resume import ResumeRunner
from robustbench_lite.threat import ThreatModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "certify"))
from _exact import random_net  # noqa: E402

EPS = 0.05


class LyingAttack:
    """A third-party attack (no Attack base class, so nothing projects or re-scores its points) that claims
    every example: ``how`` = "outside" (a point past the ball) or "correct" (the clean point itself)."""

    name = "liar"

    def __init__(self, how: str) -> None:
        self.how = how

    def __call__(self, model, x, y, threat, seeds=None):
        x_adv = (x + 3 * threat.eps).clamp(0, 1) if self.how == "outside" else x.clone()
        return AttackResult(x_adv=x_adv, success=torch.ones(x.shape[0], dtype=torch.bool), forward=x.shape[0])


class CounterexampleCertifier(Certifier):
    """Returns ``point(x, y)`` as the counterexample of every example whose first pixel is < 0.5
    (NaN rows elsewhere): honest when the point is adversarial, a liar otherwise."""

    name = "finder"

    def __init__(self, point) -> None:
        self.point = point

    def run(self, model, x, y, threat):
        found = x.flatten(1)[:, 0] < 0.5
        points = torch.where(found.view(-1, 1, 1, 1), self.point(x, y), torch.full_like(x, float("nan")))
        return CertResult(torch.zeros(x.shape[0], dtype=torch.bool), torch.zeros(x.shape[0], K),
                          ["not_certified"] * x.shape[0], counterexample=points)


def test_check_points_in_float64_with_eps_as_given():
    model, ds = toy_model(), toy_dataset(6)
    threat = ThreatModel("Linf", 0.1)
    other = TEMPLATES[(ds.y + 1) % K]
    check = check_points(model, (ds.x + 0.1).clamp(0, 1), ds.x, ds.y, threat)
    assert check.inside.all()  # exactly eps away (float32 rounding within the tolerance)
    check = check_points(model, other, ds.x, ds.y, threat)
    assert not check.inside.any() and check.misclassified.all()
    nan = torch.full_like(ds.x, float("nan"))
    check = check_points(model, nan, ds.x, ds.y, threat)
    assert not check.inside.any() and not check.misclassified.any()


@pytest.mark.parametrize("individual", [False, True])
@pytest.mark.parametrize("how,reason", [("outside", "outside"), ("correct", "correct")])
def test_a_lying_attack_is_a_soundness_error_naming_it(how, reason, individual):
    ds = toy_dataset(16)
    with pytest.raises(SoundnessError, match="rejected_claims.*attack 'liar'") as info:
        evaluate(toy_model(), ds, ThreatModel("Linf", EPS), attacks=[LyingAttack(how)], certifiers=(),
                 batch_size=8, individual=individual)
    result = info.value.result
    flag = result.flags[0]
    assert flag["name"] == "rejected_claims" and flag["values"][f"{reason}_liar"]
    # the rejected claims were not counted: the robust flags are those of no attack at all
    assert not result.attack_success["liar"].any() and torch.equal(result.robust, result.correct)
    code = OUTSIDE if how == "outside" else NOT_MISCLASSIFIED
    assert ((result.rejected["liar"] == code) == result.correct).all()


@pytest.mark.parametrize("point,reason", [(lambda x, y: x, "correct"),
                                          (lambda x, y: TEMPLATES[(y + 1) % K], "outside")])
def test_a_lying_certifier_counterexample_is_a_soundness_error_naming_it(point, reason):
    with pytest.raises(SoundnessError, match="certifier 'finder'") as info:
        evaluate(toy_model(), toy_dataset(16), ThreatModel("Linf", EPS), attacks=(),
                 certifiers=[CounterexampleCertifier(point)], batch_size=8)
    result = info.value.result
    assert result.flags[0]["values"][f"{reason}_finder"] and not result.refuted_by.get("finder", torch.zeros(1)).any()


def test_a_checked_counterexample_counts_against_robust_accuracy_and_the_record_names_its_finder():
    ds, model = toy_dataset(16), toy_model()
    threat = ThreatModel("Linf", 1.0)  # the other class's template is inside the ball
    finder = CounterexampleCertifier(lambda x, y: TEMPLATES[(y + 1) % K])
    expensive = type("Expensive", (LinearExact,), {"name": "expensive", "skip_refuted": True})()
    r = evaluate(model, ds, threat, attacks=(), certifiers=[finder, expensive], batch_size=8)
    expected = r.correct & (ds.x.flatten(1)[:, 0] < 0.5)
    assert expected.any() and torch.equal(r.refuted_by["finder"], expected)
    assert torch.equal(r.robust, r.correct & ~expected) and r.flags == []
    counts = r.certifiers[1].status_counts  # an expensive certifier skips what the counterexamples refuted
    assert counts["skipped"] == int(expected.sum())
    record = build_record(r, None, model, name="toy")
    assert record["per_example"]["refuted_by"]["finder"] == [int(v) for v in expected.tolist()]
    entry = next(c for c in record["certifiers"] if c["name"] == "finder")
    assert entry["n_refuted"] == int(expected.sum()) and record["robust_acc"] == r.robust_acc


def test_complete_verification_closes_the_gap_and_its_counterexamples_count():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), random_net((2, 12, 12, 3), 1)).eval()
    x = torch.rand(40, 1, 1, 2)
    ds = Dataset(name="plane", split="test", x=x, y=model(x).argmax(1).detach(), num_classes=3)
    r = evaluate(model, ds, ThreatModel("Linf", 0.1), attacks=(), certifiers=[MIP()], batch_size=16)
    assert r.refuted_by["mip"].any() and r.certified.any()
    assert torch.equal(r.certified, r.robust)  # every example decided: certified = robust
    assert r.flags == []


def test_a_certifier_runs_on_a_stated_prefix():
    ds = toy_dataset(12)
    r = evaluate(toy_model(), ds, ThreatModel("Linf", 0.15), attacks=(), certifiers=[LinearExact(), "ibp"],
                 batch_size=4, certifier_examples={"linear-exact": 5, "ibp": 99})
    assert r.certifier_examples == {"linear-exact": 5}  # a prefix covering everything is no prefix
    assert not r.certified_by["linear-exact"][5:].any() and r.certified_by["linear-exact"][:5].any()
    assert r.certifiers[0].status_counts["skipped"] == 7
    record = build_record(r, None, toy_model(), name="toy")
    exact, ibp = record["certifiers"]
    assert exact["n_examples"] == 5 and ibp["n_examples"] == 12
    cert = record["certification"]
    assert cert["n_examples"] == 5 and cert["unresolved"] == pytest.approx(cert["robust_acc"] - cert["certified_acc"])
    with pytest.raises(UserInputError, match="not among the certifiers"):
        evaluate(toy_model(), ds, ThreatModel("Linf", 0.15), certifiers=["ibp"], certifier_examples={"bab": 3})
    with pytest.raises(UserInputError, match="positive integer"):
        evaluate(toy_model(), ds, ThreatModel("Linf", 0.15), certifiers=["ibp"], certifier_examples={"ibp": 0})


def test_resume_shards_carry_counterexamples_and_rejections(tmp_path):
    out = BatchOutcome(start=0, stop=3, correct=torch.ones(3, dtype=torch.bool), success={}, robust_after={},
                       certified={"mip": torch.zeros(3, dtype=torch.bool)}, x_worst=torch.rand(3, 2),
                       logits=torch.randn(3, 3), refuted={"mip": torch.tensor([True, False, True])},
                       rejected={"liar": torch.tensor([0, OUTSIDE, NOT_MISCLASSIFIED], dtype=torch.uint8)})
    store = ResumeRunner(tmp_path / "state", "key")
    store._prepare()
    store.save(out)
    back = store.load(0, 3)
    assert torch.equal(back.refuted["mip"], out.refuted["mip"])
    assert torch.equal(back.rejected["liar"], out.rejected["liar"])
    ds = toy_dataset(16)
    finder = CounterexampleCertifier(lambda x, y: TEMPLATES[(y + 1) % K])
    first = evaluate(toy_model(), ds, ThreatModel("Linf", 1.0), attacks=(), certifiers=[finder], batch_size=8,
                     runner=ResumeRunner(tmp_path / "run", "k"))
    resumed = ResumeRunner(tmp_path / "run", "k")
    again = evaluate(toy_model(), ds, ThreatModel("Linf", 1.0), attacks=(), certifiers=[finder], batch_size=8,
                     runner=resumed)
    assert resumed.loaded == 2 and first.refuted_by["finder"].any()
    assert torch.equal(first.refuted_by["finder"], again.refuted_by["finder"])
    assert torch.equal(first.robust, again.robust)
