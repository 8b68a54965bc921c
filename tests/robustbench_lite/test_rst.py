"""Robust self-training (robustbench_lite/defenses/rst.py) and its data (mnist5k-ssl): the batch
weighting by hand, TRADES when nothing is pseudo-labeled, the pool, the loop passing ``pseudo``,
``robustbench-lite train --defense rst`` end to end, and the leak test: scrambling the withheld labels
changes nothing a training run sees."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from test_defenses import blobs, tiny_model

from robustbench_lite.data import Dataset, load_dataset, unlabeled_images, withheld_labels
from robustbench_lite.data import cache, semisupervised
from robustbench_lite.data.semisupervised import UnlabeledImages, stratified_labeled_positions
from robustbench_lite.defenses import DEFENSES, RST, TRADES, Defense
from robustbench_lite.defenses.rst import PseudoLabeledDataset, pseudo_label, pseudo_labeled_pool, weighted_batch_mean
from robustbench_lite.errors import UserInputError
from robustbench_lite.train import TrainConfig, add_arguments, run, train
from robustbench_lite.zoo import build


def small_rst(**kw) -> RST:
    return RST(**{"eps": 0.1, "steps": 3, "step_size": 0.05, "teacher_epochs": 1, "teacher_batch_size": 100, **kw})


# --- the loss ---------------------------------------------------------------------------------------
def test_batch_weighting_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    pseudo = torch.tensor([False, False, True, True, True])
    assert weighted_batch_mean(losses, pseudo, 0.5) == pytest.approx(0.5 * 1.5 + 0.5 * 4.0)
    assert weighted_batch_mean(losses, pseudo, 0.2) == pytest.approx(0.8 * 1.5 + 0.2 * 4.0)
    for only in (torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool), None):
        assert weighted_batch_mean(losses, only, 0.5) == pytest.approx(3.0)  # one kind: its plain mean
    with pytest.raises(UserInputError, match="like the batch"):
        weighted_batch_mean(losses, pseudo[:3], 0.5)


def test_rst_loss_is_trades_on_labeled_rows_and_the_weighted_mean_on_a_mixed_batch():
    model, (x, y, _) = tiny_model(), blobs(10)
    idx = torch.arange(10)
    rst, trades = small_rst(), TRADES(eps=0.1, steps=3, step_size=0.05)
    assert rst.loss(model, x, y, indices=idx).item() == pytest.approx(trades.loss(model, x, y, indices=idx).item(), rel=1e-5)
    pseudo = idx >= 7
    per = rst.per_example_loss(model, x, y, idx).detach()
    expected = 0.5 * per[~pseudo].mean() + 0.5 * per[pseudo].mean()
    assert rst.loss(model, x, y, pseudo=pseudo, indices=idx).item() == pytest.approx(expected.item(), rel=1e-6)
    assert DEFENSES.get("rst") is RST and isinstance(DEFENSES.create("rst"), TRADES)


@pytest.mark.parametrize("make,message", [
    (lambda: RST(unlabeled_fraction=0.0), "unlabeled_fraction"),
    (lambda: RST(unlabeled_fraction=1.0), "unlabeled_fraction"),
    (lambda: RST(teacher_epochs=0), "teacher_epochs"),
    (lambda: RST(teacher_lr=0.0), "teacher_lr"),
    (lambda: RST(teacher_lr=float("nan")), "teacher_lr must be finite"),
    (lambda: RST(unlabeled_fraction=float("nan")), "unlabeled_fraction must be finite"),
    (lambda: RST(teacher_epochs=2.5), "teacher_epochs must be an integer"),
    (lambda: RST(teacher_batch_size=0), "teacher_batch_size must be >= 1"),
])
def test_parameter_checks(make, message):
    with pytest.raises(UserInputError, match=message):
        make()


# --- pool and loop ----------------------------------------------------------------------------------
def test_pool_marks_pseudo_labels_and_keeps_them_through_subsets():
    x, y, _ = blobs(12)
    labeled = Dataset(name="toy", split="train", x=x[:4], y=y[:4], num_classes=3, indices=torch.arange(4))
    unlabeled = UnlabeledImages(name="toy", x=x[4:], indices=torch.arange(4, 12))
    pool = pseudo_labeled_pool(labeled, unlabeled, torch.full((8,), 2))
    assert pool.pseudo.tolist() == [False] * 4 + [True] * 8 and pool.y[4:].tolist() == [2] * 8
    sub = pool.subset(torch.tensor([5, 1, 11]))
    assert sub.indices.tolist() == [5, 1, 11] and sub.pseudo.tolist() == [True, False, True]
    assert isinstance(sub, PseudoLabeledDataset) and torch.equal(sub.x, pool.x[[5, 1, 11]])
    with pytest.raises(UserInputError, match="one pseudo-label per unlabeled image"):
        pseudo_labeled_pool(labeled, unlabeled, torch.zeros(3, dtype=torch.int64))
    clash = UnlabeledImages(name="toy", x=x[4:], indices=torch.arange(2, 10))
    with pytest.raises(UserInputError, match="disjoint"):
        pseudo_labeled_pool(labeled, clash, torch.zeros(8, dtype=torch.int64))


class PseudoRecorder(Defense):
    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def loss(self, model, x, y, **batch):
        self.seen.append((batch["indices"], batch["pseudo"]))
        return model(x).sum() * 0


def test_the_loop_passes_pseudo_with_each_batch():
    x, y, _ = blobs(12)
    pool = PseudoLabeledDataset(name="toy", split="train", x=x, y=y, num_classes=3, indices=torch.arange(12),
                                pseudo=torch.arange(12) >= 5)
    recorder = PseudoRecorder()
    train(tiny_model(), pool, recorder, TrainConfig(epochs=1, batch_size=5))
    indices, pseudo = (torch.cat(t) for t in zip(*recorder.seen))
    assert torch.equal(pseudo, indices >= 5)


def test_pseudo_labels_are_the_teachers_argmax():
    model, (x, _, _) = tiny_model(), blobs(9)
    with torch.no_grad():
        expected = model(x).argmax(1)
    model.train()
    assert torch.equal(pseudo_label(model, UnlabeledImages(name="t", x=x, indices=torch.arange(9)), batch_size=4), expected)
    assert model.training  # its mode is restored


# --- mnist5k-ssl and the leak test ------------------------------------------------------------------
def test_mnist5k_ssl_parts_are_stratified_disjoint_fingerprinted_and_unlabeled():
    labeled, unlabeled = load_dataset("mnist5k-ssl", "train"), unlabeled_images("mnist5k-ssl")
    full = load_dataset("mnist5k", "train")
    assert len(labeled) == 1000 and len(unlabeled) == 3000
    assert torch.bincount(labeled.y).tolist() == [100] * 10
    assert sorted(labeled.indices.tolist() + unlabeled.indices.tolist()) == list(range(4000))
    assert torch.equal(full.x[labeled.indices], labeled.x) and torch.equal(full.y[labeled.indices], labeled.y)
    assert torch.equal(full.x[unlabeled.indices], unlabeled.x)
    assert torch.equal(full.y[unlabeled.indices], withheld_labels("mnist5k-ssl"))
    assert {f for f in vars(unlabeled)} == {"name", "x", "indices", "info"}  # no labels travel with the images
    # a change here means the labeled subset changed (scikit-learn's split algorithm, or the rule)
    assert (labeled.info["labeled_sha256"], labeled.info["unlabeled_sha256"]) == ("6d1a47fac4126a00", "75018be4db9890df")
    assert torch.equal(load_dataset("mnist5k-ssl", "test").x, load_dataset("mnist5k", "test").x)
    with pytest.raises(UserInputError, match="not a semi-supervised dataset"):
        unlabeled_images("mnist5k")


def test_stratified_positions_partition_and_follow_class_shares():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    labeled, unlabeled = stratified_labeled_positions(labels, 20, seed=0)
    assert sorted(np.concatenate([labeled, unlabeled]).tolist()) == list(range(100))
    assert np.bincount(labels[labeled]).tolist() == [8, 6, 4, 2]
    with pytest.raises(UserInputError, match="n_labeled"):
        stratified_labeled_positions(labels, 100, seed=0)


def test_pseudo_labels_never_see_withheld_labels(monkeypatch):
    """Scramble every withheld label in the source (keeping which rows are labeled): the labeled split,
    the teacher, the pseudo-labels and the pool are bit-identical; only the after-the-fact pseudo-label
    accuracy (reporting) changes, which shows the scramble took effect."""
    def rst_pool():
        rst = small_rst()
        pool = rst.prepare(load_dataset("mnist5k-ssl", "train"), lambda: build("mnist-cnn"))
        return pool, rst.report()

    pool, report = rst_pool()
    arrays = semisupervised.source_arrays("mnist5k")
    train_labels = arrays["labels"][arrays["train"]]
    partition = stratified_labeled_positions(train_labels, 1000, 0)
    scrambled = arrays["labels"].copy()
    rows = arrays["train"][partition[1]]
    scrambled[rows] = (scrambled[rows] + 1 + np.random.RandomState(0).randint(0, 9, len(rows))) % 10  # all wrong
    scrambled.setflags(write=False)
    # every loader reads the parsed arrays through the in-memory cache: all of them get the scrambled labels
    key = next(k for k, v in cache._MEMORY.items() if v is arrays)
    monkeypatch.setitem(cache._MEMORY, key, {**arrays, "labels": scrambled})
    monkeypatch.setattr(semisupervised, "stratified_labeled_positions", lambda labels, n, seed: partition)
    assert (withheld_labels("mnist5k-ssl") != torch.from_numpy(train_labels[partition[1]])).all()
    assert (load_dataset("mnist5k", "train").y[partition[1]] != torch.from_numpy(train_labels[partition[1]])).all()
    again, report_again = rst_pool()
    for field in ("x", "y", "indices", "pseudo"):
        assert torch.equal(getattr(pool, field), getattr(again, field)), field
    assert report["teacher"]["weights_sha256"] == report_again["teacher"]["weights_sha256"]
    assert report["pseudo_label_acc"] > 0.5 and report_again["pseudo_label_acc"] < 0.2


def test_train_command_runs_rst_and_reports_the_teacher(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--dataset", "mnist5k-ssl", "--arch", "mnist-cnn", "--epochs", "1", "--batch-size", "400",
            "--attack-steps", "1", "--attack-step-size", "0.1", "--eps", "0.1", "--teacher-epochs", "1",
            "--out", str(tmp_path), "--no-progress"]
    assert run(parser.parse_args(["--defense", "rst", *base])) == 0
    card = json.loads((tmp_path / "mnist5k-ssl-cnn-rst.card.json").read_text())
    command = card["training"]["command"]
    assert "--defense rst" in command and "--unlabeled-fraction 0.5" in command and "--teacher-epochs 1" in command
    report = card["training"]["rst"]
    assert report["labeled"] == 1000 and report["unlabeled"] == 3000 and sum(report["pseudo_label_counts"]) == 3000
    assert card["training"]["train_examples"] == 4000 and 0 <= report["pseudo_label_acc"] <= 1
    assert 0 <= report["teacher"]["test_acc"] <= 1 and card["defense_config"]["unlabeled_fraction"] == 0.5
    with pytest.raises(UserInputError, match="not a semi-supervised dataset"):
        run(parser.parse_args(["--defense", "rst", *base[:1], "mnist5k", *base[2:], "--name", "plain"]))
