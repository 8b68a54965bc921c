"""Distributed evaluation with torch.distributed: examples (or registry jobs) sharded over ranks.

Launch with ``torchrun --nproc-per-node N -m robustbench_lite evaluate ...`` (or ``--nnodes`` and a
rendezvous endpoint for several machines): :func:`init_from_env` joins the process group torchrun
describes in the environment (gloo on CPU, NCCL when the evaluation device is a GPU). Batch ``i`` goes
to rank ``i % world_size``; every rank sends its outcomes to the others (``all_gather_object``) and
rank 0 checks and writes. Seeds are per example and batches are cut as in a single process, so the
numbers are identical to a one-process run with the same seed and batch size.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from .outcome import BatchOutcome, Bounds, Compute, Done
from .resume import ResumeRunner

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """This process's place: ``rank`` of ``world_size``; ``owned``: this call created the process group."""

    rank: int = 0
    world_size: int = 1
    owned: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str | torch.device = "cpu") -> Group:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), else a one-process Group."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size(), owned=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return Group()
    use_nccl = torch.device(device).type == "cuda" and dist.is_nccl_available()
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    group = Group(dist.get_rank(), dist.get_world_size(), owned=True)
    log.info("rank %d of %d (%s)", group.rank, group.world_size, dist.get_backend())
    return group


def shutdown(group: Group) -> None:
    """Leave the process group if :func:`init_from_env` created it."""
    if group.owned and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], group: Group) -> list[T]:
    """Round-robin share of ``items`` of this rank (item i goes to rank i % world_size)."""
    return [item for i, item in enumerate(items) if i % group.world_size == group.rank]


def all_gather(obj: Any, group: Group) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects; tensors are sent on the CPU)."""
    if not group.active:
        return [obj]
    out: list[Any] = [None] * group.world_size
    dist.all_gather_object(out, obj)
    return out


class DistributedRunner:
    """Compute this rank's share of the batches (through ``store`` when resuming), gather the rest."""

    def __init__(self, group: Group, store: ResumeRunner | None = None) -> None:
        self.group = group
        self.store = store

    def run(self, bounds: Bounds, compute: Compute, done: Done | None = None) -> list[BatchOutcome]:
        mine: dict[int, tuple[dict, dict]] = {}
        for i in shard(range(len(bounds)), self.group):
            outcome = self.store.settle(i, bounds[i], compute) if self.store is not None else compute(i)
            mine[i] = outcome.to_tensors()  # CPU tensors + plain metadata: cheap to pickle
            if done is not None:
                done(i)
        merged: dict[int, tuple[dict, dict]] = {}
        for part in all_gather(mine, self.group):
            merged.update(part)
        missing = [i for i in range(len(bounds)) if i not in merged]
        if missing:  # pragma: no cover - every index has an owner
            raise RuntimeError(f"batches {missing[:5]} were computed by no rank")
        return [BatchOutcome.from_tensors(*merged[i]) for i in range(len(bounds))]
