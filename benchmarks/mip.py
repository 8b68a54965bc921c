"""MIP certifier (issue 11's exact reference): milliseconds per (example, class) MILP on the tiny random
nets that the branch-and-bound agreement tests use, dense and conv, Linf and L2.

For every net shape: ``--points`` random points of [0, 1]^2 (labels: the net's own prediction), every class
solved (no CROWN shortcut, no early stop), and printed: the solve time per (example, class) (median and 90th
percentile, HiGHS alone), the whole certifier call per example (CROWN intermediate bounds, lowering, every
class), the mean number of binaries (unstable ReLUs), and how many examples were decided (certified, or
refuted with a counterexample that passed the float32 check) against left undecided or timed out.

Run (one core, as every check in this project)::

    OMP_NUM_THREADS=1 python benchmarks/mip.py [--points 20] [--eps 0.1]

Not part of the test run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests" / "certify"))  # the test nets: _exact.random_net / conv_net

import torch  # noqa: E402
from _exact import conv_net, random_net  # noqa: E402

from certify import MIP  # noqa: E402
from robustbench_lite import ThreatModel  # noqa: E402

SHAPES = {"dense 2-8-8-3": lambda s: random_net((2, 8, 8, 3), s),
          "dense 2-16-16-3": lambda s: random_net((2, 16, 16, 3), s),
          "dense 2-32-32-3": lambda s: random_net((2, 32, 32, 3), s),
          "conv 1x1x2": conv_net}


def run(make, norm: str, eps: float, points: int, nets: int) -> dict:
    solves, calls, binaries, outcome = [], [], [], {"certified": 0, "refuted": 0, "other": 0}
    for seed in range(nets):
        model = make(seed)
        shape = (1, 1, 2) if isinstance(model[0], torch.nn.Conv2d) else (2,)
        x = torch.rand(points, *shape, generator=torch.Generator().manual_seed(seed))
        y = model(x).argmax(1)
        start = time.perf_counter()
        res = MIP(crown_first=False, early_stop=False)(model, x, y, ThreatModel(norm, eps))
        calls.append((time.perf_counter() - start) / points)
        solves += [p["seconds"] for p in res.info["problems"]]
        binaries += [p["binaries"] for p in res.info["problems"]]
        for status, refuted in zip(res.status, res.info["refuted"]):
            key = "certified" if status == "certified" else "refuted" if refuted else "other"
            outcome[key] += 1
    solves.sort()
    return {"median": statistics.median(solves), "p90": solves[int(0.9 * (len(solves) - 1))],
            "call": statistics.median(calls), "binaries": statistics.mean(binaries), **outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--nets", type=int, default=3)
    parser.add_argument("--eps", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'net':<18}{'norm':<6}{'ms/solve (median)':>18}{'p90':>8}{'ms/example':>12}{'binaries':>10}"
          f"{'certified':>11}{'refuted':>9}{'undecided':>11}")
    for name, make in SHAPES.items():
        for norm in ("Linf", "L2"):
            r = run(make, norm, args.eps, args.points, args.nets)
            print(f"{name:<18}{norm:<6}{1000 * r['median']:>18.1f}{1000 * r['p90']:>8.1f}{1000 * r['call']:>12.1f}"
                  f"{r['binaries']:>10.1f}{r['certified']:>11}{r['refuted']:>9}{r['other']:>11}")


if __name__ == "__main__":
    main()
