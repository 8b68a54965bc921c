"""Tests of robustbench_lite.data: embedded splits, the parse cache, torchvision loaders on tiny
real-format files, coloured-digit benchmarks and the Dataset contract."""
from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustbench_lite.data import DATASET_NAMES, Dataset, load_dataset
from robustbench_lite.data import cache as cache_mod
from robustbench_lite.data.colored import assign_colours
from robustbench_lite.data.embedded import SOURCES, _parse_mnist5k, source_arrays
from robustbench_lite.errors import CorruptFileError, DatasetNotFoundError, UserInputError

EMBEDDED = {  # name -> {split: size}
    "mnist5k": {"train": 4000, "test": 1000},
    "digits": {"train": 1437, "test": 360},
    "colored-mnist5k": {"train": 3200, "val": 800, "test": 1000},
    "colored-digits": {"train": 1149, "val": 288, "test": 360},
    "colored-mnist5k-10": {"train": 3200, "val": 800, "test": 1000},
}
TORCHVISION = ("mnist", "cifar10", "cifar100")
SEMI_SUPERVISED = ("mnist5k-ssl",)  # tested in test_rst.py


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Parse into a private cache directory, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RBL_CACHE_DIR", str(tmp_path_factory.mktemp("rbl-cache")))
        cache_mod.clear_memory()
        yield
    cache_mod.clear_memory()


# --- names, splits, errors ----------------------------------------------------------------------
def test_names_are_registered_in_order_and_case_insensitive():
    assert DATASET_NAMES[0] == "mnist5k"
    assert set(DATASET_NAMES) == set(EMBEDDED) | set(TORCHVISION) | set(SEMI_SUPERVISED)
    assert load_dataset("MNIST5K", "Test").split == "test"


@pytest.mark.parametrize("name,split,message", [
    ("mnist6k", "test", "unknown dataset 'mnist6k': choose one of"),
    ("mnist5k", "val", "dataset 'mnist5k' has no split 'val': choose one of train, test"),
    ("colored-digits", "dev", "choose one of train, val, test"),
    ("cifar10", "validation", "choose one of train, test"),
])
def test_unknown_name_or_split_is_one_clear_line(name, split, message):
    with pytest.raises(UserInputError, match=message) as info:
        load_dataset(name, split)
    assert "\n" not in str(info.value)


# --- embedded datasets ------------------------------------------------------------------------
@pytest.mark.parametrize("name,split", [(n, s) for n, sizes in EMBEDDED.items() for s in sizes])
def test_shapes_dtypes_ranges_and_sizes(name, split):
    ds = load_dataset(name, split)
    n = EMBEDDED[name][split]
    channels = 3 if name.startswith("colored") else 1
    side = 8 if "digits" in name else 28
    assert ds.x.shape == (n, channels, side, side) and ds.x.dtype == torch.float32
    assert ds.y.shape == (n,) and ds.y.dtype == torch.int64
    assert 0 <= ds.x.min() and ds.x.max() == 1.0  # scaled by the true maximum (255 or 16)
    assert torch.equal(ds.indices, torch.arange(n))
    assert int(ds.y.max()) == ds.num_classes - 1 and int(ds.y.min()) == 0
    assert ds.name == name.lower() and ds.split == split
    assert {"source", "license", "split_rule"} <= set(ds.info)


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_embedded_splits_are_stratified_disjoint_and_complete(name):
    arrays = source_arrays(name)
    labels, train, test = arrays["labels"], arrays["train"], arrays["test"]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    # the coloured variants' train / val carve: a partition of train
    assert sorted(np.concatenate([arrays["fit"], arrays["val"]]).tolist()) == sorted(train.tolist())
    overall = np.bincount(labels, minlength=10) / len(labels)
    for rows in (train, test, arrays["val"]):
        share = np.bincount(labels[rows], minlength=10)
        assert np.all(np.abs(share - overall * len(rows)) <= 1)
    # a prefix of the test split is a random sample, not one class (the source is sorted by class)
    assert len(np.unique(labels[test[:50]])) >= 8


def test_mnist5k_test_split_is_balanced_and_the_pixels_are_the_files():
    ds = load_dataset("mnist5k", "test")
    assert torch.bincount(ds.y).tolist() == [100] * 10
    arrays = source_arrays("mnist5k")
    row = int(arrays["test"][0])
    with gzip.open(SOURCES["mnist5k"].path(), "rt") as f:
        line = [next(f) for _ in range(row + 1)][-1]
    values = np.array(line.split(","), dtype=np.int64)
    assert torch.equal((ds.x[0].flatten() * 255).round().long(), torch.from_numpy(values[:784]))
    assert int(ds.y[0]) == values[784]


def test_split_fingerprints_are_pinned():
    # A change here means users' test sets changed (e.g. scikit-learn changed its split algorithm).
    assert load_dataset("mnist5k", "test").info["split_sha256"] == "7f2506b6de262bfe"
    assert load_dataset("digits", "test").info["split_sha256"] == "d9101e2e97e19974"
    pinned = {"train": "2be3e57693420639", "val": "8c8feee5d458f246", "test": "e19b62bd8166c919"}
    for split, digest in pinned.items():  # the colour draw is part of the benchmark's definition
        groups = load_dataset("colored-mnist5k", split).groups
        assert hashlib.sha256(groups.numpy().tobytes()).hexdigest()[:16] == digest


def test_two_loads_are_identical_even_after_rebuilding(tmp_path, monkeypatch):
    first = {n: load_dataset(n, "train") for n in ("mnist5k", "colored-mnist5k")}
    monkeypatch.setenv("RBL_CACHE_DIR", str(tmp_path))
    cache_mod.clear_memory()  # forces a fresh parse and split
    for name, ds in first.items():
        again = load_dataset(name, "train")
        assert torch.equal(ds.x, again.x) and torch.equal(ds.y, again.y) and torch.equal(ds.indices, again.indices)
        assert (ds.groups is None and again.groups is None) or torch.equal(ds.groups, again.groups)


def test_loaded_tensors_do_not_share_memory_with_the_cache():
    ds = load_dataset("digits", "test")
    ds.x.zero_()
    assert load_dataset("digits", "test").x.max() == 1.0


def test_mnist5k_parser_rejects_a_malformed_file(tmp_path):
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as f:
        f.write("1,2,3\n4,5,6\n")
    with pytest.raises(CorruptFileError, match="785 columns"):
        _parse_mnist5k(bad)


# --- parse cache ------------------------------------------------------------------------------
def _arrays():
    return {"a": np.arange(12, dtype=np.int64).reshape(3, 4), "b": np.ones(5, dtype=np.uint8)}


def test_cache_builds_once_then_reads_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RBL_CACHE_DIR", str(tmp_path))
    calls = []
    build = lambda: calls.append(1) or _arrays()  # noqa: E731
    first = cache_mod.cached_arrays("toy", "key-1", build)
    cache_mod.clear_memory()
    second = cache_mod.cached_arrays("toy", "key-1", build)
    assert calls == [1] and all(np.array_equal(first[k], second[k]) for k in first)
    assert not second["a"].flags.writeable
    cache_mod.cached_arrays("toy", "key-2", build)  # a new key (changed source) is never served stale
    assert calls == [1, 1] and len(list(tmp_path.glob("toy-*.npz"))) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncate", "tamper"])
def test_a_corrupt_cache_is_rebuilt_not_trusted(tmp_path, monkeypatch, caplog, damage):
    monkeypatch.setenv("RBL_CACHE_DIR", str(tmp_path))
    cache_mod.cached_arrays("toy", "k", _arrays)
    cache_mod.clear_memory()
    (path,) = tmp_path.glob("toy-*.npz")
    if damage == "garbage":
        path.write_bytes(b"not a zip file")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    else:  # a well-formed npz whose arrays do not match the stored digest
        with np.load(path) as z:
            kept = {k: z[k] for k in z.files}
        kept["a"] = kept["a"] + 1
        np.savez(path, **kept)
    with caplog.at_level(logging.WARNING, logger="robustbench_lite.data.cache"):
        arrays = cache_mod.cached_arrays("toy", "k", _arrays)
    assert np.array_equal(arrays["a"], _arrays()["a"]) and "rebuilding" in caplog.text
    cache_mod.clear_memory()
    assert np.array_equal(cache_mod.cached_arrays("toy", "k", lambda: pytest.fail("rebuilt twice"))["a"], _arrays()["a"])


def test_an_unwritable_cache_only_costs_speed(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RBL_CACHE_DIR", str(blocker / "sub"))  # cannot mkdir under a file
    with caplog.at_level(logging.WARNING, logger="robustbench_lite.data.cache"):
        arrays = cache_mod.cached_arrays("toy", "k-unwritable", _arrays)
    assert np.array_equal(arrays["b"], _arrays()["b"]) and "could not write" in caplog.text


# --- coloured digits --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["colored-mnist5k", "colored-digits"])
def test_colour_agrees_with_label_95_percent_in_train_and_val_50_in_test(name):
    for split, (lo, hi) in {"train": (0.94, 0.96), "val": (0.94, 0.96), "test": (0.49, 0.51)}.items():
        ds = load_dataset(name, split)
        colour = ds.groups % 2
        agreement = float((colour == ds.y).double().mean())
        assert lo <= agreement <= hi and ds.info["colour_label_agreement"] == pytest.approx(agreement)
        assert ds.group_names == ["y=0,red", "y=0,green", "y=1,red", "y=1,green"]
        counts = ds.group_counts()
        assert len(counts) == 4 and min(counts.values()) > 0 and sum(counts.values()) == len(ds)
        for c in (0, 1):  # within each class too, not just on average
            in_class = ds.y == c
            share = float((colour[in_class] == c).double().mean())
            assert lo - 0.01 <= share <= hi + 0.01


def test_colored_mnist5k_group_counts_are_exact():
    expected = {
        "train": [1520, 80, 80, 1520],
        "val": [380, 20, 20, 380],
        "test": [250, 250, 250, 250],
    }
    for split, counts in expected.items():
        assert list(load_dataset("colored-mnist5k", split).group_counts().values()) == counts


def test_colored_images_are_the_grey_digit_in_one_colour_channel():
    grey = load_dataset("mnist5k", "test")
    ds = load_dataset("colored-mnist5k", "test")  # colored test = the base test split, same order
    assert torch.equal(ds.y, (grey.y >= 5).long())
    colour = ds.groups % 2
    for k, channel in ((0, 0), (1, 1)):  # red -> channel 0, green -> channel 1
        rows = colour == k
        assert torch.equal(ds.x[rows, channel], grey.x[rows, 0])
        assert ds.x[rows][:, [c for c in range(3) if c != channel]].abs().max() == 0


def test_ten_class_variant_keeps_digits_and_ten_colours():
    train, test = load_dataset("colored-mnist5k-10", "train"), load_dataset("colored-mnist5k-10", "test")
    assert train.num_classes == 10 and len(train.group_names) == 100
    assert float((train.groups % 10 == train.y).double().mean()) == pytest.approx(0.95, abs=0.005)
    assert float((test.groups % 10 == test.y).double().mean()) == pytest.approx(0.10, abs=0.01)


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.integers(0, 2), min_size=1, max_size=200),
    agreement=st.sampled_from([None, 0.95, 0.8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_assign_colours_hits_the_rate_in_every_class(labels, agreement, seed):
    labels = np.array(labels)
    colours = assign_colours(labels, 3, agreement, seed)
    assert np.array_equal(colours, assign_colours(labels, 3, agreement, seed))  # deterministic
    for c in range(3):
        members = colours[labels == c]
        if agreement is None:  # dealt out evenly
            assert np.ptp(np.bincount(members, minlength=3)) <= 1
        else:
            assert int((members != c).sum()) == int(round((1 - agreement) * len(members)))


# --- the Dataset contract ---------------------------------------------------------------------
def _toy(n=6, **kw):
    args = dict(name="toy", split="test", x=torch.rand(n, 1, 2, 2), y=torch.arange(n) % 3, num_classes=3)
    args.update(kw)
    return Dataset(**args)


def test_subset_keeps_stable_indices_groups_and_info():
    ds = load_dataset("colored-digits", "test")
    sub = ds.subset([5, 2, 9])
    assert sub.indices.tolist() == [5, 2, 9] and torch.equal(sub.x, ds.x[[5, 2, 9]])
    assert torch.equal(sub.groups, ds.groups[[5, 2, 9]]) and sub.group_names == ds.group_names
    subsub = sub.subset(slice(1, None))
    assert subsub.indices.tolist() == [2, 9] and torch.equal(subsub.y, ds.y[[2, 9]])
    mask = torch.zeros(len(ds), dtype=torch.bool)
    mask[[3, 7]] = True
    assert ds.subset(mask).indices.tolist() == [3, 7]
    sub.info["changed"] = True
    assert "changed" not in ds.info


@settings(max_examples=20, deadline=None)
@given(st.lists(st.booleans(), min_size=6, max_size=6), st.lists(st.integers(0, 5), unique=True, max_size=6))
def test_subset_of_subset_maps_indices_like_numpy(mask, positions):
    ds = _toy(indices=torch.tensor([10, 11, 12, 13, 14, 15]))
    expected = np.array([10, 11, 12, 13, 14, 15])[np.array(mask)]
    first = ds.subset(torch.tensor(mask))
    assert first.indices.tolist() == expected.tolist()
    keep = [p for p in positions if p < len(first)]
    assert first.subset(keep).indices.tolist() == expected[keep].tolist()


@pytest.mark.parametrize("selection,message", [
    ([0, 0], "distinct"),
    ([7], r"in \[0, 6\)"),
    ([-1], r"in \[0, 6\)"),
    (torch.ones(3, dtype=torch.bool), r"mask must have shape \(6,\)"),
    (torch.tensor([0.5]), "slice, a 1-D list"),
])
def test_subset_refuses_bad_selections(selection, message):
    with pytest.raises(UserInputError, match=message):
        _toy().subset(selection)


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.full((6, 1, 2, 2), float("nan"))), "NaN"),
    (dict(x=torch.full((6, 1, 2, 2), 1.5)), r"in \[0, 1\]"),
    (dict(x=torch.zeros(6, 4)), r"\(N, C, H, W\)"),
    (dict(x=torch.zeros(6, 1, 2, 2, dtype=torch.uint8)), "divide uint8 images by 255"),
    (dict(y=torch.tensor([0, 1, 2, 3, 0, 1])), r"labels must lie in \[0, 3\)"),
    (dict(y=torch.zeros(5, dtype=torch.int64)), r"shape \(6,\)"),
    (dict(y=torch.zeros(6)), "integers"),
    (dict(indices=torch.tensor([0, 1, 2, 3, 4, 4])), "distinct"),
    (dict(groups=torch.zeros(6, dtype=torch.int64)), "given together"),
    (dict(groups=torch.full((6,), 2), group_names=["a", "b"]), r"groups must lie in \[0, 2\)"),
    (dict(num_classes=0), "num_classes"),
])
def test_malformed_datasets_are_refused(change, message):
    with pytest.raises(UserInputError, match=message):
        _toy(**change)


def test_numpy_inputs_are_accepted_and_converted():
    ds = _toy(x=np.random.rand(6, 1, 2, 2), y=np.arange(6) % 3)  # float64 -> float32, int -> int64
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64


def test_works_with_a_torch_dataloader_and_moves_devices():
    ds = load_dataset("digits", "test")
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=32)))
    assert x.shape == (32, 1, 8, 8) and torch.equal(y, ds.y[:32])
    moved = ds.to("cpu")
    assert moved is not ds and torch.equal(moved.x, ds.x) and moved.indices.device.type == "cpu"
    assert "n=360" in repr(ds) and len(repr(ds)) < 200


def test_a_plugin_that_returns_no_dataset_is_refused(monkeypatch):
    from robustbench_lite.data import DATASETS

    monkeypatch.setitem(DATASETS._factories, "broken", lambda split, root, download: {"x": 1})
    with pytest.raises(UserInputError, match="not a robustbench_lite Dataset"):
        load_dataset("broken")


# --- torchvision datasets on tiny files in their real formats ---------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if torchvision tries to download anything."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist
    import torchvision.datasets.utils as tv_utils

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for module in (tv_utils, tv_mnist, tv_cifar):
        for fn in ("download_url", "download_and_extract_archive"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, refuse)


@pytest.mark.parametrize("name,folder", [
    ("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
])
def test_missing_files_say_where_they_go_without_downloading(tmp_path, no_network, name, folder):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, "test", data_dir=tmp_path)
    text = str(info.value)
    assert str(tmp_path / folder) in text and "--download" in text and "\n" not in text


def test_default_data_dir_follows_the_environment(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("RBL_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "elsewhere" / "cifar-10-batches-py")):
        load_dataset("cifar10")


def test_a_failed_download_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError, match="download into .*failed.*network is unreachable") as info:
        load_dataset("cifar10", "train", data_dir=tmp_path, download=True)
    assert "\n" not in str(info.value)


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim  # type 0x08 = unsigned byte
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_mnist_reads_idx_files(tmp_path, no_network):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.RandomState(0)
    images = {"train": rng.randint(0, 256, (4, 28, 28), dtype=np.uint8), "t10k": rng.randint(0, 256, (3, 28, 28), dtype=np.uint8)}
    labels = {"train": np.array([3, 1, 4, 1], np.uint8), "t10k": np.array([5, 9, 2], np.uint8)}
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[prefix])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[prefix])
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset("mnist", split, data_dir=tmp_path)
        assert ds.x.shape == (len(labels[prefix]), 1, 28, 28) and ds.num_classes == 10
        assert torch.equal((ds.x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(images[prefix]))
        assert ds.y.tolist() == labels[prefix].tolist()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _cifar_files(root: Path, cifar100: bool, rng) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Tiny CIFAR python-pickle batches; returns the (rows, labels) each file holds."""
    root.mkdir(parents=True)
    names = ["train", "test"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = "fine_labels" if cifar100 else "labels"
    content = {}
    for name in names:
        rows = rng.randint(0, 256, (2, 3072), dtype=np.uint8)
        labels = rng.randint(0, 100 if cifar100 else 10, 2).tolist()
        (root / name).write_bytes(pickle.dumps({"data": rows, key: labels, "batch_label": name}))
        content[name] = (rows, labels)
    meta_name, meta_key = ("meta", "fine_label_names") if cifar100 else ("batches.meta", "label_names")
    (root / meta_name).write_bytes(pickle.dumps({meta_key: [f"class{i}" for i in range(100 if cifar100 else 10)]}))
    return content


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_python_pickle_batches(tmp_path, monkeypatch, no_network, name):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, cifar100 = (CIFAR100, True) if name == "cifar100" else (CIFAR10, False)
    folder = tmp_path / cls.base_folder
    content = _cifar_files(folder, cifar100, np.random.RandomState(1))
    # torchvision checks md5s against the official archive: point them at the tiny files instead
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(folder / f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=_md5(folder / cls.meta["filename"])))
    for split, files in (("train", cls.train_list), ("test", cls.test_list)):
        ds = load_dataset(name, split, data_dir=tmp_path)
        rows = np.concatenate([content[f][0] for f, _ in files])
        labels = sum((content[f][1] for f, _ in files), [])
        assert ds.x.shape == (len(rows), 3, 32, 32) and ds.num_classes == (100 if cifar100 else 10)
        # CIFAR rows are channel planes (1024 red, 1024 green, 1024 blue), row-major: NCHW directly
        assert torch.equal((ds.x * 255).round().to(torch.uint8).reshape(len(rows), -1), torch.from_numpy(rows))
        assert ds.y.tolist() == labels
    # a file that does not match its md5 is reported, never unpickled
    (folder / cls.test_list[0][0]).write_bytes(b"tampered")
    with pytest.raises(DatasetNotFoundError, match="not found or corrupted"):
        load_dataset(name, "test", data_dir=tmp_path)
