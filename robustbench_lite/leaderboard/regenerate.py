"""``robustbench-lite leaderboard regenerate``: re-evaluate what changed, then re-render.

For every job of ``leaderboards/registry.toml`` (:mod:`robustbench_lite.leaderboard.protocol`) the plan compares
the record's stored ``inputs`` (weights, data, plug-in and evaluator source, protocol) with the
current ones: a job runs when there is no record, when an input changed (the reason names it) or
with ``force``; the others are skipped. Jobs run resumably (:mod:`robustbench_lite.evaluation.resume`; the
state folder ``<root>/.state/...`` is removed after the write) and, under torchrun, spread
over the ranks round-robin; rank 0 gathers the records, writes them (replacing, not merging: a
record holds exactly the registry's protocol) and re-renders README.md, index.html and the plots.
"""
from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..evaluation.distributed import Group, all_gather, shard
from ..errors import CorruptFileError, RobustBenchLiteError
from ..hashing import dataset_sha256, file_sha256
from .protocol import Job, job_inputs, job_protocol, load_registry, protocol_differences

log = logging.getLogger(__name__)

RUN, SKIP, UNAVAILABLE, ERROR = "run", "skip", "unavailable", "error"


@dataclass
class Planned:
    """What regeneration does with one job, and why (``reasons``: human-readable lines)."""

    job: Job
    path: Path
    action: str
    reasons: list[str] = field(default_factory=list)
    inputs: dict[str, Any] | None = None


@dataclass
class Report:
    planned: list[Planned]
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rendered: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def select(jobs: list[Job], only: str | None) -> list[Job]:
    """Jobs whose model name or ``dataset/norm-eps/model`` key matches the glob ``only``."""
    if not only:
        return list(jobs)
    return [j for j in jobs if fnmatch.fnmatch(j.model, only) or fnmatch.fnmatch(j.key, only)]


def current_weights_sha256(model: str) -> str:
    """The weights' sha256 without evaluating: the zoo card's, else the file's / loaded module's."""
    from ..zoo import read_cards

    card = read_cards().get(model)
    if isinstance(card, dict) and card.get("weights_sha256"):
        return str(card["weights_sha256"])
    if Path(model).is_file():
        return file_sha256(model)
    from ..zoo import load_model_with_info

    _, info = load_model_with_info(model)
    return str(info.weights_sha256)


_DATA_SHA: dict[tuple[str, str, int], str] = {}


def current_data_sha256(job: Job) -> str:
    key = (job.dataset, job.split, job.n_examples)
    if key not in _DATA_SHA:
        from ..data import load_dataset

        ds = load_dataset(job.dataset, job.split)
        sub = ds.subset(slice(0, min(job.n_examples, len(ds))))
        _DATA_SHA[key] = dataset_sha256(sub.x, sub.y)
    return _DATA_SHA[key]


def why_run(record: dict[str, Any] | None, inputs: dict[str, Any], job: Job) -> list[str]:
    """Reasons to re-evaluate (empty: the record is up to date)."""
    if record is None:
        return ["no record yet"]
    old = record.get("inputs")
    if not old:
        return ["the record has no input fingerprint"]
    reasons = []
    if old.get("weights_sha256") != inputs["weights_sha256"]:
        reasons.append("model weights changed")
    if old.get("data_sha256") != inputs["data_sha256"]:
        reasons.append("evaluated data changed")
    if old.get("code_sha256") != inputs["code_sha256"]:
        before, now = old.get("code_files", {}), inputs["code_files"]
        changed = sorted(f for f in set(before) | set(now) if before.get(f) != now.get(f))
        reasons.append(f"code changed: {', '.join(changed) or '?'}")
    diff = protocol_differences(record, job_protocol(job))
    if diff or old.get("protocol_sha256") != inputs["protocol_sha256"]:
        reasons.append(f"configuration changed: {', '.join(diff) or 'protocol'}")
    return reasons


def plan(jobs: list[Job], root: Path, force: bool = False) -> list[Planned]:
    """What to run and why, without evaluating anything."""
    from .records import read_record, record_path

    out = []
    for job in jobs:
        path = record_path(root, {"dataset": {"name": job.dataset}, "model": {"name": job.model},
                                  "threat_model": {"norm": job.norm, "eps": job.eps, "access": job.access}})
        try:
            inputs = job_inputs(job, current_weights_sha256(job.model), current_data_sha256(job))
        except RobustBenchLiteError as err:
            out.append(Planned(job, path, UNAVAILABLE, [str(err)]))
            continue
        try:
            record = read_record(path) if path.exists() else None
        except CorruptFileError as err:
            out.append(Planned(job, path, ERROR, [str(err)], inputs))
            continue
        reasons = why_run(record, inputs, job)
        if force:
            reasons = ["forced"] + reasons
        out.append(Planned(job, path, RUN if reasons else SKIP, reasons or ["up to date"], inputs))
    return out


def run_job(job: Job, root: Path, inputs: dict[str, Any], resume: bool = True,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate one job (resumably under ``root``) and return its record with ``inputs``; writes nothing
    but resume state (see :func:`.jobs.run_job`, the path ``evaluate`` takes too)."""
    from .jobs import RunOptions, run_job as evaluate_job

    options = RunOptions(state_root=root if resume else None, progress=progress,
                         cross_check=True)  # every certifier on a sample of refuted examples: unsound ones fail
    return evaluate_job(job, options, inputs).record  # the resume state stays until the record is written


def _write(record: dict[str, Any], root: Path) -> None:
    """Replace the job's record (it holds exactly the registry's protocol), then drop its resume state."""
    from .records import write_record
    from ..evaluation.resume import resume_runner_for

    write_record(record, root, replace=True)
    threat = record["threat_model"]
    resume_runner_for(root, record["dataset"]["name"], threat["norm"], threat["eps"], record["model"]["name"],
                      "", access=threat.get("access", "white-box")).clear()


def regenerate(root: str | Path, registry: str | Path | None = None, only: str | None = None,
               force: bool = False, dry_run: bool = False, resume: bool = True, group: Group | None = None,
               on_job: Callable[[Planned], None] | None = None) -> Report:
    """Plan, run this rank's share of the jobs to run, and (rank 0) write the records and re-render.

    One process writes each record as soon as its job is done; under torchrun the ranks' records
    are gathered and rank 0 writes them all (a killed run resumes from the batches kept on disk).
    """
    from .render import render_all

    started = time.perf_counter()
    root = Path(root)
    group = group or Group()
    registry = Path(registry) if registry is not None else root / "registry.toml"
    jobs = select(load_registry(registry), only)
    report = Report(plan(jobs, root, force))
    if dry_run:
        return report
    todo = [p for p in report.planned if p.action == RUN]
    produced: dict[str, Any] = {}
    for planned in shard(todo, group):
        if on_job is not None:
            on_job(planned)
        try:
            record = run_job(planned.job, root, planned.inputs or {}, resume)
        except RobustBenchLiteError as err:  # one broken job must not stop (or deadlock) the others
            produced[planned.job.key] = {"error": " ".join(str(err).split())}
            continue
        if group.active:
            produced[planned.job.key] = record
        else:
            _write(record, root)
            report.ran.append(planned.job.key)
    for part in all_gather(produced, group) if group.active else [produced]:
        for key, rec in part.items():
            if "error" in rec:
                report.failed[key] = rec["error"]
            elif group.is_main:
                _write(rec, root)
                report.ran.append(key)
    if group.is_main and not any(p.action == ERROR for p in report.planned):  # a corrupt record cannot render
        report.rendered = render_all(root, registry)
    report.seconds = time.perf_counter() - started
    return report
