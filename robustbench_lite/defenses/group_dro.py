"""Group DRO (Sagawa et al. 2020, arXiv 1911.08731), the online algorithm (Algorithm 1).

Per batch: the mean loss of each group present, L_g; exponentiated-gradient ascent on the group
weights, ``q_g <- q_g * exp(eta_q * (L_g + C / sqrt(n_g)))`` then normalised (the group adjustment
C / sqrt(n_g) favours small groups, whose training loss under-estimates their test loss); the
loss is ``sum_g q_g L_g``. Strong L2 regularisation is an option (``l2``), added to the loss so any
training loop gets it. Model selection by worst-group validation accuracy is the trainer's job
(``robustbench-lite train --select worst-group``).
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError, checked_int, checked_number

from .base import Defense, add_option

log = logging.getLogger(__name__)


class GroupDRO(Defense):
    """Online group DRO loss; needs ``groups`` (N,) int in each batch.

    Args:
        num_groups: number of groups G (4 for colored-mnist: 2 classes x 2 colours).
        group_counts: training examples per group (n_g), for the adjustment; required when C > 0.
        eta_q: step of the exponentiated-gradient update of the group weights (0.01, the paper's).
        adjustment: C of the group adjustment C / sqrt(n_g) (0 = none; the paper tunes it in 0..5).
        l2: coefficient of 0.5 * l2 * ||theta||^2 added to the loss (0; the paper's strong
            regularisation is 0.1 to 1 with SGD).

    ``q`` (G,) holds the current group weights; ``loss(model, x, y, groups=g)`` is a scalar.
    """

    name = "group-dro"

    def __init__(self, *, num_groups: int = 4, group_counts: Sequence[int] | None = None, eta_q: float = 0.01,
                 adjustment: float = 0.0, l2: float = 0.0, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.num_groups = checked_int("num_groups", num_groups, minimum=1)
        self.eta_q = checked_number("eta_q", eta_q, minimum=0)
        self.adjustment = checked_number("adjustment", adjustment, minimum=0)
        self.l2 = checked_number("l2", l2, minimum=0)
        self.group_counts: list[int] | None = None
        if group_counts is not None:
            self.set_group_counts(group_counts)
        elif self.adjustment > 0:
            raise UserInputError("the group adjustment C / sqrt(n_g) needs group_counts")
        self.q = torch.full((self.num_groups,), 1.0 / self.num_groups)

    def set_group_counts(self, group_counts: Sequence[int]) -> None:
        counts = [int(c) for c in group_counts]
        if len(counts) != self.num_groups or any(c < 1 for c in counts):
            raise UserInputError(f"group_counts must be {self.num_groups} positive counts, got {list(group_counts)!r}")
        self.group_counts = counts

    def group_losses(self, losses: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
        """Mean loss per group (G,) (0 where absent) and the (G,) bool mask of groups present."""
        onehot = F.one_hot(groups, self.num_groups).to(losses.dtype)  # (N, G)
        counts = onehot.sum(0)
        return (onehot * losses[:, None]).sum(0) / counts.clamp_min(1), counts > 0

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, groups: Tensor | None = None, **batch) -> Tensor:
        if groups is None:
            raise UserInputError("group DRO needs the batch's groups: loss(model, x, y, groups=...)")
        groups = groups.to(device=x.device, dtype=torch.int64)
        if groups.shape != y.shape or int(groups.min()) < 0 or int(groups.max()) >= self.num_groups:
            raise UserInputError(f"groups must be (N,) ints in 0..{self.num_groups - 1}")
        per_example = F.cross_entropy(model(x), y, reduction="none")
        group_loss, present = self.group_losses(per_example, groups)
        q = self.q.to(x.device)
        if model.training and self.eta_q > 0:
            adjusted = group_loss.detach()
            if self.adjustment > 0 and self.group_counts is not None:
                adjusted = adjusted + self.adjustment / torch.tensor(self.group_counts, device=x.device).sqrt()
            # only the groups seen in this batch move (an absent group has no loss estimate)
            q = q * torch.exp(self.eta_q * adjusted * present)
            q = q / q.sum()
            self.q = q.detach().cpu()
        loss = (q * group_loss).sum()
        if self.l2 > 0:
            loss = loss + 0.5 * self.l2 * sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)
        return loss

    def state_dict(self) -> dict[str, Tensor]:
        return {"q": self.q.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "q" in state:
            if state["q"].shape != (self.num_groups,):
                raise UserInputError(f"saved group weights have shape {tuple(state['q'].shape)}, expected ({self.num_groups},)")
            self.q = state["q"].detach().float().cpu().clone()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        add_option(parser, "--eta-q", type=float, default=0.01, help="group DRO: step of the group weights (0.01)")
        add_option(parser, "--group-adjustment", type=float, default=0.0, help="group DRO: C in C / sqrt(n_g) (0)")
        add_option(parser, "--l2", type=float, default=0.0, help="group DRO: strong L2 penalty 0.5 * l2 * ||theta||^2 (0)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GroupDRO":
        """Groups and their training counts come from the training split of ``args.dataset``."""
        from robustbench_lite.data import load_dataset

        train = load_dataset(args.dataset, "train")
        if train.groups is None:
            raise UserInputError(f"group DRO needs a dataset with groups; {args.dataset!r} has none (try colored-mnist5k)")
        num_groups = len(train.group_names) if train.group_names else int(train.groups.max()) + 1
        counts = torch.bincount(train.groups, minlength=num_groups).clamp_min(1).tolist()
        return cls(num_groups=num_groups, group_counts=counts, eta_q=args.eta_q,
                   adjustment=args.group_adjustment, l2=args.l2, seed=args.seed)
