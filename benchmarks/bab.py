"""Complete verification (issue 11): branch and bound against its targets, alpha-CROWN alone and MIP.

    OMP_NUM_THREADS=1 python benchmarks/bab.py                       # every case below, 200 images each
    OMP_NUM_THREADS=1 python benchmarks/bab.py --cases cnn-0.1 --n 50
    OMP_NUM_THREADS=1 python benchmarks/bab.py --clock cpu --timeout 60   # budgets in CPU seconds

For each case: AutoAttack (the leaderboard's attack, with the evaluator's per-example seeds) decides
which of the first ``--n`` test images are robust; alpha-CROWN and ``bab`` then run on those (as
the evaluator hands a ``skip_refuted`` certifier only unrefuted examples). bab's counterexamples
count against robust accuracy, so ``unresolved = robust - certified`` with robust after bab.
Per example: the median time of the examples bab certifies, subdomains bounded, subdomains per
second (over the examples that needed branching). Against ``mip`` (exact MIP) on the nets where it
finishes, when the ``mip`` certifier is registered: seconds per example side by side, verdicts equal.
Targets (issue 11): unresolved <= 1 point (cnn-0.1), <= 10 points (cnn-0.3), 0 (digits-0.1), with
<= 60 s per example. Prints the load: timings on a shared machine are noisy, budgets in ``--clock
cpu`` seconds are not. Nothing is written to the repository.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._timing import timed  # noqa: E402
from certify import CERTIFIERS, AlphaCROWN, BaB  # noqa: E402
from robustbench_lite import evaluate  # noqa: E402
from robustbench_lite.data import load_dataset  # noqa: E402
from robustbench_lite.threat import ThreatModel  # noqa: E402
from robustbench_lite.zoo import load_model  # noqa: E402

CASES = {  # name: (model, dataset, eps, target unresolved in points)
    "cnn-0.1": ("mnist5k-cnn-pgd-at", "mnist5k", 0.1, 1.0),
    "cnn-0.3": ("mnist5k-cnn-pgd-at", "mnist5k", 0.3, 10.0),
    "digits-0.1": ("digits-mlp-standard", "digits", 0.1, 0.0),
}


def robust_by_autoattack(model, data, threat: ThreatModel, n: int) -> torch.Tensor:
    """Per-example robustness (n,) under AutoAttack as the evaluator runs it (its seeds)."""
    result = evaluate(model, data, threat, attacks=("autoattack",), certifiers=(), n_examples=n, batch_size=250)
    return result.robust.cpu()


def run_case(name: str, n: int, timeout: float, clock: str, with_mip: bool) -> dict:
    model_name, dataset, eps, target = CASES[name]
    model = load_model(model_name, verify=False)
    data = load_dataset(dataset, "test")
    threat = ThreatModel("Linf", eps)
    x, y = data.x[:n], data.y[:n]
    robust = robust_by_autoattack(model, data, threat, n)
    idx = robust.nonzero().flatten()
    out = {"case": name, "n": n, "robust_aa": int(robust.sum()), "target": target}
    wall, cpu, alpha = timed(lambda: AlphaCROWN()(model, x[idx], y[idx], threat))
    out["alpha_certified"], out["alpha_s_per_example"] = int(alpha.certified.sum()), cpu / max(1, idx.numel())
    bab = BaB(timeout=timeout, clock=clock)
    verdicts, seconds, domains = [], [], []
    for i in idx.tolist():
        res = bab(model, x[i:i + 1], y[i:i + 1], threat)
        verdicts.append(res.info["verdict"][0])
        seconds.append(res.info["seconds"][0])
        domains.append(res.info["domains"][0])
    certified = sum(v == "certified" for v in verdicts)
    refuted = sum(v == "refuted" for v in verdicts)
    robust_after = out["robust_aa"] - refuted
    out.update(certified=certified, refuted=refuted, timeout=sum(v == "timeout" for v in verdicts),
               unknown=sum(v == "unknown" for v in verdicts), robust=robust_after,
               unresolved_points=100.0 * (robust_after - certified) / n)
    cert_times = [s for s, v in zip(seconds, verdicts) if v == "certified"]
    out["median_certified_s"] = statistics.median(cert_times) if cert_times else float("nan")
    branched = [(s, d) for s, d in zip(seconds, domains) if d > 0]
    out["domains_median"] = statistics.median([d for _, d in branched]) if branched else 0
    out["domains_per_s"] = sum(d for _, d in branched) / max(1e-9, sum(s for s, _ in branched)) if branched else 0.0
    out["max_s"] = max(seconds) if seconds else 0.0
    if with_mip and "mip" in CERTIFIERS.names():
        out["mip"] = compare_mip(model, x[idx], y[idx], threat, bab, verdicts, seconds)
    return out


def compare_mip(model, x, y, threat, bab, verdicts, seconds) -> dict:
    """MIP's seconds and verdicts on the same examples (where it finishes) next to bab's."""
    mip = CERTIFIERS.create("mip")
    agree, mip_s, bab_s = 0, [], []
    for i in range(x.shape[0]):
        _, cpu, res = timed(lambda: mip(model, x[i:i + 1], y[i:i + 1], threat))
        if res.status[0] == "timeout":
            continue
        mip_s.append(cpu)
        bab_s.append(seconds[i])
        agree += bool(res.certified[0]) == (verdicts[i] == "certified")
    return {"finished": len(mip_s), "agree": agree, "mip_s": sum(mip_s), "bab_s": sum(bab_s),
            "speedup": sum(mip_s) / max(1e-9, sum(bab_s))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--no-mip", action="store_true")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"bab timeout {args.timeout:g} {args.clock} s per example")
    header = (f"{'case':11s} {'n':>4s} {'robust(AA)':>10s} {'robust':>6s} {'alpha':>5s} {'bab':>4s} {'refuted':>7s} "
              f"{'timeout':>7s} {'unknown':>7s} {'unresolved':>10s} {'target':>6s} {'med cert s':>10s} "
              f"{'domains(med)':>12s} {'domains/s':>9s} {'max s':>6s} {'alpha s/ex':>10s}")
    rows = []
    for case in args.cases:
        started = time.perf_counter()
        r = run_case(case, args.n, args.timeout, args.clock, not args.no_mip)
        rows.append(r)
        print(f"[{case} done in {time.perf_counter() - started:.0f} s]", flush=True)
    print(header)
    for r in rows:
        print(f"{r['case']:11s} {r['n']:4d} {r['robust_aa']:10d} {r['robust']:6d} {r['alpha_certified']:5d} "
              f"{r['certified']:4d} {r['refuted']:7d} {r['timeout']:7d} {r['unknown']:7d} "
              f"{r['unresolved_points']:9.1f}% {r['target']:5.0f}% {r['median_certified_s']:10.2f} "
              f"{r['domains_median']:12.0f} {r['domains_per_s']:9.0f} {r['max_s']:6.1f} {r['alpha_s_per_example']:10.2f}")
    for r in rows:
        if "mip" in r:
            m = r["mip"]
            print(f"{r['case']}: mip finished {m['finished']}, verdicts agree on {m['agree']}, "
                  f"mip {m['mip_s']:.1f} s vs bab {m['bab_s']:.1f} s: bab {m['speedup']:.1f}x faster")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
