"""Part 4 of ``benchmarks/certify.py``: IBP and CROWN on CIFAR-scale residual nets, ours against auto_LiRPA.

Every (net, method, who) case runs in a fresh process (its own peak memory) under one address-space
limit and one wall-clock limit; the child reports its peak resident memory every second, so a case
stopped by the limit still shows how much it held.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
NETS = ("resnet-18", "wideresnet-16-4")
EPS = 1 / 255


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cifar", action="store_true", help="also run part 4 (CIFAR-scale nets against the peer)")
    parser.add_argument("--cifar-only", action="store_true", help="run only part 4")
    parser.add_argument("--cifar-images", type=int, default=20, help="images per case of part 4")
    parser.add_argument("--cifar-nets", nargs="*", default=list(NETS), help=f"nets of part 4 (default {', '.join(NETS)}; any wideresnet-D-W)")
    parser.add_argument("--methods", nargs="*", default=["IBP", "CROWN"], help="methods of part 4")
    parser.add_argument("--time-limit", type=float, default=1800.0, help="wall seconds per case of part 4")
    parser.add_argument("--limit-gb", type=float, default=20.0, help="address-space limit per case of part 4")
    parser.add_argument("--cifar-case", nargs=3, metavar=("NET", "METHOD", "WHO"), help=argparse.SUPPRESS)
    parser.add_argument("--case-eps", type=float, default=None, help=argparse.SUPPRESS)


def model(name: str) -> nn.Module:
    """RobustBench's ResNet-18 (``resnet-*``), or ``wideresnet-D-W`` of its WideResNet class, with seeded
    random weights and BatchNorm statistics (the CIFAR data and trained weights are not on this machine)."""
    from robustbench_lite.zoo.robustbench_archs import WideResNet
    from robustbench_lite.zoo.architectures import build

    torch.manual_seed(0)
    net = build(name) if name.startswith("resnet") else WideResNet(*map(int, name.split("-")[1:]))  # wideresnet-D-W
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def workload(name: str, n: int, eps: float | None) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    """(net, x, y, eps) of a case: ``mnist-lenet`` is part 2's LeNet (trained 2 epochs of mnist5k, seeded) on
    the first ``n`` mnist5k test images at ``eps``; any other name is a CIFAR-scale net (:func:`model`) on
    ``n`` seeded random 32x32 images at Linf 1/255."""
    if name == "mnist-lenet":
        from benchmarks.certify import lenet
        from robustbench_lite.data import load_dataset

        test = load_dataset("mnist5k", "test")
        return lenet(), test.x[:n], test.y[:n], float(eps)
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return model(name), x, torch.arange(n) % 10, EPS


def run_case(args: argparse.Namespace) -> None:
    """Child process: one case; prints progress lines and a final result line (JSON)."""
    name, method, who = args.cifar_case
    net, x, y, eps = workload(name, args.cifar_images, args.case_eps)
    started = time.perf_counter()

    def report() -> None:
        while True:
            print(json.dumps({"progress": True, "peak_rss_mb": _peak_mb(), "wall_s": time.perf_counter() - started}),
                  flush=True)
            time.sleep(1.0)

    threading.Thread(target=report, daemon=True).start()
    cpu, note = time.process_time(), ""
    with torch.no_grad():
        if who == "ours":
            from certify import CROWN, IBP
            from robustbench_lite.threat import ThreatModel

            certifier = IBP() if method == "IBP" else CROWN(memory_mb=args.memory_mb)
            margins = certifier(net, x, y, ThreatModel("Linf", eps)).margin_lower
        else:
            from auto_LiRPA import BoundedModule, BoundedTensor
            from auto_LiRPA.perturbations import PerturbationLpNorm

            spec = torch.eye(10)[y].unsqueeze(1) - torch.eye(10).unsqueeze(0)
            ptb = PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
            for conv_mode in ("patches", "matrix"):  # its default first; matrix where patches fails on a net
                started, cpu = time.perf_counter(), time.process_time()
                try:
                    bounded = BoundedModule(net, torch.zeros(1, *x.shape[1:]), bound_opts={"conv_mode": conv_mode})
                    margins, _ = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method=method, C=spec)
                    break
                except RuntimeError as exc:
                    if conv_mode == "matrix":
                        raise
                    print(f"peer: conv_mode patches failed ({str(exc)[:80]}); timing matrix mode", file=sys.stderr)
                    note = "matrix mode (patches failed)"
    margins = margins.detach().scatter(1, y[:, None], float("inf"))
    print(json.dumps({"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
                      "peak_rss_mb": _peak_mb(), "certified": int((margins > 0).all(1).sum()),
                      "min_margin": float(margins.min()), "note": note}), flush=True)


def _limit(gb: float):
    def apply() -> None:
        limit = int(gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def _case(script: str, args: argparse.Namespace, net: str, method: str, who: str, n: int | None = None,
          eps: float | None = None) -> dict:
    command = [sys.executable, script, "--cifar-case", net, method, who,
               "--cifar-images", str(args.cifar_images if n is None else n), "--memory-mb", str(args.memory_mb)]
    if eps is not None:
        command += ["--case-eps", str(eps)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.time_limit,
                              preexec_fn=_limit(args.limit_gb))
        err = done.stderr
        out, status = done.stdout, ("ok" if done.returncode == 0 else
                                    f"killed (signal {-done.returncode})" if done.returncode < 0 else
                                    "out of memory" if "MemoryError" in err or "can't allocate memory" in err else
                                    f"failed (exit {done.returncode})")
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        status = f"stopped at {args.time_limit:.0f} s"
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    final = next((r for r in reversed(lines) if not r.get("progress")), None)
    peak = max((r["peak_rss_mb"] for r in lines), default=float("nan"))
    if final is None and status.startswith("failed"):
        status += ": " + (err.strip().splitlines() or [""])[-1][:60]
    return {"status": status if final is None else "ok", "peak_rss_mb": peak, **(final or {})}


def peer_available() -> bool:
    try:
        import auto_LiRPA  # noqa: F401
    except ImportError:
        return False
    return True


def part4(args: argparse.Namespace, script: str) -> None:
    peer = peer_available()
    print(f"\npart 4: {args.cifar_images} random 32x32 images, Linf 1/255, random weights; one thread, each case in "
          f"its own process (limits: {args.time_limit:.0f} s, {args.limit_gb:g} GB address space); CROWN "
          f"memory_mb={args.memory_mb:g}")
    print_header(peer, f"{'net':16s} {'method':6s}")
    for net in args.cifar_nets:
        for method in args.methods:
            rows = {"ours": _case(script, args, net, method, "ours")}
            if peer:
                rows["peer"] = _case(script, args, net, method, "peer")
            print_pair(f"{net:16s} {method:6s}", rows)


def print_header(peer: bool, lead: str) -> None:
    """The column header of :func:`print_pair` after ``lead``; says so when the peer is missing (no ratios)."""
    if not peer:
        print("peer (auto_LiRPA) not found: run with PYTHONPATH=../shared/peers (see ../shared/peers/README.md); "
              "no ratios")
    print(f"{lead} {'who':5s} {'wall s':>8s} {'cpu s':>8s} {'peak RSS MB':>11s} {'certified':>9s} {'status':24s} "
          f"{'peer/ours (cpu)':>15s}")


def print_pair(lead: str, rows: dict[str, dict]) -> None:
    """One line per who (ours, peer) after ``lead``; on the peer's line, peer / ours CPU seconds when both
    finished (above 1: ours is faster)."""
    for who, r in rows.items():
        ratio = ""
        if who == "peer" and r["status"] == "ok" and rows["ours"]["status"] == "ok":
            ratio = f"{r['cpu_s'] / rows['ours']['cpu_s']:15.2f}"
        ok = r["status"] == "ok"
        wall = f"{r['wall_s']:8.1f}" if ok else f"{'-':>8s}"
        cpu = f"{r['cpu_s']:8.1f}" if "cpu_s" in r else f"{'-':>8s}"
        cert = f"{r['certified']:9d}" if "certified" in r else f"{'-':>9s}"
        status = r["status"] + (f", {r['note']}" if r.get("note") else "")
        print(f"{lead} {who:5s} {wall} {cpu} {r['peak_rss_mb']:11.0f} {cert} {status:24s} {ratio}", flush=True)
