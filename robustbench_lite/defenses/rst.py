"""Robust self-training, RST (Carmon et al. 2019, arXiv 1905.13736; Uesato et al. 2019, arXiv 1905.13725;
Raghunathan et al. 2020, arXiv 2002.10716).

1. A standard model (the *teacher*, cross-entropy on clean inputs) is trained on the labeled data alone.
2. It pseudo-labels the unlabeled images: the argmax of its logits (hard labels, as the authors).
3. The robust model trains on labeled + pseudo-labeled data with the TRADES loss
   ``l_i = CE(f(x_i), y_i) + beta * KL(f(x_i) || f(x'_i))`` (:class:`.trades.TRADES`'s inner KL-PGD),
   each batch's loss being ``(1 - f) * mean over its labeled rows + f * mean over its pseudo-labeled rows``
   with ``f = unlabeled_fraction``. The authors fix f = 0.5 by drawing half of every batch from each
   pool, which is w = 1 in their ``L = mean_labeled + w * mean_pseudo``; here any batch works (a loop
   with uniform batches gets the same objective in expectation) and a batch holding only one kind
   uses that kind's mean.

``loss(model, x, y, pseudo=mask)`` is usable in any training loop (``pseudo`` (N,) bool marks the
pseudo-labeled rows; without it every row counts as labeled and the loss is TRADES'). The steps
before training are functions too: :func:`train_teacher`, :func:`pseudo_label` and
:func:`pseudo_labeled_pool`; :meth:`RST.prepare` chains them for ``robustbench-lite train``. None of
them is ever given the unlabeled part's labels: they see :class:`~robustbench_lite.data.UnlabeledImages`.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_lite.data.dataset import Dataset
from robustbench_lite.data.semisupervised import UnlabeledImages
from robustbench_lite.errors import UserInputError, checked_int, checked_number
from robustbench_lite.seeding import mix

from .base import add_option
from .trades import TRADES, kl_from_clean

log = logging.getLogger(__name__)

_TEACHER = 0x7EAC  # mixed with the seed: the teacher's initialisation and shuffling


@dataclass(eq=False, repr=False, kw_only=True)
class PseudoLabeledDataset(Dataset):
    """A labeled split joined with pseudo-labeled images: ``pseudo`` (N,) bool is True where ``y`` is a
    pseudo-label. ``robustbench-lite train`` passes ``pseudo`` to the loss with every batch."""

    pseudo: Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        pseudo = torch.zeros(len(self), dtype=torch.bool) if self.pseudo is None else torch.as_tensor(self.pseudo)
        if pseudo.dtype != torch.bool or pseudo.shape != (len(self),):
            raise UserInputError(f"pseudo must be a ({len(self)},) bool mask, got {pseudo.dtype} {tuple(pseudo.shape)}")
        self.pseudo = pseudo

    def _plain(self) -> Dataset:
        return Dataset(name=self.name, split=self.split, x=self.x, y=self.y, num_classes=self.num_classes,
                       indices=self.indices, info=dict(self.info))

    def _marked(self, plain: Dataset, pseudo: Tensor) -> "PseudoLabeledDataset":
        return PseudoLabeledDataset(name=plain.name, split=plain.split, x=plain.x, y=plain.y, num_classes=plain.num_classes,
                                    indices=plain.indices, info=plain.info, pseudo=pseudo)

    def subset(self, selection: Any) -> "PseudoLabeledDataset":
        plain = self._plain().subset(selection)
        position = {int(i): k for k, i in enumerate(self.indices.tolist())}
        rows = torch.tensor([position[int(i)] for i in plain.indices.tolist()], dtype=torch.int64)
        return self._marked(plain, self.pseudo[rows.to(self.pseudo.device)])

    def to(self, device: torch.device | str) -> "PseudoLabeledDataset":
        return self._marked(self._plain().to(device), self.pseudo.to(device))


def train_teacher(model: nn.Module, labeled: Dataset, *, epochs: int = 40, lr: float = 1e-3, batch_size: int = 50,
                  seed: int = 0, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Standard training (clean cross-entropy) of ``model`` on ``labeled`` only: RST's step 1.

    Adam, cosine learning rate, ``robustbench_lite.train``'s deterministic loop; returns its log."""
    from robustbench_lite.train import TrainConfig, train

    from .standard import Standard

    config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return train(model, labeled, Standard(seed=seed), config, device=device)


def pseudo_label(teacher: nn.Module, images: UnlabeledImages | Tensor, batch_size: int = 1000) -> Tensor:
    """RST's step 2: the teacher's argmax label of every image, (M,) int64 (teacher in eval mode,
    its mode restored). ``images``: :class:`UnlabeledImages` or a tensor (M, C, H, W) in [0, 1]."""
    x = images.x if isinstance(images, UnlabeledImages) else images
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            labels = [teacher(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    finally:
        teacher.train(was_training)
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)


def pseudo_labeled_pool(labeled: Dataset, unlabeled: UnlabeledImages, labels: Tensor) -> PseudoLabeledDataset:
    """The training set of RST's step 3: ``labeled`` followed by ``unlabeled`` with ``labels`` (M,) as
    their labels and ``pseudo`` marking them. Indices must not overlap (they are seeds per example)."""
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    if labels.shape != (len(unlabeled),):
        raise UserInputError(f"need one pseudo-label per unlabeled image: {tuple(labels.shape)} for {len(unlabeled)}")
    if set(labeled.indices.tolist()) & set(unlabeled.indices.tolist()):
        raise UserInputError("labeled and unlabeled images share dataset indices; they must be disjoint parts of one split")
    if labeled.groups is not None:
        raise UserInputError("robust self-training on a dataset with groups is not supported (unlabeled images have none)")
    n = len(labeled)
    return PseudoLabeledDataset(
        name=labeled.name, split=f"{labeled.split}+pseudo-labeled", x=torch.cat([labeled.x, unlabeled.x.to(labeled.x)]),
        y=torch.cat([labeled.y.cpu(), labels]), num_classes=labeled.num_classes,
        indices=torch.cat([labeled.indices.cpu(), unlabeled.indices.cpu()]),
        pseudo=torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(len(unlabeled), dtype=torch.bool)]),
        info={**labeled.info, "pseudo_labeled": len(unlabeled)})


def weighted_batch_mean(losses: Tensor, pseudo: Tensor | None, unlabeled_fraction: float) -> Tensor:
    """``(1 - f) * mean(losses[~pseudo]) + f * mean(losses[pseudo])``; the mean of the present kind when
    the batch holds one kind only. losses (N,), pseudo (N,) bool or None (all labeled)."""
    if pseudo is None:
        return losses.mean()
    pseudo = pseudo.to(device=losses.device, dtype=torch.bool)
    if pseudo.shape != losses.shape:
        raise UserInputError(f"pseudo must be a (N,) bool mask like the batch, got {tuple(pseudo.shape)}")
    n_pseudo = int(pseudo.sum())
    if n_pseudo == 0 or n_pseudo == len(losses):
        return losses.mean()
    f = unlabeled_fraction
    return (1 - f) * losses[~pseudo].mean() + f * losses[pseudo].mean()


class RST(TRADES):
    """Robust self-training with the TRADES loss (the authors' RST_adv).

    Args:
        eps, norm, steps, step_size, beta: TRADES' (eps 0.3 Linf, 40 steps of 0.01, beta 6).
        unlabeled_fraction: f, the share of each batch's loss carried by its pseudo-labeled rows
            (0.5: the authors' half-unlabeled batches, w = 1).
        teacher_epochs, teacher_lr, teacher_batch_size: standard training of the teacher on the
            labeled data (40 epochs, Adam 1e-3 cosine, batch 50); used by :meth:`prepare`.

    ``loss(model, x, y, pseudo=mask)``: scalar; x (N, C, H, W) in [0, 1], y (N,), pseudo (N,) bool.
    """

    name = "rst"

    def __init__(self, *, eps: float = 0.3, norm: str = "Linf", steps: int = 40, step_size: float = 0.01,
                 beta: float = 6.0, unlabeled_fraction: float = 0.5, teacher_epochs: int = 40,
                 teacher_lr: float = 1e-3, teacher_batch_size: int = 50, seed: int = 0) -> None:
        super().__init__(eps=eps, norm=norm, steps=steps, step_size=step_size, beta=beta, seed=seed)
        self.unlabeled_fraction = checked_number("unlabeled_fraction", unlabeled_fraction, above=0)
        if not self.unlabeled_fraction < 1:
            raise UserInputError(f"unlabeled_fraction must lie in (0, 1), got {unlabeled_fraction!r}")
        self.teacher_epochs = checked_int("teacher_epochs", teacher_epochs, minimum=1)
        self.teacher_lr = checked_number("teacher_lr", teacher_lr, above=0)
        self.teacher_batch_size = checked_int("teacher_batch_size", teacher_batch_size, minimum=1)
        self._report: dict[str, Any] = {}

    def per_example_loss(self, model: nn.Module, x: Tensor, y: Tensor, indices: Tensor | None = None) -> Tensor:
        """(N,) TRADES losses ``CE_i + beta * KL_i`` at the KL-PGD points of :meth:`TRADES.perturb`."""
        x_adv = self.perturb(model, x, indices)
        logits = model(x)
        kl = kl_from_clean(model(x_adv), logits, reduction="none").sum(1)
        return F.cross_entropy(logits, y, reduction="none") + self.beta * kl

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, pseudo: Tensor | None = None, **batch: Any) -> Tensor:
        losses = self.per_example_loss(model, x, y, batch.get("indices"))
        return weighted_batch_mean(losses, pseudo, self.unlabeled_fraction)

    # --- before the loop: teacher and pseudo-labels -----------------------------------------------
    def prepare(self, train_set: Dataset, build_model: Callable[[], nn.Module], *,
                device: str | torch.device = "cpu", unlabeled: UnlabeledImages | None = None) -> PseudoLabeledDataset:
        """Steps 1-2: train a teacher (``build_model()``, seeded from ``seed``) on ``train_set`` (the
        labeled part), pseudo-label ``unlabeled`` (default: the unlabeled part of ``train_set``'s
        semi-supervised dataset, e.g. mnist5k-ssl) and return the pool to train on."""
        from robustbench_lite.data.semisupervised import unlabeled_images
        from robustbench_lite.hashing import state_dict_sha256

        if unlabeled is None:
            unlabeled = unlabeled_images(train_set.name)
        teacher_seed = mix(self.seed, _TEACHER)
        torch.manual_seed(teacher_seed)
        teacher = build_model()
        history = train_teacher(teacher, train_set, epochs=self.teacher_epochs, lr=self.teacher_lr,
                                batch_size=self.teacher_batch_size, seed=teacher_seed, device=device)
        labels = pseudo_label(teacher, unlabeled)
        counts = torch.bincount(labels, minlength=train_set.num_classes).tolist()
        self._teacher, self._pseudo, self._unlabeled = teacher, labels, unlabeled
        self._report = {"teacher": {"defense": "standard", "epochs": self.teacher_epochs, "lr": self.teacher_lr,
                                    "batch_size": self.teacher_batch_size, "seed": teacher_seed,
                                    "train_acc": history[-1]["train_acc"],
                                    "weights_sha256": state_dict_sha256(teacher)},
                        "labeled": len(train_set), "unlabeled": len(unlabeled), "pseudo_label_counts": counts}
        log.info("RST teacher: train accuracy %.4f on %d labeled; pseudo-labels per class %s",
                 history[-1]["train_acc"], len(train_set), counts)
        return pseudo_labeled_pool(train_set, unlabeled, labels)

    def report(self, test_set: Dataset | None = None) -> dict[str, Any]:
        """What :meth:`prepare` did, for the model card: the teacher's settings and accuracies and the
        pseudo-label counts; after training, for reporting only, the pseudo-labels' accuracy against
        the withheld labels when the unlabeled images are a registered semi-supervised dataset's."""
        if not self._report:
            return {}
        from robustbench_lite.data.semisupervised import SSL_VIEWS, unlabeled_images, withheld_labels
        from robustbench_lite.train import accuracy

        out = dict(self._report)
        if test_set is not None:
            out["teacher"] = {**out["teacher"], "test_acc": accuracy(self._teacher, test_set.x, test_set.y)}
        name = self._unlabeled.name
        if name in SSL_VIEWS and torch.equal(unlabeled_images(name).indices, self._unlabeled.indices.cpu()):
            out["pseudo_label_acc"] = float((self._pseudo == withheld_labels(name)).double().mean())
        return out

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        super().add_arguments(parser)
        add_option(parser, "--unlabeled-fraction", type=float, default=0.5,
                   help="RST: share of each batch's loss from pseudo-labeled rows (0.5, the paper's w = 1)")
        add_option(parser, "--teacher-epochs", type=int, default=40, help="RST: epochs of the standard teacher (40)")
        add_option(parser, "--teacher-lr", type=float, default=1e-3, help="RST: the teacher's Adam learning rate")
        add_option(parser, "--teacher-batch-size", type=int, default=50, help="RST: the teacher's batch size (50)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RST":
        return cls(eps=args.eps, norm=args.norm, steps=args.attack_steps, step_size=args.attack_step_size,
                   beta=args.beta, unlabeled_fraction=args.unlabeled_fraction, teacher_epochs=args.teacher_epochs,
                   teacher_lr=args.teacher_lr, teacher_batch_size=args.teacher_batch_size, seed=args.seed)
