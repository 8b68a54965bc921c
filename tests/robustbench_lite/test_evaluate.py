"""The evaluator: per-example flags, worst case over attacks, seeds per example, soundness traps."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import robustbench_lite
from attacks import PGD, Attack, AttackResult
from certify.base import Certifier, spec_matrix
from robustbench_lite.data.dataset import Dataset
from robustbench_lite.errors import NonFiniteOutputError, SoundnessError, UnsupportedModelError, UserInputError
from robustbench_lite.evaluation.core import EvaluationResult, evaluate
from robustbench_lite.hashing import indices_sha256
from robustbench_lite.threat import ThreatModel

K = 3
TEMPLATES = torch.tensor([[0.2] * 8 + [0.8] * 8, [0.8] * 8 + [0.2] * 8, [0.5] * 16]).view(K, 1, 4, 4)


def toy_dataset(n: int = 48, seed: int = 0, name: str = "toy") -> Dataset:
    """n images 1x4x4 in [0, 1], three classes with distinct templates and some noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = (TEMPLATES[y] + 0.12 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1)
    return Dataset(name=name, split="test", x=x, y=y, num_classes=K)


def toy_model() -> nn.Sequential:
    """A linear classifier that gets most of :func:`toy_dataset` right, in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, K))
    w = torch.zeros(K, 16)
    w[0, 8:], w[0, :8] = 1.0, -1.0
    w[1, :8], w[1, 8:] = 1.0, -1.0
    with torch.no_grad():
        model[1].weight.copy_(w * 2)
        model[1].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    return model.eval()


class LinearExact(Certifier):
    """Exact (hence sound) Linf margins of a Flatten + Linear model; ignores the box (only looser)."""

    name = "linear-exact"

    def bound_margins(self, model, x, y, threat):
        lin = model[1]
        c = spec_matrix(y, lin.out_features)  # (N, K, K)
        w = c @ lin.weight  # (N, K, D)
        center = (w @ x.flatten(1)[:, :, None]).squeeze(2) + c @ lin.bias
        return center - threat.eps * w.abs().sum(dim=2)


class CertifyEverything(Certifier):
    """Deliberately unsound."""

    name = "liar"

    def bound_margins(self, model, x, y, threat):
        m = torch.ones(x.shape[0], K)
        m.scatter_(1, y[:, None], 0.0)
        return m


class FixedBreaker(Attack):
    """Breaks exactly the examples whose id is in ``broken`` (moving them to another class's template;
    use eps = 1): a deterministic attack for tests."""

    name = "fixed"

    def __init__(self, *, broken: set[int], seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.broken = broken

    def run(self, model, x, y, threat, rng, target):
        # mark: the id of each example travels in its first pixel (set by the test)
        ids = (x[:, 0, 0, 0] * 1000).round().long()
        hit = torch.tensor([int(i) in self.broken for i in ids.tolist()], dtype=torch.bool)
        x_adv = torch.where(hit[:, None, None, None], TEMPLATES[(y + 1) % K], x)
        return AttackResult(x_adv=x_adv, success=hit)


def test_flags_and_aggregates_are_consistent():
    ds, model = toy_dataset(), toy_model()
    threat = ThreatModel("Linf", 0.15)
    r = evaluate(model, ds, threat, attacks=[PGD(steps=20)], certifiers=[LinearExact()], batch_size=16)
    assert isinstance(r, EvaluationResult)
    assert r.n_examples == 48 and r.correct.dtype == torch.bool
    assert r.clean_acc == int(r.correct.sum()) / 48
    assert r.robust_acc == int(r.robust.sum()) / 48
    assert r.certified_acc == int(r.certified.sum()) / 48
    assert (r.certified <= r.robust).all() and (r.robust <= r.correct).all()
    assert 0 < r.certified_acc <= r.robust_acc < r.clean_acc  # the toy model is neither broken nor perfect
    pgd, cert = r.attacks[0], r.certifiers[0]
    assert pgd.forward > 0 and pgd.backward > 0 and pgd.seconds > 0 and pgd.examples == int(r.correct.sum())
    assert cert.accuracy == r.certified_acc and cert.status_counts["certified"] == int(r.certified.sum())
    assert r.number_forward_passes == 48 + pgd.forward
    assert r.flags == [] and r.violations == []


def test_package_level_evaluate_is_the_function():
    ds, model = toy_dataset(12), toy_model()
    assert robustbench_lite.evaluate is robustbench_lite.evaluation.core.evaluate
    r = robustbench_lite.evaluate(model, ds, ThreatModel("Linf", 0.0), attacks=(), certifiers=())
    assert r.robust_acc == r.clean_acc and r.certified_acc == 0.0


def test_a_dataset_name_means_its_test_split():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    r = evaluate(model, "digits", ThreatModel("Linf", 0.1), attacks=(), certifiers=(), n_examples=5)
    assert (r.dataset, r.split, r.n_examples) == ("digits", "test", 5)


def test_first_n_examples_and_their_hash():
    ds = toy_dataset(30)
    r = evaluate(toy_model(), ds, ThreatModel("Linf", 0.1), attacks=["pgd"], certifiers=(), n_examples=10)
    assert r.indices.tolist() == list(range(10))
    assert r.indices_sha256 == indices_sha256(list(range(10))) != indices_sha256(list(range(11)))
    # more than the split has: everything, no error
    assert evaluate(toy_model(), ds, ThreatModel("Linf", 0.1), attacks=(), certifiers=(), n_examples=999).n_examples == 30


def _by_index(r: EvaluationResult) -> dict[int, tuple]:
    rows = {}
    for pos, i in enumerate(r.indices.tolist()):
        rows[i] = (bool(r.correct[pos]), bool(r.robust[pos]), bool(r.certified[pos]),
                   tuple(bool(s[pos]) for s in r.attack_success.values()))
    return rows


def test_results_do_not_depend_on_batch_size_or_order():
    ds, model = toy_dataset(40), toy_model()
    threat = ThreatModel("Linf", 0.15)
    attacks = [PGD(steps=5, rel_stepsize=0.5)]  # random start: seeds matter
    a = evaluate(model, ds, threat, attacks=attacks, certifiers=[LinearExact()], batch_size=40, n_examples=None)
    b = evaluate(model, ds, threat, attacks=attacks, certifiers=[LinearExact()], batch_size=7, n_examples=None)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    shuffled = ds.subset(perm)
    c = evaluate(model, shuffled, threat, attacks=attacks, certifiers=[LinearExact()], batch_size=9, n_examples=None)
    assert _by_index(a) == _by_index(b) == _by_index(c)
    assert 0 < a.robust_acc < a.clean_acc


@settings(max_examples=8, deadline=None)
@given(weight_seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.4), batch_size=st.integers(1, 17),
       individual=st.booleans())
def test_invariant_and_batch_independence_hold_for_random_models(weight_seed, eps, batch_size, individual):
    torch.manual_seed(weight_seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, K)).eval()
    ds, threat = toy_dataset(16, seed=weight_seed), ThreatModel("Linf", eps)
    runs = [evaluate(model, ds, threat, attacks=[PGD(steps=5, rel_stepsize=0.4)], certifiers=[LinearExact()],
                     batch_size=b, individual=individual) for b in (16, batch_size)]
    for r in runs:
        assert (r.certified <= r.robust).all() and (r.robust <= r.correct).all() and r.violations == []
    assert _by_index(runs[0]) == _by_index(runs[1])


def _marked(n: int = 12) -> Dataset:
    ds = toy_dataset(n)
    x = ds.x.clone()
    x[:, 0, 0, 0] = torch.arange(n) / 1000.0  # the example's id, read by FixedBreaker
    return Dataset(name="toy", split="test", x=x, y=ds.y, num_classes=K)


def test_robust_accuracy_is_the_per_example_worst_case():
    ds = _marked(12)
    model = toy_model()
    correct = evaluate(model, ds, ThreatModel("Linf", 0.1), attacks=(), certifiers=()).correct
    ids = correct.nonzero().flatten().tolist()
    assert len(ids) >= 6
    first, second = set(ids[:3]), set(ids[2:5])  # overlap in one example
    for individual in (False, True):
        r = evaluate(model, ds, ThreatModel("Linf", 1.0), attacks=[FixedBreaker(broken=first), FixedBreaker(broken=second)],
                     certifiers=(), individual=individual)
        assert [a.name for a in r.attacks] == ["fixed", "fixed#2"]
        n_correct = int(r.correct.sum())
        assert r.robust_acc == (n_correct - len(first | second)) / 12  # not the mean of per-attack figures
        if individual:
            assert [a.accuracy for a in r.attacks] == [(n_correct - 3) / 12] * 2
            assert r.attacks[1].examples == n_correct
        else:
            assert [a.accuracy for a in r.attacks] == [(n_correct - 3) / 12, (n_correct - 5) / 12]
            assert r.attacks[1].examples == n_correct - 3  # the cascade attacks only the survivors


class CountingExact(LinearExact):
    """LinearExact that is expensive enough to skip refuted examples, and records what it was given."""

    name = "counting-exact"
    skip_refuted = True

    def __init__(self) -> None:
        self.seen: list[int] = []

    def bound_margins(self, model, x, y, threat):
        self.seen += (x[:, 0, 0, 0] * 1000).round().long().tolist()
        return super().bound_margins(model, x, y, threat)


@pytest.mark.parametrize("individual", [False, True])
def test_an_expensive_certifier_only_sees_examples_no_attack_refuted(individual):
    ds, model = _marked(48), toy_model()
    threat = ThreatModel("Linf", 0.15)
    everything = evaluate(model, ds, threat, attacks=[PGD(steps=20)], certifiers=[LinearExact()], individual=individual)
    refuted = everything.correct & ~everything.robust
    assert 0 < int(refuted.sum()) < 48 and int(everything.certified.sum()) > 0
    for batch_size in (48, 7):
        cert = CountingExact()
        r = evaluate(model, ds, threat, attacks=[PGD(steps=20)], certifiers=[cert], batch_size=batch_size,
                     individual=individual)
        assert sorted(cert.seen) == (~refuted).nonzero().flatten().tolist()
        assert r.certifiers[0].status_counts["skipped"] == int(refuted.sum()) and r.certifiers[0].examples == 48
        # a sound certifier cannot certify a refuted example, so skipping them changes no number
        assert torch.equal(r.certified, everything.certified) and torch.equal(r.robust, everything.robust)


def test_unsound_certifier_is_a_soundness_error_with_the_result_attached():
    ds, model = toy_dataset(24), toy_model()
    with pytest.raises(SoundnessError, match="soundness_violation") as info:
        evaluate(model, ds, ThreatModel("Linf", 0.3), attacks=["pgd"], certifiers=[CertifyEverything()])
    result = info.value.result
    assert result.violations and result.flags[0]["name"] == "soundness_violation"
    broken_or_wrong = ~result.robust
    assert sorted(result.violations) == result.indices[broken_or_wrong].tolist()


def test_model_mode_is_restored_and_train_mode_is_flagged():
    ds = toy_dataset(24)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, K))
    model[2].load_state_dict(toy_model()[1].state_dict())
    model.train()
    r = evaluate(model, ds, ThreatModel("Linf", 0.05), attacks=["pgd"], certifiers=())
    assert model.training and all(m.training for m in model.modules())
    assert [f["name"] for f in r.flags] == ["train_mode"]
    ref = evaluate(toy_model(), ds, ThreatModel("Linf", 0.05), attacks=["pgd"], certifiers=())
    assert torch.equal(r.correct, ref.correct)  # evaluated in eval mode: dropout off


class Noisy(nn.Module):
    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        out = self.inner(x)
        return out + self.scale * torch.randn_like(out)


def test_randomized_model_is_flagged():
    ds = toy_dataset(24)
    try:
        r = evaluate(Noisy(toy_model(), 3.0).eval(), ds, ThreatModel("Linf", 0.05), attacks=["pgd"], certifiers=())
    except SoundnessError as err:  # the evaluator's fresh pass or the re-scoring disagrees with the attack
        r = err.result
        assert {"rejected_claims", "rescoring_mismatch"} & {f["name"] for f in r.flags}
    assert "randomized_outputs" in [f["name"] for f in r.flags]


class BatchDependent(nn.Module):
    """Centers each batch by its own mean: outputs depend on which examples share the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = toy_model()

    def forward(self, x):
        return self.inner(x - x.mean(dim=0, keepdim=True) + 0.5)


def test_batch_dependent_model_fails_the_rescoring_check():
    # PGD's points, scored within PGD's batch, are misclassified; the evaluator's fresh forward pass over
    # the claimed points (another batch) rejects them first, then the re-scoring check disagrees too
    ds = toy_dataset(48)
    with pytest.raises(SoundnessError, match="rejected_claims") as info:
        evaluate(BatchDependent().eval(), ds, ThreatModel("Linf", 0.1), attacks=["pgd"], certifiers=(), batch_size=24)
    flags = {f["name"]: f for f in info.value.result.flags}
    assert flags["rejected_claims"]["severity"] == "error" and flags["rejected_claims"]["values"]["correct_pgd"]
    assert flags["rescoring_mismatch"]["severity"] == "error" and flags["rescoring_mismatch"]["values"]["examples"] > 0


def test_nested_attack_flags_are_summed_over_batches():
    class Counting(FixedBreaker):
        def run(self, model, x, y, threat, rng, target):
            result = super().run(model, x, y, threat, rng, target)
            result.flags = {"calls": 1, "stage": {"a": x.shape[0]}, "note": "text is dropped"}
            return result

    r = evaluate(toy_model(), _marked(12), ThreatModel("Linf", 1.0), attacks=[Counting(broken=set())], certifiers=(),
                 batch_size=5)
    assert r.attacks[0].flags == {"calls": 3, "stage.a": int(r.correct.sum())}


def test_probability_outputs_and_zero_gradients_are_flagged():
    ds = toy_dataset(24)
    softmax = nn.Sequential(toy_model(), nn.Softmax(dim=1)).eval()
    r = evaluate(softmax, ds, ThreatModel("Linf", 0.05), attacks=(), certifiers=())
    assert [f["name"] for f in r.flags] == ["probability_outputs"]

    class Quantized(nn.Module):  # rounding the input: zero gradient almost everywhere
        def forward(self, x):
            return toy_model()(torch.round(x * 4) / 4)

    r = evaluate(Quantized().eval(), ds, ThreatModel("Linf", 0.05), attacks=["pgd"], certifiers=())
    flag = next(f for f in r.flags if f["name"] == "zero_gradient")
    assert flag["values"]["examples_pgd"] > 0
    assert r.attacks[0].flags["zero_gradient"] == flag["values"]["examples_pgd"]


def test_non_finite_logits_raise():
    class NaNModel(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :K] * float("nan")

    with pytest.raises(NonFiniteOutputError):
        evaluate(NaNModel(), toy_dataset(6), ThreatModel("Linf", 0.1), attacks=(), certifiers=())


def test_progress_true_draws_a_bar_on_stderr(capsys):
    evaluate(toy_model(), toy_dataset(20), ThreatModel("Linf", 0.1), attacks=(), certifiers=(), batch_size=8,
             progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "evaluate" in captured.err and "/20" in captured.err


def test_progress_callback_sees_every_batch():
    calls = []
    evaluate(toy_model(), toy_dataset(20), ThreatModel("Linf", 0.1), attacks=(), certifiers=(), batch_size=8,
             progress=lambda done, total: calls.append((done, total)))
    assert calls == [(8, 20), (16, 20), (20, 20)]


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size"),
    ({"n_examples": 0}, "n_examples"),
    ({"attacks": ["no-such-attack"]}, "unknown attack"),
    ({"attacks": [42]}, "neither"),
    ({"device": "nonsense"}, "device"),
])
def test_parameter_checks(kwargs, message):
    args = {"attacks": (), "certifiers": ()} | kwargs
    with pytest.raises(UserInputError, match=message):
        evaluate(toy_model(), toy_dataset(6), ThreatModel("Linf", 0.1), **args)


def test_inputs_outside_the_box_and_wrong_types_are_refused():
    with pytest.raises(UserInputError, match="box"):
        evaluate(toy_model(), toy_dataset(6), ThreatModel("Linf", 0.1, box=(0.0, 0.5)), attacks=(), certifiers=())
    scaled = toy_dataset(6)
    scaled.x = scaled.x * 255  # a dataset that skipped the division by 255
    with pytest.raises(UserInputError, match=r"\[0, 1\]"):
        evaluate(toy_model(), scaled, ThreatModel("Linf", 0.1), attacks=(), certifiers=())
    with pytest.raises(UserInputError, match="ThreatModel"):
        evaluate(toy_model(), toy_dataset(6), ("Linf", 0.1), attacks=(), certifiers=())
    with pytest.raises(UserInputError, match="shape"):
        evaluate(nn.Linear(3, 3), toy_dataset(6), ThreatModel("Linf", 0.1), attacks=(), certifiers=())


def test_registry_names_get_default_configs_and_ibp_is_no_tighter_than_exact():
    ds, threat = toy_dataset(24), ThreatModel("Linf", 0.05)
    r = evaluate(toy_model(), ds, threat, certifiers=("ibp", LinearExact()))  # defaults: attacks=("pgd",)
    assert [a.name for a in r.attacks] == ["pgd"] and r.attacks[0].config == PGD().config()
    assert [c.name for c in r.certifiers] == ["ibp", "linear-exact"]
    ibp, exact = r.certified_by["ibp"], r.certified_by["linear-exact"]
    assert (ibp <= exact).all() and exact.any()


def tanh_model() -> nn.Sequential:
    """A model the bound propagators cannot handle (Tanh), in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, K)).eval()


def test_default_certifier_that_cannot_handle_the_model_is_skipped_and_attacks_run():
    result = evaluate(tanh_model(), toy_dataset(12), ThreatModel("Linf", 0.1), attacks=["fgsm"],
                      certifiers=["ibp", "crown"], n_examples=12, batch_size=5)
    assert result.attacks[0].examples > 0
    for report in result.certifiers:
        assert report.status_counts == {"skipped": 12} and report.accuracy == 0.0
    flags = [f for f in result.flags if f["name"] == "certifier_unsupported"]
    assert [f["explanation"] for f in flags] == [f"{name} skipped: unsupported layers: 2 (Tanh)" for name in ("ibp", "crown")]


def test_unsupported_error_names_the_certifier_before_anything_runs():
    ran = []

    class Recorder(PGD):
        def run(self, *args, **kwargs):
            ran.append(1)
            return super().run(*args, **kwargs)

    with pytest.raises(UnsupportedModelError, match="certifier 'ibp': unsupported layers: 2 \\(Tanh\\)"):
        evaluate(tanh_model(), toy_dataset(12), ThreatModel("Linf", 0.1), attacks=[Recorder()], certifiers=["ibp"],
                 n_examples=12, unsupported="error")
    assert not ran


def test_default_evaluate_on_torchvision_resnet18_runs_to_the_end():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    data = Dataset(name="rgb", split="test", x=torch.rand(2, 3, 16, 16), y=torch.arange(2), num_classes=10)
    result = evaluate(model, data, ThreatModel("Linf", 1 / 255), attacks=["fgsm"], n_examples=2)
    assert result.certifiers[0].name == "ibp" and "skipped" not in result.certifiers[0].status_counts
    assert sum(result.certifiers[0].status_counts.values()) == 2
