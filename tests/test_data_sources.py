"""The other inputs of the data stage: Fashion-MNIST / KMNIST (tiny IDX files built here,
never downloaded), the MNIST variants (derived from the shared MNIST) and CSV / Parquet."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from config.overrides import resolve_config
from config.stages import DataConfig
from runtime.errors import ConfigError, DataError
from sources.idx import IDX_FILES, IDX_SOURCES, IdxSource, load_idx_raw
from sources.variants import background_random, rotate
from tasks.data import load_data

# --------------------------------------------------------------------------- IDX family


def write_idx(raw: Path, n_train: int = 100, n_test: int = 30, seed: int = 0) -> dict:
    """Four tiny IDX files (big-endian header, then uint8) and their .gz archives."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, n in zip(IDX_FILES, (n_train, n_train, n_test, n_test)):
        if "images" in name:
            a = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            header = np.array([2051, n, 28, 28], ">i4").tobytes()
        else:
            a = rng.integers(0, 10, n, dtype=np.uint8)
            header = np.array([2049, n], ">i4").tobytes()
        body = header + a.tobytes()
        (raw / name).write_bytes(body)
        (raw / f"{name}.gz").write_bytes(gzip.compress(body, mtime=0))
        arrays[name] = a
    return arrays


def md5s(raw: Path) -> dict[str, str]:
    return {n: hashlib.md5((raw / f"{n}.gz").read_bytes()).hexdigest() for n in IDX_FILES}


@pytest.mark.parametrize("name, folder", [("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_published_md5s_are_torchvisions(name, folder):
    import torchvision.datasets as tvd

    published = dict(getattr(tvd, folder).resources)  # {"train-images-idx3-ubyte.gz": md5}
    assert IDX_SOURCES[name].folder == folder
    assert {f"{k}.gz": v for k, v in IDX_SOURCES[name].gz_md5.items()} == published


@pytest.mark.parametrize("name, folder", [("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_idx_dataset_loads_when_archives_match(tmp_path, monkeypatch, name, folder):
    raw = tmp_path / folder / "raw"
    arrays = write_idx(raw)
    monkeypatch.setitem(IDX_SOURCES, name, IdxSource(folder, gz_md5=md5s(raw)))
    b = load_data(DataConfig(dataset=name, data_dir=tmp_path, download=False, n_valid=20))
    x = arrays["train-images-idx3-ubyte"].reshape(100, 784)
    assert b.x_train.shape == (80, 784) and b.x_test.shape == (30, 784)
    np.testing.assert_array_equal(b.x_valid.numpy(), x[80:] / np.float32(255))  # the last 20
    assert b.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert b.source == name and b.image_shape == (28, 28)


def test_idx_bad_archive_raw_mismatch_and_missing_archive(tmp_path, monkeypatch):
    raw = tmp_path / "KMNIST" / "raw"
    write_idx(raw)
    good = md5s(raw)
    wrong = {**good, "train-labels-idx1-ubyte": "0" * 32}
    monkeypatch.setitem(IDX_SOURCES, "kmnist", IdxSource("KMNIST", gz_md5=wrong))
    with pytest.raises(DataError) as e:
        load_idx_raw("kmnist", tmp_path, download=False)
    assert f"{raw / 'train-labels-idx1-ubyte.gz'} (expected md5 {'0' * 32}" in str(e.value)
    assert "re-download" in str(e.value)

    monkeypatch.setitem(IDX_SOURCES, "kmnist", IdxSource("KMNIST", gz_md5=good))
    body = bytearray((raw / "t10k-images-idx3-ubyte").read_bytes())
    body[100] ^= 1  # one pixel of the raw file, the archive untouched
    (raw / "t10k-images-idx3-ubyte").write_bytes(bytes(body))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte differs from the decompressed"):
        load_idx_raw("kmnist", tmp_path, download=False)

    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is missing"):
        load_idx_raw("kmnist", tmp_path, download=False)
    (raw / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="KMNIST file\\(s\\) missing: .*train-images-idx3-ubyte"):
        load_idx_raw("kmnist", tmp_path, download=False)


def test_failed_download_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(self):
        raise RuntimeError("no network")

    monkeypatch.setattr(tvd.FashionMNIST, "download", offline)
    with pytest.raises(DataError) as e:
        load_idx_raw("fashion-mnist", tmp_path, download=True)
    assert f"downloading FashionMNIST into {tmp_path / 'FashionMNIST' / 'raw'} failed" in str(
        e.value) and "no network" in str(e.value) and "LAYERWISE_DATA_DIR" in str(e.value)


# --------------------------------------------------------------------------- MNIST variants


@pytest.fixture(scope="module")
def mnist_raw(shared_data_dir):
    return load_idx_raw("mnist", shared_data_dir, download=False)  # pool, labels, test, labels


@pytest.fixture()
def mnist_test(mnist_raw):
    return mnist_raw[2]  # (10000, 784) uint8


def test_background_random_is_max_of_digit_and_uniform_noise(mnist_test):
    x = mnist_test[:2000]
    bg = background_random(x, seed=7)
    assert bg.dtype == np.uint8 and (bg >= x).all()
    assert (bg[x == 255] == 255).all()  # max(1, u) = 1
    noise = bg[x == 0].astype(np.float64)  # where the digit is 0, the pixel is the noise
    assert noise.mean() == pytest.approx(127.5, abs=0.5)  # U{0..255}: mean 127.5
    assert noise.var() == pytest.approx((256**2 - 1) / 12, rel=0.01)  # and var (n²-1)/12
    assert np.array_equal(bg, background_random(x, seed=7))
    assert not np.array_equal(bg, background_random(x, seed=8))


def test_rotate_turns_each_image_by_its_drawn_angle():
    x = np.zeros((200, 28, 28), np.uint8)
    x[:, 4:7, 12:15] = 255  # a blob above the centre
    r = rotate(x.reshape(200, 784), seed=3)
    theta = np.random.Generator(np.random.PCG64(3)).uniform(0, 2 * np.pi, 200)
    rows, cols = np.mgrid[0:28, 0:28]

    def polar(a):  # centroid angle (y up, counter-clockwise) and radius about (13.5, 13.5)
        w = a.reshape(-1, 28, 28).astype(np.float64)
        dy = 13.5 - (w * rows).sum((1, 2)) / w.sum((1, 2))
        dx = (w * cols).sum((1, 2)) / w.sum((1, 2)) - 13.5
        return np.arctan2(dy, dx), np.hypot(dy, dx)

    (a0, r0), (a1, r1) = polar(x), polar(r)
    turned = np.angle(np.exp(1j * (a1 - a0 - theta)))  # wrapped to (-π, π]
    assert np.abs(turned).max() < 0.01 and np.abs(r1 - r0).max() < 0.1
    mass = r.sum(1) / x.reshape(200, -1).sum(1)
    assert mass.min() > 0.95 and mass.max() < 1.05  # bilinear resampling keeps the mass
    assert theta.min() < 0.1 and theta.max() > 2 * np.pi - 0.1  # the full circle is drawn


def test_variant_digest_carries_the_generator_seed(mnist_raw, monkeypatch):
    import sources.read

    small = (mnist_raw[0][:3000], mnist_raw[1][:3000], mnist_raw[2][:500], mnist_raw[3][:500])
    monkeypatch.setattr(sources.read, "load_idx_raw", lambda name, *a: small)  # MNIST, cut short
    cfg = dict(dataset="mnist-bg-rand", data_dir="unused", download=False, n_valid=1000)
    a = load_data(DataConfig(**cfg))
    mnist = load_data(DataConfig(**{**cfg, "dataset": "mnist"}))
    assert a.digest == load_data(DataConfig(**cfg)).digest  # deterministic
    assert a.digest != load_data(DataConfig(**cfg, variant_seed=1)).digest
    assert a.digest != mnist.digest
    assert a.y_train.tolist() == mnist.y_train.tolist()  # same digits, same labels
    assert (a.x_valid >= mnist.x_valid).all() and len(a.x_valid) == 1000  # the last 1000
    rot = load_data(DataConfig(**{**cfg, "dataset": "mnist-rot"}))
    assert rot.digest != mnist.digest and rot.x_test.shape == (500, 784)
    rot1 = load_data(DataConfig(**{**cfg, "dataset": "mnist-rot", "variant_seed": 1}))
    assert rot.digest != rot1.digest


# --------------------------------------------------------------------------- CSV / Parquet


def make_table(n: int = 300, d: int = 5, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, d)), columns=[f"f{i}" for i in range(d)])
    df["target"] = np.arange(n) % 3
    return df


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_with_label_column_splits_test_then_valid_stratified(tmp_path, suffix):
    df = make_table()
    path = tmp_path / f"t{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
    cfg = DataConfig(dataset=str(path), label_column="target")
    b = load_data(cfg)
    # 300 rows: test = round(0.2 * 300) = 60; valid = round(0.1 * 240) = 24; train = 216
    assert (len(b.x_train), len(b.x_valid), len(b.x_test)) == (216, 24, 60)
    assert b.n_features == 5 and b.n_classes == 3
    assert b.summary()["class_counts_test"] == [20, 20, 20]  # stratified
    assert b.summary()["class_counts_valid"] == [8, 8, 8]
    assert b.digest == load_data(cfg).digest
    assert b.digest != load_data(DataConfig(dataset=str(path), label_column="target",
                                            subset_seed=1)).digest  # fmt: skip


def test_table_split_column_and_parquet_equals_csv(tmp_path):
    df = make_table(n=90)
    df["split"] = np.array(["train"] * 60 + ["valid"] * 10 + ["test"] * 20)
    df.to_csv(tmp_path / "s.csv", index=False)
    df.to_parquet(tmp_path / "s.parquet")
    c = load_data(DataConfig(dataset=str(tmp_path / "s.csv"), label_column="target"))
    p = load_data(DataConfig(dataset=str(tmp_path / "s.parquet"), label_column="target"))
    assert (len(c.x_train), len(c.x_valid), len(c.x_test)) == (60, 10, 20)
    assert c.digest == p.digest
    np.testing.assert_array_equal(c.y_valid.numpy(), df["target"].to_numpy()[60:70])


BAD_TABLES = {
    "no_label": (lambda df: df.drop(columns="target"), ["no column 'target'",
                                                        "--set data.label_column=NAME"]),
    "text_feature": (lambda df: df.assign(f2="x"), ["['f2'] are not numeric"]),
    "negative_label": (lambda df: df.assign(target=df["target"] - 1),
                       ["negative labels (e.g. -1)"]),
    "fractional_label": (lambda df: df.assign(target=df["target"] + 0.5), ["non-integer"]),
    "bad_split": (lambda df: df.assign(split="holdout"), ["'split' has value(s) ['holdout']"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_table_raises_data_error_naming_file_and_column(tmp_path, case):
    change, needles = BAD_TABLES[case]
    path = tmp_path / f"{case}.csv"
    change(make_table()).to_csv(path, index=False)
    with pytest.raises(DataError) as e:
        load_data(DataConfig(dataset=str(path), label_column="target"))
    assert str(path) in str(e.value)
    for needle in needles:
        assert needle in str(e.value)


def test_broken_parquet_and_missing_label_column_fail_before_start_up(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="junk.parquet is not a readable parquet file"):
        resolve_config("quick", dataset=str(tmp_path / "junk.parquet"))
    make_table().to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="no column 'label'.*--set data.label_column=NAME"):
        resolve_config("quick", dataset=str(tmp_path / "t.csv"))
    config = resolve_config("quick", dataset=str(tmp_path / "t.csv"),
                            sets=["data.label_column=target"])  # fmt: skip
    assert config.data.n_train is None  # the preset's 5000 is "at most": 216 rows here
    with pytest.raises(ConfigError, match="dataset must be one of mnist, fashion-mnist"):
        resolve_config("quick", dataset=str(tmp_path / "t.txt"))
