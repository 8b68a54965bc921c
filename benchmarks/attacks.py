"""The standard AutoAttack suite, ours against pyautoattack's, on five architectures in one run.

Per architecture and per stage (APGD-CE, APGD-T, FAB-T, Square) it prints seconds, forward and
backward passes and queries for ours, for the reference (``autoattack-ref``: pyautoattack's own
``version="standard"``) and for the **floor**: every model call our cascade made, replayed with the
same batch sizes as bare calls (forward-only ones under ``torch.inference_mode``, gradient ones as one
forward and one backward to the input), so ``ours / floor`` is the cost of everything that is not the
model. Targets: ours <= 1.1x the floor on every architecture, at robust accuracy no higher than the
reference's (and no point broken by the reference only).

Architectures: the zoo's ``mnist-cnn`` (``mnist5k-cnn-pgd-at``, as shipped), a LeNet5-style net
(advertorch's MNIST LeNet5: 3x3 convolutions of 32 and 64 channels, each followed by 2x2 max-pooling,
200 hidden units), an MLP (784-256-256-10), a small ResNet with BatchNorm and residual additions on
3x32x32 inputs (MNIST digits, channels repeated, 2-pixel border) and a wide convolutional net (64 and
128 channels, 512 hidden units). All but the zoo model are adversarially trained here (PGD-AT,
Madry et al. 2018) at the benchmark's threat, briefly, so that most points survive every stage and the
budget, not early breaks, sets the cost; trained weights are cached in ``--cache-dir``.

Run (one thread, as every check in this project; the machine's load goes in the first line)::

    OMP_NUM_THREADS=1 python benchmarks/attacks.py
    OMP_NUM_THREADS=1 python benchmarks/attacks.py --archs lenet5 --n 64 --device cuda
    OMP_NUM_THREADS=1 python benchmarks/attacks.py --pgd --archs mnist-cnn   # + PGD-40 vs torchattacks

Not part of the test run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

# this file is named attacks.py: run as a script, its folder must not shadow the ``attacks`` package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from attacks import PGD, AutoAttack, AutoAttackRef  # noqa: E402
from attacks.losses import input_gradient  # noqa: E402
from robustbench_lite.data import load_dataset  # noqa: E402
from robustbench_lite.defenses import PGDAT  # noqa: E402
from robustbench_lite.threat import ThreatModel  # noqa: E402
from robustbench_lite.train import TrainConfig, train  # noqa: E402
from robustbench_lite.zoo import Normalize, load_model  # noqa: E402
from robustbench_lite.zoo.architectures import MNIST_MEAN, MNIST_STD  # noqa: E402

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
ARCHS = ("mnist-cnn", "lenet5", "mlp", "resnet", "wide-cnn")


# --- the architectures ----------------------------------------------------------------------------
def lenet5() -> nn.Module:
    return nn.Sequential(Normalize(MNIST_MEAN, MNIST_STD),
                         nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 5 * 5, 200), nn.ReLU(), nn.Linear(200, 10))


def mlp() -> nn.Module:
    return nn.Sequential(Normalize(MNIST_MEAN, MNIST_STD), nn.Flatten(), nn.Linear(784, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def wide_cnn() -> nn.Module:
    return nn.Sequential(Normalize(MNIST_MEAN, MNIST_STD),
                         nn.Conv2d(1, 64, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 128, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(128 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, 10))


class Block(nn.Module):
    """The basic residual block (He et al. 2016): two 3x3 conv + BatchNorm, an identity or 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet() -> nn.Module:
    """A small ResNet for 3x32x32 inputs: 16-32-64 channels, one block per stage."""
    return nn.Sequential(Normalize(MNIST_MEAN * 3, MNIST_STD * 3),
                         nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


FACTORIES = {"lenet5": lenet5, "mlp": mlp, "resnet": resnet, "wide-cnn": wide_cnn}


class Images:
    """mnist5k as (x, y); for the ResNet as 3x32x32 (channels repeated, a 2-pixel zero border)."""

    def __init__(self, split: str, rgb32: bool) -> None:
        data = load_dataset("mnist5k", split)
        self.x = torch.nn.functional.pad(data.x.repeat(1, 3, 1, 1), (2, 2, 2, 2)) if rgb32 else data.x
        self.y = data.y
        self.indices = torch.arange(len(self.y))
        self.name = "mnist5k-rgb32" if rgb32 else "mnist5k"

    def __len__(self) -> int:
        return len(self.y)


def trained(arch: str, threat: ThreatModel, epochs: int, cache: Path, device: torch.device) -> nn.Module:
    """The zoo's model, or ``arch`` PGD-trained (10 steps of eps / 4) for ``epochs`` epochs, cached."""
    if arch == "mnist-cnn":
        return load_model("mnist5k-cnn-pgd-at").to(device).eval()
    torch.manual_seed(0)
    model = FACTORIES[arch]()
    path = cache / f"{arch}-{threat.key}-{epochs}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        defense = PGDAT(eps=threat.eps, norm=threat.norm, steps=10, step_size=threat.eps / 4)
        train(model, Images("train", arch == "resnet"), defense, TrainConfig(epochs=epochs, batch_size=64, lr=1e-3),
              device=device)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.to(device).eval()


# --- recording the model calls ------------------------------------------------------------------------
class Recorder(nn.Module):
    """Wraps the model and records every call: [stage, batch size, with gradient, start, backward passes]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.stage = "clean"
        self.calls: list[list] = []

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 0:  # the call check's empty-batch probe (threat.check_call): no example passes
            return self.model(x)
        entry = [self.stage, x.shape[0], bool(x.requires_grad and torch.is_grad_enabled()), CLOCK(), 0]
        self.calls.append(entry)
        out = self.model(x)
        if out.requires_grad:
            def count(grad: Tensor) -> None:
                entry[4] += 1
            out.register_hook(count)
        return out


def label_our_calls(calls: list[list], stage_passes: dict[str, dict[str, int]]) -> None:
    """Our cascade's calls come in stage order: the clean pass, each stage's passes (its re-score
    included, ``flags["stage_passes"]``), the final re-score. Label each call with its stage."""
    budget = [(stage, stage_passes[stage]["forward"]) for stage in STAGES if stage in stage_passes]
    position = 1  # call 0 is the clean pass
    for stage, forward in budget:
        while forward > 0:
            calls[position][0] = stage
            forward -= calls[position][1]
            position += 1
    for call in calls[position:]:
        call[0] = "final"


class _StageFromLog(logging.Handler):
    """The reference logs "running <attack>" before each stage: switch the recorder's label there."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(level=logging.DEBUG)
        self.recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("running "):
            self.recorder.stage = message.split()[1]


def stage_table(calls: list[list], end: float) -> dict[str, dict[str, float]]:
    """Per stage: seconds (first call of the stage to the first call after it), forward, backward and
    forward-only example passes (Square's queries are the forward-only passes of its stage)."""
    out: dict[str, dict[str, float]] = {}
    for i, (stage, n, grad, start, backward) in enumerate(calls):
        row = out.setdefault(stage, {"seconds": 0.0, "forward": 0, "backward": 0, "queries": 0})
        row["seconds"] += (calls[i + 1][3] if i + 1 < len(calls) else end) - start
        row["forward"] += n
        row["backward"] += n * backward
        row["queries"] += 0 if grad else n
    return out


def floor(model: nn.Module, calls: list[list], x: Tensor, device: torch.device) -> dict[str, float]:
    """Seconds per stage of our calls replayed as bare calls (inference mode, or forward + backward)."""
    seconds: dict[str, float] = {}
    pool = x.repeat(max(1, -(-max(c[1] for c in calls) // x.shape[0])), *([1] * (x.dim() - 1)))
    for stage, n, grad, _, backward in calls:
        batch = pool[:n]
        _sync(device)
        began = CLOCK()
        if grad:
            batch = batch.clone().requires_grad_(True)
            input_gradient(model(batch).sum(), batch, model)  # the standard suite: one backward per such call
        else:
            with torch.inference_mode():
                model(batch)
        _sync(device)
        seconds[stage] = seconds.get(stage, 0.0) + CLOCK() - began
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: seconds as this process's CPU time on a CPU device (what a shared, loaded machine distorts least; the
#: run is single-threaded), wall time (after a synchronize) on a GPU; set by main()
CLOCK = time.process_time


# --- one architecture ---------------------------------------------------------------------------------
def bench(arch: str, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, device: torch.device) -> dict:
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        clean = int((model(x).argmax(dim=1) == y).sum())
    ours_rec, ref_rec = Recorder(model), Recorder(model)
    _sync(device)
    began = CLOCK()
    ours = AutoAttack()(ours_rec, x, y, threat)
    _sync(device)
    ours_end = CLOCK()
    label_our_calls(ours_rec.calls, ours.flags["stage_passes"])
    reference_log = logging.getLogger("auto-attack")
    handler, level = _StageFromLog(ref_rec), reference_log.level
    reference_log.addHandler(handler)
    reference_log.setLevel(logging.DEBUG)
    try:
        ref_began = CLOCK()
        ref = AutoAttackRef()(ref_rec, x, y, threat)
        _sync(device)
        ref_end = CLOCK()
    finally:
        reference_log.removeHandler(handler)
        reference_log.setLevel(level)
    floor_seconds = floor(model, ours_rec.calls, x, device)
    mine, theirs = stage_table(ours_rec.calls, ours_end), stage_table(ref_rec.calls, ref_end)
    print(f"\n{arch}: {x.shape[0]} points, clean {clean}, robust ours {int((~ours.success).sum())} / reference "
          f"{int((~ref.success).sum())}, broken by the reference only {int((ref.success & ~ours.success).sum())}, "
          f"by ours only {int((ours.success & ~ref.success).sum())}; robust after each stage {ours.flags['robust_after']}")
    print(f"  {'stage':8} {'ours s':>8} {'floor s':>8} {'ref s':>8} {'ours/floor':>10} {'ours/ref':>8} | "
          f"{'fwd':>9} {'bwd':>9} {'fwd-only':>9} | {'ref fwd':>9} {'ref bwd':>9} {'ref fwd-only':>12}")
    totals = {"ours": ours_end - began, "floor": sum(floor_seconds.values()), "ref": ref_end - ref_began}
    for stage in ("clean", *STAGES, "final", "total"):
        if stage == "total":
            row = {k: sum(r[k] for r in mine.values()) for k in ("forward", "backward", "queries")}
            ref_row = {k: sum(r[k] for r in theirs.values()) for k in ("forward", "backward", "queries")}
            t_ours, t_floor, t_ref = totals["ours"], totals["floor"], totals["ref"]
        else:
            row, ref_row = mine.get(stage), theirs.get(stage)
            t_ours = row["seconds"] if row else 0.0
            t_floor, t_ref = floor_seconds.get(stage, 0.0), ref_row["seconds"] if ref_row else 0.0
        if row is None and ref_row is None:
            continue
        row = row or {"forward": 0, "backward": 0, "queries": 0}
        ref_row = ref_row or {"forward": 0, "backward": 0, "queries": 0}
        print(f"  {stage:8} {t_ours:8.2f} {t_floor:8.2f} {t_ref:8.2f} {_ratio(t_ours, t_floor):>10} "
              f"{_ratio(t_ours, t_ref):>8} | {row['forward']:9d} {row['backward']:9d} {row['queries']:9d} | "
              f"{ref_row['forward']:9d} {ref_row['backward']:9d} {ref_row['queries']:12d}")
    return {"arch": arch, **totals, "robust_ours": int((~ours.success).sum()), "robust_ref": int((~ref.success).sum()),
            "only_ref": int((ref.success & ~ours.success).sum()), "n": x.shape[0]}


def bench_pgd(name: str, n: int, repeats: int = 3) -> None:
    """PGD-40 (Linf 0.3, step 0.01, random start) on a zoo model: ours, torchattacks' and the floor (40 bare
    forward + backward passes on the same batch), best of ``repeats``."""
    try:
        import torchattacks
    except ImportError:
        print("PGD-40 comparison skipped: torchattacks is not installed (pip install -e '.[bench]')")
        return
    from benchmarks._timing import best_time

    model = load_model(name).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data = load_dataset("mnist5k", "test")
    x, y = data.x[:n], data.y[:n]
    threat = ThreatModel("Linf", 0.3)

    def bare() -> None:
        batch = x.clone().requires_grad_(True)
        for _ in range(40):
            input_gradient(torch.nn.functional.cross_entropy(model(batch), y, reduction="sum"), batch, model)

    t_floor, _ = best_time(bare, repeats)
    t_ours, _ = best_time(lambda: PGD(steps=40, abs_stepsize=0.01)(model, x, y, threat), repeats)
    theirs = torchattacks.PGD(model, eps=0.3, alpha=0.01, steps=40, random_start=True)
    t_theirs, _ = best_time(lambda: theirs(x, y), repeats)
    print(f"PGD-40 {name}, {n} points: ours/floor {t_ours / t_floor:.2f}x, ours/torchattacks {t_ours / t_theirs:.2f}x "
          f"(wall: floor {t_floor:.2f}s ours {t_ours:.2f}s torchattacks {t_theirs:.2f}s)")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--n", type=int, default=32, help="test points per architecture (the first n)")
    parser.add_argument("--n-heavy", type=int, default=8, help="test points for the ResNet and the wide CNN (each "
                        "robust point costs ~13,000 forward-equivalents of a 10M-MAC net, three times over)")
    parser.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=4, help="PGD-AT epochs of the architectures trained here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pgd", action="store_true", help="also PGD-40 vs torchattacks on the zoo's standard "
                        "and PGD-AT models (500 points; needs torchattacks, pip install -e .[bench])")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "robustbench-lite-bench")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    global CLOCK
    CLOCK = time.perf_counter if device.type == "cuda" else time.process_time
    threat = ThreatModel(args.norm, args.eps)
    print(f"threads {torch.get_num_threads()}, device {device}, threat {threat.key}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}, {args.n} points per architecture ({args.n_heavy} for the heavy two), "
          f"{'wall' if device.type == 'cuda' else 'CPU'} seconds")
    if args.pgd:
        for name in ("mnist5k-cnn-pgd-at", "mnist5k-cnn-standard"):
            bench_pgd(name, 500)
    results = []
    for arch in args.archs:
        model = trained(arch, threat, args.epochs, args.cache_dir, device)
        data = Images("test", arch == "resnet")
        n = args.n_heavy if arch in ("resnet", "wide-cnn") else args.n
        results.append(bench(arch, model, data.x[:n].to(device), data.y[:n].to(device), threat, device))
    print(f"\n{'architecture':12} {'robust ours/ref':>16} {'ref only':>8} {'ours s':>8} {'floor s':>8} {'ref s':>8} "
          f"{'ours/floor':>10} {'ours/ref':>8}   (targets: ours/floor <= 1.10, robust ours <= ref, ref only 0)")
    for r in results:
        print(f"{r['arch']:12} {r['robust_ours']:>7}/{r['robust_ref']:<8} {r['only_ref']:8d} {r['ours']:8.1f} "
              f"{r['floor']:8.1f} {r['ref']:8.1f} {_ratio(r['ours'], r['floor']):>10} {_ratio(r['ours'], r['ref']):>8}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
