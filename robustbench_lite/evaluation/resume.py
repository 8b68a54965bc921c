"""Resumable evaluation: every settled batch is persisted, so a killed run resumes where it stopped.

``ResumeRunner(state_dir, key)`` writes one safetensors shard per batch (for a leaderboard record,
under ``<leaderboard dir>/.state/<dataset>/<norm>-<eps>/<model>/``, see :func:`state_dir_for`),
``batch-<start>-<stop>.safetensors`` (written by :mod:`robustbench_lite.atomic`: a shard is
complete or absent, never half-written), next to a ``manifest.json`` holding ``key``, the sha256
of everything that decides the numbers (weights, data, threat model, plug-in configs, seed, batch
size, mode). Each shard is stamped with ``key`` and a sha256 of its content: a damaged shard, or
one copied from another evaluation, is recomputed, never trusted. A folder whose manifest names
another key is stale: it is cleared before the run. Batches found are loaded instead of computed;
since seeds are per example and batches are cut the same way, a resumed run gives exactly the
numbers of an uninterrupted one (AutoAttack's resumable ``state.py`` idea, at batch granularity).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from ..atomic import atomic_write_bytes
from ..hashing import sha256_json, tensors_sha256
from ..leaderboard.records import safe_name
from .outcome import BatchOutcome, Bounds, Compute, Done
from ..threat import threat_folder

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_KEY, _DIGEST = "resume_key", "sha256"


def _shard_sha256(tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    """sha256 of a shard's metadata and tensors (names in sorted order)."""
    return sha256_json({"meta": meta, "tensors": tensors_sha256((name, tensors[name]) for name in sorted(tensors))})


class ResumeRunner:
    """Load batches already in ``state_dir`` (for the same ``key``), compute and persist the others.

    :meth:`settle` handles one batch, so :class:`robustbench_lite.evaluation.distributed.DistributedRunner` can
    resume a rank's share through it.
    """

    def __init__(self, state_dir: str | Path, key: str, prune_below: str | Path | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.key = str(key)
        self.prune_below = None if prune_below is None else Path(prune_below)
        self.loaded = 0
        self.computed = 0
        self._ready = False  # the folder is touched on the first batch, not before

    def _prepare(self) -> None:
        if self._ready:
            return
        self._ready = True
        manifest = self.state_dir / MANIFEST
        if manifest.exists():
            try:
                stored = json.loads(manifest.read_text("utf-8")).get("key")
            except (OSError, ValueError):
                stored = None
            if stored == self.key:
                return
            log.info("%s holds another evaluation's batches: clearing it", self.state_dir)
            self.clear()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(manifest, json.dumps({"key": self.key}).encode())

    def shard_path(self, start: int, stop: int) -> Path:
        return self.state_dir / f"batch-{start:07d}-{stop:07d}.safetensors"

    def load(self, start: int, stop: int) -> BatchOutcome | None:
        """The stored outcome of rows start:stop, or None (absent, unreadable, damaged, or written by
        another evaluation: recomputed)."""
        path = self.shard_path(start, stop)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            digest = meta.pop(_DIGEST, None)
            if meta.get(_KEY) != self.key or digest != _shard_sha256(tensors, meta):
                raise ValueError("written by another evaluation, or damaged since")
            outcome = BatchOutcome.from_tensors(tensors, meta)
            if (outcome.start, outcome.stop) != (start, stop):
                raise ValueError(f"it holds rows {outcome.start}:{outcome.stop}")
            return outcome
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as exc:
            log.warning("ignoring shard %s (%s): recomputing it", path, exc)
            return None

    def save(self, outcome: BatchOutcome) -> None:
        """Write the shard, stamped with this evaluation's key and a sha256 of its content."""
        tensors, meta = outcome.to_tensors()
        meta = {**meta, _KEY: self.key}
        meta[_DIGEST] = _shard_sha256(tensors, meta)
        atomic_write_bytes(self.shard_path(outcome.start, outcome.stop), st_save(tensors, metadata=meta))

    def settle(self, i: int, bounds: tuple[int, int], compute: Compute) -> BatchOutcome:
        """Batch ``i`` (rows ``bounds``): loaded if stored, else computed and stored."""
        self._prepare()
        outcome = self.load(*bounds)
        if outcome is not None:
            self.loaded += 1
            return outcome
        outcome = compute(i)
        self.save(outcome)
        self.computed += 1
        return outcome

    def run(self, bounds: Bounds, compute: Compute, done: Done | None = None) -> list[BatchOutcome]:
        out = []
        for i in range(len(bounds)):
            out.append(self.settle(i, bounds[i], compute))
            if done is not None:
                done(i)
        log.info("resume: %d batch(es) loaded from %s, %d computed", self.loaded, self.state_dir, self.computed)
        return out

    def clear(self) -> None:
        """Remove the state folder (after a successful run, or when it is stale), and its parents
        below ``prune_below`` that it leaves empty."""
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if self.prune_below is None:
            return
        for parent in self.state_dir.parents:
            if parent == self.prune_below or self.prune_below not in parent.parents:
                break
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break


STATE_FOLDER = ".state"


def state_dir_for(root: str | Path, dataset: str, norm: str, eps: float, model: str, access: str = "white-box") -> Path:
    """``<root>/.state/<dataset>/<norm>-<eps>[-gray-box]/<model>``: the resume folder of one record."""
    return Path(root) / STATE_FOLDER / safe_name(dataset) / threat_folder(norm, eps, access) / safe_name(model)


def resume_runner_for(root: str | Path, dataset: str, norm: str, eps: float, model: str, key: str,
                      access: str = "white-box") -> ResumeRunner:
    """A :class:`ResumeRunner` in the record's resume folder that prunes ``<root>/.state`` when done."""
    return ResumeRunner(state_dir_for(root, dataset, norm, eps, model, access), key, prune_below=root)
