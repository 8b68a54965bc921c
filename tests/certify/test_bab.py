"""Branch and bound (certify.bab): agreement with the exact MIP (certify.mip, every class solved to
optimality) on random tiny nets, soundness of subdomain bounds under splits, no certificate for an example
an attack breaks, float rounding, determinism.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attacks import APGD, PGD
from certify import CERTIFIERS, CROWN, MIP, BaB
from certify.bab_bound import make_context, optimise, refine, sound_lower, split_pad
from certify.crown import Propagator
from certify.bab_domains import Domains
from certify.bab_leaf import frozen_copy
from certify.graph import build_graph
from certify.rounding import error_bounds, float64_model, unit_roundoff
from robustbench_lite.errors import UserInputError
from robustbench_lite.threat import ThreatModel
from test_soundness import random_net

K = 3


def tiny_net(kind: str, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A random network with a dozen ReLUs or fewer, and its input shape."""
    torch.manual_seed(seed)
    if kind == "dense":
        net, shape = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, K)), (2,)
    else:
        net, shape = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4), nn.ReLU(),
                                   nn.Linear(4, K)), (1, 3, 3)
    with torch.no_grad():  # steeper than the default initialisation: decision boundaries inside the box
        for p in net.parameters():
            p.mul_(3.0)
    return net.eval(), shape


def _attack_radius(net: nn.Module, x0: torch.Tensor, y: int, norm: str = "Linf") -> float:
    """The smallest radius (bisection, 0.5 at most) at which PGD breaks x0: near the boundary."""
    lo, hi = 0.0, 0.5
    pgd = PGD(steps=20, restarts=2, rel_stepsize=0.1, loss="margin")
    for _ in range(7):
        mid = (lo + hi) / 2
        if bool(pgd(net, x0, torch.tensor([y]), ThreatModel(norm, mid)).success[0]):
            hi = mid
        else:
            lo = mid
    return hi


def instances(count: int, seed: int, norm: str = "Linf"):
    """(kind, net, shape, x0, eps, y): eps a multiple of PGD's radius, near and far from the boundary."""
    g = torch.Generator().manual_seed(seed)
    factors = (0.5, 0.9, 1.0, 1.1, 2.0)
    for i in range(count):
        kind = "dense" if i % 2 == 0 else "conv"
        net, shape = tiny_net(kind, seed * 1000 + i)
        x0 = torch.rand(1, *shape, generator=g)
        with torch.no_grad():  # logits at x0 close together: the decision boundaries pass near x0
            net[-1].bias -= net(x0)[0] - 0.5 * torch.randn(K, generator=g)
            y = int(net(x0).argmax())
        eps = min(0.3, _attack_radius(net, x0, y, norm) * factors[i % len(factors)])
        yield kind, net, shape, x0, eps, y


#: the exact reference: every class's MILP solved to optimality from interval bounds (no CROWN shortcut)
REFERENCE = MIP(exact=True, crown_first=False, early_stop=False)


def reference_verdict(net: nn.Module, x0: torch.Tensor, y: int, threat: ThreatModel) -> str | None:
    """MIP's verdict: 'certified', 'refuted' (with a checked counterexample) or None (undecided: within
    its tolerance slack of 0)."""
    res = REFERENCE(net, x0, torch.tensor([y]), threat)
    if res.status[0] == "certified":
        return "certified"
    return "refuted" if res.info["refuted"][0] else None


def _check_agreement(count: int, seed: int, attack_steps: int, norm: str = "Linf") -> dict:
    counts = {"certified": 0, "refuted": 0, "undecided": 0}
    for kind, net, shape, x0, eps, y in instances(count, seed, norm):
        threat = ThreatModel(norm, eps)
        truth = reference_verdict(net, x0, y, threat)
        res = BaB(timeout=30.0, attack_steps=attack_steps, batch_size=8)(net, x0, torch.tensor([y]), threat)
        verdict = res.info["verdict"][0]
        assert not (verdict == "certified" and truth == "refuted"), f"{kind} net certified, MIP refutes it"
        assert not (verdict == "refuted" and truth == "certified"), f"{kind} net refuted, MIP certifies it"
        if truth is None:
            counts["undecided"] += 1  # within MIP's tolerance of the boundary: no ground truth
            continue
        if norm == "Linf":  # complete: every instance MIP decides, bab decides too (L2 leaves are box LPs)
            assert verdict == truth, f"{kind} net (eps {eps:.3f}): {verdict}, MIP {truth}"
        counts[verdict] = counts.get(verdict, 0) + 1
        if verdict == "refuted":
            point = res.counterexample
            assert threat.contains(point, x0, tol=0.0).all()
            with torch.no_grad():
                assert int(net(point).argmax()) != y
        elif verdict == "certified":
            assert torch.isnan(res.counterexample).all() and res.certified[0]
    return counts


def test_verdicts_equal_exact_reference_on_tiny_nets():
    counts = _check_agreement(16, seed=0, attack_steps=0)  # no attack: BaB must prove and refute alone
    assert counts["certified"] >= 3 and counts["refuted"] >= 3 and counts["undecided"] <= 2


def test_no_verdict_contradicts_the_exact_reference_under_l2():
    counts = _check_agreement(6, seed=0, attack_steps=0, norm="L2")
    assert counts["certified"] + counts["refuted"] >= 3


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 9))
def test_verdicts_equal_exact_reference_on_hundreds_of_tiny_nets(seed):
    counts = _check_agreement(40, seed=seed, attack_steps=0 if seed % 2 else 20)
    assert counts["certified"] + counts["refuted"] >= 36


def _in_domain_points(net: nn.Module, x0: torch.Tensor, threat: ThreatModel, ctx, splits: dict, seed: int):
    """float64 points of the ball ∩ box (random, corners, then pushed down each margin by signed
    gradient steps) that satisfy every split; their margins (P, K)."""
    g = torch.Generator().manual_seed(seed)
    net64 = frozen_copy(net).double()
    lo, hi = (x0.double() - threat.eps).clamp(min=0), (x0.double() + threat.eps).clamp(max=1)  # float64: in the ball
    pts = [lo + (hi - lo) * torch.rand(300, *x0.shape[1:], generator=g, dtype=torch.float64),
           torch.where(torch.rand(100, *x0.shape[1:], generator=g) < 0.5, lo, hi)]
    start = torch.cat(pts)
    for j in range(K):  # signed-gradient descent on margin j from every start, iterates kept
        p = start.clone()
        for _ in range(10):
            p.requires_grad_(True)
            z = net64(p)
            grad, = torch.autograd.grad((z[:, ctx.y] - z[:, j]).sum(), p)
            p = torch.minimum(torch.maximum(p.detach() - 0.05 * threat.eps * grad.sign(), lo), hi)
            pts.append(p)
    pts = torch.cat(pts)
    graph = build_graph(float64_model(frozen_copy(net)), tuple(x0.shape[1:]))
    with torch.no_grad():
        values = graph.forward(pts)
    keep = torch.ones(pts.shape[0], dtype=torch.bool)
    for r, sign in splits.items():
        z = values[ctx.relu_input[r]].flatten(1)
        s = sign.flatten().to(torch.float64)
        keep &= ((z * s) >= 0).all(1) | (s == 0).all()
    z = values[graph.output][keep]
    return z[:, [ctx.y]] - z


def _random_domain(kind: str, seed: int, eps: float, fraction: float, beta_scale: float):
    """(net, x0, threat, ctx, dom): one example of a random net and a domain of it with random splits (a
    ``fraction`` of the unstable neurons), random alpha in [0, 1] and beta in [0, beta_scale)."""
    net, shape = tiny_net(kind, seed) if kind in ("dense", "conv") else random_net(kind, seed)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(1, *shape, generator=g)
    threat = ThreatModel("Linf", eps)
    frozen = frozen_copy(net)
    with torch.no_grad():
        y = int(frozen(x0).argmax())
    ctx = make_context(build_graph(frozen, shape), build_graph(float64_model(frozen), shape), x0, y, threat, 64.0)
    splits, alphas, betas = {}, {}, {}
    others = torch.tensor([j for j in range(K) if j != y])
    for r in ctx.relus:
        lo, hi = ctx.pre32[ctx.relu_input[r]]
        unstable = (lo < 0) & (hi > 0)
        pick = unstable & (torch.rand(unstable.shape, generator=g) < fraction)
        sign = torch.where(torch.rand(unstable.shape, generator=g) < 0.5, 1, -1).to(torch.int8)
        splits[r] = torch.where(pick, sign, torch.zeros_like(sign))
        shape_r = (1, others.numel(), *lo.shape[1:])
        alphas[r] = torch.rand(shape_r, generator=g)
        betas[r] = beta_scale * torch.rand(shape_r, generator=g) * (splits[r] != 0).unsqueeze(1)
    dom = Domains(ctx.relus, splits, alphas, betas, torch.full((1, others.numel()), -math.inf), others[None],
                  torch.full((1, 2), -1))
    return net, x0, threat, ctx, dom


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["dense", "conv", "mlp", "lenet", "residual"]), seed=st.integers(0, 10_000),
       eps=st.floats(0.05, 0.3), fraction=st.floats(0.5, 1.0))
def test_subdomain_bounds_hold_at_sampled_and_descended_points(kind, seed, eps, fraction):
    net, x0, threat, ctx, dom = _random_domain(kind, seed, eps, fraction, 2.0)
    if not ctx.relus:
        return
    splits = dict(dom.splits)
    bound = sound_lower(ctx, dom)[0]  # random alpha in [0, 1] and beta >= 0: a valid bound
    optimise(ctx, dom, 20, 0.2, 0.5)  # beta pushed hard: a wrong sign of the split term shows
    tuned = sound_lower(ctx, dom)[0]
    margins = _in_domain_points(net, x0, threat, ctx, splits, seed)
    for b in (bound, tuned):
        for row, j in enumerate(dom.spec[0].tolist()):
            if margins.shape[0]:
                worst = float(margins[:, j].min())
                assert b[row] <= worst + 1e-12 * (1 + abs(worst)), f"bound {float(b[row])} above {worst}"


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["dense", "conv", "mlp", "lenet", "residual"]), seed=st.integers(0, 10_000),
       eps=st.floats(0.05, 0.3), fraction=st.floats(0.2, 0.8))
def test_refined_intermediate_bounds_hold_at_points_of_the_domain(kind, seed, eps, fraction):
    """bab's per-domain intermediate bounds (re-tightened under the splits) contain every in-domain
    point's pre-activations, and the margin bound walked through them stays below its margins."""
    net, x0, threat, ctx, dom = _random_domain(kind, seed, eps, fraction, 2.0)
    if not ctx.relus:
        return
    splits = dict(dom.splits)
    dom.pre = {r: (torch.where(splits[r] > 0, lo.clamp(min=0), lo), torch.where(splits[r] < 0, hi.clamp(max=0), hi))
               for r, (lo, hi) in ctx.root_pre().items()}
    root = {r: (lo.clone(), hi.clone()) for r, (lo, hi) in dom.pre.items()}
    refine(ctx, dom, -1, 10_000)  # every layer: the first one too (its bounds are exact already)
    for r, (lo, hi) in dom.pre.items():  # never looser than the domain's bounds before
        assert bool((lo >= root[r][0]).all() and (hi <= root[r][1]).all())
    g = torch.Generator().manual_seed(seed)
    lo_x, hi_x = (x0.double() - eps).clamp(min=0), (x0.double() + eps).clamp(max=1)
    pts = torch.cat([lo_x + (hi_x - lo_x) * torch.rand(2000, *x0.shape[1:], generator=g, dtype=torch.float64),
                     torch.where(torch.rand(500, *x0.shape[1:], generator=g) < 0.5, lo_x, hi_x)])
    graph = build_graph(float64_model(frozen_copy(net)), tuple(x0.shape[1:]))
    with torch.no_grad():
        values = graph.forward(pts)
    keep = torch.ones(pts.shape[0], dtype=torch.bool)
    for r, sign in splits.items():
        keep &= ((values[ctx.relu_input[r]].flatten(1) * sign.flatten().double()) >= 0).all(1)
    for r, (lo, hi) in dom.pre.items():
        z = values[ctx.relu_input[r]][keep].flatten(1)
        assert bool((z >= lo.flatten(1).double()).all() and (z <= hi.flatten(1).double()).all()), f"ReLU {r}"
    bound = sound_lower(ctx, dom)[0]
    z = values[graph.output][keep]
    for row, j in enumerate(dom.spec[0].tolist()):
        if z.shape[0]:
            assert float(bound[row]) <= float((z[:, ctx.y] - z[:, j]).min())


def test_refinement_keeps_verdicts_on_tiny_nets():
    """With per-domain intermediate bounds on, bab still agrees with the exact MIP (and decides)."""
    for kind, net, shape, x0, eps, y in instances(10, seed=7):
        threat = ThreatModel("Linf", eps)
        truth = reference_verdict(net, x0, y, threat)
        res = BaB(timeout=30.0, batch_size=8, refine_rows=4096)(net, x0, torch.tensor([y]), threat)
        verdict = res.info["verdict"][0]
        assert truth is None or verdict == truth, f"{kind} net (eps {eps:.3f}): {verdict}, MIP {truth}"


def test_closing_bounds_are_lowered_by_their_rounding_pad():
    """sound_lower applies the pad the test above proves sufficient: each closing bound lies below the
    plain float64 walk of the same domain by at least the output's error E_out[y] + E_out[j] (> 0)."""
    for seed in range(4):
        _, _, _, ctx, dom = _random_domain("dense", seed, 0.2, 0.7, 1.0)
        split_any = [r for r, s in dom.splits.items() if bool((s != 0).any())]
        betas64 = {r: dom.betas[r].double() * dom.splits[r].unsqueeze(1) for r in split_any}
        with torch.no_grad():
            raw = ctx.propagator64(dom.splits, 1).backward(ctx.graph.output, ctx.spec_rows(dom.spec, torch.float64),
                                                           dom.alphas, betas64)
        e_out = ctx.errors[ctx.graph.output].flatten()
        pad = e_out[ctx.y] + e_out[dom.spec]
        assert (pad > 0).all() and (raw - sound_lower(ctx, dom) >= pad).all(), seed


def test_split_multipliers_tighten_split_domains():
    """beta is what makes a split count below its layer (beta-CROWN): optimised jointly with alpha, it
    lifts the float64 bound of split domains above alpha alone (same start, same steps) on some of them,
    and never makes the kept best bound worse than the start."""
    gains = []
    for seed in range(8):
        runs = []
        for lr_beta in (0.0, 0.5):
            _, _, _, ctx, dom = _random_domain("dense", seed, 0.2, 0.8, 0.0)
            if not any(bool((s != 0).any()) for s in dom.splits.values()):
                break
            optimise(ctx, dom, 20, 0.2, lr_beta)
            runs.append(sound_lower(ctx, dom)[0])
        if len(runs) == 2:
            gains.append(float((runs[1] - runs[0]).max()))
    assert len(gains) >= 4 and max(gains) > 1e-3, gains


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["dense", "conv", "mlp", "lenet", "residual"]), seed=st.integers(0, 10_000),
       eps=st.floats(0.05, 0.3), beta_scale=st.sampled_from([1.0, 1e3, 1e5]))
def test_float32_walk_of_a_split_domain_is_within_its_proven_rounding_pad(kind, seed, eps, beta_scale):
    """The pad of :func:`sound_lower` (E_out[y] + E_out[j] plus the split terms' share), instantiated for
    float32 (u = 2^-24, error bounds of the float32 graph), covers the distance from the float32 walk of a
    split domain to the float64 walk of the same domain (itself ~1e-9 of that from the exact one); with
    large beta the split terms' share is most of it."""
    _, x0, threat, ctx, dom = _random_domain(kind, seed, eps, 0.7, beta_scale)
    split_any = [r for r, s in dom.splits.items() if bool((s != 0).any())]
    if not split_any:
        return
    out = ctx.graph.output
    with torch.no_grad():
        betas64 = {r: dom.betas[r].double() * dom.splits[r].unsqueeze(1) for r in split_any}
        b64 = ctx.propagator64(dom.splits, 1).backward(out, ctx.spec_rows(dom.spec, torch.float64), dom.alphas, betas64)
        betas32 = {r: dom.betas[r] * dom.splits[r].unsqueeze(1) for r in split_any}
        taps = {ctx.relu_input[r]: None for r in split_any}
        b32 = ctx.propagator(dom.splits, 1).backward(out, ctx.spec_rows(dom.spec), dom.alphas, betas32, taps=taps)
        root = Propagator(ctx.graph, x0, threat)
        root.compute_bounds()
        u32 = unit_roundoff(torch.float32)
        e32 = error_bounds(ctx.graph, root.boxes, x0, threat, u32)
        e_out = e32[out].flatten()
        pad = e_out[ctx.y] + e_out[dom.spec] + split_pad(ctx, betas32, taps, e32, u32)
    gap = (b32.double() - b64).abs()
    assert (gap <= pad.double()).all(), f"float32 walk off by {gap.max():.3g}, pad {pad.min():.3g}"


def test_margin_that_only_float32_rounding_keeps_positive_is_not_certified():
    # margin(x) = 0.7 x + b over [x0 - 0.2, x0 + 0.2]: its exact minimum is -8.8e-9, while float32 CROWN
    # (whose x0 - eps rounds up, before the rounding rule's pad) says +1.5e-8 and no float32 point of the ball is misclassified
    x0, eps, w, b = 0.49150121212005615, 0.2, 0.699999988079071, -0.20405085384845734
    net = nn.Sequential(nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[w], [0.0]]))
        net[0].bias.copy_(torch.tensor([b, 0.0]))
    x, y, threat = torch.tensor([[x0]]), torch.tensor([0]), ThreatModel("Linf", eps)
    exact = Fraction(w) * (Fraction(x0) - Fraction(eps)) + Fraction(b)
    assert exact < 0 and CROWN().bound_margins(net, x, y, threat)[0, 1] > 0  # the premise: float32 says > 0
    res = BaB(timeout=10.0)(net, x, y, threat)
    assert res.status[0] != "certified" and res.info["verdict"][0] == "unknown"
    assert float(res.margin_lower[0, 1]) <= float(exact)


@pytest.mark.parametrize("name,dataset", [("digits-mlp-standard", "digits"), ("mnist5k-cnn-pgd-at", "mnist5k")])
def test_never_certifies_what_an_attack_breaks(name, dataset):
    _never_certifies_refuted(name, dataset, 1)


@pytest.mark.slow
def test_never_certifies_what_an_attack_breaks_on_every_zoo_model():
    from robustbench_lite.zoo import list_models
    for row in list_models():
        try:
            _never_certifies_refuted(row["name"], row["dataset"], 3)
        except UserInputError as exc:  # a layer the graph walk does not take (e.g. ELU)
            assert "unsupported" in str(exc)


def _never_certifies_refuted(name: str, dataset: str, count: int) -> None:
    from robustbench_lite.data import load_dataset
    from robustbench_lite.zoo import load_model
    model = load_model(name, verify=False)
    data = load_dataset(dataset, "test")
    x, y = data.x[:64], data.y[:64]
    threat = ThreatModel("Linf", 0.1)
    broken = APGD(steps=50)(model, x, y, threat).success.nonzero().flatten()[:count]
    assert broken.numel(), f"no example of {name} broken by APGD"
    res = BaB(timeout=3.0, attack_steps=0)(model, x[broken], y[broken], threat)
    assert not res.certified.any() and "certified" not in res.info["verdict"]


def test_verdict_does_not_depend_on_batch_size_or_order():
    net, shape = tiny_net("dense", 3)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, *shape, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    threat = ThreatModel("Linf", 0.15)
    a = BaB(batch_size=2, attack_steps=0)(net, x, y, threat)
    b = BaB(batch_size=64, attack_steps=0)(net, x.flip(0), y.flip(0), threat)
    assert a.info["verdict"] == b.info["verdict"][::-1]
    assert torch.equal(a.certified, b.certified.flip(0))


def test_registered_contract_and_bad_arguments():
    bab = CERTIFIERS.create("bab")
    assert isinstance(bab, BaB) and bab.skip_refuted and bab.config()["timeout"] == 60.0
    net, shape = tiny_net("dense", 1)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        y = net(x).argmax(1)
    res = bab(net, x, y, ThreatModel("Linf", 0.01))
    assert res.counterexample.shape == x.shape and len(res.status) == 2 and len(res.info["verdict"]) == 2
    for kwargs in ({"timeout": 0}, {"max_domains": 0}, {"branching": "random"}, {"spec": "each"},
                   {"iterations": -1}, {"clock": "sun"}):
        with pytest.raises(UserInputError):
            BaB(**kwargs)
