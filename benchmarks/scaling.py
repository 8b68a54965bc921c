"""Throughput of distributed evaluation with 1 and 2 ranks (one thread each), and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/scaling.py [--model mnist5k-cnn-standard] [--n-examples 200]

Each configuration runs ``torchrun --standalone --nproc-per-node N -m robustbench_lite evaluate``
(gloo, CPU) on the same examples, seed and batch size, writing nothing; the printed figures are
examples per second of the whole command (process start and model loading included), their ratio,
and whether the two runs report the same per-example results. Not part of the test run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(ranks: int, args: argparse.Namespace) -> tuple[float, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "robustbench_lite", "evaluate", "--model", args.model, "--dataset", args.dataset,
           "--eps", str(args.eps), "--n-examples", str(args.n_examples), "--batch-size", str(args.batch_size),
           "--attacks", args.attacks, "--certifiers", args.certifiers, "--no-write", "--json", "--no-progress"]
    started = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        sys.exit(f"{ranks} rank(s) failed:\n{out.stderr[-3000:]}")
    return wall, json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist5k-cnn-standard")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--n-examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--attacks", default="pgd")
    parser.add_argument("--certifiers", default="ibp")
    args = parser.parse_args()
    results = {}
    for ranks in (1, 2):
        wall, record = run(ranks, args)
        results[ranks] = (wall, record)
        print(f"{ranks} rank(s): {wall:6.1f} s wall, {args.n_examples / wall:6.2f} examples/s "
              f"(robust {100 * record['robust_acc']:.1f}%, certified {100 * record['certified_acc']:.1f}%)")
    (w1, r1), (w2, r2) = results[1], results[2]
    same = r1["per_example"] == r2["per_example"]
    print(f"speed-up 2 ranks / 1 rank: {w1 / w2:.2f}x; identical per-example results: {same}")


if __name__ == "__main__":
    main()
