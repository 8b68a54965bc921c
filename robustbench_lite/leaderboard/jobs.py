"""Evaluate one job and build its record: the one path behind ``robustbench-lite evaluate`` and
``leaderboard regenerate``. The CLI turns its arguments into a :class:`~.protocol.Job`, the registry turns
its entries into jobs; both end in :func:`run_job`, so a record has the same fields, ``inputs`` block and
resume key whichever door it came through.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import SoundnessError
from .protocol import Job, job_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How a job runs; nothing here changes a number of its record.

    ``state_root``: keep per-batch results under ``<state_root>/.state`` so an interrupted run resumes
    (None: not resumable). ``group``: an active torchrun group shares the job's batches over the ranks
    (rank 0 builds the record). ``unsupported``: what a certifier does on a layer it cannot bound
    ("error" or "skip", see :func:`~robustbench_lite.evaluation.core.evaluate`). ``cross_check``: every
    certifier also runs on a sample of refuted examples (``evaluate``'s ``cross_check``).
    """

    device: str = "cpu"
    arch: str | None = None
    data_dir: Path | None = None
    download: bool = False
    state_root: Path | None = None
    progress: Callable[[int, int], None] | None = None
    group: Any = None
    checks: Sequence[Any] | None = None
    unsupported: str = "error"
    defense_metrics: bool = True
    cross_check: bool | int = False


@dataclass
class JobRun:
    """What :func:`run_job` returns: the record (None on ranks other than 0), the evaluator's result, the
    model's info, the resume store (cleared by :meth:`done` once the record is safely written)."""

    record: dict[str, Any] | None
    result: Any
    info: Any
    store: Any = None

    def done(self) -> None:
        """Drop the job's resume state (call after the record is written)."""
        if self.store is not None:
            self.store.clear()


def run_job(job: Job, options: RunOptions = RunOptions(), inputs: dict[str, Any] | None = None) -> JobRun:
    """Evaluate ``job`` (resumably under ``options.state_root``) and return its record with ``inputs``;
    writes nothing but resume state. ``inputs``: the job's fingerprint block when the caller computed it
    already (regeneration plans from it); else computed here from the loaded weights and data."""
    from ..data import load_dataset
    from ..hashing import dataset_sha256
    from ..zoo import load_model_with_info
    from .records import build_record

    dataset = load_dataset(job.dataset, job.split, data_dir=options.data_dir, download=options.download)
    model, info = load_model_with_info(job.model, arch=options.arch, device=options.device)
    if inputs is None:
        n = min(job.n_examples, len(dataset))
        inputs = job_inputs(job, info.weights_sha256, dataset_sha256(dataset.x[:n], dataset.y[:n]))
    if job.is_corruptions:  # cheap (no gradients): not resumable
        from ..corruptions.evaluate import evaluate_corruptions

        result = evaluate_corruptions(model, dataset, corruptions=[name for name, _ in job.attacks],
                                      n_examples=job.n_examples, batch_size=job.batch_size, seed=job.seed,
                                      device=options.device)
        record = build_record(result, info, model)
        record["inputs"] = inputs
        return JobRun(record, result, info)
    result, store, is_main = _evaluate(job, model, dataset, info, inputs, options)
    if not is_main:
        return JobRun(None, result, info)
    record = build_record(result, info, model)
    if options.defense_metrics:
        from .sections import attach_defense_metrics

        attach_defense_metrics(record, model, info, dataset)  # WRM models: the certificate and measured loss
    record["inputs"] = inputs
    return JobRun(record, result, info, store)


def _evaluate(job: Job, model: Any, dataset: Any, info: Any, inputs: dict[str, Any],
              options: RunOptions) -> tuple[Any, Any, bool]:
    from ..evaluation.core import evaluate
    from ..threat import ThreatModel

    group = options.group
    is_main = group is None or group.is_main
    store = None
    if options.state_root is not None:
        from ..evaluation.resume import resume_runner_for

        store = resume_runner_for(options.state_root, job.dataset, job.norm, job.eps, info.name,
                                  f"{inputs['fingerprint']}:{job.batch_size}", access=job.access)
    runner = store
    if group is not None and group.active:
        from ..evaluation.distributed import DistributedRunner

        runner = DistributedRunner(group, store)
    try:
        result = evaluate(model, dataset, ThreatModel(job.norm, job.eps, access=job.access), attacks=job.plugins("attack"),
                          certifiers=job.plugins("certifier"), n_examples=job.n_examples,
                          batch_size=job.batch_size, seed=job.seed, device=options.device,
                          individual=job.mode == "individual", progress=options.progress if is_main else None,
                          runner=runner, certifier_examples=job.certifier_examples(), checks=options.checks,
                          unsupported=options.unsupported, cross_check=options.cross_check)
    except SoundnessError:
        if store is not None and is_main:
            store.clear()  # the same batches would fail the same way: nothing worth resuming
        raise
    return result, store, is_main


def cli_job(model: str, dataset: str, split: str, norm: str, eps: float, attacks: Sequence[str],
            certifiers: Sequence[str], prefixes: dict[str, int], n_examples: int, batch_size: int, seed: int,
            individual: bool) -> Job:
    """The :class:`Job` of a command line: plug-ins by registry name with default options, certifier
    prefixes (``--certifier-examples``) as the registry writes them."""
    from .protocol import PREFIX_KEY

    def spec(name: str, extra: dict[str, Any]) -> tuple[str, tuple[tuple[str, Any], ...]]:
        return name, tuple(sorted(extra.items()))

    return Job(model=model, dataset=dataset, split=split, norm=norm, eps=float(eps),
               attacks=tuple(spec(a, {}) for a in attacks),
               certifiers=tuple(spec(c, {PREFIX_KEY: prefixes[c]} if c in prefixes else {}) for c in certifiers),
               n_examples=n_examples, seed=seed, mode="individual" if individual else "cascade",
               batch_size=batch_size)


__all__ = ["JobRun", "RunOptions", "cli_job", "run_job"]
