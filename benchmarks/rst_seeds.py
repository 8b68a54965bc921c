"""Does unlabeled data recover the robust accuracy labels would? Robust self-training's seed study (issue 16).

Three configurations, one recipe (TRADES, Linf eps 0.3, beta 6, 10 inner steps of 0.04; Adam 1e-3
cosine, batch 50) and one budget (2,400 optimisation steps of batch 50 each), on mnist5k:

- ``L``  ``mnist5k-cnn-trades-1k``: TRADES on the 1,000 labeled images of mnist5k-ssl (120 epochs);
- ``RST`` ``mnist5k-cnn-rst``: robust self-training on those + the 3,000 unlabeled (30 epochs of the pool);
- ``C``  ``mnist5k-cnn-trades-4k``: TRADES on all 4,000 labeled mnist5k train images (30 epochs), the ceiling.

Each is trained with every ``--seeds`` value into ``RUNS/seed<s>/`` (``--train``; existing weights are
kept), evaluated on the first 1,000 mnist5k test images with PGD-40 then AutoAttack (cascade, seed 0)
at each ``--eps`` (``--evaluate``; records saved as ``RUNS/eval/<name>-s<seed>-<eps>.json``), and then
compared (always): robust accuracy r; d1 = r_RST - r_L; d2 = r_C - r_RST; the recovered fraction
R = d1 / (r_C - r_L); 95 % paired bootstrap intervals over test images (10,000 resamples, the three
models of one seed resampled together) and, over seeds, the mean with a t-interval (df = seeds - 1).
Verdict per eps, as pre-registered: SUPPORTED when seed 0's interval of R lies above 0.5 and every
seed's R > 0.5; REFUTED when that interval lies below 0.5 or the mean d1 <= 0; else INCONCLUSIVE.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/rst_seeds.py --runs /tmp/rst/runs --train --evaluate

Nothing is written to the repository. Training takes ~2,400 x 0.3 s per model on one free core,
evaluation ~5-15 CPU minutes per model and eps (AutoAttack on the points PGD leaves).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ["--arch", "mnist-cnn", "--lr", "0.001", "--lr-schedule", "cosine", "--optimizer", "adam", "--batch-size", "50",
          "--eps", "0.3", "--norm", "Linf", "--attack-steps", "10", "--attack-step-size", "0.04", "--beta", "6.0"]
CONFIGS = {  # key: (model name, options after `robustbench-lite train`)
    "L": ("mnist5k-cnn-trades-1k", ["--defense", "trades", "--dataset", "mnist5k-ssl", "--epochs", "120"]),
    "RST": ("mnist5k-cnn-rst", ["--defense", "rst", "--dataset", "mnist5k-ssl", "--epochs", "30",
                                "--unlabeled-fraction", "0.5", "--teacher-epochs", "40", "--teacher-lr", "0.001",
                                "--teacher-batch-size", "50"]),
    "C": ("mnist5k-cnn-trades-4k", ["--defense", "trades", "--dataset", "mnist5k", "--epochs", "30"]),
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t quantiles, df 1..5


def weights(runs: Path, key: str, seed: int) -> Path:
    return runs / f"seed{seed}" / f"{CONFIGS[key][0]}.safetensors"


def train_all(runs: Path, seeds: list[int]) -> None:
    for seed in seeds:
        for key, (name, options) in CONFIGS.items():
            if weights(runs, key, seed).is_file():
                continue
            command = [sys.executable, "-m", "robustbench_lite", "train", *options, *RECIPE, "--seed", str(seed),
                       "--out", str(runs / f"seed{seed}"), "--name", name, "--no-progress"]
            print("training:", " ".join(command[2:]), flush=True)
            subprocess.run(command, check=True, cwd=ROOT)


def record_path(runs: Path, key: str, seed: int, eps: float) -> Path:
    return runs / "eval" / f"{CONFIGS[key][0]}-s{seed}-{eps:g}.json"


def evaluate_all(runs: Path, seeds: list[int], eps_list: list[float], n: int) -> None:
    from robustbench_lite.atomic import atomic_write_text
    from robustbench_lite.data import load_dataset
    from robustbench_lite.evaluation.core import evaluate
    from robustbench_lite.leaderboard.records import build_record, to_json_text
    from robustbench_lite.threat import ThreatModel
    from robustbench_lite.zoo import load_model_with_info

    test = load_dataset("mnist5k", "test")
    for seed in seeds:
        for key in CONFIGS:
            for eps in eps_list:
                path = record_path(runs, key, seed, eps)
                if path.is_file():
                    continue
                model, info = load_model_with_info(weights(runs, key, seed))
                result = evaluate(model, test, ThreatModel("Linf", eps), attacks=["pgd", "autoattack"],
                                  certifiers=[], n_examples=n, batch_size=250, seed=0)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, to_json_text(build_record(result, info, model)))  # no half record to skip
                print(f"evaluated {path.name}: clean {result.clean_acc:.3f} robust {result.robust_acc:.3f}", flush=True)


def flags(runs: Path, key: str, seed: int, eps: float, n: int, which: str = "robust") -> np.ndarray | None:
    """Per-example flags of the first ``n`` test images (a record of more images is cut: each example's
    result is seeded by the example alone), or None without a record."""
    path = record_path(runs, key, seed, eps)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record["dataset"]["indices"]["start"] != 0 or record["dataset"]["n_examples"] < n:
        raise SystemExit(f"{path}: covers {record['dataset']['n_examples']} images from index "
                         f"{record['dataset']['indices']['start']}, not the first {n}")
    return np.array(record["per_example"][which][:n], dtype=np.float64)


def gaps(r_l: np.ndarray, r_rst: np.ndarray, r_c: np.ndarray) -> dict[str, np.ndarray]:
    """d1, d2 and R (nan where r_C <= r_L) of accuracies (any shape, elementwise)."""
    d1, d2, span = r_rst - r_l, r_c - r_rst, r_c - r_l
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"d1": d1, "d2": d2, "R": np.where(span > 0, d1 / span, np.nan)}


def paired_bootstrap(l: np.ndarray, rst: np.ndarray, c: np.ndarray, resamples: int = 10_000, seed: int = 0) -> dict:
    """Point values and 95 % percentile intervals of d1, d2, R, resampling test images (the same
    resample for the three models)."""
    idx = np.random.RandomState(seed).randint(0, len(l), size=(resamples, len(l)))
    point = {k: float(v) for k, v in gaps(l.mean(), rst.mean(), c.mean()).items()}
    boot = gaps(l[idx].mean(1), rst[idx].mean(1), c[idx].mean(1))
    out = {}
    for k, v in boot.items():
        finite = v[np.isfinite(v)]
        interval = np.percentile(finite, [2.5, 97.5]).tolist() if len(finite) else [float("nan")] * 2
        out[k] = (point[k], *interval, 1 - len(finite) / len(v))
    return out


def over_seeds(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval over seeds (the interval is the mean alone with one seed)."""
    a = np.array(values, dtype=np.float64)
    if len(a) < 2:
        return float(a.mean()), float("nan"), float("nan")
    half = T_975[len(a) - 1] * a.std(ddof=1) / np.sqrt(len(a))
    return float(a.mean()), float(a.mean() - half), float(a.mean() + half)


def report(runs: Path, seeds: list[int], eps_list: list[float], n: int = 1000) -> str:
    lines = []
    for eps in eps_list:
        lines.append(f"== Linf eps {eps:g}: robust accuracy (PGD-40 + AutoAttack, first {n:,} mnist5k test images) ==")
        lines.append(f"{'seed':>4}  {'L clean':>7} {'L':>6}  {'RST clean':>9} {'RST':>6}  {'C clean':>7} {'C':>6}  "
                     f"{'d1 = RST-L [95% CI]':>24}  {'d2 = C-RST [95% CI]':>24}  {'R [95% CI]':>22}")
        per_seed = {"d1": [], "d2": [], "R": [], "L": [], "RST": [], "C": []}
        first = None
        for seed in seeds:
            robust = {k: flags(runs, k, seed, eps, n) for k in CONFIGS}
            clean = {k: flags(runs, k, seed, eps, n, "correct") for k in CONFIGS}
            if any(v is None for v in robust.values()):
                lines.append(f"{seed:>4}  (not all three models evaluated)")
                continue
            b = paired_bootstrap(robust["L"], robust["RST"], robust["C"])
            first = b if first is None else first
            for k in ("d1", "d2", "R"):
                per_seed[k].append(b[k][0])
            for k in CONFIGS:
                per_seed[k].append(float(robust[k].mean()))
            ci = {k: f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]" for k, v in b.items() if k != "R"}
            r = b["R"]
            lines.append(f"{seed:>4}  {100 * clean['L'].mean():>7.1f} {100 * robust['L'].mean():>6.1f}  "
                         f"{100 * clean['RST'].mean():>9.1f} {100 * robust['RST'].mean():>6.1f}  "
                         f"{100 * clean['C'].mean():>7.1f} {100 * robust['C'].mean():>6.1f}  {ci['d1']:>24}  "
                         f"{ci['d2']:>24}  {r[0]:>6.2f} [{r[1]:.2f}, {r[2]:.2f}]"
                         + (f" ({100 * r[3]:.1f}% of resamples had r_C <= r_L)" if r[3] > 0 else ""))
        if not per_seed["d1"]:
            continue
        summary = {k: over_seeds(v) for k, v in per_seed.items()}
        lines.append(f"over {len(per_seed['d1'])} seed(s): " + ", ".join(
            f"{k} {m:.3f} [{lo:.3f}, {hi:.3f}]" for k, (m, lo, hi) in summary.items()))
        lines.append(f"verdict at eps {eps:g}: {verdict(first['R'], per_seed['R'], summary['d1'][0])}")
        lines.append("")
    return "\n".join(lines)


def verdict(r_first: tuple, r_seeds: list[float], mean_d1: float) -> str:
    """The pre-registered rule (see the module docstring)."""
    _, low, high, _ = r_first
    if low > 0.5 and all(r > 0.5 for r in r_seeds):
        return "SUPPORTED (unlabeled data recovers most of the robust accuracy labels would)"
    if high < 0.5 or mean_d1 <= 0:
        return "REFUTED (unlabeled data does not recover most of it)"
    return "INCONCLUSIVE"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder with seed<s>/ subfolders of trained models")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eps", type=float, nargs="+", default=[0.3, 0.1])
    parser.add_argument("--n", type=int, default=1000, help="first N mnist5k test images")
    parser.add_argument("--train", action="store_true", help="train the models that are missing")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the models that have no record yet")
    args = parser.parse_args()
    if args.train:
        train_all(args.runs, args.seeds)
    if args.evaluate:
        evaluate_all(args.runs, args.seeds, args.eps, args.n)
    print(report(args.runs, args.seeds, args.eps, args.n))


if __name__ == "__main__":
    main()
