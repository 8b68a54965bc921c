"""Model selection after each epoch (worst-group validation accuracy, Sagawa et al. 2020)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_lite.atomic import atomic_write_bytes
from robustbench_lite.errors import UserInputError

log = logging.getLogger(__name__)

SELECTION_RULES = ("worst-group-val",)


class WorstGroupSelection:
    """Model selection by worst-group accuracy on a validation split (Sagawa et al. 2020).

    Called after every epoch: records ``val_acc`` and ``val_worst_group_acc`` in the log entry and
    keeps the best weights so far in ``path`` (safetensors; the score and epoch in its metadata, so a
    resumed run continues the comparison). Ties keep the earlier epoch.
    """

    def __init__(self, val_set: Any, path: Path) -> None:
        if getattr(val_set, "groups", None) is None:
            raise UserInputError(f"--select worst-group-val needs a dataset with groups; {val_set.name!r} has none")
        self.val_set, self.path = val_set, Path(path)

    def best(self) -> tuple[float, int]:
        """(score, epoch) of the weights kept so far; (-1, 0) when none."""
        if not self.path.is_file():
            return -1.0, 0
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
        return float(meta.get("val_worst_group_acc", -1.0)), int(meta.get("epoch", 0))

    def __call__(self, model: nn.Module, entry: dict[str, Any]) -> None:
        from safetensors.torch import save

        from robustbench_lite.metrics import worst_group_accuracy

        device = next(model.parameters()).device
        x, y = self.val_set.x.to(device), self.val_set.y.to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            correct = torch.cat([model(x[i:i + 1000]).argmax(1) == y[i:i + 1000] for i in range(0, len(x), 1000)])
        model.train(was_training)
        metric = worst_group_accuracy(correct.cpu(), self.val_set.groups)
        entry["val_acc"], entry["val_worst_group_acc"] = metric["avg_acc"], metric["worst_group_acc"]
        if metric["worst_group_acc"] > self.best()[0]:
            tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            atomic_write_bytes(self.path, save(tensors, metadata={"val_worst_group_acc": repr(metric["worst_group_acc"]),
                                                                  "epoch": str(entry["epoch"])}))

    def restore_best(self, model: nn.Module) -> str:
        """Load the kept weights into ``model``; returns the rule as recorded in the model card."""
        from safetensors.torch import load_file

        score, epoch = self.best()
        model.load_state_dict(load_file(str(self.path)))
        return f"best worst-group accuracy on the validation split (epoch {epoch}, {score:.4f})"
