"""Attack speed and strength side by side, in one run, on the shipped MNIST zoo models.

1. PGD-40 (Linf eps 0.3, step 0.01, random start): ours vs torchattacks' PGD vs the floor, a bare loop
   of 40 forward+backward passes on the same batch. Targets: ours <= 1.1x the floor, faster than
   torchattacks.
2. ``autoattack`` vs ``autoattack-ref`` (pyautoattack, version="standard") on the same examples:
   robust accuracy (ours must be <= theirs) and wall time (target: ours <= 0.5x theirs).

Run (one core, as every check in this project)::

    pip install -e ".[bench]"            # torchattacks, only for this script
    OMP_NUM_THREADS=1 python benchmarks/attacks.py

Not part of the test run. Timings are the best of ``--repeats`` runs (PGD) to damp a shared machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

# this file is named attacks.py: run as a script, its folder must not shadow the ``attacks`` package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from attacks import PGD, AutoAttack, AutoAttackRef
from robustbench_lite.data import load_dataset
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo import list_models, load_model

MODELS = ("mnist5k-cnn-standard", "mnist5k-cnn-pgd-at")
THREAT = ThreatModel("Linf", 0.3)
STEPS, STEP_SIZE = 40, 0.01


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def floor_loop(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """40 forward+backward passes to the input and nothing else: no attack can do less work."""
    x_adv = x.clone().requires_grad_(True)
    for _ in range(STEPS):
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)


def robust_accuracy(model: nn.Module, x_adv: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x_adv).argmax(dim=1) == y).float().mean())


def bench_pgd(model: nn.Module, x: Tensor, y: Tensor, repeats: int) -> None:
    import torchattacks

    for p in model.parameters():  # all three get the same frozen model
        p.requires_grad_(False)
    t_floor, _ = best_time(lambda: floor_loop(model, x, y), repeats)
    ours_attack = PGD(steps=STEPS, abs_stepsize=STEP_SIZE)
    t_ours, ours = best_time(lambda: ours_attack(model, x, y, THREAT), repeats)
    theirs_attack = torchattacks.PGD(model, eps=THREAT.eps, alpha=STEP_SIZE, steps=STEPS, random_start=True)
    t_theirs, theirs = best_time(lambda: theirs_attack(x, y), repeats)
    print(f"  PGD-40   floor {t_floor:7.3f}s | ours {t_ours:7.3f}s robust {robust_accuracy(model, ours.x_adv, y):.3f}"
          f" | torchattacks {t_theirs:7.3f}s robust {robust_accuracy(model, theirs, y):.3f}")
    print(f"  PGD-40   ours/floor = {t_ours / t_floor:.2f}x (target <= 1.10)   "
          f"ours/torchattacks = {t_ours / t_theirs:.2f}x (target < 1)")
    print(f"  PGD-40   passes: ours forward {ours.forward} backward {ours.backward}; "
          f"floor {STEPS * x.shape[0]} each (ours stops on broken points)")


def bench_autoattack(model: nn.Module, x: Tensor, y: Tensor) -> None:
    start = time.perf_counter()
    ours = AutoAttack()(model, x, y, THREAT)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    ref = AutoAttackRef()(model, x, y, THREAT)
    t_ref = time.perf_counter() - start
    acc_ours, acc_ref = float((~ours.success).float().mean()), float((~ref.success).float().mean())
    print(f"  AA       ours {t_ours:7.1f}s robust {acc_ours:.3f} {ours.flags.get('robust_after')}"
          f" | reference {t_ref:7.1f}s robust {acc_ref:.3f}")
    print(f"  AA       robust ours - reference = {acc_ours - acc_ref:+.3f} (target <= 0)   "
          f"time ours/reference = {t_ours / t_ref:.2f}x (target <= 0.50)")
    print(f"  AA       passes: ours forward {ours.forward} backward {ours.backward}; "
          f"reference forward {ref.forward} backward {ref.backward}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--n-pgd", type=int, default=500, help="examples for the PGD comparison")
    parser.add_argument("--n-autoattack", type=int, default=100, help="examples for the AutoAttack comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-autoattack", action="store_true")
    args = parser.parse_args(argv)
    data = load_dataset("mnist5k", "test")
    shipped = {row["name"] for row in list_models()}
    print(f"threads {torch.get_num_threads()}, threat {THREAT.key}, torch {torch.__version__}")
    for name in args.models:
        if name not in shipped:
            print(f"{name}: not in the zoo yet, skipped")
            continue
        model = load_model(name)
        print(f"{name}")
        bench_pgd(model, data.x[:args.n_pgd], data.y[:args.n_pgd], args.repeats)
        if not args.skip_autoattack:
            bench_autoattack(model, data.x[:args.n_autoattack], data.y[:args.n_autoattack])


if __name__ == "__main__":
    main()
