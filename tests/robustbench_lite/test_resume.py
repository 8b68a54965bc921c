"""Resumable evaluation: shards per batch, stale state cleared, and a SIGKILLed run that resumes to
exactly the numbers of an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from test_evaluate import toy_dataset, toy_model

from attacks import PGD
from robustbench_lite.evaluation.core import evaluate
from robustbench_lite.evaluation.outcome import BatchOutcome, LocalRunner
from robustbench_lite.evaluation.resume import ResumeRunner
from robustbench_lite.threat import ThreatModel

REPO = Path(__file__).resolve().parents[2]
THREAT = ThreatModel("Linf", 0.15)


def run(runner=None, batch_size=8, n=40):
    return evaluate(toy_model(), toy_dataset(n), THREAT, attacks=[PGD(steps=10)], certifiers=["ibp"],
                    batch_size=batch_size, runner=runner)


def same(a, b) -> None:
    assert torch.equal(a.correct, b.correct) and torch.equal(a.robust, b.robust)
    assert torch.equal(a.certified, b.certified) and torch.equal(a.indices, b.indices)
    assert a.summary() == b.summary()
    for ra, rb in zip(a.attacks + a.certifiers, b.attacks + b.certifiers):
        assert (ra.name, ra.accuracy, ra.examples, ra.forward, ra.backward) == \
            (rb.name, rb.accuracy, rb.examples, rb.forward, rb.backward)


def test_outcome_round_trips_through_a_shard(tmp_path):
    out = BatchOutcome(start=8, stop=12, correct=torch.tensor([1, 0, 1, 1], dtype=torch.bool),
                       success={"pgd#2": torch.tensor([0, 0, 1, 0], dtype=torch.bool)},
                       robust_after={"pgd#2": torch.tensor([1, 0, 0, 1], dtype=torch.bool)},
                       certified={"ibp": torch.zeros(4, dtype=torch.bool)}, x_worst=torch.rand(4, 1, 2, 2),
                       logits=torch.randn(4, 3), distance={"fmn": torch.tensor([0.1, float("nan"), 0.2, 0.3])},
                       costs={"pgd#2": {"seconds": 0.5, "forward": 12, "flags": {"zero_gradient": 1}}})
    store = ResumeRunner(tmp_path / "state", "key-1")
    store._prepare()
    store.save(out)
    back = store.load(8, 12)
    assert back is not None and back.costs == out.costs and (back.start, back.stop) == (8, 12)
    for name in ("correct", "x_worst", "logits"):
        assert torch.equal(getattr(back, name), getattr(out, name))
    assert torch.equal(back.success["pgd#2"], out.success["pgd#2"])
    assert torch.allclose(back.distance["fmn"], out.distance["fmn"], equal_nan=True)
    assert not list((tmp_path / "state").glob("*.partial"))


def test_resumed_run_loads_stored_batches_and_matches(tmp_path):
    full = run()
    first = ResumeRunner(tmp_path, "k")
    calls = []

    class Stop(Exception):
        pass

    def interrupt_after_two(i):
        calls.append(i)
        if len(calls) == 3:
            raise Stop

    try:
        run(_Interrupting(first, interrupt_after_two))
    except Stop:
        pass
    assert len(list(tmp_path.glob("batch-*.safetensors"))) == 2
    second = ResumeRunner(tmp_path, "k")
    same(run(second), full)
    assert (second.loaded, second.computed) == (2, 3)
    second.clear()
    assert not tmp_path.exists()


class _Interrupting:
    """A ResumeRunner whose compute calls go through ``hook`` first (to interrupt at a batch)."""

    def __init__(self, store, hook):
        self.store, self.hook = store, hook

    def run(self, bounds, compute, done=None):
        def wrapped(i):
            self.hook(i)
            return compute(i)
        return self.store.run(bounds, wrapped, done)


def test_state_of_another_evaluation_is_cleared_and_bad_shards_recomputed(tmp_path):
    run(ResumeRunner(tmp_path, "old"))
    (tmp_path / "batch-0000000-0000008.safetensors").write_bytes(b"garbage")
    again = ResumeRunner(tmp_path, "old")
    run(again)
    assert (again.loaded, again.computed) == (4, 1)  # the damaged shard is recomputed
    fresh = ResumeRunner(tmp_path, "new")
    same(run(fresh), run())
    assert (fresh.loaded, fresh.computed) == (0, 5)
    assert json.loads((tmp_path / "manifest.json").read_text())["key"] == "new"


class _Share:
    """One of two "ranks": settles its round-robin share of the batches into a shared resume folder, then
    stops (as a rank that computed its part and died before the gather would)."""

    def __init__(self, store: ResumeRunner, rank: int) -> None:
        self.store, self.rank = store, rank

    def run(self, bounds, compute, done=None):
        for i in range(self.rank, len(bounds), 2):
            self.store.settle(i, bounds[i], compute)
        raise _Stopped


class _Stopped(Exception):
    pass


def test_a_run_split_over_two_ranks_and_resumed_from_their_shards_matches_one_run(tmp_path):
    full = run(LocalRunner(), batch_size=8)
    for rank in (0, 1):  # each "rank" computes half of the batches (other batch order, other batches alive)
        try:
            run(_Share(ResumeRunner(tmp_path, "split"), rank), batch_size=8)
        except _Stopped:
            pass
    assert len(list(tmp_path.glob("batch-*.safetensors"))) == 5
    resumed = ResumeRunner(tmp_path, "split")
    same(run(resumed, batch_size=8), full)  # every number from shards computed in another order and process
    assert (resumed.loaded, resumed.computed) == (5, 0)


SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_evaluate import toy_dataset, toy_model
from attacks import PGD
from robustbench_lite.evaluation.core import evaluate
from robustbench_lite.evaluation.resume import ResumeRunner
from robustbench_lite.threat import ThreatModel

class SlowPGD(PGD):
    name = "pgd"
    def run(self, *args):
        time.sleep(float(sys.argv[2]))
        return super().run(*args)

runner = ResumeRunner(sys.argv[1], "same-key")
r = evaluate(toy_model(), toy_dataset(40), ThreatModel("Linf", 0.15), attacks=[SlowPGD(steps=10)],
             certifiers=["ibp"], batch_size=8, runner=runner)
print(r.robust.int().tolist(), r.certified.int().tolist(), runner.loaded, runner.computed)
"""


def test_sigkilled_subprocess_resumes_to_the_uninterrupted_numbers(tmp_path):
    state = tmp_path / "state"
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(state), "0.5"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(state.glob("batch-*.safetensors"))) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the run never wrote two shards"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(list(state.glob("batch-*.safetensors")))
    assert 2 <= done < 5 and proc.returncode == -signal.SIGKILL
    resumed = subprocess.run([sys.executable, str(script), str(state), "0"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    flags, loaded, computed = resumed.stdout.strip().rsplit(" ", 2)
    full = run()
    assert flags == f"{full.robust.int().tolist()} {full.certified.int().tolist()}"
    assert (int(loaded), int(computed)) == (done, 5 - done)
