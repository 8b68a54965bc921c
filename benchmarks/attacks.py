"""Attack speed and strength side by side, in one run, on the shipped MNIST zoo models.

1. PGD-40 (Linf eps 0.3, step 0.01, random start): ours vs torchattacks' PGD vs the floor, a bare loop
   of 40 forward+backward passes on the same batch. Targets: ours <= 1.1x the floor, faster than
   torchattacks.
2. ``autoattack`` vs ``autoattack-ref`` (pyautoattack, version="standard") on the same examples:
   robust accuracy (ours must be <= theirs, and no example broken by the reference only) and time
   (target: ours <= 0.5x theirs), wall and CPU seconds (CPU seconds are what a shared machine distorts
   least). By default our cascade runs twice: with the reference's Square start (stripes; the
   "autoattack-standard" suite) and with the opt-in warm start (``square_start="best"``, a custom suite).

Run (one core, as every check in this project)::

    pip install -e ".[bench]"            # torchattacks, only for this script
    OMP_NUM_THREADS=1 python benchmarks/attacks.py
    OMP_NUM_THREADS=1 python benchmarks/attacks.py --skip-pgd --models mnist5k-cnn-pgd-at --n-autoattack 200

Not part of the test run. Timings are the best of ``--repeats`` runs (PGD) to damp a shared machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# this file is named attacks.py: run as a script, its folder must not shadow the ``attacks`` package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from attacks import PGD, AutoAttack, AutoAttackRef
from attacks.losses import input_gradient
from benchmarks._timing import best_time, timed
from robustbench_lite.data import load_dataset
from robustbench_lite.threat import ThreatModel
from robustbench_lite.zoo import list_models, load_model

MODELS = ("mnist5k-cnn-standard", "mnist5k-cnn-pgd-at", "mnist5k-cnn-trades")
THREAT = ThreatModel("Linf", 0.3)
STEPS, STEP_SIZE = 40, 0.01


def floor_loop(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """40 forward+backward passes to the input and nothing else: no attack can do less work. The gradient
    goes through ``input_gradient`` as ours does (native CPU backward for narrow convolutions), so the
    floor does the same work per pass."""
    x_adv = x.clone().requires_grad_(True)
    for _ in range(STEPS):
        grad = input_gradient(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv, model)


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


def bench_autoattack(model: nn.Module, x: Tensor, y: Tensor, square_starts: list[str]) -> None:
    """Ours (each Square start asked for) and the reference, alternated in one process on the same examples."""
    cascades = {start: AutoAttack(square_start=start) for start in square_starts}
    runs = {start: timed(lambda: cascade(model, x, y, THREAT)) for start, cascade in cascades.items()}
    wall_r, cpu_r, ref = timed(lambda: AutoAttackRef()(model, x, y, THREAT))
    acc_ref = float((~ref.success).float().mean())
    print(f"  AA       {x.shape[0]} examples; reference (pyautoattack standard) robust {acc_ref:.3f}"
          f"  wall {wall_r:6.1f}s cpu {cpu_r:6.1f}s")
    for start, (wall_o, cpu_o, ours) in runs.items():
        acc_ours = float((~ours.success).float().mean())
        only_ref = int((ref.success & ~ours.success).sum())
        only_ours = int((ours.success & ~ref.success).sum())
        print(f"  AA       ours (square_start={start}, suite {cascades[start].suite}) robust "
              f"{acc_ours:.3f} {ours.flags.get('robust_after')}  wall {wall_o:6.1f}s cpu {cpu_o:6.1f}s")
        print(f"  AA       robust ours - reference = {acc_ours - acc_ref:+.3f} (target <= 0); broken by the reference only:"
              f" {only_ref} (target 0), by ours only: {only_ours};  time ours/reference = cpu {cpu_o / cpu_r:.2f}x"
              f" wall {wall_o / wall_r:.2f}x (target <= 0.50)")
        print(f"  AA       passes: ours forward {ours.forward} backward {ours.backward}; "
              f"reference forward {ref.forward} backward {ref.backward}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--n-pgd", type=int, default=500, help="examples for the PGD comparison")
    parser.add_argument("--n-autoattack", type=int, default=200, help="examples for the AutoAttack comparison")
    parser.add_argument("--square-starts", nargs="+", default=["stripes", "best"], choices=["best", "stripes"],
                        help="our cascade's Square start(s) to run next to the reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-autoattack", action="store_true")
    parser.add_argument("--skip-pgd", action="store_true")
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
        if not args.skip_pgd:
            bench_pgd(model, data.x[:args.n_pgd], data.y[:args.n_pgd], args.repeats)
        if not args.skip_autoattack:
            bench_autoattack(model, data.x[:args.n_autoattack], data.y[:args.n_autoattack], args.square_starts)


if __name__ == "__main__":
    main()
