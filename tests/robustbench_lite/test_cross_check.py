"""The certifier cross-check (``evaluate(..., cross_check=...)``, ``--cross-check``, regeneration): every
certifier, the ``skip_refuted`` ones too, runs on a seeded sample of refuted examples and must certify none."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from test_evaluate import K, LinearExact, _marked, toy_model
from test_regenerate import registry

from attacks import PGD
from certify import CERTIFIERS
from certify.base import CERTIFIED, NOT_CERTIFIED, CertResult, Certifier
from robustbench_lite import cli
from robustbench_lite.data import load_dataset
from robustbench_lite.errors import SoundnessError, UserInputError
from robustbench_lite.evaluation.core import evaluate
from robustbench_lite.leaderboard.regenerate import regenerate
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo import load_model


class CertifyCorrect(Certifier):
    """Unsound but careful: certifies every correctly classified example it is shown and, as an expensive
    certifier, is shown only the examples no attack refuted, so certified <= robust never fails."""

    name = "certify-correct"
    skip_refuted = True

    def run(self, model, x, y, threat):
        ok = model(x).argmax(1) == y
        return CertResult(ok, torch.zeros(len(y), K), [CERTIFIED if o else NOT_CERTIFIED for o in ok.tolist()])


class Spy(Certifier):
    """A certifier that records the example ids (pixel 0 of :func:`_marked`) of every call."""

    def __init__(self, inner: Certifier) -> None:
        self.inner, self.name, self.calls = inner, inner.name, []
        self.skip_refuted = inner.skip_refuted

    def unsupported(self, model, input_shape):
        return self.inner.unsupported(model, input_shape)

    def run(self, model, x, y, threat):
        self.calls.append(sorted((x.flatten(1)[:, 0] * 1000).round().long().tolist()))
        return self.inner(model, x, y, threat)


def test_an_unsound_certifier_that_skips_refuted_examples_is_caught_only_by_the_cross_check():
    ds, model, threat = _marked(36), toy_model(), ThreatModel("Linf", 0.15)
    plain = evaluate(model, ds, threat, attacks=[PGD(steps=20)], certifiers=[CertifyCorrect()])
    refuted = (plain.correct & ~plain.robust).nonzero().flatten().tolist()
    assert refuted and not plain.violations  # the certified <= robust check cannot see it
    with pytest.raises(SoundnessError, match="certified_refuted_example") as info:
        evaluate(model, ds, threat, attacks=[PGD(steps=20)], certifiers=[CertifyCorrect()], cross_check=True)
    flag = info.value.result.flags[-1]
    assert "certify-correct" in flag["explanation"] and set(flag["values"]["indices"]) <= set(refuted)
    assert flag["values"]["checked"] == min(16, len(refuted))


def test_the_sample_is_seeded_and_independent_of_the_batch_size():
    ds, model, threat = _marked(36), toy_model(), ThreatModel("Linf", 0.15)
    samples = []
    for batch_size, seed in ((36, 0), (5, 0), (36, 1)):
        spy = Spy(LinearExact())
        r = evaluate(model, ds, threat, attacks=[PGD(steps=20)], certifiers=[spy], batch_size=batch_size,
                     seed=seed, cross_check=4)
        refuted = (r.correct & ~r.robust).nonzero().flatten().tolist()
        last = -(-4 // batch_size)  # the cross-check's calls: its 4 examples in batches
        checked = sorted(i for call in spy.calls[-last:] for i in call)
        assert len(checked) == 4 and set(checked) <= set(refuted)
        samples.append(checked)
    assert samples[0] == samples[1]  # the run seed picks the sample, not the batches
    with pytest.raises(UserInputError):
        evaluate(model, ds, threat, attacks=(), certifiers=(), cross_check=-1)


@pytest.mark.parametrize("model_name, dataset, eps, certifiers", [
    ("digits-mlp-standard", "digits", 0.3, ["ibp", "crown", "alpha-crown", "lp"]),
    ("mnist5k-cnn-pgd-at", "mnist5k", 0.4, ["ibp", "crown", "alpha-crown", "lp", "sdp"]),
    ("mnist5k-cnn-ibp", "mnist5k", 0.4, ["ibp", "crown"]),
])
def test_no_certifier_certifies_a_refuted_example_of_a_zoo_model(model_name, dataset, eps, certifiers):
    """Every registered certifier (LP and SDP skip the CNNs: too large; the SDP of a digit, 64 free inputs,
    costs seconds per example: it has its own small network below) on up to 6 refuted examples."""
    spies = [Spy(CERTIFIERS.create(name)) for name in certifiers]
    for spy in spies:  # fewer slopes and solver iterations: the cross-check, not the tightness, is tested
        if spy.name == "alpha-crown":
            spy.inner.alpha_steps = 3
    data = load_dataset(dataset, "test").subset(slice(0, 16))
    r = evaluate(load_model(model_name), data, ThreatModel("Linf", eps), attacks=[PGD(steps=10, rel_stepsize=0.25)],
                 certifiers=spies, cross_check=6)
    refuted = int((r.correct & ~r.robust).sum())
    assert refuted >= 1
    for spy in spies:  # each certifier's last call is the cross-check's, on refuted examples only
        assert len(spy.calls[-1]) == min(6, refuted), spy.name


def test_every_registered_certifier_passes_the_cross_check_on_a_small_relu_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, K)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.cat([toy_model()[1].weight, -toy_model()[1].weight, torch.randn(2, 16)]))
        model[3].weight.copy_(torch.cat([torch.eye(K), -torch.eye(K), torch.zeros(K, 2)], 1))
        model[3].bias.copy_(toy_model()[1].bias)
    spies = [Spy(CERTIFIERS.create(name)) for name in CERTIFIERS.names()]
    r = evaluate(model, _marked(24), ThreatModel("Linf", 0.15), attacks=[PGD(steps=20)], certifiers=spies,
                 cross_check=4)
    refuted = (r.correct & ~r.robust).nonzero().flatten().tolist()
    assert len(refuted) >= 4 and r.certified.any()
    for spy in spies:
        assert len(spy.calls[-1]) == 4 and set(spy.calls[-1]) <= set(refuted), spy.name


def test_cli_flag_and_regeneration_run_the_cross_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(CERTIFIERS._factories, "certify-correct", CertifyCorrect)
    root = tmp_path / "board"
    path = registry(root, steps=30)
    path.write_text(path.read_text().replace('certifiers = ["ibp"]', 'certifiers = ["certify-correct"]')
                    .replace("eps = [0.05, 0.1]", "eps = [0.3]"))
    report = regenerate(root, path)
    assert list(report.failed) and "certified_refuted_example" in next(iter(report.failed.values()))
    code = cli.main(["evaluate", "--model", "digits-mlp-standard", "--dataset", "digits", "--eps", "0.1",
                     "--attacks", "pgd", "--certifiers", "certify-correct", "--n-examples", "40", "--no-write",
                     "--no-progress", "--cross-check"])
    assert code == SoundnessError.exit_code and "certified_refuted_example" in capsys.readouterr().err
