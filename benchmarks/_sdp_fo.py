"""The first-order SDP's targets (issue 12), printed by ``benchmarks/certify_sdp.py --part sdp-fo``.

[3] ``mnist5k-cnn-pgd-at`` at Linf 0.1, 0.2, 0.3: the first ``n`` test images that alpha-CROWN does not
    certify; of them, how many PGD-40 refutes (no sound certifier can certify those), how many ``sdp-fo``
    certifies against alpha-CROWN (0 by construction) and the LP (its first-order dual for every example; the
    exact cvxpy LP on the first ``lp_exact`` unrefuted ones: ~5 min a class here), the bounds per open class
    against alpha-CROWN's, and CPU / wall seconds per example.
[4] Peak RSS of the optimisation and of the dense check, each in a fresh process, for the zoo CNN and a CNN
    twice as wide (channels and hidden units doubled, random weights), against the number of activations.
[5] Against the exact cvxpy/SCS ``sdp``, side by side on digits nets (the zoo's ``digits-mlp-standard``, on
    which sdp-fo's defaults were tuned, and a small CNN trained by the script, on which they were not):
    certified fraction, seconds per example and bound gap (:func:`compare_targets`).
"""
from __future__ import annotations

import collections
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from attacks import PGD
from certify import LP, SDP, SDPFO, AlphaCROWN, CROWN
from certify.base import spec_matrix
from certify.crown import bounds_and_margins
from certify.graph import build_graph
from certify.rounding import float64_model
from certify.sdp_fo import _rows
from certify.sdp_fo_problem import LiftedProblem
from certify.sdp_fo_solve import SDPDual, lp_phase
from certify.sdp_fo_verify import sdp_bounds
from robustbench_lite import ThreatModel, load_dataset, load_model
from robustbench_lite.zoo.architectures import MNIST_MEAN, MNIST_STD, Normalize


def _open_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, n: int) -> list[int]:
    """Indices of the first n examples alpha-CROWN does not certify (scanned 100 at a time)."""
    found: list[int] = []
    for s in range(0, len(y), 100):
        cert = AlphaCROWN()(model, x[s:s + 100], y[s:s + 100], threat).certified
        found += [s + i for i in range(len(cert)) if not cert[i]]
        if len(found) >= n:
            break
    return found[:n]


def cnn_targets(n: int, eps_list: list[float], lp_exact: int, timeout: float) -> None:
    model = load_model("mnist5k-cnn-pgd-at")
    data = load_dataset("mnist5k", "test")
    print(f"[3] mnist5k-cnn-pgd-at, the first {n} test images alpha-CROWN does not certify; sdp-fo defaults but "
          f"timeout={timeout:g} s; seconds are CPU (wall) per example it ran on")
    print("    eps   imgs correct PGD-refuted open  alpha  LP-FO  LP(exact: k of m)  sdp-fo  s/example      "
          "classes sdp>alpha  mean gain over alpha  statuses")
    for eps in eps_list:
        threat = ThreatModel("Linf", eps)
        idx = _open_examples(model, data.x, data.y, threat, n)
        x, y = data.x[idx], data.y[idx]
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        refuted = PGD(steps=40)(model, x, y, threat).success & correct
        todo = (correct & ~refuted).nonzero().flatten()
        alpha = AlphaCROWN()(model, x[todo], y[todo], threat).margin_lower
        cert = SDPFO(timeout=timeout)
        wall, cpu = time.perf_counter(), time.process_time()
        res = cert(model, x[todo], y[todo], threat)
        wall, cpu = (time.perf_counter() - wall) / max(1, len(todo)), (time.process_time() - cpu) / max(1, len(todo))
        lp_fo = sum(1 for by in res.info["certified_by"] if by in ("crown", "lp"))  # the cascade's LP dual
        exact = LP(max_inputs=784, max_neurons=10_000, time_limit=1200.0)
        k = min(lp_exact, len(todo))
        lp_ok = int(exact(model, x[todo[:k]], y[todo[:k]], threat).certified.sum()) if k else 0
        solved = [p for p in res.info["problems"] if "sdp_bound" in p and math.isfinite(p["sdp_bound"])]
        beats = [p for p in solved if p["sdp_bound"] > float(alpha[p["example"], p["class"]])]
        gain = statistics.mean(p["sdp_bound"] - float(alpha[p["example"], p["class"]]) for p in solved) if solved else 0.0
        statuses = {s.split(":")[0]: res.status.count(s) for s in set(res.status)}
        print(f"    {eps:<5g} {len(idx):>4} {int(correct.sum()):>7} {int(refuted.sum()):>11} {len(todo):>4} {0:>6} "
              f"{lp_fo:>6} {lp_ok:>6} of {k:<2} of {len(todo):<4} {int(res.certified.sum()):>6}  "
              f"{cpu:>5.1f} ({wall:>5.1f})  {len(beats):>4}/{len(solved):<4} {gain:>+20.3f}  {statuses}", flush=True)


def wide_cnn(seed: int = 0) -> nn.Sequential:
    """The zoo's mnist-cnn with twice the channels and hidden units (random weights)."""
    torch.manual_seed(seed)
    return nn.Sequential(Normalize(MNIST_MEAN, MNIST_STD), nn.Conv2d(1, 32, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * 7 * 7, 200), nn.ReLU(), nn.Linear(200, 10)).eval()


def _rss(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return float(line.split()[1]) / 1024
    return math.nan


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def memory_child(kind: str, eps: float, steps: int) -> None:
    """One measurement (run in its own process): prints a JSON line."""
    torch.set_num_threads(1)
    model = load_model("mnist5k-cnn-pgd-at") if kind == "zoo" else wide_cnn()
    data = load_dataset("mnist5k", "test")
    x, y = data.x[5:6], data.y[5:6]
    threat = ThreatModel("Linf", eps)
    bounds, crown = bounds_and_margins(model, x, y, threat)
    j = int(crown[0].scatter(0, y, math.inf).argmin())  # the hardest class: one row
    pads = [(lo[0], hi[0]) for lo, hi in bounds]  # float64, proven
    spec = spec_matrix(y, 10)[0][[j]]
    graph = build_graph(model, (1, 28, 28))
    p32 = LiftedProblem(graph, x.float(), _rows(pads, 1, torch.float32), threat, spec.float())
    far = time.perf_counter() + 1e9
    _reset_peak()
    base = _rss("VmRSS")
    lp = lp_phase(p32, p32.crown_multipliers(), 20, 0.2, 0.1, far)
    res = SDPDual(p32, lp.mult, steps, 0.2, 0.1, 2, 8, far, torch.Generator().manual_seed(0)).advance(far)
    optimise = _rss("VmHWM") - base
    p64 = LiftedProblem(build_graph(float64_model(model), (1, 28, 28)), x.double(), _rows(pads, 1, torch.float64),
                        threat,
                        spec.double())
    n = int(p64.n[0])
    _reset_peak()
    base = _rss("VmRSS")
    verify = math.nan
    if n + 1 <= 6000:
        sdp_bounds(p64, res.mult.map(lambda t: t.double()), res.vector.double(), sweeps=5)
        verify = _rss("VmHWM") - base
    print(json.dumps({"kind": kind, "activations": p32.width, "lifted": n, "optimise_mb": optimise,
                      "verify_mb": verify, "dense_mb": 2 * 8 * (n + 1) ** 2 / 2 ** 20}))


def memory_targets(script: str, eps: float, steps: int) -> None:
    print(f"[4] peak RSS above the process's baseline (Linf {eps}, one (example, class), {steps} SDP steps; each "
          "case in a fresh process): optimisation (matrix-free) and the dense float64 check")
    print("    net                 activations  lifted n  optimise MB  dense check MB  (2 (n+1)^2 doubles)")
    for kind in ("zoo", "wide"):
        out = subprocess.run([sys.executable, script, "--memory-child", kind, "--memory-eps", str(eps),
                              "--memory-steps", str(steps)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        name = "mnist5k-cnn-pgd-at" if kind == "zoo" else "2x wide (random)"
        verify = "skipped (> max_dense)" if math.isnan(r["verify_mb"]) else f"{r['verify_mb']:.0f}"
        print(f"    {name:<19} {r['activations']:>11} {r['lifted']:>9} {r['optimise_mb']:>12.1f} {verify:>15}  "
              f"({r['dense_mb']:.0f})", flush=True)


def _gap_line(label: str, exact: torch.Tensor, fo: torch.Tensor, mask: torch.Tensor) -> str:
    gaps = (exact - fo)[mask].tolist()
    return (f"{label} exact - sdp-fo over {len(gaps)} (example, class): mean {statistics.mean(gaps):+.4f}, median "
            f"{statistics.median(gaps):+.4f}, max {max(gaps):+.4f}, min {min(gaps):+.4f}")


def compare_targets(nets: list[tuple[str, nn.Module]], n: int, eps: float, gap_examples: int) -> None:
    """[5] sdp-fo against the exact cvxpy + SCS ``sdp``, side by side on each net of ``nets`` (digits inputs).

    (a) both certifiers with their defaults (the cascade: CROWN, LP, then the SDP on the classes left open)
    on the first ``n`` test images: certified count, CPU (wall) seconds per example, and the margin bounds'
    gap on the (example, class) pairs where both ran their SDP; (b) no cascade (every class solved by both,
    both verified bounds, SCS at the certifier's default eps 1e-3) on the first ``gap_examples`` images: the gap of the final margin bounds and the share
    of the exact SDP's gain over CROWN that sdp-fo reaches (where that gain exceeds 0.05)."""
    data = load_dataset("digits", "test")
    threat = ThreatModel("Linf", eps)
    print(f"[5] sdp-fo against the exact cvxpy + SCS sdp, digits test images, Linf {eps}; seconds are CPU (wall)")
    for name, model in nets:
        x, y = data.x[:n], data.y[:n]
        with torch.no_grad():
            correct = int((model(x).argmax(1) == y).sum())
        mask = _open_mask(y, 10)
        crown = CROWN()(model, x, y, threat)
        print(f"    {name}: clean {correct}/{n}, CROWN certifies {int(crown.certified.sum())}/{n}")
        runs, secs = {}, {}
        for label, cert in (("sdp", SDP()), ("sdp-fo", SDPFO())):
            wall, cpu = time.perf_counter(), time.process_time()
            res = cert(model, x, y, threat)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            runs[label], secs[label] = res, cpu
            statuses = {s.split(":")[0]: res.status.count(s) for s in set(res.status)}
            solved = sum(1 for p in res.info["problems"] if "sdp_bound" in p)
            print(f"      (a) {label:<7} certified {int(res.certified.sum()):>3}/{n} ({res.certified.float().mean():.2f})  "
                  f"{cpu / n:6.2f} ({wall / n:6.2f}) s/example  SDP solves {solved:>3}  {statuses}", flush=True)
        both = {(p["example"], p["class"]) for p in runs["sdp"].info["problems"] if "sdp_bound" in p}
        both &= {(p["example"], p["class"]) for p in runs["sdp-fo"].info["problems"] if "sdp_bound" in p}
        pair = torch.zeros_like(mask)
        for i, j in both:
            pair[i, j] = True
        if both:
            print(_gap_line("      (a) margin bounds,", runs["sdp"].margin_lower.double(),
                            runs["sdp-fo"].margin_lower.double(), pair))
        print(f"      (a) sdp-fo / sdp CPU seconds {secs['sdp-fo'] / secs['sdp']:.2f}; certified only by sdp-fo "
              f"{int((runs['sdp-fo'].certified & ~runs['sdp'].certified).sum())}, only by sdp "
              f"{int((runs['sdp'].certified & ~runs['sdp-fo'].certified).sum())}")
        m = gap_examples
        xg, yg = x[:m], y[:m]
        exact_cert = SDP(crown_first=False, early_stop=False)  # SCS at its default eps 1e-3 (1e-5: minutes a class)
        times = {}
        for label, cert in (("sdp", exact_cert), ("sdp-fo", SDPFO(early_stop=False, timeout=600.0))):
            cpu = time.process_time()
            runs[label] = cert(model, xg, yg, threat)
            times[label] = time.process_time() - cpu
        with torch.no_grad():  # sdp-fo leaves a misclassified example at CROWN's bounds: no SDP to compare
            gmask = _open_mask(yg, 10) & (model(xg).argmax(1) == yg)[:, None]
        exact, fo, base = (runs["sdp"].margin_lower.double(), runs["sdp-fo"].margin_lower.double(),
                           crown.margin_lower[:m].double())
        gain = exact - base
        share = ((fo - base) / gain)[gmask & (gain > 0.05)]
        count = int(gmask.sum())
        line = _gap_line(f"      (b) every class, {m} images: {times['sdp'] / count:.2f} vs {times['sdp-fo'] / count:.2f} "
                         "CPU s per (example, class) (sdp vs sdp-fo);", exact, fo, gmask)
        if len(share):
            line += (f"; share of the exact SDP's gain over CROWN reached: median {share.median():.3f}, "
                     f"min {share.min():.3f} ({len(share)} problems)")
        print(line, flush=True)


def _open_mask(y: torch.Tensor, k: int) -> torch.Tensor:
    return torch.ones(len(y), k, dtype=torch.bool).scatter_(1, y[:, None], False)


def records_targets(root: Path, cases: list[str], cap: int, start: int, timeout: float) -> None:
    """[6] Where sdp-fo adds to the committed leaderboards: for each ``table/model`` of ``cases`` (e.g.
    ``mnist5k/Linf-0.3/mnist5k-cnn-rst``), the record's examples from ``start`` on that no attack broke and
    no certifier other than sdp-fo proved (at most ``cap``), and how many of them sdp-fo certifies with
    ``timeout`` CPU seconds an example (the registry's budget), in CPU seconds per example."""
    print(f"[6] sdp-fo (timeout {timeout:g} CPU s) on the records' examples no other certifier proved "
          f"(index >= {start}, at most {cap} per record)")
    print(f"    {'record':42s} {'open':>5s} {'sdp-fo':>6s} {'CPU s/ex':>8s}  statuses (certifying stage)")
    for case in cases:
        record = json.loads((root / f"{case}.json").read_text())
        dataset_name, _, model_name = case.split("/")
        per = record["per_example"]
        others = [flags for name, flags in per["certified_by"].items() if name != "sdp-fo"]
        idx = [i for i, robust in enumerate(per["robust"]) if i >= start and robust and not any(f[i] for f in others)][:cap]
        if not idx:
            print(f"    {case:42s} {0:5d}", flush=True)
            continue
        data = load_dataset(dataset_name, record["dataset"].get("split", "test"))
        threat = ThreatModel(record["threat_model"]["norm"], float(record["threat_model"]["eps"]))
        model = load_model(model_name).eval()
        started = time.process_time()
        res = SDPFO(timeout=timeout, clock="cpu")(model, data.x[idx], data.y[idx], threat)
        cpu = (time.process_time() - started) / len(idx)
        counts = collections.Counter(res.status)
        stages = collections.Counter(s for s in res.info["certified_by"] if s)
        print(f"    {case:42s} {len(idx):5d} {int(res.certified.sum()):6d} {cpu:8.1f}  {dict(counts)} {dict(stages)}",
              flush=True)
