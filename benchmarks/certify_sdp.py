"""SDP certifier (issue 4): seconds per (example, class) and certified accuracy next to IBP and CROWN.

1. Seconds per (example, class) problem on a 64-32-32-10 MLP trained here on the digits train split
   (Linf eps ``--eps-time``, every class solved, the verified bound included), against a
   straightforward cvxpy + SCS solve (problem built and compiled for each (example, class), SCS eps
   1e-3, cold start, no verified bound). Target: <= 5 s per problem with a verified bound.
   The bounds are printed next to LP and CROWN (same intermediate bounds): SDP >= LP >= CROWN.
2. Certified accuracy of the zoo model ``digits-mlp-standard`` (64-64-32-10) on the first ``--n``
   digits test images at several Linf eps: IBP, CROWN, SDP (SDP solves only what CROWN leaves).

Run (one core, as every check in this project)::

    OMP_NUM_THREADS=1 python benchmarks/certify_sdp.py [--n 20] [--examples 2]

Not part of the test run.
"""
from __future__ import annotations

import argparse
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
from certify.convex import crown_bounds, lower_to_dense, make_relaxations  # noqa: E402
from certify.sdp import SDPProblem  # noqa: E402
from robustbench_lite import ThreatModel, load_dataset, load_model  # noqa: E402
from robustbench_lite.zoo.architectures import DIGITS_MEAN, DIGITS_STD, Normalize  # noqa: E402


def train_mlp(widths: tuple[int, ...] = (64, 32, 32, 10), epochs: int = 60, seed: int = 0) -> nn.Sequential:
    """A standard-trained MLP on the digits train split (a few seconds)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [Normalize(DIGITS_MEAN, DIGITS_STD), nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    data = load_dataset("digits", "train")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(data.y)).split(50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            opt.step()
    return model.eval()


def straightforward_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, count: int,
                            cap: float = 60.0) -> list[float]:
    """Build + compile + solve (SCS eps 1e-3, cold) per (example, class), as a first cvxpy script would."""
    threat = ThreatModel("Linf", eps)
    net = lower_to_dense(model, tuple(x.shape[1:]))
    rel = make_relaxations(net, x.reshape(len(x), -1).double().numpy(), threat,
                           [(lo.detach().double().numpy(), hi.detach().double().numpy())
                            for lo, hi in crown_bounds(model, x, threat)])
    out = []
    for j in [j for j in range(10) if j != int(y[0])][:count]:
        c = np.eye(10)[int(y[0])] - np.eye(10)[j]
        start = time.perf_counter()
        problem = SDPProblem(net, "Linf")
        problem.set(net, rel[0], c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            problem.problem.solve(solver=cp.SCS, eps_abs=1e-3, eps_rel=1e-3, ignore_dpp=True, time_limit_secs=cap)
        out.append(time.perf_counter() - start)
        print(f"    straightforward solve: SCS status {problem.problem.status}, "
              f"{problem.problem.solver_stats.num_iters} iterations (capped at {cap:g} s)")
    return out


def per_problem(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    threat = ThreatModel("Linf", eps)
    start = time.perf_counter()
    res = SDP(early_stop=False, crown_first=False)(model, x, y, threat)
    wall = time.perf_counter() - start
    secs = [p["seconds"] for p in res.info["problems"]]
    lp = LP(early_stop=False, crown_first=False)(model, x, y, threat).margin_lower
    crown = CROWN()(model, x, y, threat).margin_lower
    mask = torch.ones_like(crown, dtype=torch.bool).scatter_(1, y[:, None], False)
    sdp = res.margin_lower
    print(f"[1] 64-32-32-10 MLP, Linf eps {eps}: {len(secs)} SDP problems (SCS eps 1e-3, verified bound)")
    print(f"    seconds per (example, class): mean {statistics.mean(secs):.2f}, median {statistics.median(secs):.2f}, "
          f"max {max(secs):.2f}, first (cold) {secs[0]:.2f}; wall incl. CROWN bounds + compile {wall:.1f} s")
    print(f"    margin bounds, mean over classes: SDP {sdp[mask].mean():.4f}  LP {lp[mask].mean():.4f}  "
          f"CROWN {crown[mask].mean():.4f}; SDP >= LP - 1e-3 everywhere: {bool((sdp[mask] >= lp[mask] - 1e-3).all())}, "
          f"LP >= CROWN - 1e-5 (1 + |CROWN|): {bool((lp[mask] >= crown[mask] - 1e-5 * (1 + crown[mask].abs())).all())}")
    for p in res.info["problems"]:
        print(f"      class {p['class']}: {p['seconds']:.1f} s, {p['solver_status']}")
    print(f"    certified: SDP {res.certified.sum().item()}/{len(y)}, LP {int(((lp > 0) | ~mask).all(1).sum())}, "
          f"CROWN {int(((crown > 0) | ~mask).all(1).sum())}")
    base = straightforward_seconds(model, x[:1], y[:1], eps, 1)
    print(f"    straightforward build+compile+solve per problem (no verified bound): "
          f"{', '.join(f'{s:.2f}' for s in base)} s -> ratio ours/straightforward "
          f"{statistics.mean(secs) / statistics.mean(base):.2f}")


def certified_accuracy(n: int, eps_list: list[float]) -> None:
    model = load_model("digits-mlp-standard")
    data = load_dataset("digits", "test")
    x, y = data.x[:n], data.y[:n]
    correct = (model(x).argmax(1) == y).sum().item()
    print(f"[2] digits-mlp-standard, first {n} test images, clean {correct}/{n}")
    print("    eps     IBP  CROWN   SDP  SDP-only  SDP timeouts  SDP problems  SDP seconds")
    for eps in eps_list:
        threat = ThreatModel("Linf", eps)
        ibp = IBP()(model, x, y, threat).certified
        crown = CROWN()(model, x, y, threat).certified
        start = time.perf_counter()
        res = SDP()(model, x, y, threat)
        secs = time.perf_counter() - start
        sdp = res.certified
        print(f"    {eps:<6g} {int(ibp.sum()):>4} {int(crown.sum()):>6} {int(sdp.sum()):>5} {int((sdp & ~crown).sum()):>9}"
              f" {res.status.count('timeout'):>13} {len(res.info['problems']):>13} {secs:>12.1f}")
        assert not (crown & ~sdp).any(), "SDP must certify what CROWN certifies (its bound starts from CROWN's)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="test images for certified accuracy")
    parser.add_argument("--examples", type=int, default=2, help="examples for the per-problem timing")
    parser.add_argument("--eps-time", type=float, default=0.03)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.02, 0.05, 0.08, 0.1])
    parser.add_argument("--skip", choices=["timing", "accuracy"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.skip != "timing":
        model = train_mlp()
        data = load_dataset("digits", "test")
        x, y = data.x[: args.examples], data.y[: args.examples]
        per_problem(model, x, y, args.eps_time)
    if args.skip != "accuracy":
        certified_accuracy(args.n, args.eps)


if __name__ == "__main__":
    main()
