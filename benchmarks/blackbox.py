"""Black-box attacks side by side with their peers, in one run, on the same MNIST zoo model and examples.

1. Square (score-based), ours vs pyautoattack's ``SquareAttack`` (the reference AutoAttack uses):
   same examples, same query budget, same p_init and p-schedule. Printed: success rate, median
   queries of the successful examples, wall and CPU seconds, and the ratios ours/reference.
2. HopSkipJump (decision-based), ours vs IBM ART's ``HopSkipJump``: ART runs ``--art-iterations``
   iterations; ours then gets, per example, ART's mean number of queries as its budget (and keeps
   minimising the distance, ``early_stop=False``). Printed: median adversarial distance (L2 and
   Linf), queries per example, wall and CPU seconds, and the ratios ours/ART.

Run (one core, as every check in this project; ART only for this script)::

    pip install -e ".[bench]"            # torchattacks, adversarial-robustness-toolbox
    OMP_NUM_THREADS=1 python benchmarks/blackbox.py --n 50

Not part of the test run; nothing is written to the repository. Without ART installed, part 2 says
so and is skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import warnings
from pathlib import Path

# as in benchmarks/attacks.py: the repository root first, this folder never shadowing a package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from attacks import HopSkipJump, Square  # noqa: E402
from benchmarks._timing import timed  # noqa: E402
from robustbench_lite.data import load_dataset  # noqa: E402
from robustbench_lite.threat import ThreatModel  # noqa: E402
from robustbench_lite.zoo import load_model  # noqa: E402


class Counting(nn.Module):
    """Counts the examples every forward pass sees: the peers' query count, which they do not report."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return self.model(x.float())  # ART's HopSkipJump hands over float64 arrays


def correct_examples(model: nn.Module, n: int, offset: int) -> tuple[Tensor, Tensor]:
    data = load_dataset("mnist5k", "test")
    x, y = data.x[offset:offset + 4 * n], data.y[offset:offset + 4 * n]
    with torch.no_grad():
        keep = model(x).argmax(dim=1) == y
    return x[keep][:n], y[keep][:n]


def bench_square(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, queries: int) -> None:
    from pyautoattack.square import SquareAttack

    ours_attack = Square(n_queries=queries, p_init=0.8, rescale_schedule=False)
    wall_o, cpu_o, ours = timed(lambda: ours_attack(model, x, y, threat))
    used_o = torch.tensor(ours.flags.get("median_queries_successful", float("nan")))

    counting = Counting(model)
    reference = SquareAttack(counting, norm=threat.norm, n_queries=queries, eps=threat.eps, p_init=0.8,
                             n_restarts=1, seed=0, resc_schedule=False, device=x.device)

    def run_reference() -> tuple[Tensor, Tensor]:
        reference.init_hyperparam(x)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            return reference.attack_single_run(x.clone(), y.clone())  # (queries per example, points)

    wall_r, cpu_r, (used_r, adv_r) = timed(run_reference)
    with torch.no_grad():
        success_r = model(adv_r).argmax(dim=1) != y
    inside = bool(threat.contains(adv_r, x).all())
    med_r = float(used_r[success_r].median()) if success_r.any() else float("nan")
    print(f"  Square   {threat.key}, {x.shape[0]} examples, {queries} queries, p_init 0.8, unscaled schedule")
    print(f"  Square   ours      success {float(ours.success.float().mean()):.3f}  median queries {float(used_o):7.1f}"
          f"  total {ours.queries:7d}  wall {wall_o:6.1f}s cpu {cpu_o:6.1f}s")
    print(f"  Square   reference success {float(success_r.float().mean()):.3f}  median queries {med_r:7.1f}"
          f"  total {counting.rows:7d}  wall {wall_r:6.1f}s cpu {cpu_r:6.1f}s  (inside ball and box: {inside})")
    print(f"  Square   ours/reference: cpu {cpu_o / cpu_r:.2f}x  wall {wall_o / wall_r:.2f}x  "
          f"median queries {float(used_o) / med_r:.2f}x  successes {int(ours.success.sum())} vs {int(success_r.sum())}"
          f"  (broken by reference only: {int((success_r & ~ours.success).sum())}, by ours only: "
          f"{int((ours.success & ~success_r).sum())})")


def bench_hsja(model: nn.Module, x: Tensor, y: Tensor, norm: str, iterations: int) -> None:
    try:
        from art.attacks.evasion import HopSkipJump as ArtHopSkipJump
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        print("  HSJA     IBM ART is not installed (pip install adversarial-robustness-toolbox): skipped")
        return
    threat = ThreatModel(norm, 1e3)  # a ball that contains the box: plain minimum-distance search
    counting = Counting(model)
    classifier = PyTorchClassifier(counting, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                   nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    art = ArtHopSkipJump(classifier, targeted=False, norm=2 if norm == "L2" else np.inf, max_iter=iterations,
                         max_eval=10000, init_eval=100, init_size=100, batch_size=64, verbose=False)
    logging.getLogger("art").setLevel(logging.ERROR)
    np.random.seed(0)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        wall_a, cpu_a, adv_a = timed(lambda: art.generate(x.numpy()))
    adv_a = torch.from_numpy(adv_a).to(x.dtype)
    per_example = counting.rows / x.shape[0]
    with torch.no_grad():
        fooled_a = model(adv_a).argmax(dim=1) != y
    dist_a = torch.where(fooled_a, threat.distance(adv_a, x), torch.tensor(float("inf")))

    ours_attack = HopSkipJump(n_queries=int(per_example), early_stop=False)
    wall_o, cpu_o, ours = timed(lambda: ours_attack(model, x, y, threat))
    dist_o = ours.distance

    def med(d: Tensor) -> float:  # the median over all examples, a failure counting as inf
        return float(d.sort().values[(d.numel() - 1) // 2])

    print(f"  HSJA     {norm}, {x.shape[0]} examples; ART {iterations} iterations = {per_example:.0f} queries/example;"
          f" ours gets that budget")
    print(f"  HSJA     ours median {norm} distance {med(dist_o):.4f}  found {int(torch.isfinite(dist_o).sum())}"
          f"  queries/example {ours.queries / x.shape[0]:7.0f}  wall {wall_o:6.1f}s cpu {cpu_o:6.1f}s")
    print(f"  HSJA     ART  median {norm} distance {med(dist_a):.4f}  found {int(fooled_a.sum())}"
          f"  queries/example {per_example:7.0f}  wall {wall_a:6.1f}s cpu {cpu_a:6.1f}s")
    both = torch.isfinite(dist_o) & torch.isfinite(dist_a)
    closer = int((dist_o[both] < dist_a[both]).sum())
    print(f"  HSJA     ours/ART: median distance {med(dist_o) / med(dist_a):.2f}x  cpu {cpu_o / cpu_a:.2f}x  "
          f"wall {wall_o / wall_a:.2f}x  queries {ours.queries / counting.rows:.2f}x  ours closer on {closer}/{int(both.sum())}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="examples for the Square comparison")
    parser.add_argument("--n-hsja", type=int, default=20, help="examples for the HopSkipJump comparison")
    parser.add_argument("--model", default="mnist5k-cnn-standard")
    parser.add_argument("--eps", type=float, default=0.15, help="Square's Linf radius")
    parser.add_argument("--queries", type=int, default=1000, help="Square's query budget")
    parser.add_argument("--art-iterations", type=int, default=10)
    parser.add_argument("--skip-hsja", action="store_true")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(True)
    model = load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    print(f"threads {torch.get_num_threads()}, model {args.model}, torch {torch.__version__}")
    x, y = correct_examples(model, args.n, offset=0)
    bench_square(model, x, y, ThreatModel("Linf", args.eps), args.queries)
    if not args.skip_hsja:
        x, y = correct_examples(model, args.n_hsja, offset=500)
        for norm in ("L2", "Linf"):
            bench_hsja(model, x, y, norm, args.art_iterations)


if __name__ == "__main__":
    main()
