"""The data stage: MNIST checks and splits, npz validation, normalisation, subsets, digests.

Offline: MNIST comes from the shared folder (``shared_data_dir``); everything else from small
generated ``.npz`` files. The full MNIST is loaded twice (unit, standardize).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from config.stages import DataConfig
from runtime.errors import DataError
from sources.idx import MNIST_SHA256, load_idx_raw, sha256_file, verify_mnist
from sources.npz import load_npz_raw, peek_npz_train_size
from sources.read import raw_test_features
from sources.sampling import stratified_subset
from tasks.data import load_data, load_data_task, normalize

RAW_FILES = list(MNIST_SHA256)


# --------------------------------------------------------------------------- helpers


def idx(root: Path, name: str) -> np.ndarray:
    """Read an IDX file with numpy alone (an oracle independent of torchvision)."""
    header = 16 if "images" in name else 8
    a = np.memmap(root / "MNIST" / "raw" / name, dtype=np.uint8, mode="r", offset=header)
    return a.reshape(-1, 784) if "images" in name else a


def make_npz(path: Path, n: int = 600, n_test: int = 150, d: int = 20, **override) -> dict:
    """3-class uint8 npz; columns 0 and 1 hold the row id (hi, lo byte) to trace rows."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n + n_test, d), dtype=np.uint8)  # (N, D)
    x[:n, 0], x[:n, 1] = np.arange(n) // 256, np.arange(n) % 256
    y = rng.permutation(np.arange(n + n_test) % 3)  # 3 balanced classes
    arrays = {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:]}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def cfg_for(path: Path, **kw) -> DataConfig:
    kw.setdefault("n_valid", 100)
    return DataConfig(dataset=str(path), data_dir=path.parent, download=False, **kw)


def row_ids(x: torch.Tensor) -> np.ndarray:
    """Recover the row ids that make_npz wrote into columns 0 and 1 (unit-scaled)."""
    b = np.rint(x[:, :2].numpy().astype(np.float64) * 255).astype(np.int64)
    return b[:, 0] * 256 + b[:, 1]


def mnist_copy(tmp_path: Path, shared: Path, copy: str | None = None, skip: str | None = None):
    """A data_dir with symlinks to the shared raw files, ``copy`` copied, ``skip`` left out."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_FILES:
        if name == copy:
            shutil.copyfile(shared / "MNIST" / "raw" / name, raw / name)
        elif name != skip:
            (raw / name).symlink_to(shared / "MNIST" / "raw" / name)
    return tmp_path / "data", raw


@pytest.fixture(scope="module")
def mnist(shared_data_dir):
    return load_data(DataConfig(data_dir=shared_data_dir, download=False))


# --------------------------------------------------------------------------- MNIST


def test_mnist_sizes_types_and_unit_range(mnist):
    assert (len(mnist.x_train), len(mnist.x_valid), len(mnist.x_test)) == (50000, 10000, 10000)
    assert mnist.x_train.shape == (50000, 784) and mnist.x_train.dtype == torch.float32
    assert mnist.y_train.dtype == torch.int64 and mnist.y_test.shape == (10000,)
    assert (mnist.n_features, mnist.n_classes, mnist.image_shape) == (784, 10, (28, 28))
    for x in (mnist.x_train, mnist.x_valid, mnist.x_test):
        assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert mnist.source == "mnist" and len(mnist.digest) == 64
    # the pixel statistics everybody quotes (data README)
    assert mnist.x_train.mean().item() == pytest.approx(0.1307, abs=2e-3)


def test_mnist_valid_is_the_last_10000_of_the_official_train_pool(mnist, shared_data_dir):
    pool = idx(shared_data_dir, "train-images-idx3-ubyte")  # (60000, 784) uint8
    expect_train = torch.from_numpy(pool[:50000] / np.float32(255))
    expect_valid = torch.from_numpy(pool[50000:] / np.float32(255))
    assert torch.equal(mnist.x_train, expect_train)
    assert torch.equal(mnist.x_valid, expect_valid)
    # a few rows by hand: valid row 0 is official row 50000
    for v in (0, 1234, 9999):
        assert np.array_equal(np.rint(mnist.x_valid[v].numpy() * 255), pool[50000 + v])
    test = idx(shared_data_dir, "t10k-images-idx3-ubyte")
    assert np.array_equal(np.rint(mnist.x_test[[0, 9999]].numpy() * 255), test[[0, 9999]])
    # disjoint: no valid image occurs among the training images (by content digest)
    train_rows = {hashlib.sha1(r.tobytes()).digest() for r in pool[:50000]}
    dup = sum(hashlib.sha1(r.tobytes()).digest() in train_rows for r in pool[50000:])
    assert dup < 10  # MNIST has a handful of exact duplicates, not thousands


def test_mnist_class_counts_match_raw_labels(mnist, shared_data_dir):
    labels = idx(shared_data_dir, "train-labels-idx1-ubyte")
    test_labels = idx(shared_data_dir, "t10k-labels-idx1-ubyte")
    s = mnist.summary()
    assert s["class_counts_train"] == np.bincount(labels[:50000]).tolist()
    assert s["class_counts_valid"] == np.bincount(labels[50000:]).tolist()
    assert s["class_counts_test"] == np.bincount(test_labels).tolist()
    assert np.array_equal(mnist.y_valid.numpy(), labels[50000:])
    assert (s["n_train"], s["n_valid"], s["n_test"], s["n_classes"]) == (50000, 10000, 10000, 10)
    json.dumps(s)  # JSON-friendly


def test_mnist_standardize_has_zero_mean_unit_std_and_finite_constant_pixels(shared_data_dir):
    b = load_data(DataConfig(data_dir=shared_data_dir, download=False, normalization="standardize"))
    raw = idx(shared_data_dir, "train-images-idx3-ubyte")[:50000].astype(np.float64)
    raw_std = raw.std(axis=0)
    constant = raw_std == 0
    assert constant.sum() >= 50  # MNIST's blank border pixels
    x = b.x_train.numpy().astype(np.float64)
    assert np.isfinite(b.x_train.numpy()).all() and np.isfinite(b.x_test.numpy()).all()
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(x[:, ~constant].std(axis=0), 1, rtol=1e-3)
    assert (x[:, constant] == 0).all()
    np.testing.assert_allclose(b.norm_stats["mean"].numpy(), raw.mean(axis=0), rtol=1e-6)
    assert (b.norm_stats["std"].numpy()[constant] == 1).all()
    # valid uses the TRAIN statistics
    valid_raw = idx(shared_data_dir, "train-images-idx3-ubyte")[50000:].astype(np.float64)
    expect = (valid_raw - raw.mean(axis=0)) / np.where(constant, 1, raw_std)
    np.testing.assert_allclose(b.x_valid.numpy(), expect, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- MNIST errors


def test_missing_mnist_file_names_it_and_the_fixes(tmp_path, shared_data_dir):
    root, raw = mnist_copy(tmp_path, shared_data_dir, skip="t10k-labels-idx1-ubyte")
    with pytest.raises(DataError) as e:
        load_data(DataConfig(data_dir=root, download=False))
    msg = str(e.value)
    assert str(raw / "t10k-labels-idx1-ubyte") in msg and "missing" in msg
    assert "train-images" not in msg  # only the missing file is named
    for fix in ("--data-dir", "LAYERWISE_DATA_DIR", "download"):
        assert fix in msg


def test_truncated_mnist_file_is_rejected_with_sums_and_size(tmp_path, shared_data_dir):
    root, raw = mnist_copy(tmp_path, shared_data_dir, copy="train-labels-idx1-ubyte")
    path = raw / "train-labels-idx1-ubyte"
    with open(path, "r+b") as f:
        f.truncate(60007)
    with pytest.raises(DataError) as e:
        load_data(DataConfig(data_dir=root, download=False))
    msg = str(e.value)
    assert str(path) in msg and MNIST_SHA256["train-labels-idx1-ubyte"] in msg
    assert hashlib.sha256(path.read_bytes()).hexdigest() in msg
    assert "size 60007 bytes" in msg and "re-download" in msg


def test_flipped_byte_in_mnist_images_is_rejected(tmp_path, shared_data_dir):
    root, raw = mnist_copy(tmp_path, shared_data_dir, copy="train-images-idx3-ubyte")
    path = raw / "train-images-idx3-ubyte"
    with open(path, "r+b") as f:
        f.seek(20_000_000)
        byte = f.read(1)[0]
        f.seek(20_000_000)
        f.write(bytes([byte ^ 0xFF]))
    with pytest.raises(DataError) as e:
        verify_mnist(root)
    msg = str(e.value)
    assert str(path) in msg and MNIST_SHA256["train-images-idx3-ubyte"] in msg
    assert sha256_file(path) in msg and "size 47040016 bytes" in msg
    assert "labels" not in msg.split("Fix")[0]  # only the corrupt file is named


def test_download_happens_only_when_files_are_absent_and_is_verified(
    tmp_path, shared_data_dir, monkeypatch
):
    import torchvision.datasets

    calls = []

    class FakeMNIST:  # "downloads" by linking the shared files; reads fake tensors
        def __init__(self, root, train, download):
            calls.append((train, download))
            if download:
                raw = Path(root) / "MNIST" / "raw"
                raw.mkdir(parents=True, exist_ok=True)
                for name in RAW_FILES:
                    if not (raw / name).exists():
                        (raw / name).symlink_to(shared_data_dir / "MNIST" / "raw" / name)
            n = 60000 if train else 10000
            self.data = torch.zeros((n, 28, 28), dtype=torch.uint8)
            self.targets = torch.arange(n) % 10

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    root, _ = mnist_copy(tmp_path, shared_data_dir, skip="train-images-idx3-ubyte")
    x, y, xt, yt = load_idx_raw("mnist", root, download=True)
    assert calls == [(True, True), (True, False), (False, False)]
    assert x.shape == (60000, 784) and x.dtype == np.uint8 and y.dtype == np.int64
    assert xt.shape == (10000, 784) and yt.shape == (10000,)
    calls.clear()  # files now present: no second download
    load_idx_raw("mnist", root, download=True)
    assert calls == [(True, False), (False, False)]


def test_sha256_file_is_memoised_on_path_size_and_mtime(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    h = sha256_file(path)
    assert h == hashlib.sha256(b"abc" * 1000).hexdigest()
    st = path.stat()
    path.write_bytes(b"xyz" * 1000)  # same size; restore the mtime: the memo answers
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_file(path) == h
    path.write_bytes(b"xyz" * 1001)  # size changed: hashed again
    assert sha256_file(path) == hashlib.sha256(b"xyz" * 1001).hexdigest()


# --------------------------------------------------------------------------- npz


def test_npz_three_classes_twenty_features(tmp_path):
    arrays = make_npz(tmp_path / "d.npz")
    b = load_data(cfg_for(tmp_path / "d.npz"))
    assert b.x_train.shape == (500, 20) and b.x_valid.shape == (100, 20)
    assert b.x_test.shape == (150, 20)
    assert (b.n_features, b.n_classes, b.image_shape) == (20, 3, None)
    assert b.source == str(tmp_path / "d.npz")
    # valid = the last 100 rows of x_train, uint8 scaled by 1/255
    expect = torch.from_numpy(arrays["x_train"][500:] / np.float32(255))
    assert torch.equal(b.x_valid, expect)
    assert np.array_equal(b.y_valid.numpy(), arrays["y_train"][500:])
    assert np.array_equal(row_ids(b.x_train), np.arange(500))


def test_npz_images_are_flattened_with_square_image_shape(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((60, 4, 4))  # (N, 4, 4) float images
    np.savez(tmp_path / "img.npz", x_train=x[:50], y_train=np.arange(50) % 2,
             x_test=x[50:], y_test=np.arange(10) % 2)  # fmt: skip
    b = load_data(cfg_for(tmp_path / "img.npz", n_valid=10))
    assert b.x_train.shape == (40, 16) and b.image_shape == (4, 4)
    lo, hi = x[:40].min(), x[:40].max()
    np.testing.assert_allclose(b.x_train.numpy(), (x[:40].reshape(40, 16) - lo) / (hi - lo),
                               atol=1e-6)  # fmt: skip


def test_unit_on_float_input_uses_train_min_max_and_clips_valid_test(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5))
    x[250:] *= 10  # valid rows reach far outside the train range
    np.savez(tmp_path / "f.npz", x_train=x, y_train=np.arange(300) % 2,
             x_test=x[:20] * 10, y_test=np.arange(20) % 2)  # fmt: skip
    b = load_data(cfg_for(tmp_path / "f.npz", n_valid=50))
    assert b.x_train.min().item() == 0.0 and b.x_train.max().item() == 1.0
    assert b.norm_stats["low"].item() == pytest.approx(x[:250].min(), rel=1e-6)
    assert b.norm_stats["high"].item() == pytest.approx(x[:250].max(), rel=1e-6)
    for v in (b.x_valid, b.x_test):
        assert v.min().item() == 0.0 and v.max().item() == 1.0
        assert 0 < (v == 1.0).float().mean().item() < 0.9  # clipped, not rescaled


def test_standardize_uses_train_statistics_only(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(1200, 6))
    x[1000:] += 5.0  # the validation split has another mean
    x[:, 4] = 7.0  # a constant feature
    np.savez(tmp_path / "s.npz", x_train=x, y_train=np.arange(1200) % 4,
             x_test=x[:100] - 1.0, y_test=np.arange(100) % 4)  # fmt: skip
    b = load_data(cfg_for(tmp_path / "s.npz", n_valid=200, normalization="standardize"))
    mean, std = x[:1000].mean(axis=0), x[:1000].std(axis=0)
    std[4] = 1.0
    np.testing.assert_allclose(b.norm_stats["mean"].numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(b.x_train.numpy().mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(b.x_train.numpy()[:, [0, 1, 2, 3, 5]].std(axis=0), 1, rtol=1e-4)
    assert (b.x_train[:, 4] == 0).all() and torch.isfinite(b.x_valid).all()
    np.testing.assert_allclose(b.x_valid.numpy(), (x[1000:] - mean) / std, rtol=1e-5, atol=1e-5)
    assert b.x_valid.numpy()[:, 0].mean() == pytest.approx(5.0 / std[0], rel=0.1)


def test_zca_whitens_correlated_data_with_train_statistics(tmp_path):
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # a random rotation
    mix = np.diag(np.sqrt(np.linspace(1, 6, 8))) @ q.T  # covariance spectrum 1..6, rotated
    x = rng.normal(size=(2400, 8)) @ mix  # (2400, 8)
    x[2000:] += 0.5  # valid drifts
    np.savez(tmp_path / "z.npz", x_train=x, y_train=np.arange(2400) % 2,
             x_test=x[:300], y_test=np.arange(300) % 2)  # fmt: skip
    b = load_data(cfg_for(tmp_path / "z.npz", n_valid=400, normalization="zca",
                          zca_epsilon=1e-5))  # fmt: skip
    xw = b.x_train.numpy().astype(np.float64)
    assert abs(np.corrcoef(x[:2000].T)[np.triu_indices(8, 1)]).max() > 0.25  # really correlated
    np.testing.assert_allclose(np.cov(xw.T), np.eye(8), atol=1e-2)
    np.testing.assert_allclose(xw.mean(axis=0), 0, atol=1e-5)
    w, m = b.norm_stats["zca_matrix"].numpy(), b.norm_stats["mean"].numpy()
    np.testing.assert_allclose(w, w.T, atol=1e-6)  # ZCA's W is symmetric
    lo, hi = x[:2000].min(), x[:2000].max()
    expect = (np.clip((x[2000:] - lo) / (hi - lo), 0, 1) - m) @ w  # valid with TRAIN stats
    np.testing.assert_allclose(b.x_valid.numpy(), expect, atol=1e-4)
    assert b.summary()["zca_epsilon"] == 1e-5


def test_normalize_rejects_unknown_method():
    x = np.zeros((3, 2), np.uint8)
    with pytest.raises(DataError, match="whiten"):
        normalize(x, x, x, "whiten", 0.1)


# --------------------------------------------------------------------------- n_train subsets


def test_stratified_subset_on_mnist_labels(mnist):
    y = mnist.y_train.numpy()
    idx = stratified_subset(y, 1000, seed=0)
    assert len(idx) == 1000 and len(np.unique(idx)) == 1000
    assert np.array_equal(idx, np.sort(idx)) and idx.max() < 50000
    expected = 1000 * np.bincount(y) / len(y)
    assert np.all(np.abs(np.bincount(y[idx], minlength=10) - expected) <= 1)
    assert np.array_equal(idx, stratified_subset(y, 1000, seed=0))
    assert not np.array_equal(idx, stratified_subset(y, 1000, seed=1))


def test_stratified_subset_keeps_rare_classes_and_exact_size():
    y = np.array([0] * 990 + [1] * 9 + [2] * 1)
    for n in (3, 10, 57):
        counts = np.bincount(y[stratified_subset(y, n, seed=5)], minlength=3)
        assert counts.sum() == n and (counts >= 1).all()
    # by hand: quotas 4 * (6, 3, 1) / 10 = (2.4, 1.2, 0.4) -> floors (2, 1, 0) + 1 for the
    # largest remainder (class 2) -> (2, 1, 1)
    y = np.repeat([0, 1, 2], [6, 3, 1])
    assert np.bincount(y[stratified_subset(y, 4, seed=0)]).tolist() == [2, 1, 1]
    y = np.array([0] * 5 + [2] * 5)  # class 1 absent
    assert np.bincount(y[stratified_subset(y, 4, seed=0)]).tolist() == [2, 0, 2]


def test_n_train_subsets_the_train_split_only(tmp_path):
    make_npz(tmp_path / "d.npz")
    b = load_data(cfg_for(tmp_path / "d.npz", n_train=90, subset_seed=3))
    ids = row_ids(b.x_train)
    full = load_npz_raw(tmp_path / "d.npz")[1][:500]  # labels of the train split
    assert np.array_equal(ids, stratified_subset(full, 90, seed=3)) and ids.max() < 500
    assert b.y_train.tolist() == full[ids].tolist()
    expected = 90 * np.bincount(full) / 500  # per class, proportional
    assert np.all(np.abs(np.array(b.summary()["class_counts_train"]) - expected) <= 1)
    assert len(b.x_valid) == 100 and len(b.x_test) == 150  # untouched
    other = load_data(cfg_for(tmp_path / "d.npz", n_train=90, subset_seed=4))
    assert not np.array_equal(row_ids(other.x_train), ids) and other.digest != b.digest


@pytest.mark.parametrize(
    "kw, needles",
    [({"n_train": 501}, ["n_train=501", "500 training examples"]),
     ({"n_valid": 600}, ["n_valid=600", "600 training examples"])],
)  # fmt: skip
def test_split_sizes_that_do_not_fit(tmp_path, kw, needles):
    make_npz(tmp_path / "d.npz")
    with pytest.raises(DataError) as e:
        load_data(cfg_for(tmp_path / "d.npz", **kw))
    for needle in needles:
        assert needle in str(e.value)


# --------------------------------------------------------------------------- bad npz


def _nan_x():
    x = np.random.default_rng(0).random((600, 20))
    x[5, 3] = np.nan
    x[7, 1] = np.inf
    return x


BAD_NPZ = {
    "count_mismatch": ({"y_train": np.arange(599) % 3},
                       ["x_train has 600 rows", "y_train has 599 labels"]),
    "nan": ({"x_train": _nan_x()}, ["x_train", "2 NaN/inf", "[5, 3]"]),
    "x_1d": ({"x_test": np.zeros(150)}, ["x_test", "2-D", "(150,)"]),
    "y_2d": ({"y_train": np.zeros((600, 1), int)}, ["y_train", "1-D", "(600, 1)"]),
    "missing_keys": ({"x_test": None, "y_test": None}, ["missing array(s) x_test, y_test"]),
    "test_label_out_of_range": ({"y_test": np.arange(150) % 4},
                                ["y_test holds label(s) 3 that y_train never has", "0..2"]),
    "negative_label": ({"y_train": np.arange(600) % 3 - 1}, ["y_train", "negative labels (e.g. -1)",
                                                             "rows 0, 3, 6"]),
    "float_labels": ({"y_train": np.full(600, 0.5)}, ["y_train", "non-integer"]),
    "bool_x": ({"x_train": np.zeros((600, 20), bool)}, ["x_train", "dtype bool"]),
    "str_y": ({"y_test": np.array(["a"] * 150)}, ["y_test", "dtype <U1"]),
    "feature_mismatch": ({"x_test": np.zeros((150, 21))}, ["x_train has 20", "x_test 21"]),
    "empty_test": ({"x_test": np.zeros((0, 20)), "y_test": np.zeros(0, int)}, ["x_test", "empty"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_raises_data_error_naming_file_and_array(tmp_path, case):
    override, needles = BAD_NPZ[case]
    path = tmp_path / f"{case}.npz"
    make_npz(path, **override)
    with pytest.raises(DataError) as e:
        load_data(cfg_for(path))
    assert str(path) in str(e.value)
    for needle in needles:
        assert needle in str(e.value)


def test_npz_float_labels_with_integer_values_are_accepted(tmp_path):
    make_npz(tmp_path / "d.npz", y_train=(np.arange(600) % 3).astype(np.float32))
    b = load_data(cfg_for(tmp_path / "d.npz"))
    assert b.y_train.dtype == torch.int64 and b.n_classes == 3


def test_npz_object_array_and_missing_or_broken_file(tmp_path):
    make_npz(tmp_path / "o.npz", y_test=np.array([1, None] * 75, dtype=object))
    with pytest.raises(DataError, match="cannot read arrays"):
        load_npz_raw(tmp_path / "o.npz")
    with pytest.raises(DataError, match="not found"):
        load_npz_raw(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_npz_raw(tmp_path / "junk.npz")


# --------------------------------------------------------------------------- peek


def test_peek_npz_train_size_reads_only_the_header(tmp_path, monkeypatch):
    make_npz(tmp_path / "d.npz", n=321)
    arrays = load_npz_raw(tmp_path / "d.npz")
    np.savez_compressed(tmp_path / "c.npz", x_train=np.zeros((77, 3)), y_train=np.zeros(77))
    with zipfile.ZipFile(tmp_path / "v2.npz", "w") as zf, zf.open("x_train.npy", "w") as f:
        np.lib.format.write_array(f, np.zeros((45, 2)), version=(2, 0))

    def refuse(*a, **k):
        raise AssertionError("peek must not load arrays")

    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr(np.lib.format, "read_array", refuse)
    assert peek_npz_train_size(tmp_path / "d.npz") == len(arrays[0]) == 321
    assert peek_npz_train_size(tmp_path / "c.npz") == 77
    assert peek_npz_train_size(tmp_path / "v2.npz") == 45
    np.savez(tmp_path / "nox.npz", y_train=np.zeros(3))
    with pytest.raises(DataError, match="x_train"):
        peek_npz_train_size(tmp_path / "nox.npz")
    with pytest.raises(DataError, match="not found"):
        peek_npz_train_size(tmp_path / "absent.npz")


# --------------------------------------------------------------------------- digest

DIGEST_CODE = (
    "import sys; from config.stages import DataConfig; from tasks.data import load_data; "
    "print(load_data(DataConfig(dataset=sys.argv[1], data_dir=sys.argv[2], download=False, "
    "n_valid=100)).digest)"
)


def test_digest_is_the_same_in_other_processes(tmp_path):
    make_npz(tmp_path / "d.npz")
    here = load_data(cfg_for(tmp_path / "d.npz")).digest
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DIGEST_CODE, str(tmp_path / "d.npz"), str(tmp_path / d)],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        for d, seed in (("a", "1"), ("b", "2"))
    ]  # fmt: skip
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.strip().splitlines()[-1] == here


def test_digest_tracks_content_and_settings_not_location(tmp_path):
    arrays = make_npz(tmp_path / "d.npz")
    base = load_data(cfg_for(tmp_path / "d.npz")).digest
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "d.npz", tmp_path / "elsewhere" / "d.npz")
    moved = DataConfig(dataset=str(tmp_path / "elsewhere" / "d.npz"), data_dir=tmp_path / "x",
                       download=True, n_valid=100)  # fmt: skip
    assert load_data(moved).digest == base  # location, data_dir, download: irrelevant
    assert load_data(cfg_for(tmp_path / "d.npz", subset_seed=9)).digest == base  # no subset
    for kw in ({"normalization": "standardize"}, {"normalization": "zca"}, {"n_valid": 99},
               {"n_train": 500}):  # fmt: skip
        assert load_data(cfg_for(tmp_path / "d.npz", **kw)).digest != base, kw
    zca = [load_data(cfg_for(tmp_path / "d.npz", normalization="zca", zca_epsilon=e)).digest
           for e in (0.1, 0.2)]  # fmt: skip
    assert zca[0] != zca[1]
    x = arrays["x_train"].copy()
    x[3, 7] ^= 1  # one pixel
    make_npz(tmp_path / "p.npz", x_train=x)
    assert load_data(cfg_for(tmp_path / "p.npz")).digest != base


# --------------------------------------------------------------------------- bundle and task


def test_bundle_carries_the_first_test_rows_as_stored_and_where_the_data_lies(
    mnist, shared_data_dir, tmp_path
):
    """What registering the model and naming the dataset need, so that no later stage
    reads the source again: MNIST's uint8 pixels, an .npz's own dtype, flattened."""
    oracle = idx(shared_data_dir, "t10k-images-idx3-ubyte")  # (10000, 784) uint8
    assert mnist.input_example.dtype == np.uint8 and mnist.pixels
    np.testing.assert_array_equal(mnist.input_example, oracle[:5])
    assert mnist.location == str(shared_data_dir / "MNIST" / "raw")

    arrays = make_npz(tmp_path / "d.npz")
    b = load_data(cfg_for(tmp_path / "d.npz"))
    assert b.input_example.dtype == np.uint8 and b.pixels
    np.testing.assert_array_equal(b.input_example, arrays["x_test"][:5])
    assert b.location == str(tmp_path / "d.npz")
    images = np.random.default_rng(1).normal(size=(60, 4, 4)).astype(np.float32)  # (N, H, W)
    make_npz(tmp_path / "f.npz", n=40, n_test=20, x_train=images[:40], x_test=images[40:])
    f = load_data(cfg_for(tmp_path / "f.npz", n_valid=10))
    assert f.input_example.dtype == np.float32 and f.input_example.shape == (5, 16)
    np.testing.assert_array_equal(f.input_example, images[40:45].reshape(5, 16))
    assert not f.pixels
    np.testing.assert_array_equal(raw_test_features(cfg_for(tmp_path / "f.npz")),
                                  images[40:].reshape(20, 16))
    assert f.input_example.base is None  # a copy: the bundle holds no view of the split
    again = pickle.loads(pickle.dumps(f))
    np.testing.assert_array_equal(again.input_example, f.input_example)
    assert again.digest == f.digest and again.location == f.location


def test_bundle_is_frozen_and_the_prefect_task_wraps_load_data(tmp_path):
    from prefect.cache_policies import NO_CACHE

    make_npz(tmp_path / "d.npz")
    cfg = cfg_for(tmp_path / "d.npz")
    b = load_data_task.fn(cfg)
    assert b.digest == load_data(cfg).digest
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.digest = "x"  # type: ignore[misc]
    assert load_data_task.name == "load-data" and load_data_task.cache_policy is NO_CACHE
    assert load_data_task.persist_result is False
    assert "zca_epsilon" not in b.summary()
