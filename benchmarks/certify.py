"""Speed of the bound propagators: IBP and CROWN against a forward pass, and CROWN on a max-pool LeNet.

    OMP_NUM_THREADS=1 python benchmarks/certify.py            # everything, one table per part
    OMP_NUM_THREADS=1 python benchmarks/certify.py --quick    # fewer repeats

Part 1: bounds per second of IBP and CROWN on the zoo models (shipped weights where the zoo has
them, else random) next to a forward pass; IBP should cost a small constant number of passes.
``fwd-eq`` is the certifier's own ``forward_equivalents`` (multiply-accumulates of its affine steps
over those of a forward pass: machine-independent), next to the measured CPU-time ratio.
Part 2: CROWN margins of 20 and 100 (``--sizes``) MNIST test images on ``mnist-lenet`` (two conv +
max-pool blocks), trained here for two epochs of mnist5k: wall and CPU seconds and peak resident
memory, each case in its own process so the peak is its own, ours next to auto_LiRPA's CROWN (the peer, found
on ``PYTHONPATH=../shared/peers``; without it the table says so and prints no ratio) under the same
address-space and wall-clock limits as part 4.
Part 3: CROWN on the zoo's IBP-trained ``mnist5k-cnn-ibp``, 1000 test images at Linf 0.1 and 0.3
(the cost of CROWN on the mnist5k leaderboard entries), each in its own process.
Part 4 (``--cifar``, issue 17): IBP and CROWN on CIFAR-scale residual nets, RobustBench's ResNet-18 and a
WideResNet-16-4 (random weights and BatchNorm statistics, seeded; 20 random 32x32 images at Linf 1/255),
ours against auto_LiRPA (the peer, found on ``PYTHONPATH=../shared/peers``; without it the table says so
and prints no ratio). Each case runs in its own process under the same address-space limit
(``--limit-gb``) and wall-clock limit (``--time-limit``): wall and CPU seconds, peak resident memory
(sampled every second, so a stopped case still shows it), how many margins are certified, and the
ratio ours / peer (CPU seconds) where both finished. ``--cifar-only`` runs just this part.
Part 5 (``--rounding``): what proven verdicts cost (docs/soundness.md): IBP and CROWN as the evaluator
calls them (margins lowered by their rounding error, certified examples recomputed in float64) against
the same bounds in float32 alone (``bound_margins``, the computation before the rounding rule), side by
side in one process, best of the repeats, with how many examples were recomputed in float64.
Nothing is written to the repository.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from certify import CROWN, IBP  # noqa: E402
from benchmarks import _cifar  # noqa: E402
from robustbench_lite.data import load_dataset  # noqa: E402
from robustbench_lite.threat import ThreatModel  # noqa: E402
from robustbench_lite.zoo.architectures import build  # noqa: E402


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """Best wall and CPU seconds of ``repeats`` calls (the machine is shared: best is the least noisy),
    and the last call's result."""
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu), result


def _zoo_model(name: str, arch: str):
    try:
        from robustbench_lite.zoo import load_model
        return load_model(name, verify=False), name
    except Exception:  # the zoo entry is not there: random weights, same architecture
        torch.manual_seed(0)
        return build(arch).eval(), f"{arch} (random weights)"


def lenet(epochs: int = 2):
    """mnist-lenet trained briefly on mnist5k (seeded), so that bounds see realistic weights."""
    torch.manual_seed(0)
    data = load_dataset("mnist5k", "train")
    model = build("mnist-lenet")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(data.y)).split(64):
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def part1(repeats: int) -> None:
    test = load_dataset("mnist5k", "test")
    digits = load_dataset("digits", "test")
    cases = [("mnist5k-cnn-standard", "mnist-cnn", test, 0.1), ("mnist5k-cnn-pgd-at", "mnist-cnn", test, 0.1),
             ("mnist5k-cnn-ibp", "mnist-cnn", test, 0.1), ("digits-mlp-standard", "digits-mlp", digits, 0.05),
             (None, "mnist-lenet", test, 0.02)]
    print("part 1: bounds per CPU second (one thread, best of repeats), margins of N examples; "
          "'in fwd': CPU-time ratio to a forward pass, 'fwd-eq': the certifier's forward_equivalents")
    print(f"{'model':34s} {'eps':>5s} {'N':>4s} {'forward/s':>10s} {'IBP/s':>9s} {'IBP in fwd':>10s} "
          f"{'IBP fwd-eq':>10s} {'CROWN/s':>8s} {'CROWN in fwd':>12s} {'CROWN fwd-eq':>12s} "
          f"{'IBP cert':>8s} {'CROWN cert':>10s}")
    for name, arch, data, eps in cases:
        model, label = (lenet(), "mnist-lenet (trained 2 epochs)") if name is None else _zoo_model(name, arch)
        threat = ThreatModel("Linf", eps)
        n = 100
        x, y = data.x[:n], data.y[:n]
        with torch.no_grad():
            _, fwd, _ = _timed(lambda: model(x), repeats * 3)
            _, ibp, ibp_result = _timed(lambda: IBP()(model, x, y, threat), repeats)
            _, crown, crown_result = _timed(lambda: CROWN()(model, x[:20], y[:20], threat), max(1, repeats // 2))
        print(f"{label:34s} {eps:5.2f} {n:4d} {n / fwd:10.0f} {n / ibp:9.0f} {ibp / fwd:10.1f} "
              f"{ibp_result.forward_equivalents:10.1f} {20 / crown:8.1f} {crown / 20 / (fwd / n):12.0f} "
              f"{crown_result.forward_equivalents:12.0f} {ibp_result.certified.float().mean().item():8.2f} "
              f"{crown_result.certified.float().mean().item():10.2f}")


def part2_case(n: int, eps: float, memory_mb: float, zoo: str | None = None) -> dict:
    model = lenet() if zoo is None else _zoo_model(zoo, "mnist-cnn")[0]
    test = load_dataset("mnist5k", "test")
    x, y = test.x[:n], test.y[:n]
    threat = ThreatModel("Linf", eps)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        t, c = time.perf_counter(), time.process_time()
        result = CROWN(memory_mb=memory_mb)(model, x, y, threat)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "eps": eps, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak / 1024,
            "rss_growth_mb": (peak - before) / 1024, "certified": result.certified.float().mean().item(),
            "forward_equivalents": result.forward_equivalents}


def _case(n: int, eps: float, memory_mb: float, zoo: str | None = None) -> dict:
    """One measurement in a fresh process (its own peak memory)."""
    extra = ["--zoo", zoo] if zoo else []
    out = subprocess.run([sys.executable, __file__, "--case", str(n), "--eps", str(eps),
                          "--memory-mb", str(memory_mb), *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def part3(memory_mb: float) -> None:
    print("\npart 3: CROWN on mnist5k-cnn-ibp (zoo), 1000 test images, one thread")
    print(f"{'N':>5s} {'eps':>5s} {'wall s':>8s} {'cpu s':>7s} {'peak RSS MB':>11s} {'certified':>9s} {'fwd-eq':>8s}")
    for eps in (0.1, 0.3):
        r = _case(1000, eps, memory_mb, "mnist5k-cnn-ibp")
        print(f"{r['n']:5d} {eps:5.2f} {r['wall_s']:8.2f} {r['cpu_s']:7.2f} {r['peak_rss_mb']:11.0f} "
              f"{r['certified']:9.3f} {r['forward_equivalents']:8.0f}")


def part2(args: argparse.Namespace) -> None:
    peer = _cifar.peer_available()
    print(f"\npart 2: CROWN margins of the first N mnist5k test images on mnist-lenet with max-pool, ours "
          f"(memory_mb={args.memory_mb:g}) and the peer, each in its own process (limits: {args.time_limit:.0f} s, "
          f"{args.limit_gb:g} GB address space); one thread")
    _cifar.print_header(peer, f"{'N':>4s} {'eps':>5s}")
    for eps in args.eps:
        for n in args.sizes:
            rows = {"ours": _cifar._case(__file__, args, "mnist-lenet", "CROWN", "ours", n=n, eps=eps)}
            if peer:
                rows["peer"] = _cifar._case(__file__, args, "mnist-lenet", "CROWN", "peer", n=n, eps=eps)
            _cifar.print_pair(f"{n:4d} {eps:5.2f}", rows)


def part5(repeats: int, n_ibp: int = 100, n_crown: int = 20) -> None:
    from certify.base import margins_certified

    test = load_dataset("mnist5k", "test")
    print("\npart 5: proven verdicts vs float32 bounds alone, CPU seconds (one thread, best of repeats)")
    print(f"{'model':24s} {'eps':>5s} {'certifier':>9s} {'N':>4s} {'float32 s':>9s} {'proven s':>9s} {'ratio':>6s} "
          f"{'cert f32':>8s} {'cert proven':>11s}")
    for name in ("mnist5k-cnn-pgd-at", "mnist5k-cnn-ibp"):
        model, label = _zoo_model(name, "mnist-cnn")
        for eps in (0.1, 0.3):
            threat = ThreatModel("Linf", eps)
            for cert, n in ((IBP(), n_ibp), (CROWN(), n_crown)):
                x, y = test.x[:n], test.y[:n]
                with torch.no_grad():
                    _, raw_s, raw = _timed(lambda: cert.bound_margins(model, x, y, threat), repeats)
                    _, proven_s, proven = _timed(lambda: cert(model, x, y, threat), repeats)
                print(f"{label:24s} {eps:5.2f} {cert.name:>9s} {n:4d} {raw_s:9.3f} {proven_s:9.3f} "
                      f"{proven_s / raw_s:6.2f} {int(margins_certified(raw, y).sum()):8d} "
                      f"{int(proven.certified.sum()):11d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat per measurement")
    parser.add_argument("--eps", type=float, nargs="*", default=[0.02, 0.1], help="Linf eps of part 2")
    parser.add_argument("--memory-mb", type=float, default=1024.0, help="CROWN's memory budget")
    parser.add_argument("--sizes", type=int, nargs="*", default=[20, 100], help="numbers of images of part 2")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--zoo", help=argparse.SUPPRESS)
    parser.add_argument("--skip-part1", action="store_true")
    parser.add_argument("--skip-part3", action="store_true")
    _cifar.add_arguments(parser)
    parser.add_argument("--rounding", action="store_true", help="only part 5: the cost of proven verdicts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.case:
        print(json.dumps(part2_case(args.case, args.eps[0], args.memory_mb, args.zoo)))
        return
    if args.cifar_case:
        _cifar.run_case(args)
        return
    if args.cifar_only:
        _cifar.part4(args, __file__)
        return
    if args.rounding:
        part5(1 if args.quick else 3)
        return
    if not args.skip_part1:
        part1(1 if args.quick else 3)
    part2(args)
    if not args.skip_part3:
        part3(args.memory_mb)
    if args.cifar:
        _cifar.part4(args, __file__)


if __name__ == "__main__":
    main()
