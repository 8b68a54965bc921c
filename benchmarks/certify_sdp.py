"""SDP certifiers: ``sdp`` (issue 4) per (example, class) and certified accuracy next to IBP, CROWN and LP;
``sdp-fo`` (issue 12) on the zoo CNN, its memory and its gap to the exact ``sdp`` (see benchmarks/_sdp_fo.py).

1. Seconds per (example, class) problem on a 64-32-32-10 MLP trained here on the digits train split
   (Linf eps ``--eps-time``, every class solved: no cascade), split into the LP floor, the reduced
   problem's build + SCS factorisation (once per example), the SCS iterations and the verified bound;
   against a straightforward cvxpy + SCS script (the full relaxation built and compiled for each
   (example, class), SCS eps 1e-3, cold start, no verified bound). Target: <= 5 s per problem with a
   verified bound. How often the SDP's own verified bound beats the LP's, and the mean bounds of
   SDP, LP and CROWN (same intermediate bounds).
2. Certified accuracy of the zoo model ``digits-mlp-standard`` (64-64-32-10) on the first ``--n``
   digits test images at several Linf eps: IBP, CROWN, LP and SDP (the cascade: the SDP solves only
   the classes CROWN and then the LP left), which stage certified, how often the SDP beat the LP where
   it ran, and the seconds that 100 and 360 images would take at this rate.

3.-5. ``--part sdp-fo``: the first-order SDP's targets, documented in ``benchmarks/_sdp_fo.py``; ``--part
   compare`` runs only [5]: sdp-fo against this SDP side by side (certified fraction, seconds per example,
   bound gap) on ``digits-mlp-standard`` and on a small digits CNN trained here, which sdp-fo was not tuned on.
6. ``--part records``: where sdp-fo adds to the committed leaderboards (the registry's choice of tables):
   on each named record's examples that no attack broke and no other certifier proved, how many it
   certifies at the registry's budget (``benchmarks/_sdp_fo.records_targets``).

Run (one core, as every check in this project)::

    OMP_NUM_THREADS=1 python benchmarks/certify_sdp.py [--part sdp|sdp-fo|all] [--n 50] [--examples 2]

Not part of the test run.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cvxpy as cp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from certify import CROWN, IBP, LP, SDP  # noqa: E402
from certify.convex import DenseReLUNet, Relaxation, crown_bounds, lower_to_dense, make_relaxations  # noqa: E402
from robustbench_lite import ThreatModel, load_dataset, load_model  # noqa: E402
from robustbench_lite.zoo.architectures import DIGITS_MEAN, DIGITS_STD, Normalize  # noqa: E402

from benchmarks import _sdp_fo  # noqa: E402


def train_digits(layers: list[nn.Module], epochs: int) -> nn.Sequential:
    """``Normalize`` + ``layers`` trained (Adam, cross-entropy) on the digits train split (a few seconds;
    the caller seeds torch before building ``layers``)."""
    model = nn.Sequential(Normalize(DIGITS_MEAN, DIGITS_STD), *layers)
    data = load_dataset("digits", "train")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(data.y)).split(50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            opt.step()
    return model.eval()


def train_mlp(widths: tuple[int, ...] = (64, 32, 32, 10), epochs: int = 60, seed: int = 0) -> nn.Sequential:
    """A standard-trained MLP on the digits train split (a few seconds)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return train_digits(layers[:-1], epochs)


def train_cnn(epochs: int = 30, seed: int = 1) -> nn.Sequential:
    """A small CNN on digits (8 channels of 4x4, then 32 hidden units) that sdp-fo was never tuned on."""
    torch.manual_seed(seed)
    return train_digits([nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 32),
                         nn.ReLU(), nn.Linear(32, 10)], epochs)


def straightforward_problem(net: DenseReLUNet, rel: Relaxation, c: np.ndarray) -> cp.Problem:
    """The full SDP (every neuron lifted, raw coordinates, triangle cuts) as a first cvxpy script writes it."""
    sizes = [net.input_dim, *net.hidden]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    P = cp.Variable((offsets[-1] + 1, offsets[-1] + 1), PSD=True)
    v, d = P[0, 1:], cp.diag(P)[1:]
    blocks = [v[offsets[b]:offsets[b + 1]] for b in range(len(sizes))]
    lows, highs = [rel.input_lower, *rel.act_lower], [rel.input_upper, *rel.act_upper]
    cons = [P[0, 0] == 1]
    for b, (lo, hi) in enumerate(zip(lows, highs)):
        cons += [blocks[b] >= lo, blocks[b] <= hi, d[offsets[b]:offsets[b + 1]] <= cp.multiply(lo + hi, blocks[b]) - lo * hi]
    for i in range(len(net.hidden)):
        s, z = net.weights[i] @ blocks[i] + net.biases[i], blocks[i + 1]
        prev, cur = slice(1 + offsets[i], 1 + offsets[i + 1]), slice(1 + offsets[i + 1], 1 + offsets[i + 2])
        cross = cp.sum(cp.multiply(net.weights[i].T, P[prev, cur]), axis=0)
        cons += [z >= s, z <= cp.multiply(rel.slope[i], s) + rel.intercept[i], s >= rel.pre_lower[i],
                 s <= rel.pre_upper[i], d[offsets[i + 1]:offsets[i + 2]] == cross + cp.multiply(net.biases[i], z)]
    return cp.Problem(cp.Minimize(c @ (net.weights[-1] @ blocks[-1] + net.biases[-1])), cons)


def straightforward_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, count: int,
                            cap: float = 60.0) -> list[float]:
    """Build + compile + solve (SCS eps 1e-3, cold) per (example, class), as a first cvxpy script would."""
    threat = ThreatModel("Linf", eps)
    net = lower_to_dense(model, tuple(x.shape[1:]))
    pre = [(lo.detach().double().numpy(), hi.detach().double().numpy()) for lo, hi in crown_bounds(model, x, threat)]
    rel = make_relaxations(net, x.reshape(len(x), -1).double().numpy(), threat, pre)
    out = []
    for j in [j for j in range(10) if j != int(y[0])][:count]:
        c = np.eye(10)[int(y[0])] - np.eye(10)[j]
        start = time.perf_counter()
        problem = straightforward_problem(net, rel[0], c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            problem.solve(solver=cp.SCS, eps_abs=1e-3, eps_rel=1e-3, time_limit_secs=cap)
        out.append(time.perf_counter() - start)
        print(f"    straightforward: class {j}: {out[-1]:.2f} s, SCS status {problem.status}, "
              f"{problem.solver_stats.num_iters} iterations, value {problem.value:.4f} (capped at {cap:g} s)")
    return out


def _mask(y: torch.Tensor, k: int) -> torch.Tensor:
    return torch.ones(len(y), k, dtype=torch.bool).scatter_(1, y[:, None], False)


def per_problem(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    threat = ThreatModel("Linf", eps)
    start = time.perf_counter()
    res = SDP(early_stop=False, crown_first=False)(model, x, y, threat)
    wall = time.perf_counter() - start
    probs = res.info["problems"]
    secs = [p["seconds"] for p in probs]
    crown = CROWN()(model, x, y, threat).margin_lower
    mask = _mask(y, crown.shape[1])
    sdp = res.margin_lower
    lp = torch.zeros_like(sdp)
    for p in probs:
        lp[p["example"], p["class"]] = p["lp_bound"]
    print(f"[1] 64-32-32-10 MLP, Linf eps {eps}: {len(secs)} (example, class) problems, SCS eps 1e-3, verified bounds")
    print(f"    seconds per (example, class): mean {statistics.mean(secs):.2f}, median {statistics.median(secs):.2f}, "
          f"max {max(secs):.2f}; wall incl. CROWN bounds {wall:.1f} s")
    parts = {k: statistics.mean(p[k] for p in probs) for k in ("lp_seconds", "setup_seconds", "scs_seconds", "verify_seconds")}
    print("    mean parts: " + ", ".join(f"{k.replace('_seconds', '')} {v:.3f} s" for k, v in parts.items())
          + f" (setup = reduce + SCS factorisation, once per example); SCS iterations mean "
          f"{statistics.mean(p['iterations'] for p in probs):.0f}; lifted variables {sorted({p['variables'] for p in probs})}")
    beats = sum(p["sdp_bound"] > p["lp_bound"] for p in probs)
    gain = statistics.mean(p["sdp_bound"] - p["lp_bound"] for p in probs)
    print(f"    SDP's own verified bound > LP's: {beats}/{len(probs)} problems, mean SDP - LP {gain:+.4f}")
    print(f"    margin bounds, mean over classes: SDP {sdp[mask].mean():.4f}  LP {lp[mask].mean():.4f}  "
          f"CROWN {crown[mask].mean():.4f}; SDP >= LP: {bool((sdp[mask] >= lp[mask]).all())}, "
          f"LP >= CROWN - 1e-5 (1 + |CROWN|): {bool((lp[mask] >= crown[mask] - 1e-5 * (1 + crown[mask].abs())).all())}")
    print(f"    certified: SDP {res.certified.sum().item()}/{len(y)}, LP {int(((lp > 0) | ~mask).all(1).sum())}, "
          f"CROWN {int(((crown > 0) | ~mask).all(1).sum())}")
    base = straightforward_seconds(model, x[:1], y[:1], eps, 1)
    print(f"    straightforward build+compile+solve per problem (no verified bound): "
          f"{', '.join(f'{s:.2f}' for s in base)} s -> ratio straightforward/ours "
          f"{statistics.mean(base) / statistics.mean(secs):.1f}x")


def certified_accuracy(n: int, eps_list: list[float]) -> None:
    model = load_model("digits-mlp-standard")
    data = load_dataset("digits", "test")
    x, y = data.x[:n], data.y[:n]
    correct = (model(x).argmax(1) == y).sum().item()
    print(f"[2] digits-mlp-standard, first {n} test images, clean {correct}/{n}")
    print("    eps     IBP  CROWN    LP   SDP  SDP-only  certified by (stage)        statuses              "
          "SDP solves  SDP>LP  SDP s  (100 / 360 images)")
    for eps in eps_list:
        threat = ThreatModel("Linf", eps)
        ibp = IBP()(model, x, y, threat).certified
        crown = CROWN()(model, x, y, threat).certified
        lp = LP()(model, x, y, threat).certified
        start = time.perf_counter()
        res = SDP()(model, x, y, threat)
        secs = time.perf_counter() - start
        sdp = res.certified
        by = dict(collections.Counter(b for b in res.info["certified_by"] if b))
        statuses = dict(collections.Counter(s.split(":")[0] for s in res.status))
        solved = [p for p in res.info["problems"] if "sdp_bound" in p]
        beats = sum(p["sdp_bound"] > p["lp_bound"] for p in solved)
        print(f"    {eps:<6g} {int(ibp.sum()):>4} {int(crown.sum()):>6} {int(lp.sum()):>5} {int(sdp.sum()):>5} "
              f"{int((sdp & ~crown & ~lp).sum()):>9}  {str(by):<27} {str(statuses):<21} {len(solved):>10} "
              f"{beats:>4}/{len(solved):<3} {secs:>6.1f}  ({secs * 100 / n:.0f} / {secs * 360 / n:.0f} s)")
        assert not ((crown | lp) & ~sdp).any(), "SDP must certify what CROWN and the LP certify (its cascade starts there)"


#: [6] the records whose open examples decided where the registry runs sdp-fo
RECORDS = [f"mnist5k/Linf-0.1/mnist5k-cnn-{m}" for m in ("pgd-at", "trades", "trades-1k", "standard", "augmix")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="test images for certified accuracy")
    parser.add_argument("--examples", type=int, default=2, help="examples for the per-problem timing")
    parser.add_argument("--eps-time", type=float, default=0.03)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.08, 0.1])
    parser.add_argument("--skip", choices=["timing", "accuracy"], default=None)
    parser.add_argument("--part", choices=["sdp", "sdp-fo", "compare", "records", "all"], default="all")
    parser.add_argument("--cnn-n", type=int, default=50, help="[3] images not certified by alpha-CROWN per eps")
    parser.add_argument("--cnn-eps", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--lp-exact", type=int, default=3, help="[3] examples per eps the exact (cvxpy) LP runs on")
    parser.add_argument("--timeout", type=float, default=60.0, help="[3] sdp-fo seconds per example")
    parser.add_argument("--compare-n", type=int, default=30, help="[5] digits images, both certifiers' defaults")
    parser.add_argument("--compare-eps", type=float, default=0.08, help="[5] Linf eps")
    parser.add_argument("--digits-examples", type=int, default=2, help="[5] digits images, every class solved")
    parser.add_argument("--records", nargs="+", default=RECORDS, help="[6] dataset/table/model records")
    parser.add_argument("--records-cap", type=int, default=8, help="[6] open examples per record at most")
    parser.add_argument("--records-start", type=int, default=0, help="[6] first example index (e.g. 15: after bab's prefix)")
    parser.add_argument("--records-timeout", type=float, default=10.0, help="[6] sdp-fo CPU seconds per example")
    parser.add_argument("--memory-child", choices=["zoo", "wide"], help=argparse.SUPPRESS)
    parser.add_argument("--memory-eps", type=float, default=0.1)
    parser.add_argument("--memory-steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        _sdp_fo.memory_child(args.memory_child, args.memory_eps, args.memory_steps)
        return
    print(f"load average {os.getloadavg()[0]:.2f} (CPU seconds on a shared machine: compare ratios within one run)")
    if args.part in ("sdp", "all") and args.skip != "timing":
        model = train_mlp()
        data = load_dataset("digits", "test")
        x, y = data.x[: args.examples], data.y[: args.examples]
        per_problem(model, x, y, args.eps_time)
    if args.part in ("sdp", "all") and args.skip != "accuracy":
        certified_accuracy(args.n, args.eps)
    if args.part in ("sdp-fo", "all"):
        _sdp_fo.cnn_targets(args.cnn_n, args.cnn_eps, args.lp_exact, args.timeout)
        _sdp_fo.memory_targets(str(Path(__file__).resolve()), args.memory_eps, args.memory_steps)
    if args.part in ("sdp-fo", "compare", "all"):
        nets = [("digits-mlp-standard (zoo; sdp-fo tuned on it)", load_model("digits-mlp-standard")),
                ("digits CNN 8x4x4-32-10 trained here (not tuned on)", train_cnn())]
        _sdp_fo.compare_targets(nets, args.compare_n, args.compare_eps, args.digits_examples)
    if args.part == "records":  # reads the committed records; not part of "all"
        _sdp_fo.records_targets(Path(__file__).resolve().parent.parent / "leaderboards", args.records,
                                args.records_cap, args.records_start, args.records_timeout)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
